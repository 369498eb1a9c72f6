"""The site's privacy policy and released metrics, through the real ClientApp and Flower's Message API.

A hospital's node (``data-dir`` in its node config) names its policy file; the server's run config
asks for a round. Requests outside the policy are refused with the rule's name and nothing else
leaves; the ledger binds the budget; a missing or edited ledger stops training; evaluations are
rate-limited and patient-derived metrics leave only coarsened or noised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpir.audit.ledger import verify_ledger
from fedpir.client import client_app
from fedpir.client.client_app import make_client_app
from fedpir.client.site import Site
from fedpir.commands import main
from fedpir.privacy.budget import LEDGER_NAME
from fedpir.privacy.policy import (
    DAY_SECONDS,
    DEFAULT_POLICY,
    PolicyViolation,
    SitePolicy,
    check_round_limits,
    load_policy,
    policy_of_node,
)
from fedpir.privacy.release import RELEASE_OBJECTIVE, release
from fedpir.privacy.signing import PUBLIC_KEY_NAME, load_public_key
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model
from fedpir.wire.protocol import (
    DATA_UNAVAILABLE,
    EPOCHS_KEY,
    LEDGER_UNTRUSTED,
    NUM_EXAMPLES_KEY,
    POLICY_REFUSED,
    RATE_LIMITED,
    ROUND_KEY,
    SITE_ERROR,
    STAGE_KEY,
)

APP = make_client_app()


def settings_for(tmp_path: Path, run: str = "run", **overrides) -> RunSettings:
    values = dict(run_dir=str(tmp_path / run), volume_size=16, batch_size=2, pretrain_rounds=0, finetune_rounds=4,
                  epsilon_budget=6.0, accountant="rdp", noise_multiplier=2.0)
    return RunSettings(**{**values, **overrides})


def write_policy(path: Path, **values) -> Path:
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict))
                    + "".join(f"\n[{k}]\n" + "\n".join(f"{json.dumps(m)} = {json.dumps(x)}" for m, x in v.items())
                              for k, v in values.items() if isinstance(v, dict)) + "\n")
    return path


def send(kind: str, settings: RunSettings, site_dir: Path, state: Path | None, policy: Path | None = None,
         arrays: ArrayRecord | None = None, rnd: int = 1) -> Message:
    """One server request, as Flower delivers it to a hospital's node, through the ClientApp."""
    if arrays is None:
        model = build_model(settings)
        keys = set(model.federated_keys(settings.key_policy))
        arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k in keys})
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({STAGE_KEY: "finetune", ROUND_KEY: rnd, EPOCHS_KEY: 1})})
    node = ({"data-dir": str(site_dir)} | ({"state-dir": str(state)} if state else {})
            | ({"privacy-policy": str(policy)} if policy else {}))
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
    return APP(Message(content, dst_node_id=1, message_type=kind), context)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process knows about its task (Flower sets it when it starts one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def site_dir(small_federation: Path) -> Path:
    return small_federation / "site-0"


def assert_refused(reply: Message, code: int, *hidden: str) -> None:
    assert reply.has_error() and not reply.has_content(), "a refusal carries nothing but the error"
    assert reply.error.code == code
    assert all(text not in reply.error.reason for text in hidden), reply.error.reason


def test_policy_files_load_and_name_unknown_keys(tmp_path: Path) -> None:
    toml = write_policy(tmp_path / "p.toml", **{"max-epsilon": 3.0, "key-policies": ["fedpir", "fedbn"],
                                                "metrics": {"psnr": "noise"}})
    policy = load_policy(toml)
    assert policy.max_epsilon == 3.0 and policy.key_policies == ("fedpir", "fedbn") and policy.metrics == {"psnr": "noise"}
    (tmp_path / "p.json").write_text(json.dumps(policy.to_mapping()))
    assert load_policy(tmp_path / "p.json") == policy and policy.sha256 != DEFAULT_POLICY.sha256
    example = load_policy(Path(__file__).resolve().parents[2] / "deploy" / "privacy_policy.example.toml")
    assert example.max_epsilon == 4.0 and example.metrics["loss_"] == "drop"
    with pytest.raises(ValueError, match="unknown key 'max-epsilom'"):
        load_policy(write_policy(tmp_path / "bad.toml", **{"max-epsilom": 3.0}))
    with pytest.raises(ValueError, match="metric modes"):
        SitePolicy(metrics={"dice": "exactly"})
    assert policy_of_node({"data-dir": "/data"}) == DEFAULT_POLICY  # a hospital's node names none: the safe default
    assert policy_of_node({"partition-id": 0}) != DEFAULT_POLICY  # the simulation's synthetic sites


@pytest.mark.parametrize(("values", "message"), [
    ({"max-epsilon": None}, "max-epsilon must be a number, got None"),  # would let the server pick the budget
    ({"max-epsilon": "8"}, "max-epsilon must be a number, got '8'"),
    ({"key-policies": "fedpir"}, 'key-policies must be a list of names, for example ["fedpir"]'),
    ({"dp-required": "yes"}, "dp-required must be true or false"),
    ({"evaluations-per-round": 1.5}, "evaluations-per-round must be a whole number"),
    ({"metrics": {"dice": 1}}, "metrics must be a table of metric names to modes"),
])
def test_policy_values_are_typed_with_one_line_errors(tmp_path: Path, values: dict, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as err:
        load_policy(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("request_", "rule"), [
    ({"dp": False}, "dp-required"),
    ({"epsilon_budget": 50.0}, "max-epsilon"),
    ({"secret_noise": False}, "secret-noise"),
    ({"key_policy": "fedavg"}, "key-policy"),
    ({"noise_multiplier": 0.05}, "min-noise-multiplier"),
    ({"delta": 1e-3}, "max-delta"),
])
def test_requests_outside_the_policy_are_refused_and_nothing_leaves(tmp_path: Path, site_dir: Path, request_: dict,
                                                                   rule: str) -> None:
    policy = write_policy(tmp_path / "policy.toml", **{"max-epsilon": 6.0, "min-noise-multiplier": 0.5})
    state = tmp_path / "state"
    reply = send("train", settings_for(tmp_path, **request_), site_dir, state, policy)
    assert_refused(reply, POLICY_REFUSED, str(site_dir), str(state))
    assert f"rule {rule}" in reply.error.reason
    assert not (state / LEDGER_NAME).exists() and not (state / "local_state.pt").exists(), "nothing trained"


def test_a_request_inside_the_policy_trains_and_sends_only_shared_weights(tmp_path: Path, site_dir: Path) -> None:
    settings = settings_for(tmp_path, epsilon_budget=6.0)
    policy = write_policy(tmp_path / "policy.toml", **{"max-epsilon": 6.0})
    reply = send("train", settings, site_dir, tmp_path / "state", policy)
    assert not reply.has_error()
    model = build_model(settings)
    assert set(reply.content["arrays"].keys()) == set(model.key_groups().shared)
    metrics = dict(reply.content["metrics"])
    assert not [k for k in metrics if k.startswith("loss")], "training losses stay at the site by default"
    assert metrics[NUM_EXAMPLES_KEY] == 6 and 0 < metrics["epsilon"] <= 6.0
    entry = json.loads((tmp_path / "state" / LEDGER_NAME).read_text().splitlines()[-1])
    assert entry["policy_sha256"] == load_policy(policy).sha256 and entry["site_budget"] == 6.0


def test_the_budget_is_bound_to_the_ledger_and_only_lowers(tmp_path: Path, site_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.toml"
    write_policy(policy, **{"max-epsilon": 6.0})
    assert not send("train", settings_for(tmp_path, "run1", epsilon_budget=6.0), site_dir, state, policy).has_error()
    # the hospital raises its policy's maximum: the ledger keeps the site at 6
    write_policy(policy, **{"max-epsilon": 20.0})
    reply = send("train", settings_for(tmp_path, "run2", epsilon_budget=20.0), site_dir, state, policy)
    assert_refused(reply, POLICY_REFUSED)
    assert "rule max-epsilon" in reply.error.reason
    # lowering works, and binds from then on
    write_policy(policy, **{"max-epsilon": 5.0})
    assert not send("train", settings_for(tmp_path, "run3", epsilon_budget=5.0), site_dir, state, policy).has_error()
    write_policy(policy, **{"max-epsilon": 6.0})
    assert_refused(send("train", settings_for(tmp_path, "run4", epsilon_budget=6.0), site_dir, state, policy),
                   POLICY_REFUSED)
    entries = [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]
    assert [e["site_budget"] for e in entries] == [6.0, 5.0] == [e["epsilon_budget"] for e in entries]
    result = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME))
    assert result.ok, [f.line("ledger") for f in result.failures]
    # the admin's view: the policy in force, its hash, and the budget the ledger binds
    capsys.readouterr()
    assert main(["site", "policy", str(policy), "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert load_policy(policy).sha256 in out and "site budget epsilon 5 (policy 6.0, ledger 5.0)" in out
    (state / LEDGER_NAME).write_text((state / LEDGER_NAME).read_text().replace('"site_budget": 5.0', '"site_budget": 9.0'))
    assert main(["site", "policy", str(policy), "--state-dir", str(state)]) == 2
    assert "entry 2 breaks the signature rule" in capsys.readouterr().err


def test_the_policy_bounds_rounds_per_day_in_every_process(tmp_path: Path, site_dir: Path) -> None:
    state, policy = tmp_path / "state", write_policy(tmp_path / "policy.toml", **{"max-rounds-per-day": 1})
    settings = settings_for(tmp_path)
    assert not send("train", settings, site_dir, state, policy, rnd=1).has_error()
    client_app._SITES.clear()  # a deployed node starts a new process per task
    reply = send("train", settings, site_dir, state, policy, rnd=2)
    assert_refused(reply, POLICY_REFUSED)
    assert "rule max-rounds-per-day" in reply.error.reason
    entries = [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]
    assert len(entries) == 1, "the refused round spent nothing"
    # the window is the ledger's signed timestamps: a day later the site trains again
    check_round_limits(load_policy(policy), entries, now=entries[0]["timestamp"] + DAY_SECONDS)
    with pytest.raises(PolicyViolation):
        check_round_limits(load_policy(policy), entries, now=entries[0]["timestamp"] + DAY_SECONDS - 60)


def test_a_missing_or_edited_ledger_stops_training(tmp_path: Path, site_dir: Path) -> None:
    state, ledger = tmp_path / "state", tmp_path / "state" / LEDGER_NAME
    settings = settings_for(tmp_path)
    assert not send("train", settings, site_dir, state).has_error()
    honest = ledger.read_text()
    entry = json.loads(honest)
    ledger.write_text(json.dumps(entry | {"epsilon": entry["epsilon"] / 2}) + "\n")  # the site "spent less"
    assert_refused(send("train", settings, site_dir, state), LEDGER_UNTRUSTED)
    assert_refused(send("train", settings_for(tmp_path, "restarted"), site_dir, state), LEDGER_UNTRUSTED)
    ledger.unlink()
    assert_refused(send("train", settings, site_dir, state), LEDGER_UNTRUSTED)
    assert_refused(send("train", settings_for(tmp_path, "restarted-2"), site_dir, state), LEDGER_UNTRUSTED)
    assert_refused(send("evaluate", settings, site_dir, state), LEDGER_UNTRUSTED)
    ledger.write_text(honest)  # the admin restores the ledger: the site trains again
    assert not send("train", settings, site_dir, state).has_error()


def test_a_site_another_worker_trained_is_reloaded_not_refused(tmp_path: Path, site_dir: Path) -> None:
    settings, state = settings_for(tmp_path), tmp_path / "state"
    assert not send("train", settings, site_dir, state, rnd=1).has_error()
    this_worker = dict(client_app._SITES)
    client_app._SITES.clear()  # a second worker process of the same node trains the next round
    assert not send("train", settings, site_dir, state, rnd=2).has_error()
    client_app._SITES.update(this_worker)  # back to the first worker, whose copy is a round behind
    reply = send("train", settings, site_dir, state, rnd=3)
    assert not reply.has_error()
    entries = [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]
    assert len(entries) == 3 and reply.content["metrics"]["epsilon"] == entries[-1]["epsilon"] > entries[1]["epsilon"]
    assert verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME)).ok


def test_error_replies_carry_a_code_and_no_details(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-site"
    reply = send("train", settings_for(tmp_path), missing, tmp_path / "state")
    assert_refused(reply, DATA_UNAVAILABLE, str(missing), "no-such-site")
    # a hospital's node without a state folder of its own would start a fresh ledger in every run folder
    assert_refused(send("train", settings_for(tmp_path), missing, None), SITE_ERROR)
    assert not (tmp_path / "run").exists()


def test_metrics_not_declared_never_leave() -> None:
    out = release({"dice": 0.4321, "loss_total": 1.234, "seconds": 3.0, "n_patients": 6.0, "epsilon": 1.5,
                   NUM_EXAMPLES_KEY: 6, "has-modality.t1": 1.0, "psnr": 17.3}, DEFAULT_POLICY, n_patients=6,
                  budget=None, message="evaluate")
    assert out == {"dice": 0.45, "epsilon": 1.5, "seconds": 3.0, NUM_EXAMPLES_KEY: 6, "has-modality.t1": 1.0,
                   "psnr": 17.0}


def test_released_keys_do_not_depend_on_the_data() -> None:
    """A held-out set without a lesion has no Dice (NaN): it still leaves a "dice", or its absence would tell."""
    def keys(dice: float) -> set[str]:
        return set(release({"dice": dice, "auroc": dice, "psnr": 17.3, NUM_EXAMPLES_KEY: 3}, DEFAULT_POLICY,
                           n_patients=3, budget=None, message="evaluate"))

    assert keys(math.nan) == keys(0.61) == {"dice", "auroc", "psnr", NUM_EXAMPLES_KEY}
    lesion_free = release({"dice": math.nan}, DEFAULT_POLICY, n_patients=3, budget=None, message="evaluate")
    assert lesion_free == {"dice": 0.0}


def test_metrics_of_too_few_patients_never_leave() -> None:
    metrics = {"dice": 0.5, "psnr": 17.3, NUM_EXAMPLES_KEY: 2}
    assert release(metrics, DEFAULT_POLICY, n_patients=2, budget=None, message="evaluate") == {NUM_EXAMPLES_KEY: 2}
    assert set(release(metrics, DEFAULT_POLICY, n_patients=3, budget=None, message="evaluate")) == set(metrics)
    with pytest.raises(ValueError, match="min-release-patients"):
        SitePolicy.from_mapping({"min-release-patients": -1})


def crafted_probe(tmp_path: Path, site_dir: Path, policy: Path | None) -> tuple[dict[str, float], list[Message]]:
    """The crafted evaluate probe: the server sends three evaluate requests with weights of its
    choosing (all zero) to a site with two held-out patients. Returns the exact held-out metrics
    under those weights (what the site computes) and the three replies."""
    settings = settings_for(tmp_path)
    model = build_model(settings)
    crafted = {k: v * 0 for k, v in model.state_dict().items() if k in set(model.federated_keys("fedpir"))}
    reference = Site(settings, site_dir, tmp_path / "reference", "reference")
    reference.load_global(crafted)
    exact = reference.evaluate("finetune")
    assert len(reference.holdout_set) == 2
    replies = [send("evaluate", settings, site_dir, tmp_path / "state", policy, ArrayRecord(crafted)) for _ in range(3)]
    return exact, replies


def test_crafted_evaluate_probe_no_longer_recovers_a_patient_statistic(tmp_path: Path, site_dir: Path) -> None:
    _, replies = crafted_probe(tmp_path, site_dir, None)
    first, *rest = replies
    assert all(r.has_error() and r.error.code == RATE_LIMITED and not r.has_content() for r in rest)
    # two held-out patients are fewer than the default policy's min-release-patients: nothing of theirs leaves
    assert not {"psnr", "dice", "ssim", "loss"} & set(first.content["metrics"])
    # a policy that accepts two patients releases them coarsened
    (tmp_path / "two").mkdir()
    policy = write_policy(tmp_path / "two.toml", **{"min-release-patients": 2})
    exact, replies = crafted_probe(tmp_path / "two", site_dir, policy)
    released = dict(replies[0].content["metrics"])
    print(f"\nprobe, default policy but 2 patients: exact psnr {exact['psnr']:.6f} loss {exact['loss']:.6f}; "
          f"released {released}")
    assert "loss" not in released
    assert math.isfinite(exact["psnr"]) and abs(released["psnr"] - exact["psnr"]) > 1e-4
    assert released["psnr"] == round(released["psnr"])  # coarsened to 1 dB


def test_noised_metrics_are_paid_for_in_the_ledger(tmp_path: Path, site_dir: Path) -> None:
    policy = write_policy(tmp_path / "policy.toml", **{"evaluations-per-round": 3, "metric-noise-multiplier": 2.0,
                                                       "min-release-patients": 2,
                                                       "metrics": {"*": "drop", "psnr": "noise", "loss": "noise"}})
    exact, replies = crafted_probe(tmp_path, site_dir, policy)
    assert not any(r.has_error() for r in replies)
    released = [dict(r.content["metrics"]) for r in replies]
    estimate = {k: sum(r[k] for r in released) / 3 for k in ("psnr", "loss")}
    print(f"\nprobe, noised: exact psnr {exact['psnr']:.6f} loss {exact['loss']:.6f}; mean of 3 replies {estimate}")
    assert all(set(r) & {"dice", "ssim"} == set() for r in released)
    assert abs(estimate["psnr"] - exact["psnr"]) > 1e-3 and abs(estimate["loss"] - exact["loss"]) > 1e-3
    state = tmp_path / "state"
    entries = [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]
    assert [(e["objective"], e["steps"], e["sample_rate"]) for e in entries] == [(RELEASE_OBJECTIVE, 2, 1.0)] * 3
    result = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME), [load_policy(policy)])
    assert result.ok and result.epsilon is not None and result.epsilon > 0, [f.line("l") for f in result.failures]
    # the auditor holding another policy than the one the site ran sees it at every entry
    other = verify_ledger(state / LEDGER_NAME, load_public_key(state / PUBLIC_KEY_NAME), [DEFAULT_POLICY])
    assert {(f.entry, f.rule) for f in other.failures} == {(n, "policy-hash") for n in (1, 2, 3)}


