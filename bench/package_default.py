"""Packages trained runs as an embedded default model (python/medgen_rt/default_models/NAME):
the denoiser's shipped weights and the VQ-GAN, in float16 (half the size; the networks run
in float32 after loading), with their config, metrics, energy and curves.

    python bench/package_default.py --denoiser runs/dit --vae runs/vae --name cmr4d-tiny

The denoiser folder is named by its kind (dit/, tgca/, ...); its model.json points at
../vae. A TGCA run carries its base DiT's weights, so no separate base folder is needed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from medgen_rt.models.weights import load_weights
from medgen_rt.train.checkpoint import save_weights

ROOT = Path(__file__).resolve().parents[1] / "python" / "medgen_rt" / "default_models"
RECORDS = ("config.yaml", "config_resume.yaml", "metrics.csv", "energy.json", "quality.png")


def half(tensors: dict) -> dict:
    """float32 tensors -> float16 where they fit (EMA counters of a codebook may not)."""
    out = {}
    for k, v in tensors.items():
        fits = v.is_floating_point() and (v.numel() == 0 or float(v.abs().max()) < 6e4)
        out[k] = v.half().contiguous() if fits else v
    return out


def package(run: Path, dest: Path, weights: str, info_update: dict) -> None:
    dest.mkdir(parents=True)
    save_weights(dest / weights, half(load_weights(run / weights)))
    info = {**json.loads((run / "model.json").read_text()), **info_update}
    (dest / "model.json").write_text(json.dumps(info, indent=2))
    for name in RECORDS:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--denoiser", type=Path, required=True)
    p.add_argument("--vae", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--weights", choices=["ema", "weights"], default="ema",
                   help="which of the denoiser's weights to ship (default: EMA)")
    p.add_argument("--frame-duration", type=float, metavar="SECONDS",
                   help="cine: geometry.frame_duration for a run whose latents were encoded before `medgen "
                        "encode` recorded it")
    a = p.parse_args(argv)
    dest = ROOT / a.name
    if dest.exists():
        shutil.rmtree(dest)
    kind = json.loads((a.denoiser / "model.json").read_text())["kind"]
    update = {"vae_run": "../vae"}
    if a.frame_duration is not None:
        geometry = json.loads((a.denoiser / "model.json").read_text())["geometry"]
        update["geometry"] = {**geometry, "frame_duration": a.frame_duration}
    package(a.denoiser, dest / kind, f"{a.weights}.safetensors", update)
    package(a.vae, dest / "vae", "weights.safetensors", {})
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
