"""A real fedpir deployment on loopback for the integration tests: provisioned CA and keys, one
``flower-superlink`` with TLS and SuperNode authentication, one ``flower-supernode`` per hospital,
``flwr`` CLI calls through a ``$FLWR_HOME/config.toml`` connection. Every process runs in its own
process group and is stopped (TERM, then KILL) by :meth:`LoopbackDeployment.close`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpir.deployment import approval, commands, provision

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "loopback"
#: A tiny run; every key is a run-config key of pyproject.toml.
RUN_CONFIG = {"num-sites": "2", "volume-size": "16", "subjects-per-site": "4", "pretrain-rounds": "1",
              "finetune-rounds": "1", "batch-size": "2", "min-sites": "2"}
#: Environment variable naming a folder where the test app's ClientApp notes which file it was loaded from.
LOADED_FROM_ENV = "FEDPIR_TEST_LOADED_FROM"
#: Appended to the copied app's client_app.py (the copy only): proves which fedpir code a node runs.
LOADED_FROM_PROBE = f"""

import os as _os  # loopback test probe (tests/deploy_harness.py)

if _os.environ.get("{LOADED_FROM_ENV}"):
    (Path(_os.environ["{LOADED_FROM_ENV}"]) / f"{{_os.getpid()}}.txt").write_text(__file__)
