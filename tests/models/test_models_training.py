"""Pretraining / fine-tuning losses, the patient privacy unit under Opacus, and evaluation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedpir.models.evaluation import embed, evaluate
from fedpir.models.groups import trainable_groups
from fedpir.models.losses import LossConfig, finetune_losses, level_invariance, pretrain_losses, reconstruction_error
from fedpir.models.pir import PIRConfig, PIRNet

MODALITIES = ["t1", "t2", "flair"]
SIZE = 16
ALL_TERMS = LossConfig(mim=True, anatomical=True)
PRETRAIN_TERMS = ["rotation", "contrastive", "reconstruction", "invariance", "mim", "anatomical"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions on a shared 2-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64() -> Iterator[None]:
    """Exact comparisons of per-patient quantities need double precision (float32 differs ~1e-4)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def make_net(seed: int = 0, modalities: list[str] = MODALITIES) -> PIRNet:
    torch.manual_seed(seed)
    return PIRNet(PIRConfig(modalities, spatial_size=(SIZE,) * 3))


def phantoms(present: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Phantom-like patients: a head sphere with a brighter core, one contrast per modality,
    z-scored, zeros where absent; plus a lesion mask (the core), labels and augmentation seeds."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, SIZE)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    contrasts = [(1.0, 2.0), (2.0, 0.5), (1.5, -1.0)]
    images, masks = [], []
    for row in present:
        centre = (torch.rand(3, generator=g) - 0.5) * 0.4
        radius = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2).sqrt()
        head, core = (radius < 0.8).float(), (radius < 0.35).float()
        vols = []
        for (a, b), has in zip(contrasts, row):
            v = head * a + core * b + 0.05 * torch.randn(radius.shape, generator=g)
            vols.append((v - v.mean()) / v.std() if has else torch.zeros_like(v))
        images.append(torch.stack(vols))
        masks.append(core[None])
    n = len(present)
    return {
        "image": torch.stack(images).to(torch.get_default_dtype()),
        "present": torch.tensor(present, dtype=torch.bool),
        "mask": torch.stack(masks).to(torch.get_default_dtype()),
        "label": torch.arange(n) % 2,
        "seed": torch.arange(n) + 100 * seed,
    }


