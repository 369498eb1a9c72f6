"""Synthetic hospital federation: physics contrasts, site effects, determinism, labels, reports, CLI.

Everything is measured on the written NIfTI files (with the written tissue map as ground truth).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedpir.commands import main
from fedpir.data.manifest import load_manifest
from fedpir.synthetic.anatomy import Grid, ProceduralAnatomy
from fedpir.synthetic.federation import generate_federation
from fedpir.synthetic.phantoms import sample_phantom
from fedpir.synthetic.report_text import NORMAL_TEMPLATES
from fedpir.synthetic.scanners import DEFAULT_SUBSETS, MODALITIES, bias_field, make_scanners

CSF, GM, WM, LESION = 1, 2, 3, 4


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _meta(root: Path) -> dict:
    return json.loads((root / "federation.json").read_text())


def _sites(root: Path):
    return [load_manifest(root / site["name"]) for site in _meta(root)["sites"]]


def _background(tissue: np.ndarray) -> np.ndarray:
    """Voxels at least 3 voxels away from tissue (out of reach of thick-slice blur)."""
    return ~ndimage.binary_dilation(tissue > 0, iterations=3)


def test_contrasts_follow_the_signal_equations(small_federation: Path) -> None:
    lesion_means: dict[str, list[tuple[float, float]]] = {m: [] for m in MODALITIES}
    for site in _sites(small_federation):
        for rec in site.subjects:
            tissue = _load(rec.tissue)
            for m, path in rec.images.items():
                img = _load(path).astype(np.float64)
                csf, wm = img[tissue == CSF].mean(), img[tissue == WM].mean()
                if m == "t2":  # partial volume with thick slices (site-3) brings CSF down towards WM
                    assert csf > 1.05 * wm, (rec.subject_id, m, csf, wm)
                if m in ("t1", "flair"):
                    assert csf < 0.8 * wm, (rec.subject_id, m, csf, wm)
                if (tissue == LESION).any():
                    lesion_means[m].append((img[tissue == LESION].mean(), wm))
    flair = np.array(lesion_means["flair"])
    assert len(flair) >= 4
    assert flair[:, 0].mean() > 1.5 * flair[:, 1].mean(), "lesion must be hyperintense on FLAIR"
    t2 = np.array(lesion_means["t2"])
    assert t2[:, 0].mean() > 1.5 * t2[:, 1].mean(), "lesion must be hyperintense on T2w"


def test_nifti_files_share_one_grid(small_federation: Path) -> None:
    meta = _meta(small_federation)
    affine = np.array(meta["affine"])
    assert np.allclose(affine @ [*(np.array(meta["shape"]) - 1) / 2, 1], [0, 0, 0, 1]), "origin at the centre"
    rec = _sites(small_federation)[3].subjects[0]
    for path in [*rec.images.values(), rec.mask, rec.tissue]:
        img = nib.load(path)
        assert img.shape == tuple(meta["shape"])
        assert np.allclose(img.affine, affine)
        assert np.allclose(img.header.get_zooms(), [meta["spacing_mm"]] * 3)
    assert nib.load(rec.images["t1"]).get_data_dtype() == np.float32
    assert nib.load(rec.mask).get_data_dtype() == np.uint8
    assert nib.load(rec.tissue).get_data_dtype() == np.uint8


def test_modality_subsets_are_as_configured(small_federation: Path) -> None:
    meta = _meta(small_federation)
    assert meta["modalities"] == list(MODALITIES)
    for site, expected, manifest in zip(meta["sites"], DEFAULT_SUBSETS, _sites(small_federation)):
        assert site["modalities"] == list(expected) == manifest.modalities
        assert set(site["protocols"]) == set(expected)
        for rec in manifest.subjects:
            written = {p.name.removesuffix(".nii.gz") for p in rec.mask.parent.glob("*.nii.gz")}
            assert written == {*expected, "lesion", "tissue"}
    assert len({tuple(s["modalities"]) for s in meta["sites"]}) == 4


def test_noise_level_per_site_measured_in_background(small_federation: Path) -> None:
    meta = _meta(small_federation)
    configured = [site["noise"] for site in meta["sites"]]
    assert len(set(configured)) == len(configured), "sites must differ in noise"
    for site, manifest in zip(meta["sites"], _sites(small_federation)):
        for rec in manifest.subjects:
            tissue = _load(rec.tissue)
            for path in rec.images.values():
                img = _load(path).astype(np.float64)
                # Rician noise on zero signal has mean sigma * sqrt(pi / 2); sigma = noise x mean brain signal
                measured = img[_background(tissue)].mean() / np.sqrt(np.pi / 2) / img[tissue > 0].mean()
                assert measured == pytest.approx(site["noise"], rel=0.1), (rec.subject_id, path.name)


def _octant_profile(img: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Log mean WM intensity per octant of the volume, relative to the median WM intensity."""
    half = [n // 2 for n in img.shape]
    out = []
    for octant in range(8):
        region = np.zeros_like(wm)
        region[tuple(slice(0, h) if (octant >> a) & 1 == 0 else slice(h, None) for a, h in enumerate(half))] = True
        out.append(np.log(img[wm & region].mean() / np.median(img[wm])))
    return np.array(out)


def test_bias_field_differs_between_sites_as_configured(small_federation: Path) -> None:
    meta = _meta(small_federation)
    shape = tuple(meta["shape"])
    measured, configured = [], []
    for site, manifest in zip(meta["sites"], _sites(small_federation)):
        field = bias_field(shape, [tuple(t) for t in site["bias_terms"]])
        per_image, per_field = [], []
        for rec in manifest.subjects:
            tissue = _load(rec.tissue)
            # pure white matter: away from the lesion, whose partial volume brightens its neighbours
            wm = (tissue == WM) & ~ndimage.binary_dilation(tissue == LESION, iterations=2)
            per_field.append(_octant_profile(field, wm))
            per_image += [_octant_profile(_load(p).astype(np.float64), wm) for p in rec.images.values()]
        measured.append(np.mean(per_image, 0))
        configured.append(np.mean(per_field, 0))
    dist = np.linalg.norm(np.array(measured)[:, None] - np.array(configured)[None], axis=-1)
    for s in range(len(dist)):
        others = np.delete(dist[s], s)
        assert dist[s, s] < 0.5 * others.min(), f"site {s}: low-frequency profile {dist[s]} not its own field"


def test_thick_slices_remove_through_plane_detail() -> None:
    grid = Grid.covering_brain((32, 32, 32))
    phantom = sample_phantom(ProceduralAnatomy(grid.spacing), grid, np.random.default_rng(0), with_lesion=True)
    base = dataclasses.replace(make_scanners(1, [MODALITIES], seed=0)[0], noise=0.0, bias_terms=(), slice_mm=0.0)
    thin = base.acquire(phantom, "t2", np.random.default_rng(1))
    thick = dataclasses.replace(base, slice_mm=3 * grid.spacing).acquire(phantom, "t2", np.random.default_rng(1))

    def energy(img: np.ndarray, axis: int) -> float:
        return float((np.diff(img, axis=axis) ** 2).mean())

    drop_z, drop_x = energy(thick, 2) / energy(thin, 2), energy(thick, 0) / energy(thin, 0)
    assert drop_z < 0.5 and drop_z < 0.6 * drop_x, (drop_z, drop_x)


def test_labels_match_masks_and_classes_are_mixed(small_federation: Path) -> None:
    for manifest in _sites(small_federation):
        labels = []
        for rec in manifest.subjects:
            mask, tissue = _load(rec.mask), _load(rec.tissue)
            assert set(np.unique(mask)) <= {0, 1}
            assert rec.label == int(mask.any())
            assert np.array_equal(mask > 0, tissue == LESION)
            labels.append(rec.label)
        assert labels.count(0) == round(len(labels) / 3), "a third of each site has no lesion"


def test_reports_describe_the_lesion_iff_present(small_federation: Path) -> None:
    for manifest in _sites(small_federation):
        for rec in manifest.subjects:
            mask = _load(rec.mask)
            text = rec.report or ""
            if not mask.any():
                assert text in NORMAL_TEMPLATES
                assert not any(word in text for word in ("mm", "left", "right", "Hyperintense"))
                continue
            assert "lesion" in text and " mm" in text
            centroid_x = (nib.load(rec.mask).affine @ [*np.argwhere(mask).mean(0), 1])[0]
            assert ("left" if centroid_x < 0 else "right") in text
            assert any(r in text for r in ("frontal", "parietal", "temporal", "occipital"))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))}


