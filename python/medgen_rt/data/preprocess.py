"""Intensity normalisation and frame selection, as in the published pipelines.

All functions are numpy-only, return float32 (frame selection keeps the input dtype) and
never modify their input.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HU_MIN", "HU_MAX", "ct_to_unit", "unit_to_ct", "minmax_to_unit", "cycle_frames", "frame_indices",
           "sampled_frame_duration"]

HU_MIN = -1000.0
HU_MAX = 1000.0


def ct_to_unit(hu) -> np.ndarray:
    """CT in HU (any shape) -> float32 in [-1, 1]: clip to [-1000, 1000] HU, divide by 1000."""
    hu = np.asarray(hu, dtype=np.float32)
    return (np.clip(hu, HU_MIN, HU_MAX) / HU_MAX).astype(np.float32, copy=False)


def unit_to_ct(x) -> np.ndarray:
    """Inverse of :func:`ct_to_unit`: values in [-1, 1] (clipped first) -> float32 HU in [-1000, 1000]."""
    x = np.asarray(x, dtype=np.float32)
    return (np.clip(x, -1.0, 1.0) * HU_MAX).astype(np.float32, copy=False)


def minmax_to_unit(vol) -> np.ndarray:
    """Per-volume min-max scaling to [-1, 1] (float32, any shape).

    The whole array is one volume: for cine (X,Y,Z,T) min and max are taken over all
    frames, so intensities stay comparable across time. A constant volume maps to zeros.
    Non-finite input raises ValueError.
    """
    v = np.asarray(vol, dtype=np.float64)
    if v.size == 0:
        return np.zeros(v.shape, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise ValueError("vol: contains non-finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 0:
        return np.zeros(v.shape, dtype=np.float32)
    return ((v - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def frame_indices(n_available: int, n_frames: int, start: int = 0) -> np.ndarray:
    """0-based source frame indices used by :func:`cycle_frames` (int64, length n_frames).

    T <= n_frames: ``start, start+1, ...`` wrapping around (the cycle is repeated).
    T > n_frames: ``start + floor(k * T / n_frames)`` for k = 0..n_frames-1, modulo T,
    i.e. n_frames frames evenly spaced over one full cycle, the first one being ``start``.
    """
    t, n = int(n_available), int(n_frames)
    if t < 1:
        raise ValueError(f"vol4d: needs at least one frame, got T={t}")
    if n < 1:
        raise ValueError(f"n_frames: must be >= 1, got {n}")
    if not 0 <= int(start) < t:
        raise ValueError(f"start: must be a frame index in [0, {t - 1}], got {start}")
    k = np.arange(n, dtype=np.int64)
    if t <= n:
        return (int(start) + k) % t
    return (int(start) + (k * t) // n) % t

def sampled_frame_duration(frame_duration, n_available: int, n_frames: int):
    """Seconds between the frames :func:`frame_indices` selects, on average (None when unknown).

    T > n_frames: the n_frames frames span the whole cycle, so each stands for T / n_frames
    source frames; T <= n_frames: consecutive source frames (repeated), the source duration.
    This, not the file's pixdim[4], is the frame duration of what a model trained on them makes.
    """
    if frame_duration is None:
        return None
    t, n = int(n_available), int(n_frames)
    return float(frame_duration) * (t / n if t > n else 1.0)


def cycle_frames(vol4d, n_frames: int, start: int = 0) -> np.ndarray:
    """(X,Y,Z,T) -> (X,Y,Z,n_frames), beginning at 0-based frame ``start`` (e.g. ED).

    The cine is treated as one periodic cardiac cycle. When T < n_frames the frames are
    repeated cyclically (start, ..., T-1, 0, 1, ...); when T > n_frames, n_frames frames
    evenly spaced over the whole cycle are taken (see :func:`frame_indices`); when
    T == n_frames the sequence is rotated so that ``start`` comes first.
    """
    v = np.asarray(vol4d)
    if v.ndim != 4:
        raise ValueError(f"vol4d: expected a 4D (X,Y,Z,T) array, got shape {v.shape}")
    idx = frame_indices(v.shape[3], n_frames, start)
    return np.take(v, idx, axis=3)
