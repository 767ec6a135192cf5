"""Triton flash-style attention forward, with optional qk-norm and RoPE applied
to q and k inside the kernel.

q, k, v are (B, H, N, d) with any strides; one program per (block of BLOCK_M
queries, b * H + h). It keeps its query block in registers and streams the
keys and values in blocks of BLOCK_N with an online softmax (running max and
sum in float32), so no N x N matrix is ever formed. Arithmetic: qk-norm and
RoPE in float32, both matmuls on q/k/v's dtype with float32 accumulation
(IEEE float32 for float32 inputs, never TF32).

The head dimension is handled as two halves [0, d//2) and [d//2, d): RoPE in
the rotate-half layout mixes exactly those halves, so keeping them apart needs
no register shuffles, and q.k = q1.k1 + q2.k2. Halves and V are padded to powers
of two (at least 16, the smallest tl.dot) and masked, so any d and any N work.

qk-norm and RoPE of q are applied once per program, on its query block. Those
of k would be redone by every query block (N / BLOCK_M times, in float32 on the
CUDA cores, with cos/sin tiles that triple the shared memory of the pipelined
key loop), so when there is more than one query block a small prepass kernel
transforms k once into a (B, H, N, d) buffer in k's dtype (rounded where the
in-loop path rounds: identical numbers) and the key loop stays plain.

Backward: the op's (medgen_rt/ops/attention.py) recomputes the forward with the
PyTorch reference (SDPA underneath) and differentiates that; nothing N x N is saved.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from medgen_rt.kernels import interpreter_enabled

MAX_HEAD_DIM = 256  # beyond this a query block no longer fits in registers
LOG2E = 1.4426950408889634


@triton.jit
def _layer_norm_halves(x1, x2, W, Bias, c1, c2, m1, m2, d, eps):
    """LayerNorm over the head dim of a (rows, 2 halves) tile, float32 statistics;
    c1/c2 are the halves' column indices (c2 already offset by d//2)."""
    mean = (tl.sum(x1, axis=1) + tl.sum(x2, axis=1)) / d
    x1 = tl.where(m1[None, :], x1 - mean[:, None], 0.0)
    x2 = tl.where(m2[None, :], x2 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / d + eps)
    w1 = tl.load(W + c1, mask=m1, other=0.0).to(tl.float32)
    w2 = tl.load(W + c2, mask=m2, other=0.0).to(tl.float32)
    b1 = tl.load(Bias + c1, mask=m1, other=0.0).to(tl.float32)
    b2 = tl.load(Bias + c2, mask=m2, other=0.0).to(tl.float32)
    return x1 * rstd[:, None] * w1[None, :] + b1[None, :], x2 * rstd[:, None] * w2[None, :] + b2[None, :]


