"""DP cost: a private training step against the same step without DP, in time and peak memory.

Same model (the default-width PIRNet over four modalities), same batch of patients (all four
modalities, a lesion mask), same fine-tuning objective (segmentation with the trainer's augmented
views), same trained parameters. The private step is fedpir's (``fedpir.privacy.dp.PrivateModel``:
Opacus per-patient gradients, clipping, noise) under each way Opacus computes per-patient gradients
(``grad_sample_mode``), for each set of trained parameter groups (``fedpir.models.pir``: "all",
the fine-tuning recipe's default, "head"). Every configuration runs in a process of its own so that
its peak memory is its own: ``peak_added`` is the resident memory (or CUDA allocation) above what the
model, batch and optimizer held before the first step. One step of each private configuration is
profiled (torch.profiler); the ops that took most of its time are in the record.

    python -m benchmarks.cost.dp_cost [--size 24 --batch 4 --steps 3 --groups all,default,head --device cpu]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.cost.common import emit, in_child, parser, peak_memory, ratio
from fedpir.models.groups import trainable_groups
from fedpir.models.losses import finetune_losses
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.privacy.budget import PrivacyBudget
from fedpir.privacy.dp import GRAD_SAMPLE_MODES, PrivateModel, RoundPlan, collate_patients
from fedpir.run_config import RunSettings
from fedpir.synthetic.scanners import MODALITIES

OBJECTIVE = "segmentation"
#: Opacus modes that do not apply to this model, and why (they are reported, not run).
NOT_APPLICABLE = {
    "ew": "Opacus' expanded weights need the loss computed through the wrapped module's forward(); "
          "fedpir's losses call the model's encode/represent/segment methods",
    "ghost": "ghost (fast gradient) clipping needs per-patient losses (reduction='none') and a second "
             "backward pass; fedpir's losses are batch means. It would save only the Linear layers' "
             "per-sample gradients: Opacus has ghost norms for Linear and Embedding only, so every Conv3d "
             "still builds its unfold",
}


def batch(size: int, n: int, device: str) -> dict[str, Any]:
    """A batch of ``n`` patients with every modality and a lesion mask (random contents)."""
    g = torch.Generator().manual_seed(0)
    m = len(MODALITIES)
    return {"image": torch.randn(n, m, size, size, size, generator=g).to(device),
            "present": torch.ones(n, m, dtype=torch.bool, device=device),
            "mask": (torch.rand(n, 1, size, size, size, generator=g) > 0.9).float().to(device),
            "has_mask": torch.ones(n, dtype=torch.bool, device=device),
            "label": torch.zeros(n, dtype=torch.long, device=device)}


def _profile(step) -> list[dict[str, Any]]:
    """The ops that took most self time in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events]


def step_cost(group: str, mode: str | None, size: int, n: int, steps: int, views: int, device: str) -> dict[str, Any]:
    """Seconds per step (the fastest timed one, the least disturbed by other jobs; and the median) and
    peak memory of one configuration (``mode`` None: without DP)."""
    torch.manual_seed(0)
    model = PIRNet(PIRConfig(list(MODALITIES), spatial_size=(size,) * 3)).to(device)
    trained = model.set_trainable(OBJECTIVE, trainable_groups(group))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = batch(size, n, device)
    private = None
    if mode is not None:
        loader = DataLoader([{"i": i} for i in range(n)], batch_size=n, collate_fn=collate_patients)
        plan = RoundPlan(sample_rate=1.0, steps=1, noise_multiplier=1.0, max_grad_norm=1.0)
        private = PrivateModel(model, optimizer, loader, accountant=PrivacyBudget(1e9, 1e-5).accountant, plan=plan,
                               grad_sample_mode=mode)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        finetune_losses(model, data, OBJECTIVE, views=views, generator=generator)["total"].backward()
        if private is not None:
            private.step(n)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with peak_memory(device) as peak:
        for _ in range(steps + 1):  # the first is a warm-up (Adam's state, Opacus' first hooks)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    out = {"group": group, "mode": mode or "none", "trained_parameters": sum(
        p.numel() for name, p in model.named_parameters() if name in set(trained)),
        "step_s": min(times[1:]), "step_median_s": statistics.median(times[1:]), "step_samples_s": times[1:],
        "peak_added_bytes": peak.added, "peak_bytes": peak.bytes}
    if mode is not None and torch.device(device).type == "cpu":
        out["profile"] = _profile(step)
    return out


def group_spec(name: str) -> str:
    """A group setting; "default" is the fine-tuning recipe's (RunSettings.finetune_trainable)."""
    return RunSettings().finetune_trainable if name == "default" else name


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=24, help="volume edge in voxels")
    p.add_argument("--batch", type=int, default=4, help="patients per step")
    p.add_argument("--views", type=int, default=RunSettings().augment_views, help="augmented views per patient")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--groups", default="all,default,head", help="trained parameter groups, ';'-free comma list of presets")
    p.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES), help="Opacus grad_sample_mode values to run")
    args = p.parse_args(argv)
    common = dict(size=args.size, n=args.batch, steps=args.steps, views=args.views, device=args.device)
    rows, summary = [], {}
    for group in args.groups.split(","):
        base = in_child(step_cost, group=group_spec(group), mode=None, **common)
        rows.append({**base, "group": group})
        for mode in args.modes.split(","):
            row = {**in_child(step_cost, group=group_spec(group), mode=mode, **common), "group": group}
            if "error" not in row and "error" not in base:
                row["time_ratio"] = ratio(row["step_s"], base["step_s"])
                row["memory_ratio"] = ratio(row["peak_added_bytes"], base["peak_added_bytes"])
            rows.append(row)
        private = [r for r in rows if r["group"] == group and "time_ratio" in r]
        if private:
            best = min(private, key=lambda r: r["time_ratio"])
            summary[group] = {"best_mode": best["mode"], "time_ratio": best["time_ratio"],
                              "memory_ratio": best["memory_ratio"]}
    config = {"size": args.size, "batch": args.batch, "views": args.views, "steps": args.steps, "objective": OBJECTIVE,
              "groups": {g: group_spec(g) for g in args.groups.split(",")}, "target": "time and memory ratio <= 1.5"}
    return emit("dp_cost", argv, args, config, {"best": summary, "rows": rows, "not_applicable": NOT_APPLICABLE})


if __name__ == "__main__":
    main()
