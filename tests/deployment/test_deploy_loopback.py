"""A real deployment on loopback: provisioned CA, TLS and SuperNode authentication, two hospitals,
one federated run with ``flwr run``; then what must be refused (unregistered key, no CA, plaintext,
an app the hospitals did not approve). About 3-4 minutes on a 2-core CPU; the processes of one
deployment are shared by the tests of this module, which run in file order."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_harness import CONNECTION, LoopbackDeployment, copy_app, run_exit

from fedpir.commands import main
from fedpir.deployment import approval, commands, provision, registration
from fedpir.privacy.release import spec_of

HOSPITALS = ("st-anna", "city-general")

pytestmark = [pytest.mark.timeout(600), pytest.mark.deploy]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """SuperLink + one SuperNode per hospital, each hospital approving the app's FAB hash."""
    from fedpir.synthetic.federation import generate_federation

    root = tmp_path_factory.mktemp("loopback")
    fed = root / "federation"
    provision.init_federation(fed, "loopback")
    for name in (*HOSPITALS, "unregistered", "spare", "unguarded"):
        provision.add_hospital(fed, name)
    data = generate_federation(root / "data", n_sites=2, subjects_per_site=4, shape=(16, 16, 16), seed=0)
    app = copy_app(root / "app", probe=True)
    fab_hash = approval.fab_hash_of_app(app)
    dep = LoopbackDeployment(root, fed)
    dep.app, dep.fab_hash, dep.data = app, fab_hash, data
    dep.write_guard()
    (root / "loaded-from").mkdir()
    try:
        dep.start_superlink()
        for i, hospital in enumerate(HOSPITALS):
            dep.register(hospital)
            approval.approve(root / "approved" / f"{hospital}.txt", fab_hash, note="fedpir loopback test")
            dep.start(hospital, dep.supernode_command(hospital, data / f"site-{i}"))
        dep.register("spare")  # registered, never started: the no-CA and plaintext probes use its key
        dep.register("unguarded")  # started only by the approval test, without the guard on PATH
        approval.approve(root / "approved" / "unguarded.txt", fab_hash)
        dep.wait_online({dep.node_ids[h] for h in HOSPITALS})
        yield dep
    finally:
        dep.close()


def entries_of(dep: LoopbackDeployment, hospital: str) -> list[dict]:
    """The hospital's privacy ledger."""
    ledger = dep.root / "state" / hospital / "privacy_ledger.jsonl"
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flwr_run(dep: LoopbackDeployment, run_dir: Path, timeout: float = 420, **overrides: str) -> subprocess.CompletedProcess:
    return dep.flwr(*dep.run_args(dep.app, run_dir, **overrides), timeout=timeout)


