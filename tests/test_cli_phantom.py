"""`medgen phantom` (run() called directly with our own parser)."""

import argparse
import json

import numpy as np
import pytest

import medgen_rt.data.phantoms as phantoms
from medgen_rt.cli.phantom import add_parser, run
from medgen_rt.data import ACDCDataset, VolumeFolder


def parse(*argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_parser(sub)
    return p.parse_args(["phantom", *argv])


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_cmr4d(tmp_path, capsys):
    out = tmp_path / "cmr"
    args = parse("cmr4d", "--n", "2", "--out", str(out), "--seed", "4",
                 "--shape", "32", "32", "6", "--spacing", "4.5", "4.5", "10", "--frames", "8", "--quiet")
    assert args.func is run
    assert run(args) == 0
    assert capsys.readouterr().out == ""
    ds = ACDCDataset(out)
    assert len(ds) == 2 and ds[0]["image"].shape == (32, 32, 6, 8)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["seed"] == 4 and manifest["phantom_kwargs"]["n_frames"] == 8
    assert siblings(out) == ["cmr"]


def test_ct_defaults_shape_and_summary(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "ct"  # parents are created
    assert run(parse("ct", "--n", "1", "--out", str(out), "--shape", "24", "24", "12",
                     "--spacing", "4", "4", "12", "--quiet")) == 0
    ds = VolumeFolder(out, require_masks=True)
    assert ds[0]["image"].shape == (24, 24, 12)
    assert run(parse("ct", "--n", "1", "--out", str(tmp_path / "c2"), "--shape", "16", "16", "8")) == 0
    assert "wrote 1 ct phantom(s)" in capsys.readouterr().out


def test_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = run(parse("ct", "--n", "1", "--out", str(out), "--shape", "16", "16", "8", "--quiet"))
    assert rc != 0
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert siblings(out) == ["out"]


def test_empty_out_is_fine_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run(parse("ct", "--n", "1", "--out", str(out), "--shape", "16", "16", "8", "--quiet")) == 0
    (out / "stale.txt").write_text("old")
    assert run(parse("ct", "--n", "2", "--out", str(out), "--shape", "16", "16", "8",
                     "--quiet", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "masks"]
    assert len(VolumeFolder(out)) == 2
    assert siblings(out) == ["out"]


def test_failure_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls = []
    real = phantoms.make_ct_phantom

    def flaky(seed, **kw):
        calls.append(seed)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(seed, **kw)

    monkeypatch.setattr(phantoms, "make_ct_phantom", flaky)
    out = tmp_path / "ct"
    rc = run(parse("ct", "--n", "3", "--out", str(out), "--shape", "16", "16", "8", "--quiet"))
    assert rc == 1 and len(calls) == 2
    assert "simulated crash" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "ct"
    assert run(parse("ct", "--n", "1", "--out", str(out), "--shape", "16", "16", "8", "--quiet")) == 0
    before = (out / "images" / "ct_001.nii.gz").read_bytes()
    monkeypatch.setattr(phantoms, "make_ct_phantom", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    assert run(parse("ct", "--n", "1", "--out", str(out), "--quiet", "--overwrite")) == 1
    assert (out / "images" / "ct_001.nii.gz").read_bytes() == before
    assert siblings(out) == ["ct"]


@pytest.mark.parametrize(
    "argv, rc, msg",
    [
        (["ct", "--frames", "10"], 2, "--frames only applies to cmr4d"),
        (["cmr4d", "--frames", "1"], 2, "at least 2"),
    ],
)
def test_bad_combinations(tmp_path, capsys, argv, rc, msg):
    out = tmp_path / "o"
    assert run(parse(*argv, "--n", "1", "--out", str(out), "--quiet")) == rc
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run(parse("ct", "--n", "1", "--out", str(f), "--quiet")) == 2  # bad input: exit 2, as in every verb
    assert "not a folder" in capsys.readouterr().err and f.read_text() == "x"


@pytest.mark.parametrize(
    "argv",
    [["ct", "--n", "0", "--out", "x"], ["ct", "--out", "x"], ["mri", "--n", "1", "--out", "x"],
     ["ct", "--n", "1", "--out", "x", "--spacing", "1", "-1", "1"], ["ct", "--n", "1", "--out", "x", "--seed", "-3"],
     ["ct", "--n", "1", "--out", "x", "--shape", "8", "8"]],
)
def test_argparse_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2


def test_seed_reproducible(tmp_path):
    for name in ("a", "b"):
        assert run(parse("ct", "--n", "1", "--out", str(tmp_path / name), "--seed", "9",
                         "--shape", "16", "16", "8", "--quiet")) == 0
    va = VolumeFolder(tmp_path / "a", normalize=False)[0]
    vb = VolumeFolder(tmp_path / "b", normalize=False)[0]
    np.testing.assert_array_equal(va["image"], vb["image"])
    np.testing.assert_array_equal(va["mask"], vb["mask"])
