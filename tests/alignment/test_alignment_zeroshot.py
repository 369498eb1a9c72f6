"""Zero-shot classification through an alignment, its baselines and metrics, and a site's anchor statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from fedpir.alignment.maps import AlignmentStatistics, fit_alignment, fit_pairs
from fedpir.alignment.text import HashedNgramEncoder
from fedpir.alignment.zeroshot import (
    LESION_PROMPTS,
    _numpy_logistic,
    auroc,
    binary_metrics,
    class_embeddings,
    compare,
    zero_shot_scores,
)

REPORTS = {
    0: ["No focal lesion.", "No abnormality detected.", "No focal lesion; normal appearance of the white matter."],
    1: ["Hyperintense lesion in the left frontal white matter, 25 mm.",
        "Focal white matter lesion, right parietal, 33 mm, hyperintense on fluid-sensitive images.",
        "25 mm T2/FLAIR hyperintense lesion, left occipital white matter."],
}


def _patients(rng: np.random.Generator, n: int, dx: int, signal: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image embeddings whose lesion label shifts them along one random direction, and their reports."""
    labels = rng.permutation(np.arange(n) % 3 != 0).astype(int)
    direction = np.random.default_rng(123).normal(size=dx)
    z = rng.normal(size=(n, dx)) + signal * np.outer(labels, direction / np.linalg.norm(direction)) + 5.0
    texts = [REPORTS[int(y)][rng.integers(3)] for y in labels]
    return z, labels, texts


def _anchors_and_test_set(seed: int, n_test: int):
    """A generator, the hashed text encoder, 90 anchor patients (z, y, reports), ``n_test`` test
    patients (z, y) and the lesion prompts' class embeddings."""
    rng = np.random.default_rng(seed)
    enc = HashedNgramEncoder(128)
    z, y, texts = _patients(rng, 90, 24, signal=4.0)
    zt, yt, _ = _patients(rng, n_test, 24, signal=4.0)
    return rng, enc, (z, y, texts), (zt, yt), class_embeddings(enc, LESION_PROMPTS)


def test_zero_shot_through_the_map_beats_naive_stitching() -> None:
    _, enc, (z, y, texts), (zt, yt), classes = _anchors_and_test_set(0, 60)
    stats = AlignmentStatistics.from_pairs(z, enc.encode(texts))
    maps = {m: fit_alignment(stats, m) for m in ("procrustes", "ridge", "lstsq")}
    maps["naive"] = fit_alignment(stats, "identity")
    out = compare(maps, classes, z, y, zt, yt)
    # generic prompts share only some words with the reports: the hashed encoder loses a little
    assert out["procrustes"]["balanced_accuracy"] > 0.75 and out["procrustes"]["auroc"] > 0.85, out["procrustes"]
    assert out["ridge"]["balanced_accuracy"] > 0.9 and out["ridge"]["auroc"] > 0.93, out["ridge"]
    assert out["probe"]["accuracy"] > 0.9
    assert out["naive"]["auroc"] < 0.8 and out["naive"]["balanced_accuracy"] < 0.75
    assert out["procrustes"]["auroc"] > out["naive"]["auroc"] + 0.15


def test_zero_shot_needs_the_anchor_pairing() -> None:
    """With each report moved to a random other patient, the same data give chance-level zero-shot."""
    rng, enc, (z, _, texts), (zt, yt), classes = _anchors_and_test_set(1, 200)

    def zero_shot_auroc(reports: list[str]) -> float:
        scores = zero_shot_scores(fit_pairs(z, enc.encode(reports), "ridge"), zt, classes)
        return auroc(scores[:, 1] - scores[:, 0], yt)

    assert zero_shot_auroc(texts) > 0.95
    shuffled = [zero_shot_auroc([texts[i] for i in rng.permutation(len(texts))]) for _ in range(10)]
    assert 0.35 < float(np.mean(shuffled)) < 0.65


