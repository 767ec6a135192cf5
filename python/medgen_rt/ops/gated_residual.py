"""gated_residual: ``x + gate[b] * y``, the adaLN-Zero residual of DiT blocks.

x, y (B, N, C); gate (B, C) per sample. Output in x's dtype.
Backends: reference (this file), native (csrc/cpu, csrc/cuda; forward and backward), triton (kernels/).
"""
from __future__ import annotations

import torch

from medgen_rt.ops.registry import register_op


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate.unsqueeze(1).to(x.dtype) * y.to(x.dtype)


def check_gated_residual(x, gate, y):
    if x.dim() != 3 or tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"gated_residual: x and y must both be (B, N, C); got {tuple(x.shape)} and {tuple(y.shape)}")
    if tuple(gate.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"gated_residual: gate must be (B, C) = {(x.shape[0], x.shape[2])}, got {tuple(gate.shape)}")


# ---- native backend (csrc/cpu/gated_residual.cpp, csrc/cuda/gated_residual.cu) ----------

import math  # noqa: E402

from torch.autograd.function import once_differentiable  # noqa: E402

from medgen_rt.ops import _native  # noqa: E402
from medgen_rt.ops.registry import Backend as _NativeBackend  # noqa: E402


def _native_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit-stride channel axis (also when C == 1, where
    ``contiguous()`` may keep an odd stride)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _native_gate_chunks(N: int, B: int, device: torch.device) -> int:
    """Row chunks per sample of the backward; each writes one partial dgate row."""
    if device.type == "cuda":
        return max(1, math.ceil(N / 64))
    threads = _native.native_module().build_info()["cpu_threads"]
    # A few jobs per thread, so B not divisible by the thread count still splits evenly.
    return max(1, min(N, math.ceil(4 * threads / max(B, 1))))


class _NativeGatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        d = _native.describe
        _native.native_module().gated_residual_forward(d(x), d(gate), d(y), d(out), _native.stream_handle(x))
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    @once_differentiable  # the kernels are invisible to autograd: a double backward must fail, not be wrong
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        need_dx, need_dgate, need_dy = ctx.needs_input_grad
        dout = _native_rows(dout)
        B, N, C = dout.shape
        dy = torch.empty((B, N, C), dtype=dout.dtype, device=dout.device) if need_dy else None
        part = None
        if need_dgate:
            chunks = _native_gate_chunks(N, B, dout.device)
            part = torch.empty((B, chunks, C), dtype=torch.float32, device=dout.device)
        if need_dy or need_dgate:
            d = _native.describe
            _native.native_module().gated_residual_backward(
                d(dout), d(gate), d(y), None if dy is None else d(dy), None if part is None else d(part),
                _native.stream_handle(dout))
        dgate = part.sum(1).to(gate.dtype) if need_dgate else None
        return (dout if need_dx else None), dgate, dy


def _native_supports(x, gate, y):
    if any(t.dtype not in _native.NATIVE_DTYPES for t in (x, gate, y)):
        return "the native kernels take float32, float16 or bfloat16 tensors"
    if gate.device != x.device or y.device != x.device:
        return "x, gate and y must be on one device"
    return None


def gated_residual_native(x, gate, y):
    # The reference computes in x's dtype; casting outside the Function lets autograd convert the grads.
    gate, y = gate.to(x.dtype), y.to(x.dtype)
    return _NativeGatedResidual.apply(_native_rows(x), _native_rows(gate), _native_rows(y))


# ---- triton backend (kernels/gated_residual.py) --------------------------------------

from medgen_rt.ops.registry import Backend  # noqa: E402

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_unavailable(device_type: str):
    from medgen_rt.kernels import triton_unavailable_reason

    return triton_unavailable_reason(device_type)


def _triton_supports(x, gate, y):
    if x.dtype not in _TRITON_DTYPES or gate.dtype not in _TRITON_DTYPES or y.dtype not in _TRITON_DTYPES:
        return "the Triton kernel takes float32, float16 or bfloat16 tensors"
    if gate.device != x.device or y.device != x.device:
        return "x, gate and y must be on one device"
    return None


def gated_residual_triton(x, gate, y):
    from medgen_rt.kernels.gated_residual import gated_residual as kernel

    # The reference computes in x's dtype; the casts stay outside the kernel so autograd converts the grads.
    gate, y = gate.to(x.dtype), y.to(x.dtype)
    x, gate, y = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, gate, y))
    return kernel(x, gate, y)


gated_residual = register_op("gated_residual", gated_residual_reference, check_args=check_gated_residual)
gated_residual.register(_NativeBackend(
    name="native", fn=gated_residual_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_supports))
gated_residual.register(Backend(
    name="triton", fn=gated_residual_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=_triton_unavailable, supports=_triton_supports))