@triton.jit
def _rope_halves(x1, x2, cos_ptrs, sin_ptrs, D1, stride_td, mask1, mask2):
    """Rotate-half RoPE: (x1, x2) -> (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2)."""
    cos1 = tl.load(cos_ptrs, mask=mask1, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptrs, mask=mask1, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptrs + D1 * stride_td, mask=mask2, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptrs + D1 * stride_td, mask=mask2, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _bf16_rne(x):
    """float32 -> float32 holding the nearest bfloat16 (ties to even). Interpreter only:
    its tl.dot multiplies bfloat16 bit patterns as integers and its float32 -> bfloat16
    cast truncates, so bfloat16 runs there as float32 rounded by hand; on a GPU the
    kernel uses real bfloat16 operands."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _k_transform_kernel(X, Y, COS, SIN, W, Bias, H, N, D1, D2, d, eps,
                        stride_xb, stride_xh, stride_xn, stride_xd, stride_tn, stride_td,
                        ROPE: tl.constexpr, NORM: tl.constexpr, EMULATE_BF16: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Y (B, H, N, d) contiguous = RoPE(LayerNorm(X)), float32 math, stored in Y's dtype."""
    bh = tl.program_id(1).to(tl.int64)
    X += (bh // H) * stride_xb + (bh % H) * stride_xh
    Y += bh * N * d
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    c1 = tl.arange(0, BLOCK_H)
    c2 = D1 + c1
    m1 = rmask[:, None] & (c1 < D1)[None, :]
    m2 = rmask[:, None] & (c1 < D2)[None, :]
    x_row = X + rows[:, None] * stride_xn
    x1 = tl.load(x_row + c1[None, :] * stride_xd, mask=m1, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + c2[None, :] * stride_xd, mask=m2, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _layer_norm_halves(x1, x2, W, Bias, c1, c2, c1 < D1, c1 < D2, d, eps)
    if ROPE:
        t_row = rows[:, None] * stride_tn + c1[None, :] * stride_td
        x1, x2 = _rope_halves(x1, x2, COS + t_row, SIN + t_row, D1, stride_td, m1, m2)
    if EMULATE_BF16:  # the store's cast truncates in the interpreter
        x1 = _bf16_rne(x1)
        x2 = _bf16_rne(x2)
    y_row = Y + rows[:, None] * d
    tl.store(y_row + c1[None, :], x1.to(Y.dtype.element_ty), mask=m1)
    tl.store(y_row + c2[None, :], x2.to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _attention_forward_kernel(
        Q, K, V, O, COS, SIN, QW, QB, KW, KB,
        H, N, D1, D2, d, qk_scale, q_eps, k_eps,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_tn, stride_td,
        Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    c1 = tl.arange(0, BLOCK_H)  # columns of each half, second half offset by D1
    c2 = D1 + c1
    m1 = c1 < D1
    m2 = c1 < D2
    cd = tl.arange(0, BLOCK_D)  # all d columns, for V and O
    md = cd < d

    # ---- the query block: load, qk-norm, RoPE (the softmax scale goes on the scores, in float32)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows64 = rows.to(tl.int64)  # row * stride can pass 2**31 for long packed-qkv sequences
    q_row = Q + rows64[:, None] * stride_qn
    qm1 = rmask[:, None] & m1[None, :]
    qm2 = rmask[:, None] & m2[None, :]
    q1 = tl.load(q_row + c1[None, :] * stride_qd, mask=qm1, other=0.0).to(tl.float32)
    q2 = tl.load(q_row + c2[None, :] * stride_qd, mask=qm2, other=0.0).to(tl.float32)
    if Q_NORM:
        q1, q2 = _layer_norm_halves(q1, q2, QW, QB, c1, c2, m1, m2, d, q_eps)
    if Q_ROPE:
        t_row = rows64[:, None] * stride_tn + c1[None, :] * stride_td
        q1, q2 = _rope_halves(q1, q2, COS + t_row, SIN + t_row, D1, stride_td, qm1, qm2)
    # Matmul inputs in the tensors' dtype, as the reference casts after RoPE.
    if EMULATE_BF16:
        q1 = _bf16_rne(q1)
        q2 = _bf16_rne(q2)
    else:
        q1 = q1.to(Q.dtype.element_ty)
        q2 = q2.to(Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key/value pointers advance by whole blocks (64-bit pointer arithmetic, no overflow).
    offs_n = tl.arange(0, BLOCK_N)
    k_rows = K + offs_n.to(tl.int64)[:, None] * stride_kn
    k1_ptrs = k_rows + c1[None, :] * stride_kd
    k2_ptrs = k_rows + c2[None, :] * stride_kd
    v_ptrs = V + offs_n.to(tl.int64)[:, None] * stride_vn + cd[None, :] * stride_vd
    t_ptrs = offs_n.to(tl.int64)[:, None] * stride_tn + c1[None, :] * stride_td
    for start_n in range(0, N, BLOCK_N):
        kmask = (start_n + offs_n) < N
        km1 = kmask[:, None] & m1[None, :]
        km2 = kmask[:, None] & m2[None, :]
        k1 = tl.load(k1_ptrs, mask=km1, other=0.0)
        k2 = tl.load(k2_ptrs, mask=km2, other=0.0)
        if K_NORM or K_ROPE:  # K transformed in the loop: only when there is one query block
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
            if K_NORM:
                k1, k2 = _layer_norm_halves(k1, k2, KW, KB, c1, c2, m1, m2, d, k_eps)
            if K_ROPE:
                k1, k2 = _rope_halves(k1, k2, COS + t_ptrs, SIN + t_ptrs, D1, stride_td, km1, km2)
            if EMULATE_BF16:
                k1 = _bf16_rne(k1)
                k2 = _bf16_rne(k2)
            else:
                k1 = k1.to(K.dtype.element_ty)
                k2 = k2.to(K.dtype.element_ty)
        elif EMULATE_BF16:
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
        s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
        s = tl.dot(q2, tl.trans(k2), s, input_precision="ieee")
        s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))  # scores in log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=kmask[:, None] & md[None, :], other=0.0)
        if EMULATE_BF16:
            v = v.to(tl.float32)
            p = _bf16_rne(p)
        else:
            p = p.to(V.dtype.element_ty)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
        k1_ptrs += BLOCK_N * stride_kn
        k2_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        t_ptrs += BLOCK_N * stride_tn

    out = acc / l_i[:, None]
    if EMULATE_BF16:
        out = _bf16_rne(out)  # the store's cast is then exact
    o_ptrs = O + rows64[:, None] * stride_on + cd[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None] & md[None, :])


def _configs_cuda():
    """Candidate tilings for the autotuner (per N, head dim, dtype, features). Chosen from
    sm_90 compiles of this kernel: 128-query tiles need 8 warps (4 spill registers)."""
    out = []
    for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                                  (64, 64, 8, 2), (64, 32, 4, 2)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    """Drop tiles that cannot fit: wide heads and float32 need smaller blocks."""
    d_block = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    wide = d_block > 128 or named_args["Q"].dtype == torch.float32
    return [c for c in configs if not (wide and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]


_autotuned_kernel = triton.autotune(
    configs=_configs_cuda(), key=["N", "d", "Q_ROPE", "K_ROPE", "Q_NORM", "K_NORM"],
    prune_configs_by={"early_config_prune": _prune})(_attention_forward_kernel)


def _half_block(d: int) -> int:
    return max(16, triton.next_power_of_2(max(1, (d + 1) // 2)))


def forward(q, k, v, rope=None, q_norm=None, k_norm=None, k_prepass=None) -> torch.Tensor:
    """Launches the kernel(s); returns (B, H, N, d) in q's dtype.

    k_prepass: transform k (norm, RoPE) in a separate pass rather than in the key
    loop; None picks it whenever there can be more than one query block.
    The output is laid out as (B, N, H, d) in memory and returned as a
    transposed view, so the caller's usual ``out.transpose(1, 2).reshape(B, N, H*d)``
    needs no copy.
    """
    B, H, N, d = q.shape
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * H * N * d == 0:
        return out
    D1 = d // 2
    interpret = interpreter_enabled()
    emulate_bf16 = interpret and q.dtype == torch.bfloat16
    dummy = out  # stands in for unused pointers (the constexpr flags keep them unread)
    if rope is not None:
        cos, sin = rope
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        stride_tn, stride_td = cos.stride()
    else:
        cos = sin = dummy
        stride_tn = stride_td = 0

    def norm_args(norm):
        if norm is None:
            return dummy, dummy, 1.0
        w, bias, eps = norm
        w = torch.ones(d, device=q.device, dtype=torch.float32) if w is None else w.contiguous()
        bias = torch.zeros(d, device=q.device, dtype=torch.float32) if bias is None else bias.contiguous()
        return w, bias, float(eps)

    qw, qb, q_eps = norm_args(q_norm)
    kw, kb, k_eps = norm_args(k_norm)
    block_h = _half_block(d)
    k_transformed = rope is not None or k_norm is not None
    if k_prepass is None:
        # One query block (N <= 64 fits any tile) transforms k only once anyway.
        k_prepass = N > (16 if interpret else 64)
    if k_transformed and k_prepass:
        k_new = torch.empty((B, H, N, d), dtype=k.dtype, device=k.device)
        block_n = 32 if interpret else 64
        _k_transform_kernel[(triton.cdiv(N, block_n), B * H)](
            k, k_new, cos, sin, kw, kb, H, N, D1, d - D1, d, k_eps, *k.stride(), stride_tn, stride_td,
            ROPE=rope is not None, NORM=k_norm is not None, EMULATE_BF16=emulate_bf16,
            BLOCK_N=block_n, BLOCK_H=block_h)
        k, k_in_loop = k_new, False
    else:
        k_in_loop = k_transformed
    qk_scale = LOG2E / math.sqrt(d)  # softmax scale 1/sqrt(d), and exp -> exp2
    args = (q, k, v, out, cos, sin, qw, qb, kw, kb, H, N, D1, d - D1, d, qk_scale, q_eps, k_eps,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_tn, stride_td)
    flags = dict(Q_ROPE=rope is not None, K_ROPE=k_in_loop and rope is not None, Q_NORM=q_norm is not None,
                 K_NORM=k_in_loop and k_norm is not None, EMULATE_BF16=emulate_bf16,
                 BLOCK_H=block_h, BLOCK_D=max(16, triton.next_power_of_2(d)))
    if interpret:
        # The interpreter runs programs one by one in numpy, so its cost is per block: no tuning,
        # blocks small enough that the tests' short sequences still span several of them.
        block = 16 if N <= 64 else 32 if N <= 512 else 64
        _attention_forward_kernel[(triton.cdiv(N, block), B * H)](*args, **flags, BLOCK_M=block, BLOCK_N=block)
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        _autotuned_kernel[grid](*args, **flags)
    return out