def test_metrics_match_references() -> None:
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # with ties
    assert auroc(scores, labels) == pytest.approx(sklearn.roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(auroc(scores, np.ones(200)))
    m = binary_metrics(np.array([0.9, -0.2, 0.3, -0.5]), np.array([1, 1, 0, 0]))
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5 and m["auroc"] == 0.75


def test_numpy_probe_fallback_agrees_with_scikit_learn() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 6))
    y = (x @ rng.normal(size=6) + 0.5 * rng.normal(size=120) > 0).astype(int)
    test = rng.normal(size=(80, 6))
    ours = _numpy_logistic(x, y, test, c=1.0)
    ref = linear_model.LogisticRegression(C=1.0, max_iter=5000).fit(x, y).predict_proba(test)
    assert np.abs(ours - ref).max() < 0.02


def test_prompt_errors() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        class_embeddings(HashedNgramEncoder(), {"lesion": ["a lesion"]})


def test_site_statistics_sum_to_the_pooled_anchors(small_federation: Path) -> None:
    from fedpir.alignment.anchors import site_alignment_statistics, site_anchors
    from fedpir.data.dataset import load_site
    from fedpir.models.pir import PIRConfig, PIRNet

    torch.manual_seed(0)
    enc = HashedNgramEncoder(32)
    vocab = ["t1", "t2", "flair", "pd"]
    model = PIRNet(PIRConfig(vocab, spatial_size=(32, 32, 32), channels=(4, 8), prior_tokens=4, num_heads=2))
    sites = [Subset(load_site(small_federation / f"site-{k}", vocab, (32, 32, 32))[0], range(6)) for k in range(2)]
    stats = [site_alignment_statistics(model, s, enc, batch_size=4) for s in sites]
    assert [s.n for s in stats] == [6, 6] and stats[0].dims == (model.dim, 32)
    anchors = [site_anchors(model, s, enc) for s in sites]
    assert anchors[0][2] == [sites[0].dataset.records[i].subject_id for i in range(6)]
    pooled = AlignmentStatistics.from_pairs(np.concatenate([a[0] for a in anchors]), np.concatenate([a[1] for a in anchors]))
    total = stats[0] + stats[1]
    np.testing.assert_allclose(total.xty, pooled.xty, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit_alignment(total, "ridge").matrix, fit_alignment(pooled, "ridge").matrix, atol=1e-9)
    # the reports really are the anchors: an image row is paired with its own subject's report
    records = {r.subject_id: r.report for r in sites[1].dataset.records}
    np.testing.assert_allclose(anchors[1][1][0], enc.encode([records[anchors[1][2][0]]])[0])


def test_lesion_embedding_is_the_segmentation_map_reduced(small_federation: Path) -> None:
    from torch.utils.data import DataLoader

    from fedpir.alignment.anchors import embed_dataset, pooled_embedding
    from fedpir.data.dataset import load_site
    from fedpir.models.losses import check_batch
    from fedpir.models.pir import PIRConfig, PIRNet
    from fedpir.run_config import RunSettings

    torch.manual_seed(0)
    vocab = ["t1", "t2", "flair", "pd"]
    model = PIRNet(PIRConfig(vocab, spatial_size=(32, 32, 32), channels=(4, 8), prior_tokens=4, num_heads=2)).train()
    site = Subset(load_site(small_federation / "site-0", vocab, (32, 32, 32))[0], range(3))
    batch = next(iter(DataLoader(site, batch_size=3)))
    z = pooled_embedding(model, batch, "lesion")
    assert model.training and z.shape == (3, 2)
    model.eval()
    with torch.no_grad():
        logits = model.segment(*model.represent(*check_batch(model, batch), with_skips=True))
    torch.testing.assert_close(z[:, 0], logits.amax((1, 2, 3, 4)))
    torch.testing.assert_close(z[:, 1], torch.sigmoid(logits).mean((1, 2, 3, 4)))
    with torch.no_grad():  # the embedding follows the segmentation head's output layer
        model.seg_head.out.bias += 2.0
    np.testing.assert_allclose(embed_dataset(model, site, pooling="lesion")[0][:, 0], z[:, 0].numpy() + 2.0, rtol=1e-5)
    assert RunSettings(align_pooling="lesion").align_pooling == "lesion"  # the federated stage accepts it
