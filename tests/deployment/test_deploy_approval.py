"""App approval: the allow-list file, the FAB hash of an app (the same as `flwr build` writes), the
guard's decision and its hooks in the installed Flower. The guard refusing a real task over a real
deployment is in tests/deployment/test_deploy_loopback.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fedpir.commands import main
from fedpir.deployment import approval

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deploy_harness import copy_app

    return copy_app(tmp_path_factory.mktemp("app") / "app")


def test_fab_hash_is_the_hash_of_flwr_build(app: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    subprocess.run([shutil.which("flwr") or "flwr", "build", "--app", str(app)], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    (fab,) = tmp_path.glob("*.fab")
    assert approval.fab_hash_of_app(app) == hashlib.sha256(fab.read_bytes()).hexdigest() == approval.fab_hash_of_file(fab)
    (app / "fedpir" / "extra.py").write_text("# one changed file\n")
    try:
        assert approval.fab_hash_of_app(app) != approval.fab_hash_of_file(fab)
    finally:
        (app / "fedpir" / "extra.py").unlink()


def test_the_approved_bundle_holds_only_the_code_that_runs(tmp_path: Path) -> None:
    """A copy of the whole repository (docs, results, tests, benchmarks, deploy kits): its FAB holds the fedpir
    package, pyproject.toml and the dependency lock only, so a docs-only commit keeps the approved hash; a code
    change or a changed pin does not."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    repo = tmp_path / "repo"
    for name in tracked:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    before = approval.fab_hash_of_app(repo)
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(repo))) as fab:
        names = fab.namelist()
    assert {n.split("/")[0] for n in names} == {"fedpir", "pyproject.toml", "pylock.toml", ".info"}, \
        sorted(names)[:20]
    for doc in ("README.md", "docs/architecture.md", "deploy/README.md", "tests/conftest.py", "benchmarks/__init__.py"):
        with (repo / doc).open("a") as fh:
            fh.write("\n# an edit that runs nowhere\n")
    assert approval.fab_hash_of_app(repo) == before
    lock = (repo / "pylock.toml").read_text()
    pin = 'name = "torch"\nversion = "2.13.0+cpu"'
    (repo / "pylock.toml").write_text(lock.replace(pin, pin.replace("2.13.0", "2.13.1"), 1))
    assert pin in lock and approval.fab_hash_of_app(repo) != before
    (repo / "pylock.toml").write_text(lock)
    assert approval.fab_hash_of_app(repo) == before
    with (repo / "fedpir" / "run_config.py").open("a") as fh:
        fh.write("\n# an edit to executed code\n")
    assert approval.fab_hash_of_app(repo) != before


def test_allow_list_approve_withdraw(tmp_path: Path) -> None:
    path = tmp_path / "approved.txt"
    a, b = "a" * 64, "B" * 64
    assert approval.approve(path, a, note="v1") and not approval.approve(path, a)
    assert approval.approve(path, b)
    assert approval.read_approved(path) == {a, b.lower()}
    assert approval.withdraw(path, a) and not approval.withdraw(path, a)
    assert approval.read_approved(path) == {b.lower()}
    path.write_text("# comment\n\n" + "c" * 64 + "  # reviewed\nnot-a-hash\n")
    with pytest.raises(ValueError, match=r"approved.txt:4: not a SHA-256 FAB hash"):
        approval.read_approved(path)
    with pytest.raises(ValueError, match="not a SHA-256"):
        approval.approve(path, "123")


def test_refusal_decisions(tmp_path: Path) -> None:
    fab = b"some fab bytes"
    digest = hashlib.sha256(fab).hexdigest()
    listed = tmp_path / "ok.txt"
    listed.write_text(digest + "\n")
    other = tmp_path / "other.txt"
    other.write_text("0" * 64 + "\n")
    assert "names no approved-apps list" in approval.refusal(None, fab)  # closed by default
    assert approval.refusal(approval.ALLOW_ANY, fab) is None  # development only, said explicitly
    assert approval.refusal(str(listed), fab) is None
    assert f"FAB hash {digest} is not approved" in approval.refusal(str(other), fab)
    missing = approval.refusal(str(tmp_path / "missing.txt"), fab)
    assert digest in missing and "cannot read" in missing  # fails closed


