"""Strategies on real Flower Messages: shared-only FedAvg and friends, rejection of bad updates,
robust and modality-aware aggregation, the factory.

Requests come from the strategy's own ``configure_train``/``configure_evaluate``; replies are
built by per-site functions with ``Message(content, reply_to=request)``, as a ClientApp does.
``LoopbackGrid`` is the only stand-in: an in-process transport that hands each message to its
site's function (Flower's real grids need a running SuperLink).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi
from flwr.supercore.task_identity import TaskIdentity
from scipy.stats import trim_mean

from fedpir.run_config import STRATEGIES
from fedpir.strategies import (
    STRATEGY_CLASSES,
    ModalityAwareFedAvg,
    SharedFedAdam,
    SharedFedAvg,
    SharedFedMedian,
    SharedFedProx,
    SharedFedTrimmedAvg,
    SharedFedYogi,
    make_strategy,
)
from fedpir.wire.protocol import has_modality_key
from fedpir.wire.transfer import encode_reply

VOCAB = ("t1", "t2", "flair")
SHAPES = {
    "encoder.conv1.weight": (4, 2, 3, 3, 3),
    "encoder.conv1.bias": (4,),
    "prior.weight": (8, 16),
    "decoder.out.t1.weight": (2, 4, 1, 1, 1),
    "decoder.out.flair.weight": (2, 4, 1, 1, 1),
}
Site = Callable[[Message], Message]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the task identity that Flower's ServerApp runtime sets."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


class LoopbackGrid(Grid):
    """In-process transport: node ``i`` answers every message with ``sites[i](message)``."""

    def __init__(self, sites: dict[int, Site]) -> None:
        self.sites = sites

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.sites[m.metadata.dst_node_id](m) for m in messages]

    def set_run(self, run):  # noqa: ANN001, D102
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201, D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201, D102
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: ANN001, ANN201, D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201, D102
        raise NotImplementedError


def make_global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def received(request: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in request.content["arrays"].items()}


def site(
    delta_seed: int,
    n: int,
    scale: float = 0.05,
    holds: tuple[str, ...] = VOCAB,
    corrupt: Callable[[dict[str, np.ndarray]], None] | None = None,
    metrics: dict | None = None,
) -> Site:
    """A site that trains (global + random delta of size ~scale) and reports its metrics."""

    def answer(request: Message) -> Message:
        if request.metadata.message_type == MessageType.EVALUATE:
            content = RecordDict({"metrics": MetricRecord({"num-examples": n, "dice": n / 10})})
            return Message(content, reply_to=request)
        rng = np.random.default_rng(delta_seed)
        arrays = {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype)
                  for k, v in received(request).items()}
        if corrupt is not None:
            corrupt(arrays)
        record = {"num-examples": n, "loss": 1.0 / n, "epsilon": 0.5,
                  **{has_modality_key(m): float(m in holds) for m in VOCAB}, **(metrics or {})}
        content = RecordDict({"arrays": as_record(arrays), "metrics": MetricRecord(record),
                              "site": ConfigRecord({"name": f"site-{delta_seed}"})})
        return Message(content, reply_to=request)

    return answer


def train_round(strategy, global_arrays: dict[str, np.ndarray], sites: dict[int, Site], rnd: int = 1):
    """One train round; returns (aggregated arrays or None, metrics, the replies)."""
    grid = LoopbackGrid(sites)
    requests = list(strategy.configure_train(rnd, as_record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(requests)
    snapshot = [(r.metadata.src_node_id, received(r), dict(r.content["metrics"]))
                for r in replies if r.has_content()]
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return arrays, metrics, snapshot


def weighted_mean(snapshot, nodes, key: str) -> np.ndarray:
    rows = [(arrs[key].astype(np.float64), m["num-examples"]) for nid, arrs, m in snapshot if nid in nodes]
    return sum(a * n for a, n in rows) / sum(n for _, n in rows)


def numpy_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def test_fedavg_is_the_weighted_mean_of_shared_keys() -> None:
    g = make_global()
    sites = {11: site(1, n=2), 12: site(2, n=3), 13: site(3, n=5)}
    strategy = SharedFedAvg(min_train_nodes=3)
    arrays, metrics, snap = train_round(strategy, g, sites)
    out = numpy_of(arrays)
    assert set(out) == set(SHAPES)
    for key in SHAPES:
        assert out[key].dtype == np.float32
        np.testing.assert_allclose(out[key], weighted_mean(snap, {11, 12, 13}, key), rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx((2 * 0.5 + 3 / 3 + 5 * 0.2) / 10)
    assert strategy.rejections == []
    assert sorted(nid for nid, _ in strategy.last_train_replies) == [11, 12, 13]
    assert dict(strategy.last_train_replies)[12]["num-examples"] == 3


def test_integer_buffers_keep_their_dtype() -> None:
    g = {**make_global(), "prior.steps": np.array([10, 20], dtype=np.int64)}

    def bump(by: int) -> Callable[[dict[str, np.ndarray]], None]:
        def corrupt(arrays: dict[str, np.ndarray]) -> None:
            arrays["prior.steps"] = arrays["prior.steps"] + by
        return corrupt

    sites = {1: site(1, n=1, corrupt=bump(1)), 2: site(2, n=2, corrupt=bump(2))}
    arrays, _, _ = train_round(SharedFedAvg(), g, sites)
    steps = arrays["prior.steps"].numpy()
    assert steps.dtype == np.int64
    np.testing.assert_array_equal(steps, np.rint(np.array([10, 20]) + (1 * 1 + 2 * 2) / 3))


def _set(key: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict[str, np.ndarray]], None]:
    def corrupt(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = fn(arrays[key])
    return corrupt


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[3] = np.nan
    return a


def _add_key(arrays: dict[str, np.ndarray]) -> None:
    arrays["patient_embeddings"] = np.zeros((8, 16), np.float32)


def _drop_key(arrays: dict[str, np.ndarray]) -> None:
    del arrays["prior.weight"]


BAD_SITES: dict[str, tuple[Callable[[dict[str, np.ndarray]], None] | None, dict | None, str]] = {
    "nan": (_set("prior.weight", _nan), None, "non-finite"),
    "inf": (_set("encoder.conv1.bias", lambda a: a + np.inf), None, "non-finite"),
    "shape": (_set("prior.weight", lambda a: a[:, :8].copy()), None, "shape (8, 8) != global shape (8, 16)"),
    "dtype": (_set("prior.weight", lambda a: a.astype(np.float64)), None, "dtype float64 != global dtype float32"),
    "extra-key": (_add_key, None, "unexpected keys"),
    "missing-key": (_drop_key, None, "missing shared keys: 'prior.weight'"),
    "huge-norm": (_set("prior.weight", lambda a: a + 1e3), None, "exceeds max_update_norm"),
    "zero-weight": (None, {"num-examples": 0}, "must be a finite number > 0"),
    "nan-loss": (None, {"loss": float("nan")}, "non-finite (NaN/Inf) metric values: 'loss'"),
    "metric-keys": (None, {"extra-metric": 1.0}, "metric keys differ"),
}


def test_bad_replies_are_rejected_with_reasons_and_the_rest_averaged(caplog: pytest.LogCaptureFixture) -> None:
    g = make_global()
    good = {1: site(1, n=4), 2: site(2, n=6), 3: site(3, n=3)}
    bad = {100 + i: site(100 + i, n=5, corrupt=c, metrics=m) for i, (c, m, _) in enumerate(BAD_SITES.values())}

    def failing(request: Message) -> Message:
        return Message(Error(code=7, reason="ClientApp crashed"), reply_to=request)

    strategy = SharedFedAvg()
    with caplog.at_level(logging.WARNING, logger="fedpir.strategies"):
        arrays, _, snap = train_round(strategy, g, {**good, **bad, 99: failing})

    reasons = {r["node_id"]: r["reason"] for r in strategy.rejections}
    assert set(reasons) == set(bad) | {99}
    for node, (_, _, expected) in zip(bad, BAD_SITES.values()):
        assert expected in reasons[node]
        assert reasons[node] in caplog.text
    assert "ClientApp crashed" in reasons[99]
    assert all(r["message_type"] == "train" and r["server_round"] == 1 for r in strategy.rejections)
    json.dumps(strategy.rejections)  # the server writes them to its JSON-lines metrics log
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), weighted_mean(snap, set(good), key), rtol=1e-5, atol=1e-6)


def test_relative_norm_bound_needs_three_replies() -> None:
    g = make_global()
    outlier = site(9, n=1, scale=2.0)  # ~50x the others' update norm, far below max_update_norm
    strategy = SharedFedAvg(norm_ratio=10.0)
    _, _, snap = train_round(strategy, g, {1: site(1, n=1), 2: site(2, n=1), 3: site(3, n=1), 9: outlier})
    assert [r["node_id"] for r in strategy.rejections] == [9]
    assert "norm_ratio 10 x the round's median" in strategy.rejections[0]["reason"]

    _, _, _ = train_round(strategy, g, {1: site(1, n=1), 9: outlier}, rnd=2)
    assert strategy.rejections == []  # two replies: no robust median, only the absolute bound


def test_too_few_valid_replies_keep_the_previous_global_model() -> None:
    """Through Flower's own round loop: round 2 has one valid reply < min_train_nodes=2."""
    g = make_global()
    round_of = {"n": 0}

    def flaky(request: Message) -> Message:
        if request.metadata.message_type == MessageType.TRAIN:
            round_of["n"] += 1
        corrupt = _set("prior.weight", _nan) if round_of["n"] == 2 else None
        return site(5, n=2, corrupt=corrupt)(request)

    strategy = SharedFedAvg(min_train_nodes=2, min_evaluate_nodes=2)
    grid = LoopbackGrid({1: site(1, n=3), 5: flaky})
    globals_after: dict[int, dict[str, np.ndarray]] = {}

    def record_global(rnd: int, arrays: ArrayRecord) -> None:
        globals_after[rnd] = numpy_of(arrays)

    result = strategy.start(grid, as_record(g), num_rounds=2, evaluate_fn=record_global)
    assert [(r["server_round"], r["node_id"]) for r in strategy.rejections] == [(2, 5)]
    for key in SHAPES:
        assert not np.array_equal(globals_after[1][key], g[key])
        np.testing.assert_array_equal(globals_after[2][key], globals_after[1][key])
        np.testing.assert_array_equal(result.arrays[key].numpy(), globals_after[1][key])
    assert sorted(nid for nid, _ in strategy.last_evaluate_replies) == [1, 5]


