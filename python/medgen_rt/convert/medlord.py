"""MedLoRD (Cardio-AI/medlord): VQ-GAN + 3D U-Net, optionally a ControlNet.

MedLoRD's U-Net (src/models/diffusion_unet.py; earlier
Controlnet/generative_new/networks/nets/diffusion_model_unet.py) is the MONAI
Generative DiffusionModelUNet; its ControlNet (Controlnet/src/networks/nets/
controlnet.py) the MONAI Generative ControlNet. medgen_rt runs MONAI's own
(MONAI core) DiffusionModelUNet and ControlNet, whose names differ:

==============================================  ============================================
published (MONAI Generative)                    medgen_rt (MONAI core, under ``unet.`` /
                                                ``controlnet.``)
==============================================  ============================================
``<attention>.to_{q,k,v}.*``                    ``<attention>.attn.to_{q,k,v}.*``
``<attention>.proj_attn.*``: created but never  ``<attention>.attn.out_proj.*`` set to the
applied in the published forward                identity (weight I, bias 0), so the output
                                                projection is a no-op as published
``up_blocks.{i}.upsampler.conv.conv.*``         ``up_blocks.{i}.upsampler.postconv.conv.*``
``out.0.*`` GroupNorm, ``out.1.conv.*``: the    ``out.0.*``, ``out.2.conv.*`` after MONAI's
SiLU before the output conv is commented out    SiLU (``out.1``)
(``out.2.conv.*`` in unmodified MONAI
Generative U-Nets)
everything else                                 the same name
==============================================  ============================================

Output layer: medgen_rt's U-Net always applies MONAI's SiLU before the output
conv. A checkpoint with ``out.1.conv.*`` (MedLoRD as published) is converted
exactly only when medgen_rt's UNetConfig can switch that SiLU off
(``out_silu=False``); until then the conversion stops unless --allow-deviations.

ControlNets: the older one (MONAI Generative's, ``controlnet_mid_block.conv.*``)
onto MONAI's ControlNet with the names above; the current one, MedLoRD's
lightweight ControlNet (src/models/controlnet.py, ``controlnet_mid_block.weight``),
onto medgen_rt's (models/controlnet.py), every name kept except MONAI core's
attention names: ``transformer_blocks.0.attn{1,2}.to_out.0.*`` ->
``...attn{1,2}.out_proj.*`` (published ``with_conditioning: true``: spatial
transformers, applied), or ``attentions.{j}.to_{q,k,v}.*`` ->
``attentions.{j}.attn.to_{q,k,v}.*`` with ``proj_attn.*`` dropped (never
applied). r, the heads and the groups come from the ControlNet YAML when given
(r is checked against the widths); initial_stride, not stored in a checkpoint,
from the YAML or else from the VQ-GAN's factor (the published sampler feeds
image-size masks, so the stem must shrink them to the latent).

U-Net weights (--unet-weights raw|ema): the published ControlNet code trains
(train_controlnet.py) and samples (sample_controlnet.py) beside the U-Net's raw
``model`` weights, while sample_ldm.py samples the U-Net's EMA weights. With a
ControlNet the default is raw, else EMA (--raw-weights: raw); the unet/ and
controlnet/ runs of one folder hold the same U-Net, and model.json records the
choice (conversion.unet_weights).
"""
from __future__ import annotations

import dataclasses
import re

import torch

from medgen_rt.convert.common import ConversionError, PublishedConfig, Rule, Source, as_float, map_state

SYSTEM = "medlord"
ROLES = ("vqgan", "unet", "controlnet")
PUBLISHED_IMAGE = (512, 512, 256)  # MedLoRD's CT roi
PUBLISHED_HEAD_CHANNELS = 32
PUBLISHED_GROUPS = 32
_ATTN_QKV = re.compile(r"^(.*)\.attn\.to_([qkv])\.(weight|bias)$")
_ATTN_OUT = re.compile(r"^(.*)\.attn\.out_proj\.(weight|bias)$")
_UNSUPPORTED_TRUE = ("with_conditioning", "resblock_updown", "upcast_attention")


