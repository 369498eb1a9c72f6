"""PIR network: shapes, configuration checks, the shared/local split and the state helpers."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedpir.models.pir import NORM_TYPES, PIRConfig, PIRNet, load_shared_state, shared_state, unwrap

MODALITIES = ["t1", "t2", "flair"]
SIZE = (16, 16, 16)


def make_net(seed: int = 0, **kwargs) -> PIRNet:
    torch.manual_seed(seed)
    return PIRNet(PIRConfig(MODALITIES, spatial_size=SIZE, **kwargs))


def test_forward_shapes() -> None:
    net = make_net()
    x = torch.randn(2, 1, *SIZE)
    x_h = net.encode(x, 1)
    assert x_h.shape == (2, 64, 2, 2, 2)
    assert net.decode(x_h).shape == (2, 3, *SIZE)
    x_h2, skips = net.encode_levels(x, 1)
    assert torch.equal(x_h, x_h2) and [s.shape[1] for s in skips] == [8, 16, 32]
    assert net.segment(x_h, skips).shape == (2, 1, *SIZE)
    with pytest.raises(ValueError, match="skip features"):
        net.segment(x_h)
    assert net.classify(x_h).shape == (2, 2)
    assert net.rotation_head(x_h).shape == (2, 4)
    assert net.projection_head(x_h).shape == (2, 32, 2, 2, 2)


def test_encode_rejects_bad_input() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="encode expects"):
        net.encode(torch.randn(2, 3, *SIZE), 0)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        net.modality_index("ct")
    with pytest.raises(IndexError):
        net.encode(torch.randn(2, 1, *SIZE), 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_size": (20, 16, 16)}, "divisible"),
        ({"backbone": "vit"}, "unknown backbone"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PIRConfig(MODALITIES, **{"spatial_size": SIZE, **kwargs})


def test_config_rejects_duplicate_modalities() -> None:
    with pytest.raises(ValueError, match="unique"):
        PIRConfig(["t1", "t1"])


def test_modality_adapters_start_as_identity() -> None:
    net = make_net()
    x = torch.randn(2, 1, *SIZE)
    assert torch.equal(net.adapters(x, 2), x)
    with torch.no_grad():
        net.adapters.calibration.weight[2] = torch.tensor([2.0, 1.0])
    assert torch.allclose(net.adapters(x, 2), 2 * x + 1)
    assert torch.equal(net.adapters(x, 0), x)


@pytest.mark.parametrize("include_task_heads", [False, True])
def test_split_covers_every_key_exactly_once(include_task_heads: bool) -> None:
    net = make_net()
    shared = net.shared_keys(include_task_heads)
    local = net.local_keys(include_task_heads)
    assert len(shared) == len(set(shared)) and len(local) == len(set(local))
    assert not set(shared) & set(local)
    assert set(shared) | set(local) == set(net.state_dict())


def test_split_locality() -> None:
    net = make_net()
    shared, local = set(net.shared_keys()), set(net.local_keys())
    norm_keys = {
        f"{path}.{name}" for path, module in net.named_modules() if isinstance(module, NORM_TYPES) for name, _ in module.named_parameters()
    }
    assert norm_keys and norm_keys <= local
    assert "adapters.calibration.weight" in local
    head_keys = {k for k in net.state_dict() if k.startswith(("seg_head.", "cls_head."))}
    assert head_keys <= local
    for prefix in ("encoder.", "fusion.prior.", "fusion.attention.", "fusion.transform.", "fusion.fuse.", "decoder.", "rotation_head.", "projection_head."):
        assert any(k.startswith(prefix) for k in shared), prefix
    assert "encoder.stem.conv.weight" in shared and "fusion.prior.tokens.weight" in shared
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    # shared task heads: their convs/linears move to shared, their norms stay local
    shared_heads = set(net.shared_keys(include_task_heads=True)) - shared
    assert shared_heads == {k for k in head_keys if k not in norm_keys}
    assert "cls_head.linear.weight" in shared_heads


def test_load_shared_state_copies_only_shared() -> None:
    source, target = make_net(0), make_net(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)  # make local parameters distinguishable (norm weights start equal)
    local_before = {k: v.clone() for k, v in target.state_dict().items() if k in set(target.local_keys())}
    load_shared_state(target, shared_state(source))
    state = target.state_dict()
    for k, v in shared_state(source).items():
        assert torch.equal(state[k], v)
    for k, v in local_before.items():
        assert torch.equal(state[k], v)


def test_shared_state_is_a_copy() -> None:
    net = make_net()
    state = shared_state(net)
    state["encoder.stem.conv.weight"].add_(1.0)
    assert not torch.equal(net.state_dict()["encoder.stem.conv.weight"], state["encoder.stem.conv.weight"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("decoder.out.t1.weight"), "missing"),
        (lambda s: s.__setitem__("adapters.calibration.weight", torch.zeros(3, 2)), "unexpected"),
        (lambda s: s.__setitem__("fusion.prior.tokens.weight", torch.zeros(5, 64)), "wrong shape"),
    ],
)
def test_load_shared_state_errors(edit, message: str) -> None:
    source, target = make_net(0), make_net(1)
    state = shared_state(source)
    edit(state)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_shared_state(target, state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_helpers_unwrap_opacus() -> None:
    net = make_net()
    wrapped = GradSampleModule(net)
    assert unwrap(wrapped) is net
    assert all(k.startswith("_module.") for k in wrapped.state_dict())
    assert shared_state(wrapped).keys() == shared_state(net).keys()
    load_shared_state(wrapped, shared_state(make_net(3)))
    with pytest.raises(TypeError):
        unwrap(nn.Linear(2, 2))


def test_freeze_encoder_and_stages() -> None:
    net = make_net()
    net.freeze_encoder(True)
    for name, p in net.named_parameters():
        assert p.requires_grad == (not name.startswith(("adapters.", "encoder.", "fusion."))), name
    net.freeze_encoder(False)
    assert all(p.requires_grad for p in net.parameters())
    net.set_stage("pretrain")
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "encoder", "fusion", "decoder", "rotation_head", "projection_head"}
    net.set_stage("segmentation", frozen_encoder=True)
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"seg_head"}
    with pytest.raises(ValueError, match="unknown stage"):
        net.set_stage("detection")


def test_swinunetr_backbone_smoke() -> None:
    pytest.importorskip("einops", reason="MONAI's Swin transformer needs einops")
    torch.manual_seed(0)
    net = PIRNet(PIRConfig(["t1", "t2"], spatial_size=(32, 32, 32), channels=(6,), backbone="swinunetr"))
    assert not net.dp_compatible
    x_h = net.encode(torch.randn(1, 1, 32, 32, 32), 0)
    assert x_h.shape == (1, 96, 1, 1, 1)
    assert net.decode(x_h).shape == (1, 2, 32, 32, 32)
    shared, local = net.shared_keys(), net.local_keys()
    assert set(shared) | set(local) == set(net.state_dict()) and not set(shared) & set(local)
    assert any(".norm" in k for k in local)


def test_federated_keys_per_policy() -> None:
    net = make_net()
    groups, every = net.key_groups(), set(net.state_dict())
    assert net.federated_keys("fedpir") == groups.shared
    assert set(net.federated_keys("fedavg")) == every
    fedbn = set(net.federated_keys("fedbn"))
    assert groups.norms and not fedbn & set(groups.norms) and fedbn | set(groups.norms) == every
    fedper = set(net.federated_keys("fedper"))
    assert not any(k.startswith(("seg_head.", "cls_head.")) for k in fedper)
    assert set(groups.shared) < fedper
    assert net.federated_keys("local") == []
    with pytest.raises(ValueError, match="unknown key policy"):
        net.federated_keys("everything")


def test_modality_of_key_names_each_decoder_head() -> None:
    net = make_net()
    heads = {k: net.modality_of_key(k) for k in net.shared_keys() if net.modality_of_key(k)}
    assert set(heads.values()) == set(MODALITIES)
    assert all(k.startswith(f"decoder.out.{m}.") for k, m in heads.items())
    assert net.modality_of_key("encoder.blocks.0.conv.weight") is None
