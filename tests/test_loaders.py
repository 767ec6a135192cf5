"""Preprocessing and dataset loaders, including every kind of bad input."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from medgen_rt.data import (
    ACDCDataset,
    DataError,
    VolumeFolder,
    ct_to_unit,
    cycle_frames,
    make_cine_phantom,
    minmax_to_unit,
    parse_info_cfg,
    subject_seed,
    unit_to_ct,
    write_acdc_dataset,
    write_ct_dataset,
)
from medgen_rt.io import write_volume

CINE = dict(shape=(32, 32, 6), spacing=(4.5, 4.5, 10.0), n_frames=10)
CT = dict(shape=(40, 40, 20), spacing=(8.96, 8.96, 12.8))  # the default field of view, coarser


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    write_ct_dataset(root, 3, seed=1, quiet=True, **CT)
    return root


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    write_acdc_dataset(root, 2, seed=2, quiet=True, **CINE)
    return root


@pytest.fixture
def ct_copy(ct_root, tmp_path):
    return shutil.copytree(ct_root, tmp_path / "ct")


@pytest.fixture
def acdc_copy(acdc_root, tmp_path):
    return shutil.copytree(acdc_root, tmp_path / "acdc")


def save_raw(path, array, affine=np.eye(4)):
    """Write with nibabel directly, bypassing write_volume's checks (to make bad files)."""
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- preprocess


def test_ct_to_unit_and_back():
    hu = np.array([-3000, -1000, -500, 0, 250, 1000, 3000], dtype=np.int16)
    x = ct_to_unit(hu)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1, -1, -0.5, 0, 0.25, 1, 1])
    np.testing.assert_allclose(unit_to_ct(x), [-1000, -1000, -500, 0, 250, 1000, 1000])
    np.testing.assert_allclose(unit_to_ct([-2.0, 2.0]), [-1000, 1000])


def test_minmax_to_unit():
    v = np.random.default_rng(0).random((4, 5, 6, 3)) * 700 + 20
    u = minmax_to_unit(v)
    assert u.dtype == np.float32 and u.shape == v.shape
    assert u.min() == pytest.approx(-1) and u.max() == pytest.approx(1)
    np.testing.assert_allclose(u, (v - v.min()) / np.ptp(v) * 2 - 1, atol=1e-6)
    z = minmax_to_unit(np.full((3, 3, 3), 7.0))
    assert z.dtype == np.float32 and not z.any()
    with pytest.raises(ValueError):
        minmax_to_unit(np.array([1.0, np.nan]))


def test_cycle_frames():
    v = np.arange(5, dtype=np.float32)[None, None, None, :] * np.ones((2, 2, 2, 1), np.float32)
    frames = lambda out: out[0, 0, 0].astype(int).tolist()  # noqa: E731
    assert frames(cycle_frames(v, 8)) == [0, 1, 2, 3, 4, 0, 1, 2]          # T < n: repeat
    assert frames(cycle_frames(v, 7, start=3)) == [3, 4, 0, 1, 2, 3, 4]
    assert frames(cycle_frames(v, 5, start=2)) == [2, 3, 4, 0, 1]          # T == n: rotate
    w = np.arange(30, dtype=np.float32).reshape(1, 1, 1, 30)
    assert w.shape[3] == 30 and frames(cycle_frames(w, 3)) == [0, 10, 20]  # T > n: evenly spaced
    assert frames(cycle_frames(w, 4, start=29)) == [29, 6, 14, 21]
    assert cycle_frames(v, 8).shape == (2, 2, 2, 8)
    with pytest.raises(ValueError, match="start"):
        cycle_frames(v, 4, start=5)
    with pytest.raises(ValueError, match="vol4d"):
        cycle_frames(v[..., 0], 4)
    with pytest.raises(ValueError, match="n_frames"):
        cycle_frames(v, 0)


# --------------------------------------------------------------------------- VolumeFolder


def test_volume_folder_ct(ct_root):
    ds = VolumeFolder(ct_root, kind="ct", require_masks=True)
    assert len(ds) == 3 and ds.names == ["ct_001", "ct_002", "ct_003"]
    item = ds[1]
    assert item["name"] == "ct_002" and item["path"] == ct_root / "images" / "ct_002.nii.gz"
    assert item["image"].shape == (40, 40, 20) and item["image"].dtype == np.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["image"].min() == -1.0  # air at -1000 HU
    assert item["mask"].dtype == np.uint8 and set(np.unique(item["mask"])) <= set(range(7))
    assert item["affine"].shape == (4, 4)
    assert ds[-1]["name"] == "ct_003"
    with pytest.raises(IndexError):
        ds[3]
    ds.validate(full=True)
    raw = VolumeFolder(ct_root, normalize=False)[0]["image"]
    assert raw.min() < -900 and raw.max() > 300


