"""Quality and copying while training (medgen_rt.train.monitor): the figures tell a model
that copies training subjects, one that makes new subjects and one that makes noise
apart; `medgen train dit` logs them, draws quality.png and keeps the best model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medgen_rt.data.phantoms import make_cine_phantom
from medgen_rt.evaluation.metrics import realism_row
from medgen_rt.train.latents import open_latents, write_latent_set
from medgen_rt.train.monitor import SampleMonitor, image_row
from medgen_rt.train.tasks import DenoiserTask, DiffusionSettings
from cli_run import medgen

SHAPE = (8, 4, 8, 8, 4)  # latent (C, Z, H, W, T)


def _phantom_latent(seed: int) -> torch.Tensor:
    """A cine phantom squeezed to the latent grid, the same picture in every channel."""
    v = torch.from_numpy(make_cine_phantom(seed, shape=(32, 32, 4), n_frames=8).image).float()
    v = v.permute(2, 3, 0, 1)[None]  # (1, Z, T, X, Y)
    v = F.interpolate(v, size=(4, 8, 8), mode="area")[0]  # (Z, T, X, Y) -> (4, 4, 8, 8)
    v = v.permute(0, 2, 3, 1)  # (Z, X, Y, T)
    v = (v - v.min()) / (v.max() - v.min()) * 2 - 1
    return v[None].repeat(SHAPE[0], 1, 1, 1, 1).contiguous()


class PassThroughVAE(nn.Module):
    """Decodes a latent (C, Z, X, Y, T) as its first channel in image layout (X, Y, Z, T),
    doubled in-plane so that slices hold several 8x8 patches for local realism: the
    monitor then scores the latents themselves."""

    class _Q:
        @staticmethod
        def lookup(z):
            return None, z

    quantizer = _Q()

    def decode(self, z):
        image = z[:, :1].permute(0, 1, 3, 4, 2, 5)
        return image.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class ToTargets(nn.Module):
    """A 'denoiser' whose Euler flow ends exactly on given latents: v = (x_t - x0) / t."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.targets = targets

    def forward(self, x, t):
        tt = (t.float() / 1000.0).reshape(-1, *([1] * (x.dim() - 1)))
        x0 = self.targets[: x.shape[0]].to(x)
        return (x - x0) / tt.clamp_min(1e-6)