def test_evaluate_keeps_weighted_metrics_and_drops_inconsistent_sites() -> None:
    def odd(request: Message) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 9, "auc": 0.1})}), reply_to=request)

    strategy = SharedFedAvg()
    grid = LoopbackGrid({1: site(1, n=2), 2: site(2, n=6), 3: odd})
    requests = strategy.configure_evaluate(4, as_record(make_global()), ConfigRecord(), grid)
    metrics = strategy.aggregate_evaluate(4, grid.send_and_receive(requests))
    assert metrics["dice"] == pytest.approx((2 * 0.2 + 6 * 0.6) / 8)
    assert [(r["node_id"], r["message_type"]) for r in strategy.rejections] == [(3, "evaluate")]
    assert dict(strategy.last_evaluate_replies)[3] == {"num-examples": 9, "auc": 0.1}


@pytest.mark.parametrize("cls", [SharedFedTrimmedAvg, SharedFedMedian])
def test_robust_aggregation_resists_one_faulty_site(cls: type) -> None:
    g = make_global()
    honest = {i: site(i, n=2) for i in range(1, 5)}
    faulty = site(50, n=2, corrupt=_set("prior.weight", lambda a: a + 5.0))
    sites = {**honest, 50: faulty}
    # Loose screening bounds, so that the robust aggregator itself has to cope with the outlier.
    kwargs = {"max_update_norm": 1e6, "norm_ratio": 1e6}
    robust, _, snap = train_round(cls(**kwargs), g, sites)
    plain, _, _ = train_round(SharedFedAvg(**kwargs), g, sites)

    stack = np.stack([arrs["prior.weight"].astype(np.float64) for _, arrs, _ in snap])
    expected = trim_mean(stack, 0.2, axis=0) if cls is SharedFedTrimmedAvg else np.median(stack, axis=0)
    np.testing.assert_allclose(robust["prior.weight"].numpy(), expected, rtol=1e-5, atol=1e-6)
    honest_mean = weighted_mean(snap, set(honest), "prior.weight")
    assert np.abs(robust["prior.weight"].numpy() - honest_mean).max() < 0.2
    assert np.abs(plain["prior.weight"].numpy() - honest_mean).max() > 0.9