def test_same_seed_same_bytes_different_seed_different_data(tmp_path: Path) -> None:
    kwargs = {"n_sites": 2, "subjects_per_site": 2, "shape": (24, 24, 24)}
    a = _digest(generate_federation(tmp_path / "a", seed=3, **kwargs))
    b = _digest(generate_federation(tmp_path / "b", seed=3, **kwargs))
    assert a == b and len(a) > 10
    c = generate_federation(tmp_path / "c", seed=4, **kwargs)
    t1_a, t1_c = (_load(root / "site-0" / "sub-000" / "t1.nii.gz") for root in (tmp_path / "a", c))
    assert not np.allclose(t1_a, t1_c)


@pytest.mark.parametrize("anatomy", ["icbm", "procedural"])
def test_anatomy_modes_give_plausible_tissue_fractions(tmp_path: Path, anatomy: str) -> None:
    root = generate_federation(
        tmp_path / anatomy, n_sites=1, subjects_per_site=2, shape=(32, 32, 32), anatomy=anatomy,
        modality_subsets=[["t1"]],
    )
    assert _meta(root)["anatomy"] == anatomy
    tissues = [_load(rec.tissue) for rec in _sites(root)[0].subjects]
    assert not np.array_equal(*tissues), "subjects must differ"
    for tissue in tissues:
        brain = tissue > 0
        assert 0.15 < brain.mean() < 0.5
        fractions = {k: (tissue[brain] == v).mean() for k, v in (("csf", CSF), ("gm", GM), ("wm", WM))}
        assert 0.08 < fractions["csf"] < 0.35, fractions
        assert 0.30 < fractions["gm"] < 0.65, fractions
        assert 0.20 < fractions["wm"] < 0.55, fractions


