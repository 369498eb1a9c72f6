"""Flower ClientApp: site config, local trainer, local state store."""
