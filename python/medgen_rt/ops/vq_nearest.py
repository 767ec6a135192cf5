"""vq_nearest: for every row of ``z`` the nearest codebook entry by squared L2
distance, and that entry.

Shapes: z (N, D) latent vectors (float32, float16 or bfloat16, any strides);
codebook (K, D) in any of the same dtypes, on z's device.
Output: (indices, quantized): indices (N,) int64 in [0, K); quantized (N, D) in
z's dtype, ``codebook[indices]``.

Distances are computed in float32 as ``|c_k|^2 - 2 z.c_k`` (the ``|z|^2`` term
is the same for every k and does not change the argmin). Ties resolve to the
lowest index, as ``torch.argmin`` does. The N x K distance matrix is never
built: rows of z are processed in chunks so that one chunk x K block holds at
most ``chunk_elements`` float32 values (default 2**24, 64 MiB); when K alone
exceeds the budget the codebook is tiled too and a running minimum is kept.

The op has no gradient: the codebook of the VQ-GAN is learned by EMA and the
encoder gets its gradient through the straight-through estimator in
:class:`medgen_rt.models.vqgan.EMACodebook`. Outputs are detached.

Backends: reference (this file), native (csrc/cpu, csrc/cuda), triton (kernels/); they
must return identical indices (the harness compares integer outputs exactly). The
native kernels accumulate z.c in the order d = 0..D-1 with fused multiply-adds, which
is what MKL's sgemm does for the reference's blocks, so their distances are the
reference's bit for bit on such CPUs; rows whose distances overflow float32 may differ.

torch op: ``medgen::vq_nearest(z, codebook, backend) -> (indices, quantized)``, without
autograd (inputs detached).
"""
from __future__ import annotations

import torch

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import Backend, register_op

DEFAULT_CHUNK_ELEMENTS = 1 << 24
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(z, codebook, chunk_elements=None) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"vq_nearest: z must be an (N, D) tensor, got shape {tuple(getattr(z, 'shape', ()))}")
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2:
        raise ValueError(f"vq_nearest: codebook must be a (K, D) tensor, got shape "
                         f"{tuple(getattr(codebook, 'shape', ()))}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"vq_nearest: z must be float32, float16 or bfloat16, got {z.dtype}")
    if codebook.dtype not in FLOAT_DTYPES:
        raise TypeError(f"vq_nearest: codebook must be float32, float16 or bfloat16, got {codebook.dtype}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_nearest: z has D={z.shape[1]} but the codebook has D={codebook.shape[1]} "
                         f"(z {tuple(z.shape)}, codebook {tuple(codebook.shape)})")
    if codebook.shape[0] == 0:
        raise ValueError("vq_nearest: the codebook is empty (K = 0)")
    if z.shape[1] == 0:
        raise ValueError("vq_nearest: vectors have zero dimensions (D = 0)")
    if codebook.device != z.device:
        raise ValueError(f"vq_nearest: codebook is on {codebook.device} but z is on {z.device}")
    if chunk_elements is not None:
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"vq_nearest: chunk_elements must be a positive int, got {chunk_elements!r}")


@torch.no_grad()
def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor, chunk_elements=None):
    """The definition of correct: plain PyTorch, float32 distances, chunked."""
    budget = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    N = z.shape[0]
    K = codebook.shape[0]
    cb = codebook.detach().float()
    cb_sq = (cb * cb).sum(dim=1)  # (K,)
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    # Codebook tiles: the whole codebook unless K alone exceeds the budget.
    k_tile = min(K, budget)
    rows = max(1, budget // k_tile)
    for r0 in range(0, N, rows):
        zc = z[r0:r0 + rows].detach().float()
        best_val = best_idx = None
        for k0 in range(0, K, k_tile):
            # (rows, k_tile) block: |c|^2 - 2 z.c
            dist = torch.addmm(cb_sq[k0:k0 + k_tile], zc, cb[k0:k0 + k_tile].t(), beta=1.0, alpha=-2.0)
            val, idx = dist.min(dim=1)
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val < best_val  # strict: ties keep the lower index
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx + k0, best_idx)
        indices[r0:r0 + rows] = best_idx
    quantized = codebook.detach()[indices].to(z.dtype)
    return indices, quantized


def _op_args(z, codebook, chunk_elements=None) -> tuple:
    # chunk_elements bounds the reference's distance blocks; the kernels keep one
    # distance per (row, codebook lane) alive, so there is nothing to bound.
    return z.detach(), codebook.detach()


def _fake(z, codebook, backend):
    return z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape)


# ---- native backend (csrc/cpu/vq_nearest.cpp, csrc/cuda/vq_nearest.cu) -------------------

_NATIVE_CUDA_MAX_D = 256  # csrc/cuda/vq_nearest.cu keeps a row of z in a per-thread array


def _native_supports(z, codebook, chunk_elements=None):
    if z.device.type == "cuda" and z.shape[1] > _NATIVE_CUDA_MAX_D:
        return f"the CUDA kernel takes vectors of at most {_NATIVE_CUDA_MAX_D} dimensions"
    if codebook.shape[0] >= 2**31 - 8:
        return "the native kernels index the codebook with 32-bit integers"
    return None


def vq_nearest_native(z, codebook):
    cb = codebook.float()
    # |c|^2 by the reference's own expression, so the distances agree bit for bit.
    cb_sq = (cb * cb).sum(dim=1).contiguous()
    cb_t = cb.t().contiguous()  # (D, K): consecutive codebook entries of one dimension are adjacent
    indices = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    d = _native.describe
    _native.native_module().vq_nearest(d(z), d(cb_t), d(cb_sq), d(indices), _native.stream_handle(z))
    return indices, codebook[indices].to(z.dtype)


# ---- triton backend (kernels/vq_nearest.py) ------------------------------------------

def vq_nearest_triton(z, codebook):
    from medgen_rt.kernels.vq_nearest import vq_nearest as kernel

    # The kernel keeps its tiles in registers: no chunking to bound.
    return kernel(z, codebook)


# ---- registration ---------------------------------------------------------------------

vq_nearest = register_op("vq_nearest", vq_nearest_reference, check_args=check_args, differentiable=False)
vq_nearest.register(Backend(
    name="native", fn=vq_nearest_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_supports))
vq_nearest.register(Backend(
    name="triton", fn=vq_nearest_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2, is_available=triton_unavailable_reason))
vq_nearest.define_torch_op("(Tensor z, Tensor codebook, str backend) -> (Tensor, Tensor)", _op_args, fake=_fake)