def modality_of_key(key: str) -> str | None:
    """Realistic rule: per-modality decoder output heads ``decoder.out.<modality>.*``."""
    parts = key.split(".")
    return parts[2] if parts[:2] == ["decoder", "out"] else None


def test_modality_aware_averaging() -> None:
    g = make_global()
    sites = {1: site(1, n=2), 2: site(2, n=4), 3: site(3, n=6, holds=("t1", "t2"))}
    strategy = ModalityAwareFedAvg(modality_of_key=modality_of_key)
    arrays, _, snap = train_round(strategy, g, sites)
    out = numpy_of(arrays)
    np.testing.assert_allclose(out["decoder.out.flair.weight"], weighted_mean(snap, {1, 2}, "decoder.out.flair.weight"),
                               rtol=1e-5, atol=1e-6)
    for key in ("decoder.out.t1.weight", "encoder.conv1.weight", "prior.weight"):
        np.testing.assert_allclose(out[key], weighted_mean(snap, {1, 2, 3}, key), rtol=1e-5, atol=1e-6)
    assert all(v.dtype == np.float32 for v in out.values())

    no_flair = {i: site(i, n=i, holds=("t1",)) for i in (1, 2, 3)}
    arrays, _, _ = train_round(strategy, g, no_flair, rnd=2)
    np.testing.assert_array_equal(arrays["decoder.out.flair.weight"].numpy(), g["decoder.out.flair.weight"])
    assert not np.array_equal(arrays["decoder.out.t1.weight"].numpy(), g["decoder.out.t1.weight"])