def unet_supports_out_silu() -> bool:
    from medgen_rt.models.unet import UNetConfig

    return "out_silu" in {f.name for f in dataclasses.fields(UNetConfig)}


def _levels(source: Source, prefix: str = "down_blocks.") -> int:
    indices = {int(k.split(".")[1]) for k in source.keys(prefix) if k.split(".")[1].isdigit()}
    if not indices or sorted(indices) != list(range(len(indices))):
        raise ConversionError(f"{source.origin}: no {prefix}0..N found (is this a U-Net checkpoint?)")
    return len(indices)


def _resnets(source: Source, level: int) -> int:
    prefix = f"down_blocks.{level}.resnets."
    return len({k[len(prefix):].split(".")[0] for k in source.keys(prefix)})


def _check_published_options(params: dict, what: str) -> None:
    on = [k for k in _UNSUPPORTED_TRUE if str(params.get(k, False)).lower() == "true"]
    if on:
        raise ConversionError(f"{what}: {', '.join(on)}: true is not supported by medgen_rt's U-Net")
    if params.get("num_class_embeds") is not None:
        raise ConversionError(f"{what}: class-conditional U-Nets (num_class_embeds) are not supported")
    if "norm_eps" in params and as_float(params["norm_eps"], "norm_eps") != 1e-6:
        raise ConversionError(f"{what}: norm_eps {params['norm_eps']}: medgen_rt's U-Net uses MONAI's 1e-6")


def unet_config(source: Source, cfg: PublishedConfig, notes: list) -> tuple:
    """(UNetConfig fields, output layer index 1 or 2) of a published U-Net."""
    published = dict(cfg.unet)
    _check_published_options(published, "U-Net config")
    if any(".transformer_blocks." in k for k in source.tensors):
        raise ConversionError(f"{source.origin}: cross-attention (with_conditioning) U-Nets are not supported")
    conv_in = source.require("conv_in.conv.weight")
    levels = _levels(source)
    channels = [int(source.require(f"down_blocks.{i}.resnets.0.conv1.conv.weight").shape[0]) for i in range(levels)]
    res_blocks = {_resnets(source, i) for i in range(levels)}
    if len(res_blocks) != 1:
        raise ConversionError(f"{source.origin}: levels with different numbers of residual blocks {sorted(res_blocks)} "
                              "are not supported")
    attention = [bool(source.keys(f"down_blocks.{i}.attentions.")) for i in range(levels)]
    out_index = 1 if "out.1.conv.weight" in source else 2
    out_conv = source.require(f"out.{out_index}.conv.weight")
    groups = int(published.get("norm_num_groups", PUBLISHED_GROUPS))
    if any(c % groups for c in channels):
        raise ConversionError(f"channels {channels} are not multiples of norm_num_groups {groups}; pass the "
                              "diffusion YAML with --config")
    if "num_head_channels" in published:
        heads = published["num_head_channels"]
        heads = [int(heads)] * levels if isinstance(heads, int) else [int(h) for h in heads]
    else:
        heads = [PUBLISHED_HEAD_CHANNELS if a else 0 for a in attention]
        if any(attention):
            notes.append(f"attention head size taken as the published {PUBLISHED_HEAD_CHANNELS} channels (not stored "
                         "in a checkpoint); pass the diffusion YAML with --config if it differs")
    fields = {"spatial_dims": conv_in.dim() - 2, "in_channels": int(conv_in.shape[1]),
              "out_channels": int(out_conv.shape[0]), "num_res_blocks": res_blocks.pop(), "channels": channels,
              "attention_levels": attention, "num_head_channels": heads, "norm_num_groups": groups}
    if isinstance(published.get("num_res_blocks"), (list, tuple)):
        per_level = {int(n) for n in published["num_res_blocks"]}
        published["num_res_blocks"] = per_level.pop() if len(per_level) == 1 else -1
    for name in ("spatial_dims", "in_channels", "out_channels", "num_res_blocks"):
        if name in published and int(published[name]) != fields[name]:
            raise ConversionError(f"U-Net config {name} {published[name]} differs from the checkpoint's {fields[name]}")
    for name in ("num_channels", "channels"):
        if name in published and [int(c) for c in published[name]] != channels:
            raise ConversionError(f"U-Net config {name} {list(published[name])} differs from the checkpoint's "
                                  f"{channels}")
    return fields, out_index


