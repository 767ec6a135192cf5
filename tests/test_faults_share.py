"""Issue #13, the sharing gate: nothing of the training data leaves through `medgen share`
(conditioning masks equal to a training mask, links to training files, training paths in
sidecars), and evaluation sets refuse what a killed `medgen sample` or a symlink loop left.

A tiny CT setup (16x16x8 phantoms) and a synthetic folder laid out as `medgen sample`
writes it, planted with what a careless or hostile user could leave there.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cli_run import assert_clean_error, medgen
from medgen_rt.data.phantoms import write_ct_dataset
from medgen_rt.evaluation.datasets import EvalInputError, open_set
from medgen_rt.evaluation.share import gate
from medgen_rt.io.nifti import read_volume
from medgen_rt.io.outputs import write_generated

SHAPE, SPACING = (16, 16, 8), (20.0, 20.0, 30.0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/val/fresh: `medgen phantom ct` layout (fresh: other subjects, the "generated" images)."""
    root = tmp_path_factory.mktemp("share")
    for name, n, seed in (("train", 4, 0), ("val", 3, 1), ("fresh", 4, 2)):
        write_ct_dataset(root / name, n, seed=seed, quiet=True, shape=SHAPE, spacing=SPACING)
    return root


def _planted(data: Path, syn: Path) -> Path:
    """A `medgen sample` folder (NAME.nii.gz, NAME_mask.nii.gz, NAME.json, NAME.png) whose images are
    fresh subjects but whose companions leak training data:

    sample_000: conditioning mask voxel-identical to training mask ct_001; sidecar names it and
                absolute model folders
    sample_001: preview replaced by a link to training volume ct_003; mask nearly equal to ct_002's
    sample_002: its own (fresh) mask, nothing planted: shared whole
    sample_003: mask replaced by a link to training mask ct_004
    """
    train = data / "train"
    for i in range(4):
        img = read_volume(data / "fresh" / "images" / f"ct_{i + 1:03d}.nii.gz")
        if i == 2:
            mask = read_volume(data / "fresh" / "masks" / f"ct_{i + 1:03d}.nii.gz", dtype=None).array
        else:
            mask = read_volume(train / "masks" / f"ct_{i + 1:03d}.nii.gz", dtype=None).array.copy()
        if i == 1:
            fg = np.flatnonzero(mask)
            mask.flat[fg[0]] = 0  # one voxel off: still the patient's map
        meta = {"model": str(data / "runs" / "dit"), "vae": str(data / "runs" / "dit" / ".." / "vae"),
                "kind": "dit3d", "preset": None, "seed": i, "index": i, "sampler": "ddim", "steps": 4,
                "guidance": 1.5, "timings_s": {"denoise": 0.1, "decode": 0.2}, "device": "cpu",
                "mask": str(train / "masks" / f"ct_{i + 1:03d}.nii.gz") if i == 0
                else f"data/ct/masks/ct_{i + 1:03d}.nii.gz",
                "notes_path": str(train / "images" / "ct_001.nii.gz"),  # an unknown key holding a path
                "energy": {"country": "DEU", "run_kwh": 0.004, "run_kg_co2e": 0.0016,
                           "per_volume": {"kwh": 0.001, "kg_co2e": 0.0004}}}
        write_generated(syn, f"sample_{i:03d}", img.array, img.affine, "ct", meta, mask=mask)
    (syn / "sample_001.png").unlink()
    os.symlink(os.path.relpath(train / "images" / "ct_003.nii.gz", syn), syn / "sample_001.png")
    (syn / "sample_003_mask.nii.gz").unlink()
    os.symlink(os.path.relpath(train / "masks" / "ct_004.nii.gz", syn), syn / "sample_003_mask.nii.gz")
    return syn


def _training_files(data: Path) -> tuple:
    """(hashes of every training/validation file, their masks as arrays)."""
    files = [p for d in ("train", "val") for p in (data / d).rglob("*") if p.is_file()]
    masks = [read_volume(p, dtype=None).array for d in ("train", "val") for p in (data / d / "masks").iterdir()]
    return {_sha(p) for p in files}, masks


