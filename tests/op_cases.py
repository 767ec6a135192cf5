"""The table the generic backend harness runs: per op, how to make inputs, which
shapes and layouts, and the tolerances against the reference (DESIGN.md §3:
float32 1e-5 relative, 16-bit 2e-2). Every registered op must have an entry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclass
class OpCase:
    # (shape, dtype, device, layout, generator) -> (args tuple, kwargs dict)
    make_inputs: Callable
    shapes: list
    small_shapes: list  # for Triton's interpreter on the CPU (slow)
    layouts: list = field(default_factory=lambda: ["contiguous"])
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    # False for ops with no backward (their outputs are compared, nothing more).
    differentiable: bool = True


def _adaln_inputs(shape, dtype, device, layout, gen):
    B, N, C = shape
    def randn(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    if layout == "strided_rows":  # every other token of a longer sequence
        x = randn(B, 2 * N, C)[:, ::2, :]
    elif layout == "channels_not_contiguous":  # channel axis has stride != 1
        x = randn(B, C, N).transpose(1, 2)
    else:
        x = randn(B, N, C)
    # A non-zero mean and a larger spread exercise the stable two-pass statistics.
    x = x * 3.0 + 1.5
    if layout == "chunked_modulation":  # shift/scale as chunks of the adaLN linear output (B, 6C)
        mod = randn(B, 6 * C) * 0.5
        shift, scale = mod[:, :C], mod[:, C:2 * C]
    else:
        shift, scale = randn(B, C) * 0.5, randn(B, C) * 0.5
    return (x, shift, scale), {}


def _patch_embed_inputs(shape, dtype, device, layout, gen):
    B, C, hidden, spatial, patch = shape
    N = 1
    for s_, p_ in zip(spatial, patch):
        N *= s_ // p_
    P = C
    for p_ in patch:
        P *= p_
    x = torch.randn(B, C, *spatial, generator=gen).to(device, dtype)
    w = (torch.randn(hidden, P, generator=gen) / P ** 0.5).to(device, dtype)
    b = torch.randn(hidden, generator=gen).to(device, dtype)
    pos = torch.randn(N, hidden, generator=gen).to(device, dtype)
    return (x, w, b, tuple(patch), pos), {}


def _unpatchify_inputs(shape, dtype, device, layout, gen):
    B, grid, patch, C = shape
    N, P = 1, 1
    for g in grid:
        N *= g
    for p_ in patch:
        P *= p_
    return (torch.randn(B, N, P * C, generator=gen).to(device, dtype), tuple(grid), tuple(patch), C), {}


def _gated_residual_inputs(shape, dtype, device, layout, gen):
    B, N, C = shape
    return tuple(torch.randn(*s, generator=gen).to(device, dtype) for s in ((B, N, C), (B, C), (B, N, C))), {}


def _attention_inputs(shape, dtype, device, layout, gen):
    B, H, N, d = shape
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(device, dtype) for _ in range(3))
    if layout == "rope":
        angles = torch.rand(N, d // 2, generator=gen) * 6.0
        cos, sin = torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device)
        return (q, k, v, (cos, sin)), {}
    return (q, k, v), {}


def _vq_inputs(shape, dtype, device, layout, gen):
    N, K, D = shape
    codebook = torch.randn(K, D, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_first_view":  # (D, N) latents seen as (N, D): the VQ-GAN's channel-first layout
        z = torch.randn(D, N, generator=gen).to(device=device, dtype=dtype).t()
    else:
        z = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
    return (z, codebook), {}


def _tile_blend_inputs(shape, dtype, device, layout, gen):
    B, C, full, start, size = shape
    out = torch.randn(B, C, *full, generator=gen).to(device, torch.float32)
    wsum = torch.rand(*full, generator=gen).to(device, torch.float32) if layout != "no_weight_sum" else None
    tile = torch.randn(B, C, *size, generator=gen).to(device, dtype)
    region = tuple(slice(a, a + n) for a, n in zip(start, size))
    weight = torch.rand(*size, generator=gen).to(device, torch.float32) if layout == "weighted" else None
    return (out, wsum, tile, region, weight), {}


def _tile_normalize_inputs(shape, dtype, device, layout, gen):
    B, C, full = shape
    out = torch.randn(B, C, *full, generator=gen).to(device, torch.float32)
    wsum = (torch.rand(*full, generator=gen) * 2).floor().to(device, torch.float32)  # zeros stay uncovered
    return (out, wsum), {}


OP_CASES = {
    "adaln_modulate": OpCase(
        make_inputs=_adaln_inputs,
        # odd and non-power-of-two sizes, batch 1 and several, DiT widths 384/768/1152
        shapes=[(1, 1, 8), (2, 7, 33), (3, 17, 384), (2, 64, 1152), (1, 5, 1000), (4, 130, 96), (2, 9, 768)],
        small_shapes=[(1, 1, 8), (2, 7, 33), (3, 5, 384), (2, 3, 1152)],
        layouts=["contiguous", "strided_rows", "channels_not_contiguous", "chunked_modulation"],
    ),
    # (B, C, hidden, spatial, patch): 3D p=2 and p=4, 4D (1,4,4,2), odd grids
    "patch_embed": OpCase(
        make_inputs=_patch_embed_inputs,
        shapes=[(1, 8, 48, (6, 4, 10), (2, 2, 2)), (2, 3, 40, (8, 4, 12), (4, 2, 4)),
                (2, 8, 64, (3, 8, 12, 4), (1, 4, 4, 2))],
        small_shapes=[(1, 8, 48, (6, 4, 10), (2, 2, 2))],
    ),
    # (B, grid, patch, C_out)
    "unpatchify": OpCase(
        make_inputs=_unpatchify_inputs,
        shapes=[(1, (3, 2, 5), (2, 2, 2), 8), (2, (3, 2, 3, 2), (1, 4, 4, 2), 8)],
        small_shapes=[(1, (3, 2, 5), (2, 2, 2), 8)],
    ),
    "gated_residual": OpCase(
        make_inputs=_gated_residual_inputs,
        shapes=[(1, 1, 8), (2, 7, 33), (3, 17, 384)],
        small_shapes=[(2, 7, 33)],
    ),
    # (B, H, N, d), d = 64 and 128 as in the DiT presets, odd N
    "attention": OpCase(
        make_inputs=_attention_inputs,
        shapes=[(1, 2, 17, 64), (2, 3, 33, 128), (1, 1, 5, 8)],
        small_shapes=[(1, 2, 17, 64)],
        layouts=["contiguous", "rope"],
    ),
    # (N, K, D): one vector, codebooks of 1 and of the preset sizes 256/4096/16384 x 8, odd N;
    # indices must match exactly, so only float32 (16-bit near-ties could legitimately differ).
    "vq_nearest": OpCase(
        make_inputs=_vq_inputs,
        shapes=[(1, 1, 8), (37, 5, 3), (1000, 256, 8), (3001, 4096, 8), (1500, 16384, 8)],
        small_shapes=[(1, 1, 8), (37, 5, 3), (64, 256, 8)],
        layouts=["contiguous", "channels_first_view"],
        dtypes=(torch.float32,),
        differentiable=False,
    ),
    # in place: the harness compares the mutated output buffers
    "tile_blend": OpCase(
        make_inputs=_tile_blend_inputs,
        shapes=[(1, 1, (8, 6, 5), (2, 0, 1), (4, 6, 3)), (2, 3, (16, 16, 8), (5, 7, 0), (7, 9, 8))],
        small_shapes=[(1, 1, (8, 6, 5), (2, 0, 1), (4, 6, 3))],
        layouts=["unweighted", "weighted", "no_weight_sum"], differentiable=False,
    ),
    "tile_normalize": OpCase(
        make_inputs=_tile_normalize_inputs,
        shapes=[(1, 1, (8, 6, 5)), (2, 3, (16, 16, 8))], small_shapes=[(1, 1, (8, 6, 5))],
        dtypes=(torch.float32,), differentiable=False,
    ),
}
