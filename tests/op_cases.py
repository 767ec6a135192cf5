"""The table the generic backend harness runs: per op, how to make inputs, which
shapes and layouts, and the tolerances against the reference (DESIGN.md §3:
float32 1e-5 relative, 16-bit 2e-2). Every registered op must have an entry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclass
class OpCase:
    # (shape, dtype, device, layout, generator) -> (args tuple, kwargs dict)
    make_inputs: Callable
    shapes: list
    small_shapes: list  # for Triton's interpreter on the CPU (slow)
    layouts: list = field(default_factory=lambda: ["contiguous"])
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    # False for ops with no backward (their outputs are compared, nothing more).
    differentiable: bool = True


def _adaln_inputs(shape, dtype, device, layout, gen):
    B, N, C = shape
    def randn(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    if layout == "strided_rows":  # every other token of a longer sequence
        x = randn(B, 2 * N, C)[:, ::2, :]
    elif layout == "channels_not_contiguous":  # channel axis has stride != 1
        x = randn(B, C, N).transpose(1, 2)
    else:
        x = randn(B, N, C)
    # A non-zero mean and a larger spread exercise the stable two-pass statistics.
    x = x * 3.0 + 1.5
    if layout == "chunked_modulation":  # shift/scale as chunks of the adaLN linear output (B, 6C)
        mod = randn(B, 6 * C) * 0.5
        shift, scale = mod[:, :C], mod[:, C:2 * C]
    else:
        shift, scale = randn(B, C) * 0.5, randn(B, C) * 0.5
    return (x, shift, scale), {}


OP_CASES = {
    "adaln_modulate": OpCase(
        make_inputs=_adaln_inputs,
        # odd and non-power-of-two sizes, batch 1 and several, DiT widths 384/768/1152
        shapes=[(1, 1, 8), (2, 7, 33), (3, 17, 384), (2, 64, 1152), (1, 5, 1000), (4, 130, 96), (2, 9, 768)],
        small_shapes=[(1, 1, 8), (2, 7, 33), (3, 5, 384), (2, 3, 1152)],
        layouts=["contiguous", "strided_rows", "channels_not_contiguous", "chunked_modulation"],
    ),
}
