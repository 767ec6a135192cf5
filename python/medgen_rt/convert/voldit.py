"""VolDiT (Cardio-AI/voldit): VQ-GAN + DiT3D, optionally the TGCA mask adapter.

TGCA3D (src/models/tgca.py) state_dict, against medgen_rt's TGCA:

=================================================  ==========================================
published                                          medgen_rt
=================================================  ==========================================
``base_model.*`` (the frozen DiT3D, pos_embed      ``base.*`` (see medgen_rt.convert.dit)
included)
``condition_embedder.conv_in.conv.*``              ``condition_embedder.conv_in.*``
``condition_embedder.blocks.{j}.conv.*``, j < 8    ``condition_embedder.blocks.{j}.*``
(k3 conv, then k3 stride-2 conv, 8->16->...->128)
``condition_embedder.conv_out.conv.*``             ``condition_embedder.conv_out.*``
``time_gate.{weight,bias}`` (1, hidden), (1,)      same
``adapter_scales.{i}`` (1,) per injected block     ``adapter_scales`` (n,)
=================================================  ==========================================

The published checkpoints keep EMA weights of the trainable parameters only
(the adapter, plus fine-tuned base blocks); the base comes from the TGCA
checkpoint's own ``base_model.*`` copy (what the adapter was trained with), or
from the DiT checkpoint when the TGCA file has none.

One behaviour differs: the published DiTBlock normalises the control tokens with
a LayerNorm (``control_norm``, no affine, eps 1e-6) before adding them, which
cancels the gate and the per-layer scale; medgen_rt's TGCA adds them as they are
(DESIGN.md section 4). A converted TGCA therefore computes something else unless
medgen_rt's TGCA takes ``control_norm=True``; until then the conversion stops
unless --allow-deviations is given.
"""
from __future__ import annotations

import copy
import inspect

import torch

from medgen_rt.convert.common import (ConversionError, PublishedConfig, Rule, Source, as_float, map_state)
from medgen_rt.convert.dit import convert_dit, dit_config

SYSTEM = "voldit"
ROLES = ("vqgan", "dit", "tgca")


def tgca_supports_control_norm() -> bool:
    from medgen_rt.models.tgca import TGCA

    return "control_norm" in inspect.signature(TGCA.__init__).parameters


def _adapter_rule(name: str) -> Rule:
    for part in ("conv_in", "conv_out"):
        stem = f"condition_embedder.{part}."
        if name.startswith(stem):
            return Rule(f"{stem}conv.{name[len(stem):]}")
    if name.startswith("condition_embedder.blocks."):
        index, _, param = name[len("condition_embedder.blocks."):].partition(".")
        return Rule(f"condition_embedder.blocks.{index}.conv.{param}")
    return Rule(name)


def _inject_layers(cfg: PublishedConfig, n_scales: int, depth: int, notes: list):
    published = cfg.tgca.get("inject_layers", "unset")
    if published is None:
        layers = None
    elif published != "unset":
        layers = int(published) if isinstance(published, int) else [int(i) for i in published]
    elif n_scales == depth:
        layers = None
    else:
        layers = n_scales
        notes.append(f"TGCA injects into {n_scales} of {depth} blocks: taken as the last {n_scales} (the published "
                     "int form of inject_layers); pass the TGCA YAML with --config if it named other blocks")
    count = depth if layers is None else (layers if isinstance(layers, int) else len(layers))
    if count != n_scales:
        raise ConversionError(f"inject_layers {published!r} names {count} blocks but the checkpoint has {n_scales} "
                              "adapter_scales")
    return layers


