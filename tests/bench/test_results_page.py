"""docs/results.md is generated from the committed JSON (``python -m benchmarks.results_page``): the committed
page matches it, and a changed figure makes ``--check`` fail. Run as a process: tests never import benchmark code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.results_page", "--check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_committed_results_page_is_current() -> None:
    done = check()
    assert done.returncode == 0, f"{done.stderr.strip()} (regenerate: python -m benchmarks.results_page)"


def test_a_changed_figure_makes_the_page_stale(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results, ignore=shutil.ignore_patterns("*.png"))
    curve = results / "privacy_utility" / "privacy_utility.json"
    data = json.loads(curve.read_text())
    data["dice"]["eps-1"]["fedpir"]["mean"] += 0.1
    curve.write_text(json.dumps(data))
    page = ROOT / "docs" / "results.md"
    done = check("--results-dir", str(results), "--out", str(page))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"{page} is stale: run python -m benchmarks.results_page"]
    unchanged = check("--results-dir", str(ROOT / "docs" / "results"), "--out", str(page))
    assert unchanged.returncode == 0, unchanged.stderr


def test_a_changed_private_task_figure_makes_the_readme_stale_too(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results, ignore=shutil.ignore_patterns("*.png"))
    summary = results / "private_task" / "seed-0" / "summary.json"
    data = json.loads(summary.read_text())
    data["final"]["fedpir"]["site-0"]["dice"] += 0.08
    summary.write_text(json.dumps(data))
    readme, page = ROOT / "README.md", ROOT / "docs" / "results.md"
    done = check("--results-dir", str(results), "--out", str(page), "--readme", str(readme))
    assert done.returncode == 1
    assert sorted(done.stderr.strip().splitlines()) == sorted(f"{path} is stale: run python -m benchmarks.results_page"
                                                             for path in (page, readme))
