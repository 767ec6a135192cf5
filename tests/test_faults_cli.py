"""Every verb under bad input and faults (issue #13: items 6, 7 and 8 for the CLI): an output that
is a file, read-only or on a full disk, names too long or not UTF-8, arguments that would train
nothing, per-verb help, run folders that restart, metrics and file modes across sessions. Each
ends as one line `medgen VERB: error: ...` naming the file or option, exit 2, no traceback,
and nothing half written."""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_run import assert_clean_error, medgen
from test_train import _config, latents  # noqa: F401  (the tiny 4D latents fixture and its DiT config)

VERBS = ("train", "encode", "export", "eval", "phantom")


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A random-weight ct-tiny VQ-GAN run (ct/vae) and two 32x32x16 CT phantoms (ct/data)."""
    from medgen_rt.data.phantoms import write_ct_dataset
    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.train.checkpoint import write_model_files

    root = tmp_path_factory.mktemp("ct")
    torch.manual_seed(0)
    vae = build_vqgan("ct-tiny").eval()
    write_model_files(root / "vae", {"model": vae.state_dict()}, None,
                      {"kind": "vqgan", "config": vae.config_dict(), "modality": "ct"})
    write_ct_dataset(root / "data", 2, seed=0, quiet=True, shape=(32, 32, 16))
    return root


def _command(verb: str, out, ct: Path, latents: Path, config: Path) -> list:
    """The cheapest real command line of `verb` writing to `out`."""
    return {
        "train": ["train", "dit", "--config", config, "--latents", latents, "--out", out, "--steps", "2",
                  "--quiet", "--no-energy", "--device", "cpu"],
        "encode": ["encode", "--vae", ct / "vae", "--data", ct / "data", "--out", out, "--quiet", "--device", "cpu"],
        "export": ["export", "onnx", "--model", "default", "--out", out, "--no-fp16", "--quiet"],
        "eval": ["eval", "quality", "--real", ct / "data", "--synthetic", ct / "data", "--out", out, "--steps", "5",
                 "--quiet", "--device", "cpu"],
        "phantom": ["phantom", "ct", "--n", "1", "--shape", "16", "16", "8", "--out", out, "--quiet"],
        "sample": ["sample", "--steps", "2", "--no-energy", "--quiet", "--out", out],
    }[verb]


def _hidden(folder: Path) -> list:
    """Temporary names (leading dot) anywhere under folder: what a failed writer left behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make folder unwritable for the commands run inside the block: chmod 0o555, or for root
    (which ignores modes) the immutable attribute; skip where neither holds."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    else:
        pytest.skip("running as root without chattr: no way to make a folder unwritable")
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the folder stayed writable")
        yield folder
    finally:
        undo()


