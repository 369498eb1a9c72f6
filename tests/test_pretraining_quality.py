"""Measured claims of PIR pretraining on the synthetic federation (benchmarks/pretraining_quality.py).

Default suite, 16^3 volumes, 8 pooled epochs: (a) every loss term is lower in the last round than in
the first, and the held-out reconstruction/contrastive terms and synthesis PSNR improve; (b) after
pretraining, X_h of two modalities of one held-out patient are closer than X_h of two different
patients, and more so (scale-free ratio) than at initialisation.

Scale caveats, measured in docs/results/pretraining_quality.json (32^3, 20 epochs): at this size
the rotation term only falls from its initial value to about chance (ln 4); it is learned later
(0.04 after 20 epochs at 32^3). The absolute invariance term falls here but *rises* over a long
run because X_h grows in scale; the scale-free ratio of (b) keeps improving.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.data import Subset

SIZE = 16
SMALL_CHANNELS = (4, 8, 16)


def _load_benchmark() -> ModuleType:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_quality.py"
    spec = importlib.util.spec_from_file_location("pretraining_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pq = _load_benchmark()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on the shared 2-core machine two threads were up to 10x slower under load
    (docs/results/training_speed.json), and one thread keeps the float sums reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    """Four heterogeneous sites of 5 patients (2 held out each); 8 pooled pretraining epochs."""
    fed = pq.generate_federation(tmp_path_factory.mktemp("quality"), n_sites=4, subjects_per_site=5,
                                 shape=(SIZE,) * 3, seed=0)
    vocab, train, test = pq.split_federation(fed, SIZE, held_out=2)
    settings = pq.Settings(size=SIZE, subjects=5, held_out=2, pretrain_epochs=8, channels=SMALL_CHANNELS)
    init = pq.make_model(vocab, SIZE, SMALL_CHANNELS, seed=0)
    model = copy.deepcopy(init)
    rounds = pq.pretrain(model, train, settings.pretrain_epochs, settings)
    return init, model, rounds, test


def test_pretraining_lowers_every_loss_term_per_round(pretrained) -> None:
    _, _, rounds, _ = pretrained
    drops = pq.loss_drops(rounds)
    assert set(drops) == {"rotation", "contrastive", "reconstruction", "invariance"}
    for term, values in drops.items():
        assert values["last"] < values["first"], (term, values)


def test_pretraining_improves_held_out_reconstruction_and_contrast(pretrained) -> None:
    """Held-out patients, fixed augmentation seeds. Rotation and the absolute invariance term are
    not asserted here (see the module doc)."""
    init, model, _, test = pretrained
    before, after = pq.held_out_losses(init, test), pq.held_out_losses(model, test)
    assert after["reconstruction"] < before["reconstruction"], (before, after)
    assert after["contrastive"] < before["contrastive"], (before, after)
    assert after["psnr"] > before["psnr"], (before, after)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "full"])
def test_invariance_brings_one_patients_modalities_together(pretrained, pooled: bool) -> None:
    init, model, _, test = pretrained
    at_init, after = pq.invariance_gap(init, test, pooled), pq.invariance_gap(model, test, pooled)
    assert after["pairs"] >= 16
    assert after["intra"] < after["inter"]
    assert after["ratio"] < at_init["ratio"], (at_init, after)


def test_invariance_gap_rejects_single_modality_patients(pretrained) -> None:
    init, _, _, test = pretrained
    with pytest.raises(ValueError, match="invariance gap is undefined"):
        pq.invariance_gap(init, Subset(test, [0]))


@pytest.mark.slow
def test_pretrained_encoder_fine_tunes_to_better_dice(tmp_path: Path) -> None:
    """~12 min, the setting of docs/results/pretraining_quality.json. Measured there (U-Net style
    head on encoder skips, 8 labelled patients, 11 held-out lesion patients, one seed): Dice 0.728
    pretrained vs 0.631 scratch with the paper's plain invariance loss, but 0.606 vs 0.631 with the
    scale-relative invariance loss now in fedpir.models.losses, so this currently FAILS: the
    pretraining benefit is not robust (open in the model issue)."""
    settings = pq.Settings(**pq.SLOW_TEST_SETTINGS)
    result = pq.run(settings, tmp_path)
    dice = result["c_finetune_dice"]
    assert dice["pretrained"]["dice"] > dice["scratch"]["dice"], dice
