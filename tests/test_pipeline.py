"""The user's workflow end to end on tiny phantoms: phantom -> train vae ->
encode -> train dit -> train control (TGCA on CT), each through the CLI."""
from __future__ import annotations

import json

import nibabel as nib
import yaml

from medgen_rt.train.latents import open_latents
from cli_run import medgen


def _medgen(*args, ok=True):
    proc = medgen(*args)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tiny_config(tmp_path, preset: str, **data) -> str:
    from medgen_rt.train.config import load_config

    cfg, _ = load_config(preset)
    cfg["data"].update(data)
    fast = {"steps": 3, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "val_every": 3, "warmup_steps": 0,
            "monitor_samples": 0}
    for stage in ("vae", "dit", "control", "unet"):
        if stage in cfg:
            cfg[stage]["train"].update(fast)
    path = tmp_path / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_ct_pipeline_with_tgca(tmp_path):
    data, runs = tmp_path / "ct", tmp_path / "runs"
    _medgen("phantom", "ct", "--n", "3", "--out", str(data), "--shape", "32", "32", "16",
            "--spacing", "11.2", "11.2", "16", "--quiet")
    cfg = _tiny_config(tmp_path, "ct-tiny", crop=[16, 16, 16])
    common = ["--quiet", "--no-energy", "--device", "cpu"]
    _medgen("train", "vae", "--config", cfg, "--data", str(data), "--out", str(runs / "vae"), *common)
    vae_info = json.loads((runs / "vae" / "model.json").read_text())
    assert vae_info["kind"] == "vqgan" and vae_info["modality"] == "ct"

    _medgen("encode", "--vae", str(runs / "vae"), "--data", str(data), "--out", str(runs / "lat"), "--quiet")
    lat = open_latents(runs / "lat")
    assert len(lat) == 3 and lat.latent_shape == (8, 8, 8, 4) and lat.has_masks and lat.scale_factor > 0
    assert lat.load(0)["mask"].shape == (32, 32, 16)

    _medgen("train", "dit", "--config", cfg, "--latents", str(runs / "lat"), "--out", str(runs / "dit"), *common)
    assert json.loads((runs / "dit" / "model.json").read_text())["config"]["input_size"] == [8, 8, 4]

    _medgen("train", "control", "--config", cfg, "--latents", str(runs / "lat"), "--base", str(runs / "dit"),
            "--out", str(runs / "tgca"), *common)
    info = json.loads((runs / "tgca" / "model.json").read_text())
    assert info["kind"] == "tgca" and info["mask_labels"] == [1, 2, 3, 4, 5, 6]
    assert info["base"]["kind"] == "dit"

    # the MedLoRD baseline on the same latents: U-Net, then ControlNet on the masks
    _medgen("train", "unet", "--config", cfg, "--latents", str(runs / "lat"), "--out", str(runs / "unet"), *common)
    _medgen("train", "control", "--config", cfg, "--latents", str(runs / "lat"), "--base", str(runs / "unet"),
            "--out", str(runs / "controlnet"), *common)
    info = json.loads((runs / "controlnet" / "model.json").read_text())
    assert info["kind"] == "controlnet" and info["base"]["kind"] == "unet"
    assert info["config"]["mask_downsample"] == 4 and info["config"]["mask_channels"] == 6

    # mask-conditioned sampling with guidance; the mask is written beside the volume
    samples = tmp_path / "samples"
    p = _medgen("sample", "--model", str(runs / "tgca"), "--masks", str(data / "masks" / "ct_001.nii.gz"),
                "--steps", "3", "--guidance", "2.0", "--n", "2", "--out", str(samples), "--no-energy", "--quiet")
    side = json.loads((samples / "sample_001.json").read_text())
    assert side["kind"] == "tgca" and side["guidance"] == 2.0 and side["mask"].endswith("ct_001.nii.gz")
    assert sorted(x.name for x in samples.iterdir()) == sorted(
        [f"sample_00{i}{ext}" for i in (0, 1) for ext in (".json", ".nii.gz", ".png", "_mask.nii.gz")]
        + ["summary.json"])
    # a mask of the wrong shape or with unknown labels: a clear error, no files
    import nibabel as nib
    import numpy as np

    bad = tmp_path / "bad_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), str(bad))
    p = _medgen("sample", "--model", str(runs / "tgca"), "--masks", str(bad), "--out", str(tmp_path / "s2"),
                "--no-energy", ok=False)
    assert p.returncode == 2 and "mask shape (16, 16, 16)" in p.stderr and not (tmp_path / "s2").exists()
    wrong = tmp_path / "wrong_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32, 16), 9, np.uint8), np.eye(4)), str(wrong))
    p = _medgen("sample", "--model", str(runs / "tgca"), "--masks", str(wrong), "--out", str(tmp_path / "s3"),
                "--no-energy", ok=False)
    assert p.returncode == 2 and "labels [9]" in p.stderr and not (tmp_path / "s3").exists()

    # every finished run loads back as a network (what sampling will do)
    from medgen_rt.models import load_model

    for run, kind in (("vae", "vqgan"), ("dit", "dit"), ("tgca", "tgca"), ("unet", "unet"),
                      ("controlnet", "controlnet")):
        model, loaded = load_model(runs / run)
        assert loaded["kind"] == kind and sum(p.numel() for p in model.parameters()) > 0


