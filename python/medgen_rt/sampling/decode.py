"""Tiled decoding: a latent is decoded tile by tile with a halo that covers the
decoder's receptive field, so the result equals the full-volume decode while the
decoder's peak memory depends on the tile, not the volume. Tiles are planned by
medgen_rt.runtime.tiling (shared with the ONNX engine) and accumulated with the
tile_blend op into an output buffer that can live in pinned CPU memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from medgen_rt import ops
from medgen_rt.runtime.tiling import plan_tiles


@dataclass(frozen=True)
class DecoderGeometry:
    """How a decoder maps latent axes to output axes.

    factor[i], halo[i]: output voxels per latent voxel and the receptive-field
    radius (latent voxels) along latent spatial axis i; output_axis[i]: which output
    spatial axis latent axis i becomes (the cine decoder moves slices Z)."""

    factor: tuple
    halo: tuple
    output_axis: tuple
    out_channels: int

    def output_shape(self, latent_spatial: Sequence[int]) -> tuple:
        out = [0] * len(latent_spatial)
        for i, n in enumerate(latent_spatial):
            out[self.output_axis[i]] = n * self.factor[i]
        return tuple(out)


def decoder_geometry(model) -> DecoderGeometry:
    """Geometry of a medgen_rt VQ-GAN's decoder, from its layers (not guessed)."""
    from medgen_rt.models.vqgan import CineVQGAN, decoder_receptive_field

    factor = tuple(int(f) for f in model.downsample_factor)
    halo = tuple(int(r) for r in decoder_receptive_field(model))
    channels = model.config.out_channels
    if isinstance(model, CineVQGAN):
        # latent (Z, X', Y', T') -> output (X, Y, Z, T); slices decode independently: no halo on Z
        return DecoderGeometry(factor=(1,) + factor, halo=(0,) + halo, output_axis=(2, 0, 1, 3),
                               out_channels=channels)
    return DecoderGeometry(factor=factor, halo=halo, output_axis=tuple(range(len(factor))), out_channels=channels)


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, geometry: DecoderGeometry,
                 core: Sequence[int], out_device: str = "cpu", pin_memory: Optional[bool] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Decode `latent` (B, C, *L) tile by tile; returns (B, out_channels, *output spatial) float32.

    decode: the decoder, latent tile -> image tile. core: largest core tile in latent
    voxels per axis. The output buffer is on out_device (pinned CPU memory when the
    latent is on a GPU, unless pin_memory=False). progress(done, total) after each tile.
    """
    spatial = tuple(latent.shape[2:])
    if len(spatial) != len(geometry.factor):
        raise ValueError(f"tiled_decode: latent has {len(spatial)} spatial axes, the decoder {len(geometry.factor)}")
    tiles = plan_tiles(spatial, core, geometry.halo, geometry.factor)
    out_spatial = geometry.output_shape(spatial)
    if pin_memory is None:
        pin_memory = latent.device.type == "cuda" and str(out_device) == "cpu"
    out = torch.zeros((latent.shape[0], geometry.out_channels) + out_spatial, dtype=torch.float32,
                      device=out_device, pin_memory=bool(pin_memory))
    weight_sum = torch.zeros(out_spatial, dtype=torch.float32, device=out_device)
    for done, tile in enumerate(tiles, 1):
        lat = latent[(slice(None), slice(None)) + tile.latent_slices()]
        with torch.no_grad():
            decoded = decode(lat)
        crop = [slice(None)] * len(out_spatial)
        region = [slice(None)] * len(out_spatial)
        for i, (c, o) in enumerate(zip(tile.crop_slices(), tile.output_slices())):
            crop[geometry.output_axis[i]] = c
            region[geometry.output_axis[i]] = o
        ops.tile_blend(out, weight_sum, decoded[(slice(None), slice(None)) + tuple(crop)], tuple(region))
        if progress is not None:
            progress(done, len(tiles))
    ops.tile_normalize(out, weight_sum)
    return out
