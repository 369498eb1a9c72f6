"""How a site's shared weights travel to the server: full float32, or a compressed update.

Run config ``transfer-dtype`` (the same at the server and at every site):

- ``float32``: the weights themselves, as trained (the default; exact).
- ``float16``: the update ``sent - received`` (the weights after the round minus the global weights
  the site was sent) in half precision: half the bytes; weights a round does not train have a zero
  update and arrive exactly.
- ``int8``: the same update, quantized per tensor to int8 with a float32 scale
  (``scale = max|update| / 127``) under the key ``<key>`` + :data:`SCALE_SUFFIX`: a quarter of the bytes.

The server knows the global weights it sent, so it decodes every reply back to float32 weights
(:func:`decode_reply`) before it screens and aggregates them; a reply that does not decode is left
as it is and the screening rejects it with its reason. Integer tensors always travel unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedpir.wire.protocol import check_transfer_dtype

SCALE_SUFFIX = "#scale"
_INT8_MAX = 127


def encode_reply(sent: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """The ArrayRecord a site replies with: its shared weights ``sent`` encoded for ``dtype``
    relative to the global weights it ``received`` (see the module docstring)."""
    check_transfer_dtype(dtype)
    if dtype == "float32":
        return ArrayRecord(dict(sent))
    out = ArrayRecord()
    for key, weight in sent.items():
        value = weight.detach().cpu().numpy()
        if not np.issubdtype(value.dtype, np.floating):
            out[key] = Array(np.ascontiguousarray(value))
            continue
        update = value.astype(np.float32) - received[key].detach().cpu().numpy().astype(np.float32)
        if dtype == "float16":
            out[key] = Array(update.astype(np.float16))
            continue
        peak = float(np.abs(update).max()) if update.size else 0.0
        scale = peak / _INT8_MAX if peak > 0 else 0.0
        quantized = np.rint(update / scale) if scale else np.zeros_like(update)
        out[key] = Array(quantized.astype(np.int8))
        out[key + SCALE_SUFFIX] = Array(np.array([scale], dtype=np.float32))
    return out


def decode_reply(record: ArrayRecord, global_arrays: Mapping[str, np.ndarray], dtype: str) -> ArrayRecord:
    """The float weights a reply encoded for ``dtype`` stands for, in the global arrays' dtypes.

    ValueError when the record is not such an encoding of ``global_arrays`` (a key, dtype or shape
    that does not fit).
    """
    check_transfer_dtype(dtype)
    if dtype == "float32":
        return record
    wire = {"float16": np.float16, "int8": np.int8}[dtype]
    expected = set(global_arrays) | {k + SCALE_SUFFIX for k, v in global_arrays.items()
                                     if dtype == "int8" and np.issubdtype(v.dtype, np.floating)}
    if set(record.keys()) != expected:
        raise ValueError(f"reply keys do not fit a {dtype} encoding of the global arrays")
    out = ArrayRecord()
    for key, reference in global_arrays.items():
        value = record[key].numpy()
        if not np.issubdtype(reference.dtype, np.floating):
            out[key] = Array(value)
            continue
        if value.dtype != wire or value.shape != reference.shape:
            raise ValueError(f"{key}: expected {np.dtype(wire).name} {reference.shape}, got {value.dtype} {value.shape}")
        update = value.astype(np.float32)
        if dtype == "int8":
            scale = record[key + SCALE_SUFFIX].numpy().astype(np.float32)
            if scale.shape != (1,):
                raise ValueError(f"{key}: the int8 scale must hold one value")
            update = update * scale[0]
        out[key] = Array(np.ascontiguousarray((reference.astype(np.float32) + update).astype(reference.dtype)))
    return out
