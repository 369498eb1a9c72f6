"""Benchmarks run as their users run them: a process started from the repository root, never imported
(``tests/test_layout.py``). ``python -m benchmarks.cost.NAME ...`` or ``python benchmarks/experiments/NAME.py ...``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*argv: str, expect: int = 0, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` in the repository root with one torch thread (on the shared 2-core machine more
    threads were up to 10x slower under load, docs/results/training_speed.json); fails the test, with
    the process' last words, unless it exits with ``expect``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect, f"exit {done.returncode} (expected {expect}):\n{done.stderr[-4000:]}"
    return done


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a process printed, checked to be one line and no traceback."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]
