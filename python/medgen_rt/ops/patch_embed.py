"""patch_embed and unpatchify: DiT input and output for 3D and 4D latents.

patch_embed gathers non-overlapping patches straight from the channel-first
volume layout, projects them and adds the positional embedding:
    x (B, C, *S) with S divisible by the patch p  ->  tokens (B, N, hidden)
Tokens run row-major over the patch grid (g1, g2, ...); a patch vector is laid
out (C, p1, p2, ...), which equals a Conv3d with kernel = stride = p (the
published 3D DiT) and the einops order "(c pz ph pw pt)" (the published 4D DiT).

unpatchify scatters the final layer's output back:
    tokens (B, N, prod(p) * C_out), laid out (p1, p2, ..., C_out)  ->  (B, C_out, *S)

Backends: reference (this file); native (csrc/cpu/patch_embed.cpp, csrc/cuda/patch_embed.cu),
the default on the CPU; triton (kernels/patch_embed.py), the default on CUDA, where native
is the fallback. All are forward kernels; the backward is PyTorch.

torch ops: ``medgen::patch_embed(x, weight, bias, patch, pos, backend)`` with pos as
(N, hidden) in x's dtype, and ``medgen::unpatchify(tokens, grid, patch, out_channels, backend)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import Backend, register_op


def grid_shape(spatial: Sequence[int], patch: Sequence[int]) -> tuple:
    """Patch grid for a spatial size; raises when a size is not a multiple of the patch."""
    if len(spatial) != len(patch):
        raise ValueError(f"patch {tuple(patch)} has {len(patch)} axes but the input has {len(spatial)} spatial axes")
    bad = [(s, p) for s, p in zip(spatial, patch) if p <= 0 or s % p]
    if bad:
        raise ValueError(f"spatial size {tuple(spatial)} is not divisible by the patch size {tuple(patch)}")
    return tuple(s // p for s, p in zip(spatial, patch))


def _to_patches(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C * prod(p)) in (C, p1, p2, ...) patch order."""
    B, C = x.shape[:2]
    grid = grid_shape(x.shape[2:], patch)
    nd = len(patch)
    split = [B, C]
    for g, p in zip(grid, patch):
        split += [g, p]
    x = x.reshape(split)
    # axes: 0 B, 1 C, then (g_i, p_i) pairs at 2+2i, 3+2i
    order = [0] + [2 + 2 * i for i in range(nd)] + [1] + [3 + 2 * i for i in range(nd)]
    return x.permute(order).reshape(B, math.prod(grid), C * math.prod(patch))


def patch_embed_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          patch_size: Sequence[int], pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    tokens = F.linear(_to_patches(x, patch_size), weight, bias)
    if pos_embed is not None:
        tokens = tokens + pos_embed.to(tokens.dtype)
    return tokens


def check_patch_embed(x, weight, bias, patch_size, pos_embed=None):
    if x.dim() != 2 + len(patch_size):
        raise ValueError(f"patch_embed: x must be (B, C, {len(patch_size)} spatial axes), got shape {tuple(x.shape)}")
    grid = grid_shape(x.shape[2:], patch_size)
    want = x.shape[1] * math.prod(patch_size)
    if weight.dim() != 2 or weight.shape[1] != want:
        raise ValueError(f"patch_embed: weight must be (hidden, C*prod(patch)) = (hidden, {want}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"patch_embed: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if pos_embed is not None and tuple(pos_embed.shape[-2:]) != (math.prod(grid), weight.shape[0]):
        raise ValueError(f"patch_embed: pos_embed must be (N, hidden) = {(math.prod(grid), weight.shape[0])}, "
                         f"got {tuple(pos_embed.shape)}")


def unpatchify_reference(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int],
                         out_channels: int) -> torch.Tensor:
    B = tokens.shape[0]
    nd = len(patch_size)
    x = tokens.reshape([B, *grid, *patch_size, out_channels])
    # (B, g1..gn, p1..pn, C) -> (B, C, g1, p1, g2, p2, ...)
    order = [0, 1 + 2 * nd]
    for i in range(nd):
        order += [1 + i, 1 + nd + i]
    x = x.permute(order)
    return x.reshape([B, out_channels, *(g * p for g, p in zip(grid, patch_size))])


def check_unpatchify(tokens, grid, patch_size, out_channels):
    if len(grid) != len(patch_size):
        raise ValueError(f"unpatchify: grid {tuple(grid)} and patch {tuple(patch_size)} differ in rank")
    want = (math.prod(grid), math.prod(patch_size) * out_channels)
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != want:
        raise ValueError(f"unpatchify: tokens must be (B, {want[0]}, {want[1]}), got {tuple(tokens.shape)}")


