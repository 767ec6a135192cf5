"""linear_gated_residual: ``x + gate[b] * (h @ weight.T + bias)``, a Linear layer
followed by the adaLN-Zero gated residual (the attention out-projection and the
MLP fc2 of a DiT block) as one op.

Shapes: x (B, N, C) residual stream; gate (B, C) per sample; h (B, N, K) the
Linear's input; weight (C, K); bias (C,) or None. h, weight and bias share a
dtype (as F.linear requires). Output (B, N, C) in x's dtype, equal to
``gated_residual(x, gate, F.linear(h, weight, bias))``.

Backends: reference (this file), triton (kernels/linear_gated_residual.py: a GEMM
whose epilogue applies bias, gate and residual, so the projection output is never
written to memory).

torch op: ``medgen::linear_gated_residual(x, gate, h, weight, bias, backend)``; its
backward is PyTorch (GEMMs), whichever kernel ran the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops.gated_residual import gated_residual_reference
from medgen_rt.ops.registry import Backend, register_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The definition of correct: the unfused Linear, then the gated residual."""
    return gated_residual_reference(x, gate, F.linear(h, weight, bias))


def check_args(x, gate, h, weight, bias=None) -> None:
    name = "linear_gated_residual"
    for arg, t in (("x", x), ("gate", gate), ("h", h), ("weight", weight), ("bias", bias)):
        if t is None and arg == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if h.dim() != 3 or tuple(h.shape[:2]) != (B, N):
        raise ValueError(f"{name}: h must be (B, N, K) with (B, N) = {(B, N)}, got {tuple(h.shape)}")
    if tuple(weight.shape) != (C, h.shape[2]):
        raise ValueError(f"{name}: weight must be (C, K) = {(C, h.shape[2])}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"{name}: bias must be ({C},), got {tuple(bias.shape)}")
    if tuple(gate.shape) != (B, C):
        raise ValueError(f"{name}: gate must be (B, C) = {(B, C)}, got {tuple(gate.shape)}")
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise TypeError(f"{name}: h, weight and bias must share a dtype, got {h.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")


def _op_args(x, gate, h, weight, bias=None) -> tuple:
    # Casts stay outside the op so autograd converts their grads.
    gate = gate.to(x.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    bias = bias if bias is None or bias.stride(-1) == 1 else bias.contiguous()
    return x, gate, h, weight, bias


# ---- triton backend (kernels/linear_gated_residual.py) -------------------------------

def _triton_supports(x, gate, h, weight, bias=None):
    if x.dtype != h.dtype:
        return f"the Triton kernel needs x and h in one dtype, got {x.dtype} and {h.dtype}"
    return None


def linear_gated_residual_triton(x, gate, h, weight, bias):
    from medgen_rt.kernels.linear_gated_residual import forward

    return forward(x, gate, h, weight, bias)


# ---- registration ---------------------------------------------------------------------

linear_gated_residual = register_op("linear_gated_residual", linear_gated_residual_reference, check_args=check_args)
linear_gated_residual.register(Backend(
    name="triton", fn=linear_gated_residual_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=triton_unavailable_reason, supports=_triton_supports))


def _setup_context(ctx, inputs, output):
    x, gate, h, weight, bias, _ = inputs
    ctx.save_for_backward(gate, h, weight, bias)


def _backward(ctx, dout):
    """The GEMMs of the unfused op's gradient; dgate by whichever order costs less."""
    gate, h, weight, bias = ctx.saved_tensors
    need_x, need_gate, need_h, need_w, need_b = ctx.needs_input_grad[:5]
    B, N, C = dout.shape
    K = h.shape[-1]
    dgate = dh = dweight = dbias = None
    g = dout * gate[:, None, :] if (need_h or need_w or need_b) else None
    if need_h:
        dh = torch.matmul(g, weight)
    if need_b:
        dbias = g.sum(dim=(0, 1))
    if need_gate and K <= N:
        G = torch.matmul(dout.transpose(1, 2), h)  # (B, C, K): sum over tokens of dout * h
        dgate = torch.einsum("bck,ck->bc", G, weight)
        if bias is not None:
            dgate = dgate + bias * dout.sum(dim=1)
        if need_w:
            dweight = torch.einsum("bc,bck->ck", gate, G)
    elif need_gate:
        dgate = (dout * F.linear(h, weight, bias)).sum(dim=1)
    if need_w and dweight is None:
        dweight = g.reshape(B * N, C).t().matmul(h.reshape(B * N, K))
    return (dout if need_x else None), dgate, dh, dweight, dbias, None


linear_gated_residual.define_torch_op(
    "(Tensor x, Tensor gate, Tensor h, Tensor weight, Tensor? bias, str backend) -> Tensor", _op_args,
    fake=lambda x, gate, h, weight, bias, backend: x.new_empty(x.shape),
    setup_context=_setup_context, backward=_backward,
    reference_kernel=lambda *args: linear_gated_residual_reference(*args).contiguous())