def test_federated_run_over_tls_with_authenticated_nodes(deployment: LoopbackDeployment,
                                                         capsys: pytest.CaptureFixture) -> None:
    dep = deployment
    pyproject = (dep.app / "pyproject.toml").read_text()
    run_dir = dep.root / "run-ok"
    res = _flwr_run(dep, run_dir)
    assert res.returncode == 0, res.stdout[-6000:]
    rows = _metrics(run_dir)
    for stage in ("pretrain", "finetune"):
        trained = {r["site"] for r in rows if r["kind"] == "train" and r["stage"] == stage}
        assert trained == set(HOSPITALS), (stage, rows)
    assert not [r for r in rows if r["kind"].endswith("-error")]
    # hospitals of 4 patients under the default policy: fewer held-out patients than min-release-patients,
    # so no reply carries a patient-derived metric, only public facts (patients counted, epsilon, ...)
    replies = [r for r in rows if r["kind"] in ("train", "evaluate")]
    assert {r["site"] for r in replies if r["kind"] == "evaluate"} == set(HOSPITALS), rows
    leaked = {k for r in replies for k in r["metrics"] if (spec := spec_of(k)) is None or spec.patient}
    assert not leaked, leaked
    assert (run_dir / "global_model.pt").stat().st_size > 0
    for hospital in HOSPITALS:
        entries = entries_of(dep, hospital)
        assert len(entries) == 2 and all(e["epsilon"] > 0 for e in entries), entries
    assert (dep.app / "pyproject.toml").read_text() == pyproject, "flwr run changed the app's pyproject.toml"
    # every ClientApp process ran the approved app's code, installed from its FAB, not the node's own fedpir
    loaded = {Path(f.read_text()) for f in (dep.root / "loaded-from").iterdir()}
    apps = dep.root / "flwr-home" / "apps"
    assert loaded and all(f.is_relative_to(apps) and dep.fab_hash[:8] in str(f) for f in loaded), loaded
    # the hospital's own view of the same run (fedpir site status reads only local files)
    assert main(["site", "status", "--state-dir", str(dep.root / "state" / HOSPITALS[0]), "--data-dir", str(dep.data / "site-0"),
                 "--approved-apps", str(dep.root / "approved" / f"{HOSPITALS[0]}.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ledger"]["rounds"] == 2 and report["ledger"]["last_round"]["objective"] == "segmentation"
    assert 0 < report["ledger"]["epsilon_spent"] <= report["ledger"]["epsilon_budget"]
    assert report["ledger"]["epsilon_spent"] == entries_of(dep, HOSPITALS[0])[-1]["epsilon"]
    assert report["approved_apps"] == [dep.fab_hash] and report["data"]["usable_subjects"] == 4


def test_unapproved_app_is_refused_with_its_hash(deployment: LoopbackDeployment) -> None:
    dep = deployment
    lists = {h: dep.root / "approved" / f"{h}.txt" for h in HOSPITALS}
    saved = {h: p.read_text() for h, p in lists.items()}
    # a third hospital approved this very app but its SuperNode runs without the guard on PATH
    unguarded = dep.start("unguarded", dep.supernode_command("unguarded", dep.data / "site-1"), guarded=False)
    try:  # st-anna approved another version only; city-general withdrew its approval
        dep.wait_online({dep.node_ids["unguarded"]}, watch=[unguarded])
        lists[HOSPITALS[0]].write_text("0" * 64 + "  # an older version\n")
        assert approval.withdraw(lists[HOSPITALS[1]], dep.fab_hash)
        run_dir = dep.root / "run-refused"
        res = _flwr_run(dep, run_dir, timeout=300, **{"finetune-rounds": "0"})
        assert (run_dir / "metrics.jsonl").exists(), res.stdout[-6000:]
        rows = _metrics(run_dir)
    finally:
        for h, text in saved.items():
            lists[h].write_text(text)
        dep.stop(unguarded)
    errors = {str(r["site"]): r["error"] for r in rows if r["kind"] == "train-error"}
    assert set(errors) == {str(dep.node_ids[h]) for h in (*HOSPITALS, "unguarded")}, (rows, res.stdout[-3000:])
    for h in HOSPITALS:
        assert f"FAB hash {dep.fab_hash} is not approved" in errors[str(dep.node_ids[h])]
        assert f"FAB hash {dep.fab_hash} is not approved" in (dep.root / "logs" / f"{h}.log").read_text()
    assert "does not run the fedpir approval guard" in errors[str(dep.node_ids["unguarded"])]
    assert not [r for r in rows if r["kind"] == "train"]
    # a round without any usable update stops the run: no model nobody trained, a failed run
    assert [r["round"] for r in rows if r["kind"] == "round-failed"] == [1]
    assert "round 1 (pretrain): too few usable updates to aggregate" in res.stdout
    assert not (run_dir / "global_model.pt").exists()
    assert dep.run_status(res.stdout)["status"] == "finished:failed"


def test_unregistered_node_key_is_refused(deployment: LoopbackDeployment) -> None:
    dep = deployment
    proc = dep.start("probe-unregistered", dep.supernode_command(
        "unregistered", dep.data / "site-0", max_retries=1, max_wait_time=15))
    assert run_exit(proc, timeout=90) != 0
    out = proc.output()
    assert "Failed to activate SuperNode" in out, out[-3000:]
    assert "No SuperNode found with the given public key" in dep.procs[0].output()


def test_node_without_the_federation_ca_cannot_connect(deployment: LoopbackDeployment) -> None:
    dep = deployment
    cmd = dep.supernode_command("spare", dep.data / "site-0", max_retries=1, max_wait_time=15)
    i = cmd.index("--root-certificates")
    del cmd[i:i + 2]  # the system's CA store does not know the federation CA
    proc = dep.start("probe-no-ca", cmd)
    assert run_exit(proc, timeout=90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in proc.output(), proc.output()[-3000:]
    assert dep.node_ids["spare"] not in dep.nodes_online()
    res = _flwr_list_with_connection(dep, "")  # the operator's CLI without the CA: system CAs only
    assert '"success": false' in res.stdout and "Connection to the SuperLink is unavailable" in res.stdout, res.stdout


def test_plaintext_is_refused(deployment: LoopbackDeployment) -> None:
    dep = deployment
    cmd = dep.supernode_command("spare", dep.data / "site-0", max_retries=1, max_wait_time=15)
    i = cmd.index("--root-certificates")
    cmd[i:i + 2] = ["--insecure"]
    j = cmd.index("--auth-supernode-private-key")
    del cmd[j:j + 2]  # with a key, the SuperNode itself refuses --insecure; without one the server must
    proc = dep.start("probe-plaintext", cmd)
    assert run_exit(proc, timeout=90) != 0
    assert "Failed to initialize the connection to the SuperLink" in proc.output(), proc.output()[-3000:]
    # the flwr CLI over plaintext gets nothing either
    res = _flwr_list_with_connection(dep, "insecure = true\n")
    assert '"success": false' in res.stdout and "Connection to the SuperLink is unavailable" in res.stdout, res.stdout


def _flwr_list_with_connection(dep: LoopbackDeployment, extra: str) -> subprocess.CompletedProcess:
    """`flwr supernode list` through a connection without the CA, plus ``extra`` lines."""
    home = dep.root / "flwr-home" / "config.toml"
    saved = home.read_text()
    try:
        home.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                        f'address = "{dep.address}"\n{extra}')
        return dep.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=60)
    finally:
        home.write_text(saved)


def test_rotated_key_connects_and_the_unregistered_old_key_is_refused(deployment: LoopbackDeployment) -> None:
    dep = deployment
    kit = dep.federation / "hospitals" / "spare"
    old_key = dep.root / "spare-old.key"
    shutil.copy2(kit / provision.NODE_KEY, old_key)  # rotation deletes it; an attacker may have kept a copy
    old_id = dep.node_ids["spare"]
    provision.rotate_hospital(dep.federation, "spare")
    new_id = dep.register("spare")
    node = dep.start("spare-rotated", dep.supernode_command("spare", dep.data / "site-0"))
    dep.wait_online({new_id}, watch=[node])
    assert old_id not in dep.nodes_online()
    res = dep.flwr("supernode", "unregister", str(old_id), CONNECTION)
    assert res.returncode == 0, res.stdout
    cmd = dep.supernode_command("spare", dep.data / "site-0", max_retries=1, max_wait_time=15)
    cmd[cmd.index("--auth-supernode-private-key") + 1] = str(old_key)
    proc = dep.start("probe-old-key", cmd)
    assert run_exit(proc, timeout=90) != 0
    assert "Failed to activate SuperNode" in proc.output(), proc.output()[-3000:]
    assert new_id in dep.nodes_online()


def _flwr_through(dep: LoopbackDeployment, address: str, *args: str) -> subprocess.CompletedProcess:
    """A ``flwr`` call whose connection trusts the federation CA and points at ``address``."""
    home = dep.root / "flwr-home" / "config.toml"
    saved = home.read_text()
    try:
        home.write_text(commands.flwr_config_toml(CONNECTION, address, dep.federation / "ca" / provision.CA_CERT))
        return dep.flwr(*args, timeout=60)
    finally:
        home.write_text(saved)


def _fedpir(dep: LoopbackDeployment, *args: str) -> subprocess.CompletedProcess:
    """``fedpir ARGS`` as the operator runs it (its flwr connection is this deployment's)."""
    return subprocess.run([sys.executable, "-m", "fedpir", *args], capture_output=True, text=True, timeout=180,
                          env=dep.env())


def test_a_stranger_with_the_public_ca_can_neither_register_nor_connect(deployment: LoopbackDeployment) -> None:
    dep = deployment
    stranger = dep.root / "stranger"
    provision.node_key_pair_for_hospital(stranger)
    before = dep.nodes_online()
    # the hospitals' port answers the Fleet API only: registering, listing nodes and starting runs get 404
    res = _flwr_through(dep, dep.fleet_address, "supernode", "register", str(stranger / provision.NODE_PUB),
                        CONNECTION, "--format", "json")
    assert '"success": false' in res.stdout and "registered successfully" not in res.stdout, res.stdout
    res = _flwr_through(dep, dep.fleet_address, "supernode", "list", CONNECTION, "--format", "json")
    assert '"success": false' in res.stdout, res.stdout
    context = ssl.create_default_context(cafile=str(dep.federation / "ca" / provision.CA_CERT))
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-task-input",
                 "/v1/fleet/../control/register-node", "/docs"):
        conn = http.client.HTTPSConnection("127.0.0.1", dep.fleet_port, context=context, timeout=30)
        conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        assert conn.getresponse().status == 404, path
        conn.close()
    # with its own key it cannot connect either
    cmd = dep.supernode_command("spare", dep.data / "site-0", max_retries=1, max_wait_time=15)
    cmd[cmd.index("--auth-supernode-private-key") + 1] = str(stranger / provision.NODE_KEY)
    proc = dep.start("probe-stranger", cmd)
    assert run_exit(proc, timeout=90) != 0
    assert "Failed to activate SuperNode" in proc.output(), proc.output()[-3000:]
    assert dep.nodes_online() == before


