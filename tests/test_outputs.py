"""Files of a generated volume: NIfTI as specified, sidecar, PNG preview, GIF for cine;
all or nothing."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medgen_rt.data.phantoms import make_cine_phantom, make_ct_phantom
from medgen_rt.io import read_header
from medgen_rt.io.outputs import write_generated


def test_ct_outputs(tmp_path):
    ph = make_ct_phantom(1, shape=(48, 40, 24), spacing=(7.5, 9.0, 10.7))
    mask = ph.labels
    paths = write_generated(tmp_path, "sample_000", ph.image, ph.affine, "ct", {"seed": 3, "steps": 50}, mask=mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sample_000.json", "sample_000.nii.gz", "sample_000.png", "sample_000_mask.nii.gz"]
    img = nib.load(str(paths["image"]))
    assert img.get_data_dtype() == np.int16 and np.allclose(img.affine, ph.affine)
    raw = read_header(paths["image"])  # nibabel's loaded header hides the on-disk scaling
    assert float(raw["scl_slope"]) == 1.0 and float(raw["scl_inter"]) == 0.0
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(ph.image))
    np.testing.assert_array_equal(np.asarray(nib.load(str(paths["mask"])).dataobj), mask)
    side = json.loads(paths["sidecar"].read_text())
    assert side["seed"] == 3 and side["modality"] == "ct" and side["files"]["preview"] == "sample_000.png"
    assert side["spacing_mm"] == pytest.approx([7.5, 9.0, 10.7])
    png = Image.open(paths["preview"])
    # three views side by side, each scaled to square millimetres at 256 rows
    assert png.height == 256 and png.width > 3 * 200
    assert np.asarray(png).std() > 10  # not blank


def test_cine_outputs(tmp_path):
    ph = make_cine_phantom(2, shape=(32, 32, 4), n_frames=10, spacing=(4.5, 4.5, 10.0))
    paths = write_generated(tmp_path, "cine_001", ph.image, ph.affine, "cmr", {"seed": 1},
                            frame_duration=ph.frame_duration)
    img = nib.load(str(paths["image"]))
    assert img.shape == (32, 32, 4, 10) and img.get_data_dtype() == np.float32
    assert float(img.header["pixdim"][4]) == pytest.approx(ph.frame_duration, rel=1e-6)
    assert json.loads(paths["sidecar"].read_text())["frame_duration_s"] == pytest.approx(ph.frame_duration)
    montage = Image.open(paths["preview"])
    assert montage.height == 4 * (96 + 2)  # one row per slice
    gif = Image.open(paths["animation"])
    assert gif.n_frames == 10


def test_nothing_is_left_on_failure(tmp_path):
    vol = np.zeros((8, 8, 4, 3), dtype=np.float32)
    vol[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_generated(tmp_path, "bad", vol, np.eye(4), "cmr", {})
    with pytest.raises(ValueError, match="must be 3-D"):
        write_generated(tmp_path, "bad", np.zeros((8, 8, 4, 2)), np.eye(4), "ct", {})
    # a failure half way (mask of the wrong rank) removes what was already written
    with pytest.raises(ValueError):
        write_generated(tmp_path, "half", np.zeros((8, 8, 4)), np.eye(4), "ct", {}, mask=np.zeros((8, 8)))
    assert list(tmp_path.iterdir()) == []
