"""The published VQ-GANs (VolDiT src/models/vqvae.py, CardioDiT src/models/vqvae.py,
MedLoRD src/models/vqvae.py and its older MONAI-Generative VQVAE) onto medgen_rt's
VQGAN3D / CineVQGAN.

All of them keep MONAI's VQVAE module names, which medgen_rt's VQ-GAN copies, so
every tensor keeps its name (see medgen_rt.models.vqgan for the table):
``encoder.blocks.{i}.conv.*`` (strided conv of a level, last: conv to the
embedding), ``encoder.blocks.{i}.conv{1,2}.conv.*`` (residual units),
``decoder.blocks.0.conv.*``, ``decoder.blocks.{i}.conv{1,2}.conv.*``,
``decoder.blocks.{i}.conv.*`` (transposed conv, weight (C_in, C_out, k...)),
``quantizer.quantizer.embedding.weight`` (codebook K x D),
``quantizer.quantizer.ema_cluster_size`` (K) and ``.ema_w`` (K x D).

The configuration is read from the shapes: channels, residual units and
channels per level, kernel sizes per axis (CardioDiT's asymmetric levels use
e.g. kernel (4, 4, 1)), codebook size. Strides are not stored in a checkpoint:
an even kernel k is taken as stride 2 with padding (k-2)/2 (the published
(2, 4, 1, 1) levels), an odd one as stride 1 with padding (k-1)/2; the published
stage-1 YAML (``--config``) overrides all of it.
"""
from __future__ import annotations

from typing import Optional

from medgen_rt.convert.common import ConversionError, PublishedConfig, Source, as_float, map_state, same_name

_FLOAT_FIELDS = ("commitment_cost", "decay", "epsilon", "dropout", "dead_code_threshold")


def _blocks(source: Source, part: str) -> dict:
    """{block index: "conv" | "res"} of encoder or decoder blocks."""
    kinds = {}
    for key in source.keys(f"{part}.blocks."):
        rest = key[len(f"{part}.blocks."):]
        index, _, tail = rest.partition(".")
        if not index.isdigit():
            continue
        kind = "res" if tail.startswith("conv1.") or tail.startswith("conv2.") else "conv"
        kinds.setdefault(int(index), kind)
    return dict(sorted(kinds.items()))


def _level_params(kernel: tuple, transposed: bool) -> list:
    """(stride, kernel, dilation, padding[, output_padding]) for a level from its kernel per axis."""
    stride = tuple(2 if k % 2 == 0 else 1 for k in kernel)
    pad = tuple((k - 2) // 2 if k % 2 == 0 else (k - 1) // 2 for k in kernel)

    def one(v):
        return v[0] if len(set(v)) == 1 else list(v)

    entry = [one(stride), one(kernel), 1, one(pad)]
    return entry + [0] if transposed else entry


def infer_vqgan_config(source: Source) -> dict:
    """VQGANConfig fields read from a published VQ-GAN state_dict."""
    enc = _blocks(source, "encoder")
    if not enc or list(enc) != list(range(len(enc))):
        raise ConversionError(f"{source.origin}: no encoder.blocks.* found in order (is this a VQ-GAN checkpoint?)")
    kinds = list(enc.values())
    convs = [i for i, k in enc.items() if k == "conv"]
    levels = len(convs) - 1
    if levels < 1 or kinds[-1] != "conv" or kinds[0] != "conv":
        raise ConversionError(f"{source.origin}: unexpected encoder layout {kinds}: expected a strided conv, "
                              "residual units per level and a final conv")
    res_per_level = convs[1] - convs[0] - 1
    expected = (["conv"] + ["res"] * res_per_level) * levels + ["conv"]
    if kinds != expected:
        raise ConversionError(f"{source.origin}: encoder blocks {kinds} do not repeat one layout per level "
                              f"(expected {expected}); levels with different numbers of residual units are not "
                              "supported")
    down = [source.require(f"encoder.blocks.{i}.conv.weight") for i in convs[:-1]]
    final = source.require(f"encoder.blocks.{convs[-1]}.conv.weight")
    channels = [int(w.shape[0]) for w in down]
    res_channels = [int(source.require(f"encoder.blocks.{i + 1}.conv1.conv.weight").shape[0])
                    if res_per_level else c for i, c in zip(convs[:-1], channels)]
    # decoder: input conv at 0, then per level the residual units and the transposed conv
    up = [source.require(f"decoder.blocks.{(i + 1) * (res_per_level + 1)}.conv.weight") for i in range(levels)]
    codebook = source.require("quantizer.quantizer.embedding.weight")
    return {
        "spatial_dims": down[0].dim() - 2,
        "in_channels": int(down[0].shape[1]),
        "out_channels": int(up[-1].shape[1]),
        "channels": channels,
        "num_res_layers": res_per_level,
        "num_res_channels": res_channels,
        "downsample_parameters": [_level_params(tuple(w.shape[2:]), False) for w in down],
        "upsample_parameters": [_level_params(tuple(w.shape[2:]), True) for w in up],
        "embedding_dim": int(final.shape[0]),
        "num_embeddings": int(codebook.shape[0]),
    }


def vqgan_config(source: Source, cfg: PublishedConfig, cine: bool, dead_code_threshold: float) -> dict:
    """The model.json config of the VQ-GAN: inferred, then the published YAML's values on top."""
    inferred = infer_vqgan_config(source)
    published = dict(cfg.vqgan)
    for name in _FLOAT_FIELDS:
        if name in published:
            published[name] = as_float(published[name], f"stage-1 config {name}")
    if "num_channels" in published:
        inferred.pop("channels")
    published.pop("use_checkpointing", None)  # a training-time memory option
    return {"cine": cine, "dead_code_threshold": dead_code_threshold, **inferred, **published}


def convert_vqgan(source: Source, cfg: PublishedConfig, cine: bool, dead_code_threshold: float = 0.0):
    """(medgen_rt VQ-GAN with the published weights, its model.json config)."""
    from medgen_rt.models.vqgan import build_vqgan

    spec = vqgan_config(source, cfg, cine, dead_code_threshold)
    try:
        model = build_vqgan(spec)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{source.origin}: cannot build the VQ-GAN ({exc})") from None
    state = map_state(model.state_dict(), source, same_name)
    model.load_state_dict(state, strict=True)
    return model.eval(), model.config_dict()


def latent_channels(vqgan) -> int:
    return int(vqgan.config.embedding_dim)


def image_shape(vqgan, latent_spatial) -> list:
    """Image size the VQ-GAN decodes a latent of ``latent_spatial`` to ((X, Y, Z) or (X, Y, Z, T) for cine)."""
    shape = vqgan.output_shape((1, vqgan.config.embedding_dim, *latent_spatial))
    return [int(s) for s in shape[2:]]


def check_latent_channels(vqgan, channels: Optional[int], what: str) -> None:
    if channels is not None and channels != latent_channels(vqgan):
        raise ConversionError(f"{what} takes {channels}-channel latents but the VQ-GAN's codebook vectors have "
                              f"{latent_channels(vqgan)} channels: are these checkpoints of the same model?")
