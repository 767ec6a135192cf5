"""Published checkpoints -> medgen_rt model folders (``medgen convert``).

    convert("voldit", ["vqgan.pth", "dit.pth"], "runs/voldit")       # + "tgca.pth"
    convert("cardiodit", ["vqgan.pth", "dit4d.pth"], "runs/cardiodit")
    convert("medlord", ["vqgan.pth", "ldm.pth"], "runs/medlord")     # + "controlnet.pth"

The checkpoints may come in any order: each is recognised by its tensor names.
The output folder holds ``vae/`` and ``dit/`` (or ``unet/``), plus ``tgca/`` or
``controlnet/`` for a mask-conditioned model, each a run folder (model.json +
weights.safetensors) that ``medgen sample --model OUT`` (or ``OUT/tgca``,
``OUT/controlnet``) takes.

Rules: files are read without unpickling code; EMA weights are taken when the
checkpoint has them (``raw_weights=True`` for the raw ones; MedLoRD's U-Net
follows ``unet_weights``, by default raw beside a ControlNet as the published
ControlNet code uses it, see convert/medlord.py); the configuration
is read from the tensors' shapes, the published YAML files (``configs``)
override it; every tensor is accounted for, and an unknown key, a missing key or
a wrong shape raises ValueError naming them. Where medgen_rt's networks would
compute something other than the published code, conversion stops unless
``allow_deviations`` (the difference is then recorded in model.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from medgen_rt.convert.common import (ConversionError, Weights, conversion_record, diffusion_settings,
                                      load_checkpoint, prepare_out, read_configs, scale_factor_of, select_weights,
                                      write_run)

SYSTEMS = ("voldit", "cardiodit", "medlord")
__all__ = ["SYSTEMS", "ConversionError", "ConvertOptions", "convert", "role_of"]


@dataclass
class ConvertOptions:
    raw_weights: bool = False
    scale_factor: Optional[float] = None
    num_heads: Optional[int] = None
    patch_size: Optional[Sequence[int]] = None
    latent_shape: Optional[Sequence[int]] = None  # spatial latent size
    mask_labels: Optional[Sequence[int]] = None
    allow_deviations: bool = False
    # MedLoRD's U-Net: "raw" | "ema"; None: raw beside a ControlNet, else as raw_weights
    unet_weights: Optional[str] = None


def role_of(tensors: dict) -> Optional[str]:
    """What a published state_dict is, from its tensor names."""
    keys = tensors.keys()
    if "quantizer.quantizer.embedding.weight" in keys or any(k.startswith("encoder.blocks.") for k in keys):
        return "vqgan"
    if any(k.startswith(("condition_embedder.", "base_model.", "adapter_scales.")) for k in keys):
        return "tgca"
    if "x_embedder.proj.weight" in keys:
        return "dit"
    if any(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.")) for k in keys):
        return "controlnet"
    if "conv_in.conv.weight" in keys and any(k.startswith("up_blocks.") for k in keys):
        return "unet"
    return None


def _module(system: str):
    if system == "voldit":
        from medgen_rt.convert import voldit as module
    elif system == "cardiodit":
        from medgen_rt.convert import cardiodit as module
    elif system == "medlord":
        from medgen_rt.convert import medlord as module
    else:
        raise ValueError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")
    return module


def _by_role(system: str, weights: Sequence[Weights], roles: Sequence[str]) -> dict:
    found: dict = {}
    for w in weights:
        role = role_of(w.tensors)
        if role is None:
            raise ConversionError(f"{w.path}: not a recognised {system} checkpoint (first keys: "
                                  f"{sorted(w.tensors)[:6]})")
        if role not in roles:
            raise ConversionError(f"{w.path}: a {role} checkpoint, which {system} does not have "
                                  f"(expected {', '.join(roles)})")
        if role in found:
            raise ConversionError(f"two {role} checkpoints given: {found[role].path} and {w.path}")
        found[role] = w
    if "vqgan" not in found:
        raise ConversionError(f"{system}: give the VQ-GAN checkpoint too (the model folder needs its decoder)")
    return found


def _unet_weights(w: Weights, checkpoint, opts: ConvertOptions, with_controlnet: bool) -> Weights:
    """MedLoRD's U-Net weights: --unet-weights, else raw beside a ControlNet, else as --raw-weights."""
    want = opts.unet_weights or ("raw" if with_controlnet or opts.raw_weights else "ema")
    try:
        chosen = select_weights(w.path, raw=want == "raw", checkpoint=checkpoint)
    except ConversionError:
        if opts.unet_weights or opts.raw_weights:
            raise ConversionError(f"{w.path}: raw U-Net weights asked for (--unet-weights raw / --raw-weights), but "
                                  "the checkpoint holds only EMA weights") from None
        return select_weights(w.path, raw=False, checkpoint=checkpoint)  # only EMA there: the default takes it
    if opts.unet_weights == "ema" and chosen.chosen != "ema":
        raise ConversionError(f"{w.path}: --unet-weights ema asked for, but the checkpoint holds no EMA weights "
                              f"(other entries: {', '.join(chosen.ignored) or 'none, a bare state_dict'})")
    return chosen


