"""The model's vocabulary of parameter groups, objectives and key policies: names only, no torch.

:class:`fedpir.models.pir.PIRNet` maps each name to its modules and state-dict keys; the run settings
(:mod:`fedpir.run_config`) and the commands check a value against these names before anything heavy
is imported.
"""

from __future__ import annotations

#: Which state-dict keys a site sends to the server (the baselines differ from fedpir here; "local" sends
#: nothing). The keys of each policy are declared on the model: PIRNet.federated_keys.
KEY_POLICIES: tuple[str, ...] = ("fedpir", "fedavg", "fedbn", "fedper", "local")
#: What a model is trained for in a round (the federation's "pretrain" stage trains "pretrain";
#: its "finetune" stage trains the run's task), and the top-level modules each objective uses.
OBJECTIVE_MODULES: dict[str, tuple[str, ...]] = {
    "pretrain": ("adapters", "encoder", "fusion", "decoder", "rotation_head", "projection_head"),
    "segmentation": ("adapters", "encoder", "fusion", "seg_head", "lesion_probe"),
    "classification": ("adapters", "encoder", "fusion", "cls_head"),
}
TASKS: tuple[str, ...] = ("segmentation", "classification")
#: Parameter groups, the unit in which a round chooses what it trains (see PIRNet.group_of).
PARAMETER_GROUPS: tuple[str, ...] = (
    "adapters", "norms", "encoder", "prior", "fusion", "decoder", "ssl_heads", "task_head", "task_out", "probe",
)
#: Named choices of trained groups: "all" trains every group the objective uses; "head" only the
#: task head (a frozen encoder).
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": PARAMETER_GROUPS,
    "head": ("task_head", "task_out"),
}


def objective_for(stage: str, task: str) -> str:
    """The objective a federation stage trains: "pretrain", or the fine-tuning ``task``."""
    if stage == "pretrain":
        return "pretrain"
    if stage != "finetune":
        raise ValueError(f"stage must be pretrain or finetune, got {stage!r}")
    if task not in TASKS:
        raise ValueError(f"fine-tuning needs a task in {TASKS}, got {task!r}")
    return task


def trainable_groups(spec: str) -> tuple[str, ...]:
    """Parse a trained-groups setting: a preset of :data:`TRAINABLE_PRESETS` or a comma list of
    :data:`PARAMETER_GROUPS`."""
    if spec in TRAINABLE_PRESETS:
        return TRAINABLE_PRESETS[spec]
    groups = tuple(g.strip() for g in spec.split(",") if g.strip())
    unknown = [g for g in groups if g not in PARAMETER_GROUPS]
    if unknown or not groups:
        raise ValueError(
            f"trainable {spec!r}: use a preset ({', '.join(TRAINABLE_PRESETS)}) or a comma list of "
            f"{', '.join(PARAMETER_GROUPS)}"
        )
    return groups
