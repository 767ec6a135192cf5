"""Latent scaling: diffusion runs on ``z * scale`` with ``scale = 1 / std(z)``.

The published code (Cardio-AI/cardiodit ``src/scripts/compute_scale_factor.py``)
concatenates all latents and takes ``1 / torch.std`` (unbiased, N - 1) over every
element. Here the same number is computed in one streaming pass in float64 with
Chan et al.'s pairwise merge of (count, mean, M2), so the set never has to fit in
memory.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

_CHUNK = 1 << 22  # elements per float64 chunk (32 MiB)


def _chunk_stats(flat: torch.Tensor):
    n = flat.numel()
    mean = flat.mean()
    m2 = (flat - mean).square().sum()
    return n, float(mean), float(m2)


def _merge(a, b):
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta * delta * (na * nb / n)


def latent_stats(latents) -> tuple[int, float, float]:
    """``(count, mean, M2)`` over every element of a tensor or an iterable of tensors."""
    if isinstance(latents, torch.Tensor):
        latents = (latents,)
    elif not isinstance(latents, Iterable):
        raise ValueError(f"latents must be a tensor or an iterable of tensors; got {type(latents).__name__}")
    acc = (0, 0.0, 0.0)
    for i, z in enumerate(latents):
        z = torch.as_tensor(z)
        if z.dtype == torch.bool or z.dtype.is_complex:
            raise ValueError(f"latents[{i}] has non-numeric dtype {z.dtype}")
        flat = z.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK].to(torch.float64)
            acc = _merge(acc, _chunk_stats(part))
    return acc


def latent_scale_factor(latents, unbiased: bool = True) -> float:
    """``1 / std`` over all elements of ``latents`` (a tensor or an iterable of
    tensors of any shapes), in float64, streaming over the iterable.

    ``unbiased=True`` divides by N - 1 like ``torch.std`` (the published script).
    Raises ValueError for fewer than two elements, a zero or non-finite std.
    """
    n, _, m2 = latent_stats(latents)
    if n < 2:
        raise ValueError(f"latents must hold at least two elements; got {n}")
    var = m2 / (n - 1 if unbiased else n)
    std = math.sqrt(var) if var >= 0 else float("nan")
    if not math.isfinite(std) or std == 0.0:
        raise ValueError(f"latents have std {std}; cannot scale by 1/std")
    return 1.0 / std