"""


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and not given out before by this process (the OS may hand the
    same free port out twice when nothing holds it in between)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def without_root_override(cmd: list[str]) -> list[str]:
    """``cmd`` run, when the tests run as root, without the capabilities that let root ignore file
    permissions (as a hospital's service user would run it), so that a folder's mode applies."""
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", *cmd]


def copy_app(dest: Path, probe: bool = False) -> Path:
    """The Flower app (pyproject.toml, README.md, pylock.toml and the fedpir package) copied to ``dest``, so that
    ``flwr run`` never touches the repository's files; ``probe``: with :data:`LOADED_FROM_PROBE`."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "pylock.toml"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "fedpir", dest / "fedpir", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if probe:
        with (dest / "fedpir" / "client" / "client_app.py").open("a") as fh:
            fh.write(LOADED_FROM_PROBE)
    return dest


@dataclass
class Proc:
    """A started process, its log file and its command."""

    name: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str]

    def output(self) -> str:
        """What it wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class LoopbackDeployment:
    """Processes and folders of one loopback deployment (see module docstring)."""

    root: Path
    federation: Path
    port: int = field(default_factory=free_port)
    fleet_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    node_ids: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The SuperLink's operator address (Control and Runtime APIs: the ``flwr`` CLI)."""
        return f"127.0.0.1:{self.port}"

    @property
    def fleet_address(self) -> str:
        """The SuperLink's address for the hospitals (the Fleet API only)."""
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def guard_bin(self) -> Path:
        """Folder holding the ``flwr-clientapp`` approval shim (first on the SuperNodes' PATH)."""
        return self.root / "guard-bin"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of every process: the worktree's fedpir first, Flower's home in the test folder."""
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.root / "flwr-home"), FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
                   PATH=os.pathsep.join([str(self.guard_bin), str(Path(sys.executable).parent), env.get("PATH", "")]),
                   PYTHONUNBUFFERED="1", **{LOADED_FROM_ENV: str(self.root / "loaded-from")})
        env.update(extra)
        return env

    def start(self, name: str, cmd: list[str], guarded: bool = True) -> Proc:
        """Start ``cmd`` in a new process group, output to ``logs/NAME.log``; ``guarded=False``: without
        the approval shim on PATH (a misconfigured hospital)."""
        log = self.root / "logs" / f"{name}.log"  # appended to: a restarted process keeps its history
        log.parent.mkdir(exist_ok=True)
        env = self.env()
        if not guarded:
            env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d != str(self.guard_bin))
        with log.open("ab") as fh:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(name, popen, log, cmd)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI call against this deployment (its own process group, killed on timeout)."""
        popen = subprocess.Popen(["flwr", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=self.env(), start_new_session=True)
        try:
            out, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(popen)
            out, _ = popen.communicate()
            raise AssertionError(f"flwr {' '.join(args)} did not finish in {timeout} s:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, "")

    def run_args(self, app: Path, run_dir: Path, **overrides: str) -> list[str]:
        """``flwr run`` of ``app`` with :data:`RUN_CONFIG` (plus ``overrides``) writing to ``run_dir``."""
        config = {**RUN_CONFIG, **overrides, "run-dir": f"'{run_dir}'"}
        return ["run", str(app), CONNECTION, "--stream", "--run-config", " ".join(f"{k}={v}" for k, v in config.items())]

    def start_superlink(self) -> Proc:
        """``flower-superlink`` with the server kit; returns once it accepts TLS connections."""
        proc = self.start("superlink", commands.superlink_command(
            self.federation / "superlink", host="127.0.0.1", port=self.port, fleet_host="127.0.0.1",
            fleet_port=self.fleet_port, database=self.root / "superlink.db"))
        for port in (self.port, self.fleet_port):
            self.wait_tls(proc, port, timeout=90)
        (self.root / "flwr-home").mkdir(exist_ok=True)
        (self.root / "flwr-home" / "config.toml").write_text(commands.flwr_config_toml(
            CONNECTION, self.address, self.federation / "ca" / provision.CA_CERT))
        return proc

    def wait_tls(self, proc: Proc, port: int, timeout: float) -> None:
        """Wait until the SuperLink completes a TLS handshake on ``port`` verified by the federation CA."""
        context = ssl.create_default_context(cafile=str(self.federation / "ca" / provision.CA_CERT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.output()[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{proc.name} did not accept TLS in {timeout} s:\n{proc.output()[-4000:]}")

    def register(self, hospital: str) -> int:
        """``flwr supernode register`` the hospital's public key; returns the node id."""
        pub = self.federation / "hospitals" / hospital / provision.NODE_PUB
        res = self.flwr("supernode", "register", str(pub), CONNECTION, "--name", hospital, "--format", "json")
        assert res.returncode == 0, res.stdout
        node_id = int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
        provision.record_node_id(self.federation, hospital, node_id)
        self.node_ids[hospital] = node_id
        return node_id

    def run_status(self, flwr_run_output: str) -> dict:
        """``flwr ls`` of the run a ``flwr run`` started, given its output (status, status details, ...)."""
        run_id = re.search(r"Successfully started run (\d+)", flwr_run_output).group(1)
        res = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        assert res.returncode == 0, res.stdout
        return json.loads(res.stdout[res.stdout.index("{"):])["runs"][0]

    def supernode_command(self, hospital: str, data_dir: Path, **kwargs) -> list[str]:
        """The hospital's ``flower-supernode`` command (its kit, data, state and approval list)."""
        kwargs.setdefault("approved_apps", self.root / "approved" / f"{hospital}.txt")
        return commands.supernode_command(self.fleet_address, self.federation / "hospitals" / hospital, data_dir,
                                          self.root / "state" / hospital, hospital, port=free_port(), **kwargs)

    def nodes_online(self) -> set[int]:
        """Node ids the SuperLink lists as online."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert res.returncode == 0, res.stdout
        nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def wait_online(self, node_ids: set[int], watch: list[Proc] | None = None, timeout: float = 90) -> None:
        """Wait until all ``node_ids`` are online (failing early if a ``watch``ed process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node_ids <= self.nodes_online():
                return
            for proc in self.procs if watch is None else watch:
                if proc.popen.poll() is not None:
                    raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.output()[-4000:]}")
            time.sleep(1)
        raise AssertionError(f"nodes {node_ids} not online after {timeout} s; logs:\n"
                             + "\n".join(p.output()[-2000:] for p in self.procs))

    def write_guard(self) -> Path:
        """The approval shim for this Python."""
        return approval.write_guard(self.guard_bin, python=sys.executable)

    def stop(self, proc: Proc) -> None:
        """Stop one process group."""
        _stop_group(proc.popen)

    def kill(self, proc: Proc) -> None:
        """SIGKILL one process group at once (a crash: no clean-up, no goodbye to anyone)."""
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait(timeout=30)

    def restart(self, proc: Proc) -> Proc:
        """Start a stopped process's command again (same name and log)."""
        assert proc.popen.poll() is not None, f"{proc.name} is still running"
        return self.start(proc.name, proc.cmd)

    def wait_round(self, run_dir: Path, rnd: int, watch: Proc, timeout: float = 300) -> None:
        """Wait until the server has checkpointed round ``rnd`` of the run in ``run_dir``."""
        latest = run_dir / "checkpoints" / "latest.json"
        deadline = time.monotonic() + timeout
        while not (latest.is_file() and json.loads(latest.read_text())["round"] >= rnd):
            if watch.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"round {rnd} of {run_dir} not checkpointed ({watch.name} "
                                     f"{'exited' if watch.popen.poll() is not None else 'still running'}):\n"
                                     + watch.output()[-4000:])
            time.sleep(0.2)

    def close(self) -> None:
        """Stop every process group this deployment started (TERM, then KILL)."""
        for proc in reversed(self.procs):
            _stop_group(proc.popen)


def _stop_group(popen: subprocess.Popen, grace: float = 10) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait(timeout=grace)
    else:
        try:  # children left in the group (an app process) go with it
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_exit(proc: Proc, timeout: float) -> int:
    """Wait for a process that must end by itself; kill its group and fail if it does not."""
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc.popen)
        raise AssertionError(f"{proc.name} still running after {timeout} s:\n{proc.output()[-4000:]}") from None
