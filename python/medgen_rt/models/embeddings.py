"""Fixed embeddings of the diffusion transformers: sinusoidal timestep features,
sin-cos positional embeddings for 3D and 4D patch grids, and RoPE tables.

Conventions follow the published VolDiT (3D) and CardioDiT (4D) code so that
converted checkpoints see the same inputs:
* timestep features: [cos(t*f), sin(t*f)], f_i = 10000^(-i/half), i < half;
* 1D sin-cos of a position over D dims: [sin(pos*w), cos(pos*w)], w_i = 10000^(-2i/D);
* 3D: embed_dim padded up to a multiple of 6, one third per axis (d, h, w), then
  truncated back to embed_dim; 4D: embed_dim/4 per axis (z, h, w, t), which needs
  embed_dim divisible by 8.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (integer or continuous) -> (B, dim) float32 features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _grid_positions(grid: Sequence[int]) -> list:
    mesh = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    return [m.reshape(-1) for m in mesh]


def sincos_pos_embed(embed_dim: int, grid: Sequence[int]) -> torch.Tensor:
    """(prod(grid), embed_dim) float32 positional embedding for a 3D or 4D patch grid."""
    positions = _grid_positions(grid)
    if len(grid) == 3:
        padded = embed_dim + (6 - embed_dim % 6) % 6
        per_axis = padded // 3
        emb = np.concatenate([sincos_1d(per_axis, p) for p in positions], axis=1)[:, :embed_dim]
    elif len(grid) == 4:
        if embed_dim % 8:
            raise ValueError(f"4D sin-cos embedding needs hidden size divisible by 8, got {embed_dim}")
        emb = np.concatenate([sincos_1d(embed_dim // 4, p) for p in positions], axis=1)
    else:
        raise ValueError(f"positional embeddings exist for 3D and 4D grids, got {len(grid)}D")
    return torch.from_numpy(emb.astype(np.float32))


def rope_tables(head_dim: int, grid: Sequence[int], base: float = 10000.0) -> tuple:
    """(cos, sin), each (prod(grid), head_dim), for axis-split rotary embeddings.

    The head_dim/2 rotation pairs (i, i + head_dim/2) are shared out over the grid
    axes in contiguous ranges; pair k of an axis with n_a pairs turns by
    pos_a * base^(-k / n_a). Applied in the rotate-half layout by ops.attention.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    half = head_dim // 2
    n_axes = len(grid)
    counts = [half // n_axes + (1 if a < half % n_axes else 0) for a in range(n_axes)]
    positions = _grid_positions(grid)
    angles = []
    for pos, n in zip(positions, counts):
        if n == 0:
            continue
        freqs = base ** (-np.arange(n, dtype=np.float64) / n)
        angles.append(np.outer(pos, freqs))
    ang = np.concatenate(angles, axis=1)  # (N, half)
    full = np.concatenate([ang, ang], axis=1)
    return torch.from_numpy(np.cos(full).astype(np.float32)), torch.from_numpy(np.sin(full).astype(np.float32))
