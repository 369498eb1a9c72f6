"""deploy/README.md's two runbooks (the federation operator's and a hospital's), followed command for
command on loopback: the operator in one folder, two hospitals in theirs, the hand-overs (public keys,
ca.crt, the app bundle) done as files, in the order the steps name. What the test changes in a
command, and only that: free ports for 8000, 9092 and 9094, ``127.0.0.1`` for the SuperLink's name and
for its Fleet listener, the hospital's name for ``st-anna``, the repository's ``deploy/`` folder, and
the run config's sizes and rounds (one round each: :data:`deploy_harness.RUN_CONFIG`) and its run-dir.
About 2 minutes on a 2-core CPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from deploy_harness import REPO, RUN_CONFIG, LoopbackDeployment, Proc, copy_app, free_port, run_exit

from fedpir.deployment import provision

pytestmark = [pytest.mark.timeout(900), pytest.mark.deploy]
HOSPITALS = ("st-anna", "city-general")
CONNECTION = "pilot"


def runbook(role: str) -> dict[int, list[str]]:
    """Steps 1-10 of the runbook headed ``## Runbook: ROLE``: the command lines of each step."""
    section = (REPO / "deploy" / "README.md").read_text().split(f"## Runbook: {role}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    steps: dict[int, list[str]] = {}
    for line in block.splitlines():
        if m := re.match(r"# (\d+)\. ", line):
            steps[int(m.group(1))] = []
        elif line.strip():
            steps[max(steps)].append(line)
    assert sorted(steps) == list(range(1, 11)) and all(steps.values()), f"{role}: steps {sorted(steps)}"
    return steps


class Walk:
    """The runbooks' commands, run in each role's folder with the substitutions of the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dep = LoopbackDeployment(root / "operator", root / "operator" / "federation")
        self.node_ports = {h: free_port() for h in HOSPITALS}
        self.run_dir = root / "operator" / "runs" / "study-1"
        self.procs: dict[str, Proc] = {}

    def command(self, line: str, hospital: str | None) -> str:
        dep = self.dep
        line = (line.replace("superlink.example.org:9092", dep.fleet_address)
                .replace("127.0.0.1:8000", dep.address).replace("--port 8000", f"--port {dep.port}")
                .replace("--fleet-host 0.0.0.0", "--fleet-host 127.0.0.1")
                .replace("--fleet-port 9092", f"--fleet-port {dep.fleet_port}")
                .replace("cp deploy/", f"cp {REPO}/deploy/"))
        if hospital is not None:
            line = line.replace("st-anna", hospital).replace("--port 9094", f"--port {self.node_ports[hospital]}")
        if m := re.search(r'--run-config "([^"]*)"', line):  # the runbook's keys, sizes and rounds made tiny
            config = dict(item.split("=", 1) for item in m.group(1).split())
            config.update(RUN_CONFIG, **{"run-dir": f"'{self.run_dir}'"})
            line = line.replace(m.group(0), '--run-config "' + " ".join(f"{k}={v}" for k, v in config.items()) + '"')
        return line

    def folder(self, hospital: str | None) -> Path:
        return self.root / (hospital or "operator")

    def step(self, role: str, number: int, hospital: str | None = None) -> list[subprocess.CompletedProcess]:
        """Run one step (a hospital's in its folder, the operator's about ``hospital`` in the operator's);
        a line ending in ``&`` starts a process that keeps running."""
        results = []
        where = hospital if role == "hospital" else None
        for line in STEPS[role][number]:
            cmd = self.command(line, hospital)
            name = f"{where or 'operator'}-{number}"
            if cmd.endswith(" &"):
                self.procs[name] = self.start(name, cmd[:-2], self.folder(where))
                continue
            res = subprocess.run(["bash", "-c", cmd], cwd=self.folder(where), env=self.env(where),
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"{role} step {number} ({hospital}): {cmd}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
            results.append(res)
        return results

    def env(self, hospital: str | None) -> dict[str, str]:
        return self.dep.env(FLWR_HOME=str(self.folder(hospital) / "flwr-home"))

    def start(self, name: str, cmd: str, cwd: Path) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as fh:
            popen = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                     env=self.env(None if name.startswith("operator") else name.rsplit("-", 1)[0]),
                                     start_new_session=True)
        proc = Proc(name, popen, log, ["bash", "-c", cmd])
        self.dep.procs.append(proc)
        return proc

    def wait_online(self, node_ids: set[int], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.online().get(i) == "online" for i in node_ids):
            for proc in self.procs.values():
                assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.output()[-3000:]}"
            assert time.monotonic() < deadline, f"nodes {node_ids} not online: {self.online()}"
            time.sleep(1)

    def online(self) -> dict[int, str]:
        res = self.dep.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert res.returncode == 0, res.stdout
        return {int(n["node-id"]): n["status"] for n in json.loads(res.stdout[res.stdout.index("{"):])["nodes"]}


STEPS = {"operator": runbook("the federation operator"), "hospital": runbook("a hospital")}


def test_the_runbooks_work_as_written(tmp_path: Path) -> None:
    from fedpir.synthetic.federation import generate_federation

    walk = Walk(tmp_path)
    op = walk.folder(None)
    op.mkdir()
    copy_app(op / "fedpir-src")
    data = generate_federation(tmp_path / "synthetic", n_sites=2, subjects_per_site=4, shape=(16, 16, 16), seed=0)
    for i, h in enumerate(HOSPITALS):
        walk.folder(h).mkdir()
        shutil.copytree(data / f"site-{i}", walk.folder(h) / "data")
    try:
        assert walk.step("operator", 1)[0].stdout.strip()
        walk.step("operator", 2)
        walk.step("operator", 3)
        for port in (walk.dep.port, walk.dep.fleet_port):
            walk.dep.wait_tls(walk.procs["operator-3"], port, timeout=90)
        walk.step("operator", 4)
        walk.step("operator", 5)
        (fab,) = op.glob("*.fab")
        for h in HOSPITALS:
            here = walk.folder(h)
            walk.step("hospital", 1, h)
            walk.step("hospital", 2, h)
            shutil.copy(here / "kit" / provision.NODE_PUB, op / f"{h}.pub")  # to the operator
            shutil.copy(op / "federation" / "ca" / provision.CA_CERT, here / "kit")  # from the operator
            shutil.copy(fab, here)
            for number in range(3, 8):
                walk.step("hospital", number, h)
            walk.step("operator", 6, h)
        for h in HOSPITALS:
            walk.step("hospital", 8, h)
        ids = {h: provision.load_federation(op / "federation").hospitals[h]["node_id"] for h in HOSPITALS}
        walk.wait_online(set(ids.values()))
        walk.step("operator", 7)
        walk.step("operator", 8)
        rows = [json.loads(line) for line in (walk.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {r["site"] for r in rows if r["kind"] == "train"} == set(HOSPITALS)
        assert not [r for r in rows if r["kind"] in ("round-failed", "train-error")], rows
        for h in HOSPITALS:
            status = walk.step("hospital", 9, h)[0].stdout
            assert "at rest: encrypted" in status and "WARNING" not in status, status  # the policy's state key is in use
            walk.step("hospital", 10, h)
            assert (walk.folder(h) / "state" / "privacy_ledger.jsonl").read_text().strip()
        assert "nothing to change" in walk.step("operator", 9)[0].stdout
        walk.step("operator", 10, "st-anna")
        run_exit(walk.procs["st-anna-8"], timeout=120)
        assert ids["st-anna"] not in walk.online() or walk.online()[ids["st-anna"]] == "unregistered"
        assert walk.online()[ids["city-general"]] == "online"
    finally:
        walk.dep.close()
