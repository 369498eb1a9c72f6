"""A site's side of the alignment stage (docs/alignment.md).

- :func:`statistics_reply`: the sufficient statistics of the site's anchors (each session of its
  training patients: pooled X_h paired with the text embedding of its report), recorded in the
  site's ledger (what leaves: array names, anchor count, bytes, SHA-256) before they leave;
- :func:`zero_shot_metrics`: zero-shot lesion classification of the site's held-out patients
  through the map T the server broadcasts; it needs no training label, only the held-out ground
  truth to score it.

The ClientApp (:mod:`fedpir.client.client_app`) admits both under the site's policy first
(:func:`fedpir.client.guard.admit_alignment`, :func:`~fedpir.client.guard.admit_evaluation`).
"""

from __future__ import annotations

import functools

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from torch.utils.data import Subset

from fedpir.alignment.anchors import embed_dataset, site_alignment_statistics
from fedpir.alignment.maps import AlignmentMap
from fedpir.alignment.records import record_digest, statistics_record
from fedpir.alignment.text import TextEncoder, load_text_encoder
from fedpir.alignment.zeroshot import LESION_PROMPTS, binary_metrics, class_embeddings, zero_shot_scores
from fedpir.client.site import Site
from fedpir.data.patients import patient_share
from fedpir.privacy.release import ALIGNMENT_OBJECTIVE


@functools.lru_cache(maxsize=2)
def text_encoder(kind: str) -> TextEncoder:
    """The text encoder ``kind`` (fedpir.alignment.text), loaded once per process, offline."""
    return load_text_encoder(kind)


def anchor_sessions(site: Site) -> Subset:
    """Every session of the site's training patients: its anchors."""
    train = site.train_set
    return Subset(train.sessions, sorted(i for group in train.groups for i in group))


def statistics_reply(site: Site, message: str) -> tuple[ArrayRecord, ConfigRecord, int]:
    """The site's anchor statistics as they leave, its text encoder and pooling, and the anchor count.
    The release is appended to the site's ledger first (``message``: the request's type)."""
    encoder, pooling = text_encoder(site.settings.text_encoder), site.settings.align_pooling
    stats = site_alignment_statistics(site.model, anchor_sessions(site), encoder, pooling=pooling)
    record = statistics_record(stats)
    size, sha256 = record_digest(record)
    site.trainer.ledger.append({"dp": False, "objective": ALIGNMENT_OBJECTIVE, "message": message,
                                "released": sorted(record.keys()), "anchors": stats.n, "bytes": size,
                                "sha256": sha256, "text_encoder": encoder.name, "pooling": pooling})
    return record, ConfigRecord({"text-encoder": encoder.name, "pooling": pooling}), stats.n


def zero_shot_metrics(site: Site, amap: AlignmentMap) -> tuple[dict[str, float], int, float]:
    """Accuracy and AUROC of zero-shot lesion classification (present/absent, ``LESION_PROMPTS``)
    of the site's held-out sessions that have a 0/1 label, how many there are, and the ``n`` of their
    sensitivity to one patient (:func:`~fedpir.data.patients.patient_share`)."""
    held_out = site.holdout_set
    records = held_out.dataset.records  # type: ignore[attr-defined]
    scored = [i for i in held_out.indices if records[i].label in (0, 1)]
    if not scored:
        raise ValueError(f"site {site.name}: no held-out session has a 0/1 lesion label to score zero-shot on")
    z, _ = embed_dataset(site.model, Subset(held_out.dataset, scored), pooling=site.settings.align_pooling)
    scores = zero_shot_scores(amap, z, class_embeddings(text_encoder(site.settings.text_encoder), LESION_PROMPTS))
    metrics = binary_metrics(scores[:, 1] - scores[:, 0], np.array([records[i].label for i in scored]))
    return {"accuracy": metrics["accuracy"], "auroc": metrics["auroc"]}, len(scored), patient_share(records, scored)
