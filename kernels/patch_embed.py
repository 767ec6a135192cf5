"""Triton patch_embed and unpatchify for 3D and 4D latents (up to 4 spatial axes).

patch_embed: tokens = patches(x) @ weight.T + bias + pos_embed in one kernel.
A tiled GEMM whose A operand is gathered straight from x (B, C, *S), any
strides: row m of the GEMM is token (b, g1..g4) and column k is the patch entry
(c, q1..q4), so element (m, k) sits at a row offset plus a column offset in x and
the patch matrix is never built. Token order is row-major over the patch grid
and a patch vector is laid out (C, p1, .., p4), as in the reference. Fewer than
4 spatial axes get leading axes of size 1. The epilogue adds bias and the
positional embedding. The backward is the op's, in PyTorch (medgen_rt/ops/patch_embed.py).

unpatchify: (B, N, prod(p) * C) tokens laid out (p1, .., p4, C) -> (B, C, *S);
each program writes a block of output rows, contiguous along the last spatial axis.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from medgen_rt.kernels.linear_gated_residual import dot_in_fp32, dot_precision, gemm_config, grouped_tile

MAX_SPATIAL = 4
UNPATCHIFY_BLOCK = 1024  # elements per program


def _pad(values, fill) -> list:
    """Leading fill entries up to MAX_SPATIAL axes."""
    return [fill] * (MAX_SPATIAL - len(values)) + list(values)


@triton.jit
def _patch_embed_kernel(
        X, W, BIAS, POS, OUT, M, HIDDEN, K, TOKENS, G2, G3, G4,
        stride_xb, stride_xc, sx1, sx2, sx3, sx4, stride_wh, stride_wk, stride_pn, stride_ob, stride_on,
        P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, HIDDEN, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < HIDDEN
    rows64 = rows.to(tl.int64)
    b = rows64 // TOKENS
    t = rows64 % TOKENS
    # token -> patch grid position (g1, .., g4), row-major
    g4 = t % G4
    r = t // G4
    g3 = r % G3
    r = r // G3
    g2 = r % G2
    g1 = r // G2
    row_off = b * stride_xb + g1 * (P1 * sx1) + g2 * (P2 * sx2) + g3 * (P3 * sx3) + g4 * (P4 * sx4)
    w_cols = W + cols.to(tl.int64) * stride_wh
    PATCH: tl.constexpr = P1 * P2 * P3 * P4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        # patch entry -> (c, q1, .., q4), q4 fastest
        kk64 = kk.to(tl.int64)
        c = kk64 // PATCH
        q = kk64 % PATCH
        q4 = q % P4
        q = q // P4
        q3 = q % P3
        q = q // P3
        q2 = q % P2
        q1 = q // P2
        col_off = c * stride_xc + q1 * sx1 + q2 * sx2 + q3 * sx3 + q4 * sx4
        a = tl.load(X + row_off[:, None] + col_off[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + kk64[:, None] * stride_wk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    mask = rmask[:, None] & cmask[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        acc += tl.load(POS + t[:, None] * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + b[:, None] * stride_ob + t[:, None] * stride_on + cols[None, :],
             acc.to(OUT.dtype.element_ty), mask=mask)


def patch_embed_forward(x, weight, bias, pos, patch) -> torch.Tensor:
    B, C = x.shape[:2]
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    tokens = math.prod(grid)
    hidden, K = weight.shape
    out = torch.empty((B, tokens, hidden), dtype=x.dtype, device=x.device)
    M = B * tokens
    if out.numel() == 0:
        return out
    G = _pad(grid, 1)
    P = _pad(patch, 1)
    SX = _pad(x.stride()[2:], 0)
    cfg = gemm_config(M, hidden, K, x.dtype)
    launch = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(hidden, cfg["BLOCK_N"]),)
    _patch_embed_kernel[launch](
        x, weight, bias if bias is not None else weight, pos if pos is not None else weight, out,
        M, hidden, K, tokens, G[1], G[2], G[3],
        x.stride(0), x.stride(1), *SX, weight.stride(0), weight.stride(1),
        pos.stride(0) if pos is not None else 0, out.stride(0), out.stride(1),
        P1=P[0], P2=P[1], P3=P[2], P4=P[3], HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        DOT_FP32=dot_in_fp32(x.dtype), PRECISION=dot_precision(x.dtype), **cfg)
    return out


@triton.jit
def _unpatchify_kernel(T, OUT, ROWS, CHANNELS, S1, S2, S3, S4, G2, G3, G4,
                       stride_tb, stride_tn, stride_tf, stride_ob, stride_oc, so1, so2, so3, so4,
                       P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # BLOCK_R output rows (b, c, s1, s2, s3) x BLOCK_S positions along the last spatial axis:
    # several rows per program, since that axis is short (2 to 8 in the DiT latents).
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    s4 = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (row < ROWS)[:, None] & (s4 < S4)[None, :]
    s3 = row % S3
    r = row // S3
    s2 = r % S2
    r = r // S2
    s1 = r % S1
    r = r // S1
    c = r % CHANNELS
    b = r // CHANNELS
    token = ((s1 // P1 * G2 + s2 // P2) * G3 + s3 // P3) * G4
    feature = ((s1 % P1 * P2 + s2 % P2) * P3 + s3 % P3) * P4
    token = token[:, None] + (s4 // P4)[None, :]
    feature = (feature[:, None] + (s4 % P4)[None, :]) * CHANNELS + c[:, None]
    v = tl.load(T + b[:, None] * stride_tb + token * stride_tn + feature * stride_tf, mask=mask)
    out_row = b * stride_ob + c * stride_oc + s1 * so1 + s2 * so2 + s3 * so3
    tl.store(OUT + out_row[:, None] + s4[None, :] * so4, v, mask=mask)


def unpatchify_forward(tokens, grid, patch, channels) -> torch.Tensor:
    B = tokens.shape[0]
    spatial = [g * p for g, p in zip(grid, patch)]
    out = torch.empty([B, channels, *spatial], dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    S = _pad(spatial, 1)
    G = _pad(grid, 1)
    P = _pad(patch, 1)
    SO = _pad(out.stride()[2:], 0)
    rows = B * channels * S[0] * S[1] * S[2]
    block_s = min(UNPATCHIFY_BLOCK, triton.next_power_of_2(S[3]))
    block_r = min(triton.next_power_of_2(rows), UNPATCHIFY_BLOCK // block_s)
    launch = (triton.cdiv(rows, block_r), triton.cdiv(S[3], block_s))
    _unpatchify_kernel[launch](
        tokens, out, rows, channels, S[0], S[1], S[2], S[3], G[1], G[2], G[3],
        tokens.stride(0), tokens.stride(1), tokens.stride(2), out.stride(0), out.stride(1), *SO,
        P1=P[0], P2=P[1], P3=P[2], P4=P[3], BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)
    return out
