"""Procedural phantoms: reproducibility, labels, cardiac function, HU ranges, writers."""

import json

import nibabel as nib
import numpy as np
import pytest

from medgen_rt.data import (
    CMR_LABELS,
    CT_LABELS,
    CT_TISSUES,
    contraction_curve,
    make_cine_phantom,
    make_ct_phantom,
    parse_info_cfg,
    subject_seed,
    write_acdc_dataset,
    write_ct_dataset,
)
from medgen_rt.io import read_header

# Small geometries with the default fields of view (144x144x64 mm cine, 102x102x160 mm CT).
CINE = dict(shape=(48, 48, 8), spacing=(3.0, 3.0, 8.0), n_frames=12)
CT = dict(shape=(64, 64, 32), spacing=(5.6, 5.6, 8.0))  # the default field of view, coarser


@pytest.fixture(scope="module")
def cines():
    return [make_cine_phantom(seed, **CINE) for seed in range(6)]


@pytest.fixture(scope="module")
def ct():
    return make_ct_phantom(0, **CT)


def lv_counts(labels):
    return (labels == CMR_LABELS["lv_blood_pool"]).reshape(-1, labels.shape[3]).sum(axis=0)


# --------------------------------------------------------------------------- cine


def test_cine_reproducible_and_seed_dependent(cines):
    again = make_cine_phantom(0, **CINE)
    np.testing.assert_array_equal(again.image, cines[0].image)
    np.testing.assert_array_equal(again.labels, cines[0].labels)
    assert again.es == cines[0].es and again.ejection_fraction == cines[0].ejection_fraction
    assert not np.array_equal(cines[1].labels, cines[0].labels)
    assert not np.allclose(cines[1].image, cines[0].image)


def test_cine_arrays(cines):
    ph = cines[0]
    assert ph.image.shape == (48, 48, 8, 12) and ph.image.dtype == np.float32
    assert ph.labels.shape == ph.image.shape and ph.labels.dtype == np.uint8
    assert np.all(np.isfinite(ph.image)) and ph.image.min() >= 0
    assert set(np.unique(ph.labels)) == {0, 1, 2, 3}
    assert CMR_LABELS == {"rv_blood_pool": 1, "lv_myocardium": 2, "lv_blood_pool": 3}
    assert ph.affine.shape == (4, 4)
    assert np.allclose(np.abs(np.diag(ph.affine)[:3]), (3.0, 3.0, 8.0))
    assert 0.3 / 12 < ph.frame_duration < 1.2 / 12  # 50-100 bpm


def test_cine_ef_ed_es_from_labels(cines):
    for ph in cines:
        counts = lv_counts(ph.labels)
        assert ph.ed == 1
        assert counts[ph.ed - 1] == counts.max()
        assert counts[ph.es - 1] == counts.min()
        assert 0.3 <= (ph.es - 1) / ph.n_frames <= 0.5  # ES about 35-45 % into the cycle
        ef = 100.0 * (counts[ph.ed - 1] - counts[ph.es - 1]) / counts[ph.ed - 1]
        assert ph.ejection_fraction == pytest.approx(ef)
        voxel_ml = np.prod(ph.spacing) / 1000.0
        assert ph.edv_ml == pytest.approx(counts[0] * voxel_ml)
        assert ph.lv_volumes_ml == pytest.approx(counts * voxel_ml)
        assert 25 <= ph.ejection_fraction <= 80
        # smooth periodic cycle: contraction then filling, no jumps back at the wrap-around
        d = np.diff(counts[: ph.es])
        assert np.all(d <= 0)
        assert np.all(np.diff(counts[ph.es - 1:]) >= 0)
    efs = [ph.ejection_fraction for ph in cines]
    assert np.std(efs) > 3.0 and len({round(e, 3) for e in efs}) == len(efs)


