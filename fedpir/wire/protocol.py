"""What crosses the network between the server and the sites, named once for both sides.

The server sends a ConfigRecord ``config`` with :data:`STAGE_KEY` (the federation stage of the
round), :data:`ROUND_KEY`, :data:`EPOCHS_KEY` and, with FedProx, :data:`PROXIMAL_MU_KEY`. A site
replies with the shared arrays (train only), a MetricRecord ``metrics`` holding
:data:`NUM_EXAMPLES_KEY`, the scalar metrics of its round and one :func:`has_modality_key` flag per
vocabulary modality, and a ConfigRecord ``site`` with its name; only the metrics declared in
:mod:`fedpir.privacy.release` leave, as the site's privacy policy says. A request the site does not
answer gets an error reply: one of the :data:`SITE_ERRORS` codes and its generic reason (the details
stay in the site's log).

The alignment stage (run config ``align``, after the last round; :mod:`fedpir.server.alignment`) sends
two query messages with the global shared arrays: :data:`ALIGN_STATISTICS` (a site replies the
sufficient statistics of its anchors as the ArrayRecord ``arrays``, ``alignment/<name>`` arrays, and
a ConfigRecord :data:`ALIGNMENT_RECORD` naming its text encoder and pooling), then
:data:`ALIGN_ZEROSHOT` with the fitted map T (ArrayRecord :data:`MAP_RECORD`, its method, scale
and anchor count in the ConfigRecord :data:`ALIGNMENT_RECORD`); a site replies the zero-shot metrics
of its held-out patients, released like evaluation metrics.
"""

from __future__ import annotations

#: Federation stages, in the order a run goes through them.
STAGES: tuple[str, ...] = ("pretrain", "finetune")
STAGE_KEY, ROUND_KEY, EPOCHS_KEY = "stage", "round", "local-epochs"
#: Sent by Flower's FedProx strategy (its own key name).
PROXIMAL_MU_KEY = "proximal-mu"
NUM_EXAMPLES_KEY = "num-examples"
#: The alignment stage: its name (``STAGE_KEY``), message types, and the names of its records.
ALIGN_STAGE = "align"
ALIGN_STATISTICS, ALIGN_ZEROSHOT = "query.alignment_statistics", "query.zeroshot"
ALIGNMENT_RECORD, MAP_RECORD = "alignment", "alignment-map"
HAS_MODALITY_PREFIX = "has-modality."
#: Evaluation metrics every site reports, whatever its modalities (NaN where a site cannot
#: compute one), so that the server can aggregate them; per-pair figures stay at the site.
EVAL_KEYS: tuple[str, ...] = ("psnr", "ssim", "dice", "accuracy", "auroc", "loss")


def has_modality_key(modality: str) -> str:
    """The MetricRecord key a site uses to say whether it holds ``modality``."""
    return f"{HAS_MODALITY_PREFIX}{modality}"


#: Error codes of a site's error replies (Flower's own codes are below 100) and their generic reasons.
SITE_ERROR, POLICY_REFUSED, RATE_LIMITED, BUDGET_EXHAUSTED, LEDGER_UNTRUSTED, DATA_UNAVAILABLE = range(1000, 1006)
SITE_ERRORS: dict[int, str] = {
    SITE_ERROR: "the site could not complete the request; details are in the site's log",
    POLICY_REFUSED: "refused by the site's privacy policy",
    RATE_LIMITED: "evaluation refused: the site's privacy policy limits evaluations per training round",
    BUDGET_EXHAUSTED: "refused: the round would exceed the site's privacy budget",
    LEDGER_UNTRUSTED: "training stopped: the site's privacy ledger does not verify; the site's admin must act",
    DATA_UNAVAILABLE: "the site cannot read its data; its admin must check data-dir (details in the site's log)",
}

#: How a site's shared weights may travel (run config ``transfer-dtype``; :mod:`fedpir.wire.transfer`).
TRANSFER_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")


def check_transfer_dtype(name: str) -> str:
    """``name`` if it is one of :data:`TRANSFER_DTYPES`, else ValueError with the valid names."""
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"transfer-dtype {name!r} unknown; valid: {', '.join(TRANSFER_DTYPES)}")
    return name
