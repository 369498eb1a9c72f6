"""PIR network: shapes, configuration checks, the shared/local split and the state helpers."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedpir.models.groups import PARAMETER_GROUPS, TRAINABLE_PRESETS, trainable_groups
from fedpir.models.pir import NORM_TYPES, PIRConfig, PIRNet, unwrap

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
    x_h2, skips, evidence = net.encode_levels(x, 1)
    assert torch.equal(x_h, x_h2) and [s.shape[1] for s in skips] == [8, 16, 32]
    assert evidence.shape == (2, 1, *SIZE)
    assert net.segment(x_h, skips, evidence).shape == (2, 1, *SIZE)
    with pytest.raises(ValueError, match="skip features"):
        net.segment(x_h, skips[:1], evidence)
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
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PIRConfig(MODALITIES, **{"spatial_size": SIZE, **kwargs})


def test_config_rejects_duplicate_modalities() -> None:
    with pytest.raises(ValueError, match="unique"):
        PIRConfig(["t1", "t1"], (16, 16, 16))


def test_modality_adapters_start_as_identity() -> None:
    net = make_net()
    x = torch.randn(2, 1, *SIZE)
    assert torch.equal(net.adapters(x, 2), x)
    with torch.no_grad():
        net.adapters.calibration.weight[2] = torch.tensor([2.0, 1.0])
    assert torch.allclose(net.adapters(x, 2), 2 * x + 1)
    assert torch.equal(net.adapters(x, 0), x)


def test_split_covers_every_key_exactly_once() -> None:
    groups = make_net().key_groups()
    shared, local, heads = groups.shared, groups.local, groups.task_heads
    assert len(shared + local + heads) == len(set(shared) | set(local) | set(heads))
    assert set(shared) | set(local) | set(heads) == set(make_net().state_dict())


def test_split_locality() -> None:
    net = make_net()
    groups = net.key_groups()
    shared, local = set(groups.shared), set(groups.local)
    norm_keys = {
        f"{path}.{name}" for path, module in net.named_modules() if isinstance(module, NORM_TYPES)
        for name, _ in module.named_parameters()
    }
    assert norm_keys and norm_keys <= local
    assert "adapters.calibration.weight" in local
    head_keys = {k for k in net.state_dict() if k.startswith(("seg_head.", "cls_head."))}
    assert head_keys and not head_keys & shared
    for prefix in ("encoder.", "fusion.prior.", "fusion.attention.", "fusion.transform.", "fusion.fuse.", "decoder.",
                   "rotation_head.", "projection_head."):
        assert any(k.startswith(prefix) for k in shared), prefix
    assert "encoder.stem.conv.weight" in shared and "fusion.prior.tokens.weight" in shared
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_unwrap_opacus() -> None:
    net = make_net()
    wrapped = GradSampleModule(net)
    assert unwrap(wrapped) is net
    assert all(k.startswith("_module.") for k in wrapped.state_dict())
    with pytest.raises(TypeError):
        unwrap(nn.Linear(2, 2))


def test_parameter_groups_cover_every_parameter() -> None:
    net = make_net()
    groups = {name: net.group_of(name) for name, _ in net.named_parameters()}
    assert set(groups.values()) == set(PARAMETER_GROUPS)
    assert groups["fusion.prior.tokens.weight"] == "prior"
    assert groups["encoder.stem.conv.weight"] == "encoder"
    assert {g for n, g in groups.items() if n.startswith(("seg_head.", "cls_head."))} == {"task_head", "task_out", "norms"}
    assert {n for n, g in groups.items() if g == "task_out"} == {
        "seg_head.out.weight", "seg_head.out.bias", "cls_head.linear.weight", "cls_head.linear.bias"}
    norm_params = {n for n in groups if n.rsplit(".", 1)[0] in net.norm_paths}
    assert {groups[n] for n in norm_params} == {"norms"}


def test_set_trainable_per_objective_and_groups() -> None:
    net = make_net()
    net.set_trainable("pretrain")
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "encoder", "fusion", "decoder", "rotation_head", "projection_head"}
    trained = net.set_trainable("segmentation", trainable_groups("head"))
    assert {n.split(".")[0] for n in trained} == {"seg_head"}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == set(trained)
    assert net.set_trainable("segmentation", ("task_out",)) == ["seg_head.out.weight", "seg_head.out.bias"]
    trained = net.set_trainable("segmentation", trainable_groups("norms,prior"))
    assert trained and all(net.group_of(n) in ("norms", "prior") for n in trained)
    assert not any(n.startswith("decoder.") for n in trained), "the decoder is not used by segmentation"
    with pytest.raises(ValueError, match="unknown objective"):
        net.set_trainable("detection")
    with pytest.raises(ValueError, match="use a preset"):
        trainable_groups("encoder,heads")
    assert trainable_groups("all") == TRAINABLE_PRESETS["all"]


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
    heads = {k: net.modality_of_key(k) for k in net.key_groups().shared if net.modality_of_key(k)}
    assert set(heads.values()) == set(MODALITIES)
    assert all(k.startswith(f"decoder.out.{m}.") for k, m in heads.items())
    assert net.modality_of_key("encoder.blocks.0.conv.weight") is None


def test_lesion_probe_starts_silent_is_shared_and_per_modality() -> None:
    """Zero-initialised, the probe leaves the head's segmentation as it is; its keys are shared (the federation
    pools them) and form the "probe" group; each modality has its own weights."""
    net = make_net()
    x = torch.randn(2, 1, *SIZE)
    x_h, skips, evidence = net.encode_levels(x, 1)
    assert torch.equal(evidence, torch.zeros_like(evidence))
    assert torch.equal(net.segment(x_h, skips, evidence), net.seg_head(x_h, skips))
    keys = [k for k in net.state_dict() if k.startswith("lesion_probe.")]
    assert keys and set(keys) <= set(net.key_groups().shared)
    assert {net.group_of(n) for n, _ in net.named_parameters() if n.startswith("lesion_probe.")} == {"probe"}
    assert set(net.set_trainable("segmentation", ("probe",))) == {"lesion_probe.linear.weight", "lesion_probe.linear.bias"}
    with torch.no_grad():
        net.lesion_probe.linear.weight[2].fill_(1.0)  # modality 2's weights only
    assert torch.equal(net.encode_levels(x, 1).evidence, evidence)
    assert net.encode_levels(x, 2).evidence.abs().sum() > 0
