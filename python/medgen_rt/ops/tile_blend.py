"""tile_blend: weighted accumulation of a decoded tile into the output, and the
final normalisation by the accumulated weights.

    tile_blend(out, weight_sum, tile, region, weight=None)   in place
        out[:, :, region] += weight * tile ; weight_sum[region] += weight
        out (B, C, *S) float32 (may live in pinned CPU memory while the tile is on
        the GPU: the tile is moved to out's device), weight_sum (*S) float32 or
        None when the caller's regions are disjoint with weight 1 (exact halo tiles,
        streamed chunks): no weights to track and no normalisation needed,
        tile (B, C, *s) with s the region's size, weight None (= 1) or (*s)
    tile_normalize(out, weight_sum)   in place: out /= weight_sum (where > 0)

Reference implementations; fast kernels come with the kernels issue.
"""
from __future__ import annotations

from typing import Optional

import torch

from medgen_rt.ops.registry import register_op


def tile_blend_reference(out: torch.Tensor, weight_sum: torch.Tensor, tile: torch.Tensor, region: tuple,
                         weight: Optional[torch.Tensor] = None) -> None:
    index = (slice(None), slice(None)) + tuple(region)
    tile = tile.to(device=out.device, dtype=out.dtype, non_blocking=True)
    if weight is None:
        out[index] += tile
        if weight_sum is not None:
            weight_sum[tuple(region)] += 1.0
    else:
        weight = weight.to(device=out.device, dtype=out.dtype)
        out[index] += tile * weight
        if weight_sum is not None:
            weight_sum[tuple(region)] += weight


def check_tile_blend(out, weight_sum, tile, region, weight=None):
    if out.dim() != tile.dim() or out.shape[:2] != tile.shape[:2]:
        raise ValueError(f"tile_blend: tile {tuple(tile.shape)} does not match output {tuple(out.shape)} "
                         "in batch and channels")
    if weight_sum is not None and tuple(weight_sum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"tile_blend: weight_sum must be {tuple(out.shape[2:])}, got {tuple(weight_sum.shape)}")
    size = tuple(s.stop - s.start for s in region)
    if size != tuple(tile.shape[2:]):
        raise ValueError(f"tile_blend: region of size {size} but the tile is {tuple(tile.shape[2:])}")
    if weight is not None and tuple(weight.shape) != size:
        raise ValueError(f"tile_blend: weight must be {size}, got {tuple(weight.shape)}")


def tile_normalize_reference(out: torch.Tensor, weight_sum: torch.Tensor) -> None:
    covered = weight_sum > 0
    out.div_(torch.where(covered, weight_sum, torch.ones_like(weight_sum)))


def check_tile_normalize(out, weight_sum):
    if tuple(weight_sum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"tile_normalize: weight_sum must be {tuple(out.shape[2:])}, got {tuple(weight_sum.shape)}")


tile_blend = register_op("tile_blend", tile_blend_reference, check_args=check_tile_blend)
tile_normalize = register_op("tile_normalize", tile_normalize_reference, check_args=check_tile_normalize)