def test_cine_anatomy(cines):
    for ph in cines:
        ed, es = ph.labels[..., ph.ed - 1], ph.labels[..., ph.es - 1]
        # myocardium thickens in systole: larger share of the LV epicardial area
        def myo_share(lab):
            myo = (lab == 2).sum()
            return myo / (myo + (lab == 3).sum())
        assert myo_share(es) > myo_share(ed)
        # LV cavity shrinks from base toward apex; the RV crescent is gone at the apex
        cav = (ed == 3).sum(axis=(0, 1))
        assert cav[1] > cav[-2] and cav[-1] <= cav[len(cav) // 2]
        rv = (ed == 1).sum(axis=(0, 1))
        assert rv[0] > 0 and rv[-1] == 0
        # MR-like contrast: bright blood, dark myocardium
        img = ph.image[..., 0]
        assert img[ed == 3].mean() > 2.0 * img[ed == 2].mean()


def test_cine_spacing_preserves_physical_volume():
    a = make_cine_phantom(7)  # defaults: (96, 96, 8) at (1.5, 1.5, 8.0) mm
    b = make_cine_phantom(7, shape=(72, 72, 16), spacing=(2.0, 2.0, 4.0), n_frames=20)
    assert a.image.shape == (96, 96, 8, 20)
    assert b.edv_ml == pytest.approx(a.edv_ml, rel=0.15)
    assert b.ejection_fraction == pytest.approx(a.ejection_fraction, abs=8)


def test_contraction_curve():
    c = contraction_curve(20, 8)
    assert c[0] == 0 and c[8] == pytest.approx(1.0)
    assert np.all((c >= 0) & (c <= 1))
    assert np.all(np.diff(c[:9]) > 0) and np.all(np.diff(c[8:]) < 0)


@pytest.mark.parametrize(
    "kwargs", [dict(shape=(8, 8)), dict(spacing=(1, 0, 1)), dict(n_frames=1), dict(shape=(0, 8, 8))]
)
def test_cine_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_cine_phantom(0, **kwargs)


# --------------------------------------------------------------------------- CT


def test_ct_reproducible_and_seed_dependent(ct):
    again = make_ct_phantom(0, **CT)
    np.testing.assert_array_equal(again.image, ct.image)
    np.testing.assert_array_equal(again.labels, ct.labels)
    other = make_ct_phantom(1, **CT)
    assert not np.array_equal(other.labels, ct.labels)


def test_ct_labels_and_hu(ct):
    assert ct.image.shape == (64, 64, 32) and ct.image.dtype == np.float32
    assert ct.labels.dtype == np.uint8 and ct.tissue.dtype == np.uint8
    assert CT_LABELS == {
        "aorta": 1, "left_atrium": 2, "right_atrium": 3,
        "left_ventricle": 4, "right_ventricle": 5, "myocardium": 6,
    }
    assert set(np.unique(ct.labels)) == set(range(7))
    assert set(np.unique(ct.tissue)) == {0, *CT_TISSUES.values()}
    img = ct.image

    def mean(mask):
        assert mask.sum() > 20
        return float(img[mask].mean())

    assert mean(ct.tissue == CT_TISSUES["lung"]) < -600
    assert mean(ct.labels == CT_LABELS["aorta"]) > 150
    for name in ("left_atrium", "right_atrium", "left_ventricle", "right_ventricle"):
        assert 180 < mean(ct.labels == CT_LABELS[name]) < 400, name
    assert 40 < mean(ct.labels == CT_LABELS["myocardium"]) < 180
    assert mean(ct.tissue == CT_TISSUES["bone"]) > 300
    assert mean(ct.tissue == 0) < -950
    assert -1024 <= img.min() and img.max() <= 3071


def test_ct_spacing_preserves_physical_volume():
    a = make_ct_phantom(4)  # defaults: (128, 128, 64) at (2.8, 2.8, 4.0) mm
    b = make_ct_phantom(4, shape=(80, 80, 40), spacing=(4.48, 4.48, 6.4))  # same field of view
    assert a.image.shape == (128, 128, 64)
    for name in ("left_ventricle", "myocardium", "aorta"):
        va = (a.labels == CT_LABELS[name]).sum() * np.prod(a.spacing)
        vb = (b.labels == CT_LABELS[name]).sum() * np.prod(b.spacing)
        assert vb == pytest.approx(va, rel=0.15), name


def test_ct_other_shape():
    ph = make_ct_phantom(2, shape=(40, 52, 20), spacing=(2.5, 2.0, 8.0))
    assert ph.image.shape == ph.labels.shape == (40, 52, 20)
    assert (ph.labels == CT_LABELS["left_ventricle"]).any()


# --------------------------------------------------------------------------- writers


def test_write_acdc_dataset(tmp_path):
    out = tmp_path / "acdc"
    manifest = write_acdc_dataset(out, 2, seed=3, quiet=True, **CINE)
    assert json.loads((out / "dataset.json").read_text()) == manifest
    assert [s["name"] for s in manifest["subjects"]] == ["patient001", "patient002"]
    for i, subj in enumerate(manifest["subjects"], 1):
        ph = make_cine_phantom(subject_seed(3, i), **CINE)
        d = out / f"patient{i:03d}"
        img4d = nib.load(str(d / f"patient{i:03d}_4d.nii.gz"))
        assert np.allclose(img4d.affine, ph.affine)
        np.testing.assert_array_equal(np.asarray(img4d.dataobj), ph.image)
        h = read_header(d / f"patient{i:03d}_4d.nii.gz")
        assert h.get_data_dtype() == np.float32
        assert float(h["pixdim"][4]) == pytest.approx(ph.frame_duration, rel=1e-6)
        cfg = parse_info_cfg(d / "Info.cfg")
        assert (cfg["ED"], cfg["ES"], cfg["NbFrame"]) == (ph.ed, ph.es, ph.n_frames)
        assert cfg["Group"] in {"NOR", "MINF", "DCM"} and 140 < cfg["Height"] < 210 and cfg["Weight"] > 30
        text = (d / "Info.cfg").read_text().splitlines()
        assert [line.split(":")[0] for line in text] == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
        for frame in (ph.ed, ph.es):
            gt = nib.load(str(d / f"patient{i:03d}_frame{frame:02d}_gt.nii.gz"))
            assert gt.get_data_dtype() == np.uint8
            assert np.allclose(gt.affine, ph.affine)
            np.testing.assert_array_equal(np.asarray(gt.dataobj), ph.labels[..., frame - 1])
            fr = nib.load(str(d / f"patient{i:03d}_frame{frame:02d}.nii.gz"))
            np.testing.assert_array_equal(np.asarray(fr.dataobj), ph.image[..., frame - 1])
        assert (subj["ed"], subj["es"], subj["seed"]) == (ph.ed, ph.es, subject_seed(3, i))
        assert subj["ejection_fraction"] == pytest.approx(ph.ejection_fraction, abs=1e-3)
    # no temporary files left anywhere
    assert not [p for p in out.rglob(".*")]


def test_write_ct_dataset(tmp_path):
    out = tmp_path / "ct"
    manifest = write_ct_dataset(out, 2, seed=5, quiet=True, **CT)
    assert manifest["n"] == 2 and manifest["labels"] == CT_LABELS
    for i in (1, 2):
        ph = make_ct_phantom(subject_seed(5, i), **CT)
        img = nib.load(str(out / "images" / f"ct_{i:03d}.nii.gz"))
        mask = nib.load(str(out / "masks" / f"ct_{i:03d}.nii.gz"))
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, ph.affine) and np.allclose(mask.affine, ph.affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(ph.image))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), ph.labels)
        h = read_header(out / "images" / f"ct_{i:03d}.nii.gz")
        assert float(h["scl_slope"]) == 1.0 and float(h["scl_inter"]) == 0.0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "masks"]
