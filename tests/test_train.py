"""The training loop: run folder contents, exact resume after SIGKILL, DDP with
2 processes equal to 1 process, clear errors before training starts."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medgen_rt.models.weights import load_weights
from medgen_rt.train.latents import write_latent_set
from medgen_rt.train.loop import TrainSettings, ema_decay_at, global_batch_indices, lr_factor
from cli_run import medgen

SHAPE = (8, 4, 8, 8, 4)  # (C, Z, H, W, T): a small 4D latent


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    g = torch.Generator().manual_seed(0)
    items = [(f"s{i:02d}", torch.randn(SHAPE, generator=g) * 0.5 + 0.1 * i, None) for i in range(10)]
    write_latent_set(root, items, scale_factor=1.7, extra={"modality": "cmr"})
    return root


def _config(tmp_path, **train):
    settings = {"steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 3,
                "log_every": 1, "val_every": 6, "ema_decay": 0.9, "seed": 5, **train}
    cfg = {"name": "test", "modality": "cmr",
           "dit": {"model": "dit4d-tiny",
                   "model_overrides": {"input_size": "auto", "patch_size": [1, 2, 2, 2], "hidden_size": 32,
                                       "num_heads": 2, "depth": 2},
                   "diffusion": {"objective": "ddpm", "timesteps": 300}, "train": settings}}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_cmd(config, latents, out, *extra):
    return [sys.executable, "-m", "medgen_rt", "train", "dit", "--config", str(config), "--latents", str(latents),
            "--out", str(out), "--quiet", "--no-energy", "--device", "cpu", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run(cmd, cwd=None):
    if cmd[:3] == [sys.executable, "-m", "medgen_rt"]:
        proc = medgen(*cmd[3:], cwd=cwd, env=_env())
    else:  # torchrun
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_schedule_and_batches():
    s = TrainSettings(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1) and lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(99, s) == pytest.approx(0.1, abs=0.01)
    # every item once per epoch, and the same batches whatever asks for them
    seen = sum((global_batch_indices(10, 5, 0, k) for k in range(2)), [])
    assert sorted(seen) == list(range(10))
    assert global_batch_indices(10, 5, 0, 3) == global_batch_indices(10, 5, 0, 3)


def test_ema_warm_up_forgets_the_initial_weights():
    """The share of the initial weights left in the EMA after n updates is the product of the
    decays: with the warm-up it is gone after a short run, without it 0.999^n stays large."""
    left = np.cumprod([ema_decay_at(s, 0.999) for s in range(2500)])
    assert left[249] < 1e-3 and left[-1] < 1e-4
    assert 0.999 ** 2500 > 0.08
    assert ema_decay_at(10 ** 6, 0.999) == 0.999 and ema_decay_at(0, 0.999) == 0.1


def test_run_folder_contents(tmp_path, latents):
    out = tmp_path / "run"
    _run(_train_cmd(_config(tmp_path), latents, out))
    for name in ("config.yaml", "model.json", "weights.safetensors", "ema.safetensors", "metrics.csv", "energy.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "model.json").read_text())
    assert info["kind"] == "dit" and info["scale_factor"] == pytest.approx(1.7)
    assert info["config"]["input_size"] == [4, 8, 8, 4]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(0, 13))  # step 0: the untrained baseline
    assert rows[0]["val_loss"] and rows[6]["val_loss"] and float(rows[12]["val_loss"]) > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000012"
    # EMA differs from the raw weights after training
    raw, ema = load_weights(out / "weights.safetensors"), load_weights(out / "ema.safetensors")
    key = "model/blocks.0.attn.qkv.weight"
    assert not torch.allclose(raw[key], ema[key])


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, latents):
    config = _config(tmp_path, steps=30, checkpoint_every=2, val_every=0)
    straight = tmp_path / "straight"
    _run(_train_cmd(config, latents, straight))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(config, latents, killed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000004").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "weights.safetensors").exists()  # it really died mid-run
    _run(_train_cmd(config, latents, killed, "--resume"))

    a, b = load_weights(straight / "weights.safetensors"), load_weights(killed / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ea, eb = load_weights(straight / "ema.safetensors"), load_weights(killed / "ema.safetensors")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [int(r["step"]) for r in csv.DictReader((killed / "metrics.csv").open())]
    assert steps == list(range(1, 31))  # rows lost with the kill were dropped, none doubled


def test_ddp_two_processes_equal_one(tmp_path, latents):
    config = _config(tmp_path, steps=4, checkpoint_every=100, val_every=0, ema_decay=None)
    one = tmp_path / "one"
    _run(_train_cmd(config, latents, one))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "medgen_rt.train", "dit", "--config", str(config), "--latents", str(latents), "--out", str(two),
           "--quiet", "--no-energy", "--device", "cpu"]
    _run(cmd)
    a, b = load_weights(one / "weights.safetensors"), load_weights(two / "weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bad_inputs_fail_before_training(tmp_path, latents):
    import yaml

    def run(*args):
        return medgen("train", *args, "--quiet", "--no-energy", env=_env(), timeout=120)

    out = tmp_path / "r"
    p = run("dit", "--config", "no-such-preset", "--latents", str(latents), "--out", str(out))
    assert p.returncode == 2 and "unknown preset" in p.stderr and not out.exists()
    # a published preset whose latent size does not match these latents
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["dit"]["model"] = "dit4d-s"
    cfg["dit"]["model_overrides"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    p = run("dit", "--config", str(bad), "--latents", str(latents), "--out", str(out))
    assert p.returncode == 2 and "have shape (8, 4, 8, 8, 4) but the model expects (8, 6, 64, 64, 8)" in p.stderr
    assert not out.exists()
    p = run("dit", "--config", str(_config(tmp_path)), "--latents", str(tmp_path / "empty"), "--out", str(out))
    assert p.returncode == 2 and "not a latents folder" in p.stderr and not out.exists()
    p = run("control", "--config", str(_config(tmp_path)), "--latents", str(latents), "--out", str(out))
    assert p.returncode == 2 and "control" in p.stderr


@pytest.mark.parametrize("preset", ["ct-ds8-b2", "cmr4d-b", "medlord", "ct-tiny", "cmr4d-tiny"])
def test_presets_parse_and_build(preset):
    """Every shipped preset's settings and models are valid (built on the meta device: no memory)."""
    from medgen_rt.models.dit import DiT, dit_config
    from medgen_rt.models.unet import UNetDenoiser, unet_config
    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.train.config import load_config, preset_names
    from medgen_rt.train.tasks import DiffusionSettings

    assert preset in preset_names()
    cfg, _ = load_config(preset)
    for stage in ("vae", "dit", "control", "unet"):
        if stage in cfg:
            TrainSettings.from_dict(dict(cfg[stage].get("train", {})), stage)
            if "diffusion" in cfg[stage]:
                DiffusionSettings(**cfg[stage]["diffusion"])
    with torch.device("meta"):
        build_vqgan(cfg["vae"]["model"], **cfg["vae"].get("model_overrides", {}))
        if "dit" in cfg:
            overrides = {k: v for k, v in cfg["dit"].get("model_overrides", {}).items() if v != "auto"}
            DiT(dit_config(cfg["dit"]["model"], **overrides))
        if "unet" in cfg:
            UNetDenoiser(unet_config(cfg["unet"]["model"]))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, latents):
    config = _config(tmp_path, steps=100000, checkpoint_every=100000, val_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(config, latents, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() or len((out / "metrics.csv").read_text().splitlines()) < 4:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 3
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == step


def test_energy_is_metered_offline(tmp_path, latents):
    out = tmp_path / "run"
    cmd = [c for c in _train_cmd(_config(tmp_path, steps=3, val_every=0), latents, out) if c != "--no-energy"]
    _run(cmd + ["--country", "FRA"])
    energy = json.loads((out / "energy.json").read_text())
    assert energy["country"] == "FRA" and energy["kwh"] > 0 and energy["kg_co2e"] > 0
    assert energy["sessions"][0]["tool"] == "codecarbon OfflineEmissionsTracker"
