"""Sampling outputs under concurrency, reruns, kills and bad arguments (issue #13, findings
4, 7 and 8 in part): a run locks its --out, never mixes with an earlier run's samples, writes
each volume as soon as it is decoded, leaves nothing a rerun does not clean, refuses
meaningless numbers naming the option, and writes sidecars without local paths. The torch
runtime and the ONNX engine share this behaviour (medgen_rt.io.outputs.OutputFolder)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

import medgen_rt
from cli_run import assert_clean_error, medgen
from medgen_rt.sampling import api

FAST = ("--steps", "2", "--no-energy", "--quiet")


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "medgen_rt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(proc, found, timeout=120.0, every=0.005):
    """Poll until found() is true (returns True) or the process ends first (returns False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if found():
            return True
        if proc.poll() is not None:
            return bool(found())
        time.sleep(every)
    return False


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _volumes(folder):
    return sorted(p.name for p in folder.glob("sample_*.json"))


def test_a_second_run_into_a_locked_out_fails_and_leaves_the_first_intact(tmp_path):
    out = tmp_path / "samples"
    first = _popen("sample", "-n", "3", "--seed", "100", *FAST, "--out", out)
    try:
        lock = out / ".medgen.lock"  # its pid is written once the lock is held
        assert _wait_for(first, lambda: lock.exists() and lock.read_text().strip()), "the first run took no lock"
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second run needs
        second = medgen("sample", "-n", "2", "--seed", "200", *FAST, "--out", out)
    finally:
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    assert_clean_error(second, "--out", str(out), f"pid {first.pid}")
    assert first.returncode == 0, stderr[-3000:]
    assert _volumes(out) == ["sample_000.json", "sample_001.json", "sample_002.json"]
    assert [json.loads((out / v).read_text())["seed"] for v in _volumes(out)] == [100, 101, 102]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and [v["seed"] for v in summary["volumes"]] == [100, 101, 102]
    for i in range(3):
        assert nib.load(str(out / f"sample_{i:03d}.nii.gz")).shape == (96, 96, 8, 16)
    assert _hidden(out) == []  # the lock goes with the run


def test_rerun_with_fewer_volumes_never_reports_stale_ones(tmp_path):
    out = tmp_path / "samples"
    assert medgen("sample", "-n", "3", *FAST, "--out", out).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = medgen("sample", "-n", "1", *FAST, "--out", out)
    assert_clean_error(proc, "--out", str(out), "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # refused: nothing touched
    proc = medgen("sample", "-n", "1", "--seed", "5", *FAST, "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.gif", "sample_000.json", "sample_000.nii.gz",
                                                     "sample_000.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 1 and summary["volumes"][0]["seed"] == 5


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "samples"
    run = _popen("sample", "-n", "3", *FAST, "--out", out)
    try:
        # SIGKILL while the first volume is being written (its temporary files exist)
        assert _wait_for(run, lambda: out.is_dir() and any(".tmp" in n for n in _hidden(out)))
        run.kill()
    finally:
        run.communicate(timeout=300)
    left = [n for n in _hidden(out) if ".tmp" in n]
    assert left and run.returncode == -signal.SIGKILL  # what a killed run leaves behind
    proc = medgen("sample", "-n", "1", *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _hidden(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.gif", "sample_000.json", "sample_000.nii.gz",
                                                     "sample_000.png", "summary.json"]


def test_each_volume_is_written_as_soon_as_it_is_decoded(tmp_path, monkeypatch):
    out = tmp_path / "samples"
    seen, real = [], api.decode_latent

    def decode(*args, **kwargs):
        seen.append(_volumes(out))
        if len(seen) == 3:
            raise RuntimeError("crash while decoding the third volume")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "decode_latent", decode)
    with pytest.raises(RuntimeError, match="third volume"):
        medgen_rt.sample("default", n=3, steps=2, energy=False, out=out)
    assert seen == [[], ["sample_000.json"], ["sample_000.json", "sample_001.json"]]
    # the crash keeps the two finished volumes whole, and leaves no temporary file or lock
    assert sorted(p.name for p in out.iterdir()) == [f"sample_00{i}.{ext}" for i in range(2)
                                                     for ext in ("gif", "json", "nii.gz", "png")]
    for i in range(2):
        side = json.loads((out / f"sample_00{i}.json").read_text())
        assert side["seed"] == i and side["energy"]["final"] is False  # the run did not finish
        assert nib.load(str(out / f"sample_00{i}.nii.gz")).shape == (96, 96, 8, 16)


@pytest.mark.parametrize("args, named", [
    (("--steps", "0"), "--steps"),
    (("--guidance", "nan"), "--guidance"),
    (("--guidance", "3"), "--guidance"),  # the default model has no condition to guide towards
    (("--seed", "-1"), "--seed"),
    (("-n", "0"), "-n"),
    (("-n", "-2"), "-n"),
    (("--engine", "onnx", "--steps", "0"), "--steps"),
])
def test_meaningless_numbers_are_refused_naming_the_option(tmp_path, args, named):
    proc = medgen("sample", *args, "--no-energy", "--quiet", "--out", tmp_path / "o")
    assert_clean_error(proc, named)
    assert not (tmp_path / "o").exists()


def test_guidance_with_the_null_condition_is_refused(tmp_path):
    proc = medgen("sample", "--model", "ct", "--unconditional", "--guidance", "2", "--no-energy",
                  "--out", tmp_path / "o")
    assert_clean_error(proc, "--guidance", "--unconditional")
    assert not (tmp_path / "o").exists()


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _assert_portable(folder, *local):
    for f in sorted(folder.glob("*.json")):
        text = f.read_text()
        for s in _strings(json.loads(text)):
            assert not os.path.isabs(s) and os.path.normpath(s) == s, (f.name, s)  # no dit/../vae
        for name in local:
            assert name not in text, (f.name, name)


def test_sidecars_hold_no_local_paths_and_say_what_memory_they_measure(tmp_path):
    # a run folder elsewhere, named as `medgen train` writes it (unet/ names its VQ-GAN as ../vae)
    runs = tmp_path / "runs"
    shutil.copytree(api.default_model_dir("default"), runs)
    kind = api.resolve_model("default")[0].name
    out = tmp_path / "out"
    proc = medgen("sample", "--model", runs / kind, *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = json.loads((out / "sample_000.json").read_text())
    assert side["model"] == f"../runs/{kind}" and side["vae"] == "../runs/vae"
    _assert_portable(out, str(tmp_path), str(api.default_model_dir("default").parent))
    # what is measured, and what was planned, named as such (on the CPU: the process's RSS)
    assert set(side["peak_process_rss_gb"]) == {"denoise", "decode"} and "peak_memory_gb" not in side
    assert set(side["plan"]["planned_tensor_peak_gb"]) == {"denoise", "decode"}
    assert "predicted_peak_gb" not in side["plan"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volumes"][0]["files"]["image"] == "sample_000.nii.gz"
    # an embedded model by its name, a mask relative to the output folder
    info = json.loads((api.default_model_dir("ct") / "tgca" / "model.json").read_text())
    mask = tmp_path / "maps" / "map.nii.gz"
    mask.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(info["geometry"]["image_shape"], np.uint8),
                             np.asarray(info["geometry"]["affine"])), str(mask))
    ct = tmp_path / "ct"
    proc = medgen("sample", "--model", "ct", "--masks", mask, *FAST, "--out", ct)
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = json.loads((ct / "sample_000.json").read_text())
    # the embedded CT model samples with its shipped student (default_models/ct-tiny/student)
    assert (side["model"], side["vae"], side["mask"]) == ("ct-tiny/student", "ct-tiny/vae", "../maps/map.nii.gz")
    _assert_portable(ct, str(tmp_path), str(api.default_model_dir("default").parent))


# ---- the ONNX engine: the same folder handling, progress and sidecars ------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from medgen_rt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("onnx") / "default"
    export_model("default", out, fp16=False)
    return out


def test_onnx_engine_shares_the_output_folder_rules(exported, tmp_path, monkeypatch):
    from medgen_rt.export import engine

    # volumes written as they are decoded
    out = tmp_path / "api"
    seen, real = [], engine.snap_to_codebook  # once per volume, as its decode starts

    def snap(*args, **kwargs):
        seen.append(_volumes(out))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "snap_to_codebook", snap)
    engine.OnnxEngine(exported).sample(n=2, steps=2, energy=False, out=out)
    assert seen == [[], ["sample_000.json"]]
    # a rerun into it is refused without --overwrite, naming --out; with it, exactly its files
    proc = medgen("sample", "--engine", "onnx", "--model", exported, *FAST, "--out", out)
    assert_clean_error(proc, "--out", str(out), "--overwrite")
    assert _volumes(out) == ["sample_000.json", "sample_001.json"]
    # a progress bar unless --quiet, and sidecars without local paths
    proc = medgen("sample", "--engine", "onnx", "--model", exported, "--steps", "2", "--no-energy", "--out", out,
                  "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "denoise" in proc.stderr and "2/2" in proc.stderr
    assert _volumes(out) == ["sample_000.json"] and _hidden(out) == []
    side = json.loads((out / "sample_000.json").read_text())
    assert side["model"] == os.path.relpath(exported, out) and "peak_process_rss_gb" in side
    _assert_portable(out, str(tmp_path), str(exported))
    quiet = medgen("sample", "--engine", "onnx", "--model", exported, *FAST, "--out", tmp_path / "q")
    assert quiet.returncode == 0 and "denoise" not in quiet.stderr