def _patches_to_volume(patches: torch.Tensor, channels: int, grid: Sequence[int],
                       patch: Sequence[int]) -> torch.Tensor:
    """The inverse of _to_patches: (B, N, C * prod(p)) in (C, p1, ...) order -> (B, C, *S)."""
    B = patches.shape[0]
    nd = len(patch)
    x = patches.reshape([B, *grid, channels, *patch])
    # (B, g1..gn, C, p1..pn) -> (B, C, g1, p1, .., gn, pn)
    order = [0, 1 + nd] + [v for i in range(nd) for v in (1 + i, 2 + nd + i)]
    return x.permute(order).reshape([B, channels, *(g * p for g, p in zip(grid, patch))])


def _volume_to_tokens(x: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """The inverse of unpatchify: (B, C, *S) -> (B, N, prod(p) * C) laid out (p1, .., pn, C)."""
    B, C = x.shape[:2]
    nd = len(patch_size)
    split = [B, C] + [v for g, p in zip(grid, patch_size) for v in (g, p)]
    # (B, C, g1, p1, .., gn, pn) -> (B, g1..gn, p1..pn, C)
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.reshape(split).permute(order).reshape(B, math.prod(grid), math.prod(patch_size) * C)


# ---- the torch ops' arguments and autograd ----------------------------------------------

def _patch_embed_op_args(x, weight, bias, patch_size, pos_embed=None) -> tuple:
    if pos_embed is not None:
        # As the reference: the embedding rounded to the tokens' dtype. The cast and view stay
        # outside the op, so autograd maps the (N, hidden) grad back to pos_embed's shape.
        pos_embed = pos_embed.to(x.dtype).reshape(pos_embed.shape[-2:])
        if pos_embed.shape[-1] > 1 and pos_embed.stride(-1) != 1:
            pos_embed = pos_embed.contiguous()
    bias = bias if bias is None or bias.stride(-1) == 1 else bias.contiguous()
    return x, weight, bias, [int(p) for p in patch_size], pos_embed


def _patch_embed_fake(x, weight, bias, patch, pos, backend):
    tokens = math.prod(s // p for s, p in zip(x.shape[2:], patch))
    return x.new_empty((x.shape[0], tokens, weight.shape[0]))


def _patch_embed_setup(ctx, inputs, output):
    x, weight, _, patch, _, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.patch = tuple(patch)


def _patch_embed_backward(ctx, dout):
    """dx scatters dout @ weight back to the volume, dweight multiplies dout by the
    patches of x, dbias and dpos are sums."""
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, _, need_pos, _ = ctx.needs_input_grad
    patch = ctx.patch
    dx = dweight = dbias = dpos = None
    if need_x:
        grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
        dx = _patches_to_volume(torch.matmul(dout, weight), x.shape[1], grid, patch)
    if need_w:
        patches = _to_patches(x, patch)
        dweight = dout.reshape(-1, dout.shape[-1]).t().matmul(patches.reshape(-1, patches.shape[-1]))
    if need_b:
        dbias = dout.sum(dim=(0, 1))
    if need_pos:
        dpos = dout.sum(dim=0)
    return dx, dweight, dbias, None, dpos, None


def _unpatchify_op_args(tokens, grid, patch_size, out_channels) -> tuple:
    return tokens, [int(g) for g in grid], [int(p) for p in patch_size], int(out_channels)


def _unpatchify_fake(tokens, grid, patch, out_channels, backend):
    return tokens.new_empty([tokens.shape[0], out_channels, *(g * p for g, p in zip(grid, patch))])


def _unpatchify_setup(ctx, inputs, output):
    _, grid, patch, _, _ = inputs
    ctx.layout = (tuple(grid), tuple(patch))


def _unpatchify_backward(ctx, dout):
    grid, patch = ctx.layout
    return _volume_to_tokens(dout, grid, patch), None, None, None, None


# ---- native backend (csrc/cpu/patch_embed.cpp, csrc/cuda/patch_embed.cu) -------------

_NATIVE_MAX_SPATIAL = 4


def _native_patch_embed_supports(x, weight, bias, patch_size, pos_embed=None):
    if not 1 <= len(patch_size) <= _NATIVE_MAX_SPATIAL:
        return f"the native kernels take 1 to {_NATIVE_MAX_SPATIAL} spatial axes"
    if x.dtype not in _native.NATIVE_DTYPES:
        return "the native kernels take float32, float16 or bfloat16 inputs"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "x, weight and bias must share a dtype"
    if pos_embed is not None and not pos_embed.is_floating_point():
        return "pos_embed must be a floating-point tensor"
    if any(t is not None and t.device != x.device for t in (weight, bias, pos_embed)):
        return "x, weight, bias and pos_embed must be on one device"
    if pos_embed is not None and any(n != 1 for n in pos_embed.shape[:-2]):
        return "the native kernels add one (N, hidden) positional embedding to every sample"
    return None


def patch_embed_native(x, weight, bias, patch, pos):
    B = x.shape[0]
    grid = grid_shape(x.shape[2:], patch)
    out = torch.empty((B, math.prod(grid), weight.shape[0]), dtype=x.dtype, device=x.device)
    d = _native.describe
    _native.native_module().patch_embed_forward(
        d(x), d(weight), None if bias is None else d(bias), None if pos is None else d(pos), d(out),
        list(patch), _native.stream_handle(x))
    return out


def _native_unpatchify_supports(tokens, grid, patch_size, out_channels):
    if not 1 <= len(patch_size) <= _NATIVE_MAX_SPATIAL:
        return f"the native kernels take 1 to {_NATIVE_MAX_SPATIAL} spatial axes"
    if tokens.dtype not in _native.NATIVE_DTYPES:
        return "the native kernels take float32, float16 or bfloat16 tokens"
    return None


def unpatchify_native(tokens, grid, patch, channels):
    out = torch.empty([tokens.shape[0], channels, *(g * p for g, p in zip(grid, patch))], dtype=tokens.dtype,
                      device=tokens.device)
    _native.native_module().unpatchify(_native.describe(tokens), _native.describe(out), list(patch),
                                       _native.stream_handle(tokens))
    return out


# ---- triton backend (kernels/patch_embed.py) -----------------------------------------

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_SPATIAL = 4


def _triton_patch_embed_supports(x, weight, bias, patch_size, pos_embed=None):
    if len(patch_size) > _TRITON_MAX_SPATIAL:
        return f"the Triton kernel takes at most {_TRITON_MAX_SPATIAL} spatial axes"
    if x.dtype not in _TRITON_DTYPES:
        return "the Triton kernel takes float32, float16 or bfloat16 inputs"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "x, weight and bias must share a dtype"
    if any(t is not None and t.device != x.device for t in (weight, bias, pos_embed)):
        return "x, weight, bias and pos_embed must be on one device"
    if pos_embed is not None and any(n != 1 for n in pos_embed.shape[:-2]):
        return "the Triton kernel adds one (N, hidden) positional embedding to every sample"
    return None


def patch_embed_triton(x, weight, bias, patch, pos):
    from medgen_rt.kernels.patch_embed import patch_embed_forward

    return patch_embed_forward(x, weight, bias, pos, tuple(patch))


def _triton_unpatchify_supports(tokens, grid, patch_size, out_channels):
    if len(patch_size) > _TRITON_MAX_SPATIAL:
        return f"the Triton kernel takes at most {_TRITON_MAX_SPATIAL} spatial axes"
    if tokens.dtype not in _TRITON_DTYPES:
        return "the Triton kernel takes float32, float16 or bfloat16 tokens"
    return None


def unpatchify_triton(tokens, grid, patch, channels):
    from medgen_rt.kernels.patch_embed import unpatchify_forward

    return unpatchify_forward(tokens, grid, patch, channels)


# ---- registration ---------------------------------------------------------------------

patch_embed = register_op("patch_embed", patch_embed_reference, check_args=check_patch_embed)
unpatchify = register_op("unpatchify", unpatchify_reference, check_args=check_unpatchify)
for _op, _fn, _supports in ((patch_embed, patch_embed_triton, _triton_patch_embed_supports),
                            (unpatchify, unpatchify_triton, _triton_unpatchify_supports)):
    _op.register(Backend(
        name="triton", fn=_fn, devices=frozenset({"cpu", "cuda"}),
        # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
        default_on=frozenset({"cuda"}), priority=2, is_available=triton_unavailable_reason, supports=_supports))
for _op, _fn, _supports in ((patch_embed, patch_embed_native, _native_patch_embed_supports),
                            (unpatchify, unpatchify_native, _native_unpatchify_supports)):
    _op.register(Backend(
        name="native", fn=_fn, devices=frozenset({"cpu", "cuda"}),
        # CPU: the default (forward 1.5-3x the reference at the DiT-S/B/L and DiT4D-B shapes on
        # 2 cores, bench/patch_embed.py). CUDA: Triton first; the plain CUDA kernels are the
        # fallback when Triton cannot run.
        default_on=frozenset({"cpu", "cuda"}), priority=1,
        is_available=_native.unavailable_reason, supports=_supports))

patch_embed.define_torch_op(
    "(Tensor x, Tensor weight, Tensor? bias, int[] patch, Tensor? pos, str backend) -> Tensor",
    _patch_embed_op_args, fake=_patch_embed_fake, setup_context=_patch_embed_setup,
    backward=_patch_embed_backward,
    reference_kernel=lambda x, weight, bias, patch, pos: patch_embed_reference(x, weight, bias, patch, pos).contiguous())
unpatchify.define_torch_op(
    "(Tensor tokens, int[] grid, int[] patch, int out_channels, str backend) -> Tensor",
    _unpatchify_op_args, fake=_unpatchify_fake, setup_context=_unpatchify_setup, backward=_unpatchify_backward,
    reference_kernel=lambda *args: unpatchify_reference(*args).contiguous())