def test_a_revoked_hospital_is_cut_off(deployment: LoopbackDeployment) -> None:
    dep = deployment
    res = _fedpir(dep, "provision", "add", str(dep.federation), "leaving", "--connection", CONNECTION)
    assert res.returncode == 0 and "registered with the SuperLink" in res.stdout, res.stdout + res.stderr
    node_id = provision.load_federation(dep.federation).hospitals["leaving"]["node_id"]
    node = dep.start("leaving", dep.supernode_command("leaving", dep.data / "site-0"))
    dep.wait_online({node_id}, watch=[node])
    kept = dep.root / "leaving-kept.key"  # the operator's copy goes with the revocation; the hospital keeps its own
    shutil.copy2(dep.federation / "hospitals" / "leaving" / provision.NODE_KEY, kept)
    res = _fedpir(dep, "provision", "revoke", str(dep.federation), "leaving", "--connection", CONNECTION)
    assert res.returncode == 0 and f"node ids [{node_id}]" in res.stdout, res.stdout + res.stderr
    assert node_id not in registration_accepted(dep)
    run_exit(node, timeout=120)  # the SuperLink stops answering its key: it ends (fails the test if it does not)
    assert "SuperNode terminated" in node.output(), node.output()[-3000:]
    cmd = list(node.cmd)
    cmd[cmd.index("--auth-supernode-private-key") + 1] = str(kept)
    restarted = dep.start("leaving-again", cmd)  # the same key again: refused
    assert run_exit(restarted, timeout=120) != 0
    assert "Failed to activate SuperNode" in restarted.output(), restarted.output()[-3000:]


