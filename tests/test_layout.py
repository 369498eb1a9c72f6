"""The package's shape: dependencies point one way, and the repository explains itself.

The layers are read from the source (every ``import`` and ``from ... import``, inside functions
too), so an import that runs against them fails here wherever it hides. docs/architecture.md draws
the same list.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The package's layers, from the bottom up. A module may import its own subpackage and any layer
#: below its own; packages that share a layer never import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("wire",),
    ("data",),
    ("models",),
    ("alignment",),
    ("synthetic",),
    ("run_config",),
    ("privacy",),
    ("deployment",),
    ("training",),
    ("audit",),
    ("client", "strategies"),
    ("server",),
    ("simulation",),
    ("commands",),
    ("__main__",),
)
#: Imports that the layers would allow but the design forbids: the server runs without client code
#: or the data generator.
NEVER: dict[str, tuple[str, ...]] = {"server": ("client", "synthetic", "simulation")}


def room(module: str) -> str:
    """The layer member a dotted module belongs to (``fedpir.models.pir`` -> ``models``; ``fedpir`` -> "")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def fedpir_imports(package: Path) -> dict[str, set[str]]:
    """Every module of ``package`` (the ``fedpir`` folder) -> the fedpir modules it imports, anywhere in it."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "fedpir"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedpir":
                # `from fedpir.x import y` may name the module fedpir.x.y: count the most precise one
                targets |= {f"{node.module}.{a.name}" if (package.parent / node.module.replace(".", "/") / a.name).with_suffix(
                    ".py").is_file() or (package.parent / node.module.replace(".", "/") / a.name).is_dir() else node.module
                    for a in node.names}
        graph[module] = targets - {module}
    return graph


def layer_violations(package: Path) -> list[str]:
    """Each import against :data:`LAYERS` or :data:`NEVER`, and each circle of modules, as a line."""
    rank = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = fedpir_imports(package)
    problems = []
    for module, targets in graph.items():
        here = room(module)
        if here and here not in rank:
            problems.append(f"{module}: {here} is in no layer of tests/test_layout.py LAYERS")
            continue
        for target in sorted(targets):
            there = room(target)
            if not there or there == here:
                continue
            if rank[there] >= rank[here]:
                problems.append(f"{module} imports {target}: {there} is not below {here}")
            elif there in NEVER.get(here, ()):
                problems.append(f"{module} imports {target}: {here} never imports {there}")
    return problems + [f"circle: {' -> '.join(c)}" for c in circles(graph)]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among modules (one path around each strongly connected group)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group) + [sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_the_layers() -> None:
    assert layer_violations(ROOT / "fedpir") == []


@pytest.mark.parametrize(("victim", "planted", "expected"), [
    ("data/manifest.py", "    from fedpir.simulation import runner\n", "is not below data"),
    ("server/checkpoint.py", "    from fedpir.client.site import Site\n", "server never imports client"),
    ("privacy/dp.py", "    import fedpir.training.trainer\n", "is not below privacy"),
    ("models/losses.py", "    from fedpir.models.evaluation import embed\n", "circle"),
])
def test_a_planted_import_against_the_layers_fails(tmp_path: Path, victim: str, planted: str, expected: str) -> None:
    """Inside a function, where importing the module would never see it."""
    package = tmp_path / "fedpir"
    shutil.copytree(ROOT / "fedpir", package, ignore=shutil.ignore_patterns("__pycache__"))
    path = package / victim
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n{planted}")
    problems = layer_violations(package)
    assert any(expected in p for p in problems), problems


def test_commands_are_the_only_command_modules() -> None:
    """Only fedpir/commands defines command-line arguments; libraries hold no ``*_cli.py``."""
    package = ROOT / "fedpir"
    assert not list(package.rglob("*_cli.py"))
    for path in package.rglob("*.py"):
        if "commands" not in path.relative_to(package).parts:
            assert "add_argument(" not in path.read_text(), f"{path.relative_to(ROOT)} defines CLI arguments"


#: The one module of fedpir.synthetic that the run settings read (how many patients each synthetic
#: site has); the rest is the generator, which a deployed server or site never loads.
SIZES = "fedpir.synthetic.sizes"


def imported_fedpir_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('fedpir')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_server_loads_no_client_simulation_or_generator() -> None:
    loaded = imported_fedpir_modules("fedpir.server.server_app")
    forbidden = {m for m in loaded if m.startswith(("fedpir.client", "fedpir.simulation", "fedpir.synthetic."))} - {SIZES}
    assert not forbidden, forbidden
    assert "fedpir.strategies" in loaded and "fedpir.models.pir" in loaded


def test_a_deployed_client_loads_no_strategy_server_runner_or_generator() -> None:
    client = imported_fedpir_modules("fedpir.client.client_app")
    assert not {m for m in client if m.startswith(("fedpir.strategies", "fedpir.server", "fedpir.simulation",
                                                   "fedpir.synthetic."))} - {SIZES}
    strategies = imported_fedpir_modules("fedpir.strategies")
    assert not {m for m in strategies if m.startswith(("fedpir.client", "fedpir.models", "fedpir.simulation"))}


def test_synthetic_generator_is_data_only() -> None:
    loaded = imported_fedpir_modules("fedpir.synthetic.federation")
    assert not {m for m in loaded if m.startswith(("fedpir.client", "fedpir.server", "fedpir.models",
                                                   "fedpir.privacy", "fedpir.simulation"))}


def test_no_test_imports_benchmark_code() -> None:
    """Benchmarks are run (as processes), never imported by the suite."""
    for path in (ROOT / "tests").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "benchmarks" for n in names), f"{path.relative_to(ROOT)} imports {names}"


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
                   and ".venv" not in p.parts and p.name != Path(__file__).name
                   and "docs/results" not in str(p))
    assert "../shared" not in text and "DESIGN.md" not in text
