"""Degraded copies of a volume: what a generative model's copy of a training volume looks
like (rarely bit-exact: the training volume seen through noise, smoothing, intensity drift,
a small shift or deformation, for cine a small temporal shift).

Used by ``medgen eval memorization --calibrate`` (plants these copies and reports which the
screen finds), by bench/copy_screen.py and by the tests; the copy encoder's training views
(:func:`.encoder.make_augment`) cover the same kinds on the encoder grid.

Every kind takes one strength; all work on the raw volume (HU, MR magnitudes), (X, Y, Z) or
cine (X, Y, Z, T), in voxels of that volume:

* noise      Gaussian noise, std = strength x the volume's intensity range (max - min)
* smooth     Gaussian blur along X, Y and Z, sigma = strength voxels
* intensity  v * (1 - s) + (s / 2) * range: s = 0.1 is "x 0.9 + 5% of the range"
* shift      moved by strength voxels along X or Y (edges replicated, nothing wraps)
* deform     a smooth random displacement field whose largest displacement is strength voxels
* temporal   cine only: the cycle rolled by strength frames
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["KINDS", "STRENGTHS", "MUST_SHOW", "describe", "kinds_for", "degrade", "gaussian_blur", "band_pass_in_plane"]

KINDS = ("noise", "smooth", "intensity", "shift", "deform", "temporal")
# The strengths --calibrate plants; the middle one of each is the issue #14 target (MUST_SHOW).
STRENGTHS = {"noise": (0.01, 0.02, 0.04), "smooth": (0.5, 0.8, 1.2), "intensity": (0.05, 0.1, 0.2),
             "shift": (1, 2, 3), "deform": (0.5, 1.0, 2.0), "temporal": (1, 2)}
MUST_SHOW = {"noise": 0.02, "smooth": 0.8, "intensity": 0.1, "shift": 1, "deform": 1.0, "temporal": 1}


def describe(kind: str, strength: float) -> str:
    """A degradation in words, e.g. describe("intensity", 0.1) -> "intensity x0.9 + 5% of the range"."""
    s = float(strength)
    plural = "" if s == 1 else "s"
    return {"noise": f"noise, std {100 * s:g}% of the range", "smooth": f"blur, sigma {s:g} voxel{plural}",
            "intensity": f"intensity x{1 - s:g} + {50 * s:g}% of the range", "shift": f"shift, {s:g} voxel{plural}",
            "deform": f"deformation, up to {s:g} voxel{plural}", "temporal": f"temporal shift, {s:g} frame{plural}"}[kind]


def kinds_for(is_cine: bool) -> tuple:
    """The degradation kinds that apply to a set: temporal only for cine."""
    return KINDS if is_cine else tuple(k for k in KINDS if k != "temporal")


def _kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(t: torch.Tensor, sigmas) -> torch.Tensor:
    """t (N, C, X, Y, Z) blurred along each spatial axis by sigmas[i] voxels (0 = skip), edges
    replicated. Separable; depthwise over the channels."""
    c = int(t.shape[1])
    for ax, s in enumerate(sigmas):
        if s <= 0.05 or t.shape[2 + ax] == 1:
            continue
        k = _kernel(float(s)).to(t.dtype)
        r = (len(k) - 1) // 2
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        shape = [1, 1, 1]
        shape[ax] = len(k)
        t = torch.nn.functional.pad(t, pad, mode="replicate")
        t = torch.nn.functional.conv3d(t, k.view(1, 1, *shape).expand(c, 1, *shape).contiguous(), groups=c)
    return t


def band_pass_in_plane(t: torch.Tensor, sigmas) -> torch.Tensor:
    """t (N, C, X, Y, Z) through the in-plane (X, Y) difference of Gaussians of sigmas = (fine,
    coarse) voxels: the edges of structures, without the layout or voxel noise."""
    fine, coarse = sigmas
    return gaussian_blur(t, (fine, fine, 0)) - gaussian_blur(t, (coarse, coarse, 0))


def as_batch(a: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) -> (1, 1, X, Y, Z); cine (X, Y, Z, T) -> (T, 1, X, Y, Z): frames as a batch."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t[None, None] if a.ndim == 3 else t.permute(3, 0, 1, 2)[:, None]


def from_batch(t: torch.Tensor, ndim: int) -> np.ndarray:
    return (t[0, 0] if ndim == 3 else t[:, 0].permute(1, 2, 3, 0)).contiguous().numpy()


def _displacement(shape, max_disp: float, rng: np.random.Generator) -> torch.Tensor:
    """A smooth random displacement field (3, X, Y, Z) in voxels, largest length max_disp:
    normal vectors on a 4^3 control grid, trilinearly upsampled to the volume."""
    ctrl = torch.from_numpy(rng.standard_normal((1, 3, 4, 4, 4)).astype(np.float32))
    field = torch.nn.functional.interpolate(ctrl, size=tuple(int(s) for s in shape), mode="trilinear",
                                            align_corners=True)[0]
    field = field * (1.0 - torch.tensor([1.0 if s == 1 else 0.0 for s in shape]).view(3, 1, 1, 1))  # flat axes
    norm = float(field.pow(2).sum(0).sqrt().max())
    return field * (max_disp / norm) if norm > 0 else field


def _warp(t: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """t (N, 1, X, Y, Z) sampled at voxel + disp (3, X, Y, Z), trilinear, border values."""
    shape = t.shape[2:]
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    pos = grid + disp
    # grid_sample wants (x=last axis, y, z=first axis) in [-1, 1]
    norm = [2.0 * pos[i] / max(1, s - 1) - 1.0 for i, s in enumerate(shape)]
    g = torch.stack([norm[2], norm[1], norm[0]], dim=-1)[None].expand(t.shape[0], *shape, 3)
    return torch.nn.functional.grid_sample(t, g, mode="bilinear", padding_mode="border", align_corners=True)


def degrade(volume: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``volume`` (raw intensities, (X, Y, Z) or (X, Y, Z, T)) degraded by ``kind`` at
    ``strength`` (module docstring); float32, same shape. ``rng`` draws the noise, the
    shift's axis and sign and the deformation field."""
    a = np.asarray(volume, dtype=np.float32)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if a.ndim not in (3, 4):
        raise ValueError(f"volume: expected (X, Y, Z) or (X, Y, Z, T), got shape {a.shape}")
    s = float(strength)
    rng_ = float(a.max() - a.min())
    if kind == "noise":
        return (a + rng.standard_normal(a.shape, dtype=np.float32) * (s * rng_)).astype(np.float32)
    if kind == "intensity":
        return (a * (1.0 - s) + 0.5 * s * rng_).astype(np.float32)
    if kind == "temporal":
        if a.ndim != 4:
            raise ValueError("temporal: needs a cine (X, Y, Z, T)")
        return np.roll(a, int(round(s)), axis=3).copy()
    if kind == "shift":
        n, axis = int(round(s)), int(rng.integers(0, 2))
        n = n if rng.random() < 0.5 else -n
        idx = np.clip(np.arange(a.shape[axis]) - n, 0, a.shape[axis] - 1)
        return np.take(a, idx, axis=axis).copy()
    t = as_batch(a)
    if kind == "smooth":
        t = gaussian_blur(t, (s, s, s))
    else:  # deform
        t = _warp(t, _displacement(a.shape[:3], s, rng))
    return from_batch(t, a.ndim).astype(np.float32)