def registration_accepted(dep: LoopbackDeployment) -> set[int]:
    """Node ids the SuperLink accepts (registered, online or offline)."""
    res = dep.flwr("supernode", "list", CONNECTION, "--format", "json")
    nodes = json.loads(res.stdout[res.stdout.index("{"):])["nodes"]
    return {int(n["node-id"]) for n in nodes if n["status"] in registration.ACCEPTED}


def test_sync_leaves_the_superlink_accepting_exactly_the_registry(deployment: LoopbackDeployment) -> None:
    dep = deployment
    extra = dep.root / "registered-by-hand"
    provision.node_key_pair_for_hospital(extra)
    res = dep.flwr("supernode", "register", str(extra / provision.NODE_PUB), CONNECTION, "--format", "json")
    stray = int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
    res = _fedpir(dep, "provision", "sync", str(dep.federation), "--connection", CONNECTION)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"unregistered node {stray} (not in the registry)" in res.stdout, res.stdout
    fed = provision.load_federation(dep.federation)
    active = {fed.hospitals[h]["node_id"] for h in fed.active()}
    assert registration_accepted(dep) == active
    assert all(not e.get("unregister") for e in fed.hospitals.values())
    res = _fedpir(dep, "provision", "sync", str(dep.federation), "--connection", CONNECTION)
    assert "nothing to change" in res.stdout, res.stdout
