"""Runs a real fedpir federation on Flower's simulation engine, for the integration tests.

    python tests/federation_driver.py SETTINGS_JSON RECORD_JSONL [--fail-site N] [--corrupt-site N]

A client mod records every message a site receives and every reply it sends (array keys, shapes,
a digest of the arrays, record names, metric types) to RECORD_JSONL; ``--fail-site N`` makes
site N raise in every training round, ``--corrupt-site N`` puts a NaN into site N's update (a faulty
hospital). Run as a subprocess so that each federation gets its own
Ray runtime and can be killed like a crashed server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message

from fedpir.client.client_app import make_client_app
from fedpir.run_config import RunSettings
from fedpir.server.server_app import make_server_app
from fedpir.simulation.engine import run_flower


def digest(arrays) -> str:
    """Order-independent digest of an ArrayRecord's contents."""
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key].numpy()).tobytes())
    return h.hexdigest()


def describe(msg: Message) -> dict:
    """What a message carries, without the data itself."""
    content = msg.content
    return {
        "arrays": {name: {k: list(a.shape) for k, a in rec.items()} for name, rec in content.array_records.items()},
        "digest": {name: digest(rec) for name, rec in content.array_records.items()},
        "metrics": {name: {k: type(v).__name__ for k, v in rec.items()} for name, rec in content.metric_records.items()},
        "configs": {name: dict(rec) for name, rec in content.config_records.items()},
    }


def recording_mod(record_path: str, fail_site: int | None, corrupt_site: int | None):
    """A Flower client mod that logs incoming and outgoing messages (and can break one site)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        site = int(context.node_config["partition-id"])
        entry = {"site": site, "type": msg.metadata.message_type, "received": describe(msg)}
        if fail_site == site and msg.metadata.message_type == "train":
            raise RuntimeError(f"site {site} crashed on purpose")
        reply = call_next(msg, context)
        if corrupt_site == site and msg.metadata.message_type == "train":
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            broken = arrays[key].numpy().copy()
            broken.flat[0] = np.nan
            arrays[key] = Array(broken)
        entry["sent"] = describe(reply) if not reply.has_error() else {"error": reply.error.reason}
        with open(record_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return mod


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("settings")
    parser.add_argument("record")
    parser.add_argument("--fail-site", type=int)
    parser.add_argument("--corrupt-site", type=int)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings = RunSettings.from_run_config(json.loads(Path(args.settings).read_text()))
    mod = recording_mod(args.record, args.fail_site, args.corrupt_site)
    run_flower(make_server_app(settings), make_client_app(settings, mods=[mod]), settings.num_sites, cpus_per_site=1)


if __name__ == "__main__":
    main()
