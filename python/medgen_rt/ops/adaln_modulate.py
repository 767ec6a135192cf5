"""adaln_modulate: LayerNorm without affine (float32 statistics), then
``x * (1 + scale[b]) + shift[b]``, the modulation of DiT's adaLN-Zero blocks.

Shapes: x (B, N, C) tokens; shift and scale (B, C), one vector per sample.
Output: (B, N, C) in x's dtype (float32, float16 or bfloat16).
Backends: reference (this file), native (csrc/cpu, csrc/cuda), triton (kernels/).
Tolerances against the reference: float32 1e-5 relative, 16-bit 2e-2.

torch ops: ``medgen::adaln_modulate(x, shift, scale, eps, backend)`` and its backward
``medgen::adaln_modulate_backward(dy, x, scale, eps, backend) -> (dx, dshift, dscale)``,
which runs the fused backward kernel of the same backend (statistics recomputed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import REFERENCE, Backend, register_op

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


def _op_args(x, shift, scale, eps: float = EPS) -> tuple:
    """The kernels take a contiguous channel axis and shift/scale in x's dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    shift = shift.to(x.dtype)
    scale = scale.to(x.dtype)
    shift = shift if shift.stride(-1) == 1 else shift.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    return x, shift, scale, float(eps)


def _row_stats(x: torch.Tensor, eps: float) -> tuple:
    """(mean, rstd) per row in float32, flat (B*N,): what the backward kernels take."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0)
    return mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)


def _backward_reference(dy, x, scale, eps):
    """LayerNorm + modulation backward in float32 PyTorch (the reference's own gradient)."""
    xf, g = x.float(), dy.float()
    var, mean = torch.var_mean(xf, dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    dscale = (g * xhat).sum(dim=1)
    dshift = g.sum(dim=1)
    g = g * (1.0 + scale.float()[:, None, :])
    dx = rstd * (g - g.mean(dim=-1, keepdim=True) - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype).contiguous(), dshift.to(scale.dtype), dscale.to(scale.dtype)


# ---- native backend (csrc/cpu, csrc/cuda) ------------------------------------------

def _native_backward_chunks(N: int, B: int, device: torch.device) -> int:
    """How many row chunks per sample the backward splits into (partials per chunk)."""
    if device.type == "cuda":
        return max(1, math.ceil(N / 64))
    return max(1, min(N, math.ceil(4 * _native.num_threads() / max(B, 1))))


def adaln_modulate_native(x, shift, scale, eps):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    d = _native.describe
    _native.native_module().adaln_modulate_forward(d(x), d(shift), d(scale), d(y), None, None, eps,
                                                   _native.stream_handle(x))
    return y


def _backward_native(dy, x, scale, eps):
    B, N, C = x.shape
    mean, rstd = _row_stats(x, eps)
    dx = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    chunks = _native_backward_chunks(N, B, x.device)
    dscale_part = torch.empty((B, chunks, C), dtype=torch.float32, device=x.device)
    dshift_part = torch.empty((B, chunks, C), dtype=torch.float32, device=x.device)
    d = _native.describe
    _native.native_module().adaln_modulate_backward(d(dy), d(x), d(scale), d(mean), d(rstd), d(dx),
                                                    d(dscale_part), d(dshift_part), _native.stream_handle(x))
    return dx, dshift_part.sum(1).to(scale.dtype), dscale_part.sum(1).to(scale.dtype)


def _native_supports(x, shift, scale, eps=EPS):
    if x.device.type == "cuda" and x.shape[-1] > 6144 and torch.is_grad_enabled() and (
            x.requires_grad or shift.requires_grad or scale.requires_grad):
        return "the CUDA backward supports at most 6144 channels"
    return None


# ---- triton backend (kernels/adaln_modulate.py) --------------------------------------

def _triton_supports(x, shift, scale, eps=EPS):
    from medgen_rt.kernels.adaln_modulate import MAX_CHANNELS

    if x.shape[-1] > MAX_CHANNELS:
        return f"the Triton kernel holds a row in registers and takes at most {MAX_CHANNELS} channels"
    return None


def adaln_modulate_triton(x, shift, scale, eps):
    from medgen_rt.kernels.adaln_modulate import forward

    return forward(x, shift, scale, eps, need_stats=False)[0]


def _backward_triton(dy, x, scale, eps):
    from medgen_rt.kernels.adaln_modulate import backward

    mean, rstd = _row_stats(x, eps)
    dx, dscale, dshift = backward(dy, x, scale, mean, rstd)
    return dx, dshift.to(scale.dtype), dscale.to(scale.dtype)


# ---- registration ---------------------------------------------------------------------

adaln_modulate = register_op("adaln_modulate", adaln_modulate_reference, check_args=check_args)
adaln_modulate.register(Backend(
    name="native", fn=adaln_modulate_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_supports))
adaln_modulate.register(Backend(
    name="triton", fn=adaln_modulate_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=triton_unavailable_reason, supports=_triton_supports))

_BACKWARDS = {REFERENCE: _backward_reference, "native": _backward_native, "triton": _backward_triton}


@torch.library.custom_op("medgen::adaln_modulate_backward", mutates_args=())
def adaln_modulate_backward(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dshift, dscale) of the forward that ran with ``backend``, by its backward kernel."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return _BACKWARDS[backend](dy, x, scale, eps)


@adaln_modulate_backward.register_fake
def _(dy, x, scale, eps, backend):
    B, N, C = x.shape
    return x.new_empty((B, N, C)), scale.new_empty((B, C)), scale.new_empty((B, C))


def _setup_context(ctx, inputs, output):
    x, _, scale, eps, backend = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = torch.ops.medgen.adaln_modulate_backward(dy, x, scale, ctx.eps, ctx.backend)
    return dx, dshift, dscale, None, None


adaln_modulate.define_torch_op(
    "(Tensor x, Tensor shift, Tensor scale, float eps, str backend) -> Tensor", _op_args,
    fake=lambda x, shift, scale, eps, backend: x.new_empty(x.shape),
    setup_context=_setup_context, backward=_backward,
    reference_kernel=lambda x, shift, scale, eps: adaln_modulate_reference(x, shift, scale, eps).contiguous())