def patient(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def test_pretrain_losses_finite_with_shared_gradients() -> None:
    net = make_net()
    losses = pretrain_losses(net, phantoms([[1, 1, 0], [1, 0, 1]]), ALL_TERMS)
    assert set(losses) == {*PRETRAIN_TERMS, "total"}
    expected_total = sum(getattr(ALL_TERMS, f"w_{t}") * losses[t] for t in PRETRAIN_TERMS)
    assert torch.allclose(losses["total"], expected_total)
    params = dict(net.named_parameters())
    own_head = {
        "rotation": "rotation_head.linear.weight",
        "contrastive": "projection_head.net.2.weight",
        "reconstruction": "decoder.out.t1.weight",
        "invariance": "fusion.fuse.weight",
        "mim": "decoder.out.t1.weight",
        "anatomical": "projection_head.net.2.weight",
    }
    for term in PRETRAIN_TERMS:
        assert torch.isfinite(losses[term]) and losses[term] > 0, term
        names = ["encoder.stem.conv.weight", "fusion.prior.tokens.weight", own_head[term]]
        grads = torch.autograd.grad(losses[term], [params[n] for n in names], retain_graph=True, allow_unused=True)
        for name, grad in zip(names, grads):
            assert grad is not None and grad.abs().sum() > 0, (term, name)


def test_missing_modality_contributes_nothing() -> None:
    batch = phantoms([[1, 1, 0], [1, 0, 1]])
    net = make_net()
    before = pretrain_losses(net, batch, ALL_TERMS)
    perturbed = dict(batch, image=batch["image"].clone())
    perturbed["image"][0, 2] = torch.randn(SIZE, SIZE, SIZE) * 5  # patient 0 has no flair
    perturbed["image"][1, 1] = torch.randn(SIZE, SIZE, SIZE) * 5  # patient 1 has no t2
    after = pretrain_losses(net, perturbed, ALL_TERMS)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    perturbed["image"][0, 1] += 1.0  # a present modality does count
    assert not torch.equal(pretrain_losses(net, perturbed, ALL_TERMS)["reconstruction"], before["reconstruction"])


def test_reconstruction_error_masks_absent_targets() -> None:
    target = torch.randn(2, 3, 8, 8, 8)
    pred = torch.randn(2, 3, 8, 8, 8)
    present = torch.tensor([[True, False, True], [False, True, True]])
    base = reconstruction_error(pred, target, present, LossConfig())
    moved = target.clone()
    moved[0, 1] += 3.0
    moved[1, 0] -= 3.0
    assert torch.equal(reconstruction_error(pred, moved, present, LossConfig()), base)
    moved[0, 0] += 3.0
    changed = reconstruction_error(pred, moved, present, LossConfig())
    assert changed[0] != base[0] and changed[1] == base[1]


def test_invariance_zero_for_single_modality_patients() -> None:
    net = make_net()
    single = pretrain_losses(net, phantoms([[1, 0, 0], [0, 0, 1]]))
    assert single["invariance"].item() == 0.0
    assert single["reconstruction"] > 0
    assert pretrain_losses(net, phantoms([[1, 0, 0], [0, 1, 1]]))["invariance"] > 0


def test_invariance_covers_every_encoder_level() -> None:
    """The skips that the segmentation head reads are pulled together too, not X_h alone."""
    net = make_net()
    batch = phantoms([[1, 1, 0], [0, 1, 1]])
    encoded = net.encode_available(batch["image"], batch["present"])
    bottleneck = level_invariance({m: [e[0]] for m, e in encoded.items()}, batch["present"])
    every = level_invariance({m: [e[0], *e[1]] for m, e in encoded.items()}, batch["present"])
    assert torch.allclose(pretrain_losses(net, batch)["invariance"], every.mean())
    assert not torch.allclose(every, bottleneck)


@pytest.mark.usefixtures("float64")
def test_losses_decompose_per_patient() -> None:
    """The privacy unit: the batch loss is the mean of the patients' losses computed alone."""
    net = make_net()
    batch = phantoms([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    together = pretrain_losses(net, batch, ALL_TERMS)
    alone = [pretrain_losses(net, patient(batch, i), ALL_TERMS) for i in range(3)]
    for name, value in together.items():
        mean_alone = sum(a[name] for a in alone) / 3
        assert torch.allclose(value, mean_alone, rtol=1e-10, atol=1e-12), name
    for task in ("segmentation", "classification"):
        labelled = dict(batch, label=torch.tensor([1, -1, 0]))
        together_ft = finetune_losses(net, labelled, task)["total"]
        mean_alone = sum(finetune_losses(net, patient(labelled, i), task)["total"] for i in range(3)) / 3
        assert torch.allclose(together_ft, mean_alone, rtol=1e-10, atol=1e-12), task


def test_augmentation_streams_are_deterministic() -> None:
    net = make_net()
    batch = phantoms([[1, 1, 0], [1, 0, 1]])
    del batch["seed"]
    first = pretrain_losses(net, batch, generator=torch.Generator().manual_seed(7))
    again = pretrain_losses(net, batch, generator=torch.Generator().manual_seed(7))
    other = pretrain_losses(net, batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first["total"], again["total"])
    assert not torch.equal(first["contrastive"], other["contrastive"])


def test_bad_batches_are_rejected() -> None:
    net = make_net()
    batch = phantoms([[1, 1, 0]])
    with pytest.raises(KeyError, match="present"):
        pretrain_losses(net, {"image": batch["image"]})
    with pytest.raises(ValueError, match="image must be"):
        pretrain_losses(net, dict(batch, image=batch["image"][:, :2]))
    with pytest.raises(ValueError, match="any modality"):
        pretrain_losses(net, dict(batch, present=torch.zeros(1, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="label must be"):
        finetune_losses(net, dict(batch, label=torch.tensor([5])), "classification")
    with pytest.raises(ValueError, match="unknown task"):
        finetune_losses(net, batch, "detection")


def test_finetune_losses_and_frozen_encoder() -> None:
    net = make_net()
    batch = phantoms([[1, 1, 0], [0, 0, 1]])
    for task, head in (("segmentation", "seg_head.out.weight"), ("classification", "cls_head.linear.weight")):
        net.set_trainable(task)
        loss = finetune_losses(net, batch, task)
        assert set(loss) == {task, "total"} and torch.isfinite(loss["total"])
        loss["total"].backward()
        params = dict(net.named_parameters())
        assert params[head].grad.abs().sum() > 0
        assert params["encoder.stem.conv.weight"].grad.abs().sum() > 0
        assert params["decoder.out.t1.weight"].grad is None
        net.zero_grad(set_to_none=True)
    net.set_trainable("segmentation", trainable_groups("head"))
    finetune_losses(net, batch, "segmentation")["total"].backward()
    assert net.encoder.stem.conv.weight.grad is None and net.seg_head.out.weight.grad is not None
    unlabeled = finetune_losses(net, dict(batch, label=torch.tensor([-1, -1])), "classification")["total"]
    assert unlabeled.item() == 0.0


@pytest.mark.usefixtures("float64")
def test_opacus_per_sample_gradients_are_per_patient() -> None:
    net = make_net()
    net.set_trainable("pretrain")
    assert ModuleValidator.validate(net, strict=True) == []
    batch = phantoms([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    data = TensorDataset(batch["image"], batch["present"], batch["seed"])
    reference = make_net()
    reference.load_state_dict(net.state_dict())
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about the secure RNG and full backward hooks
        module, optimizer, loader = PrivacyEngine().make_private(
            module=net,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=3),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    image, present, seed = next(iter(loader))
    losses = pretrain_losses(module, {"image": image, "present": present, "seed": seed}, ALL_TERMS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses["total"].backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        assert p.grad_sample is not None and p.grad_sample.shape == (3, *p.shape), name
    for i in range(3):
        reference.zero_grad(set_to_none=True)
        pretrain_losses(reference, patient(batch, i), ALL_TERMS)["total"].backward()
        for name, p in reference.named_parameters():
            if name in trainable:
                expected = p.grad if p.grad is not None else torch.zeros_like(p)
                assert torch.allclose(trainable[name].grad_sample[i], expected, rtol=1e-8, atol=1e-10), (i, name)
    before = net.encoder.stem.conv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, net.encoder.stem.conv.weight)


def test_overfitting_lowers_every_term() -> None:
    net = make_net()
    batch = phantoms([[1, 1, 0], [0, 1, 1]])
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        losses = pretrain_losses(net, batch, ALL_TERMS)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    for term in [*PRETRAIN_TERMS, "total"]:
        late = sum(h[term] for h in history[-3:]) / 3
        assert late < history[0][term], (term, history[0][term], late)


def test_evaluate_and_embed_heterogeneous() -> None:
    net = make_net()
    # site trained on t1/t2 only; the evaluation set also holds flair (never seen in training)
    train = phantoms([[1, 1, 0], [1, 1, 0]])
    test = [phantoms([[1, 0, 1], [0, 1, 1]], seed=1), phantoms([[1, 1, 1]], seed=2)]
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(3):
        optimizer.zero_grad()
        pretrain_losses(net, train)["total"].backward()
        optimizer.step()
    metrics = evaluate(net, test)
    pairs = {k.split("/")[1] for k in metrics if k.startswith("psnr/")}
    assert pairs == {f"{s}->{t}" for s in MODALITIES for t in MODALITIES if s != t}
    for key, value in metrics.items():
        if key.startswith("ssim"):
            assert -1.0 <= value <= 1.0, key
        if key.startswith("psnr"):
            assert math.isfinite(value) and value > 0, key
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= metrics["auroc"] <= 1.0
    assert net.training  # evaluate restores the mode
    only_t1 = evaluate(net, test, modalities=["t1", "flair"])
    assert {k.split("/")[1] for k in only_t1 if k.startswith("psnr/")} == {"t1->flair", "flair->t1"}
    assert only_t1["psnr/t1->flair"] == pytest.approx(metrics["psnr/t1->flair"])
    healthy = [dict(b, mask=torch.zeros_like(b["mask"])) for b in test]
    assert math.isnan(evaluate(net, healthy)["dice"])
    assert embed(net, test[0], "flair").shape == (2, net.dim)
    assert embed(net, test[0]).shape == (2, net.dim)


def test_segmentation_overfits_and_dice_follows() -> None:
    """Fine-tuning on a large structure (the head) must reach a high Dice: checks the loss, the
    head and the metric plumbing (sigmoid, threshold, alignment with the mask) together."""
    net = make_net()
    batch = phantoms([[1, 1, 0], [0, 1, 1]])
    t2 = batch["image"][:, 1:2]
    batch["mask"] = (t2 > t2.amin() + 0.5).to(t2.dtype)
    net.set_trainable("segmentation")
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    start = evaluate(net, [batch])["dice"]
    for _ in range(30):
        optimizer.zero_grad()
        finetune_losses(net, batch, "segmentation")["total"].backward()
        optimizer.step()
    assert evaluate(net, [batch])["dice"] > max(0.8, start)


def test_alice_terms_run_on_the_default_grid() -> None:
    """The run-config switches mim/anatomical work at the default 24^3 grid and stride 8 (anatomical
    crops are cut to a multiple of the stride)."""
    from fedpir.models.losses import LossConfig, pretrain_losses

    torch.manual_seed(0)
    net = PIRNet(PIRConfig(["t1", "t2"], spatial_size=(24, 24, 24)))
    batch = {"image": torch.randn(2, 2, 24, 24, 24), "present": torch.tensor([[True, True], [True, False]])}
    losses = pretrain_losses(net, batch, LossConfig(mim=True, anatomical=True), generator=torch.Generator().manual_seed(0))
    assert {"mim", "anatomical"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert losses["anatomical"] > 0 and losses["mim"] > 0
