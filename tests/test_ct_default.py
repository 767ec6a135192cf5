"""The embedded CT model (`medgen sample --model ct`): generated CT follows the label map
it is given (blood and myocardium where the map puts them, clearly less so against
another subject's map), is written as int16 HU with the map's geometry, and samples
unconditionally through the null condition."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medgen_rt.evaluation.metrics import ct_mask_adherence
from cli_run import medgen


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Label maps of phantom subjects the model never saw (seed 4242)."""
    root = tmp_path_factory.mktemp("ct")
    proc = medgen("phantom", "ct", "--n", "2", "--seed", "4242", "--shape", "64", "64", "32",
                   "--spacing", "2.8", "2.8", "4.0", "--out", str(root / "ct"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return sorted((root / "ct" / "masks").iterdir())


@pytest.mark.parametrize("network", [(), ("--teacher", "--steps", "20")], ids=["student", "teacher"])
def test_ct_follows_its_map(tmp_path, maps, network):
    """The shipped default (the distilled student at its 1 step) and the teacher alike."""
    out = tmp_path / "s"
    proc = medgen("sample", "--model", "ct", "--masks", str(maps[0]), *network, "--no-energy",
                   "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads((out / "sample_000.json").read_text())
    assert side["network"] == ("teacher" if network else "student")
    img, mask = nib.load(str(out / "sample_000.nii.gz")), nib.load(str(maps[0]))
    assert img.shape == mask.shape == (64, 64, 32) and img.get_data_dtype() == np.int16
    assert np.allclose(img.affine, mask.affine)
    hu = img.get_fdata()  # int16 with scl_slope/scl_inter applied
    own = ct_mask_adherence(hu, np.asarray(mask.dataobj))
    other = ct_mask_adherence(hu, np.asarray(nib.load(str(maps[1])).dataobj))
    assert own["blood"] >= 0.75 and own["myocardium"] >= 0.5, own
    assert own["blood"] > other["blood"] + 0.1 and own["myocardium"] > other["myocardium"] + 0.1, (own, other)


def test_ct_unconditional_and_missing_masks(tmp_path):
    out = tmp_path / "u"
    proc = medgen("sample", "--model", "ct", "--unconditional", "--no-energy", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "sample_000_mask.nii.gz").exists() and (out / "sample_000.nii.gz").is_file()
    proc = medgen("sample", "--model", "ct", "--no-energy", "--out", str(tmp_path / "none"))
    assert proc.returncode == 2 and "--unconditional" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "none").exists()


def test_map_at_another_voxel_size_is_refused(tmp_path):
    proc = medgen("phantom", "ct", "--n", "1", "--shape", "64", "64", "32", "--spacing", "5.6", "5.6", "8.0",
                   "--out", str(tmp_path / "coarse"), "--quiet")
    assert proc.returncode == 0
    proc = medgen("sample", "--model", "ct", "--masks", str(tmp_path / "coarse" / "masks"), "--no-energy",
                   "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "voxel size" in proc.stderr and not (tmp_path / "s").exists()
    assert "Traceback" not in proc.stderr
