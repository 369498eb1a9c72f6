"""A federated run on Flower's simulation engine with a probe on every site: what each message
cost where. Used by the overhead, communication and scale benchmarks.

The probe is a client mod (it runs inside the simulated SuperNode's process): per message it times
the site's set-up (building the Site on its first message: data, model, ledger), the ClientApp's
handler, and a pickle round trip of the request and the reply (the simulation engine hands
messages to its Ray workers pickled), and measures the reply's wire size (its RecordDict as the
protobuf a deployed SuperNode sends). Rounds, training seconds and aggregation come from the
server's own ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import pickle
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import recorddict_to_proto

from fedpir.client.client_app import make_client_app, site_for
from fedpir.run_config import RunSettings
from fedpir.server.rounds import MetricsLog
from fedpir.server.server_app import make_server_app
from fedpir.simulation.engine import run_flower


def probe_mod(settings: RunSettings, log_path: Path) -> Mod:
    """The client mod that appends one JSON line per message to ``log_path``."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        t_in = time.time()
        start = time.perf_counter()
        site_for(context, settings)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        reply = call_next(msg, context)
        handler = time.perf_counter() - start
        start = time.perf_counter()
        for m in (msg, reply):
            pickle.loads(pickle.dumps(m))
        serialize = time.perf_counter() - start
        metrics = next(iter(reply.content.metric_records.values()), {}) if reply.has_content() else {}
        row = {"kind": str(msg.metadata.message_type), "node": int(context.node_config["partition-id"]),
               "t_in": t_in, "t_out": time.time(), "setup_s": setup, "handler_s": handler, "serialize_s": serialize,
               "reply_bytes": recorddict_to_proto(reply.content).ByteSize() if reply.has_content() else 0,
               "train_s": float(metrics.get("seconds", 0.0)), "threads": torch.get_num_threads()}
        with log_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return reply

    return mod


@dataclass
class ProbedRun:
    """What :func:`run_probed` measured: wall seconds, the probe's rows, the server's metrics log."""

    start: float
    wall: float
    messages: list[dict[str, Any]]
    server_log: list[dict[str, Any]]

    def round_ends(self) -> list[float]:
        """Wall time at which each round ended (its evaluation aggregated)."""
        return [r["time"] for r in self.server_log if r["kind"] == "evaluate-aggregate"]

    def round_seconds(self) -> list[float]:
        """Wall seconds of each round; the first one includes the engine's start-up."""
        ends = self.round_ends()
        return [b - a for a, b in zip([self.start, *ends[:-1]], ends, strict=True)]

    def per_round(self) -> list[dict[str, float]]:
        """Per round, the seconds spent in each part (see :func:`breakdown`)."""
        ends = self.round_ends()
        out = []
        for i, end in enumerate(ends):
            begin = self.start if i == 0 else ends[i - 1]
            rows = [m for m in self.messages if begin <= m["t_in"] < end]
            logs = [r for r in self.server_log if begin < r["time"] <= end]
            out.append(breakdown(begin, end, rows, logs, first=i == 0))
        return out

    def final_metric(self, name: str) -> float:
        """An aggregated evaluation metric of the last round."""
        return float([r for r in self.server_log if r["kind"] == "evaluate-aggregate"][-1]["metrics"][name])


def breakdown(begin: float, end: float, rows: list[dict[str, Any]], logs: list[dict[str, Any]],
              first: bool) -> dict[str, float]:
    """Where one round's wall seconds went.

    ``startup`` (first round only): from the engine's start to the first message reaching a site;
    ``site_setup``: building the Site (data, model, ledger) on a site's first message;
    ``training``: the local training loops (the trainer's own ``seconds``);
    ``local_other``: the rest of the handlers (evaluation, loading and encoding weights, saving local layers);
    ``serialization``: the probe's pickle round trips of requests and replies;
    ``aggregation``: the server from the last train reply logged to the aggregate logged (screening,
    decoding, FedAvg), and the same for evaluation;
    ``transport``: the rest (the engine's queues, polling and Ray calls, the server's checkpoints and logs).
    """
    parts: dict[str, float] = defaultdict(float)
    if first and rows:
        parts["startup"] = min(r["t_in"] for r in rows) - begin
    for r in rows:
        parts["site_setup"] += r["setup_s"]
        parts["training"] += r["train_s"]
        parts["local_other"] += r["handler_s"] - r["train_s"]
        parts["serialization"] += r["serialize_s"]
    for kind in ("train", "evaluate"):
        replies = [x["time"] for x in logs if x["kind"] == kind]
        done = [x["time"] for x in logs if x["kind"] == f"{kind}-aggregate"]
        if replies and done:
            parts["aggregation"] += max(0.0, done[0] - max(replies))
    out = {"wall": end - begin, **parts}
    out["transport"] = end - begin - sum(parts.values())
    return out


def run_probed(settings: RunSettings, work: Path) -> ProbedRun:
    """Run ``settings`` (federation and run folder set) on the simulation engine with the probe."""
    log_path = work / "probe.jsonl"
    log_path.unlink(missing_ok=True)
    start = time.time()
    run_flower(make_server_app(settings), make_client_app(settings, mods=[probe_mod(settings, log_path)]),
               settings.num_sites, settings.cpus_per_site)
    wall = time.time() - start
    messages = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    return ProbedRun(start, wall, messages, MetricsLog(Path(settings.run_dir) / "metrics.jsonl").read())