def test_guard_refuses_before_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(approval, "GUARDED", {})

    installed: list[bytes] = []
    listed = tmp_path / "approved.txt"
    listed.write_text(hashlib.sha256(b"approved fab").hexdigest() + "\n")
    context = SimpleNamespace(node_config={approval.APPROVED_APPS_KEY: str(listed)})
    guard = approval.Guard(pull=lambda client: ("msg", context, "run", "fab"),
                           install=lambda fab, **kw: installed.append(fab) or "path")
    assert guard.pull(None) == ("msg", context, "run", "fab") and guard.list_file == str(listed)
    assert guard.install(b"approved fab", skip_prompt=True) == "path"
    with pytest.raises(approval.AppNotApprovedError, match=hashlib.sha256(b"other fab").hexdigest()):
        guard.install(b"other fab", skip_prompt=True)
    assert installed == [b"approved fab"]
    context.node_config = {}
    guard.pull(None)
    with pytest.raises(approval.AppNotApprovedError, match="names no approved-apps list"):
        guard.install(b"other fab")  # a node without a list runs nothing
    context.node_config = {approval.APPROVED_APPS_KEY: approval.ALLOW_ANY}
    guard.pull(None)
    assert guard.install(b"other fab") == "path"
    assert installed == [b"approved fab", b"other fab"]


def test_guard_hooks_exist_in_this_flower() -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    before = runner.pull_task_input, runner.install_from_fab
    try:
        guard = approval.install_guard()
        assert (runner.pull_task_input, runner.install_from_fab) == (guard.pull, guard.install)
        assert (guard._pull, guard._install) == before
    finally:
        runner.pull_task_input, runner.install_from_fab = before


def test_site_cli_approve_from_app_folder(app: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "approved.txt"
    assert main(["site", "approve", str(path), "--app", str(app), "--note", "reviewed"]) == 0
    assert approval.read_approved(path) == {approval.fab_hash_of_app(app)}
    assert main(["site", "approve", str(path), "--hash", "xyz"]) == 2
    assert "fedpir site: error: not a SHA-256 FAB hash" in capsys.readouterr().err


def test_clientapp_refuses_when_approval_is_configured_but_unguarded(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpir.client.client_app import app as client_app

    for attr in ("_run_id", "_task_id", "_node_id"):  # what a ClientApp process knows about its task
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    monkeypatch.setattr(approval, "GUARDED", {})
    assert approval.require_guard_mod in client_app._mods
    calls: list[str] = []

    def call_next(msg, context):
        calls.append("app")
        return Message(RecordDict(), reply_to=msg)

    def task(node_config: dict) -> Message:
        msg = Message(RecordDict(), dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return approval.require_guard_mod(msg, context, call_next)

    listed = {approval.APPROVED_APPS_KEY: str(tmp_path / "approved.txt")}
    reply = task(listed)
    assert reply.has_error() and "does not run the fedpir approval guard" in reply.error.reason and not calls
    unlisted = task({"data-dir": "/data"})  # a deployed node without a list: closed by default
    assert unlisted.has_error() and "names no approved-apps list" in unlisted.error.reason and not calls
    assert not task({"data-dir": "/data", approval.APPROVED_APPS_KEY: approval.ALLOW_ANY}).has_error()
    assert not task({"partition-id": 0}).has_error() and calls == ["app", "app"]  # a simulated node is no hospital
    # the guard approved this task's FAB (as Guard.install does before the app is imported)
    fab = b"approved fab"
    (tmp_path / "approved.txt").write_text(hashlib.sha256(fab).hexdigest() + "\n")
    guard = approval.Guard(pull=lambda c: (None, Context(1, 1, listed, RecordDict(), {}), None, None),
                           install=lambda f, **kw: None)
    guard.pull(None)
    guard.install(fab)
    assert approval.GUARDED == {"fab_hash": hashlib.sha256(fab).hexdigest()}
    assert not task(listed).has_error() and calls == ["app"] * 3


def test_the_allow_list_is_the_owners_whatever_the_umask(tmp_path: Path) -> None:
    fab = b"some fab"
    listed = tmp_path / "lists" / "approved.txt"
    old = os.umask(0)  # a careless admin's shell
    try:
        assert approval.approve(listed, hashlib.sha256(fab).hexdigest())
    finally:
        os.umask(old)
    assert stat.S_IMODE(listed.stat().st_mode) == approval.LIST_MODE
    assert approval.refusal(str(listed), fab) is None
    listed.chmod(0o666)  # anyone could now approve an app: the node refuses every task
    reason = approval.refusal(str(listed), fab)
    assert "writable by others than its owner (0666)" in reason and "chmod 644" in reason
