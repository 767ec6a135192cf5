"""NIfTI and JSON sidecar I/O: round trips, header fields, atomic writes, error messages."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen_rt.io import (
    NiftiError,
    atomic_folder,
    atomic_path,
    read_header,
    read_info,
    read_json,
    read_volume,
    sidecar_path,
    split_suffix,
    write_json_atomic,
    write_volume,
)
import medgen_rt.io.nifti as nifti_mod


def oblique_affine(spacing=(0.7, 0.9, 2.5), flip=False):
    """Rotation about a tilted axis, non-unit anisotropic spacing, a translation."""
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag(spacing)
    if flip:
        m[:3, 0] *= -1
    m[:3, 3] = [12.5, -40.0, 7.25]
    return m


def raw_header(path):
    return read_header(path)


def folder_entries(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.mark.parametrize("flip", [False, True])
def test_ct_3d_round_trip(tmp_path, flip):
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 600, size=(9, 10, 11)).astype(np.float32)
    hu[0, 0, 0] = 50_000  # beyond int16: clipped
    aff = oblique_affine(flip=flip)
    path = write_volume(tmp_path / "sub" / "ct.nii.gz", hu, affine=aff, kind="ct")
    assert path == tmp_path / "sub" / "ct.nii.gz" and path.is_file()

    vol = read_volume(path)
    expected = np.clip(np.rint(hu), -32768, 32767)
    assert vol.array.dtype == np.float32 and vol.array.shape == hu.shape
    np.testing.assert_array_equal(vol.array, expected)
    assert np.allclose(vol.affine, aff, atol=1e-5)
    assert np.allclose(vol.spacing, (0.7, 0.9, 2.5), atol=1e-5)
    assert vol.frame_duration is None

    h = raw_header(path)
    assert h.get_data_dtype() == np.int16
    assert float(h["scl_slope"]) == 1.0 and float(h["scl_inter"]) == 0.0
    assert int(h["sform_code"]) == 1 and int(h["qform_code"]) == 1
    assert np.allclose(h.get_sform(), h.get_qform(), atol=1e-5)
    assert np.allclose(h.get_qform(), aff, atol=1e-5)
    assert h.get_xyzt_units() == ("mm", "sec")
    # nibabel's own reader agrees
    img = nib.load(str(path))
    assert np.allclose(img.affine, aff, atol=1e-5)
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0


def test_ct_integer_input_round_trip(tmp_path):
    hu = np.arange(-1000, 1000, 4, dtype=np.int32)[: 5 * 5 * 4].reshape(5, 5, 4)
    vol = read_volume(write_volume(tmp_path / "ct.nii", hu, spacing=(0.5, 0.5, 1.0), kind="ct"))
    np.testing.assert_array_equal(vol.array, hu)
    assert raw_header(tmp_path / "ct.nii").get_data_dtype() == np.int16


def test_mr_4d_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    cine = rng.random((8, 7, 3, 5)).astype(np.float32) * 900
    aff = oblique_affine((1.4, 1.4, 8.0))
    path = write_volume(tmp_path / "cine.nii.gz", cine, affine=aff, kind="mr", frame_duration=0.045)
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, cine)
    assert np.allclose(vol.affine, aff, atol=1e-5)
    assert vol.n_frames == 5
    assert vol.frame_duration == pytest.approx(0.045, rel=1e-6)
    h = raw_header(path)
    assert h.get_data_dtype() == np.float32
    assert np.allclose(h.get_sform(), h.get_qform(), atol=1e-5)
    assert float(h["pixdim"][4]) == pytest.approx(0.045)
    assert int(h["sform_code"]) == 1 and int(h["qform_code"]) == 1


def test_mr_4d_without_frame_duration(tmp_path):
    path = write_volume(tmp_path / "c.nii.gz", np.ones((3, 3, 2, 4)), spacing=(2, 2, 5))
    vol = read_volume(path)
    assert vol.frame_duration is None
    np.testing.assert_allclose(vol.affine, np.diag([2.0, 2.0, 5.0, 1.0]))


def test_labels_dtype_and_checks(tmp_path):
    lab = np.zeros((4, 4, 4), dtype=np.int64)
    lab[1, 1, 1] = 3
    p = write_volume(tmp_path / "l.nii.gz", lab, kind="label")
    h = raw_header(p)
    assert h.get_data_dtype() == np.uint8 and h.get_intent()[0] == "label"
    np.testing.assert_array_equal(read_volume(p, dtype=np.uint8).array, lab)
    big = lab.copy()
    big[0, 0, 0] = 300
    assert raw_header(write_volume(tmp_path / "b.nii.gz", big, kind="label")).get_data_dtype() == np.int16
    with pytest.raises(ValueError, match="array"):
        write_volume(tmp_path / "f.nii.gz", lab + 0.5, kind="label")
    with pytest.raises(ValueError, match="array"):
        write_volume(tmp_path / "n.nii.gz", lab - 1, kind="label")
    assert not (tmp_path / "f.nii.gz").exists() and not (tmp_path / "n.nii.gz").exists()
    # float labels with integer values are fine
    np.testing.assert_array_equal(
        read_volume(write_volume(tmp_path / "g.nii.gz", lab.astype(np.float32), kind="label")).array, lab
    )


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(array=np.full((3, 3, 3), np.nan)), "array"),
        (dict(array=np.array([[[1.0, np.inf]]])), "array"),
        (dict(array=np.zeros((3, 3))), "array"),
        (dict(array=np.zeros((2, 2, 2, 2, 2))), "array"),
        (dict(array=np.zeros((3, 3, 3)), affine=np.eye(3)), "affine"),
        (dict(array=np.zeros((3, 3, 3)), affine=np.diag([1.0, 0.0, 1.0, 1.0])), "affine"),
        (dict(array=np.zeros((3, 3, 3)), affine=np.full((4, 4), np.nan)), "affine"),
        (dict(array=np.zeros((3, 3, 3)), spacing=(1.0, -1.0, 1.0)), "spacing"),
        (dict(array=np.zeros((3, 3, 3)), spacing=(1, 1, 1), affine=np.diag([2.0, 2, 2, 1])), "spacing"),
        (dict(array=np.zeros((3, 3, 3)), kind="pet"), "kind"),
        (dict(array=np.zeros((3, 3, 3)), frame_duration=0.1), "frame_duration"),
        (dict(array=np.zeros((3, 3, 3, 2)), frame_duration=-1.0), "frame_duration"),
    ],
)
def test_write_errors_name_the_argument(tmp_path, kwargs, arg):
    with pytest.raises(ValueError) as exc:
        write_volume(tmp_path / "x.nii.gz", **kwargs)
    assert str(exc.value).startswith(arg + ":")
    assert folder_entries(tmp_path) == []


def test_write_rejects_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match="^path:"):
        write_volume(tmp_path / "x.mha", np.zeros((2, 2, 2)))


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    real_save = nib.save

    def broken_save(img, filename):
        real_save(img, filename)  # a partial/complete temp file exists ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(nifti_mod.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_volume(tmp_path / "out" / "v.nii.gz", np.ones((3, 3, 3)), kind="mr")
    assert folder_entries(tmp_path / "out") == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    path = write_volume(tmp_path / "v.nii.gz", np.ones((3, 3, 3)), kind="mr")
    before = path.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(nifti_mod.nib, "save", broken_save)
    with pytest.raises(RuntimeError):
        write_volume(path, np.zeros((3, 3, 3)), kind="mr")
    assert path.read_bytes() == before
    assert folder_entries(tmp_path) == ["v.nii.gz"]


def test_atomic_path_suffix_and_cleanup(tmp_path):
    assert split_suffix("a.b.nii.gz") == ("a.b", ".nii.gz")
    assert split_suffix("x.json") == ("x", ".json")
    with atomic_path(tmp_path / "d" / "x.nii.gz") as tmp:
        assert tmp.parent == tmp_path / "d" and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"ok")
    assert (tmp_path / "d" / "x.nii.gz").read_bytes() == b"ok"
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "d" / "y.json") as tmp:
            tmp.write_text("half")
            raise KeyError("fail")
    assert folder_entries(tmp_path / "d") == ["x.nii.gz"]
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "d" / "z.json"):
            pass
    assert folder_entries(tmp_path / "d") == ["x.nii.gz"]


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not any(tmp.iterdir())
        (tmp / "a.npy").write_bytes(b"1")
    assert folder_entries(out) == ["a.npy"]
    with pytest.raises(KeyboardInterrupt):  # a failed rewrite keeps the old folder as it was
        with atomic_folder(out) as tmp:
            (tmp / "b.npy").write_bytes(b"half")
            raise KeyboardInterrupt
    assert folder_entries(out) == ["a.npy"] and folder_entries(tmp_path) == ["export"]
    with atomic_folder(out) as tmp:  # a finished rewrite replaces it whole
        (tmp / "c.npy").write_bytes(b"2")
    assert folder_entries(out) == ["c.npy"]


def test_read_errors_start_with_the_path(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(NiftiError) as exc:
        read_volume(missing)
    assert str(exc.value).startswith(str(missing)) and "not found" in str(exc.value)

    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not gzip at all" * 20)
    with pytest.raises(NiftiError) as exc:
        read_volume(junk)
    assert str(exc.value).startswith(str(junk))

    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(os.urandom(400))
    with pytest.raises(NiftiError) as exc:
        read_volume(garbage)
    assert str(exc.value).startswith(str(garbage))

    with pytest.raises(NiftiError, match="not a NIfTI file name"):
        (tmp_path / "a.txt").write_text("x")
        read_volume(tmp_path / "a.txt")
    assert issubclass(NiftiError, ValueError)


@pytest.mark.parametrize("name", ["t.nii.gz", "t.nii"])
def test_truncated_file_fails_at_read_time(tmp_path, name):
    rng = np.random.default_rng(2)
    path = write_volume(tmp_path / name, rng.normal(0, 300, (16, 16, 12)), kind="ct")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NiftiError) as exc:
        read_volume(path)
    assert str(exc.value).startswith(str(path)) and "truncated" in str(exc.value)
    with pytest.raises(NiftiError, match="truncated"):
        read_info(path)


def test_read_info_is_header_only(tmp_path):
    path = write_volume(tmp_path / "c.nii.gz", np.zeros((4, 5, 6, 7)), spacing=(1, 2, 3), frame_duration=0.5)
    info = read_info(path)
    assert info.shape == (4, 5, 6, 7) and info.ndim == 4 and info.dtype == np.float32
    assert info.spacing == pytest.approx((1, 2, 3)) and info.frame_duration == pytest.approx(0.5)
    assert info.slope == 1.0 and info.inter == 0.0


def test_read_volume_integer_dtype(tmp_path):
    p = write_volume(tmp_path / "m.nii.gz", np.full((2, 2, 2), 1.5), kind="mr")
    with pytest.raises(NiftiError, match="non-integer"):
        read_volume(p, dtype=np.uint8)
    assert read_volume(p, dtype=None).array.dtype == np.float32


def test_sidecar(tmp_path):
    assert sidecar_path("/a/b/x.nii.gz") == Path("/a/b/x.json")
    assert sidecar_path("x.nii") == Path("x.json")
    with pytest.raises(ValueError):
        sidecar_path("x.mha")
    obj = {
        "seed": np.int64(3),
        "ok": np.bool_(True),
        "energy": np.float32(1.5),
        "nan": float("nan"),
        "shape": np.array([1, 2, 3]),
        "path": tmp_path / "v.nii.gz",
        "steps": (1, 2),
        5: "int key",
    }
    out = write_json_atomic(tmp_path / "s" / "v.json", obj)
    text = out.read_text()
    assert text.startswith("{\n  ")
    back = read_json(out)
    assert back == {
        "seed": 3, "ok": True, "energy": 1.5, "nan": None, "shape": [1, 2, 3],
        "path": str(tmp_path / "v.nii.gz"), "steps": [1, 2], "5": "int key",
    }
    assert json.loads(text) == back
    assert folder_entries(tmp_path / "s") == ["v.json"]
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        read_json(bad)
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "o.json", {"x": object()})
    assert not (tmp_path / "o.json").exists()


def test_io_and_data_import_without_torch():
    """medgen_rt.io, medgen_rt.data and the phantom CLI must never import torch."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import medgen_rt.io, medgen_rt.data, medgen_rt.cli.phantom\n"
        "assert 'torch' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1] / "python"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_sheared_affine_warns_and_keeps_exact_sform(tmp_path):
    aff = np.eye(4)
    aff[0, 1] = 0.3  # shear: not representable by a qform
    with pytest.warns(UserWarning, match="shear"):
        p = write_volume(tmp_path / "s.nii.gz", np.zeros((3, 3, 3)), affine=aff)
    assert np.allclose(read_volume(p).affine, aff)
    assert np.allclose(read_header(p).get_sform(), aff)


def test_every_mask_reader_refuses_non_integer_labels(tmp_path):
    """check_labels holds the integer check; both sampling engines read masks through spec.load_masks."""
    from medgen_rt.io.nifti import check_labels
    from medgen_rt.sampling.spec import load_masks

    vol = np.zeros((4, 4, 4), np.float32)
    vol[1, 1, 1] = 1.5  # int() would have read it as label 1
    p = write_volume(tmp_path / "m.nii.gz", vol)
    with pytest.raises(ValueError, match=r"m\.nii\.gz: mask values must be integer labels, found 1\.5"):
        load_masks(str(p), [1], (4, 4, 4), 1, np.eye(4))
    for bad in (np.nan, np.inf):
        with pytest.raises(NiftiError, match="integer labels"):
            check_labels(p, np.array([0.0, bad]), [1])
    check_labels(p, np.array([0.0, 1.0]), [1])  # integer-valued floats are fine
