"""A repeated training request costs no privacy, with the default privacy settings, each request
through the real ClientApp as a new process would serve it (no site kept in memory between them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpir.client import client_app
from fedpir.privacy.budget import LEDGER_NAME
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model
from fedpir.wire.protocol import EPOCHS_KEY, POLICY_REFUSED, ROUND_KEY, STAGE_KEY

APP = client_app.make_client_app()


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process knows about its task (Flower sets it when it starts one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def request(settings: RunSettings, site: Path, state: Path, rnd: int, weights: dict[str, torch.Tensor]) -> Message:
    """One train request of round ``rnd`` to a hospital's node under the default policy, in a fresh process."""
    client_app._SITES.clear()  # a deployed node starts a new process per task
    content = RecordDict({"arrays": ArrayRecord(weights),
                          "config": ConfigRecord({STAGE_KEY: "finetune", ROUND_KEY: rnd, EPOCHS_KEY: 1})})
    context = Context(run_id=1, node_id=1, node_config={"data-dir": str(site), "state-dir": str(state)},
                      state=RecordDict(), run_config=settings.to_run_config())
    return APP(Message(content, dst_node_id=1, message_type="train"), context)


def training_entries(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / LEDGER_NAME).read_text().splitlines()]


def test_a_resumed_round_is_answered_again_without_spending_and_the_run_finishes(small_federation: Path,
                                                                                  tmp_path: Path) -> None:
    # the default privacy settings: DP at the default budget, planned over the policy's max-rounds
    settings = RunSettings(run_dir=str(tmp_path / "run"), volume_size=16, batch_size=2, pretrain_rounds=0,
                           finetune_rounds=2)
    site, state = small_federation / "site-0", tmp_path / "state"
    model = build_model(settings)
    start = {k: v for k, v in model.state_dict().items() if k in set(model.federated_keys(settings.key_policy))}
    first = request(settings, site, state, 1, start)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    after_one = first.content["arrays"].to_torch_state_dict()
    second = request(settings, site, state, 2, after_one)
    assert not second.has_error()
    spent = training_entries(state)
    assert len(spent) == 2 and 0 < spent[-1]["epsilon"] < settings.epsilon_budget / 2
    # the server died before it aggregated round 2 and resumes from its checkpoint of round 1
    again = request(settings, site, state, 2, after_one)
    assert not again.has_error(), "the repeated round must not be refused for the budget it already spent"
    assert training_entries(state) == spent  # nothing trained, nothing spent
    sent, resent = second.content["arrays"].to_torch_state_dict(), again.content["arrays"].to_torch_state_dict()
    assert sent.keys() == resent.keys() and all(torch.equal(sent[k], resent[k]) for k in sent)
    assert dict(second.content["metrics"]) == dict(again.content["metrics"])
    # the replay is no free pass: other weights are a new round, which trains and spends
    other = {k: v + 0.01 for k, v in after_one.items()}
    assert not request(settings, site, state, 2, other).has_error()
    assert len(training_entries(state)) == 3 and training_entries(state)[-1]["epsilon"] > spent[-1]["epsilon"]


def test_the_site_plans_its_noise_over_its_policy_not_the_servers_round_count(small_federation: Path,
                                                                               tmp_path: Path) -> None:
    """A server that asks for 1,000 rounds, to make each round (and the evaluation it unlocks) nearly free,
    is refused; fewer rounds than the policy's max-rounds get the same noise per round as more."""
    site = small_federation / "site-0"
    base = RunSettings(run_dir=str(tmp_path / "run"), volume_size=16, batch_size=2, pretrain_rounds=0)
    model = build_model(base)
    start = {k: v for k, v in model.state_dict().items() if k in set(model.federated_keys(base.key_policy))}
    greedy = request(replace(base, finetune_rounds=1000), site, tmp_path / "greedy", 1, start)
    assert greedy.has_error() and greedy.error.code == POLICY_REFUSED and not (tmp_path / "greedy" / LEDGER_NAME).exists()
    noise = []
    for rounds in (2, 8):
        state = tmp_path / f"state-{rounds}"
        reply = request(replace(base, finetune_rounds=rounds), site, state, 1, start)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        noise.append(training_entries(state)[0]["noise_multiplier"])
    assert noise[0] == pytest.approx(noise[1]) and noise[0] > 0