def _medgen_on_small_disk(mount: Path, size: str, *args) -> tuple:
    """`medgen ARGS` with `mount` a tmpfs of `size` (a real full disk: every writer meets ENOSPC
    from the kernel), in a user namespace; returns (process, hidden names left under mount)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare: cannot mount a small tmpfs without root")
    mount.mkdir(parents=True, exist_ok=True)
    left = mount.parent / (mount.name + ".left")
    script = ('mount -t tmpfs -o size="$SIZE" tmpfs "$MNT" || exit 97; "$@"; rc=$?; '
              'find "$MNT" -name ".*" > "$LEFT"; exit $rc')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIZE": size, "MNT": str(mount), "LEFT": str(left)}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "medgen_rt",
                           *map(str, args)], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode == 97 or "unshare:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[-200:]}")
    return proc, [line for line in left.read_text().splitlines() if line]


# ---- item 6: outputs that cannot be written ------------------------------------------------------

@pytest.mark.parametrize("verb", VERBS)
def test_out_that_is_a_file_is_refused_before_any_work(verb, tmp_path, ct, latents):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        proc = medgen(*_command(verb, out, ct, latents, _config(tmp_path)))
        assert_clean_error(proc, "--out", str(out), "cannot write", "not a folder")
    assert blocker.read_text() == "keep me" and _hidden(tmp_path) == []


@pytest.mark.parametrize("verb", VERBS)
def test_read_only_output_is_refused_before_any_work(verb, tmp_path, ct, latents):
    config = _config(tmp_path)
    with _read_only(tmp_path / "ro") as ro:
        proc = medgen(*_command(verb, ro / "out", ct, latents, config))
        # "cannot write" is the up-front check's wording: the refusal came before the work
        assert_clean_error(proc, "--out", str(ro / "out"), "cannot write")
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("verb", ("train", "encode", "export", "eval", "sample"))
def test_full_disk_ends_in_one_line_and_leaves_no_temporary_files(verb, tmp_path, ct, latents):
    config = _config(tmp_path, steps=4, checkpoint_every=2, val_every=0)
    disk = tmp_path / "disk"
    size = "16k" if verb == "encode" else "64k"  # less than each verb writes
    proc, left = _medgen_on_small_disk(disk, size, *_command(verb, disk / "out", ct, latents, config))
    assert_clean_error(proc, "no space left on device", str(disk))
    assert left == []


def test_full_disk_reported_by_a_writer_library_names_the_file(tmp_path, latents, monkeypatch, capsys):
    """safetensors reports ENOSPC as its own SafetensorError: it still ends as the one-line error
    (injected in-process, so this runs where no tmpfs can be mounted)."""
    from safetensors import SafetensorError

    import medgen_rt.train.checkpoint as ckpt
    from medgen_rt.cli import main

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    out = tmp_path / "run"
    rc = main(["train", "dit", "--config", str(_config(tmp_path)), "--latents", str(latents), "--out", str(out),
               "--steps", "3", "--quiet", "--no-energy", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left on device" in err and "weights.safetensors" in err, err
    assert _hidden(out) == []


def test_long_out_names_fit_the_temporary_names(tmp_path, ct):
    from medgen_rt.io.sidecar import write_json_atomic

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "p" * (limit - 1)  # legal: one byte under the file system's limit
    proc = medgen("phantom", "ct", "--n", "1", "--shape", "16", "16", "8", "--out", tmp_path / name, "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = medgen("encode", "--vae", ct / "vae", "--data", ct / "data", "--out", tmp_path / ("e" * (limit - 1)),
                  "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    write_json_atomic(tmp_path / ("j" * (limit - 5) + ".json"), {"ok": True})  # atomic_path's own temp name
    assert _hidden(tmp_path) == [] and len(list(tmp_path.iterdir())) == 3
    too_long = tmp_path / ("x" * (limit + 1))
    proc = medgen("encode", "--vae", ct / "vae", "--data", ct / "data", "--out", too_long, "--quiet")
    assert_clean_error(proc, "--out", "cannot write", f"at most {limit}")


def test_names_that_are_not_utf8_fail_first_and_leave_nothing(tmp_path, ct):
    odd = tmp_path / os.fsdecode(b"data-\xff")
    shutil.copytree(ct / "data", odd)
    out = tmp_path / "latents"
    proc = medgen("encode", "--vae", ct / "vae", "--data", odd, "--out", out, "--quiet", "--device", "cpu")
    assert_clean_error(proc, "--data", "data-\\xff", "not valid UTF-8")
    assert not out.exists() and _hidden(tmp_path) == []
    # a volume inside the folder with such a name: found only when its name is recorded, at the end
    inner = tmp_path / "inner"
    shutil.copytree(ct / "data", inner)
    for sub in ("images", "masks"):
        (inner / sub / "ct_001.nii.gz").rename(inner / sub / os.fsdecode(b"ct_\xff.nii.gz"))
    proc = medgen("encode", "--vae", ct / "vae", "--data", inner, "--out", out, "--quiet", "--device", "cpu")
    assert_clean_error(proc, "ct_\\xff", "not valid UTF-8")
    assert not out.exists() and _hidden(tmp_path) == []


def test_symlink_loops_in_data_are_errors_not_skipped(tmp_path, ct):
    data = tmp_path / "data"
    shutil.copytree(ct / "data", data)
    loop = data / "images" / "ct_009.nii.gz"
    loop.symlink_to(loop.name)
    proc = medgen("encode", "--vae", ct / "vae", "--data", data, "--out", tmp_path / "lat", "--quiet",
                  "--device", "cpu")
    assert_clean_error(proc, str(loop), "loops")
    proc = medgen("train", "vae", "--config", "ct-tiny", "--data", data, "--out", tmp_path / "vae", "--steps", "1",
                  "--quiet", "--no-energy", "--device", "cpu")
    assert_clean_error(proc, str(loop), "loops")
    assert not (tmp_path / "lat").exists() and not (tmp_path / "vae").exists()


# ---- item 7: arguments that would train nothing or record a wrong figure -------------------------

@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-1"), ("--batch-size", "0"),
                                           ("--checkpoint-every", "0"), ("--lr", "0"), ("--lr", "-0.001"),
                                           ("--lr", "nan"), ("--seed", "-1"), ("--country", "XYZ")])
def test_train_refuses_arguments_that_would_train_nothing(option, value, tmp_path, latents):
    out = tmp_path / "run"
    proc = medgen("train", "dit", "--config", _config(tmp_path), "--latents", latents, "--out", out, option, value,
                  "--quiet", "--device", "cpu")
    assert_clean_error(proc, option, value)
    assert not out.exists()


@pytest.mark.parametrize("setting", [{"checkpoint_every": 0}, {"log_every": 0}, {"lr": "1e-4"}])
def test_train_refuses_config_settings_that_fail_mid_run(setting, tmp_path, latents):
    out = tmp_path / "run"
    config = _config(tmp_path, **setting)
    proc = medgen("train", "dit", "--config", config, "--latents", latents, "--out", out, "--quiet",
                  "--no-energy", "--device", "cpu")
    assert_clean_error(proc, str(config), next(iter(setting)))
    assert not out.exists()


def test_sample_refuses_an_unknown_country(tmp_path):
    proc = medgen("sample", "--steps", "2", "--quiet", "--country", "XYZ", "--out", tmp_path / "s")
    assert_clean_error(proc, "--country", "XYZ")
    assert not list(tmp_path.rglob("sample_*"))


def test_run_killed_before_its_first_checkpoint_restarts_with_resume(tmp_path, latents):
    """Killed before any checkpoint, a run folder holds a config and metrics but no weights. Plain
    `train` refuses it (it is not empty) and says to pass --resume; --resume starts it again from
    step 0 in the same folder, saying so, instead of failing for want of a checkpoint."""
    config = _config(tmp_path, steps=100000, checkpoint_every=100000, val_every=0, log_every=1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medgen_rt", "train", "dit", "--config", str(config), "--latents", str(latents),
           "--out", str(out), "--quiet", "--no-energy", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) > 3):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "latest").exists()

    again = medgen(*cmd[3:], "--steps", "3")
    assert_clean_error(again, str(out), "--resume")
    resumed = medgen(*cmd[3:], "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting from step 0" in resumed.stderr
    steps = [int(r["step"]) for r in csv.DictReader((out / "metrics.csv").open())]
    assert steps == [1, 2, 3] and (out / "weights.safetensors").is_file()


# ---- item 8 and the rest of 7: what a run records -------------------------------------------------

def test_metrics_seconds_continue_after_resume(tmp_path, latents):
    config = _config(tmp_path, steps=4, checkpoint_every=2, val_every=0, log_every=1)
    out = tmp_path / "run"
    base = ["train", "dit", "--config", config, "--latents", latents, "--out", out, "--quiet", "--no-energy",
            "--device", "cpu"]
    for extra in ((), ("--resume", "--steps", "8")):
        proc = medgen(*base, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[4] > seconds[3] > 0, seconds


def test_written_files_follow_the_umask(tmp_path, latents):
    out = tmp_path / "run"
    before = os.umask(0o027)
    try:
        proc = medgen("train", "dit", "--config", _config(tmp_path, steps=2, val_every=0), "--latents", latents,
                      "--out", out, "--quiet", "--no-energy", "--device", "cpu")
    finally:
        os.umask(before)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [out / "weights.safetensors", out / "ema.safetensors", out / "model.json", out / "metrics.csv",
             *sorted((out / "checkpoints").glob("step_*/*"))]
    assert len(files) > 5
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o640" for f in files}


@pytest.mark.parametrize("kind, has, lacks", [
    ("vae", ["--data", "--val-data"], ["--latents", "--base", "--monitor-samples", "--keep-best"]),
    ("dit", ["--latents", "--monitor-samples", "--keep-best"], ["--data", "--base"]),
    ("unet", ["--latents"], ["--data", "--base"]),
    ("control", ["--latents", "--base"], ["--data", "--val-data"]),
])
def test_train_help_lists_only_the_options_of_its_kind(kind, has, lacks):
    proc = medgen("train", kind, "--help")
    assert proc.returncode == 0 and f"medgen train {kind}" in proc.stdout
    for option in ("--config", "--out", "--resume", "--steps", *has):
        assert option in proc.stdout, (option, proc.stdout)
    for option in lacks:
        assert option not in proc.stdout, (option, proc.stdout)


def test_eval_and_encode_help_are_plain_and_complete():
    text = medgen("eval", "--help").stdout
    assert "``" not in text and "DESIGN.md" not in text and "README" in text
    lines = medgen("encode", "--help").stdout.splitlines()
    for option, metavar in (("--device", "DEVICE"), ("--quiet", "")):
        line = next(line.split() for line in lines if line.strip().startswith(option))
        assert line[1 + bool(metavar):], f"{option} has no help text"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_info_without_a_gpu_says_so():
    proc = medgen("info")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "gpus seen" in line)
    assert "no GPU" in line and "insufficient" not in line, line