def monai_rule(target: dict, prefix: str, out_index: int = 2):
    """Source key for the MONAI-core tensor ``name`` of ``target`` (``prefix`` + published MONAI Generative name)."""
    def rule(name: str) -> Rule:
        key = name[len(prefix):]
        m = _ATTN_QKV.match(key)
        if m:
            return Rule(f"{m.group(1)}.to_{m.group(2)}.{m.group(3)}")
        m = _ATTN_OUT.match(key)
        if m:
            want = target[name]
            identity = torch.eye(want.shape[0]) if m.group(2) == "weight" else torch.zeros(want.shape[0])
            return Rule(value=identity.to(want.dtype), consumes=(f"{m.group(1)}.proj_attn.{m.group(2)}",),
                        why="created but never applied by the published attention block; out_proj = identity")
        if ".upsampler.postconv." in key:
            return Rule(key.replace(".upsampler.postconv.", ".upsampler.conv."))
        if key.startswith("out.2."):
            return Rule(f"out.{out_index}." + key[len("out.2."):])
        return Rule(key)
    return rule


def convert_unet(source: Source, cfg: PublishedConfig, notes: list, deviations: list, allow_deviations: bool):
    from medgen_rt.models.unet import UNetConfig, UNetDenoiser

    fields, out_index = unet_config(source, cfg, notes)
    if out_index == 1:
        if unet_supports_out_silu():
            fields["out_silu"] = False
        else:
            message = ("the published U-Net has no SiLU before its output conv (out.1.conv, the SiLU is commented out "
                       "in MedLoRD's DiffusionModelUNet); medgen_rt's U-Net always applies MONAI's SiLU there, so the "
                       "converted U-Net computes a different output")
            if not allow_deviations:
                raise ConversionError(message + " (pass --allow-deviations to convert it anyway)")
            deviations.append(message)
    model = UNetDenoiser(UNetConfig(**fields))
    target = model.state_dict()
    state = map_state(target, source, monai_rule(target, "unet.", out_index))
    model.load_state_dict(state, strict=True)
    return model.eval(), model.config.to_dict()


def convert_controlnet(source: Source, base, cfg: PublishedConfig, vq_factor: tuple, notes: list):
    if "controlnet_mid_block.weight" in source:
        return convert_lightweight_controlnet(source, base, cfg, vq_factor, notes)
    from medgen_rt.models.unet import ControlledUNet

    published = dict(cfg.controlnet)
    _check_published_options(published, "ControlNet config")
    if as_float(published.get("r", 1.0), "r") != 1.0 or int(published.get("initial_stride", 1)) != 1:
        raise ConversionError("ControlNet config has r or initial_stride (MedLoRD's lightweight ControlNet), but "
                              f"{source.origin} holds MONAI's ControlNet (controlnet_mid_block.conv.*)")
    conv_in = source.require("controlnet_cond_embedding.conv_in.conv.weight")
    blocks = sorted({int(k.split(".")[2]) for k in source.keys("controlnet_cond_embedding.blocks.")})
    embedding = [int(conv_in.shape[0])] + [
        int(source.require(f"controlnet_cond_embedding.blocks.{j}.conv.weight").shape[0]) for j in blocks[1::2]]
    if int(source.require("conv_in.conv.weight").shape[0]) != base.config.channels[0]:
        raise ConversionError(f"{source.origin}: the ControlNet's widths differ from the U-Net's; MONAI's "
                              "ControlNet mirrors the U-Net encoder")
    options = {"mask_channels": int(conv_in.shape[1]), "mask_downsample": 2 ** (len(embedding) - 1),
               "embedding_channels": embedding, "condition_dropout_prob": 0.1, "conditioning_scale": 1.0}
    _check_embedding(published, embedding)
    if any(f != options["mask_downsample"] for f in vq_factor):
        # the older published ControlNet resizes its mask embedding to the latent (trilinear);
        # medgen_rt takes image-size masks and embeds them straight to the latent size
        raise ConversionError(f"the ControlNet embeds masks {options['mask_downsample']}x smaller, the VQ-GAN "
                              f"downsamples images {tuple(vq_factor)}x: medgen_rt needs both equal")
    model = ControlledUNet(base, **options)
    return _load_controlled(model, base, source, monai_rule(model.state_dict(), "controlnet."))