def _assert_nothing_leaked(data: Path, out: Path) -> list:
    """Every file in ``out``: a plain file, not byte-identical to a training file, no mask equal to a
    training mask, no JSON holding a training path or an absolute path. Returns the file names."""
    hashes, masks = _training_files(data)
    names = []
    for p in sorted(out.rglob("*")):
        assert not p.is_symlink(), p
        if p.is_dir():
            continue
        names.append(p.name)
        assert _sha(p) not in hashes, f"{p} is byte-identical to a training file"
        if p.name.endswith("_mask.nii.gz"):
            m = read_volume(p, dtype=None).array
            for t in masks:
                # another subject's map differs in dozens of voxels; a patient's map edited by hand in a few
                assert t.shape != m.shape or np.count_nonzero(t != m) > 5, f"{p} (nearly) equals a training mask"
        if p.suffix in (".json", ".html"):
            text = p.read_text(encoding="utf-8")
            for bad in (str(data), "data/ct", "/train/", "masks/ct_", "images/ct_", "/.."):
                assert bad not in text, (p, bad)
            if p.suffix == ".json":
                def walk(o):
                    if isinstance(o, dict):
                        for v in o.values():
                            walk(v)
                    elif isinstance(o, list):
                        for v in o:
                            walk(v)
                    elif isinstance(o, str):
                        assert not os.path.isabs(o) and not re.search(r"\S/\S", o), (p, o)  # " / " is prose
                walk(json.loads(text))
    return names


def test_gate_screens_every_file_it_copies(data, tmp_path):
    """evaluation.share.gate with a screening report that calls nothing a copy: the images are
    shared, every companion is screened or rebuilt, and what was left out is listed with why."""
    syn = _planted(data, tmp_path / "samples")
    os.symlink(os.path.relpath(data / "train" / "images" / "ct_002.nii.gz", syn), syn / "sample_004.nii.gz")
    (syn / "sample_004.json").write_bytes((syn / "sample_002.json").read_bytes())
    s = open_set(syn, "--synthetic")
    report = {"synthetic": [{"name": n, "is_copy": False} for n in s.names], "copy_share": 0.0}
    written = {}
    info = gate(report, s, tmp_path / "out", real_masks=[open_set(data / "train", "--train"),
                                                          open_set(data / "val", "--val")],
                write=lambda folder, i: written.update(info=i))
    out = tmp_path / "out"
    names = _assert_nothing_leaked(data, out)
    # the images of the fresh subjects are shared; the linked "sample" is not a sample
    assert info["shared"] == ["sample_000", "sample_001", "sample_002", "sample_003"]
    assert "sample_004.nii.gz" not in names
    # conditioning masks equal (or nearly) to a training mask, and a linked mask, are withheld;
    # the sample's own mask is shared
    assert "sample_002_mask.nii.gz" in names
    for n in ("sample_000_mask.nii.gz", "sample_001_mask.nii.gz", "sample_003_mask.nii.gz"):
        assert n not in names
    # the linked preview is replaced by one drawn from the screened volume
    assert "sample_001.png" in names and (out / "sample_001.png").read_bytes()[:4] == b"\x89PNG"
    left = {d["file"]: d["reason"] for d in info["left_out"]}
    assert set(left) == {"sample_000_mask.nii.gz", "sample_001_mask.nii.gz", "sample_001.png",
                         "sample_003_mask.nii.gz", "sample_004.nii.gz"}, left
    assert "training mask" in left["sample_000_mask.nii.gz"] and "training mask" in left["sample_001_mask.nii.gz"]
    for n in ("sample_001.png", "sample_003_mask.nii.gz", "sample_004.nii.gz"):
        assert "link" in left[n]
    assert written["info"] is info
    # sidecars keep what describes the sample, model folders reduced to their names
    side = json.loads((out / "sample_000.json").read_text())
    assert side["seed"] == 0 and side["sampler"] == "ddim" and side["steps"] == 4 and side["guidance"] == 1.5
    assert side["model"] == "dit" and side["vae"] == "vae" and side["energy"]["per_volume"]["kwh"] == 0.001
    assert "notes_path" not in side and "withheld" in side["mask"]
    assert json.loads((out / "sample_002.json").read_text())["mask"] == "sample_002_mask.nii.gz"
    # the shared images hold the screened voxels
    for n in info["shared"]:
        a = read_volume(out / f"{n}.nii.gz").array
        assert np.array_equal(a, read_volume(syn / f"{n}.nii.gz").array)


