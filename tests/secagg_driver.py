"""Runs a fedpir federation with secure aggregation on Flower's simulation engine, recording both ends.

    python tests/secagg_driver.py SETTINGS_JSON OUT_DIR

The server's Grid is wrapped so that every reply the server receives is kept (what the server-side
code could ever hold) and pickled to OUT_DIR/server_replies.pkl; a ClientApp mod inside SecAgg+
saves each site's plain update, the global weights it received and its weight to
OUT_DIR/site-<node>-round-<r>.npz (the ground truth the test compares the sum against).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp

from fedpir.client.client_app import make_client_app
from fedpir.client.secure_mod import under_secure_aggregation
from fedpir.run_config import RunSettings
from fedpir.server.server_app import serve
from fedpir.simulation.engine import run_flower


class RecordingGrid:
    """A Grid that keeps every reply the server receives."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.replies = grid, []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            entry = {"node": msg.metadata.src_node_id, "type": msg.metadata.message_type, "error": msg.has_error()}
            if not msg.has_error():
                content = msg.content
                entry["arrays"] = {name: {k: a.numpy() for k, a in rec.items()} for name, rec in content.array_records.items()}
                masked = content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS)
                entry["masked"] = list(masked) if masked else None
            self.replies.append(entry)
        return replies


def plain_update_mod(out_dir: Path):
    """Inside SecAgg+: save the site's plain reply (update, weight) and the weights it received."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if under_secure_aggregation(msg) and not reply.has_error() and "fitins.parameters" in msg.content.array_records:
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            received = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
            update = parameters_to_ndarrays(fitres.parameters)
            rnd = msg.metadata.group_id
            np.savez(out_dir / f"site-{msg.metadata.dst_node_id}-round-{rnd}.npz", num_examples=fitres.num_examples,
                     **{f"update_{i}": a for i, a in enumerate(update)}, **{f"global_{i}": a for i, a in enumerate(received)})
        return reply

    return mod


def main() -> None:
    settings = RunSettings.from_run_config(json.loads(Path(sys.argv[1]).read_text()))
    out_dir = Path(sys.argv[2])
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        recording = RecordingGrid(grid)
        try:
            serve(recording, settings.with_run_folder(context.run_id))
        finally:
            (out_dir / "server_replies.pkl").write_bytes(pickle.dumps(recording.replies))

    client = make_client_app(settings, inner_mods=[plain_update_mod(out_dir)])
    run_flower(server, client, settings.num_sites, cpus_per_site=1)


if __name__ == "__main__":
    main()