@pytest.mark.parametrize("cls", [SharedFedAdam, SharedFedYogi])
def test_server_optimizers_step_towards_the_mean_update(cls: type) -> None:
    g = make_global()
    shift = lambda a: a + 0.01  # noqa: E731  every site moves every weight up (plus noise)
    sites = {i: site(i, n=2, scale=0.001, corrupt=lambda arrs: arrs.update({k: shift(v) for k, v in arrs.items()}))
             for i in (1, 2, 3)}
    strategy = cls(eta=0.05)
    current = g
    for rnd in (1, 2):  # round 2 proves the new global keeps float32, so float32 replies still pass
        arrays, _, _ = train_round(strategy, current, sites, rnd=rnd)
        assert strategy.rejections == []
        new = numpy_of(arrays)
        assert set(new) == set(SHAPES)
        for key in SHAPES:
            assert new[key].dtype == np.float32
            assert np.all(new[key] > current[key])
        current = new


def test_fedprox_sends_mu_and_averages_shared_keys() -> None:
    g = make_global()
    strategy = SharedFedProx(proximal_mu=0.1)
    seen: list[float] = []

    def recording(request: Message) -> Message:
        seen.append(request.content["config"]["proximal-mu"])
        return site(7, n=3)(request)

    arrays, _, snap = train_round(strategy, g, {1: site(1, n=1), 7: recording})
    assert seen == [0.1]
    np.testing.assert_allclose(arrays["prior.weight"].numpy(), weighted_mean(snap, {1, 7}, "prior.weight"), rtol=1e-5)


def test_factory() -> None:
    parents = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
               "trimmed": FedTrimmedAvg, "median": FedMedian, "modality": FedAvg}
    assert list(STRATEGY_CLASSES) == list(STRATEGIES) and set(STRATEGIES) == set(parents)  # one list of names
    for name, parent in parents.items():
        extra = {"modality_of_key": modality_of_key} if name == "modality" else {}
        strategy = make_strategy(name, max_update_norm=5.0, **extra)
        assert isinstance(strategy, parent) and strategy.max_update_norm == 5.0
    assert isinstance(make_strategy("trimmed", beta=0.1), SharedFedTrimmedAvg)
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'; valid names: fedavg, fedprox, .*modality"):
        make_strategy("fedsgd")
    with pytest.raises(TypeError, match="modality_of_key"):
        make_strategy("modality")
    with pytest.raises(ValueError, match="max_update_norm"):
        make_strategy("fedavg", max_update_norm=0)


def encoding_site(delta_seed: int, n: int, dtype: str) -> Site:
    """A site that replies like ``site`` but encodes its weights for ``dtype`` (fedpir.wire.transfer)."""
    plain = site(delta_seed, n)

    def answer(request: Message) -> Message:
        reply = plain(request)
        if request.metadata.message_type == MessageType.TRAIN:
            sent = {k: torch.from_numpy(a.numpy()) for k, a in reply.content["arrays"].items()}
            reply.content["arrays"] = encode_reply(sent, {k: torch.from_numpy(v) for k, v in received(request).items()},
                                                   dtype)
        return reply

    return answer


@pytest.mark.parametrize("dtype,atol", [("float16", 1e-4), ("int8", 2e-3)])
def test_compressed_replies_are_decoded_before_aggregation(dtype: str, atol: float) -> None:
    g = make_global()
    exact, _, _ = train_round(SharedFedAvg(), g, {1: site(1, n=2), 2: site(2, n=3)})
    strategy = SharedFedAvg(transfer_dtype=dtype)
    arrays, _, _ = train_round(strategy, g, {1: encoding_site(1, 2, dtype), 2: encoding_site(2, 3, dtype)})
    assert strategy.rejections == []
    for key, value in numpy_of(exact).items():
        np.testing.assert_allclose(arrays[key].numpy(), value, atol=atol)
    mismatched = SharedFedAvg(transfer_dtype="int8", min_train_nodes=1)  # a float16 site in an int8 run
    train_round(mismatched, g, {1: encoding_site(1, 2, "float16"), 2: encoding_site(2, 3, "int8")})
    assert [r["node_id"] for r in mismatched.rejections] == [1]
