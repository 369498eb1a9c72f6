"""fedpir's benchmarks. ``python -m benchmarks`` runs the cost benchmarks (benchmarks/cost/__main__.py);
the older experiment scripts in this folder run as ``python benchmarks/<name>.py``."""
