"""Triton gated_residual: out = x + gate[b] * y, with its backward.

x and y are (B, N, C) and gate is (B, C), all in one dtype (the op casts gate
and y to x's dtype, as the reference does) and with a contiguous channel axis.
Arithmetic in float32, output in x's dtype.

Forward: one program per (block of rows, block of channels, sample).
Backward: dx is dout itself; one program per (chunk of rows, block of channels,
sample) writes dy = gate * dout and a float32 partial sum of dout * y over its
rows, which the wrapper adds up into dgate (a tiny reduction).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_C_MAX = 128
ELEMENTS_PER_PROGRAM = 2048
BACKWARD_ROWS_PER_CHUNK = 256


@triton.jit
def _gated_residual_forward_kernel(X, GATE, Y, OUT, N, C,
                                   stride_xb, stride_xn, stride_gb, stride_yb, stride_yn, stride_ob, stride_on,
                                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cmask = cols < C
    mask = (rows < N)[:, None] & cmask[None, :]
    rows = rows.to(tl.int64)[:, None]
    gate = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(X + b * stride_xb + rows * stride_xn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + rows * stride_yn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(OUT + b * stride_ob + rows * stride_on + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_backward_kernel(DOUT, GATE, Y, DY, DGATE_PART, N, C, n_chunks, rows_per_chunk,
                                    stride_db, stride_dn, stride_gb, stride_yb, stride_yn, stride_dyb, stride_dyn,
                                    NEED_DY: tl.constexpr, NEED_DGATE: tl.constexpr,
                                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    cmask = cols < C
    if NEED_DY:
        gate = tl.load(GATE + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    # rows_per_chunk is a multiple of BLOCK_N, so blocks never straddle two chunks.
    for i in range(0, rows_per_chunk, BLOCK_N):
        rows = chunk * rows_per_chunk + i + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        rows = rows[:, None]
        dout = tl.load(DOUT + b * stride_db + rows * stride_dn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DY:
            dy = gate[None, :] * dout
            tl.store(DY + b * stride_dyb + rows * stride_dyn + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            y = tl.load(Y + b * stride_yb + rows * stride_yn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += dout * y
    if NEED_DGATE:
        tl.store(DGATE_PART + (b * n_chunks + chunk) * C + cols, tl.sum(acc, axis=0), mask=cmask)


def _blocks(N: int, C: int) -> tuple:
    block_c = min(BLOCK_C_MAX, triton.next_power_of_2(max(C, 1)))
    block_n = min(triton.next_power_of_2(max(N, 1)), max(1, ELEMENTS_PER_PROGRAM // block_c))
    return block_n, block_c


def forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_n, block_c = _blocks(N, C)
    grid = (triton.cdiv(N, block_n), triton.cdiv(C, block_c), B)
    _gated_residual_forward_kernel[grid](x, gate, y, out, N, C,
                                         x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
                                         out.stride(0), out.stride(1), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)
    return out


def backward(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, need_dy: bool, need_dgate: bool) -> tuple:
    """Returns (dy or None, dgate in float32 or None)."""
    B, N, C = dout.shape
    block_n, block_c = _blocks(N, C)
    rows_per_chunk = triton.cdiv(min(max(N, 1), BACKWARD_ROWS_PER_CHUNK), block_n) * block_n
    n_chunks = triton.cdiv(max(N, 1), rows_per_chunk)
    dy = torch.empty((B, N, C), dtype=dout.dtype, device=dout.device) if need_dy else None
    # zeros: with N == 0 no program runs and dgate must come out 0
    dgate_part = torch.zeros((B, n_chunks, C), dtype=torch.float32, device=dout.device) if need_dgate else None
    if dout.numel() > 0 and (need_dy or need_dgate):
        # Unused pointers still need a tensor argument; dout stands in for them.
        dy_arg = dy if need_dy else dout
        part_arg = dgate_part if need_dgate else dout
        _gated_residual_backward_kernel[(n_chunks, triton.cdiv(C, block_c), B)](
            dout, gate, y, dy_arg, part_arg, N, C, n_chunks, rows_per_chunk,
            dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
            dy_arg.stride(0), dy_arg.stride(1),
            NEED_DY=need_dy, NEED_DGATE=need_dgate, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4)
    return dy, (dgate_part.sum(dim=1) if need_dgate else None)