class Still(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    items = [(f"s{i:02d}", _phantom_latent(i), None) for i in range(30)]
    write_latent_set(root, items, scale_factor=1.0, extra={"modality": "cmr"})
    sets = open_latents(root)
    train, val = sets.subset(range(20)), sets.subset(range(20, 30))
    return DenoiserTask(nn.Identity(), train, val, DiffusionSettings(objective="flow"), torch.device("cpu"), {})


def test_monitor_tells_copies_new_subjects_and_noise_apart(task):
    mon = SampleMonitor(task, PassThroughVAE(), n_samples=6, steps=4, n_train_refs=20)
    copies = torch.stack([task.train_set.load(i)["latent"] for i in range(6)])
    fresh = torch.stack([_phantom_latent(100 + i) for i in range(6)])
    copied, new, noise = (mon.evaluate(ToTargets(copies)), mon.evaluate(ToTargets(fresh)), mon.evaluate(Still()))
    assert copied["copy_rate"] == 1.0
    assert new["copy_rate"] <= 0.5
    assert new["realism"] > 0.9
    assert noise["realism"] < 0.5 * new["realism"]
    assert noise["mmd2"] > new["mmd2"]
    print({k: (copied[k], new[k], noise[k]) for k in ("realism", "local_realism")})
    assert new["local_realism"] > 0.8 and noise["local_realism"] < 0.6 * new["local_realism"]


def test_image_row_pools_space_and_keeps_time():
    img = torch.rand(1, 96, 96, 8, 16) * 2 - 1
    row = image_row(img)
    assert row.shape == (48 * 48 * 4 * 16,)
    # area pooling by 2 on X, Y, Z by hand, every frame kept, then the same band-pass
    v01 = ((img[0] + 1) / 2).numpy()
    pooled = v01.reshape(48, 2, 48, 2, 4, 2, 16).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(row, realism_row(pooled, pooled.shape), atol=1e-5)


@pytest.fixture(scope="module")
def vae_latents(tmp_path_factory):
    """A (randomly initialised) tiny cine VQ-GAN run and latents that name it."""
    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.train import checkpoint as ckpt

    root = tmp_path_factory.mktemp("vae_run")
    torch.manual_seed(0)
    vae = build_vqgan("cmr-tiny")
    ckpt.write_model_files(root / "vae", {"model": ckpt.state_dict_tensors(vae)}, None,
                           {"kind": "vqgan", "config": vae.config_dict(), "modality": "cmr"})
    g = torch.Generator().manual_seed(0)
    items = [(f"s{i:02d}", torch.randn(SHAPE, generator=g) * 0.5 + 0.1 * i, None) for i in range(30)]
    write_latent_set(root / "latents", items, scale_factor=1.5,
                     extra={"modality": "cmr", "vae_run": str(root / "vae")})
    return root / "latents"


def _config(tmp_path):
    import yaml

    cfg = {"name": "test", "modality": "cmr",
           "dit": {"model": "dit4d-tiny",
                   "model_overrides": {"input_size": "auto", "patch_size": [1, 2, 2, 2], "hidden_size": 32,
                                       "num_heads": 2, "depth": 1},
                   "diffusion": {"objective": "flow"},
                   "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 4, "log_every": 2,
                             "val_every": 2, "ema_decay": 0.9, "monitor_samples": 2, "monitor_steps": 2}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_logs_sample_figures_draws_curves_and_keeps_best(tmp_path, vae_latents):
    out = tmp_path / "run"
    proc = medgen("train", "dit", "--config", _config(tmp_path), "--latents", vae_latents, "--out", out, "--quiet",
                  "--no-energy", "--device", "cpu", "--keep-best", "1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    monitored = [r for r in rows if r.get("sample_realism")]
    assert [int(r["step"]) for r in monitored] == [0, 2, 4]
    for r in monitored:
        assert 0.0 <= float(r["sample_copy_rate"]) <= 1.0 and np.isfinite(float(r["sample_realism"]))
        assert "sample_local_realism" in r
    from PIL import Image

    assert Image.open(out / "quality.png").size[0] > 100
    best = json.loads((out / "best" / "model.json").read_text())
    def figure(r):  # local realism where measured, as _best_score decides
        local = float(r["sample_local_realism"] or "nan")
        return local if np.isfinite(local) else float(r["sample_realism"])

    realisms = {int(r["step"]): figure(r) for r in monitored if int(r["step"]) > 0}
    assert best["selected"]["step"] == min(realisms, key=lambda s: (abs(1 - realisms[s]), s))
    from medgen_rt.models import load_model

    load_model(out / "best")  # an ordinary model folder


def test_monitor_needs_the_vae_run(tmp_path, vae_latents):
    import shutil

    latents = tmp_path / "latents"
    shutil.copytree(vae_latents, latents)
    index = json.loads((latents / "latents.json").read_text())
    index["vae_run"] = str(tmp_path / "nowhere")
    (latents / "latents.json").write_text(json.dumps(index))
    proc = medgen("train", "dit", "--config", _config(tmp_path), "--latents", latents, "--out", tmp_path / "run",
                  "--quiet", "--no-energy", "--device", "cpu")
    assert proc.returncode == 2 and "monitor_samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_best_model_is_chosen_by_dice_when_the_model_follows_maps():
    from medgen_rt.train.loop import _best_score

    # a control adapter: the higher mean Dice wins even with realism further from 1
    assert _best_score({"realism": 1.0, "dice_blood": 0.70, "dice_myocardium": 0.50}) < \
        _best_score({"realism": 0.8, "dice_blood": 0.80, "dice_myocardium": 0.60})
    assert _best_score({"realism": 1.0, "dice_blood": float("nan"), "dice_myocardium": 0.9}) == -np.inf
    # others: realism closest to 1 (copies and averages score above it)
    assert _best_score({"realism": 0.95}) > _best_score({"realism": 1.10}) > _best_score({"realism": 0.5})
    # local realism, when measured, decides: the whole-volume figure rewards blurry samples
    assert _best_score({"realism": 0.52, "local_realism": 0.95}) > _best_score({"realism": 0.99, "local_realism": 0.74})
    for missing in (float("nan"), None):
        assert _best_score({"realism": 0.95, "local_realism": missing}) == _best_score({"realism": 0.95})