def _check_embedding(published: dict, embedding: list) -> None:
    if "conditioning_embedding_num_channels" in published and \
            [int(c) for c in published["conditioning_embedding_num_channels"]] != embedding:
        raise ConversionError(f"ControlNet config conditioning_embedding_num_channels "
                              f"{list(published['conditioning_embedding_num_channels'])} differs from the "
                              f"checkpoint's {embedding}")


def _load_controlled(model, base, source: Source, controlnet_rule):
    """Fills a ControlledUNet: base.* from the converted U-Net, controlnet.* by the rule."""
    target = model.state_dict()
    base_state = {f"base.{k}": v for k, v in base.state_dict().items()}

    def rule(name: str) -> Rule:
        return Rule(value=base_state[name]) if name in base_state else controlnet_rule(name)

    model.load_state_dict(map_state(target, source, rule), strict=True)
    return model.eval(), dict(model.options)


def _ints(value, levels: int) -> list:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def lightweight_settings(source: Source, unet, cfg: PublishedConfig, vq_factor: tuple, notes: list) -> dict:
    """ControlledUNet options of a published lightweight ControlNet (``unet``: the base's UNetConfig),
    from the tensors' shapes and the ControlNet YAML."""
    from medgen_rt.models.controlnet import control_widths, embedding_downsample

    published = dict(cfg.controlnet)
    on = [k for k in ("resblock_updown", "upcast_attention") if str(published.get(k, False)).lower() == "true"]
    on += [k for k in ("num_class_embeds", "cross_attention_dim") if published.get(k) is not None]
    if on:
        raise ConversionError(f"ControlNet config: {', '.join(on)} not supported by medgen_rt's lightweight "
                              "ControlNet (MedLoRD's passes no context or class)")
    if "norm_eps" in published and as_float(published["norm_eps"], "norm_eps") != 1e-6:
        raise ConversionError(f"ControlNet config norm_eps {published['norm_eps']}: medgen_rt uses 1e-6")
    levels = _levels(source)
    widths = [int(source.require(f"down_blocks.{i}.resnets.0.conv1.conv.weight").shape[0]) for i in range(levels)]
    projected = int(source.require("controlnet_mid_block.weight").shape[0])
    if levels != len(unet.channels) or projected != unet.channels[-1]:
        raise ConversionError(f"{source.origin}: a ControlNet for a U-Net of {levels} levels ending at {projected} "
                              f"channels; the U-Net has channels {list(unet.channels)}")
    for name, want in (("num_channels", list(unet.channels)), ("in_channels", [unet.in_channels]),
                       ("spatial_dims", [unet.spatial_dims])):
        if name in published and _ints(published[name], len(want)) != want:
            raise ConversionError(f"ControlNet config {name} {published[name]} differs from the U-Net's "
                                  f"{want if len(want) > 1 else want[0]}")
    if "r" in published:
        r = as_float(published["r"], "ControlNet config r")
    else:
        r = widths[0] / unet.channels[0]
        notes.append(f"ControlNet r {r:g} read from its widths {widths}; pass the ControlNet YAML with --config "
                     "to check it against the published setting")
    if control_widths(unet.channels, r) != widths:
        raise ConversionError(f"{source.origin}: ControlNet widths {widths} are not max(1, int(r * C)) for r {r:g} "
                              f"and the U-Net's channels {list(unet.channels)}")
    res_blocks = {_resnets(source, i) for i in range(levels)}
    if res_blocks != {unet.num_res_blocks}:
        raise ConversionError(f"{source.origin}: ControlNet residual blocks per level {sorted(res_blocks)}, the "
                              f"U-Net's {unet.num_res_blocks}: their residuals would not line up")
    attention = tuple(bool(source.keys(f"down_blocks.{i}.attentions.")) for i in range(levels))
    if attention != tuple(unet.attention_levels):
        raise ConversionError(f"{source.origin}: ControlNet attention levels {list(attention)} differ from the "
                              f"U-Net's {list(unet.attention_levels)}")
    transformer = any(".transformer_blocks." in k for k in source.tensors)
    if any(".transformer_blocks.1." in k for k in source.tensors):
        raise ConversionError(f"{source.origin}: transformer_num_layers > 1 is not supported")
    if "with_conditioning" in published and (str(published["with_conditioning"]).lower() == "true") != transformer:
        raise ConversionError(f"ControlNet config with_conditioning {published['with_conditioning']} but the "
                              f"checkpoint {'has' if transformer else 'has no'} spatial transformer blocks")
    if "num_head_channels" in published:
        heads = _ints(published["num_head_channels"], levels)
    else:
        heads = list(unet.num_head_channels)
        if any(attention):
            notes.append(f"ControlNet attention head size taken as the U-Net's {heads} (not stored in a checkpoint); "
                         "pass the ControlNet YAML with --config if it differs")
    conv_in = source.require("controlnet_cond_embedding.conv_in.conv.weight")
    blocks = sorted({int(k.split(".")[2]) for k in source.keys("controlnet_cond_embedding.blocks.")})
    if blocks != list(range(len(blocks))) or len(blocks) % 2:
        raise ConversionError(f"{source.origin}: controlnet_cond_embedding.blocks {blocks}: expected pairs of "
                              "a refinement and a stride-2 convolution")
    embedding = [int(conv_in.shape[0])] + [
        int(source.require(f"controlnet_cond_embedding.blocks.{j}.conv.weight").shape[0]) for j in blocks[1::2]]
    _check_embedding(published, embedding)
    mask_channels = int(conv_in.shape[1])
    if int(published.get("conditioning_embedding_in_channels", mask_channels)) != mask_channels:
        raise ConversionError(f"ControlNet config conditioning_embedding_in_channels "
                              f"{published['conditioning_embedding_in_channels']}, the checkpoint's {mask_channels}")
    if len(set(vq_factor)) != 1:
        raise ConversionError(f"the VQ-GAN downsamples {tuple(vq_factor)}: the lightweight ControlNet's mask stem "
                              "shrinks every axis alike")
    factor = int(vq_factor[0])
    if "initial_stride" in published:
        stride = int(published["initial_stride"])
    else:
        stride = max(1, factor // 2 ** (len(embedding) - 1))
        notes.append(f"ControlNet initial_stride {stride} (not stored in a checkpoint) from the VQ-GAN's {factor}x; "
                     "pass the ControlNet YAML with --config to check it")
    if embedding_downsample(embedding, stride) != factor:
        raise ConversionError(f"the ControlNet's mask stem (initial_stride {stride}, embedding {embedding}) shrinks "
                              f"masks {embedding_downsample(embedding, stride)}x, the VQ-GAN images {factor}x: the "
                              "published sampler needs both equal")
    if cfg.condition_keys:
        if len(cfg.condition_keys) != mask_channels:
            raise ConversionError(f"ControlNet config condition_keys {cfg.condition_keys} name "
                                  f"{len(cfg.condition_keys)} masks, the checkpoint takes {mask_channels}")
        # the published sampler stacks one binary mask per key; medgen_rt one-hot encodes a label map
        notes.append(f"ControlNet mask channels in the published order: {', '.join(cfg.condition_keys)}; "
                     "--mask-labels gives the label value of each in your label maps (default 1..K)")
    dropout = as_float(cfg.training.get("control_dropout", 0.1), "training.control_dropout")
    return {"variant": "lightweight", "mask_channels": mask_channels, "mask_downsample": factor,
            "embedding_channels": embedding, "condition_dropout_prob": dropout, "conditioning_scale": 1.0, "r": r,
            "initial_stride": stride, "transformer_attention": transformer, "num_head_channels": heads,
            "norm_num_groups": int(published.get("norm_num_groups", PUBLISHED_GROUPS))}


_TRANSFORMER_OUT = re.compile(r"^(.*\.attn[12])\.out_proj\.(weight|bias)$")


def lightweight_rule(prefix: str):
    """Published key of the lightweight ControlNet tensor ``name`` (under ``prefix``)."""
    def rule(name: str) -> Rule:
        key = name[len(prefix):]
        m = _ATTN_QKV.match(key)
        if m:
            return Rule(f"{m.group(1)}.to_{m.group(2)}.{m.group(3)}")
        m = _TRANSFORMER_OUT.match(key)
        if m:
            return Rule(f"{m.group(1)}.to_out.0.{m.group(2)}")
        return Rule(key)
    return rule


def convert_lightweight_controlnet(source: Source, base, cfg: PublishedConfig, vq_factor: tuple, notes: list):
    from medgen_rt.models.unet import ControlledUNet

    options = lightweight_settings(source, base.config, cfg, vq_factor, notes)
    try:
        model = ControlledUNet(base, **options)
    except ValueError as exc:
        raise ConversionError(f"{source.origin}: {exc} (pass the ControlNet YAML with --config)") from None
    if not options["transformer_attention"]:
        for key in source.keys():
            if ".proj_attn." in key:
                source.drop(key, "created but never applied by the published attention block")
    return _load_controlled(model, base, source, lightweight_rule("controlnet."))


def convert(weights: dict, cfg: PublishedConfig, opts, notes: list, deviations: list) -> dict:
    from medgen_rt.convert.vqgan import check_latent_channels, convert_vqgan

    if "unet" not in weights:
        raise ConversionError("medlord: give the U-Net checkpoint as well as the VQ-GAN's")
    vq_source = Source(weights["vqgan"].tensors, str(weights["vqgan"].path))
    vqgan, vq_config = convert_vqgan(vq_source, cfg, cine=False)
    unet_source = Source(weights["unet"].tensors, str(weights["unet"].path))
    unet, unet_cfg = convert_unet(unet_source, cfg, notes, deviations, opts.allow_deviations)
    check_latent_channels(vqgan, unet.config.in_channels, "the U-Net")
    runs = {"vae": (vqgan, vq_config, [vq_source]), "unet": (unet, unet_cfg, [unet_source])}
    if "controlnet" in weights:
        import copy

        cn_source = Source(weights["controlnet"].tensors, str(weights["controlnet"].path))
        controlled, options = convert_controlnet(cn_source, copy.deepcopy(unet), cfg,
                                                 tuple(vqgan.downsample_factor), notes)
        runs["controlnet"] = (controlled, options, [cn_source])
    return runs


def latent_spatial(vqgan, option, notes: list) -> tuple:
    """The U-Net's latent size: --latent-shape, else MedLoRD's 512 x 512 x 256 CT over the VQ-GAN's factor."""
    if option is not None:
        return tuple(int(s) for s in option)
    factor = vqgan.downsample_factor
    notes.append(f"latent size taken from MedLoRD's {PUBLISHED_IMAGE} CT volumes; pass --latent-shape for another size")
    return tuple(s // f for s, f in zip(PUBLISHED_IMAGE, factor))
