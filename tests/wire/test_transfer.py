"""The transfer encodings of a site's shared weights (fedpir.wire.transfer): what each costs in bytes and
in precision, and that the server refuses what is not a valid encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpir.run_config import RunSettings
from fedpir.wire.protocol import TRANSFER_DTYPES
from fedpir.wire.transfer import SCALE_SUFFIX, decode_reply, encode_reply


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.w": torch.randn(32, 16, 3, 3, 3, generator=g), "prior.p": torch.randn(64, 64, generator=g),
            "steps": torch.tensor([3, 4])}


def trained(received: dict[str, torch.Tensor], scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """One round: the prior moves a little, the encoder stays frozen."""
    g = torch.Generator().manual_seed(7)
    return {**received, "prior.p": received["prior.p"] + scale * torch.randn(64, 64, generator=g)}


def payload(record) -> int:
    return sum(len(a.data) for a in record.values())


@pytest.mark.parametrize("dtype", TRANSFER_DTYPES)
def test_round_trip_precision_and_bytes(dtype: str) -> None:
    received = weights(0)
    sent = trained(received)
    record = encode_reply(sent, received, dtype)
    decoded = decode_reply(record, {k: v.numpy() for k, v in received.items()}, dtype)
    assert set(decoded.keys()) == set(sent)
    out = {k: a.numpy() for k, a in decoded.items()}
    assert out["steps"].dtype == np.int64 and out["steps"].tolist() == [3, 4]
    np.testing.assert_array_equal(out["encoder.w"], received["encoder.w"].numpy())  # untrained: exact
    update = (sent["prior.p"] - received["prior.p"]).numpy()
    error = np.abs(out["prior.p"] - sent["prior.p"].numpy()).max()
    bound = {"float32": 0.0, "float16": np.abs(update).max() * 2.0**-10, "int8": np.abs(update).max() / 254 * 1.001}
    assert error <= bound[dtype] + 1e-7
    fp32 = payload(encode_reply(sent, received, "float32"))
    ratio = payload(record) / fp32
    assert ratio == pytest.approx({"float32": 1.0, "float16": 0.5, "int8": 0.25}[dtype], abs=0.02)  # + npy headers


def test_decode_refuses_what_is_no_encoding() -> None:
    received = weights(0)
    global_arrays = {k: v.numpy() for k, v in received.items()}
    fp32 = encode_reply(trained(received), received, "float32")
    with pytest.raises(ValueError, match="expected float16"):
        decode_reply(fp32, global_arrays, "float16")  # a float32 reply where float16 was agreed
    int8 = encode_reply(trained(received), received, "int8")
    del int8["prior.p" + SCALE_SUFFIX]
    with pytest.raises(ValueError, match="keys"):
        decode_reply(int8, global_arrays, "int8")


def test_run_config_names_the_encoding() -> None:
    assert RunSettings.from_run_config({"transfer-dtype": "int8"}).transfer_dtype == "int8"
    with pytest.raises(ValueError, match="transfer-dtype 'bf16' unknown"):
        RunSettings(transfer_dtype="bf16")


def test_the_shared_weights_of_the_model_cost_what_their_encoding_says() -> None:
    """On the default model's shared keys (many small tensors, each with its own header), the arrays of a
    reply serialized as a SuperNode sends them: float32 within 2% of the raw float32 bytes, float16 half,
    int8 a quarter (the no-engine part of ``python -m benchmarks.cost.communication``)."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedpir.training.model import build_model

    settings = RunSettings(volume_size=16)
    model = build_model(settings)
    state = model.state_dict()
    received = {k: state[k] for k in model.federated_keys(settings.key_policy)}
    sent = {k: v + 1e-3 if v.is_floating_point() else v for k, v in received.items()}
    fp32 = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in received.values())
    ratio = {d: recorddict_to_proto(RecordDict({"arrays": encode_reply(sent, received, d)})).ByteSize() / fp32
             for d in TRANSFER_DTYPES}
    assert 1.0 < ratio["float32"] <= 1.02
    assert ratio["float16"] == pytest.approx(0.5, abs=0.02) and ratio["int8"] == pytest.approx(0.25, abs=0.03)
