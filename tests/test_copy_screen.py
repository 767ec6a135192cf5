"""The copy screen of issue #14: degraded copies of training volumes are caught (each kind of
degradation, on small CT and cine phantoms), new subjects are not, the encoder is cached by
its training data and settings and reused by the next verb, an interrupted training resumes,
and --calibrate reports what the screen can see.

The CT set is 64 x 64 x 32 voxels (the encoder grid, 32 x 32 x 16, pools 2 x 2 x 2 voxels: a
copy moved by one voxel is moved by half a grid voxel, harder than the quarter of a 128 x 128 x
64 CT); the cine set 24 x 24 x 4 x 6.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from medgen_rt.cli import main
from medgen_rt.data.phantoms import make_cine_phantom, make_ct_phantom, subject_seed, write_acdc_dataset, \
    write_ct_dataset
from medgen_rt.evaluation import encoder as E
from medgen_rt.evaluation.datasets import open_set
from medgen_rt.evaluation.degrade import MUST_SHOW, STRENGTHS, degrade, describe, kinds_for
from medgen_rt.io.nifti import read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_thread")

CT_SHAPE, CT_SPACING = (64, 64, 32), (5.6, 5.6, 8.0)  # the whole adult thorax
CINE = dict(shape=(24, 24, 4), spacing=(6.0, 6.0, 16.0), n_frames=6)
N_REAL = 40   # training and validation subjects each
N_FRESH = 12  # new subjects among the synthetic volumes (the issue: at most 1 in 12 flagged)
N_COPIED = 4  # training subjects copied with each kind of degradation


def _plant(root, train_dir, kinds, cine: bool):
    """Synthetic folder: N_FRESH new subjects and, for each kind at its issue-#14 strength,
    degraded copies of training subjects 1..N_COPIED, named KIND_NNN (flat layout)."""
    syn = root / "synthetic"
    syn.mkdir()
    rng = np.random.default_rng(11)
    for i in range(1, N_FRESH + 1):
        if cine:
            ph = make_cine_phantom(subject_seed(2, i), **CINE)
        else:
            ph = make_ct_phantom(subject_seed(2, i), shape=CT_SHAPE, spacing=CT_SPACING)
        write_volume(syn / f"fresh_{i:03d}.nii.gz", ph.image, ph.affine, kind="mr" if cine else "ct")
    for k in range(1, N_COPIED + 1):
        src = read_volume(train_dir / (f"patient{k:03d}/patient{k:03d}_4d.nii.gz" if cine else
                                       f"images/ct_{k:03d}.nii.gz"))
        for kind in kinds:
            write_volume(syn / f"{kind}_{k:03d}.nii.gz", degrade(src.array, kind, MUST_SHOW[kind], rng), src.affine,
                         kind="mr" if cine else "ct")
    return syn


def _screen(root, steps: int, extra=()):
    out = root / "report"
    assert main(["eval", "memorization", "--train", str(root / "train"), "--val", str(root / "val"), "--synthetic",
                 str(root / "synthetic"), "--out", str(out), "--steps", str(steps), "--calibrate", "--quiet",
                 "--top-k", "2", *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    write_ct_dataset(root / "train", N_REAL, seed=0, quiet=True, shape=CT_SHAPE, spacing=CT_SPACING)
    write_ct_dataset(root / "val", N_REAL, seed=1, quiet=True, shape=CT_SHAPE, spacing=CT_SPACING)
    _plant(root, root / "train", kinds_for(False), cine=False)
    return root, _screen(root, 300)


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    root = tmp_path_factory.mktemp("cine")
    write_acdc_dataset(root / "train", N_REAL, seed=0, quiet=True, **CINE)
    write_acdc_dataset(root / "val", N_REAL, seed=1, quiet=True, **CINE)
    _plant(root, root / "train", kinds_for(True), cine=True)
    return root, _screen(root, 150, ["--frames", "6"])


def _by_kind(rep) -> dict:
    out = {}
    for s in rep["synthetic"]:
        out.setdefault(s["name"].rsplit("_", 1)[0], []).append(s)
    return out


@pytest.mark.parametrize("which", ["ct", "cine"])
def test_each_degradation_kind_is_caught(which, request):
    root, rep = request.getfixturevalue(which)
    by = _by_kind(rep)
    kinds = kinds_for(which == "cine")
    for kind in kinds:
        found = [s for s in by[kind] if s["is_copy"]]
        assert len(found) == N_COPIED, (kind, [(s["name"], s["r"], s["r_image"]) for s in by[kind]], rep["thresholds"])
        # paired with the subject it was made from
        prefix = "patient" if which == "cine" else "ct_"
        assert all(s["nearest_train"] == prefix + s["name"].rsplit("_", 1)[1] for s in found)
    fresh = [s for s in by["fresh"] if s["is_copy"]]
    assert len(fresh) <= 1, [(s["name"], s["r"], s["r_image"]) for s in fresh]
    # every copied training subject is memorised
    memorised = {t["name"] for t in rep["train"] if t["is_memorized"]}
    assert {(f"patient{k:03d}" if which == "cine" else f"ct_{k:03d}") for k in range(1, N_COPIED + 1)} <= memorised


@pytest.mark.parametrize("which", ["ct", "cine"])
def test_calibration_table(which, request):
    root, rep = request.getfixturevalue(which)
    cal = rep["calibration"]
    kinds = kinds_for(which == "cine")
    assert [(r["kind"], r["strength"]) for r in cal["rows"]] == [(k, s) for k in kinds for s in STRENGTHS[k]]
    assert all(r["n"] == 8 for r in cal["rows"]) and cal["sources"] == 8
    for r in cal["rows"]:
        if r["strength"] == MUST_SHOW[r["kind"]]:
            assert r["recall"] >= 0.875, r  # 7 of 8 at least at the strengths
        assert r["degradation"] == describe(r["kind"], r["strength"])
    assert cal["n_fresh"] == N_REAL and cal["false_positive_rate"] <= 0.15, cal
    html = (root / "report" / "report.html").read_text()
    assert "What this screen can see" in html and describe("noise", 0.02) in html


def test_calibrate_prints_the_table(ct, capsys, tmp_path):
    root, _ = ct
    rc = main(["eval", "memorization", "--train", str(root / "train"), "--val", str(root / "val"), "--synthetic",
               str(root / "synthetic"), "--out", str(tmp_path / "r"), "--steps", "300", "--calibrate", "--quiet",
               "--top-k", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibration: degraded copies of 8 training volumes" in out
    assert f"{describe('shift', 1)}" in out and "new subjects (validation volumes, leave-one-out) flagged" in out


def test_second_verb_reuses_the_cached_encoder(ct, tmp_path, capsys):
    """`share` after `eval memorization` on the same --train takes the encoder from the cache
    (no training), and its shared report carries the calibration table without any names."""
    root, rep = ct
    assert rep["encoder"]["source"] == "trained" and rep["encoder"]["steps"] == 300
    assert os.path.isfile(rep["encoder"]["path"])
    capsys.readouterr()
    out = tmp_path / "shared"
    rc = main(["share", "--synthetic", str(root / "synthetic"), "--train", str(root / "train"), "--val",
               str(root / "val"), "--out", str(out), "--steps", "300", "--quiet", "--force", "--report",
               str(tmp_path / "internal")])
    assert rc == 0
    assert "encoder: training" not in capsys.readouterr().err
    internal = json.loads((tmp_path / "internal" / "report.json").read_text())
    assert internal["encoder"]["source"] == "cache" and internal["encoder"]["seconds"] < 5
    assert [s["is_copy"] for s in internal["synthetic"]] == [s["is_copy"] for s in rep["synthetic"]]
    shared = json.loads((out / "report.json").read_text())
    assert [(r["kind"], r["strength"]) for r in shared["calibration"]["rows"]] == \
        [(r["kind"], r["strength"]) for r in rep["calibration"]["rows"]]
    text = (out / "report.json").read_text() + (out / "report.html").read_text()
    assert "ct_0" not in text and "What this screen can see" in text


def test_cache_key_follows_data_and_settings(tmp_path, monkeypatch):
    """Same data and settings: the cached encoder; a changed training set or other settings:
    trained anew; an unusable cache folder: trained without a cache, with a note."""
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    write_ct_dataset(tmp_path / "train", 4, seed=0, quiet=True, shape=(16, 16, 8), spacing=(22.4, 22.4, 32.0))
    train = open_set(tmp_path / "train", "--train")
    cfg = lambda **kw: E.EncoderConfig(steps=3, min_steps=3, batch_size=4, **kw)  # noqa: E731
    first, info, inputs = E.obtain_encoder(train, cfg())
    assert info["source"] == "trained" and inputs.shape == (4, 1, 16, 16, 8)
    assert sorted(p.name for p in (tmp_path / "cache" / "encoders").iterdir()) == [f"{info['key'][:24]}.safetensors"]
    again, info2, inputs2 = E.obtain_encoder(open_set(tmp_path / "train", "--train"), cfg())
    assert info2["source"] == "cache" and info2["key"] == info["key"] and inputs2 is None
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    # other settings: another key
    _, info3, _ = E.obtain_encoder(train, cfg(seed=1))
    assert info3["source"] == "trained" and info3["key"] != info["key"]
    # a changed training set (one volume rewritten, one added): trained anew
    img = tmp_path / "train" / "images" / "ct_002.nii.gz"
    vol = read_volume(img)
    write_volume(img, vol.array + 1.0, vol.affine, kind="ct")
    changed, info4, _ = E.obtain_encoder(open_set(tmp_path / "train", "--train"), cfg())
    assert info4["source"] == "trained" and info4["key"] != info["key"]
    write_ct_dataset(tmp_path / "more", 1, seed=5, quiet=True, shape=(16, 16, 8), spacing=(22.4, 22.4, 32.0))
    (tmp_path / "more" / "images" / "ct_001.nii.gz").rename(tmp_path / "train" / "images" / "ct_005.nii.gz")
    (tmp_path / "more" / "masks" / "ct_001.nii.gz").rename(tmp_path / "train" / "masks" / "ct_005.nii.gz")
    _, info5, _ = E.obtain_encoder(open_set(tmp_path / "train", "--train"), cfg())
    assert info5["source"] == "trained" and info5["key"] not in (info["key"], info4["key"])
    # --encoder PATH: written beside the cache, then loaded from there as it is
    path = tmp_path / "mine.safetensors"
    _, info6, _ = E.obtain_encoder(train, cfg(), path)
    assert info6["source"] == "cache" and info6["saved_to"] == str(path)
    _, info7, _ = E.obtain_encoder(train, cfg(), path)
    assert info7["source"] == "file" and info7["matches_data"] is True
    # a cache folder that cannot be made: trained, not cached, said once
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MEDGEN_CACHE", str(blocker))
    said = []
    _, info8, _ = E.obtain_encoder(train, cfg(), log=said.append)
    assert info8["source"] == "trained" and info8["file"] is None and "not writable" in said[0]


def test_interrupted_training_resumes(tmp_path, monkeypatch):
    """A training stopped by Ctrl-C leaves a checkpoint in the cache; the next run resumes from
    it and ends with the weights an uninterrupted training gets."""
    write_ct_dataset(tmp_path / "train", 4, seed=0, quiet=True, shape=(16, 16, 8), spacing=(22.4, 22.4, 32.0))
    train = open_set(tmp_path / "train", "--train")
    cfg = lambda: E.EncoderConfig(steps=12, min_steps=12, batch_size=4)  # noqa: E731
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "whole"))
    whole, _, _ = E.obtain_encoder(train, cfg())

    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    real_plateaued = E.plateaued

    def interrupt(losses, *args):
        if len(losses) == 7:
            raise KeyboardInterrupt
        return real_plateaued(losses, *args)

    monkeypatch.setattr(E, "plateaued", interrupt)
    with pytest.raises(KeyboardInterrupt):
        E.obtain_encoder(train, cfg())
    partial = list((tmp_path / "cache" / "encoders").glob("*.partial.pt"))
    assert len(partial) == 1 and not list((tmp_path / "cache" / "encoders").glob("*.safetensors"))
    state = torch.load(partial[0], weights_only=True)
    assert state["step"] == 7 and len(state["losses"]) == 7
    monkeypatch.setattr(E, "plateaued", real_plateaued)
    said = []
    resumed, info, _ = E.obtain_encoder(train, cfg(), log=said.append)
    assert info["source"] == "trained" and any("resuming from step 7" in s for s in said)
    assert not list((tmp_path / "cache" / "encoders").glob("*.partial.pt"))  # removed at the end
    assert resumed.cfg.history["steps"] == 12
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the first line said how long the training would take, before it went on
    assert any(s.startswith("encoder: training on 4 volumes") and " s for up to " in s for s in said)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    inputs = torch.randn(4, 1, 8, 8, 4)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        E.train_encoder(inputs, E.EncoderConfig(steps=6, min_steps=6, batch_size=4), checkpoint=ckpt,
                        on_step=lambda n: (_ for _ in ()).throw(KeyboardInterrupt) if n == 3 else None)
    assert ckpt.is_file()
    said = []
    E.train_encoder(inputs, E.EncoderConfig(steps=6, min_steps=6, batch_size=4, seed=3), checkpoint=ckpt,
                    log=said.append)
    assert not any("resuming" in s for s in said) and not ckpt.exists()
    ckpt.write_bytes(b"torn")  # a damaged checkpoint starts over
    E.train_encoder(inputs, E.EncoderConfig(steps=2, min_steps=2, batch_size=4), checkpoint=ckpt)


def test_plateau_stops_early():
    cfg = E.EncoderConfig(steps=1000, min_steps=100, plateau_window=50, plateau=0.05)
    falling = list(np.linspace(3.0, 1.0, 100))
    assert not E.plateaued(falling, cfg)
    assert not E.plateaued(falling + [1.0] * 50, cfg)  # still 33% below the window before
    flat = falling + [1.0] * 100
    assert E.plateaued(flat, cfg) and not E.plateaued(flat[:-1], cfg)  # checked at window ends only
    assert not E.plateaued([1.0] * 50, cfg)  # before min_steps
    assert not E.plateaued([3.0] * 200, cfg)  # level, but near chance (log 31 = 3.43): not learnt yet


def test_degradations_by_hand():
    rng = np.random.default_rng(0)
    v = np.zeros((10, 12, 6), np.float32)
    v[3:6, 4:8, 2:4] = 100.0  # range 100
    n = degrade(v, "noise", 0.02, rng)
    assert abs(float((n - v).std()) - 2.0) < 0.1
    assert np.allclose(degrade(v, "intensity", 0.1, rng), v * 0.9 + 5.0)
    s = degrade(v, "shift", 2, rng)
    moved = [(ax, d) for ax in (0, 1) for d in (2, -2)
             if np.array_equal(s, np.take(v, np.clip(np.arange(v.shape[ax]) - d, 0, v.shape[ax] - 1), axis=ax))]
    assert len(moved) == 1
    b = degrade(v, "smooth", 0.8, rng)
    assert b.max() < 100.0 and abs(float(b.sum()) - float(v.sum())) < 1e-2 * float(v.sum())  # mass kept
    d = degrade(v, "deform", 1.0, rng)
    assert d.shape == v.shape and 0 < float(np.abs(d - v).max()) <= 100.0
    assert np.array_equal(degrade(v, "deform", 0.0, rng), v)
    c = np.stack([v * (t + 1) for t in range(5)], axis=3)
    assert np.array_equal(degrade(c, "temporal", 1, rng)[..., 1], c[..., 0])
    assert degrade(c, "smooth", 0.8, rng).shape == c.shape and degrade(c, "deform", 1.0, rng).shape == c.shape
    with pytest.raises(ValueError, match="kind"):
        degrade(v, "flip", 1, rng)
    with pytest.raises(ValueError, match="temporal"):
        degrade(v, "temporal", 1, rng)
    assert describe("intensity", 0.1) == "intensity x0.9 + 5% of the range"


def test_help_defaults_match_the_encoder():
    from medgen_rt.cli import eval as cli_eval

    assert cli_eval.DEFAULT_STEPS == E.EncoderConfig().steps and cli_eval.MAX_SIZE == E.MAX_SIZE


def test_bad_encoder_files_name_the_argument(ct, tmp_path, capsys):
    from safetensors.torch import save_file

    root, _ = ct
    base = ["eval", "memorization", "--train", str(root / "train"), "--val", str(root / "val"), "--synthetic",
            str(root / "synthetic"), "--out", str(tmp_path / "o"), "--quiet"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    old = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(1)}, str(old), metadata={"format": "medgen_rt.copy_encoder/1", "config": "{}"})
    for path, what in ((junk, "not a readable safetensors file"), (old, "older medgen_rt")):
        assert main(base + ["--encoder", str(path)]) == 2
        err = capsys.readouterr().err
        assert "--encoder" in err and what in err and "Traceback" not in err, err
    # an encoder of another kind of volume
    write_acdc_dataset(tmp_path / "cine", 3, seed=0, quiet=True, **CINE)
    cine_enc = tmp_path / "cine.safetensors"
    assert main(["eval", "memorization", "--train", str(tmp_path / "cine"), "--val", str(tmp_path / "cine"),
                 "--synthetic", str(tmp_path / "cine"), "--out", str(tmp_path / "c"), "--steps", "2", "--frames",
                 "6", "--quiet", "--encoder", str(cine_enc)]) == 0
    assert main(base + ["--encoder", str(cine_enc)]) == 2
    assert "--encoder: trained on MR cine inputs" in capsys.readouterr().err
