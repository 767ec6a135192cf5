"""attention: multi-head self-attention over volume tokens, with optional
rotary position embedding (RoPE) applied to q and k inside the op.

q, k, v (B, H, N, d); rope None or a pair (cos, sin) of (N, d) tables as made
by :func:`medgen_rt.models.embeddings.rope_tables` (rotate-half layout).
Output (B, H, N, d). Attention runs over tokens (N), never over heads.
Reference: PyTorch's scaled_dot_product_attention; the flash-style kernels come
with the kernels issue.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from medgen_rt.ops.registry import register_op


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., N, d) rotated by the per-token angles of the (N, d) tables, in float32."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Optional[tuple] = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def check_attention(q, k, v, rope=None, dropout_p=0.0):
    if q.dim() != 4 or tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise ValueError(f"attention: q, k, v must all be (B, H, N, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if rope is not None:
        cos, sin = rope
        want = (q.shape[2], q.shape[3])
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(f"attention: rope tables must be (N, d) = {want}, got {tuple(cos.shape)}")
        if q.shape[3] % 2:
            raise ValueError("attention: RoPE needs an even head dimension")


attention = register_op("attention", attention_reference, check_args=check_attention)
