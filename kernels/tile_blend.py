"""Triton tile_blend: out[:, :, region] += weight * tile and weight_sum[region] += weight, in place.

One kernel adds ``w * src`` (or ``w``, or 1) into a strided view. The views are
described by up to MAX_DIMS dimensions after dropping size-1 axes and merging
neighbours that are contiguous with each other in every operand (a 3D or 4D
volume usually becomes 3 or 4); each program takes a block of rows of the innermost
dimension. The blend is two launches: the tile into out, then the weights into
weight_sum (once, not per batch and channel). Arithmetic in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_DIMS = 5
BLOCK = 1024  # elements per program


@triton.jit
def _tile_blend_accumulate_kernel(OUT, SRC, W, ROWS, size1, size2, size3, size4,
                                  so0, so1, so2, so3, so4, ss0, ss1, ss2, ss3, ss4, sw0, sw1, sw2, sw3, sw4,
                                  HAS_SRC: tl.constexpr, HAS_W: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # BLOCK_R rows over dimensions 0..3 x BLOCK_C elements of the innermost one: several rows
    # per program, since the innermost dimension of a tile can be short.
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (row < ROWS)[:, None] & (cols < size4)[None, :]
    i3 = row % size3
    r = row // size3
    i2 = r % size2
    r = r // size2
    i1 = r % size1
    i0 = r // size1
    o = OUT + (i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3)[:, None] + cols[None, :] * so4
    add = tl.full([BLOCK_R, BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_SRC:
        src = SRC + (i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3)[:, None] + cols[None, :] * ss4
        add = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        w = W + (i0 * sw0 + i1 * sw1 + i2 * sw2 + i3 * sw3)[:, None] + cols[None, :] * sw4
        add = add * tl.load(w, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(o, mask=mask, other=0.0).to(tl.float32)
    tl.store(o, (acc + add).to(OUT.dtype.element_ty), mask=mask)


def collapse(sizes, strides) -> Optional[tuple]:
    """(sizes, [strides per operand]) with size-1 axes dropped and mergeable neighbours merged,
    padded in front to MAX_DIMS; None when more than MAX_DIMS axes remain."""
    dims = []
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        st = [s[i] for s in strides]
        # The previous (outer) axis folds into this one when it steps exactly over it in every operand.
        if dims and all(prev == cur * size for prev, cur in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * size, st)
        else:
            dims.append((size, st))
    if len(dims) > MAX_DIMS:
        return None
    dims = [(1, [0] * len(strides))] * (MAX_DIMS - len(dims)) + dims
    return [d[0] for d in dims], [[d[1][j] for d in dims] for j in range(len(strides))]


def broadcast_strides(t: torch.Tensor, lead: int) -> list:
    """Strides of t seen with `lead` broadcast axes in front (stride 0)."""
    return [0] * lead + list(t.stride())


def layout(out_view: torch.Tensor, src: Optional[torch.Tensor], weight: Optional[torch.Tensor]) -> Optional[tuple]:
    """Collapsed launch layout for out_view += weight * src (weight broadcast over out's leading axes)."""
    sizes = list(out_view.shape)
    operands = [list(out_view.stride())]
    if src is not None:
        operands.append(list(src.stride()))
    if weight is not None:
        operands.append(broadcast_strides(weight, out_view.dim() - weight.dim()))
    return collapse(sizes, operands)


def _accumulate(out_view, src, weight) -> None:
    collapsed = layout(out_view, src, weight)
    if collapsed is None:
        raise ValueError(f"tile_blend: more than {MAX_DIMS} axes remain after merging; the op should have "
                         "fallen back to the reference")
    if out_view.numel() == 0:
        return
    sizes, strides = collapsed
    operands = iter(strides)  # out, then src and weight when given
    so = next(operands)
    ss = next(operands) if src is not None else [0] * MAX_DIMS
    sw = next(operands) if weight is not None else [0] * MAX_DIMS
    rows = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    block_c = min(BLOCK, triton.next_power_of_2(sizes[4]))
    block_r = min(triton.next_power_of_2(rows), BLOCK // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(sizes[4], block_c))
    _tile_blend_accumulate_kernel[grid](
        out_view, src if src is not None else out_view, weight if weight is not None else out_view,
        rows, sizes[1], sizes[2], sizes[3], sizes[4], *so, *ss, *sw,
        HAS_SRC=src is not None, HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def tile_blend(out: torch.Tensor, weight_sum: Optional[torch.Tensor], tile: torch.Tensor, region: tuple,
               weight: Optional[torch.Tensor] = None) -> None:
    """Triton backend entry: all tensors on one device, out and weight_sum float32 (the op checks)."""
    region = tuple(region)
    _accumulate(out[(slice(None), slice(None)) + region], tile, weight)
    if weight_sum is not None:
        _accumulate(weight_sum[region], None, weight)
