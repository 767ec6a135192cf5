"""Loading the weights of a finished run folder (safetensors only: nothing is unpickled).

Used by :func:`medgen_rt.models.load_model`, sampling and training alike; it sits
below all of them, so models/ and sampling/ never import train/ (DESIGN.md section 2).
model.json and the weights file's path come from :mod:`medgen_rt.io.run_folder`;
writing weights and the training checkpoints stays in :mod:`medgen_rt.train.checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from medgen_rt.io.run_folder import model_weights_path, read_model_info, unflatten_modules

__all__ = ["load_weights", "check_finite", "read_model_weights"]


def load_weights(path: Path) -> dict:
    """The tensors of one safetensors file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def check_finite(path: Path, tensors: dict) -> None:
    """Raise ValueError naming the file and the tensor when weights hold NaN or Inf: a corrupt
    file would otherwise sample normal-looking garbage (all NaN weights decode to one constant volume)."""
    for key, value in tensors.items():
        if value.is_floating_point() or value.is_complex():
            bad = int(value.numel() - torch.isfinite(value).sum())
            if bad:
                raise ValueError(f"{path}: tensor {key} has {bad} non-finite value(s) (NaN/Inf) of "
                                 f"{value.numel()}; the weights are corrupt")


def read_model_weights(run_dir: Path, prefer_ema: bool = True) -> tuple:
    """({module: tensors}, model_info) of a finished run; EMA weights when present and preferred.
    Non-finite weights raise ValueError naming the file and the tensor."""
    run_dir = Path(run_dir)
    info = read_model_info(run_dir)
    path = model_weights_path(run_dir, prefer_ema)
    flat = load_weights(path)
    check_finite(path, {k: v for k, v in flat.items() if k.startswith("model/")})  # the network loaded
    return unflatten_modules(flat), info
