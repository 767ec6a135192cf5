"""gated_residual: ``x + gate[b] * y``, the adaLN-Zero residual of DiT blocks.

x, y (B, N, C); gate (B, C) per sample. Output in x's dtype.
Backends: reference (this file), native (csrc/cpu, csrc/cuda; forward and backward), triton (kernels/).

torch ops: ``medgen::gated_residual(x, gate, y, backend)`` and its backward
``medgen::gated_residual_backward(dout, gate, y, backend) -> (dgate, dy)`` (dx is dout).
"""
from __future__ import annotations

import math

import torch

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import REFERENCE, Backend, register_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate.unsqueeze(1).to(x.dtype) * y.to(x.dtype)


def check_gated_residual(x, gate, y):
    if x.dim() != 3 or tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"gated_residual: x and y must both be (B, N, C); got {tuple(x.shape)} and {tuple(y.shape)}")
    if tuple(gate.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"gated_residual: gate must be (B, C) = {(x.shape[0], x.shape[2])}, got {tuple(gate.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit-stride channel axis (also when C == 1, where
    ``contiguous()`` may keep an odd stride)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _op_args(x, gate, y) -> tuple:
    # The reference computes in x's dtype; the casts stay outside the op so autograd converts the grads.
    return _rows(x), _rows(gate.to(x.dtype)), _rows(y.to(x.dtype))


def _supports(x, gate, y):
    if any(t.dtype not in FLOAT_DTYPES for t in (x, gate, y)):
        return "the kernels take float32, float16 or bfloat16 tensors"
    if gate.device != x.device or y.device != x.device:
        return "x, gate and y must be on one device"
    return None


def _backward_reference(dout, gate, y):
    dgate = (dout.float() * y.float()).sum(dim=1).to(gate.dtype)
    return dgate, (gate.unsqueeze(1) * dout).contiguous()


# ---- native backend (csrc/cpu/gated_residual.cpp, csrc/cuda/gated_residual.cu) ----------

def _native_gate_chunks(N: int, B: int, device: torch.device) -> int:
    """Row chunks per sample of the backward; each writes one partial dgate row."""
    if device.type == "cuda":
        return max(1, math.ceil(N / 64))
    # A few jobs per thread, so B not divisible by the thread count still splits evenly.
    return max(1, min(N, math.ceil(4 * _native.num_threads() / max(B, 1))))


def gated_residual_native(x, gate, y):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    d = _native.describe
    _native.native_module().gated_residual_forward(d(x), d(gate), d(y), d(out), _native.stream_handle(x))
    return out


def _backward_native(dout, gate, y):
    B, N, C = dout.shape
    dy = torch.empty((B, N, C), dtype=dout.dtype, device=dout.device)
    part = torch.empty((B, _native_gate_chunks(N, B, dout.device), C), dtype=torch.float32, device=dout.device)
    d = _native.describe
    _native.native_module().gated_residual_backward(d(dout), d(gate), d(y), d(dy), d(part),
                                                    _native.stream_handle(dout))
    return part.sum(1).to(gate.dtype), dy


# ---- triton backend (kernels/gated_residual.py) --------------------------------------

def gated_residual_triton(x, gate, y):
    from medgen_rt.kernels.gated_residual import forward

    return forward(x, gate, y)


def _backward_triton(dout, gate, y):
    from medgen_rt.kernels.gated_residual import backward

    dy, dgate = backward(dout, gate, y, need_dy=True, need_dgate=True)
    return dgate.to(gate.dtype), dy


# ---- registration ---------------------------------------------------------------------

gated_residual = register_op("gated_residual", gated_residual_reference, check_args=check_gated_residual)
gated_residual.register(Backend(
    name="native", fn=gated_residual_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_supports))
gated_residual.register(Backend(
    name="triton", fn=gated_residual_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=triton_unavailable_reason, supports=_supports))

_BACKWARDS = {REFERENCE: _backward_reference, "native": _backward_native, "triton": _backward_triton}


@torch.library.custom_op("medgen::gated_residual_backward", mutates_args=())
def gated_residual_backward(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dy) of the forward that ran with ``backend``, by its backward kernel."""
    return _BACKWARDS[backend](_rows(dout), gate, y)


@gated_residual_backward.register_fake
def _(dout, gate, y, backend):
    return gate.new_empty(gate.shape), dout.new_empty(dout.shape)


def _setup_context(ctx, inputs, output):
    _, gate, y, backend = inputs
    ctx.save_for_backward(gate, y)
    ctx.backend = backend


def _backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dgate, dy = torch.ops.medgen.gated_residual_backward(dout, gate, y, ctx.backend)
    return dout, dgate, dy, None


gated_residual.define_torch_op(
    "(Tensor x, Tensor gate, Tensor y, str backend) -> Tensor", _op_args,
    fake=lambda x, gate, y, backend: x.new_empty(x.shape),
    setup_context=_setup_context, backward=_backward,
    reference_kernel=lambda x, gate, y: gated_residual_reference(x, gate, y).contiguous())
