"""The pieces of the DP recipe: declared parameter groups, augmentation multiplicity, the forecast,
and the public warm start with its checksum."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_runs import run_benchmark
from opacus import GradSampleModule

from fedpir.client.site import Site
from fedpir.data.dataset import load_site
from fedpir.models.groups import trainable_groups
from fedpir.models.losses import finetune_losses
from fedpir.models.pir import PIRConfig, PIRNet
from fedpir.models.warm_start import RECORD_NAME, WarmStartError, file_sha256, save_warm_start
from fedpir.privacy.dp import DPConfig, forecast, plan_round
from fedpir.run_config import RunSettings
from fedpir.training.model import build_model
from fedpir.training.trainer import LocalTrainer

SIZE = (16, 16, 16)


@pytest.fixture(scope="module")
def site(small_federation: Path):
    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    dataset, _ = load_site(small_federation / "site-3", vocab, SIZE)
    return vocab, dataset


def make_model(vocab: list[str]) -> PIRNet:
    torch.manual_seed(0)
    return PIRNet(PIRConfig(vocab, spatial_size=SIZE, channels=(4, 8, 16), prior_tokens=4, num_heads=2, proj_dim=8))


def test_a_private_round_changes_only_the_declared_groups(site) -> None:
    vocab, dataset = site
    model = make_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = trainable_groups(RunSettings().finetune_trainable)
    trainer = LocalTrainer(model, dataset, dp=DPConfig(noise_multiplier=1.0, budget_epsilon=50.0), augment_views=2)
    trainer.train_round("segmentation", 1, groups=groups, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    declared = {n for n, _ in model.named_parameters() if model.group_of(n) in groups
                and n.split(".")[0] in ("adapters", "encoder", "fusion", "seg_head")}
    assert changed and changed <= declared
    assert {model.group_of(k) for k in changed} >= {"norms", "prior", "task_out"}
    assert not any(k.startswith(("encoder.down", "decoder.", "seg_head.blocks")) and "adn.N" not in k for k in changed)


@pytest.mark.parametrize("modality_dropout", [0.0, 0.6])
def test_multiplicity_keeps_one_gradient_per_patient(site, modality_dropout: float) -> None:
    """K augmented views of a patient are one DP sample: Opacus sees one per-sample gradient per
    patient, and it equals the gradient of that patient's view-averaged loss computed alone (also
    when views leave modalities out: the draws come from the patient's own stream)."""
    vocab, dataset = site
    model = make_model(vocab)
    model.set_trainable("segmentation")
    batch = {k: torch.stack([dataset[i][k] for i in range(3)]) for k in ("image", "present", "mask")}
    batch["seed"] = torch.tensor([11, 12, 13])
    module = GradSampleModule(model)
    finetune_losses(module, batch, "segmentation", views=3, modality_dropout=modality_dropout)["total"].backward()
    param = model.seg_head.out.weight
    per_patient = param.grad_sample.clone()
    assert per_patient.shape[0] == 3  # patients, not patients x views
    module._close()
    model.zero_grad(set_to_none=True)
    alone = {k: v[1:2] for k, v in batch.items()}
    finetune_losses(model, alone, "segmentation", views=3, modality_dropout=modality_dropout)["total"].backward()
    # Opacus rescales the mean-reduced loss: the per-sample gradient is the patient's own
    assert torch.allclose(per_patient[1], param.grad, atol=1e-6, rtol=1e-4)


def test_modality_dropout_leaves_available_modalities_out_and_keeps_one(site) -> None:
    from fedpir.models.losses import augmented_views

    vocab, dataset = site
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("image", "present", "mask")}
    present = batch["present"].bool()
    seeds = list(range(100, 100 + len(dataset)))
    assert torch.equal(augmented_views(batch, 0, seeds)["present"], present)  # none left out by default
    views = [augmented_views(batch, v, seeds, modality_dropout=0.6) for v in range(8)]
    for view in views:
        kept = view["present"]
        assert kept.any(1).all() and not (kept & ~present).any()  # one kept at least, none invented
        assert (view["image"][~kept] == 0).all() and (view["image"][kept].abs().sum((1, 2, 3)) > 0).all()
    assert sum(int((present & ~view["present"]).sum()) for view in views) > 0
    again = augmented_views(batch, 3, seeds, modality_dropout=0.6)
    assert torch.equal(again["present"], views[3]["present"]) and torch.equal(again["image"], views[3]["image"])
    with pytest.raises(ValueError, match="modality dropout must be in"):
        augmented_views(batch, 0, seeds, modality_dropout=1.0)


