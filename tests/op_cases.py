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


def _adaln_modulate_inputs(shape, dtype, device, layout, gen):
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
    if layout == "channels_last":  # x with channels innermost in memory: the gather follows any strides
        x = torch.randn(B, *spatial, C, generator=gen).to(device, dtype).movedim(-1, 1)
    elif layout == "sliced":  # a crop of a larger volume and every other channel: no axis has its dense stride
        big = torch.randn(B, 2 * C, *(s + 3 for s in spatial), generator=gen).to(device, dtype)
        x = big[(slice(None), slice(1, None, 2)) + tuple(slice(2, 2 + s) for s in spatial)]
    else:
        x = torch.randn(B, C, *spatial, generator=gen).to(device, dtype)
    w = (torch.randn(hidden, P, generator=gen) / P ** 0.5).to(device, dtype)
    b = torch.randn(hidden, generator=gen).to(device, dtype)
    pos = torch.randn(N, hidden, generator=gen).to(device, dtype)
    if layout == "batched_pos":  # (1, N, hidden), as published DiT checkpoints store it
        pos = pos[None]
    elif layout == "no_bias_no_pos":
        b = pos = None
    elif layout == "float32_pos":  # the embedding table in float32 for 16-bit x: rounded to x's dtype first
        pos = pos.float()
    return (x, w, b, tuple(patch), pos), {}


