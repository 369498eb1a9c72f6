"""fedpir's benchmarks. ``python -m benchmarks`` runs the cost benchmarks (benchmarks/cost/); the research
experiments run as ``python benchmarks/experiments/<name>.py``; ``python -m benchmarks.results_page`` makes
docs/results.md from the committed results."""