def test_the_sites_policy_not_the_server_sets_its_share_of_distributed_noise(tmp_path: Path, site_dir: Path) -> None:
    from fedpir.privacy.policy import check_plan, check_request, site_settings

    secure = dict(secure_aggregation=True, distributed_noise=True)
    policy = SitePolicy(distributed_noise_sites=4, min_own_noise_multiplier=0.3)
    # the server asks every site to add 1/100 of the noise: the site adds its own policy's 1/2
    greedy = RunSettings(**secure, min_sites=10_000)
    check_request(policy, greedy)
    assert site_settings(policy, greedy).min_sites == 4
    with pytest.raises(PolicyViolation, match="rule distributed-noise: the run needs only 3 contributing sites"):
        check_request(policy, RunSettings(**secure, min_sites=3))  # fewer sites could not carry the full noise
    with pytest.raises(PolicyViolation, match="rule distributed-noise"):
        check_request(DEFAULT_POLICY, RunSettings(**secure, min_sites=4))  # the default never splits its noise
    own = site_settings(policy, greedy)
    check_plan(policy, own, budget=8.0, delta=None, noise_multiplier=0.6)  # its own share: 0.3
    with pytest.raises(PolicyViolation, match="rule min-own-noise-multiplier: this site's own noise multiplier 0.25"):
        check_plan(policy, own, budget=8.0, delta=None, noise_multiplier=0.5)
    # through the ClientApp: the site it builds adds its policy's share, whatever min-sites said
    path = write_policy(tmp_path / "p.toml", **{"distributed-noise-sites": 4})
    settings = settings_for(tmp_path, **secure, min_sites=10_000)
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(site_dir), "state-dir": str(tmp_path / "s"),
                                                         "privacy-policy": str(path)},
                      state=RecordDict(), run_config=settings.to_run_config())
    site, _ = client_app.admitted_site(context, None)
    assert site.trainer.dp.noise_share == 0.5


