"""Faults on a real loopback deployment (TLS, SuperNode authentication; ``tests/deploy_harness.py``):
the SuperLink (with its ServerApp) killed mid-run and restarted, a SuperNode killed mid-run and
restarted, a SuperNode that cannot read its data folder. Every hospital runs the default privacy
settings (no policy file: the default policy; the run config's budget, noise planned by the site), as
a hospital would: an interrupted run must still finish, and each ledger's epsilon must equal an
independent recomputation.

Every message starts a ClientApp process, so a run costs tens of seconds per round; to stay within a
few minutes the faults share runs. One deployment, tests in file order: run 1 is interrupted by the
SuperLink's death after its first round and resumed by a second ``flwr run``, during which one
SuperNode is killed; the hospital with the unreadable folder takes part in every run; the killed
node is restarted and trains on in run 2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from deploy_harness import LoopbackDeployment, Proc, copy_app, run_exit, without_root_override

from fedpir.deployment import approval, provision
from fedpir.privacy.budget import LEDGER_NAME, PrivacyLedger
from fedpir.wire.protocol import DATA_UNAVAILABLE, SITE_ERRORS

HOSPITALS = ("st-anna", "city-general")  # serve site-0 and site-1
UNREADABLE = "north-clinic"  # serves site-2, a folder of mode 000 (its node runs without root's override)
VICTIM = HOSPITALS[1]
pytestmark = [pytest.mark.timeout(900), pytest.mark.deploy]
RUN1 = "run-interrupted"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """SuperLink + three authenticated SuperNodes (two healthy, one with an unreadable data folder)."""
    from fedpir.synthetic.federation import generate_federation

    root = tmp_path_factory.mktemp("faults")
    fed = root / "federation"
    provision.init_federation(fed, "faults")
    data = generate_federation(root / "data", n_sites=3, subjects_per_site=4, shape=(16, 16, 16), seed=0)
    unreadable = data / "site-2"
    dep = LoopbackDeployment(root, fed)
    dep.app, dep.nodes = copy_app(root / "app"), {}
    fab_hash = approval.fab_hash_of_app(dep.app)
    dep.write_guard()
    unreadable.chmod(0)
    try:
        dep.superlink = dep.start_superlink()
        for i, hospital in enumerate((*HOSPITALS, UNREADABLE)):
            provision.add_hospital(fed, hospital)
            dep.register(hospital)
            approval.approve(root / "approved" / f"{hospital}.txt", fab_hash)
            cmd = dep.supernode_command(hospital, data / f"site-{i}")
            dep.nodes[hospital] = dep.start(hospital, without_root_override(cmd) if hospital == UNREADABLE else cmd)
        dep.wait_online(set(dep.node_ids.values()))
        yield dep
    finally:
        dep.close()
        unreadable.chmod(0o755)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _start_run(dep: LoopbackDeployment, name: str, run_dir: Path, **overrides: str) -> Proc:
    """``flwr run`` (the harness's run config and ``overrides``) into ``run_dir``, as a process named ``name``."""
    return dep.start(name, ["flwr", *dep.run_args(dep.app, run_dir, **overrides)])


def _state_files(dep: LoopbackDeployment, hospital: str) -> dict[str, bytes]:
    state = dep.root / "state" / hospital
    return {name: (state / name).read_bytes() for name in ("local_state.pt", LEDGER_NAME)}


def _ledger(dep: LoopbackDeployment, hospital: str) -> list[dict]:
    """The hospital's privacy ledger, its chain and signatures verified."""
    return PrivacyLedger.in_dir(dep.root / "state" / hospital).entries


def test_superlink_killed_mid_run_then_a_new_flwr_run_resumes_from_the_last_checkpoint(
        deployment: LoopbackDeployment) -> None:
    dep = deployment
    run_dir = dep.root / RUN1
    run = _start_run(dep, RUN1, run_dir, **{"min-sites": "1"})
    dep.wait_round(run_dir, 1, watch=run)
    dep.kill(dep.superlink)  # the SuperLink and the ServerApp it runs as a subprocess
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["round"] == 1
    assert run_exit(run, timeout=120) != 0 and "Connection to the SuperLink is unavailable" in run.output()
    dep.superlink = dep.start_superlink()  # same port, same database
    dep.wait_online(set(dep.node_ids.values()))  # every node reconnects by itself
    # Flower does not restart the ServerApp of a run whose SuperLink died: the operator runs it again
    resumed = _start_run(dep, f"{RUN1}-resumed", run_dir, **{"min-sites": "1"})
    deadline = time.monotonic() + 300
    while not any(r["kind"] == "resume" for r in _metrics(run_dir)):  # the resumed ServerApp has started
        assert resumed.popen.poll() is None and time.monotonic() < deadline, resumed.output()[-4000:]
        time.sleep(0.2)
    dep.kill(dep.nodes[VICTIM])  # mid-run too: the second test looks at how the run went on
    dep.victim_state = _state_files(dep, VICTIM)  # what the third test expects it to find on restart
    assert run_exit(resumed, timeout=420) == 0, resumed.output()[-6000:]
    rows = _metrics(run_dir)
    resume = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert len(resume) == 1 and rows[resume[0]]["round"] == 1, rows
    assert [r["round"] for r in rows[resume[0]:] if r["kind"] == "train-aggregate"] == [2]
    assert [r["round"] for r in rows[:resume[0]] if r["kind"] == "train-aggregate"] == [1]
    assert (run_dir / "global_model.pt").stat().st_size > 0
    interrupted = dep.run_status(run.output())  # the SuperLink fails it once its ServerApp's heartbeats are overdue
    assert interrupted["status"] == "finished:failed", interrupted
    assert dep.run_status(resumed.output())["status"] == "finished:completed"


def test_a_node_killed_mid_run_leaves_the_run_to_the_others(deployment: LoopbackDeployment) -> None:
    """Reads the resumed run of the first test, during which one SuperNode was killed."""
    dep = deployment
    rows = _metrics(dep.root / RUN1)
    trained = {(r["round"], r["site"]) for r in rows if r["kind"] == "train"}
    assert trained == {(1, HOSPITALS[0]), (1, VICTIM), (2, HOSPITALS[0])}, rows
    # the SuperLink answers for the dead node once its heartbeats stop; the round then goes on without it
    lost = [r for r in rows if r["kind"].endswith("-error") and r["site"] == str(dep.node_ids[VICTIM])]
    assert [(r["kind"], r["round"]) for r in lost] == [("train-error", 2)] and "Node Unavailable" in lost[0]["error"]
    assert len(_ledger(dep, HOSPITALS[0])) >= 2


def test_a_node_that_cannot_read_its_data_reports_it_and_the_run_goes_on(deployment: LoopbackDeployment) -> None:
    """Reads the run of the first test, in which the unreadable hospital took part."""
    dep = deployment
    rows = _metrics(dep.root / RUN1)
    node = str(dep.node_ids[UNREADABLE])
    errors = [r for r in rows if r["kind"].endswith("-error") and r["site"] == node]
    assert {(r["kind"], r["round"]) for r in errors} == {("train-error", 1), ("train-error", 2), ("evaluate-error", 1),
                                                          ("evaluate-error", 2)}, rows
    folder = dep.root / "data" / "site-2"
    expected = (f"site {UNREADABLE}: cannot read its data folder {folder} (Permission denied: {folder}/manifest.json); "
                "check data-dir in the node config and that the SuperNode's user may read it")
    # the server learns a code and a generic reason; the details (a local path) stay in the node's log
    assert all(r["error"] == f"error {DATA_UNAVAILABLE}: {SITE_ERRORS[DATA_UNAVAILABLE]}" for r in errors), errors
    log = dep.nodes[UNREADABLE].output()
    assert expected in log and "Traceback" not in log, log[-4000:]
    assert dep.nodes[UNREADABLE].popen.poll() is None and dep.node_ids[UNREADABLE] in dep.nodes_online()
    assert not (dep.root / "state" / UNREADABLE / LEDGER_NAME).exists()


def test_the_killed_node_restarts_rejoins_and_trains_on_from_its_state(deployment: LoopbackDeployment) -> None:
    dep = deployment
    dep.nodes[VICTIM] = dep.restart(dep.nodes[VICTIM])
    dep.wait_online({dep.node_ids[VICTIM]}, watch=[dep.nodes[VICTIM]])  # the same registered node id
    assert _state_files(dep, VICTIM) == dep.victim_state  # local layers and ledger as the crash left them
    before = _ledger(dep, VICTIM)
    run_dir = dep.root / "run-after-restart"
    run = _start_run(dep, run_dir.name, run_dir, **{"finetune-rounds": "0"})
    assert run_exit(run, timeout=420) == 0, run.output()[-6000:]
    assert {r["site"] for r in _metrics(run_dir) if r["kind"] == "train"} == set(HOSPITALS)
    ledger = _ledger(dep, VICTIM)  # chain and signatures verified: it went on from the old entries
    assert ledger[:len(before)] == before and len(ledger) == len(before) + 1
    assert ledger[-1]["epsilon"] > before[-1]["epsilon"]
    assert _state_files(dep, VICTIM)["local_state.pt"] != dep.victim_state["local_state.pt"]


def test_after_the_faults_each_ledger_is_the_default_policys_and_its_epsilon_recomputes(
        deployment: LoopbackDeployment) -> None:
    """Reads the ledgers the runs above left: every round under the default policy, and the epsilon the
    site recorded equal to a fresh Opacus accountant of the recorded kind (PRV by default) stepped
    through the rounds one by one."""
    from opacus.accountants import create_accountant

    from fedpir.audit.ledger import verify_ledger
    from fedpir.privacy.policy import DEFAULT_POLICY
    from fedpir.privacy.signing import PUBLIC_KEY_NAME, load_public_key

    dep = deployment
    for hospital in HOSPITALS:
        state = dep.root / "state" / hospital
        result = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME), [DEFAULT_POLICY])
        assert result.ok, [f.line(hospital) for f in result.failures]
        entries = _ledger(dep, hospital)
        assert entries and all(e["dp"] and e["secret_noise"] and e["epsilon_budget"] == 8.0 for e in entries)
        accountant = create_accountant(entries[-1]["accountant"])
        for entry in entries:
            for _ in range(entry["steps"]):
                accountant.step(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"])
        assert entries[-1]["epsilon"] == pytest.approx(accountant.get_epsilon(delta=entries[-1]["delta"]), rel=1e-6)
        assert entries[-1]["epsilon"] < 8.0, "the plan over the policy's max-rounds kept headroom for the repeats"
