"""Zero-shot classification through a fitted latent alignment, and its two reference points.

- **zero-shot**: class prompts -> text embeddings t_c (mean over each class's prompt wordings);
  image -> pooled X_h z -> T(z); prediction argmax_c cos(T(z), t_c). Cosines are taken in the
  standardized text space of the anchors (:meth:`AlignmentMap.transform` with
  ``standardized=True``), so the component that all reports share does not dominate them.
- **naive stitching**: the same with the ``identity`` map, i.e. no alignment: standardized image
  embeddings compared directly with standardized prompt embeddings, the first min(dx, dy)
  coordinates paired up and the rest of the longer vector left at zero.
- **linear probe**: supervised logistic regression on the same image embeddings with the training
  patients' labels (scikit-learn when installed, else a small numpy one), the upper reference.

Scores for AUROC are cos(T(z), t_positive) - cos(T(z), t_negative) for zero-shot and naive, the
positive-class probability for the probe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpir.alignment.maps import AlignmentMap
from fedpir.alignment.text import TextEncoder

#: Class prompts, negative class first (several wordings each, averaged). Written as generic class
#: descriptions, none a copy of a synthetic report template (a test checks).
LESION_PROMPTS: dict[str, tuple[str, ...]] = {
    "no lesion": ("No lesion.", "Normal study without lesions.", "The white matter is normal."),
    "lesion": ("White matter lesion.", "A hyperintense lesion.", "There is a focal lesion in the brain."),
}
VOLUME_PROMPTS: dict[str, tuple[str, ...]] = {
    "normal volume": ("Normal brain volume.", "The brain is of normal size.", "No brain atrophy."),
    "reduced volume": ("Reduced brain volume.", "The brain is atrophic.", "Brain atrophy with volume loss."),
}


def class_embeddings(encoder: TextEncoder, prompts: Mapping[str, Sequence[str]]) -> np.ndarray:
    """[C, dy]: the unit-norm mean embedding of each class's prompts, in the order of ``prompts``."""
    if len(prompts) < 2 or any(not list(p) for p in prompts.values()):
        raise ValueError("need at least two classes, each with at least one prompt")
    rows = [encoder.encode(list(p)).mean(0) for p in prompts.values()]
    out = np.stack(rows)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)


def zero_shot_scores(amap: AlignmentMap, z: Any, classes: np.ndarray) -> np.ndarray:
    """Cosine [n, C] between mapped image embeddings T(z) and class embeddings ``classes`` [C, dy],
    both in the anchors' standardized text space."""
    mapped = amap.transform(z, standardized=True)
    return _unit(mapped) @ _unit(amap.standardize_target(classes)).T


def linear_probe(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, *, c: float = 1.0,
                 seed: int = 0) -> np.ndarray:
    """Class probabilities [n_test, C] of an L2-regularized logistic regression (inverse strength
    ``c``) on standardized embeddings; scikit-learn when installed, else numpy gradient descent."""
    train_z, test_z = np.asarray(train_z, dtype=np.float64), np.asarray(test_z, dtype=np.float64)
    train_y = np.asarray(train_y).astype(int)
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError("the linear probe needs training labels of at least two classes")
    mean, std = train_z.mean(0), train_z.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    xs, ts = (train_z - mean) / std, (test_z - mean) / std
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return _numpy_logistic(xs, train_y, ts, c)
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(xs, train_y)
    return model.predict_proba(ts)


def _numpy_logistic(x: np.ndarray, y: np.ndarray, test: np.ndarray, c: float, steps: int = 5000) -> np.ndarray:
    """Logistic regression by full-batch gradient descent on the mean log-loss + |w|^2 / (2 c n)
    (scikit-learn's objective divided by c n): binary for two classes, multinomial otherwise."""
    n, d = x.shape
    k = int(y.max()) + 1
    binary = k == 2
    w, b = np.zeros((d, 1 if binary else k)), np.zeros(1 if binary else k)
    target = y[:, None].astype(float) if binary else np.eye(k)[y]
    lr = 1.0 / (0.25 * np.linalg.norm(x, 2) ** 2 / n + 1.0 / (c * n))  # 1 / Lipschitz constant

    def prob(a: np.ndarray) -> np.ndarray:
        logits = a @ w + b
        if binary:
            return 1.0 / (1.0 + np.exp(-logits))
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    for _ in range(steps):
        grad = (prob(x) - target) / n
        w -= lr * (x.T @ grad + w / (c * n))
        b -= lr * grad.sum(0)
    p = prob(test)
    return np.hstack([1 - p, p]) if binary else p


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (1 positive) ranked by ``scores`` (ties count
    half); NaN when one class is missing."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean of the two recalls) and AUROC of scores thresholded at
    ``threshold`` (score > threshold predicts the positive class)."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(scores) > threshold).astype(int)
    recalls = [float((pred[labels == k] == k).mean()) for k in (0, 1) if (labels == k).any()]
    return {"accuracy": float((pred == labels).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "auroc": auroc(scores, labels), "n": float(len(labels))}


def compare(maps: Mapping[str, AlignmentMap], classes: np.ndarray, train_z: np.ndarray, train_y: np.ndarray,
            test_z: np.ndarray, test_y: np.ndarray, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Binary metrics on the test patients of zero-shot prediction through each map of ``maps``
    (e.g. {"procrustes": ..., "naive": identity map}) and of the linear probe (key ``"probe"``).
    ``classes`` [2, dy]: negative class first."""
    if classes.shape[0] != 2:
        raise ValueError(f"compare is for two classes, got {classes.shape[0]}")
    out: dict[str, dict[str, float]] = {}
    for name, amap in maps.items():
        s = zero_shot_scores(amap, test_z, classes)
        out[name] = binary_metrics(s[:, 1] - s[:, 0], test_y)
    prob = linear_probe(train_z, train_y, test_z, seed=seed)
    out["probe"] = binary_metrics(prob[:, 1], test_y, threshold=0.5)
    return out
