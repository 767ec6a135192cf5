"""Triton linear_gated_residual: out = x + gate[b] * (h @ weight.T + bias).

The attention out-projection and the MLP fc2 of a DiT block, fused with the
adaLN-Zero residual: a tiled GEMM whose epilogue adds the bias, multiplies by the
sample's gate and adds the residual, so the projection output never reaches
memory. h is (B, N, K), weight (C, K), bias (C,) or None, x (B, N, C) and gate
(B, C); h, weight, bias, x and gate share one dtype, x and gate have a contiguous
channel axis, h and weight any strides. Products accumulate in float32; float32
inputs multiply in IEEE float32 unless torch allows TF32 for matmuls.

Backward, the op's (medgen_rt/ops/linear_gated_residual.py): PyTorch matmuls,
no copy of the projection output kept:
    g = gate * dout;  dh = g @ weight;  dbias = sum g;  dx = dout
    dgate[b, c] = sum_n dout * y = sum_k G_b[c, k] weight[c, k] + bias[c] sum_n dout,
    with G_b = dout_b^T h_b, and dweight = sum_b gate_b * G_b.
G costs the FLOPs of the usual dweight GEMM and B*C*K memory, no more than the
B*N*C of y when K <= N; otherwise y is recomputed for dgate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from medgen_rt.kernels import interpreter_enabled

GROUP_M = 8


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies float32: TF32 only where torch would use it for a matmul."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits: upcast there."""
    return dtype == torch.bfloat16 and interpreter_enabled()


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options (tl.dot needs every tile side >= 16)."""
    block_m = min(128, max(16, triton.next_power_of_2(M)))
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    block_k = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(K)))
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
                num_warps=num_warps, num_stages=3)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so they reuse weight tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    return pid_m, pid_n


@triton.jit
def _linear_gated_residual_kernel(
        H, W, BIAS, GATE, X, OUT, M, C, K, TOKENS,
        stride_hb, stride_hn, stride_hk, stride_wc, stride_wk, stride_gb,
        stride_xb, stride_xn, stride_ob, stride_on,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, C, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token index over (b, n)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    rmask = rows < M
    cmask = cols < C
    rows64 = rows.to(tl.int64)
    b = rows64 // TOKENS
    n = rows64 % TOKENS
    h_rows = H + b * stride_hb + n * stride_hn
    w_cols = W + cols.to(tl.int64) * stride_wc
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(h_rows[:, None] + kk[None, :] * stride_hk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + kk[:, None] * stride_wk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # Epilogue: bias, gate and residual while the tile is still in registers.
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mask = rmask[:, None] & cmask[None, :]
    gate = tl.load(GATE + b[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + b[:, None] * stride_xb + n[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
    out = x.to(tl.float32) + gate * acc
    tl.store(OUT + b[:, None] * stride_ob + n[:, None] * stride_on + cols[None, :],
             out.to(OUT.dtype.element_ty), mask=mask)


def forward(x, gate, h, weight, bias) -> torch.Tensor:
    B, N, C = x.shape
    K = h.shape[-1]
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    M = B * N
    if out.numel() == 0:
        return out
    cfg = gemm_config(M, C, K, h.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_N"]),)
    _linear_gated_residual_kernel[grid](
        h, weight, bias if bias is not None else gate, gate, x, out, M, C, K, N,
        h.stride(0), h.stride(1), h.stride(2), weight.stride(0), weight.stride(1), gate.stride(0),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(h.dtype), PRECISION=dot_precision(h.dtype), **cfg)
    return out
