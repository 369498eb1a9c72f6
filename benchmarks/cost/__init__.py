"""Cost benchmarks: each prints one JSON record of ratios against its target (``python -m benchmarks``)."""
