"""App approval at a hospital: a SuperNode executes only apps (FABs) whose hash the hospital approved.

Closed by default: a deployed node (one with a ``data-dir``) runs nothing until it names an allow-list
file in its node config, ``approved-apps=/path/approved_apps.txt``, or, for development only,
``approved-apps=allow-any``. The list holds one SHA-256 FAB hash per line (``#`` starts a comment),
is written 0644 (only its owner approves; a list others may write is refused). The FAB hash is the
SHA-256 of the FAB file, the archive ``flwr build`` writes and ``flwr run`` sends (``sha256sum
app.fab``; :func:`fab_hash_of_app` computes it from a project folder exactly as ``flwr run`` builds
it). The list is read for every task, so approving or withdrawing an app needs no restart.

Where the check runs matters: code inside the app (a ClientApp mod) would come from the very FAB it
is meant to judge, and a modified app could drop it. So the check runs in the hospital's own code,
before Flower installs or imports the FAB: ``python -m fedpir.deployment.approval`` is Flower's
``flwr-clientapp`` (the process Flower's SuperExec starts for every task, looked up on ``PATH``) with
one addition: after the task's context and FAB are pulled from the SuperNode, the FAB's bytes are
hashed and checked against the node config's list. A refused task ends with Flower's own error reply,
whose reason names the hash; the ServerApp records it (``train-error`` in ``metrics.jsonl``). An
approved task then runs the app's code from its FAB, as under plain Flower (the guard drops the fedpir
modules it imported, so the hospital's installed fedpir does not shadow the approved code).
:func:`write_guard` writes the ``flwr-clientapp`` shim that a SuperNode's ``PATH`` must find first.
Against misconfiguration (a SuperNode whose PATH misses the shim), the fedpir ClientApp carries
:func:`require_guard_mod`: on a deployed node it refuses any task the guard did not pass (a mark in
this module, in the task's process; an environment variable would leak into child processes), and any
task at all when the node names no ``approved-apps``. A simulated node (Flower's simulation engine,
``partition-id``) is no hospital's and runs without a list.
The check relies on two module-level names of Flower 1.42's ``flwr.supernode.runtime.run_clientapp``
(``pull_task_input``, ``install_from_fab``); :func:`install_guard` refuses to start if they moved.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from pathlib import Path

APPROVED_APPS_KEY = "approved-apps"
#: The ``approved-apps`` value that approves every app: development only, never in a hospital's config.
ALLOW_ANY = "allow-any"
NO_LIST = (f"this node names no approved-apps list, and a deployed node runs no app it has not approved; set "
           f"approved-apps to the hospital's allow-list (fedpir site approve), or to {ALLOW_ANY} for development")
#: In the task's process only (never inherited, unlike an environment variable): the FAB hash the guard
#: passed. This module stays loaded when the app's own copy of fedpir is imported (see :func:`main`).
GUARDED: dict[str, str] = {}
#: The allow-list's mode: the SuperNode's user reads it, only its owner writes it.
LIST_MODE = 0o644
HASH_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class AppNotApprovedError(RuntimeError):
    """The hospital did not approve the FAB of this task."""


def read_approved(path: Path | str) -> set[str]:
    """The approved FAB hashes of an allow-list file (one per line, ``#`` comments, blank lines);
    ValueError if others than its owner may write it (anyone could then approve an app)."""
    mode = stat.S_IMODE(Path(path).expanduser().stat().st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"{path} is writable by others than its owner ({mode:04o}), so anyone could approve an app; "
                         f"chmod {LIST_MODE:o} {path}")
    approved: set[str] = set()
    for number, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        token = line.split("#", 1)[0].strip().lower()
        if not token:
            continue
        first = token.split()[0]
        if not HASH_PATTERN.match(first):
            raise ValueError(f"{path}:{number}: not a SHA-256 FAB hash: {first!r}")
        approved.add(first)
    return approved


def fab_hash_of_app(app_dir: Path | str) -> str:
    """The FAB hash ``flwr run APP_DIR`` will send (Flower's own FAB builder, which is deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir).expanduser().resolve())).hexdigest()


def fab_hash_of_file(fab: Path | str) -> str:
    """The FAB hash of a ``.fab`` file (the SHA-256 of its bytes)."""
    return hashlib.sha256(Path(fab).expanduser().read_bytes()).hexdigest()


def approve(list_file: Path | str, fab_hash: str, note: str = "") -> bool:
    """Add ``fab_hash`` to the allow-list (created if missing); False if it was there already."""
    fab_hash = fab_hash.strip().lower()
    if not HASH_PATTERN.match(fab_hash):
        raise ValueError(f"not a SHA-256 FAB hash: {fab_hash!r}")
    path = Path(list_file).expanduser()
    if path.exists() and fab_hash in read_approved(path):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644 whatever the umask: the node reads it, only its owner may approve
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LIST_MODE)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{fab_hash}{'  # ' + note if note else ''}\n")
    return True


def withdraw(list_file: Path | str, fab_hash: str) -> bool:
    """Remove ``fab_hash`` from the allow-list; False if it was not there."""
    path = Path(list_file).expanduser()
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in lines if ln.split("#", 1)[0].strip().lower().split()[:1] != [fab_hash.strip().lower()]]
    if len(kept) == len(lines):
        return False
    path.write_text("".join(f"{ln}\n" for ln in kept))
    return True


