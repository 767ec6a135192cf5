"""gated_residual: ``x + gate[b] * y``, the adaLN-Zero residual of DiT blocks.

x, y (B, N, C); gate (B, C) per sample. Output in x's dtype.
Reference only for now; the kernels issue fuses it into the out-projection epilogue.
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


gated_residual = register_op("gated_residual", gated_residual_reference, check_args=check_gated_residual)