def convert(system: str, checkpoints: Sequence, out, configs: Sequence = (), options: Optional[ConvertOptions] = None,
            overwrite: bool = False, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Converts published checkpoints into a medgen_rt model folder; returns a summary
    {"out", "runs": {name: folder}, "notes", "deviations"}."""
    module = _module(system)
    opts = options or ConvertOptions()
    if not checkpoints:
        raise ValueError("give at least the VQ-GAN and the denoiser checkpoints")
    if opts.unet_weights not in (None, "raw", "ema"):
        raise ValueError(f"--unet-weights {opts.unet_weights!r}: choose raw or ema")
    if opts.unet_weights is not None and system != "medlord":
        raise ValueError(f"--unet-weights is for medlord's U-Net; {system} has --raw-weights")
    cfg = read_configs(configs)
    loaded = [load_checkpoint(p) for p in checkpoints]
    weights = [select_weights(p, raw=opts.raw_weights, checkpoint=c) for p, c in zip(checkpoints, loaded)]
    by_role = _by_role(system, weights, module.ROLES)
    unet_choice = None
    if "unet" in by_role:
        i = next(j for j, w in enumerate(weights) if w is by_role["unet"])
        weights[i] = by_role["unet"] = _unet_weights(weights[i], loaded[i], opts, "controlnet" in by_role)
        unet_choice = {"chosen": weights[i].chosen, "asked": opts.unet_weights or "default",
                       "why": "--unet-weights" if opts.unet_weights else (
                           "published ControlNet code (train/sample_controlnet.py) uses the U-Net's raw weights"
                           if "controlnet" in by_role else "as --raw-weights (sample_ldm.py samples EMA)")}
    del loaded
    for w in weights:
        log(f"{w.path}: {len(w.tensors)} tensors ({w.chosen} weights)"
            + (f"; not model weights, ignored: {', '.join(w.ignored)}" if w.ignored else ""))
    notes: list = []
    deviations: list = []
    if unet_choice is not None and unet_choice["asked"] == "default" and "controlnet" in by_role:
        notes.append(f"U-Net: {unet_choice['chosen']} weights, as the published ControlNet code trains and samples "
                     "with (sample_controlnet.py); --unet-weights ema for the EMA ones (sample_ldm.py)")
    runs = module.convert(by_role, cfg, opts, notes, deviations)

    vqgan = runs["vae"][0]
    denoiser_name = "dit" if "dit" in runs else "unet"
    denoiser = runs[denoiser_name][0]
    cine = system == "cardiodit"
    if denoiser_name == "dit":
        spatial = tuple(denoiser.config.input_size)
        if opts.latent_shape is not None and tuple(int(s) for s in opts.latent_shape) != spatial:
            raise ConversionError(f"--latent-shape {tuple(opts.latent_shape)} differs from the DiT's input size "
                                  f"{spatial}")
    else:
        from medgen_rt.convert.medlord import latent_spatial

        spatial = latent_spatial(vqgan, opts.latent_shape, notes)
        factor = denoiser.downsample_factor
        if any(s % factor for s in spatial):
            raise ConversionError(f"latent size {spatial} must be divisible by the U-Net's {factor}")
    from medgen_rt.convert.vqgan import image_shape, latent_channels

    channels = latent_channels(vqgan)
    modality = "cmr" if cine else "ct"
    identity = [[float(i == j) for j in range(4)] for i in range(4)]
    geometry = {"image_shape": image_shape(vqgan, spatial), "affine": identity}
    scale = scale_factor_of(opts.scale_factor, cfg, weights, notes)
    diffusion = diffusion_settings(cfg, notes)
    notes = list(dict.fromkeys(notes))  # a DiT converted twice (TGCA base) notes the same things twice
    dropped = {}
    for _, _, sources in runs.values():
        for s in sources or ():
            dropped.update({f"{s.origin}: {k}": why for k, why in s.dropped.items()})
    record = conversion_record(system, weights, notes, deviations, dropped)
    if unet_choice is not None:
        record["unet_weights"] = unet_choice
    denoiser_info = {"kind": denoiser_name, "config": runs[denoiser_name][1], "diffusion": diffusion,
                     "scale_factor": scale, "latent_shape": [channels, *spatial], "vae_run": "../vae",
                     "modality": modality, "geometry": geometry, "conversion": record}
    infos = {"vae": {"kind": "vqgan", "config": runs["vae"][1], "modality": modality,
                     "downsample_factor": list(vqgan.downsample_factor), "conversion": record},
             denoiser_name: denoiser_info}
    for kind in ("tgca", "controlnet"):
        if kind in runs:
            config = runs[kind][1]
            labels = list(opts.mask_labels) if opts.mask_labels else list(range(1, config["mask_channels"] + 1))
            if len(labels) != config["mask_channels"]:
                raise ConversionError(f"--mask-labels gives {len(labels)} labels for a {config['mask_channels']}-"
                                      "channel mask")
            # the adapter's own base (VolDiT: the TGCA checkpoint's base_model copy)
            base_config = runs[kind][0].base.config.to_dict()
            base_info = {**{k: v for k, v in denoiser_info.items() if k != "conversion"}, "config": base_config}
            infos[kind] = {**denoiser_info, "kind": kind, "config": config, "base": base_info, "mask_labels": labels}

    out = prepare_out(out, overwrite)
    folders = {}
    for name, info in infos.items():
        folders[name] = str(write_run(out / name, runs[name][0], info))
    for note in notes:
        log(f"note: {note}")
    for deviation in deviations:
        log(f"DEVIATION (recorded in model.json): {deviation}")
    return {"out": str(out), "runs": folders, "notes": notes, "deviations": deviations}
