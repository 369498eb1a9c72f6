"""The alignment stage's named choices: names only, no numpy, so that the run settings check them at once."""

from __future__ import annotations

#: How a patient becomes one vector: X_h pooled over space by "mean"
#: (``fedpir.models.evaluation.embed``), "max" (the largest response of each channel: a small focal
#: finding is not averaged away) or "meanmax" (both, concatenated: [2C]); or "lesion": what the
#: segmentation head computes from X_h and the encoder skips, reduced to [2] = (the largest lesion
#: logit, the mean lesion probability = the predicted lesion volume fraction). "lesion" is only
#: meaningful for a model whose segmentation head was trained (the public warm start, a segment task).
POOLINGS: tuple[str, ...] = ("mean", "max", "meanmax", "lesion")

#: Estimators of the map T (fedpir.alignment.maps).
METHODS: tuple[str, ...] = ("procrustes", "lstsq", "ridge", "identity")
#: Text encoders of the reports (fedpir.alignment.text): auto (MiniLM when installed), minilm, hashed.
ENCODERS: tuple[str, ...] = ("auto", "minilm", "hashed")