def _unpatchify_inputs(shape, dtype, device, layout, gen):
    B, grid, patch, C = shape
    N, P = 1, 1
    for g in grid:
        N *= g
    for p_ in patch:
        P *= p_
    if layout == "strided_tokens":  # the first half of a wider final-layer output
        tokens = torch.randn(B, N, 2 * P * C, generator=gen).to(device, dtype)[..., :P * C]
    elif layout == "transposed_tokens":  # features not unit-stride
        tokens = torch.randn(B, P * C, N, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        tokens = torch.randn(B, N, P * C, generator=gen).to(device, dtype)
    return (tokens, tuple(grid), tuple(patch), C), {}


def _gated_residual_inputs(shape, dtype, device, layout, gen):
    B, N, C = shape
    x, gate, y = (torch.randn(*s, generator=gen).to(device, dtype) for s in ((B, N, C), (B, C), (B, N, C)))
    if layout == "chunked_gate":  # the gate as DiT passes it: a chunk of the adaLN linear output (B, 6C)
        gate = torch.randn(B, 6 * C, generator=gen).to(device, dtype)[:, 2 * C:3 * C]
    elif layout == "strided_rows":  # x every other token of a longer sequence
        x = torch.randn(B, 2 * N, C, generator=gen).to(device, dtype)[:, ::2]
    elif layout == "channels_not_contiguous":  # y with stride != 1 along C
        y = torch.randn(B, C, N, generator=gen).to(device, dtype).transpose(1, 2)
    elif layout == "float32_gate":  # gate and y in float32 while x is 16-bit: the reference casts to x's dtype
        gate, y = gate.float(), y.float()
    return (x, gate, y), {}


def _linear_gated_residual_inputs(shape, dtype, device, layout, gen):
    B, N, C, K = shape
    def randn(*s):
        return torch.randn(*s, generator=gen).to(device, dtype)

    x = randn(B, N, C)
    h = randn(B, 2 * N, K)[:, ::2] if layout == "strided_h" else randn(B, N, K)
    weight = randn(C, K) / K ** 0.5
    bias = None if layout == "no_bias" else randn(C)
    gate = randn(B, 6 * C)[:, 2 * C:3 * C] if layout == "chunked_gate" else randn(B, C)
    return (x, gate, h, weight, bias), {}


def _attention_inputs(shape, dtype, device, layout, gen):
    B, H, N, d = shape
    if layout.startswith("packed_qkv"):  # views of one (B, N, 3, H, d) projection, as the DiT's qkv linear gives
        qkv = torch.randn(B, N, 3, H, d, generator=gen).to(device, dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    elif layout.startswith("transposed"):  # each a (B, N, H, d) tensor seen as (B, H, N, d)
        q, k, v = (torch.randn(B, N, H, d, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, N, d, generator=gen).to(device, dtype) for _ in range(3))
    args, kwargs = (q, k, v), {}
    if "rope" in layout:
        angles = torch.rand(N, d // 2, generator=gen) * 6.0
        cos, sin = torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device)
        args = (q, k, v, (cos, sin))
    if "qk_norm_plain" in layout:  # LayerNorm(d, elementwise_affine=False) on both
        kwargs = {"q_norm": (None, None, 1e-6), "k_norm": (None, None, 1e-5)}
    elif "qk_norm" in layout:  # LayerNorm(d) parameters near their initial values; k without a bias
        w = (1 + 0.2 * torch.randn(d, generator=gen)).to(device, dtype)
        bias = (0.2 * torch.randn(d, generator=gen)).to(device, dtype)
        kwargs = {"q_norm": (w, bias, 1e-6), "k_norm": (w.flip(0), None, 1e-5)}
    return args, kwargs


def _vq_inputs(shape, dtype, device, layout, gen):
    N, K, D = shape
    codebook = torch.randn(K, D, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_first_view":  # (D, N) latents seen as (N, D): the VQ-GAN's channel-first layout
        z = torch.randn(D, N, generator=gen).to(device=device, dtype=dtype).t()
    elif layout == "strided_rows":  # every other vector of a longer batch
        z = torch.randn(2 * N, D, generator=gen).to(device=device, dtype=dtype)[::2]
    else:
        z = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype)
    if layout == "duplicate_entries":  # exact ties: every entry twice, the lower index must win
        codebook = torch.cat([codebook[: (K + 1) // 2]] * 2)[:K]
        z = torch.cat([codebook[: min(N, K)].to(z.dtype), z[min(N, K):]])  # some vectors sit on an entry
    elif layout == "bfloat16_z":  # 16-bit latents against a float32 codebook: distances still in float32
        z = z.to(torch.bfloat16)
    return (z, codebook), {}


def _tile_blend_inputs(shape, dtype, device, layout, gen):
    B, C, full, start, size = shape
    if layout == "strided_out":  # out one sample of a larger batch along the last axis, as the streamed decode writes
        out = torch.randn(B, C, *full[:-1], 2 * full[-1], generator=gen).to(device, torch.float32)[..., 1::2]
    else:
        out = torch.randn(B, C, *full, generator=gen).to(device, torch.float32)
    wsum = torch.rand(*full, generator=gen).to(device, torch.float32) if "no_weight_sum" not in layout else None
    if layout == "cropped_tile":  # the tile a crop of a larger decoded block, as the tiled decode passes it
        tile = torch.randn(B, C, *(n + 2 for n in size), generator=gen).to(device, dtype)
        tile = tile[(slice(None), slice(None)) + tuple(slice(1, n + 1) for n in size)]
    else:
        tile = torch.randn(B, C, *size, generator=gen).to(device, dtype)
    region = tuple(slice(a, a + n) for a, n in zip(start, size))
    weight = torch.rand(*size, generator=gen).to(device, torch.float32) if layout.startswith("weighted") else None
    return (out, wsum, tile, region, weight), {}


def _tile_normalize_inputs(shape, dtype, device, layout, gen):
    B, C, full = shape
    out = torch.randn(B, C, *full, generator=gen).to(device, torch.float32)
    wsum = (torch.rand(*full, generator=gen) * 2).floor().to(device, torch.float32)  # zeros stay uncovered
    return (out, wsum), {}


OP_CASES = {
    "adaln_modulate": OpCase(
        make_inputs=_adaln_modulate_inputs,
        # odd and non-power-of-two sizes, batch 1 and several, DiT widths 384/768/1152
        shapes=[(1, 1, 8), (2, 7, 33), (3, 17, 384), (2, 64, 1152), (1, 5, 1000), (4, 130, 96), (2, 9, 768)],
        small_shapes=[(1, 1, 8), (2, 7, 33), (3, 5, 384), (2, 3, 1152)],
        layouts=["contiguous", "strided_rows", "channels_not_contiguous", "chunked_modulation"],
    ),
    # (B, C, hidden, spatial, patch): 3D p=2, p=4 and mixed (1, 2, 3), 4D (1,4,4,2) and mixed, odd grids,
    # hidden not a multiple of the CPU kernel's 16-column tiles, batch 1, 2 and 3
    "patch_embed": OpCase(
        make_inputs=_patch_embed_inputs,
        shapes=[(1, 8, 48, (6, 4, 10), (2, 2, 2)), (2, 3, 40, (8, 4, 12), (4, 2, 4)),
                (2, 8, 64, (3, 8, 12, 4), (1, 4, 4, 2)), (3, 5, 37, (3, 6, 9), (1, 2, 3)),
                (3, 2, 70, (4, 3, 4, 6), (2, 1, 4, 3))],
        small_shapes=[(1, 8, 48, (6, 4, 10), (2, 2, 2)), (1, 2, 20, (2, 8, 4, 4), (1, 4, 4, 2)),
                      (3, 3, 17, (3, 4, 3), (1, 2, 3))],
        layouts=["contiguous", "channels_last", "sliced", "batched_pos", "no_bias_no_pos", "float32_pos"],
    ),
    # (B, grid, patch, C_out)
    "unpatchify": OpCase(
        make_inputs=_unpatchify_inputs,
        shapes=[(1, (3, 2, 5), (2, 2, 2), 8), (2, (3, 2, 3, 2), (1, 4, 4, 2), 8), (3, (2, 3, 1), (1, 2, 3), 5),
                (3, (3, 1, 2), (4, 4, 4), 1)],
        small_shapes=[(1, (3, 2, 5), (2, 2, 2), 8), (1, (2, 2, 1, 2), (1, 4, 4, 2), 3), (3, (2, 3, 1), (1, 2, 3), 5)],
        layouts=["contiguous", "strided_tokens", "transposed_tokens"],
    ),
    "gated_residual": OpCase(
        make_inputs=_gated_residual_inputs,
        # odd widths, C = 1, batch 1 and many, DiT widths; N > 64 gives the CUDA backward several chunks
        shapes=[(1, 1, 8), (2, 7, 33), (3, 17, 384), (2, 5, 1), (9, 3, 16), (1, 300, 96), (2, 130, 1152)],
        small_shapes=[(2, 7, 33)],
        layouts=["contiguous", "chunked_gate", "strided_rows", "channels_not_contiguous", "float32_gate"],
    ),
    # (B, N, C, K): C outputs from K inputs; K <= N and K > N take different backward paths
    "linear_gated_residual": OpCase(
        make_inputs=_linear_gated_residual_inputs,
        shapes=[(1, 1, 8, 8), (2, 7, 33, 20), (2, 100, 96, 48), (2, 17, 384, 1536), (1, 300, 200, 130)],
        small_shapes=[(2, 20, 24, 16), (1, 5, 33, 40)],
        layouts=["contiguous", "chunked_gate", "no_bias", "strided_h"],
    ),
    # (B, H, N, d), d = 64 and 128 as in the DiT presets, 80 (DiT-L/XL-like), odd N (partial
    # query/key blocks), a single token, tiny and non-power-of-two head dims (padded in the kernels)
    "attention": OpCase(
        make_inputs=_attention_inputs,
        shapes=[(1, 2, 17, 64), (2, 3, 33, 128), (1, 1, 5, 8), (2, 2, 300, 64), (1, 2, 129, 128), (1, 3, 9, 24),
                (3, 2, 7, 80), (1, 1, 1, 32)],
        small_shapes=[(1, 2, 17, 64), (1, 1, 20, 128), (2, 1, 5, 8), (1, 3, 9, 24)],
        layouts=["contiguous", "rope", "qk_norm", "rope_qk_norm", "packed_qkv", "packed_qkv_rope_qk_norm",
                 "transposed_qk_norm_plain"],
    ),
    # (N, K, D): one vector, codebooks of 1 and of the preset sizes 256/4096/16384 x 8, odd N;
    # indices must match exactly, so only float32 (16-bit near-ties could legitimately differ).
    "vq_nearest": OpCase(
        make_inputs=_vq_inputs,
        # K not a multiple of 8 (tails), D = 1, 4, 16 and odd, batch 1 and many
        shapes=[(1, 1, 8), (37, 5, 3), (1000, 256, 8), (3001, 4096, 8), (1500, 16384, 8), (257, 1001, 8),
                (300, 77, 1), (200, 515, 4), (129, 1030, 16), (70, 300, 37)],
        small_shapes=[(1, 1, 8), (37, 5, 3), (64, 256, 8)],
        layouts=["contiguous", "channels_first_view", "strided_rows", "duplicate_entries", "bfloat16_z"],
        dtypes=(torch.float32,),
        differentiable=False,
    ),
    # in place: the harness compares the mutated output buffers
    "tile_blend": OpCase(
        make_inputs=_tile_blend_inputs,
        # 3D and 4D (cine) volumes, a tile covering the whole output, one voxel, batch many
        shapes=[(1, 1, (8, 6, 5), (2, 0, 1), (4, 6, 3)), (2, 3, (16, 16, 8), (5, 7, 0), (7, 9, 8)),
                (1, 2, (5, 6, 4, 3), (1, 0, 2, 0), (3, 6, 2, 3)), (1, 4, (6, 5, 7), (0, 0, 0), (6, 5, 7)),
                (5, 1, (3, 3, 3), (1, 2, 0), (1, 1, 1)), (2, 8, (40, 36, 24), (3, 1, 2), (33, 30, 20))],
        small_shapes=[(1, 1, (8, 6, 5), (2, 0, 1), (4, 6, 3))],
        layouts=["unweighted", "weighted", "no_weight_sum", "weighted_no_weight_sum", "strided_out", "cropped_tile"],
        differentiable=False,
    ),
    "tile_normalize": OpCase(
        make_inputs=_tile_normalize_inputs,
        # 3D, 4D (cine), one voxel, batch x channels many, and a volume past one CPU thread range
        shapes=[(1, 1, (8, 6, 5)), (2, 3, (16, 16, 8)), (3, 2, (5, 6, 4, 3)), (1, 1, (1, 1, 1)),
                (2, 1, (40, 36, 24))],
        small_shapes=[(1, 1, (8, 6, 5))],
        dtypes=(torch.float32,), differentiable=False,
    ),
}