def test_a_hospital_chooses_its_held_out_patients_from_its_own_secret(tmp_path: Path, small_federation: Path) -> None:
    """The server's seed no longer picks which patients a hospital's metrics are about; the split is
    the site's for life (it survives restarts), and a simulated site still splits by the run's seed."""
    from fedpir.client.site import HOLDOUT_SECRET_NAME

    site_dir = small_federation / "site-3"  # the largest site: the seed has patients to choose from
    held = {}
    for seed in range(6):
        settings = settings_for(tmp_path, seed=seed)
        site = Site.for_node(settings, site_dir, tmp_path / "state", "h", {"data-dir": str(site_dir)})
        held[seed] = list(site.holdout_set.indices)
    assert len({tuple(v) for v in held.values()}) == 1, "the server's seed moved the held-out patients"
    assert stat_mode(tmp_path / "state" / HOLDOUT_SECRET_NAME) == 0o600
    simulated = {tuple(Site(settings_for(tmp_path, seed=seed), site_dir, tmp_path / f"sim{seed}").holdout_set.indices)
                 for seed in range(6)}
    assert len(simulated) > 1  # the simulation's methods share the run's split, which its seed sets
    other = Site.for_node(settings_for(tmp_path), site_dir, tmp_path / "other-state", "h", {"data-dir": str(site_dir)})
    assert (tmp_path / "other-state" / HOLDOUT_SECRET_NAME).read_bytes() != (
        tmp_path / "state" / HOLDOUT_SECRET_NAME).read_bytes()  # each hospital its own secret
    assert len(other.holdout_set.indices) == len(held[0])


def stat_mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)
