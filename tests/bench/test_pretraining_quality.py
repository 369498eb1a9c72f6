"""Measured claims of PIR pretraining on the synthetic federation, read from the JSON that
``python benchmarks/experiments/pretraining_quality.py`` writes (run once, as a process).

Default suite, 16^3 volumes, 8 pooled epochs: (a) every loss term is lower in the last round than in
the first, and the held-out reconstruction/contrastive terms and synthesis PSNR improve; (b) after
pretraining, X_h of two modalities of one held-out patient are closer than X_h of two different
patients, and more so (scale-free ratio) than at initialisation.

Scale caveats, measured in docs/results/pretraining_quality.json (32^3, 20 epochs): at this size
the rotation term only falls from its initial value to about chance (ln 4); it is learned later
(0.05 after 20 epochs at 32^3). The invariance term is lowest after two epochs (0.011) and then
creeps up (0.024 after 20) as the other terms shape X_h; the scale-free ratio of (b) keeps falling.
Claim (c), pretrained beats scratch after fine-tuning, needs the larger setting: the slow test.
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path
from typing import Any

import pytest
from benchmark_runs import ROOT, one_line_error, run_benchmark

SCRIPT = "benchmarks/experiments/pretraining_quality.py"
#: Fine-tuning seeds of the tiny run: seed 0 twice, to see that a seed's draw and Dice are reproducible.
SEEDS = (0, 1, 2, 0)
UPSTREAM = {"adapters", "encoder", "fusion"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four heterogeneous sites of 5 patients (2 held out each); 8 pooled pretraining epochs; both arms
    fine-tuned for 2 epochs (lr 1e-2, Dice after each) in both modes, for each of :data:`SEEDS`."""
    out = tmp_path_factory.mktemp("quality") / "pq.json"
    run_benchmark(SCRIPT, "--size", "16", "--sites", "4", "--subjects", "5", "--held-out", "2", "--pretrain-epochs", "8",
                  "--channels", "4,8,16", "--finetune-epochs", "2", "--eval-every", "1", "--labelled", "2",
                  "--finetune-lr", "0.01", "--finetune-seeds", ",".join(map(str, SEEDS)), "--finetune-modes", "frozen,full",
                  "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["command"].startswith(f"python {SCRIPT} --size 16 ") and doc["torch_threads"] == 1
    assert out.with_suffix(".png").stat().st_size > 10_000  # the fine-tuning Dice plot beside it
    return doc


def test_pretraining_lowers_every_loss_term_per_round(result: dict[str, Any]) -> None:
    losses = result["a_pretraining_losses"]
    assert len(losses["rounds"]) == 8
    drops = losses["per_term"]
    assert set(drops) == {"rotation", "contrastive", "reconstruction", "invariance"}
    for term, values in drops.items():
        assert values["first"] == losses["rounds"][0][f"loss_{term}"]
        assert values["last"] == losses["rounds"][-1][f"loss_{term}"]
        assert values["last"] < values["first"], (term, values)
    assert losses["all_terms_lower"] is True


def test_pretraining_improves_held_out_reconstruction_and_contrast(result: dict[str, Any]) -> None:
    """Held-out patients, fixed augmentation seeds. Rotation and the absolute invariance term are
    not asserted here (see the module doc)."""
    before, after = result["a_pretraining_losses"]["held_out"]["init"], result["a_pretraining_losses"]["held_out"]["pretrained"]
    assert after["reconstruction"] < before["reconstruction"], (before, after)
    assert after["contrastive"] < before["contrastive"], (before, after)
    assert after["psnr"] > before["psnr"], (before, after)


@pytest.mark.parametrize("kind", ["pooled", "full"])
def test_invariance_brings_one_patients_modalities_together(result: dict[str, Any], kind: str) -> None:
    at_init, after = result["b_invariance"]["init"][kind], result["b_invariance"]["pretrained"][kind]
    assert after["pairs"] >= 16
    assert after["ratio"] == pytest.approx(after["intra"] / after["inter"])
    assert after["intra"] < after["inter"]
    assert after["ratio"] < at_init["ratio"], (at_init, after)


def test_a_held_out_set_too_small_for_the_invariance_gap_is_refused_in_one_line() -> None:
    """The gap compares two patients' modalities, so each site holds out two patients at least."""
    done = run_benchmark(SCRIPT, "--held-out", "1", expect=2)
    assert "need 2 <= held_out < subjects" in one_line_error(done)


def test_finetune_comparison_pairs_arms_per_seed(result: dict[str, Any]) -> None:
    """The (c) machinery at toy scale: both arms see the same labelled draw per seed (the same again for
    a repeated seed), Dice is recorded at each checkpoint, and the summary is the paired difference over
    seeds."""
    dice = result["c_finetune_dice"]
    per_seed = dice["per_seed"]
    assert [run["seed"] for run in per_seed] == list(SEEDS)
    draws = [tuple(run["labelled_subjects"]) for run in per_seed]
    assert all(len(d) == 2 for d in draws) and draws[3] == draws[0]
    assert len(set(draws[:3])) > 1
    for mode in ("frozen", "full"):
        for run in per_seed:
            for arm in run[mode].values():
                assert list(arm["dice_by_epoch"]) == ["1", "2"]
                assert arm["dice"] == arm["dice_by_epoch"]["2"]
                assert 0.0 <= arm["dice"] <= 1.0
        first, again = ({arm: r["dice_by_epoch"] for arm, r in run[mode].items()} for run in (per_seed[0], per_seed[3]))
        assert again == first  # a seed's fine-tuning is replayable
        summary = dice["by_mode_and_epoch"][mode]
        assert list(summary) == ["1", "2"]
        diffs = [run[mode]["pretrained"]["dice"] - run[mode]["scratch"]["dice"] for run in per_seed]
        assert summary["2"]["difference"] == pytest.approx(statistics.mean(diffs))
        assert summary["2"]["difference_std"] == pytest.approx(statistics.stdev(diffs))
        assert summary["2"]["pretrained_wins"] == sum(d > 0 for d in diffs) / len(diffs)
        assert summary["2"]["scratch"] == pytest.approx(statistics.mean(run[mode]["scratch"]["dice"] for run in per_seed))


def test_frozen_fine_tuning_leaves_the_encoder_untouched(result: dict[str, Any]) -> None:
    """Which top-level modules each fine-tuning moved: the head alone when frozen, upstream too when full."""
    for run in result["c_finetune_dice"]["per_seed"]:
        for arm in ("scratch", "pretrained"):
            frozen, full = set(run["frozen"][arm]["moved"]), set(run["full"][arm]["moved"])
            assert "seg_head" in frozen and not frozen & UPSTREAM, frozen
            assert "seg_head" in full and full & UPSTREAM, full


@pytest.mark.slow
def test_pretrained_encoder_fine_tunes_to_better_dice(tmp_path: Path) -> None:
    """About 30 min on one CPU thread: the command docs/results/pretraining_quality.json records (six label
    draws of 8 patients, the whole network fine-tuned at lr 1e-3). Over the draws, the pretrained
    encoder's held-out Dice after the last fine-tuning epoch beats the scratch encoder's on average
    and in most draws. (At lr 1e-2 the scratch encoder catches up, and frozen pretrained features
    are no better than random ones: docs/results/pretraining_quality_variants/.)"""
    committed = shlex.split(json.loads((ROOT / "docs" / "results" / "pretraining_quality.json").read_text())["command"])
    argv = committed[2:]  # after "python SCRIPT"
    argv[argv.index("--out") + 1] = str(tmp_path / "pq.json")
    run_benchmark(SCRIPT, *argv, timeout=4 * 3600)
    result = json.loads((tmp_path / "pq.json").read_text())
    final = str(result["settings"]["finetune_epochs"])
    assert final == "150" and result["settings"]["finetune_seeds"] == [0, 1, 2, 3, 4, 5]
    for mode, by_epoch in result["c_finetune_dice"]["by_mode_and_epoch"].items():
        assert by_epoch[final]["difference"] > 0, (mode, by_epoch[final])
        assert by_epoch[final]["pretrained_wins"] > 0.5, (mode, by_epoch[final])
