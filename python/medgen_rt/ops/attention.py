"""attention: multi-head self-attention over volume tokens, with optional qk-norm
and rotary position embedding (RoPE) applied to q and k inside the op.

q, k, v (B, H, N, d); rope None or a pair (cos, sin) of (N, d) tables as made
by :func:`medgen_rt.models.embeddings.rope_tables` (rotate-half layout);
q_norm / k_norm None or (weight, bias, eps) of a LayerNorm over d (weight and
bias (d,) or None), applied before RoPE, as timm's Attention(qk_norm=True).
Output (B, H, N, d). Attention runs over tokens (N), never over heads; the
softmax scale is 1/sqrt(d).

Backends: reference (this file: LayerNorm, RoPE in float32, then PyTorch's
scaled_dot_product_attention), native (csrc/cpu/attention.cpp: flash-style
forward with norm and RoPE fused, float32 arithmetic, default on the CPU;
csrc/cuda/attention.cu: a plain flash-style CUDA kernel, chosen only by name),
triton (kernels/attention.py: flash-style forward, default on CUDA), flash_attn
(only when the flash-attn package imports: 16-bit CUDA tensors, norm and RoPE
applied in PyTorch first, flash-attn's own autograd). Neither native nor triton has
attention dropout (with dropout the automatic choice falls to flash_attn or the
reference).

torch op: ``medgen::attention(q, k, v, cos, sin, q_weight, q_bias, q_eps, k_weight,
k_bias, k_eps, backend)`` (no norm when its eps is None; no dropout): the native and
Triton forward kernels; its backward recomputes the reference and differentiates it
(SDPA's backward underneath; nothing N x N is saved). The output is (B, H, N, d) laid
out as (B, N, H, d) in memory, so the DiT's transpose + reshape to tokens is a view.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from medgen_rt.kernels import triton_unavailable_reason
from medgen_rt.ops import _native
from medgen_rt.ops.registry import Backend, register_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, d) rotated by the per-token angles of the (N, d) tables, in float32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_norm(x: torch.Tensor, norm: Optional[tuple]) -> torch.Tensor:
    """LayerNorm over the head dim, exactly what nn.LayerNorm(d) does to x."""
    if norm is None:
        return x
    weight, bias, eps = norm
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Optional[tuple] = None,
                        dropout_p: float = 0.0, q_norm: Optional[tuple] = None,
                        k_norm: Optional[tuple] = None) -> torch.Tensor:
    q, k = apply_norm(q, q_norm), apply_norm(k, k_norm)
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _check_norm(name, norm, d, device):
    if norm is None:
        return
    if not isinstance(norm, (tuple, list)) or len(norm) != 3:
        raise ValueError(f"attention: {name} must be None or (weight, bias, eps), got {type(norm).__name__}")
    weight, bias, eps = norm
    for part, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (d,):
            raise ValueError(f"attention: {name} {part} must be a (d,) = ({d},) tensor or None, "
                             f"got {tuple(getattr(t, 'shape', ()))}")
        if t.device != device:
            raise ValueError(f"attention: {name} {part} is on {t.device} but q is on {device}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"attention: {name} eps must be positive and finite, got {eps!r}")


def check_attention(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None):
    if q.dim() != 4 or tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"attention: q, k, v must all be (B, H, N, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if rope is not None:
        cos, sin = rope
        want = (q.shape[2], q.shape[3])
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"attention: rope tables must be (N, d) = {want}, got {tuple(cos.shape)}")
        if q.shape[3] % 2:
            raise ValueError("attention: RoPE needs an even head dimension")
        if cos.device != q.device or sin.device != q.device:
            raise ValueError(f"attention: rope tables are on {cos.device} but q is on {q.device}")
    _check_norm("q_norm", q_norm, q.shape[3], q.device)
    _check_norm("k_norm", k_norm, q.shape[3], q.device)


# ---- the torch op's arguments and autograd ------------------------------------------------

def _op_args(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None) -> tuple:
    # dropout_p is always 0 here: only the reference and flash_attn (direct) take dropout.
    cos, sin = rope if rope is not None else (None, None)
    qw, qb, q_eps = q_norm if q_norm is not None else (None, None, None)
    kw, kb, k_eps = k_norm if k_norm is not None else (None, None, None)
    return (q, k, v, cos, sin, qw, qb, None if q_eps is None else float(q_eps),
            kw, kb, None if k_eps is None else float(k_eps))


def _unflatten(cos, sin, qw, qb, q_eps, kw, kb, k_eps) -> tuple:
    """(rope, q_norm, k_norm) from the torch op's flat arguments."""
    return (None if cos is None else (cos, sin), None if q_eps is None else (qw, qb, q_eps),
            None if k_eps is None else (kw, kb, k_eps))


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) laid out as (B, N, H, d): every kernel writes this layout."""
    B, H, N, d = q.shape
    return q.new_empty((B, N, H, d)).transpose(1, 2)


def _reference_kernel(q, k, v, cos, sin, qw, qb, q_eps, kw, kb, k_eps):
    rope, q_norm, k_norm = _unflatten(cos, sin, qw, qb, q_eps, kw, kb, k_eps)
    return _empty_output(q).copy_(attention_reference(q, k, v, rope, 0.0, q_norm, k_norm))


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, qw, qb, q_eps, kw, kb, k_eps, _ = inputs
    ctx.save_for_backward(q, k, v, cos, sin, qw, qb, kw, kb)
    ctx.eps = (q_eps, k_eps)


_TENSOR_SLOTS = (0, 1, 2, 3, 4, 5, 6, 8, 9)  # q k v cos sin qw qb kw kb among the op's inputs


def _backward(ctx, dout):
    """Recompute the forward with the reference and differentiate that."""
    q_eps, k_eps = ctx.eps
    needs = [ctx.needs_input_grad[i] for i in _TENSOR_SLOTS]
    inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
    q, k, v, cos, sin, qw, qb, kw, kb = inputs
    rope, q_norm, k_norm = _unflatten(cos, sin, qw, qb, q_eps, kw, kb, k_eps)
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        out = attention_reference(q, k, v, rope, 0.0, q_norm, k_norm)
        grads = iter(torch.autograd.grad(out, wanted, dout))
    g = [next(grads) if need and t is not None else None for t, need in zip(inputs, needs)]
    return (*g[:7], None, g[7], g[8], None, None)


# ---- triton backend (kernels/attention.py) -------------------------------------------

def _triton_supports(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None):
    from medgen_rt.kernels.attention import MAX_HEAD_DIM

    if dropout_p > 0:
        return "the Triton kernel has no attention dropout (training with dropout uses SDPA)"
    if q.dtype not in FLOAT_DTYPES:
        return f"the Triton kernel takes float32, float16 or bfloat16, not {q.dtype}"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got {q.shape[3]}"
    return None


def attention_triton(q, k, v, cos, sin, qw, qb, q_eps, kw, kb, k_eps):
    from medgen_rt.kernels.attention import forward

    return forward(q, k, v, *_unflatten(cos, sin, qw, qb, q_eps, kw, kb, k_eps))


# ---- native backend (csrc/cpu/attention.cpp, csrc/cuda/attention.cu) -----------------

NATIVE_MAX_HEAD_DIM = 128


def _native_table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Small tables (RoPE cos/sin, norm weight/bias) as the kernels take them: float32, contiguous."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def native_forward(q, k, v, rope=None, q_norm=None, k_norm=None) -> torch.Tensor:
    """The native kernel alone (no autograd), into the (B, N, H, d) memory layout."""
    out = _empty_output(q)
    cos, sin = (None, None) if rope is None else (_native_table(rope[0]), _native_table(rope[1]))
    qw, qb, q_eps = q_norm if q_norm is not None else (None, None, None)
    kw, kb, k_eps = k_norm if k_norm is not None else (None, None, None)
    desc = _native.describe

    def opt(t):
        return None if t is None else desc(t)

    tables = [_native_table(t) for t in (qw, qb, kw, kb)]  # kept alive through the call
    _native.native_module().attention_forward(
        desc(q), desc(k), desc(v), desc(out), opt(cos), opt(sin), opt(tables[0]), opt(tables[1]),
        None if q_eps is None else float(q_eps), opt(tables[2]), opt(tables[3]),
        None if k_eps is None else float(k_eps), _native.stream_handle(q))
    return out


def _native_supports(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None):
    if dropout_p > 0:
        return "the native kernels have no attention dropout (training with dropout uses SDPA)"
    if q.dtype not in _native.NATIVE_DTYPES:
        return f"the native kernels take float32, float16 or bfloat16, not {q.dtype}"
    if q.shape[3] > NATIVE_MAX_HEAD_DIM:
        return f"the native kernels take head dims up to {NATIVE_MAX_HEAD_DIM}, got {q.shape[3]}"
    tables = list(rope or ()) + [t for norm in (q_norm, k_norm) if norm is not None for t in norm[:2]]
    for t in tables:
        if t is not None and not t.is_floating_point():
            return f"RoPE tables and norm parameters must be floating point, got {t.dtype}"
    if q.device.type == "cuda" and q.shape[0] * q.shape[1] > 65535:
        return f"the CUDA kernel takes at most 65535 batch x heads, got {q.shape[0] * q.shape[1]}"
    return None


def attention_native(q, k, v, cos, sin, qw, qb, q_eps, kw, kb, k_eps):
    return native_forward(q, k, v, *_unflatten(cos, sin, qw, qb, q_eps, kw, kb, k_eps))


# ---- flash_attn backend (optional package) -------------------------------------------

@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when the package does not import."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # missing, or built for another torch/CUDA: never required
        return None
    return flash_attn_func


@torch.compiler.assume_constant_result
def _flash_attn_unavailable(device_type: str):
    if _flash_attn_func() is None:
        return "flash-attn is not installed (pip install '.[flash]')"
    if device_type != "cuda" or not torch.cuda.is_available():
        return "flash-attn runs only on CUDA devices"
    if torch.cuda.get_device_capability()[0] < 8:
        return "flash-attn 2 needs an Ampere or newer GPU (sm_80+)"
    return None


def _flash_attn_supports(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 or bfloat16, not {q.dtype}"
    if q.shape[3] > 256 or q.shape[3] % 8:
        return f"flash-attn takes head dims that are multiples of 8 up to 256, got {q.shape[3]}"
    return None


def attention_flash_attn(q, k, v, rope=None, dropout_p=0.0, q_norm=None, k_norm=None):
    # flash-attn has no qk-norm or RoPE of this layout: apply them here, as the reference does.
    q, k = apply_norm(q, q_norm), apply_norm(k, k_norm)
    if rope is not None:
        q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
    # flash-attn wants (B, N, H, d); a transposed view of ours is that layout with d contiguous.
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


# ---- registration ---------------------------------------------------------------------

attention = register_op("attention", attention_reference, check_args=check_attention)
attention.register(Backend(
    name="native", fn=attention_native, devices=frozenset({"cpu", "cuda"}),
    # CPU default: ~0.87x SDPA's time at (1, 6, 16384, 64) float32, 2 threads (2.34 s vs 2.63 s, Zen 4 EPYC).
    # CUDA: selectable only (backend="native"); Triton stays the default there.
    default_on=frozenset({"cpu"}), priority=1,
    is_available=_native.unavailable_reason, supports=_native_supports))
attention.register(Backend(
    name="triton", fn=attention_triton, devices=frozenset({"cpu", "cuda"}),
    # On the CPU Triton only runs in its (slow) interpreter: never an automatic choice there.
    default_on=frozenset({"cuda"}), priority=2,
    is_available=triton_unavailable_reason, supports=_triton_supports))
# Registered only where the package imports; picked automatically on CUDA when the Triton
# kernel declines (attention dropout in training), ahead of the reference. Its function is
# differentiable itself, so it is called directly rather than through medgen::attention.
if _flash_attn_func() is not None:
    attention.register(Backend(
        name="flash_attn", fn=attention_flash_attn, devices=frozenset({"cuda"}),
        default_on=frozenset({"cuda"}), priority=1, direct=True,
        is_available=_flash_attn_unavailable, supports=_flash_attn_supports))

attention.define_torch_op(
    "(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, Tensor? q_weight, Tensor? q_bias, float? q_eps, "
    "Tensor? k_weight, Tensor? k_bias, float? k_eps, str backend) -> Tensor",
    _op_args, fake=lambda q, *rest: _empty_output(q), setup_context=_setup_context, backward=_backward,
    reference_kernel=_reference_kernel)