def test_share_cli_leaks_nothing_and_says_what_was_left_out(data, tmp_path):
    syn = _planted(data, tmp_path / "samples")
    out, enc = tmp_path / "shared", tmp_path / "internal" / "encoder.safetensors"
    proc = medgen("share", "--synthetic", syn, "--train", data / "train", "--val", data / "val", "--out", out,
                  "--encoder", enc, "--steps", 5, "--quiet", "--force", "--max-copy-share", 1)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert enc.is_file()  # saved where asked, but its location is not in the shared report
    names = _assert_nothing_leaked(data, out)
    report = json.loads((out / "report.json").read_text())
    shared = report["sharing"]["shared"]
    assert shared and "report.html" in names
    left = {d["file"] for d in report["sharing"]["left_out"]}
    for n in shared:
        assert f"{n}.nii.gz" in names and f"{n}.json" in names and f"{n}.png" in names
        if n != "sample_002":
            assert f"{n}_mask.nii.gz" in left
    html = (out / "report.html").read_text(encoding="utf-8")
    for f in left:
        assert f in html
    assert "sample_001.png" in left or "sample_001" not in shared


def test_eval_refuses_a_sample_without_its_sidecar(data, tmp_path):
    syn = tmp_path / "samples"
    for i in range(3):
        img = read_volume(data / "fresh" / "images" / f"ct_{i + 1:03d}.nii.gz")
        write_generated(syn, f"sample_{i:03d}", img.array, img.affine, "ct", {"seed": i})
    # a killed `medgen sample`: a volume written, its sidecar not yet; and a hidden temporary
    (syn / "sample_002.json").unlink()
    tmp_nii = syn / ".sample_003.12345-0a1b2c3d.tmp.nii.gz"
    tmp_nii.write_bytes((syn / "sample_000.nii.gz").read_bytes())
    (syn / ".sample_003.12345-0a1b2c3d.tmp.json").write_text("{")
    with pytest.raises(EvalInputError, match="sample_002.nii.gz"):
        open_set(syn, "--synthetic")
    proc = medgen("eval", "memorization", "--train", data / "train", "--val", data / "val", "--synthetic", syn,
                  "--out", tmp_path / "rep", "--steps", 5, "--quiet")
    assert_clean_error(proc, "--synthetic", "sample_002.nii.gz")
    assert not (tmp_path / "rep").exists()
    # once it is gone, the hidden temporaries are no samples; plain folders without sidecars still open
    (syn / "sample_002.nii.gz").unlink()
    (syn / "sample_002.png").unlink()
    assert open_set(syn, "--synthetic").names == ["sample_000", "sample_001"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in (1, 2):
        (plain / f"ct_{i:03d}.nii.gz").write_bytes((data / "val" / "images" / f"ct_{i:03d}.nii.gz").read_bytes())
    assert open_set(plain, "--real").names == ["ct_001", "ct_002"]


def test_symlink_loops_are_refused(data, tmp_path):
    # a loop among the synthetic volumes (flat layout)
    syn = tmp_path / "samples"
    syn.mkdir()
    for i in (1, 2):
        (syn / f"v_{i}.nii.gz").write_bytes((data / "fresh" / "images" / f"ct_{i:03d}.nii.gz").read_bytes())
    os.symlink("loop.nii.gz", syn / "loop.nii.gz")
    with pytest.raises(EvalInputError, match="loop.nii.gz"):
        open_set(syn, "--synthetic")
    proc = medgen("eval", "memorization", "--train", data / "train", "--val", data / "val", "--synthetic", syn,
                  "--out", tmp_path / "rep", "--steps", 5, "--quiet")
    assert_clean_error(proc, "--synthetic", "loop.nii.gz")
    # and in the images/ + masks/ layout, a loop in masks/
    train = tmp_path / "train"
    for sub in ("images", "masks"):
        (train / sub).mkdir(parents=True)
        for p in (data / "train" / sub).iterdir():
            (train / sub / p.name).write_bytes(p.read_bytes())
    os.symlink("a.nii.gz", train / "masks" / "b.nii.gz")
    os.symlink("b.nii.gz", train / "masks" / "a.nii.gz")
    with pytest.raises(EvalInputError, match=r"--train: .*masks.*\.nii\.gz"):
        open_set(train, "--train")
