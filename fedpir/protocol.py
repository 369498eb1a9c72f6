"""What crosses the network between the server and the sites, named once for both sides.

The server sends a ConfigRecord ``config`` with :data:`STAGE_KEY` (the federation stage of the
round), :data:`ROUND_KEY`, :data:`EPOCHS_KEY` and, with FedProx, :data:`PROXIMAL_MU_KEY`. A site
replies with the shared arrays (train only), a MetricRecord ``metrics`` holding
:data:`NUM_EXAMPLES_KEY`, the scalar metrics of its round and one :func:`has_modality_key` flag per
vocabulary modality, and a ConfigRecord ``site`` with its name.
"""

from __future__ import annotations

#: Federation stages, in the order a run goes through them.
STAGES: tuple[str, ...] = ("pretrain", "finetune")
STAGE_KEY, ROUND_KEY, EPOCHS_KEY = "stage", "round", "local-epochs"
#: Sent by Flower's FedProx strategy (its own key name).
PROXIMAL_MU_KEY = "proximal-mu"
NUM_EXAMPLES_KEY = "num-examples"
HAS_MODALITY_PREFIX = "has-modality."
#: Evaluation metrics every site reports, whatever its modalities (NaN where a site cannot
#: compute one), so that the server can aggregate them; per-pair figures stay at the site.
EVAL_KEYS: tuple[str, ...] = ("psnr", "ssim", "dice", "accuracy", "auroc", "loss")


def has_modality_key(modality: str) -> str:
    """The MetricRecord key a site uses to say whether it holds ``modality``."""
    return f"{HAS_MODALITY_PREFIX}{modality}"
