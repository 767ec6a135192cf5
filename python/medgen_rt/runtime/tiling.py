"""Tile plans for decoding (and encoding) large latents piece by piece.

numpy and the standard library only: the torch runtime and the torch-free ONNX
engine share this planner.

A latent of spatial size L (per axis) is cut into core tiles of at most `core`
latent voxels. Each tile is decoded with a halo of `halo` latent voxels on every
side (clamped at the volume's border); when the halo is at least the decoder's
receptive field (see medgen_rt.models.vqgan.decoder_receptive_field), the
decoded core equals the untiled decode exactly. The core's output is cut from
the decoded tile and written to its place in the output (`factor` output voxels
per latent voxel). Cores do not overlap, so blend weights are 1; tile_blend also
takes soft weights for decoders that cannot be made exact (normalisation,
attention), where overlapping cores are feathered instead.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Tile:
    """One tile, all ranges as (start, stop) per spatial axis."""

    latent: tuple  # the latent region decoded (core plus halo)
    core: tuple  # the latent region this tile is responsible for
    output: tuple  # where the core lands in the output
    crop: tuple  # the core's region inside the decoded tile's output

    def latent_slices(self) -> tuple:
        return tuple(slice(a, b) for a, b in self.latent)

    def output_slices(self) -> tuple:
        return tuple(slice(a, b) for a, b in self.output)

    def crop_slices(self) -> tuple:
        return tuple(slice(a, b) for a, b in self.crop)

    @property
    def latent_voxels(self) -> int:
        return math.prod(b - a for a, b in self.latent)


def _axis_ranges(length: int, core: int) -> list:
    n = max(1, math.ceil(length / core))
    # even split: tiles differ by at most one voxel, so no thin last tile
    bounds = [round(i * length / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def plan_tiles(latent_shape: Sequence[int], core: Sequence[int], halo: Sequence[int],
               factor: Sequence[int]) -> list:
    """Tiles covering a latent of spatial shape `latent_shape`, in row-major order.

    core: maximum core size per axis (latent voxels); halo: per axis (latent voxels);
    factor: output voxels per latent voxel per axis.
    """
    n = len(latent_shape)
    core, halo, factor = (tuple(int(v) for v in _per_axis(x, n, name))
                          for x, name in ((core, "core"), (halo, "halo"), (factor, "factor")))
    if any(c < 1 for c in core) or any(h < 0 for h in halo) or any(f < 1 for f in factor):
        raise ValueError(f"plan_tiles: core >= 1, halo >= 0 and factor >= 1 per axis; got {core}, {halo}, {factor}")
    per_axis = []
    for length, c, h, f in zip(latent_shape, core, halo, factor):
        ranges = []
        for a, b in _axis_ranges(int(length), c):
            la, lb = max(0, a - h), min(int(length), b + h)
            ranges.append(((la, lb), (a, b), (a * f, b * f), ((a - la) * f, (b - la) * f)))
        per_axis.append(ranges)
    tiles = []
    for combo in itertools.product(*per_axis):
        tiles.append(Tile(latent=tuple(c[0] for c in combo), core=tuple(c[1] for c in combo),
                          output=tuple(c[2] for c in combo), crop=tuple(c[3] for c in combo)))
    return tiles


def _per_axis(value, n: int, name: str) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"plan_tiles: {name} needs {n} values, got {value}")
    return value