def test_volume_folder_flat_mr(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        write_volume(tmp_path / f"mr{i}.nii", rng.random((6, 6, 4, 3)) * 500, kind="mr")
    (tmp_path / ".hidden.tmp.nii.gz").write_bytes(b"temp file of an interrupted writer")
    ds = VolumeFolder(tmp_path, kind="mr")
    assert len(ds) == 2
    item = ds[0]
    assert item["mask"] is None and item["image"].shape == (6, 6, 4, 3)
    assert item["image"].min() == pytest.approx(-1) and item["image"].max() == pytest.approx(1)


def test_volume_folder_empty(tmp_path):
    with pytest.raises(DataError) as exc:
        VolumeFolder(tmp_path)
    assert str(tmp_path) in str(exc.value)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as exc:
        VolumeFolder(tmp_path)
    assert str(tmp_path / "images") in str(exc.value)
    with pytest.raises(DataError, match="not a folder"):
        VolumeFolder(tmp_path / "nope")


def test_truncated_volume_is_reported(ct_copy):
    bad = ct_copy / "images" / "ct_002.nii.gz"
    cut_in_half(bad)
    with pytest.raises(DataError) as exc:
        VolumeFolder(ct_copy)
    assert "ct_002.nii.gz" in str(exc.value) and "truncated" in str(exc.value)
    assert "ct_001" not in str(exc.value)


def test_truncated_mask_is_reported(ct_copy):
    cut_in_half(ct_copy / "masks" / "ct_003.nii.gz")
    with pytest.raises(DataError, match=r"masks/ct_003\.nii\.gz"):
        VolumeFolder(ct_copy)


def test_wrong_rank(ct_copy, tmp_path):
    write_volume(ct_copy / "images" / "ct_004.nii.gz", np.zeros((4, 4, 4, 2)), kind="mr")
    with pytest.raises(DataError) as exc:
        VolumeFolder(ct_copy, kind="ct")
    assert "ct_004.nii.gz" in str(exc.value) and "3D" in str(exc.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    save_raw(flat / "slice.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="slice.nii.gz"):
        VolumeFolder(flat, kind="mr")


def test_nan_volume(ct_copy):
    bad = ct_copy / "images" / "ct_001.nii.gz"
    a = np.zeros((40, 40, 20), np.float32)
    a[3, 3, 3] = np.nan
    save_raw(bad, a)
    ds = VolumeFolder(ct_copy)  # header-only validation cannot see voxel values ...
    with pytest.raises(DataError) as exc:  # ... loading the item does
        ds[0]
    assert "ct_001.nii.gz" in str(exc.value) and "non-finite" in str(exc.value)
    with pytest.raises(DataError, match="ct_001.nii.gz"):
        ds.validate(full=True)


def test_mask_shape_mismatch(ct_copy):
    write_volume(ct_copy / "masks" / "ct_002.nii.gz", np.zeros((40, 40, 19)), kind="label")
    with pytest.raises(DataError) as exc:
        VolumeFolder(ct_copy)
    assert "masks/ct_002.nii.gz" in str(exc.value) and "shape" in str(exc.value)


def test_mask_non_integer(ct_copy):
    save_raw(ct_copy / "masks" / "ct_001.nii.gz", np.full((40, 40, 20), 0.5, np.float32))
    ds = VolumeFolder(ct_copy)
    with pytest.raises(DataError, match=r"ct_001\.nii\.gz: mask has non-integer"):
        ds[0]


def test_missing_mask(ct_copy):
    (ct_copy / "masks" / "ct_003.nii.gz").unlink()
    assert VolumeFolder(ct_copy)[2]["mask"] is None
    with pytest.raises(DataError, match="missing mask for .*ct_003.nii.gz"):
        VolumeFolder(ct_copy, require_masks=True)


def test_all_problems_listed_together(ct_copy):
    cut_in_half(ct_copy / "images" / "ct_001.nii.gz")
    write_volume(ct_copy / "masks" / "ct_003.nii.gz", np.zeros((2, 2, 2)), kind="label")
    with pytest.raises(DataError) as exc:
        VolumeFolder(ct_copy)
    msg = str(exc.value)
    assert "2 problems" in msg and "ct_001.nii.gz" in msg and "ct_003.nii.gz" in msg


# --------------------------------------------------------------------------- ACDC


def test_acdc_dataset(acdc_root):
    ds = ACDCDataset(acdc_root)
    assert len(ds) == 2 and ds.names == ["patient001", "patient002"]
    for i, item in enumerate(ds, 1):
        ph = make_cine_phantom(subject_seed(2, i), **CINE)
        assert (item["ed"], item["es"]) == (ph.ed, ph.es)
        assert item["image"].shape == (32, 32, 6, 10) and item["image"].dtype == np.float32
        assert item["image"].min() == pytest.approx(-1) and item["image"].max() == pytest.approx(1)
        np.testing.assert_array_equal(item["label_ed"], ph.labels[..., ph.ed - 1])
        np.testing.assert_array_equal(item["label_es"], ph.labels[..., ph.es - 1])
        assert np.allclose(item["affine"], ph.affine)
        assert item["frame_duration"] == pytest.approx(ph.frame_duration, rel=1e-6)
        assert item["info"]["NbFrame"] == 10 and item["path"] == acdc_root / f"patient{i:03d}"
    ds.validate(full=True)


def test_acdc_frames(acdc_root):
    full = ACDCDataset(acdc_root)[0]
    cyc = ACDCDataset(acdc_root, n_frames=16)[0]
    assert cyc["image"].shape == (32, 32, 6, 16)
    assert cyc["frame_indices"].tolist() == list(range(10)) + list(range(6))
    np.testing.assert_array_equal(cyc["image"][..., 10], full["image"][..., 0])
    fewer = ACDCDataset(acdc_root, n_frames=5)[0]
    assert fewer["frame_indices"].tolist() == [0, 2, 4, 6, 8]
    ee = ACDCDataset(acdc_root, frames="ed_es")[0]
    assert ee["image"].shape == (32, 32, 6, 2)
    np.testing.assert_array_equal(ee["image"][..., 1], full["image"][..., full["es"] - 1])
    with pytest.raises(ValueError, match="frames"):
        ACDCDataset(acdc_root, frames="es")


def test_acdc_missing_info_key(acdc_copy):
    cfg = acdc_copy / "patient002" / "Info.cfg"
    cfg.write_text("\n".join(l for l in cfg.read_text().splitlines() if not l.startswith("ES")))
    with pytest.raises(DataError) as exc:
        ACDCDataset(acdc_copy)
    assert str(cfg) in str(exc.value) and "ES" in str(exc.value)


@pytest.mark.parametrize(
    "text, what",
    [("ED 1\nES: 4\nNbFrame: 10\n", "Key: value"), ("ED: one\nES: 4\nNbFrame: 10\n", "integer"),
     ("ED: 1\nES: 14\nNbFrame: 10\n", "ES")],
)
def test_acdc_garbled_info(acdc_copy, text, what):
    cfg = acdc_copy / "patient001" / "Info.cfg"
    cfg.write_text(text)
    with pytest.raises(DataError) as exc:
        ACDCDataset(acdc_copy)
    assert str(cfg) in str(exc.value) and what in str(exc.value)


def test_acdc_missing_info_file(acdc_copy):
    (acdc_copy / "patient001" / "Info.cfg").unlink()
    with pytest.raises(DataError, match=r"patient001/Info.cfg: Info.cfg not found"):
        ACDCDataset(acdc_copy)


def test_acdc_nbframe_mismatch(acdc_copy):
    cfg = acdc_copy / "patient001" / "Info.cfg"
    cfg.write_text(cfg.read_text().replace("NbFrame: 10", "NbFrame: 12"))
    with pytest.raises(DataError) as exc:
        ACDCDataset(acdc_copy)
    assert "patient001_4d.nii.gz" in str(exc.value) and "NbFrame: 12" in str(exc.value)


def test_acdc_truncated_and_wrong_rank(acdc_copy):
    cut_in_half(acdc_copy / "patient001" / "patient001_4d.nii.gz")
    write_volume(acdc_copy / "patient002" / "patient002_4d.nii.gz", np.zeros((32, 32, 6)), kind="mr")
    with pytest.raises(DataError) as exc:
        ACDCDataset(acdc_copy)
    msg = str(exc.value)
    assert "patient001_4d.nii.gz" in msg and "truncated" in msg
    assert "patient002_4d.nii.gz" in msg and "4D" in msg


def test_acdc_label_problems(acdc_copy):
    gt = sorted((acdc_copy / "patient001").glob("*_gt.nii.gz"))[0]
    write_volume(gt, np.zeros((32, 32, 5)), kind="label")
    with pytest.raises(DataError, match=gt.name):
        ACDCDataset(acdc_copy)
    save_raw(gt, np.full((32, 32, 6), 1.5, np.float32))
    ds = ACDCDataset(acdc_copy)
    with pytest.raises(DataError, match="non-integer"):
        ds[0]


def test_acdc_nan_image(acdc_copy):
    p = acdc_copy / "patient002" / "patient002_4d.nii.gz"
    a = np.ones((32, 32, 6, 10), np.float32)
    a[0, 0, 0, 0] = np.inf
    save_raw(p, a)
    ds = ACDCDataset(acdc_copy)
    with pytest.raises(DataError, match="patient002_4d.nii.gz: contains 1 non-finite"):
        ds[1]


def test_acdc_no_patients(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError) as exc:
        ACDCDataset(tmp_path)
    assert str(tmp_path) in str(exc.value) and "patient" in str(exc.value)


def test_parse_info_cfg_types(tmp_path):
    p = tmp_path / "Info.cfg"
    p.write_text("ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
    assert parse_info_cfg(p) == {"ED": 1, "ES": 12, "Group": "DCM", "Height": 184.0, "NbFrame": 30, "Weight": 95.0}