def test_forecast_warns_on_the_old_default_and_not_on_the_recipe() -> None:
    old = plan_round(DPConfig(target_epsilon=8.0, planned_rounds=5), n_patients=9, batch_size=4, epochs=1, delta=1e-5)
    assert forecast(old, trained_parameters=400_000, n_patients=9, total_steps=old.steps * 5).fails
    message = forecast(old, trained_parameters=400_000, n_patients=9, total_steps=15).message("site-0")
    assert "expected to learn little" in message and "train fewer parameters" in message
    settings = RunSettings()
    net = build_model(settings)
    trained = sum(p.numel() for p in net.parameters() if p in
                  {q for n, q in net.named_parameters() if n in net.set_trainable("segmentation",
                   trainable_groups(settings.finetune_trainable))})
    plan = plan_round(DPConfig(target_epsilon=8.0, planned_rounds=settings.finetune_rounds), n_patients=9,
                      batch_size=settings.batch_size, epochs=settings.local_epochs, delta=1e-5)
    recipe = forecast(plan, trained_parameters=trained, n_patients=9, total_steps=plan.steps * settings.finetune_rounds)
    assert trained < 10_000 and not recipe.fails and math.isfinite(recipe.ratio)


def test_warm_start_is_checked_loaded_and_recorded_by_the_site(small_federation: Path, tmp_path: Path) -> None:
    settings = RunSettings(volume_size=16, federation_dir=str(small_federation), run_dir=str(tmp_path / "run"),
                           modalities=",".join(json.loads((small_federation / "federation.json").read_text())["modalities"]))
    source = build_model(settings)
    with torch.no_grad():
        source.fusion.prior.tokens.weight.fill_(0.5)
        source.seg_head.out.bias.fill_(-3.0)
    path = tmp_path / "warm.pt"
    sha = save_warm_start(source, path, {"made": "test"})
    assert sha == file_sha256(path)
    warm = RunSettings(**{**settings.__dict__, "warm_start": str(path), "warm_start_sha256": sha})
    site = Site(warm, small_federation / "site-0", tmp_path / "state", "site-0")
    assert torch.equal(site.model.fusion.prior.tokens.weight, source.fusion.prior.tokens.weight)
    assert torch.equal(site.model.seg_head.out.bias, source.seg_head.out.bias)  # local layers too
    assert json.loads((tmp_path / "state" / RECORD_NAME).read_text()) == {"path": str(path), "sha256": sha}
    wrong = RunSettings(**{**warm.__dict__, "warm_start_sha256": "0" * 64})
    with pytest.raises(WarmStartError, match="refusing"):
        Site(wrong, small_federation / "site-0", tmp_path / "state2", "site-0")
    with pytest.raises(WarmStartError, match="must name its SHA-256"):
        Site(RunSettings(**{**warm.__dict__, "warm_start_sha256": ""}), small_federation / "site-0",
             tmp_path / "state3", "site-0")




# local trains every site (about 50 s): slow; its sites build their model as fedpir's do, whose warm
# start tests/simulation/test_federation.py checks at every site
@pytest.mark.parametrize("method", ["centralized", pytest.param("local", marks=pytest.mark.slow)])
def test_every_method_but_scratch_starts_from_the_warm_start(method: str, small_federation: Path, tmp_path: Path) -> None:
    """The baselines start from the same warm start as fedpir: with the encoder frozen by the private
    recipe, their final encoder is the warm start's, bit for bit."""
    from dataclasses import replace

    from fedpir.simulation.runner import method_settings, run_method

    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    settings = RunSettings(volume_size=16, federation_dir=str(small_federation), modalities=",".join(vocab),
                           finetune_rounds=1, run_dir=str(tmp_path))
    warm = build_model(settings)
    with torch.no_grad():
        warm.encoder.stem.conv.weight.mul_(-1.0)  # unlike any random initialisation
    sha = save_warm_start(warm, tmp_path / "warm.pt", {})
    settings = replace(settings, warm_start=str(tmp_path / "warm.pt"), warm_start_sha256=sha)
    run_dir = run_method(method, settings, tmp_path / "out")
    saved = run_dir / ("pooled_model.pt" if method == "centralized" else "sites/site-0/local_state.pt")
    final = torch.load(saved, weights_only=True)
    assert torch.equal(final["encoder.stem.conv.weight"], warm.encoder.stem.conv.weight)
    assert method_settings("scratch", settings, tmp_path).warm_start == ""


def test_a_file_that_is_no_warm_start_is_refused_clearly(tmp_path: Path) -> None:
    from fedpir.models.warm_start import load_warm_start

    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    with pytest.raises(WarmStartError, match="not a warm-start file"):
        load_warm_start(build_model(RunSettings()), junk, file_sha256(junk))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {}}, other)
    with pytest.raises(WarmStartError, match="does not fit this model"):
        load_warm_start(build_model(RunSettings()), other, file_sha256(other))


def recipe_sweep(out: Path, *argv: str) -> str:
    """``benchmarks/experiments/dp_recipe.py --resume --out OUT ARGV`` as a process; its stderr."""
    return run_benchmark("benchmarks/experiments/dp_recipe.py", "--resume", "--out", str(out), *argv).stderr


