"""Where a site's files may lie: inside its site folder, or under a data root the site allows.

A manifest can name any path (``../``, absolute, or a symlink inside the site folder pointing
elsewhere). Every path is resolved (symlinks followed, ``..`` collapsed) and must then lie inside
the resolved site folder or one of the allowed data roots: the node config's ``data-roots``
(comma-separated folders), ``fedpir validate --data-root``. A file outside them is never opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DATA_ROOTS_KEY = "data-roots"


def data_roots_from(node_config: Mapping[str, Any]) -> tuple[Path, ...]:
    """The allowed data roots of a node config (``data-roots='/mnt/pacs,/srv/shared'``)."""
    value = str(node_config.get(DATA_ROOTS_KEY, "") or "")
    return tuple(Path(part.strip()).expanduser() for part in value.split(",") if part.strip())


def confining_roots(site_root: Path | None, data_roots: Sequence[Path | str] = ()) -> tuple[Path, ...]:
    """The resolved folders a site's files must lie in (empty: not confined, a manifest built in code
    without allowed roots)."""
    roots = ([site_root] if site_root is not None else []) + [Path(r) for r in data_roots]
    return tuple(Path(r).expanduser().resolve() for r in roots)


def outside_problem(path: Path, roots: Sequence[Path]) -> str | None:
    """Why ``path`` may not be read (it resolves outside every root), or None."""
    if not roots:
        return None
    resolved = Path(path).resolve()
    if any(resolved.is_relative_to(root) for root in roots):
        return None
    return (f"{path} resolves to {resolved}, outside the site folder and allowed data roots "
            f"({', '.join(map(str, roots))}); move it into the site folder or allow its folder "
            f"({DATA_ROOTS_KEY} in the node config, fedpir validate --data-root)")