def refusal(list_file: str | None, fab_bytes: bytes) -> str | None:
    """Why this node refuses the FAB (None: approved, or the list is :data:`ALLOW_ANY`)."""
    fab_hash = hashlib.sha256(fab_bytes).hexdigest()
    if not list_file:
        return f"app approval: FAB hash {fab_hash} refused: {NO_LIST}"
    if list_file == ALLOW_ANY:
        return None
    try:
        approved = read_approved(list_file)
    except (OSError, ValueError) as err:
        return f"app approval: FAB hash {fab_hash} refused: cannot read the approved apps list {list_file}: {err}"
    if fab_hash not in approved:
        return f"app approval: FAB hash {fab_hash} is not approved by this hospital ({list_file})"
    return None


class Guard:
    """Wraps Flower's ``pull_task_input`` (remembers the task's ``approved-apps`` list from its node
    config) and ``install_from_fab`` (refuses a FAB whose hash is not on that list)."""

    def __init__(self, pull, install) -> None:
        self._pull, self._install = pull, install
        self.list_file: str | None = None

    def pull(self, client):
        """Flower's pull, noting the node config's allow-list."""
        message, context, run, fab = self._pull(client)
        self.list_file = str(context.node_config.get(APPROVED_APPS_KEY, "")) or None
        return message, context, run, fab

    def install(self, fab_file, *args, **kwargs):
        """Flower's install, for approved FABs only."""
        reason = refusal(self.list_file, fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes())
        if reason:
            print(f"fedpir: {reason}", file=sys.stderr)
            raise AppNotApprovedError(reason)
        GUARDED["fab_hash"] = hashlib.sha256(fab_file if isinstance(fab_file, bytes)
                                             else Path(fab_file).read_bytes()).hexdigest()
        return self._install(fab_file, *args, **kwargs)


def install_guard() -> Guard:
    """Make Flower's ClientApp runner check each task's FAB against the node's allow-list before it
    installs or imports anything of it."""
    from flwr.supernode.runtime import run_clientapp as runner

    if not (callable(getattr(runner, "pull_task_input", None)) and callable(getattr(runner, "install_from_fab", None))):
        raise RuntimeError("this Flower version has no run_clientapp.pull_task_input/install_from_fab; "
                           "the app approval guard cannot run")
    guard = Guard(runner.pull_task_input, runner.install_from_fab)
    runner.pull_task_input, runner.install_from_fab = guard.pull, guard.install
    return guard


def unguarded_reason(node_config: dict) -> str | None:
    """Why a task must not run on this node although its app code was loaded (None: it may run): a
    deployed node (``data-dir``) without ``approved-apps``, or one whose SuperNode did not run the guard."""
    listed = str(node_config.get(APPROVED_APPS_KEY, ""))
    if "data-dir" in node_config and not listed:
        return f"app approval: {NO_LIST}; refused"
    if listed and listed != ALLOW_ANY and not GUARDED.get("fab_hash"):
        return ("app approval: approved-apps is set but this SuperNode does not run the fedpir approval guard "
                "(the flwr-clientapp shim of fedpir.deployment.approval first on PATH); refused")
    return None


def require_guard_mod(msg, context, call_next):
    """ClientApp mod against misconfiguration (not against a modified app: the guard is that): a
    deployed node refuses the task instead of running an unchecked app (:func:`unguarded_reason`)."""
    reason = unguarded_reason(dict(context.node_config))
    if reason:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode

        print(f"fedpir: {reason}", file=sys.stderr)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return call_next(msg, context)


GUARD_SHIM = """#!/bin/sh
# fedpir app approval: Flower's flwr-clientapp, refusing FABs not on the node's approved-apps list.
exec {python} -m fedpir.deployment.approval "$@"
"""


def write_guard(bin_dir: Path | str, python: str = "python3") -> Path:
    """Write the ``flwr-clientapp`` shim into ``bin_dir`` (put it first on the SuperNode's PATH)."""
    path = Path(bin_dir) / "flwr-clientapp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GUARD_SHIM.format(python=python))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def main() -> None:
    """``flwr-clientapp`` with the approval guard. The app then runs from its FAB, as under plain Flower:
    the fedpir modules this guard imported are dropped (all but this one, which keeps :data:`GUARDED`),
    so that ``fedpir`` is imported again from the installed FAB, not from this environment."""
    install_guard()
    for name in [m for m in sys.modules if (m == "fedpir" or m.startswith("fedpir.")) and m != __name__]:
        del sys.modules[name]
    from flwr.supernode.cli import flwr_clientapp

    sys.argv[0] = "flwr-clientapp"
    sys.exit(flwr_clientapp())


if __name__ == "__main__":  # run as `python -m`: use the package module, so refusals name its error class
    from fedpir.deployment import approval

    approval.main()
