"""tile_blend: weighted accumulation of a decoded tile into the output, and the
final normalisation by the accumulated weights.

    tile_blend(out, weight_sum, tile, region, weight=None)   in place
        out[:, :, region] += weight * tile ; weight_sum[region] += weight
        out (B, C, *S) float32 (may live in pinned CPU memory while the tile is on
        the GPU: the tile is moved to out's device), weight_sum (*S) float32 or
        None when the caller's regions are disjoint with weight 1 (exact halo tiles,
        streamed chunks): no weights to track and no normalisation needed,
        tile (B, C, *s) with s the region's size, weight None (= 1) or (*s)
    tile_normalize(out, weight_sum)   in place: out /= weight_sum (where > 0)

tile_blend backends: reference (this file), native (csrc/cpu, csrc/cuda; no temporaries),
triton (kernels/tile_blend.py). tile_normalize: reference and native (one in-place pass).

torch ops, mutating their first arguments, no autograd:
``medgen::tile_blend(out, weight_sum, tile, start, weight, backend)`` (the region is
``start`` plus the tile's size) and ``medgen::tile_normalize(out, weight_sum, backend)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import Backend, register_op


def tile_blend_reference(out: torch.Tensor, weight_sum: torch.Tensor, tile: torch.Tensor, region: tuple,
                         weight: Optional[torch.Tensor] = None) -> None:
    index = (slice(None), slice(None)) + tuple(region)
    # non-blocking only towards a GPU: a GPU->CPU copy must be finished before the add reads it
    tile = tile.to(device=out.device, dtype=out.dtype, non_blocking=out.device.type == "cuda")
    if weight is None:
        out[index] += tile
        if weight_sum is not None:
            weight_sum[tuple(region)] += 1.0
    else:
        weight = weight.to(device=out.device, dtype=out.dtype)
        out[index] += tile * weight
        if weight_sum is not None:
            weight_sum[tuple(region)] += weight


def check_tile_blend(out, weight_sum, tile, region, weight=None):
    if out.dim() != tile.dim() or out.shape[:2] != tile.shape[:2]:
        raise ValueError(f"tile_blend: tile {tuple(tile.shape)} does not match output {tuple(out.shape)} "
                         "in batch and channels")
    if weight_sum is not None and tuple(weight_sum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"tile_blend: weight_sum must be {tuple(out.shape[2:])}, got {tuple(weight_sum.shape)}")
    size = tuple(s.stop - s.start for s in region)
    if size != tuple(tile.shape[2:]):
        raise ValueError(f"tile_blend: region of size {size} but the tile is {tuple(tile.shape[2:])}")
    if weight is not None and tuple(weight.shape) != size:
        raise ValueError(f"tile_blend: weight must be {size}, got {tuple(weight.shape)}")


def tile_normalize_reference(out: torch.Tensor, weight_sum: torch.Tensor) -> None:
    covered = weight_sum > 0
    out.div_(torch.where(covered, weight_sum, torch.ones_like(weight_sum)))


def check_tile_normalize(out, weight_sum):
    if tuple(weight_sum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"tile_normalize: weight_sum must be {tuple(out.shape[2:])}, got {tuple(weight_sum.shape)}")


def _blend_op_args(out, weight_sum, tile, region, weight=None) -> tuple:
    start = [s.indices(n)[0] for s, n in zip(region, out.shape[2:])]
    return out, weight_sum, tile, start, weight


def _region(start, tile) -> tuple:
    return tuple(slice(a, a + n) for a, n in zip(start, tile.shape[2:]))


def _blend_reference_kernel(out, weight_sum, tile, start, weight) -> None:
    tile_blend_reference(out, weight_sum, tile, _region(start, tile), weight)


# ---- native backend (csrc/cpu/tile_blend.cpp, csrc/cuda/tile_blend.cu) -------------------

def _native_blend_supports(out, weight_sum, tile, region, weight=None):
    if out.dtype != torch.float32:
        return "the native kernels accumulate into float32 outputs only"
    if weight_sum is not None and (weight_sum.dtype != torch.float32 or weight_sum.device != out.device):
        return "weight_sum must be float32 on out's device"
    if tile.dtype not in _native.NATIVE_DTYPES:
        return "the native kernels take float32, float16 or bfloat16 tiles"
    if weight is not None and not weight.is_floating_point():
        return "weight must be a floating-point tensor"
    if any(s.step not in (None, 1) for s in region):
        return "regions with a step are left to the reference"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, weight_sum, tile, weight)):
        return "the native kernels write through raw pointers, invisible to autograd"
    if out[(slice(None), slice(None)) + tuple(region)].shape != tile.shape:
        return "the region does not lie inside out"  # the reference raises the matching error
    return None


def tile_blend_native(out, weight_sum, tile, start, weight) -> None:
    region = _region(start, tile)
    if tile.device != out.device:
        # A pinned CPU output with the tile on the GPU (or the reverse): move the tile
        # first, as the reference does, but synchronously towards the host, where the
        # CPU kernel reads it at once.
        tile = tile.to(out.device, non_blocking=out.device.type == "cuda")
    if weight is not None:
        weight = weight.to(device=out.device, dtype=torch.float32)
    d = _native.describe
    module = _native.native_module()
    stream = _native.stream_handle(out)
    dst = out[(slice(None), slice(None)) + region]
    # (*s) weight broadcast over batch and channels through zero strides, no copy.
    w = None if weight is None else d(weight.expand(tile.shape))
    module.tile_blend_accumulate(d(dst), d(tile), w, stream)
    if weight_sum is not None:
        module.tile_blend_accumulate(d(weight_sum[region]), None, None if weight is None else d(weight), stream)


# ---- triton backend (kernels/tile_blend.py) --------------------------------------------

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_blend_supports(out, weight_sum, tile, region, weight=None):
    from medgen_rt.kernels.tile_blend import layout

    if any(t is not None and t.device != out.device for t in (weight_sum, tile, weight)):
        # e.g. a pinned CPU output with the tile on the GPU: the reference copies the tile over.
        return "out, weight_sum, tile and weight must be on one device"
    if out.dtype != torch.float32 or (weight_sum is not None and weight_sum.dtype != torch.float32):
        return "the Triton kernel accumulates into float32 out and weight_sum only"
    if tile.dtype not in _TRITON_DTYPES or (weight is not None and weight.dtype not in _TRITON_DTYPES):
        return "the Triton kernel takes float32, float16 or bfloat16 tiles and weights"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, weight_sum, tile, weight)):
        return "the Triton kernel writes in place, invisible to autograd"
    index = (slice(None), slice(None)) + tuple(region)
    if any(s.step not in (None, 1) for s in region) or out[index].shape != tile.shape:
        return "the region must be a step-1 box inside out"  # the reference raises on a bad one
    if layout(out[index], tile, weight) is None:
        from medgen_rt.kernels.tile_blend import MAX_DIMS

        return f"more than {MAX_DIMS} axes remain after merging contiguous ones"
    return None


def tile_blend_triton(out, weight_sum, tile, start, weight) -> None:
    from medgen_rt.kernels.tile_blend import tile_blend as kernel

    kernel(out, weight_sum, tile, _region(start, tile), weight)


# ---- tile_normalize: native backend --------------------------------------------------------

def _native_normalize_supports(out, weight_sum):
    if out.dtype != torch.float32 or weight_sum.dtype != torch.float32:
        return "the native kernel normalises float32 outputs by float32 weights only"
    if weight_sum.device != out.device:
        return "weight_sum must be on out's device"
    if not (out.is_contiguous() and weight_sum.is_contiguous()):
        return "the native kernel takes contiguous out and weight_sum"
    if torch.is_grad_enabled() and (out.requires_grad or weight_sum.requires_grad):
        return "the native kernel writes through raw pointers, invisible to autograd"
    return None


def tile_normalize_native(out, weight_sum) -> None:
    _native.native_module().tile_normalize(_native.describe(out), _native.describe(weight_sum),
                                           _native.stream_handle(out))


# ---- registration ---------------------------------------------------------------------
# Backends' supports() look at strides (layouts, contiguity): key_strides.

tile_blend = register_op("tile_blend", tile_blend_reference, check_args=check_tile_blend,
                         differentiable=False, key_strides=True)
tile_blend.register(Backend(
    name="native", fn=tile_blend_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_blend_supports))
tile_blend.register(Backend(
    name="triton", fn=tile_blend_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=triton_unavailable_reason, supports=_triton_blend_supports))
tile_blend.define_torch_op(
    "(Tensor(a!) out, Tensor(b!)? weight_sum, Tensor tile, int[] start, Tensor? weight, str backend) -> ()",
    _blend_op_args, fake=lambda *args: None, mutates_args=("out", "weight_sum"),
    reference_kernel=_blend_reference_kernel)

tile_normalize = register_op("tile_normalize", tile_normalize_reference, check_args=check_tile_normalize,
                             differentiable=False, key_strides=True)
tile_normalize.register(Backend(
    name="native", fn=tile_normalize_native, devices=frozenset({"cpu", "cuda"}),
    default_on=frozenset({"cpu", "cuda"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_normalize_supports))
tile_normalize.define_torch_op(
    "(Tensor(a!) out, Tensor weight_sum, str backend) -> ()", lambda out, weight_sum: (out, weight_sum),
    fake=lambda *args: None, mutates_args=("out",))
