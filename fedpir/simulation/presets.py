"""The federations `fedpir simulate --preset` runs (names and numbers only: the command reads them before
anything heavy loads). A flag given on the command line overrides its preset's value.

    quick     a smoke run of a minute or two: 2 sites of 4 patients at 16^3, one round of fedpir and of
              local-only from random weights; it checks the install, not quality (what a new user runs first)
    default   the benchmark: 8 sites of 4-20 patients (90), 16 rounds of the private phase, every method and the
              gates' references
    hospital  32 sites spread like real hospitals, 4 to 60 patients (613), the same private phase

The private phase (:data:`PRIVATE_PHASE`, docs/architecture.md "The private phase") trains the shared lesion
probe only, by one step of plain SGD over all of a site's training patients per round, on a convex loss: few
parameters and few steps, so that the DP noise, which a federation averages down, leaves a signal.
"""

from __future__ import annotations

from typing import Any

#: Hospital sizes of the "hospital" preset: many small sites, a few large ones (a long right tail).
HOSPITAL_SIZES = "4,4,5,5,6,6,7,8,8,9,10,10,11,12,13,14,15,16,17,18,20,21,23,25,27,30,33,37,41,46,52,60"

#: The private phase of the benchmark presets: the knobs it sets (every DP method runs it; the no-DP references
#: keep their own recipe, :data:`fedpir.simulation.methods.NODP_RECIPE`).
PRIVATE_PHASE: dict[str, Any] = {"finetune_trainable": "probe", "optimizer": "sgd", "lr": 10.0, "batch_size": 0,
                                 "segment_positive_weight": 30.0, "max_grad_norm": 0.1, "finetune_rounds": 16}

#: Preset name -> the run-settings knobs it sets (the rest keep their RunSettings defaults), its methods and
#: its warm start (default: "auto").
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"num_sites": 2, "subjects_per_site": "4", "volume_size": 16, "finetune_rounds": 1,
              "methods": "fedpir,local", "warm_start": "none"},
    "default": {"num_sites": 8, "subjects_per_site": "4,6,8,10,12,14,16,20", **PRIVATE_PHASE},
    "hospital": {"num_sites": 32, "subjects_per_site": HOSPITAL_SIZES, **PRIVATE_PHASE},
}
#: The knobs a preset may set, besides the methods and the warm start.
PRESET_KNOBS: tuple[str, ...] = ("num_sites", "subjects_per_site", "volume_size", "finetune_rounds", "finetune_trainable",
                                 "optimizer", "lr", "batch_size", "segment_positive_weight", "max_grad_norm")
