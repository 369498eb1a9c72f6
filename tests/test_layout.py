"""The package's shape: dependencies point one way, and the repository explains itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_fedpir_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('fedpir')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_server_imports_no_client_simulation_or_generator() -> None:
    loaded = imported_fedpir_modules("fedpir.server.server_app")
    forbidden = {m for m in loaded if m.startswith(("fedpir.client", "fedpir.simulation", "fedpir.synthetic"))}
    assert not forbidden, forbidden
    assert "fedpir.strategies" in loaded and "fedpir.models.pir" in loaded


def test_client_and_strategies_do_not_import_each_other_or_the_runner() -> None:
    client = imported_fedpir_modules("fedpir.client.client_app")
    assert not {m for m in client if m.startswith(("fedpir.strategies", "fedpir.server", "fedpir.simulation",
                                                   "fedpir.synthetic"))}
    strategies = imported_fedpir_modules("fedpir.strategies")
    assert not {m for m in strategies if m.startswith(("fedpir.client", "fedpir.models", "fedpir.simulation"))}


def test_synthetic_generator_is_data_only() -> None:
    loaded = imported_fedpir_modules("fedpir.synthetic.federation")
    assert not {m for m in loaded if m.startswith(("fedpir.client", "fedpir.server", "fedpir.models",
                                                   "fedpir.privacy", "fedpir.simulation"))}


def test_docs_link_only_inside_the_repository() -> None:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "deploy").glob("*.md")]
    assert (ROOT / "docs" / "architecture.md").is_file()
    for path in files:
        for target in re.findall(r"\]\(([^)#]+)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{path.name} links {target}"
    text = "".join(p.read_text() for p in ROOT.rglob("*") if p.suffix in (".md", ".py", ".toml") and ".git" not in p.parts
                   and p.name != Path(__file__).name
                   and "docs/results" not in str(p))
    assert "../shared" not in text and "DESIGN.md" not in text
