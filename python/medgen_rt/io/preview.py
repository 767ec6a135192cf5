"""Pictures of generated volumes (numpy + Pillow; shared by the torch runtime and
the torch-free ONNX engine):

* CT (X, Y, Z) in HU: axial, coronal and sagittal mid-slices side by side,
  window [-1000, 1000] HU, each view resampled to square millimetres;
* cine (X, Y, Z, T): a montage with one row per slice and one column per frame
  (at most `max_frames` evenly spaced), and an animated GIF of all slices over
  the cardiac cycle.
Volumes are first turned to RAS with the affine, then shown in radiological
convention: anterior and superior up, the patient's right on the image's left.
Every file is written under a temporary name and renamed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .atomic import atomic_path


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.asarray(a, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _percentile_window(a: np.ndarray) -> tuple:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple:
    """(volume with its first three axes in RAS order and direction, spacing in that order)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    ras_spacing = [0.0, 0.0, 0.0]
    for src, (dst, _) in enumerate(transform):
        ras_spacing[int(dst)] = float(spacing[src])
    return nio.apply_orientation(volume, transform), tuple(ras_spacing)


def _image(plane: np.ndarray, spacing: Sequence[float], height: int):
    """A RAS plane (first axis R->L... as columns, second axis as rows) -> PIL image with
    both axes reversed (radiological: right on the left; anterior/superior up), mm-square pixels."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(plane.T[::-1, ::-1]))
    w_mm, h_mm = plane.shape[0] * spacing[0], plane.shape[1] * spacing[1]
    width = max(1, int(round(height * w_mm / max(h_mm, 1e-9))))
    return img.resize((width, height), Image.BILINEAR)


def _check(volume: np.ndarray, ndim: int, what: str) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D volume, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{what}: the volume has non-finite values")
    return volume


def write_ct_preview(path, volume_hu: np.ndarray, affine: np.ndarray, height: int = 256,
                     window: tuple = (-1000.0, 1000.0)) -> Path:
    """Axial, coronal and sagittal mid-slices of a CT volume (X, Y, Z) in HU as one PNG."""
    from PIL import Image

    vol, (sx, sy, sz) = to_ras(_check(volume_hu, 3, "CT preview"), affine)
    x, y, z = (s // 2 for s in vol.shape)
    views = [_image(_to_uint8(vol[:, :, z], *window), (sx, sy), height),   # axial (X, Y)
             _image(_to_uint8(vol[:, y, :], *window), (sx, sz), height),   # coronal (X, Z)
             _image(_to_uint8(vol[x, :, :], *window), (sy, sz), height)]   # sagittal (Y, Z)
    canvas = Image.new("L", (sum(v.width for v in views) + 4 * (len(views) - 1), height))
    offset = 0
    for v in views:
        canvas.paste(v, (offset, 0))
        offset += v.width + 4
    return _save(canvas, path)


def write_cine_montage(path, volume: np.ndarray, affine: np.ndarray, max_frames: int = 12, tile: int = 96) -> Path:
    """Slice-by-frame montage of a cine volume (X, Y, Z, T) as one PNG (slices in stored order)."""
    from PIL import Image

    vol, spacing = _in_plane_ras(_check(volume, 4, "cine montage"), affine)
    lo, hi = _percentile_window(vol)
    frames = np.unique(np.linspace(0, vol.shape[3] - 1, min(max_frames, vol.shape[3])).round().astype(int))
    cells = [[_image(_to_uint8(vol[:, :, z, t], lo, hi), spacing[:2], tile) for t in frames]
             for z in range(vol.shape[2])]
    width = cells[0][0].width
    canvas = Image.new("L", (len(frames) * (width + 2), vol.shape[2] * (tile + 2)))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            canvas.paste(cell, (c * (width + 2), r * (tile + 2)))
    return _save(canvas, path)


def write_cine_gif(path, volume: np.ndarray, affine: np.ndarray, frame_duration: Optional[float] = None,
                   tile: int = 96, columns: Optional[int] = None) -> Path:
    """Animated GIF of a cine volume (X, Y, Z, T): all slices in a grid, one GIF frame per time frame."""
    from PIL import Image

    vol, spacing = _in_plane_ras(_check(volume, 4, "cine GIF"), affine)
    lo, hi = _percentile_window(vol)
    n_slices, n_frames = vol.shape[2], vol.shape[3]
    columns = columns or int(np.ceil(np.sqrt(n_slices)))
    rows = int(np.ceil(n_slices / columns))
    pictures = []
    for t in range(n_frames):
        cells = [_image(_to_uint8(vol[:, :, z, t], lo, hi), spacing[:2], tile) for z in range(n_slices)]
        width = cells[0].width
        canvas = Image.new("L", (columns * (width + 2), rows * (tile + 2)))
        for i, cell in enumerate(cells):
            canvas.paste(cell, ((i % columns) * (width + 2), (i // columns) * (tile + 2)))
        pictures.append(canvas)
    ms = int(round(1000 * frame_duration)) if frame_duration else 60
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=max(ms, 20), loop=0)
    return Path(path)


def _in_plane_ras(volume: np.ndarray, affine: np.ndarray) -> tuple:
    """Cine: orient the in-plane axes (X, Y) to R, A directions for display; slices keep their order."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    out = volume
    # columns: first axis should point to patient right (RAS +x); rows: second axis to anterior (+y)
    if affine[0, 0] < 0:
        out = out[::-1]
    if affine[1, 1] < 0:
        out = out[:, ::-1]
    return np.ascontiguousarray(out), (float(spacing[0]), float(spacing[1]))


def _save(image, path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
