"""The researcher's runner: a federation on one machine, fedpir against its baselines, reports."""