def test_homogeneous_setting_and_bad_arguments(tmp_path: Path) -> None:
    root = generate_federation(tmp_path / "h", n_sites=2, subjects_per_site=1, shape=(16, 16, 16),
                               modality_subsets=[list(MODALITIES)] * 2)
    assert all(s.modalities == list(MODALITIES) for s in _sites(root))
    with pytest.raises(FileExistsError):
        generate_federation(root, n_sites=1, subjects_per_site=1, shape=(16, 16, 16))
    with pytest.raises(ValueError, match="entries for 2 sites"):
        generate_federation(tmp_path / "x", n_sites=2, modality_subsets=[["t1"]])
    with pytest.raises(ValueError, match="site 0"):
        generate_federation(tmp_path / "x", n_sites=1, modality_subsets=[["t1", "dwi"]])
    with pytest.raises(ValueError, match="anatomy"):
        generate_federation(tmp_path / "x", anatomy="atlas")
    with pytest.raises(ValueError, match="shape"):
        generate_federation(tmp_path / "x", shape=(8, 8, 8))


def test_sites_of_unequal_size(tmp_path: Path) -> None:
    root = generate_federation(tmp_path / "fed", n_sites=3, subjects_per_site=[1, 3], shape=(16, 16, 16), seed=0)
    assert [len(site.subjects) for site in _sites(root)] == [1, 3, 1]
    assert _meta(root)["subjects_per_site"] == [1, 3, 1]
    ids = [rec.subject_id for site in _sites(root) for rec in site.subjects]
    assert len(set(ids)) == len(ids) == 5


def test_cli_writes_loadable_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert main(["synth", "--out", str(out), "--sites", "2", "--subjects", "3", "--size", "24"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "2 sites of 3 subjects" in printed
    for site, expected in zip(_sites(out), DEFAULT_SUBSETS):
        assert len(site.subjects) == 3 and site.modalities == list(expected)
        for rec in site.subjects:
            for path in [*rec.images.values(), rec.mask, rec.tissue]:
                assert path.is_file()
                assert nib.load(path).shape == (24, 24, 24)


def test_heterogeneity_pulls_the_sites_towards_one_scanner(tmp_path: Path) -> None:
    subsets = [DEFAULT_SUBSETS[s % 4] for s in range(4)]
    spread = {h: [s.to_dict() for s in make_scanners(4, subsets, seed=3, heterogeneity=h)] for h in (0.0, 0.5, 1.0)}

    def distinct(h: float, key: str) -> int:
        return len({json.dumps(s[key], sort_keys=True) for s in spread[h]})

    for key in ("noise", "gain", "slice_mm", "bias_terms"):
        assert distinct(1.0, key) > 1 and distinct(0.0, key) == 1, key
    same_protocols = {json.dumps({m: s["protocols"][m] for m in ("t1",) if m in s["protocols"]}) for s in spread[0.0]
                      if "t1" in s["modalities"]}
    assert len(same_protocols) == 1
    # halfway: the noise levels' spread halves around the shared scanner's
    noise = {h: np.array([s["noise"] for s in spread[h]]) for h in (0.5, 1.0)}
    assert np.ptp(noise[0.5]) == pytest.approx(np.ptp(noise[1.0]) / 2, abs=2e-4)
    # written to federation.json; at h = 0 every site's image of one patient differs only by its noise
    fed = generate_federation(tmp_path / "h0", n_sites=2, subjects_per_site=1, shape=(16, 16, 16), seed=0,
                              modality_subsets=[["t1"], ["t1"]], heterogeneity=0.0, anatomy="procedural")
    meta = json.loads((fed / "federation.json").read_text())
    assert meta["heterogeneity"] == 0.0
    assert meta["sites"][0] | {"name": ""} == meta["sites"][1] | {"name": ""}
    with pytest.raises(ValueError, match="heterogeneity must be in"):
        make_scanners(2, subsets[:2], seed=0, heterogeneity=1.5)