def test_cmr_pipeline(tmp_path):
    data, runs = tmp_path / "cmr", tmp_path / "runs"
    _medgen("phantom", "cmr4d", "--n", "3", "--out", str(data), "--shape", "32", "32", "4", "--frames", "8",
            "--quiet")
    cfg = _tiny_config(tmp_path, "cmr4d-tiny", frames=8, crop=[16, 16])
    common = ["--quiet", "--no-energy", "--device", "cpu"]
    _medgen("train", "vae", "--config", cfg, "--data", str(data), "--out", str(runs / "vae"), *common)
    _medgen("encode", "--vae", str(runs / "vae"), "--data", str(data), "--out", str(runs / "lat"), "--quiet")
    lat = open_latents(runs / "lat")
    assert lat.latent_shape == (8, 4, 8, 8, 2) and not lat.has_masks  # (C, Z, X/4, Y/4, T/4)
    # a patch that does not divide the latent grid: a clear error before training
    bad_cfg = yaml.safe_load(open(cfg))
    bad_cfg["dit"]["model_overrides"]["patch_size"] = [1, 3, 3, 2]
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad_cfg))
    bad = _medgen("train", "dit", "--config", str(bad_path), "--latents", str(runs / "lat"),
                  "--out", str(runs / "dit"), *common, ok=False)
    assert bad.returncode == 2 and "not divisible by the patch size" in bad.stderr
    assert not (runs / "dit").exists()
    _medgen("train", "dit", "--config", cfg, "--latents", str(runs / "lat"), "--out", str(runs / "dit"), *common)
    # the embedded default's recipe: a 3D U-Net over (Z, X, Y) with the latent frames folded into channels
    _medgen("train", "unet", "--config", cfg, "--latents", str(runs / "lat"), "--out", str(runs / "unet"), *common)
    assert json.loads((runs / "unet" / "model.json").read_text())["config"]["frames"] == 2
    _medgen("sample", "--model", str(runs / "unet"), "--steps", "2", "--out", str(tmp_path / "s"), *common[:2])
    assert nib.load(tmp_path / "s" / "sample_000.nii.gz").shape == (32, 32, 4, 8)
    # a latent grid the U-Net cannot halve twice: refused before a run folder exists
    deep = yaml.safe_load(open(cfg))
    deep["unet"]["model_overrides"]["channels"] = [16, 16, 16, 16]
    deep["unet"]["model_overrides"]["attention_levels"] = [False, False, False, True]
    deep["unet"]["model_overrides"]["num_head_channels"] = [0, 0, 0, 16]
    (tmp_path / "deep.yaml").write_text(yaml.safe_dump(deep))
    bad = _medgen("train", "unet", "--config", str(tmp_path / "deep.yaml"), "--latents", str(runs / "lat"),
                  "--out", str(runs / "unet8"), *common, ok=False)
    assert bad.returncode == 2 and "not divisible by 8" in bad.stderr and not (runs / "unet8").exists()
    # control training needs masks: these latents have none
    with_control = yaml.safe_load(open(cfg))
    with_control["control"] = {"mask_labels": [1, 2, 3], "train": {"steps": 2}}
    ctl_cfg = tmp_path / "ctl.yaml"
    ctl_cfg.write_text(yaml.safe_dump(with_control))
    p = _medgen("train", "control", "--config", str(ctl_cfg), "--latents", str(runs / "lat"),
                "--base", str(runs / "dit"), "--out", str(runs / "ctl"), *common, ok=False)
    assert p.returncode == 2 and "encoded without them" in p.stderr and not (runs / "ctl").exists()


def test_vae_on_empty_folder_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    p = _medgen("train", "vae", "--config", "ct-tiny", "--data", str(tmp_path / "empty"),
                "--out", str(tmp_path / "run"), "--quiet", "--no-energy", ok=False)
    assert p.returncode == 2 and "empty" in p.stderr and not (tmp_path / "run").exists()
