"""Research experiments: quality studies, each run as ``python benchmarks/experiments/NAME.py`` with its
command committed next to its JSON result under docs/results/."""