def test_recipe_sweep_resume_keeps_the_asked_runs_and_runs_nothing_more(tmp_path: Path) -> None:
    """``--resume`` keeps the runs --out holds of the asked configurations and seeds that started from the
    warm start they would use now (default-scratch: none, recorded as ""); the file then holds just them."""
    out = tmp_path / "sweep.json"
    runs = [{"config": "default-scratch", "seed": 0, "dice": 0.5, "warm_start_sha256": ""},
            {"config": "default-scratch", "seed": 1, "dice": 0.7, "warm_start_sha256": ""},
            {"config": "default-scratch", "seed": 2, "dice": 0.1, "warm_start_sha256": "old"},  # a seed not asked
            {"config": "v2-default", "seed": 0, "dice": 0.6, "warm_start_sha256": "abc"}]  # a configuration not asked
    out.write_text(json.dumps({"runs": runs}))
    log = recipe_sweep(out, "--configs", "default-scratch", "--seeds", "0,1")
    assert "resume: 2 runs kept, 0 made from another warm start run again" in log
    doc = json.loads(out.read_text())
    assert doc["runs"] == runs[:2] and doc["warm_starts"] == {}  # nothing ran, no warm start was needed
    assert doc["summary"]["default-scratch"]["seeds"] == 2
    assert doc["summary"]["default-scratch"]["dice_mean"] == pytest.approx(0.6)


@pytest.mark.slow  # builds the public warm starts of seeds 0 and 1 unless ~/.fedpir caches them, and runs twice
def test_recipe_sweep_resumes_only_runs_from_the_warm_start_they_would_use_now(tmp_path: Path) -> None:
    """A run made from another warm start, or that recorded none, runs again; with ``--public-seed-per-run``
    each seed has a warm start of its own, so seed 1's run from seed 0's warm start runs again."""
    from fedpir.simulation.warm_starts import cached_warm_start

    _, shared = cached_warm_start(RunSettings(), 1.0)  # every seed's, without --public-seed-per-run
    out = tmp_path / "sweep.json"
    runs = [{"config": "warm-none", "seed": 0, "dice": 0.5, "warm_start_sha256": shared},
            {"config": "warm-none", "seed": 1, "dice": 0.5}]
    out.write_text(json.dumps({"runs": runs}))
    sweep = ("--configs", "warm-none", "--seeds", "0,1")
    assert "resume: 1 runs kept, 1 made from another warm start run again" in recipe_sweep(out, *sweep)
    kept, again = json.loads(out.read_text())["runs"]
    assert kept == runs[0] and again["seed"] == 1 and again["warm_start_sha256"] == shared and 0 <= again["dice"] <= 1
    assert "resume: 2 runs kept, 0 made" in recipe_sweep(out, *sweep)
    log = recipe_sweep(out, *sweep, "--public-seed-per-run")
    assert "resume: 1 runs kept, 1 made from another warm start run again" in log
    doc = json.loads(out.read_text())
    own = doc["warm_starts"]["1"]["warm:all"]
    assert doc["warm_starts"]["0"]["warm:all"] == shared != own
    assert doc["runs"][0] == runs[0] and doc["runs"][1]["seed"] == 1 and doc["runs"][1]["warm_start_sha256"] == own


def test_public_masks_of_one_modality_train_the_segmentation_on_it_alone(small_federation: Path, tmp_path: Path) -> None:
    """``--segment-modalities flair``: the segmentation epochs see FLAIR only (the other modalities'
    input calibration does not move), and the file says how it was made."""
    from fedpir.models.warm_start import read_warm_start
    from fedpir.training.recipe import WarmStartRecipe
    from fedpir.training.warm_start import build_warm_start

    vocab = json.loads((small_federation / "federation.json").read_text())["modalities"]
    dataset, _ = load_site(small_federation / "site-3", vocab, SIZE)
    only = dataset.with_only(["flair"])
    item = only[0]
    assert item["present"].tolist() == [m == "flair" for m in vocab]
    assert item["image"][[i for i, m in enumerate(vocab) if m != "flair"]].abs().sum() == 0
    with pytest.raises(ValueError, match="subset of"):
        dataset.with_only(["ct"])
    path = tmp_path / "warm.pt"
    recipe = WarmStartRecipe(pretrain_epochs=0, segment_epochs=1, segment_modalities="flair")
    sha = build_warm_start(path, size=16, modalities=",".join(vocab), corpus=small_federation / "site-3", recipe=recipe,
                           device="cpu", progress=False)
    content = read_warm_start(path, sha)
    assert content["meta"]["segment_modalities"] == "flair"
    start = build_model(RunSettings(volume_size=16, modalities=",".join(vocab))).state_dict()
    calibration = content["state_dict"]["adapters.calibration.weight"]
    moved = [m for i, m in enumerate(vocab) if not torch.equal(calibration[i], start["adapters.calibration.weight"][i])]
    assert moved == ["flair"]
