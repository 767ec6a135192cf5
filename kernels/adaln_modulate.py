"""Triton adaln_modulate: y = LayerNorm(x) * (1 + scale[b]) + shift[b].

x is (B, N, C) with a contiguous channel axis, shift and scale are (B, C);
statistics in float32, output in x's dtype. Forward: one program per row, the
whole row in registers (C up to 16384). Backward: one program per (chunk of
rows, sample) that writes dx and per-chunk partial sums for dscale and dshift;
the wrapper adds the partials (a tiny reduction). The autograd that calls them is
the op's (medgen_rt/ops/adaln_modulate.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHANNELS = 16384
BACKWARD_ROWS_PER_PROGRAM = 64


@triton.jit
def _adaln_modulate_forward_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD,
                                   N, C, stride_xb, stride_xn, stride_tb, stride_sb, stride_yb, stride_yn, eps,
                                   STORE_STATS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / C + eps)
    scale = tl.load(SCALE + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_tb + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    tl.store(Y + b * stride_yb + n * stride_yn + cols, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_modulate_backward_kernel(DY, X, SCALE, MEAN, RSTD, DX, DSCALE_PART, DSHIFT_PART,
                                    N, C, n_chunks, rows_per_chunk,
                                    stride_dyb, stride_dyn, stride_xb, stride_xn, stride_sb, stride_dxb, stride_dxn,
                                    BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    scale1 = 1.0 + tl.load(SCALE + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    n_begin = chunk * rows_per_chunk
    n_rows = tl.minimum(N - n_begin, rows_per_chunk)
    for i in range(0, n_rows):
        n = n_begin + i
        row = b * N + n
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x = tl.load(X + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + b * stride_dyb + n * stride_dyn + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        acc_scale += dy * xhat
        acc_shift += dy
        g = dy * scale1
        mean_g = tl.sum(g, axis=0) / C
        mean_gx = tl.sum(g * xhat, axis=0) / C
        dx = rstd * (g - mean_g - xhat * mean_gx)
        tl.store(DX + b * stride_dxb + n * stride_dxn + cols, dx.to(DX.dtype.element_ty), mask=mask)
    out = (b * n_chunks + chunk) * C + cols
    tl.store(DSCALE_PART + out, acc_scale, mask=mask)
    tl.store(DSHIFT_PART + out, acc_shift, mask=mask)


def _block_c(C: int) -> int:
    return triton.next_power_of_2(C)


def forward(x, shift, scale, eps, need_stats):
    """Launches the forward; returns (y, mean, rstd) with mean/rstd None unless need_stats."""
    B, N, C = x.shape
    y = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if need_stats:
        mean = torch.empty(B * N, dtype=torch.float32, device=x.device)
        rstd = torch.empty(B * N, dtype=torch.float32, device=x.device)
    else:
        mean = rstd = y  # unused: STORE_STATS is False
    if B * N > 0:
        block = _block_c(C)
        _adaln_modulate_forward_kernel[(B * N,)](
            x, shift, scale, y, mean, rstd, N, C,
            x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), y.stride(0), y.stride(1), eps,
            STORE_STATS=need_stats, BLOCK_C=block, num_warps=min(16, max(1, block // 256)))
    return y, (mean if need_stats else None), (rstd if need_stats else None)


def backward(dy, x, scale, mean, rstd):
    """Returns (dx, dscale, dshift); dscale/dshift in float32."""
    B, N, C = x.shape
    dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    n_chunks = max(1, triton.cdiv(N, BACKWARD_ROWS_PER_PROGRAM))
    rows_per_chunk = triton.cdiv(N, n_chunks)
    dscale_part = torch.empty((B, n_chunks, C), dtype=torch.float32, device=x.device)
    dshift_part = torch.empty((B, n_chunks, C), dtype=torch.float32, device=x.device)
    if B * N > 0:
        block = _block_c(C)
        _adaln_modulate_backward_kernel[(n_chunks, B)](
            dy, x, scale, mean, rstd, dx, dscale_part, dshift_part, N, C, n_chunks, rows_per_chunk,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), scale.stride(0), dx.stride(0), dx.stride(1),
            BLOCK_C=block, num_warps=min(16, max(1, block // 256)))
    else:
        dscale_part.zero_()
        dshift_part.zero_()
    return dx, dscale_part.sum(dim=1), dshift_part.sum(dim=1)
