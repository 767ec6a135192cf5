"""adaln_modulate: LayerNorm without affine (float32 statistics), then
``x * (1 + scale[b]) + shift[b]``, the modulation of DiT's adaLN-Zero blocks.

Shapes: x (B, N, C) tokens; shift and scale (B, C), one vector per sample.
Output: (B, N, C) in x's dtype (float32, float16 or bfloat16).
Backends: reference (this file), native (csrc/cpu, csrc/cuda), triton (kernels/).
Tolerances against the reference: float32 1e-5 relative, 16-bit 2e-2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medgen_rt.ops import _native
from medgen_rt.ops.registry import Backend, register_op

EPS = 1e-6
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The definition of correct: plain PyTorch, statistics and arithmetic in float32."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return out.to(x.dtype)


def check_args(x, shift, scale, eps: float = EPS) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"adaln_modulate: x must be a (B, N, C) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    B, _, C = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, C):
            raise ValueError(f"adaln_modulate: {name} must have shape (B, C) = {(B, C)}, "
                             f"got {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"adaln_modulate: {name} is on {t.device} but x is on {x.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"adaln_modulate: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"adaln_modulate: x must be float32, float16 or bfloat16, got {x.dtype}")
    if C == 0:
        raise ValueError("adaln_modulate: x has zero channels")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"adaln_modulate: eps must be positive and finite, got {eps}")


def _prepare(x, shift, scale):
    """Fast kernels take a contiguous channel axis and shift/scale in x's dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    shift = shift.to(x.dtype)
    scale = scale.to(x.dtype)
    shift = shift if shift.stride(-1) == 1 else shift.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    return x, shift, scale


# ---- native backend (csrc/cpu, csrc/cuda) ------------------------------------------

def _native_backward_chunks(N: int, B: int, device: torch.device) -> int:
    """How many row chunks per sample the backward splits into (partials per chunk)."""
    if device.type == "cuda":
        return max(1, math.ceil(N / 64))
    threads = _native.native_module().build_info()["cpu_threads"]
    return max(1, min(N, math.ceil(4 * threads / max(B, 1))))


class _NativeAdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        C_ = _native.native_module()
        B, N, C = x.shape
        need_stats = any(ctx.needs_input_grad[:3])
        y = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
        mean = rstd = None
        if need_stats:
            mean = torch.empty(B * N, dtype=torch.float32, device=x.device)
            rstd = torch.empty(B * N, dtype=torch.float32, device=x.device)
        d = _native.describe
        C_.adaln_modulate_forward(d(x), d(shift), d(scale), d(y),
                                  None if mean is None else d(mean), None if rstd is None else d(rstd),
                                  float(eps), _native.stream_handle(x))
        if need_stats:
            ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        C_ = _native.native_module()
        x, scale, mean, rstd = ctx.saved_tensors
        B, N, C = x.shape
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
        chunks = _native_backward_chunks(N, B, x.device)
        dscale_part = torch.empty((B, chunks, C), dtype=torch.float32, device=x.device)
        dshift_part = torch.empty((B, chunks, C), dtype=torch.float32, device=x.device)
        d = _native.describe
        C_.adaln_modulate_backward(d(dy), d(x), d(scale), d(mean), d(rstd), d(dx), d(dscale_part), d(dshift_part),
                                   _native.stream_handle(x))
        return dx, dshift_part.sum(1).to(ctx.shift_dtype), dscale_part.sum(1).to(scale.dtype), None


def _native_supports(x, shift, scale, eps=EPS):
    if x.device.type == "cuda" and x.shape[-1] > 6144 and torch.is_grad_enabled() and (
            x.requires_grad or shift.requires_grad or scale.requires_grad):
        return "the CUDA backward supports at most 6144 channels"
    return None


def adaln_modulate_native(x, shift, scale, eps: float = EPS):
    x, shift, scale = _prepare(x, shift, scale)
    return _NativeAdaLNModulate.apply(x, shift, scale, eps)


# ---- triton backend (kernels/adaln_modulate.py) --------------------------------------

def _triton_unavailable(device_type: str):
    from medgen_rt.kernels import triton_unavailable_reason

    return triton_unavailable_reason(device_type)


def _triton_supports(x, shift, scale, eps=EPS):
    from medgen_rt.kernels.adaln_modulate import MAX_CHANNELS

    if x.shape[-1] > MAX_CHANNELS:
        return f"the Triton kernel holds a row in registers and takes at most {MAX_CHANNELS} channels"
    return None


def adaln_modulate_triton(x, shift, scale, eps: float = EPS):
    from medgen_rt.kernels.adaln_modulate import adaln_modulate

    x, shift, scale = _prepare(x, shift, scale)
    return adaln_modulate(x, shift, scale, eps)


adaln_modulate = register_op("adaln_modulate", adaln_modulate_reference, check_args=check_args)
adaln_modulate.register(Backend(
    name="native", fn=adaln_modulate_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_supports))
adaln_modulate.register(Backend(
    name="triton", fn=adaln_modulate_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=_triton_unavailable, supports=_triton_supports))
