"""Triton vq_nearest: index of the nearest codebook entry for every row of z.

Distances in float32 as the reference computes them, ``|c_k|^2 - 2 z.c_k``
(|c|^2 comes from the same torch expression as in the reference), ties to the
lowest index. Each program takes BLOCK_N rows of z and walks its share of the
codebook in BLOCK_K tiles with a running minimum; the N x K distances exist only
one (BLOCK_N, BLOCK_K) tile at a time, in registers. When there are few row
blocks (small N, large K) the codebook is split across programs so the GPU
fills up; each split writes its (minimum, index) and the wrapper keeps the
smallest, earlier splits winning ties, which keeps the lowest index.

z (N, D) may have any strides and dtype; the codebook is passed transposed,
(D, K) float32, so each step of the loop over D reads one contiguous row of it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 64
CPU_TARGET_PROGRAMS = 4  # the interpreter: few programs, but enough to exercise the split path


@triton.jit
def _vq_nearest_kernel(Z, CBT, CB_SQ, BEST_VAL, BEST_IDX, N, K, D, k_per_split,
                       stride_zn, stride_zd, stride_cd,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rmask = rows < N
    z_rows = Z + rows.to(tl.int64) * stride_zn
    k_begin = split * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    best_val = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_end
        dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # D is small (8 for the VQ-GAN codebooks): outer products, one dimension at a time.
        for d in range(0, D):
            zd = tl.load(z_rows + d * stride_zd, mask=rmask, other=0.0).to(tl.float32)
            cd = tl.load(CBT + d * stride_cd + ks, mask=kmask, other=0.0)
            # An explicit fma, whatever Triton's fp-fusion default: the d = 0..D-1 chain of fused
            # multiply-adds that the reference's sgemm computes (and the interpreter emulates).
            dot = tl.fma(zd[:, None], cd[None, :], dot)
        c_sq = tl.load(CB_SQ + ks, mask=kmask, other=0.0)
        dist = tl.where(kmask[None, :], c_sq[None, :] - 2.0 * dot, float("inf"))
        tile_val, tile_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_val < best_val  # strict: an equal distance in a later tile keeps the lower index
        best_val = tl.where(better, tile_val, best_val)
        best_idx = tl.where(better, tile_idx + k0, best_idx)
    out = split.to(tl.int64) * N + rows
    tl.store(BEST_VAL + out, best_val, mask=rmask)
    tl.store(BEST_IDX + out, best_idx, mask=rmask)


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_TARGET_PROGRAMS


def _splits(N: int, K: int, device: torch.device) -> int:
    row_blocks = max(1, triton.cdiv(N, BLOCK_N))
    target = _target_programs(device)
    return max(1, min(triton.cdiv(K, BLOCK_K), triton.cdiv(target, row_blocks)))


@torch.no_grad()
def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> tuple:
    """Returns (indices int64 (N,), quantized (N, D) in z's dtype), as the reference."""
    N, D = z.shape
    K = codebook.shape[0]
    cb = codebook.detach().float()
    cb_sq = (cb * cb).sum(dim=1)  # the reference's expression, so |c|^2 matches it bit for bit
    cbt = cb.t().contiguous()
    splits = _splits(N, K, z.device)
    # Whole BLOCK_K tiles per split, so only the last tile of the codebook is ragged.
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, k_per_split)
    best_val = torch.empty((splits, N), dtype=torch.float32, device=z.device)
    best_idx = torch.empty((splits, N), dtype=torch.int32, device=z.device)
    if N > 0:
        _vq_nearest_kernel[(triton.cdiv(N, BLOCK_N), splits)](
            z, cbt, cb_sq, best_val, best_idx, N, K, D, k_per_split,
            z.stride(0), z.stride(1), cbt.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    if splits == 1:
        indices = best_idx[0].long()
    else:
        # argmin returns the first of equal minima: the earliest split, i.e. the lowest index.
        winner = best_val.argmin(dim=0, keepdim=True)
        indices = best_idx.gather(0, winner)[0].long()
    return indices, codebook.detach()[indices].to(z.dtype)
