"""Networks of medgen_rt: VQ-GAN autoencoders, DiT3D/DiT4D, the TGCA adapter,
and MONAI's U-Net/ControlNet baseline. Every network calls the op registry,
never a kernel directly.

A trained model is described by a small dict (model.json in a run folder):
{"kind": "vqgan" | "dit" | "unet" | "tgca" | "controlnet", "config": {...}, ...};
:func:`build_model` rebuilds the network from it and :func:`load_model` also
loads the weights of a run folder.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

KINDS = ("vqgan", "dit", "unet", "tgca", "controlnet")


def build_model(info: dict, base: nn.Module = None) -> nn.Module:
    kind = info.get("kind")
    cfg = dict(info.get("config") or {})
    if kind == "dit":
        from medgen_rt.models.dit import DiT, DiTConfig

        return DiT(DiTConfig(**cfg))
    if kind == "unet":
        from medgen_rt.models.unet import UNetConfig, UNetDenoiser

        return UNetDenoiser(UNetConfig(**cfg))
    if kind == "vqgan":
        from medgen_rt.models.vqgan import build_vqgan

        return build_vqgan(cfg)
    if kind in ("tgca", "controlnet"):
        base = base if base is not None else build_model(info["base"])
        if kind == "tgca":
            from medgen_rt.models.tgca import TGCA

            return TGCA(base, **cfg)
        import inspect

        from medgen_rt.models.unet import ControlledUNet

        unknown = sorted(set(cfg) - set(inspect.signature(ControlledUNet).parameters) - {"base"})
        if unknown:
            raise ValueError(f"controlnet config: unknown setting(s) {', '.join(unknown)}")
        return ControlledUNet(base, **cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def load_model(run_dir, prefer_ema: bool = True) -> tuple:
    """(network with weights, model info) of a finished run folder."""
    from medgen_rt.models.weights import read_model_weights

    weights, info = read_model_weights(Path(run_dir), prefer_ema=prefer_ema)
    model = build_model(info)
    missing, unexpected = model.load_state_dict(weights["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir}: weights do not fit the recorded model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, info