def convert_tgca(source: Source, base, cfg: PublishedConfig, notes: list, deviations: list,
                 allow_deviations: bool):
    """(medgen_rt TGCA around ``base`` with the adapter weights of ``source``, its model.json config)."""
    from medgen_rt.models.tgca import TGCA

    conv_in = source.require("condition_embedder.conv_in.conv.weight")
    mask_channels = int(conv_in.shape[1])
    if "condition_channels" in cfg.tgca and int(cfg.tgca["condition_channels"]) != mask_channels:
        raise ConversionError(f"tgca.params.condition_channels {cfg.tgca['condition_channels']} differs from the "
                              f"checkpoint's condition_embedder.conv_in ({mask_channels} mask channels)")
    scale_keys = [k for k in source.keys("adapter_scales.")]
    n_scales = len(scale_keys)
    if n_scales == 0:
        raise ConversionError(f"{source.origin}: missing key 'adapter_scales.0'")
    names = [f"adapter_scales.{i}" for i in range(n_scales)]
    if sorted(scale_keys) != sorted(names):
        raise ConversionError(f"{source.origin}: adapter_scales are not numbered 0..{n_scales - 1}: {scale_keys}")
    bad = [f"{k}: checkpoint {tuple(source.tensors[k].shape)}, expected (1,)" for k in names
           if source.tensors[k].numel() != 1]
    if bad:
        raise ConversionError(f"{source.origin}: wrong shape(s): {', '.join(bad)}")
    scales = torch.cat([source.tensors[k].reshape(1) for k in names])
    source.used.update(names)

    options = {"mask_channels": mask_channels,
               "inject_layers": _inject_layers(cfg, n_scales, len(base.blocks), notes),
               "finetune_last_n_blocks": int(cfg.tgca.get("finetune_last_n_blocks", 0) or 0),
               "condition_dropout_prob": as_float(cfg.tgca.get("condition_dropout_prob", 0.1),
                                                  "condition_dropout_prob")}
    if tgca_supports_control_norm():
        options["control_norm"] = True
    else:
        message = ("the published TGCA applies a LayerNorm to the control tokens (DiTBlock.control_norm) before adding "
                   "them; medgen_rt's TGCA has no control_norm option, so the converted adapter computes a different "
                   "output")
        if not allow_deviations:
            raise ConversionError(message + " (pass --allow-deviations to convert it anyway)")
        deviations.append(message)
    model = TGCA(base, **options)
    base_state = {f"base.{k}": v for k, v in base.state_dict().items()}

    def rule(name: str) -> Rule:
        if name in base_state:
            return Rule(value=base_state[name])
        if name == "adapter_scales":
            return Rule(value=scales)
        return _adapter_rule(name)

    model.load_state_dict(map_state(model.state_dict(), source, rule), strict=True)
    return model.eval(), options


def convert(weights: dict, cfg: PublishedConfig, opts, notes: list, deviations: list) -> dict:
    """{run name: (model, kind-specific info)} for a VolDiT model folder."""
    from medgen_rt.convert.vqgan import convert_vqgan, latent_channels

    if "dit" not in weights and "tgca" not in weights:
        raise ConversionError("voldit: give the DiT checkpoint (and optionally the TGCA checkpoint)")
    vq_source = Source(weights["vqgan"].tensors, str(weights["vqgan"].path))
    vqgan, vq_config = convert_vqgan(vq_source, cfg, cine=False)
    channels = latent_channels(vqgan)
    runs = {"vae": (vqgan, vq_config, [vq_source])}

    def dit_from(source: Source):
        config = dit_config(source, cfg, 3, channels, notes, num_heads=opts.num_heads, patch_size=opts.patch_size,
                            latent_shape=opts.latent_shape)
        return convert_dit(source, config), config

    dit = dit_sources = None
    if "dit" in weights:
        dit_source = Source(weights["dit"].tensors, str(weights["dit"].path))
        dit, dit_cfg = dit_from(dit_source)
        dit_sources = [dit_source]
    if "tgca" in weights:
        tgca_source = Source(weights["tgca"].tensors, str(weights["tgca"].path))
        if tgca_source.keys("base_model."):
            base_source = tgca_source.sub("base_model.", f"{weights['tgca'].path} [base_model.*]")
            base, base_cfg = dit_from(base_source)
            if dit is None:
                dit, dit_cfg, dit_sources = base, base_cfg, [base_source]
        elif dit is not None:
            base = copy.deepcopy(dit)
        else:
            raise ConversionError(f"{weights['tgca'].path}: holds no base_model.* weights; give the DiT checkpoint "
                                  "as well")
        tgca, tgca_options = convert_tgca(tgca_source, base, cfg, notes, deviations, opts.allow_deviations)
        runs["tgca"] = (tgca, tgca_options, [tgca_source])
    runs["dit"] = (dit, dit_cfg.to_dict(), dit_sources)
    return runs
