"""The published diffusion transformers onto medgen_rt's DiT: VolDiT's DiT3D
(Cardio-AI/voldit src/models/dit.py) and CardioDiT's DiT4D (Cardio-AI/cardiodit
src/models/dit.py). Both follow facebookresearch/DiT; their state_dict keys:

==============================================  ===========================================
published                                       medgen_rt
==============================================  ===========================================
``x_embedder.proj.weight``  DiT3D: Conv3d       ``x_embedder.proj.weight`` Linear over the
(hidden, C, p, p, p), kernel = stride = p;      patch vector laid out (C, p1, p2, ...): the
DiT4D: Linear (hidden, C*pz*ph*pw*pt) over      Conv3d weight reshaped to (hidden, C*p^3);
einops "(c pz ph pw pt)"                        the DiT4D weight as it is
``x_embedder.proj.bias``                        same
``pos_embed`` (1, N, hidden), frozen sin-cos    not stored: recomputed per grid (checked
(3D: hidden padded to a multiple of 6, a        equal to the checkpoint's, then dropped)
third per axis d, h, w, truncated; 4D: a
quarter per axis z, h, w, t)
``t_embedder.mlp.{0,2}.*``                      same
``y_embedder.embedding_table.weight``           dropped: the published samplers pass y=None,
                                                so c = t_emb (num_classes = 0 here)
``blocks.{i}.attn.qkv.*``, ``.attn.proj.*``,    same (qkv rows: q, k, v, each heads x
``.mlp.fc1.*``, ``.mlp.fc2.*``,                 head_dim)
``.adaLN_modulation.1.*`` (6 chunks: shift,
scale, gate for attention, then for the MLP)
``final_layer.linear.*`` (out features laid     same (unpatchify reads (p1, p2, ..., C))
out (p1, p2, ..., C)), ``final_layer.
adaLN_modulation.1.*``
==============================================  ===========================================

LayerNorms have no parameters (elementwise_affine=False). The number of heads is
not stored anywhere: it comes from the YAML (``num_heads``), ``--num-heads``, the
published sizes (384: 6, 768: 12, 1024: 16, 1152: 16 heads) or hidden / 64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from medgen_rt.convert.common import ConversionError, PublishedConfig, Rule, Source, as_float, map_state

# published DiT options medgen_rt reproduces; anything else in the YAML is refused
_KNOWN_OPTIONS = {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                  "class_dropout_prob", "num_classes", "learn_sigma", "flash_attention", "attn_drop", "mlp_drop",
                  "voxel_spacing", "self_conditioning"}
# heads of the published sizes (VolDiT configs/transformer/dit_ds8_*.yaml, CardioDiT configs/transformer/dit_*.yaml);
# other widths fall back to DiT's head size of 64
PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
PUBLISHED_HEAD_DIM = 64
CARDIODIT_PATCH = (1, 4, 4, 2)


def infer_grid(pos_embed: torch.Tensor, spatial_dims: int) -> tuple:
    """The patch grid a fixed sin-cos positional embedding (N, hidden) was made for.

    Each axis owns a block of columns [sin(pos * w_k), cos(pos * w_k)]; the phase of
    its lowest frequency whose sin and cos columns both exist gives every token's
    position on that axis without wrapping around."""
    pos = pos_embed.detach().double().reshape(-1, pos_embed.shape[-1])
    n, hidden = pos.shape
    per_axis = (hidden + (6 - hidden % 6) % 6) // 3 if spatial_dims == 3 else hidden // 4
    half = per_axis // 2
    grid = []
    for axis in range(spatial_dims):
        start = axis * per_axis
        k = min(half - 1, hidden - 1 - start - half)
        if k < 0:
            raise ConversionError("pos_embed: too few columns to read the patch grid from")
        omega = 10000.0 ** (-k / half)
        angle = torch.remainder(torch.atan2(pos[:, start + k], pos[:, start + half + k]), 2 * math.pi)
        where = angle / omega
        rounded = torch.round(where)
        if (where - rounded).abs().max() > 0.05 or rounded.min() < 0:
            raise ConversionError("pos_embed is not the fixed sin-cos embedding of a patch grid")
        grid.append(int(rounded.max()) + 1)
    if math.prod(grid) != n:
        raise ConversionError(f"pos_embed has {n} tokens, but its positions span a {tuple(grid)} grid")
    return tuple(grid)


def check_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], hidden: int) -> None:
    from medgen_rt.models.embeddings import sincos_pos_embed

    ours = sincos_pos_embed(hidden, tuple(grid))
    theirs = pos_embed.detach().float().reshape(-1, hidden)
    if theirs.shape != ours.shape:
        raise ConversionError(f"pos_embed: checkpoint {tuple(pos_embed.shape)}, expected (1, {ours.shape[0]}, "
                              f"{hidden}) for the patch grid {tuple(grid)}")
    err = (theirs - ours).abs().max().item()
    if err > 1e-4:
        raise ConversionError(f"pos_embed differs from the fixed sin-cos embedding of the {tuple(grid)} grid (max "
                              f"difference {err:.3g}): anisotropic voxel_spacing or a learned embedding is not "
                              "supported")


def _block_count(source: Source) -> int:
    indices = {int(k.split(".")[1]) for k in source.keys("blocks.") if k.split(".")[1].isdigit()}
    if not indices:
        raise ConversionError(f"{source.origin}: no blocks.* found (is this a DiT checkpoint?)")
    if sorted(indices) != list(range(len(indices))):
        raise ConversionError(f"{source.origin}: DiT blocks are not numbered 0..{len(indices) - 1}: {sorted(indices)}")
    return len(indices)


def _ints(value, what: str) -> tuple:
    if isinstance(value, int):
        return (value,)
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConversionError(f"{what}: expected integers, got {value!r}") from None


def dit_config(source: Source, cfg: PublishedConfig, spatial_dims: int, latent_channels: int, notes: list,
               num_heads: Optional[int] = None, patch_size: Optional[Sequence[int]] = None,
               latent_shape: Optional[Sequence[int]] = None):
    """DiTConfig of a published DiT3D (spatial_dims 3) or DiT4D (4) from its tensors and YAML."""
    from medgen_rt.models.dit import DiTConfig

    published = dict(cfg.dit)
    unsupported = sorted(set(published) - _KNOWN_OPTIONS)
    if unsupported:
        raise ConversionError(f"DiT config options {unsupported} are not supported by medgen_rt's DiT")
    if str(published.get("self_conditioning", False)).lower() == "true":
        raise ConversionError("self-conditioned DiTs (self_conditioning: true) are not supported by medgen_rt")
    spacing = published.get("voxel_spacing")
    if spacing is not None and any(as_float(s, "voxel_spacing") != 1.0 for s in spacing):
        raise ConversionError(f"voxel_spacing {list(spacing)}: anisotropic positional embeddings are not supported")

    proj = source.require("x_embedder.proj.weight")
    hidden = int(proj.shape[0])
    final = source.require("final_layer.linear.weight")
    if spatial_dims == 3:
        if proj.dim() != 5:
            raise ConversionError(f"x_embedder.proj.weight {tuple(proj.shape)}: VolDiT's DiT3D embeds patches with "
                                  "a Conv3d (hidden, C, p, p, p)")
        in_channels, patch = int(proj.shape[1]), tuple(int(s) for s in proj.shape[2:])
        if patch_size is not None and tuple(patch_size) != patch and len(patch_size) == 3:
            raise ConversionError(f"--patch-size {tuple(patch_size)} differs from the checkpoint's {patch}")
    else:
        if proj.dim() != 2:
            raise ConversionError(f"x_embedder.proj.weight {tuple(proj.shape)}: CardioDiT's DiT4D embeds patches "
                                  "with a Linear (hidden, C*pz*ph*pw*pt)")
        in_channels = int(published.get("in_channels", latent_channels))
        patch_volume, rem = divmod(int(proj.shape[1]), in_channels)
        if rem:
            raise ConversionError(f"x_embedder.proj.weight {tuple(proj.shape)}: its input size is not a multiple "
                                  f"of the latent's {in_channels} channels")
        if "patch_size" in published:
            patch = _ints(published["patch_size"], "patch_size")
        elif patch_size is not None:
            patch = tuple(int(p) for p in patch_size)
        elif patch_volume == math.prod(CARDIODIT_PATCH):
            patch = CARDIODIT_PATCH
            notes.append(f"DiT4D patch size taken as the published {CARDIODIT_PATCH} (only its volume is stored)")
        else:
            raise ConversionError(f"the DiT4D patch holds {patch_volume} latent voxels; pass its shape with "
                                  "--patch-size or the published YAML with --config")
        if len(patch) != 4 or math.prod(patch) != patch_volume:
            raise ConversionError(f"patch size {patch} does not fit x_embedder.proj.weight {tuple(proj.shape)}")
    if spatial_dims == 3 and "patch_size" in published:
        want = _ints(published["patch_size"], "patch_size")
        if (want * 3 if len(want) == 1 else want) != patch:
            raise ConversionError(f"config patch_size {published['patch_size']} differs from the checkpoint's {patch}")
    patch_volume = math.prod(patch)
    out_channels, rem = divmod(int(final.shape[0]), patch_volume)
    if rem:
        raise ConversionError(f"final_layer.linear.weight {tuple(final.shape)} does not fit patch {patch}")
    if in_channels == 2 * out_channels:
        raise ConversionError("the DiT takes twice the channels it predicts: a self-conditioned model, which "
                              "medgen_rt's DiT does not support")
    if in_channels != latent_channels:
        raise ConversionError(f"the DiT takes {in_channels}-channel latents but the VQ-GAN's codebook vectors have "
                              f"{latent_channels} channels: are these checkpoints of the same model?")
    learn_sigma = out_channels == 2 * in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConversionError(f"the DiT predicts {out_channels} channels for {in_channels} input channels")

    pos = source.require("pos_embed")
    if "input_size" in published:
        grid = tuple(s // p for s, p in zip(_ints(published["input_size"], "input_size"), patch))
    elif latent_shape is not None:
        grid = tuple(int(s) // p for s, p in zip(latent_shape, patch))
    else:
        grid = infer_grid(pos, spatial_dims)
    if len(grid) != spatial_dims:
        raise ConversionError(f"latent grid {grid} has {len(grid)} axes, the DiT {spatial_dims}")
    check_pos_embed(pos, grid, hidden)
    source.drop("pos_embed", "fixed sin-cos embedding; medgen_rt recomputes it (checked equal)")

    if "num_heads" in published:
        heads = int(published["num_heads"])
    elif num_heads is not None:
        heads = int(num_heads)
    elif hidden in PUBLISHED_HEADS:
        heads = PUBLISHED_HEADS[hidden]
        notes.append(f"num_heads taken as {heads}, the published value for hidden size {hidden} (not stored in a "
                     "checkpoint); pass --num-heads or the YAML with --config if yours differs")
    else:
        heads = max(1, hidden // PUBLISHED_HEAD_DIM)
        notes.append(f"num_heads taken as hidden/{PUBLISHED_HEAD_DIM} = {heads} (not stored in a checkpoint); pass "
                     "--num-heads or the YAML with --config if the model used another head size")
    if hidden % heads:
        raise ConversionError(f"hidden size {hidden} is not divisible by num_heads {heads}")
    if "y_embedder.embedding_table.weight" in source:
        rows = int(source.tensors["y_embedder.embedding_table.weight"].shape[0])
        source.drop("y_embedder.embedding_table.weight",
                    "class embedding; the published samplers pass y=None, so it never enters the output")
        if int(published.get("num_classes", 0) or 0) > 0 or rows > 1:
            notes.append("the class embedding is dropped: medgen sample runs the model without labels, as the "
                         "published samplers do (y=None)")
    fc1 = source.require("blocks.0.mlp.fc1.weight")
    config = DiTConfig(
        input_size=tuple(g * p for g, p in zip(grid, patch)), patch_size=patch, in_channels=in_channels,
        hidden_size=hidden, depth=_block_count(source), num_heads=heads,
        mlp_ratio=float(published.get("mlp_ratio", fc1.shape[0] / hidden)), learn_sigma=learn_sigma,
        num_classes=0, attn_dropout=as_float(published.get("attn_drop", 0.0), "attn_drop"),
        mlp_dropout=as_float(published.get("mlp_drop", 0.0), "mlp_drop"),
        frequency_embedding_size=int(source.require("t_embedder.mlp.0.weight").shape[1]))
    return config


def dit_rule(spatial_dims: int, prefix: str = ""):
    """Source key (and transform) for each medgen_rt DiT tensor; ``prefix`` is added to the source names."""
    def rule(name: str) -> Rule:
        if name == "x_embedder.proj.weight" and spatial_dims == 3:
            # Conv3d (hidden, C, p, p, p) -> Linear over (C, p1, p2, p3): the same row-major order
            return Rule(prefix + name, transform=lambda w: w.reshape(w.shape[0], -1))
        return Rule(prefix + name)
    return rule


def convert_dit(source: Source, config):
    """medgen_rt DiT of ``config`` with the published weights of ``source``."""
    from medgen_rt.models.dit import DiT

    model = DiT(config)
    model.load_state_dict(map_state(model.state_dict(), source, dit_rule(config.spatial_dims)), strict=True)
    return model.eval()
