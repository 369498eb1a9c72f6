"""Communication: bytes a site sends per round against the float32 bytes of the shared weights, for
each transfer encoding (run config ``transfer-dtype``, fedpir.wire.transfer), and the encoding's effect
on Dice.

Bytes: the reply's RecordDict serialized as the protobuf a deployed SuperNode sends (arrays, the
metrics and the site's name), measured on every train reply of a real run on Flower's simulation
engine, and for the arrays alone of a reply encoded here. Dice: the same federation, seeds and
replayable DP noise (``secret-noise = false``) run once per encoding, so that a seed's runs differ
only in the encoding; the final held-out Dice (mean over sites) per encoding and its paired
difference to float32. The run is the default recipe (public warm start, DP at epsilon 8,
fine-tuning norms, adapters, prior and task output layer; of these only the prior is shared, so
``--trainable all`` is the case where the encoding touches much of what trains), shortened
(``--rounds``, ``--subjects``).

    python -m benchmarks.cost.communication [--dtypes float32,float16,int8 --seeds 0 --rounds 2 --subjects 8]
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

from benchmarks.cost.common import emit, parser, ratio
from benchmarks.cost.engine_probe import run_probed
from fedpir.run_config import RunSettings
from fedpir.simulation.warm_starts import cached_warm_start
from fedpir.synthetic.prepare import synthetic_federation
from fedpir.training.model import build_model
from fedpir.wire.protocol import TRANSFER_DTYPES
from fedpir.wire.transfer import encode_reply


def shared_fp32_bytes(settings: RunSettings) -> int:
    """Bytes of the shared weights as raw float32 (integer tensors at their own size)."""
    model = build_model(settings)
    state, keys = model.state_dict(), model.federated_keys(settings.key_policy)
    return int(sum(state[k].numel() * (4 if state[k].is_floating_point() else state[k].element_size()) for k in keys))


def array_bytes(settings: RunSettings, dtype: str) -> int:
    """Serialized bytes of the arrays of one reply encoded for ``dtype`` (a small update of every weight)."""
    model = build_model(settings)
    state = model.state_dict()
    received = {k: state[k] for k in model.federated_keys(settings.key_policy)}
    sent = {k: v + 1e-3 if v.is_floating_point() else v for k, v in received.items()}
    return recorddict_to_proto(RecordDict({"arrays": encode_reply(sent, received, dtype)})).ByteSize()


def dice_runs(settings: RunSettings, dtypes: Sequence[str], seeds: Sequence[int], work: Path) -> dict[str, Any]:
    """Per encoding: the final Dice of each seed's run and the bytes of its train replies."""
    out: dict[str, Any] = {d: {"dice": [], "reply_bytes": [], "rejected": 0} for d in dtypes}
    for seed in seeds:
        fed = synthetic_federation(replace(settings, seed=seed, run_dir=str(work / f"data-{seed}")))
        for dtype in dtypes:
            run_dir = work / f"run-{seed}-{dtype}"
            run = run_probed(replace(settings, seed=seed, transfer_dtype=dtype, federation_dir=str(fed),
                                     run_dir=str(run_dir)), run_dir)
            out[dtype]["dice"].append(run.final_metric("dice"))
            out[dtype]["reply_bytes"] += [m["reply_bytes"] for m in run.messages if m["kind"] == "train"]
            out[dtype]["rejected"] += sum(1 for r in run.server_log if r["kind"] == "rejected")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default=",".join(TRANSFER_DTYPES))
    p.add_argument("--seeds", default="0", help="comma list; one run per seed and encoding")
    p.add_argument("--rounds", type=int, default=2, help="fine-tuning rounds of each run")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--subjects", type=int, default=8, help="patients per site")
    p.add_argument("--size", type=int, default=RunSettings().volume_size)
    p.add_argument("--trainable", default=RunSettings().finetune_trainable,
                   help="fine-tuned parameter groups (default: the recipe's; 'all' also trains the shared encoder)")
    p.add_argument("--warm-start", default="auto", help="auto (the cached public warm start, built if missing) or none")
    args = p.parse_args(argv)
    dtypes, seeds = args.dtypes.split(","), [int(s) for s in args.seeds.split(",")]
    settings = RunSettings(num_sites=args.sites, subjects_per_site=args.subjects, volume_size=args.size,
                           finetune_rounds=args.rounds, secret_noise=False, device=args.device, min_sites=args.sites,
                           finetune_trainable=args.trainable)
    if args.warm_start == "auto":
        path, sha = cached_warm_start(settings, settings.invariance_weight)
        settings = replace(settings, warm_start=path, warm_start_sha256=sha)
    fp32 = shared_fp32_bytes(settings)
    with tempfile.TemporaryDirectory(prefix="fedpir-comm-") as tmp:
        runs = dice_runs(settings, dtypes, seeds, Path(tmp))
    rows = {}
    for dtype in dtypes:
        dice, sent = runs[dtype]["dice"], runs[dtype]["reply_bytes"]
        row = {"array_bytes": array_bytes(settings, dtype), "reply_bytes": statistics.median(sent),
               "ratio_to_fp32": ratio(statistics.median(sent), fp32), "dice": dice,
               "dice_mean": float(np.mean(dice)), "rejected_replies": runs[dtype]["rejected"]}
        if "float32" in runs:
            row["dice_minus_float32"] = [a - b for a, b in zip(dice, runs["float32"]["dice"], strict=True)]
        rows[dtype] = row
    config = {"sites": args.sites, "subjects": args.subjects, "size": args.size, "rounds": args.rounds, "seeds": seeds,
              "warm_start": bool(settings.warm_start), "key_policy": settings.key_policy,
              "finetune_trainable": settings.finetune_trainable, "dp": settings.dp,
              "target": "float32 reply bytes / fp32 bytes of the shared weights <= 1.02"}
    return emit("communication", argv, args, config, {"shared_fp32_bytes": fp32, "dtypes": rows})


if __name__ == "__main__":
    main()
