"""Reading the committed results (docs/results/) for docs/results.md: JSON, the commands behind them, links.

Every number of the results page comes from these files; this module only finds and formats them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.cost.common import ROOT

#: The committed results and the page generated from them.
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"


class Results:
    """The results folder: JSON by relative path, the command that made each file, Markdown links to files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def json(self, name: str) -> Any:
        return json.loads((self.folder / name).read_text())

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.folder / name).read_text().splitlines() if line.strip()]

    def link(self, name: str, text: str | None = None) -> str:
        """A link from docs/results.md to a file of the results folder."""
        return f"[{text or Path(name).name}](results/{name})"

    def commands(self, folder: str, contains: str = "") -> list[str]:
        """The commands listed in ``folder``/COMMANDS.md (code lines that start with ``fedpir`` or ``python``,
        continuation lines joined) that contain ``contains``."""
        found, pending = [], ""
        for raw in (self.folder / folder / "COMMANDS.md").read_text().splitlines():
            line = raw.strip()
            if pending:
                pending += " " + line.rstrip("\\").strip()
            elif line.startswith(("fedpir ", "python ")):
                pending = line.rstrip("\\").strip()
            if pending and not line.endswith("\\"):
                found.append(current(pending))
                pending = ""
        return [c for c in found if contains in c]

    def command(self, name: str) -> str:
        """The command recorded in a JSON file's own ``command`` field, with today's script path."""
        return current(self.json(name)["command"])


def current(command: str) -> str:
    """``command`` with each benchmark script named where it lives now (the scripts moved from benchmarks/ into
    benchmarks/experiments/ and benchmarks/cost/ after some results were recorded)."""

    def script(match: re.Match[str]) -> str:
        name = match.group(1)
        if (ROOT / "benchmarks" / f"{name}.py").is_file():
            return match.group(0)
        moved = sorted(ROOT.glob(f"benchmarks/*/{name}.py"))
        return f"benchmarks/{moved[0].parent.name}/{name}.py" if moved else match.group(0)

    def module(match: re.Match[str]) -> str:
        name = match.group(1)
        moved = sorted(ROOT.glob(f"benchmarks/*/{name}.py"))
        return f"-m benchmarks.{moved[0].parent.name}.{name}" if moved else match.group(0)

    return re.sub(r"-m benchmarks\.(\w+)\b(?!\.)", module, re.sub(r"\bbenchmarks/(\w+)\.py", script, command))


def code(commands: Iterable[str]) -> list[str]:
    """A Markdown code block of commands."""
    return ["```", *commands, "```"]


def finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def signed(values: Iterable[float], digits: int = 3) -> str:
    """``+0.012, -0.004``: one signed figure per seed."""
    return ", ".join(f"{v:+.{digits}f}" for v in values)


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
            *(f"| {' | '.join(str(c) for c in row)} |" for row in rows)]
