"""Auditing a site: ledger verification, the audit report and membership-inference attacks."""
