"""Procedural, seeded phantoms: 4D cine cardiac MR and thoracic CT with labels.

Everything is numpy only and drawn from ``np.random.default_rng(seed)``: the same seed
gives bit-identical volumes, a different seed a different subject. No downloads.

Phantom world coordinates (both phantoms): millimetres with the origin at the centre of
the field of view; internally x points to the patient's left, y posterior, z along the
third array axis. The affine is ``diag(-sx, -sy, sz)`` plus the offset that puts the FOV
centre at 0, i.e. voxel order L-P-S stored in RAS+ world coordinates. Anatomy is defined
in millimetres, so another spacing samples the same anatomy differently and a smaller
field of view crops it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from ..io.atomic import atomic_path
from ..io.nifti import write_volume
from ..io.sidecar import to_jsonable, write_json_atomic

__all__ = [
    "CMR_LABELS",
    "CT_LABELS",
    "CT_TISSUES",
    "CinePhantom",
    "CTPhantom",
    "make_cine_phantom",
    "make_ct_phantom",
    "contraction_curve",
    "phantom_affine",
    "subject_seed",
    "write_acdc_dataset",
    "write_ct_dataset",
]

PathLike = Union[str, "os.PathLike[str]"]

# ACDC convention (0 = background).
CMR_LABELS = {"rv_blood_pool": 1, "lv_myocardium": 2, "lv_blood_pool": 3}
# MM-WHS-like cardiac structures (0 = background); "myocardium" is the LV myocardium.
CT_LABELS = {
    "aorta": 1,
    "left_atrium": 2,
    "right_atrium": 3,
    "left_ventricle": 4,
    "right_ventricle": 5,
    "myocardium": 6,
}
# Coarse tissue classes of the CT phantom (0 = air outside the body).
CT_TISSUES = {"body": 1, "lung": 2, "bone": 3}


# --------------------------------------------------------------------------- helpers


def _check_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    try:
        shp = tuple(int(s) for s in shape)
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as e:
        raise ValueError(f"shape/spacing: expected 3 numbers each, got {shape!r}, {spacing!r}") from e
    if len(shp) != 3 or any(s < 1 for s in shp):
        raise ValueError(f"shape: expected 3 positive sizes (X, Y, Z), got {shape!r}")
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: expected 3 positive voxel sizes in mm, got {spacing!r}")
    return shp, sp


def _coords(shape, spacing):
    """Voxel-centre coordinates in mm along each axis, 0 at the FOV centre (ascending)."""
    return [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]


class _Grid(NamedTuple):
    """Voxel-centre coordinates in mm: axes x, y, z; broadcastable views X (X,1,1), Y (1,Y,1),
    Z (1,1,Z) and in-plane X2 (X,1), Y2 (1,Y)."""

    shape: tuple
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    Z: np.ndarray
    X2: np.ndarray
    Y2: np.ndarray


def _grid(shape, spacing, dtype=None) -> _Grid:
    x, y, z = (c if dtype is None else c.astype(dtype) for c in _coords(shape, spacing))
    return _Grid(tuple(shape), x, y, z, x[:, None, None], y[None, :, None], z[None, None, :], x[:, None], y[None, :])


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(4,4) affine of both phantoms: voxel (i,j,k) -> RAS+ mm, FOV centre at the origin.

    Array axes run to the patient's left, posterior and along +z, hence the negative
    first two columns.
    """
    (nx, ny, nz), (sx, sy, sz) = _check_geometry(shape, spacing)
    a = np.diag([-sx, -sy, sz, 1.0])
    a[:3, 3] = [(nx - 1) / 2.0 * sx, (ny - 1) / 2.0 * sy, -(nz - 1) / 2.0 * sz]
    return a


def subject_seed(seed: int, index: int) -> int:
    """Independent per-subject seed derived from (dataset seed, subject index)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _gaussian_blur(a: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur over the first len(sigmas) axes (sigma in voxels, 0 = skip)."""
    out = np.asarray(a, dtype=np.float32)
    for ax, s in enumerate(sigmas):
        if s <= 0.05 or out.shape[ax] == 1:
            continue
        r = max(1, int(math.ceil(3.0 * s)))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        k = (k / k.sum()).astype(np.float32)
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r, r)
        p = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        n = out.shape[ax]
        for j, w in enumerate(k):
            sl = [slice(None)] * out.ndim
            sl[ax] = slice(j, j + n)
            acc += w * p[tuple(sl)]
        out = acc
    return out


def _smooth_noise(rng, shape, sigmas) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (float32)."""
    f = _gaussian_blur(rng.standard_normal(shape, dtype=np.float32), sigmas)
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _spheroid(px, py, pz, centre, axis, a_long, a_short):
    """Normalised spheroid distance (<= 1 inside), broadcast over px, py, pz (mm).

    A spheroid has one long semi-axis ``a_long`` along the unit vector ``axis`` and the
    same semi-axis ``a_short`` in every perpendicular direction.
    """
    # Python floats keep float32 coordinate grids in float32 (numpy scalars would upcast).
    c0, c1, c2 = (float(v) for v in centre)
    a0, a1, a2 = (float(v) for v in axis)
    dx, dy, dz = px - c0, py - c1, pz - c2
    along = dx * a0 + dy * a1 + dz * a2
    perp2 = dx * dx + dy * dy + dz * dz - along * along
    return (along / a_long) ** 2 + perp2 / (a_short * a_short)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _tube(shape, coords, points, radii) -> np.ndarray:
    """Boolean mask of a tube around the polyline ``points`` (N,3 mm) with radii (N,).

    The radius is interpolated linearly along each segment; only the bounding box of
    each segment is evaluated, which keeps long thin vessels cheap.
    """
    x, y, z = coords
    mask = np.zeros(shape, dtype=bool)
    pts = np.asarray(points, dtype=np.float64)
    rad = np.asarray(radii, dtype=np.float64)
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        rmax = max(r0, r1)
        lo = np.minimum(p0, p1) - rmax
        hi = np.maximum(p0, p1) + rmax
        idx = []
        for c, l, h in zip((x, y, z), lo, hi):
            i0, i1 = np.searchsorted(c, l, "left"), np.searchsorted(c, h, "right")
            idx.append((i0, i1))
        if any(i1 <= i0 for i0, i1 in idx):
            continue
        (i0, i1), (j0, j1), (k0, k1) = idx
        qx = x[i0:i1, None, None] - p0[0]
        qy = y[None, j0:j1, None] - p0[1]
        qz = z[None, None, k0:k1] - p0[2]
        d = p1 - p0
        dd = float(d @ d)
        t = (qx * d[0] + qy * d[1] + qz * d[2]) / dd if dd > 0 else np.zeros(1)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (qx - t * d[0]) ** 2 + (qy - t * d[1]) ** 2 + (qz - t * d[2]) ** 2
        r = r0 + t * (r1 - r0)
        mask[i0:i1, j0:j1, k0:k1] |= dist2 <= r * r
    return mask


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def contraction_curve(n_frames: int, es_index: int, diastole_warp: float = 1.6) -> np.ndarray:
    """Contraction state c(t) in [0, 1] for frames t = 0..T-1 of one periodic cycle.

    c = 0 at ED (t = 0), 1 at ES (t = es_index, 0-based); systole is a half cosine,
    diastole a half cosine on a warped phase (fast early filling, slow diastasis), and
    c returns smoothly to 0 at t = T, so frame T-1 leads back into frame 0.
    """
    t = np.arange(int(n_frames), dtype=np.float64) / n_frames
    phi_es = es_index / n_frames
    c = np.empty_like(t)
    sys = t <= phi_es
    c[sys] = 0.5 * (1.0 - np.cos(np.pi * t[sys] / phi_es))
    x = (t[~sys] - phi_es) / (1.0 - phi_es)
    s = 1.0 - (1.0 - x) ** diastole_warp
    c[~sys] = 0.5 * (1.0 + np.cos(np.pi * s))
    return c


# --------------------------------------------------------------------------- cine MR


@dataclass
class CinePhantom:
    """A 4D short-axis cine MR phantom.

    image: (X, Y, Z, T) float32 magnitude in arbitrary scanner units (>= 0), slice 0 at
    the base, the last slice at/after the apex. labels: (X, Y, Z, T) uint8 in the ACDC
    convention (:data:`CMR_LABELS`). ed, es: 1-based frame numbers (ED = 1, ES = frame
    with the smallest LV blood pool). ejection_fraction: percent, from the label maps.
    lv_volumes_ml: (T,) LV blood-pool volume of every frame in ml. frame_duration: s.
    """

    image: np.ndarray
    labels: np.ndarray
    ed: int
    es: int
    ejection_fraction: float
    edv_ml: float
    esv_ml: float
    lv_volumes_ml: np.ndarray
    frame_duration: float
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: Any
    params: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.image.shape[3])

    def info_cfg(self) -> str:
        """The patient's Info.cfg text in the public ACDC format."""
        p = self.params
        return (
            f"ED: {self.ed}\nES: {self.es}\nGroup: {p['group']}\nHeight: {p['height_cm']:.1f}\n"
            f"NbFrame: {self.n_frames}\nWeight: {p['weight_kg']:.1f}\n"
        )


def _draw_cine_params(rng, n_frames: int) -> dict:
    p: dict[str, Any] = {}
    p["heart_rate_bpm"] = float(rng.uniform(55, 85))
    p["ef_target"] = float(rng.uniform(0.35, 0.70))
    es_phase = float(rng.uniform(0.35, 0.45))
    p["es_index_target"] = int(np.clip(round(es_phase * n_frames), 1, n_frames - 1))
    height = float(np.clip(rng.normal(172, 9), 150, 198))
    p["height_cm"] = round(height, 1)
    p["weight_kg"] = round(float(rng.uniform(19, 32)) * (height / 100) ** 2, 1)
    size = float(rng.uniform(0.9, 1.08))
    if p["ef_target"] < 0.45:
        size *= float(rng.uniform(1.0, 1.15))  # low EF hearts are often dilated
    p["size"] = size
    p["lv_radius_x"] = 22.0 * size * float(rng.uniform(0.95, 1.05))
    p["lv_radius_y"] = p["lv_radius_x"] * float(rng.uniform(0.88, 1.0))
    p["lv_length"] = float(rng.uniform(48, 55))
    p["wall"] = float(rng.uniform(6.0, 9.0))
    p["apex_wall"] = p["wall"] * 0.75
    p["base_z"] = float(rng.uniform(-33.0, -30.0))
    p["centre_x"] = 12.0 + float(rng.uniform(-6, 6))
    p["centre_y"] = float(rng.uniform(-6, 6))
    p["rotation_deg"] = float(rng.uniform(-15, 15))
    p["rv_radial"] = float(rng.uniform(13, 17)) * size
    p["rv_tangential"] = float(rng.uniform(32, 38)) * size
    p["rv_offset"] = float(rng.uniform(-0.1, 0.2))
    p["rv_length_frac"] = float(rng.uniform(0.75, 0.9))
    p["rv_ef"] = float(rng.uniform(0.4, 0.65))
    p["body_a"] = float(rng.uniform(130, 155))
    p["body_b"] = float(rng.uniform(90, 105))
    p["fat"] = float(rng.uniform(6, 14))
    p["muscle"] = float(rng.uniform(6, 10))
    p["aorta_radius"] = float(rng.uniform(10, 13))
    p["noise"] = float(rng.uniform(0.02, 0.045))
    p["bias"] = [float(v) for v in rng.normal(0, 0.12, size=6)]
    p["scale"] = float(rng.uniform(250, 600))
    ef = p["ef_target"]
    p["group"] = "NOR" if ef >= 0.5 else ("DCM" if size > 1.08 else "MINF")
    return p


# Relative MR signal of the tissues (before bias field, noise and scanner scale).
_CINE_SIGNAL = {
    "air": 0.0, "fat": 0.78, "muscle": 0.3, "medi": 0.4, "lung": 0.05, "liver": 0.45,
    "blood": 0.95, "myo": 0.27, "epifat": 0.7, "bone": 0.38,
}


class _CineHeart:
    """The beating ventricles in the heart frame: in-plane rotation about the LV long axis
    (the z axis), depth ``dz`` below the base plane; shapes at contraction state c (0 = ED, 1 = ES)."""

    def __init__(self, p: dict, g: _Grid):
        self.p = p
        th = math.radians(p["rotation_deg"])
        cx, cy = p["centre_x"], p["centre_y"]
        ct, st = math.cos(th), math.sin(th)
        self.U = (g.X - cx) * ct + (g.Y - cy) * st  # rotated in-plane coordinates, (X,Y,1)
        self.V = -(g.X - cx) * st + (g.Y - cy) * ct
        self.dz = g.Z - p["base_z"]  # depth below the base plane, (1,1,Z)
        self.below_base = self.dz >= 0

        # RV: direction from the LV centre toward patient-right-anterior (-x, -y), rotated.
        self.psi = psi = math.pi + 0.35
        rdir = np.array([math.cos(psi), math.sin(psi)])
        rperp = np.array([-rdir[1], rdir[0]])
        self.a_c0, self.b_c0, self.L_c0 = a_c0, b_c0, L_c0 = p["lv_radius_x"], p["lv_radius_y"], p["lv_length"]
        self.a_e0, self.b_e0 = a_e0, b_e0 = a_c0 + p["wall"], b_c0 + p["wall"]
        rv_d = 0.5 * (a_e0 + b_e0) + p["rv_offset"] * p["rv_radial"]
        U, V = self.U, self.V
        self.R_rad = (U - rv_d * rdir[0]) * rdir[0] + (V - rv_d * rdir[1]) * rdir[1]
        self.R_tan = (U - rv_d * rdir[0]) * rperp[0] + (V - rv_d * rdir[1]) * rperp[1]
        self.L_rv = p["rv_length_frac"] * L_c0

        # Contraction: radial and longitudinal cavity scales reach their ES values at c = 1
        # such that the ES/ED cavity volume ratio is about 1 - EF.
        ef = p["ef_target"]
        self.kl_es = 1.0 - 0.12 * ef / 0.6
        self.kr_es = math.sqrt((1.0 - ef) / self.kl_es)
        # Myocardial area per slice is kept constant, so the wall thickens as the cavity shrinks.
        self.myo_a2, self.myo_b2 = a_e0**2 - a_c0**2, b_e0**2 - b_c0**2

        # Papillary muscles: dark spots inside the LV cavity (labelled as blood pool, as in ACDC).
        self.pap_angles = [psi + math.pi - 0.7, psi + math.pi + 0.7]
        self.pap_z = (self.dz >= 0.15 * L_c0) & (self.dz <= 0.7 * L_c0)

    def lv(self, c):
        """(LV cavity mask, LV epicardium mask, cavity radii (a_c, b_c)) at contraction c."""
        p, U, V, dz = self.p, self.U, self.V, self.dz
        kr, kl = 1.0 - (1.0 - self.kr_es) * c, 1.0 - (1.0 - self.kl_es) * c
        a_c, b_c, L_c = self.a_c0 * kr, self.b_c0 * kr, self.L_c0 * kl
        a_e, b_e = math.sqrt(a_c**2 + self.myo_a2), math.sqrt(b_c**2 + self.myo_b2)
        L_e = L_c + p["apex_wall"] * (1.0 + 0.3 * c)
        cav = ((U / a_c) ** 2 + (V / b_c) ** 2 + (dz / L_c) ** 2 <= 1.0) & self.below_base
        epi = ((U / a_e) ** 2 + (V / b_e) ** 2 + (dz / L_e) ** 2 <= 1.0) & self.below_base
        return cav, epi, (a_c, b_c)

    def rv(self, c, extra=0.0):
        """The RV (cavity, or grown by ``extra`` mm) at contraction c."""
        p = self.p
        shrink = 1.0 - 0.8 * p["rv_ef"] * c
        r_rad = p["rv_radial"] * shrink + extra
        r_tan = p["rv_tangential"] * (1.0 - 0.1 * c) + extra
        L = self.L_rv * (1.0 - 0.05 * c) + extra
        return ((self.R_rad / r_rad) ** 2 + (self.R_tan / r_tan) ** 2 + (self.dz / L) ** 2 <= 1.0) & self.below_base

    def envelope(self, shape):
        """(inner, outer) heart envelopes at ED size, atria included, and the atria above the
        base plane (unlabelled in ACDC: only visible when the stack extends there)."""
        p, U, V, dz = self.p, self.U, self.V, self.dz
        env_in = np.zeros(shape, dtype=bool)
        env_out = np.zeros(shape, dtype=bool)
        for grow, dst in ((3.0, env_in), (6.0, env_out)):
            lv_big = ((U / (self.a_e0 + grow)) ** 2 + (V / (self.b_e0 + grow)) ** 2
                      + (dz / (self.L_c0 + p["apex_wall"] + grow)) ** 2 <= 1.0) & self.below_base
            dst |= lv_big | self.rv(0.0, extra=3.0 + grow)
        atria = ((U + 8.0) / 32.0) ** 2 + (V / 24.0) ** 2 + ((dz + 16.0) / 16.0) ** 2 <= 1.0
        env_in |= ((U + 8.0) / 35.0) ** 2 + (V / 27.0) ** 2 + ((dz + 16.0) / 19.0) ** 2 <= 1.0
        env_out |= ((U + 8.0) / 38.0) ** 2 + (V / 30.0) ** 2 + ((dz + 16.0) / 22.0) ** 2 <= 1.0
        return env_in, env_out, atria


def _cine_torso(p: dict, g: _Grid):
    """In-plane body outline, its muscle layer and thoracic cavity, and the 2D signal of
    fat / muscle / mediastinum. Returns (body, cavity, signal) as (X, Y) arrays."""
    inten = _CINE_SIGNAL
    bx, by = p["centre_x"] - 20.0, p["centre_y"] + 40.0
    A, B = p["body_a"], p["body_b"]

    def ell(a, b, ox=bx, oy=by):
        return ((g.X2 - ox) / a) ** 2 + ((g.Y2 - oy) / b) ** 2 <= 1.0

    body = ell(A, B)
    inner = ell(A - p["fat"], B - p["fat"])
    cavity = ell(A - p["fat"] - p["muscle"], B - p["fat"] - p["muscle"])
    bg2 = np.where(body, inten["fat"], inten["air"])
    bg2 = np.where(inner, inten["muscle"], bg2)
    bg2 = np.where(cavity, inten["medi"], bg2).astype(np.float32)
    return body, cavity, bg2


def _cine_background(rng, p: dict, g: _Grid, spacing, heart: _CineHeart) -> np.ndarray:
    """The static (same in every frame) float32 signal around the heart: torso, lungs kept
    off the heart envelope, liver dome, aorta, spine, atria, with lung and tissue texture."""
    inten = _CINE_SIGNAL
    (nx, ny, nz), (sx, sy, _) = g.shape, spacing
    X, Y, Z, X2, Y2 = g.X, g.Y, g.Z, g.X2, g.Y2
    cx, cy = p["centre_x"], p["centre_y"]
    body, cavity, bg2 = _cine_torso(p, g)
    bg = np.repeat(bg2[:, :, None], nz, axis=2)
    # Heart envelope (ED size) keeps the lungs away from the beating heart.
    env_in, env_out, atria = heart.envelope((nx, ny, nz))

    ao_c = (cx - 8.0, cy + 55.0)
    aorta2 = (X2 - ao_c[0]) ** 2 + (Y2 - ao_c[1]) ** 2 <= p["aorta_radius"] ** 2
    spine2 = (X2 - (cx - 22.0)) ** 2 + (Y2 - (cy + 85.0)) ** 2 <= 18.0**2
    lungs2 = ((((X2 - (cx - 60.0)) / 42.0) ** 2 + ((Y2 - (cy + 20.0)) / 70.0) ** 2 <= 1.0)
              | (((X2 - (cx + 50.0)) / 36.0) ** 2 + ((Y2 - (cy + 30.0)) / 62.0) ** 2 <= 1.0))
    near2 = ((X2 - ao_c[0]) ** 2 + (Y2 - ao_c[1]) ** 2 <= (p["aorta_radius"] + 4.0) ** 2) | (
        (X2 - (cx - 22.0)) ** 2 + (Y2 - (cy + 85.0)) ** 2 <= 22.0**2
    )
    lungs = (lungs2 & cavity & ~near2)[:, :, None] & ~env_out
    # Liver rises into the apical slices on the patient's right (diaphragm).
    apex_z = p["base_z"] + heart.L_c0 + p["apex_wall"]
    r_liver = 60.0 * np.clip((Z - (apex_z - 14.0)) / 16.0, 0.0, 1.0)
    liver = ((X - (cx - 45.0)) ** 2 + (Y - (cy + 35.0)) ** 2 <= r_liver**2) & cavity[:, :, None]
    lung_tex = _smooth_noise(rng, (nx, ny, nz), (3.0 / sx, 3.0 / sy, 0)) * 0.02
    vessels = _gaussian_blur(
        (rng.random((nx, ny, nz), dtype=np.float32) < 0.004).astype(np.float32), (1.0 / sx, 1.0 / sy, 0)
    )
    vessels *= 0.6 / max(float(vessels.max()), 1e-6)
    bg = np.where(lungs, inten["lung"] + lung_tex + vessels, bg)
    bg = np.where(liver & ~env_out, inten["liver"], bg)
    cav3 = cavity[:, :, None]
    bg = np.where(env_in & cav3, inten["epifat"], bg)
    bg = np.where(env_out & ~env_in & cav3, inten["medi"], bg)
    bg = np.where(aorta2[:, :, None], inten["blood"], bg)
    bg = np.where((spine2 & body)[:, :, None], inten["bone"], bg)
    bg = np.where(atria & ~heart.below_base & cav3, inten["blood"], bg)
    tissue_tex = _smooth_noise(rng, (nx, ny, nz), (2.0 / sx, 2.0 / sy, 0)) * 0.03
    return np.where(body[:, :, None] & ~lungs, bg + tissue_tex, bg).astype(np.float32)


def _cine_bias_field(p: dict, g: _Grid, spacing) -> np.ndarray:
    """Smooth multiplicative bias field (coil sensitivity), fixed over time; float32."""
    (nx, ny, nz), (sx, sy, sz) = g.shape, spacing
    half = max(nx * sx, ny * sy) / 2.0
    xn, yn, zn = g.X / half, g.Y / half, g.Z / max(nz * sz / 2.0, 1e-6)
    b = p["bias"]
    bias = np.exp(b[0] * xn + b[1] * yn + b[2] * xn**2 + b[3] * yn**2 + b[4] * xn * yn + 0.5 * b[5] * zn)
    return bias.astype(np.float32)


def _cine_frame(rng, p: dict, heart: _CineHeart, bg: np.ndarray, bias: np.ndarray, c: float, blur) -> tuple:
    """One frame at contraction c: (magnitude image float32, ACDC labels uint8)."""
    inten = _CINE_SIGNAL
    U, V = heart.U, heart.V
    cav, epi, (a_c, b_c) = heart.lv(c)
    rv = heart.rv(c)
    rv_wall = heart.rv(c, extra=3.0) & ~rv & ~epi
    rv_cav = rv & ~epi
    myo = epi & ~cav
    lab = np.zeros(bg.shape, dtype=np.uint8)
    lab[rv_cav] = CMR_LABELS["rv_blood_pool"]
    lab[myo] = CMR_LABELS["lv_myocardium"]
    lab[cav] = CMR_LABELS["lv_blood_pool"]
    img = bg.copy()
    img[rv_wall] = inten["myo"]
    img[rv_cav] = inten["blood"]
    img[myo] = inten["myo"]
    img[cav] = inten["blood"]
    r_pap = 2.5 * (1.0 + 0.4 * c)
    for ang in heart.pap_angles:
        pu, pv = 0.6 * a_c * math.cos(ang), 0.6 * b_c * math.sin(ang)
        pap = ((U - pu) ** 2 + (V - pv) ** 2 <= r_pap**2) & heart.pap_z & cav
        img[pap] = inten["myo"] + 0.1
    img = _gaussian_blur(img, blur) * bias
    # Rician magnitude noise: |signal + complex Gaussian noise|.
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * p["noise"]
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * p["noise"]
    return np.sqrt((img + n1) ** 2 + n2**2) * p["scale"], lab


def _lv_volumes(labels: np.ndarray, shape, spacing) -> tuple:
    """(ES frame index, LV blood-pool volume of every frame in ml) from the label maps."""
    (nx, ny, nz), (sx, sy, sz) = shape, spacing
    T = labels.shape[3]
    voxel_ml = sx * sy * sz / 1000.0
    counts = (labels == CMR_LABELS["lv_blood_pool"]).reshape(-1, T).sum(axis=0)
    if counts[0] == 0:
        raise ValueError(
            f"shape/spacing: the field of view {nx * sx:.0f}x{ny * sy:.0f}x{nz * sz:.0f} mm "
            "contains no LV blood pool"
        )
    es0 = int(np.argmin(counts))  # ES by definition: the smallest LV blood pool
    return es0, counts * voxel_ml


def make_cine_phantom(
    seed=0,
    shape: Sequence[int] = (96, 96, 8),
    n_frames: int = 20,
    spacing: Sequence[float] = (1.5, 1.5, 8.0),
) -> CinePhantom:
    """Generate a seeded 4D short-axis cine phantom; see :class:`CinePhantom`.

    shape: (X, Y, Z) voxels; spacing: (sx, sy, sz) mm, slices from base to apex;
    n_frames: T >= 2 frames over one cardiac cycle. The default field of view
    (144 x 144 x 64 mm) holds the whole ventricles; a smaller one crops them.
    """
    (nx, ny, nz), (sx, sy, sz) = _check_geometry(shape, spacing)
    T = int(n_frames)
    if T < 2:
        raise ValueError(f"n_frames: need at least 2 frames, got {n_frames}")
    rng = np.random.default_rng(seed)
    p = _draw_cine_params(rng, T)  # the random draws run in this order: parameters, background, frames
    g = _grid((nx, ny, nz), (sx, sy, sz))
    heart = _CineHeart(p, g)
    c_t = contraction_curve(T, p["es_index_target"])
    bg = _cine_background(rng, p, g, (sx, sy, sz), heart)
    bias = _cine_bias_field(p, g, (sx, sy, sz))

    image = np.empty((nx, ny, nz, T), dtype=np.float32)
    labels = np.zeros((nx, ny, nz, T), dtype=np.uint8)
    blur = (0.8 / sx, 0.8 / sy, 0.0)
    for t in range(T):
        image[..., t], labels[..., t] = _cine_frame(rng, p, heart, bg, bias, float(c_t[t]), blur)

    es0, vols = _lv_volumes(labels, (nx, ny, nz), (sx, sy, sz))
    edv, esv = float(vols[0]), float(vols[es0])
    return CinePhantom(
        image=image,
        labels=labels,
        ed=1,
        es=es0 + 1,
        ejection_fraction=100.0 * (edv - esv) / edv,
        edv_ml=edv,
        esv_ml=esv,
        lv_volumes_ml=vols.astype(np.float64),
        frame_duration=60.0 / p["heart_rate_bpm"] / T,
        affine=phantom_affine((nx, ny, nz), (sx, sy, sz)),
        spacing=(sx, sy, sz),
        seed=seed,
        params=p,
    )


# --------------------------------------------------------------------------- CT


@dataclass
class CTPhantom:
    """A thoracic CT phantom.

    image: (X, Y, Z) float32 HU (air -1000, fat ~-100, soft tissue ~40, lung ~-850,
    bone 400-1000, contrast blood 250-350, myocardium ~100), axial slices, z superior.
    labels: (X, Y, Z) uint8 with :data:`CT_LABELS`. tissue: (X, Y, Z) uint8 with
    :data:`CT_TISSUES` (0 = air outside the body).
    """

    image: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: Any
    params: dict = field(default_factory=dict)


# The anatomy below is laid out for a thorax of about 90 x 65 mm; this factor
# makes scale=1 an adult chest (about 300 x 215 mm).
_ADULT_SCALE = 3.3


def _draw_ct_params(rng, scale: float) -> dict:
    p: dict[str, Any] = {}
    S = float(rng.uniform(0.92, 1.06)) * scale * _ADULT_SCALE
    p["S"] = S
    p["body_a"] = 45.0 * S * float(rng.uniform(0.95, 1.03))
    p["body_b"] = 32.0 * S * float(rng.uniform(0.95, 1.05))
    p["body_centre"] = [float(rng.uniform(-1.5, 1.5)) * S, (2.0 + float(rng.uniform(-1.5, 1.5))) * S]
    p["fat"] = float(rng.uniform(1.2, 3.5)) * S
    p["muscle"] = float(rng.uniform(2.5, 4.0)) * S
    p["z_offset"] = float(rng.uniform(-5, 5)) * S
    p["heart_offset"] = [float(v) * S for v in rng.uniform(-2, 2, size=3)]
    p["heart_rotation_deg"] = float(rng.uniform(-10, 10))
    p["heart_size"] = float(rng.uniform(0.92, 1.08))
    p["aorta_size"] = float(rng.uniform(0.9, 1.1))
    p["hu_fat"] = float(rng.uniform(-110, -85))
    p["hu_muscle"] = float(rng.uniform(35, 55))
    p["hu_mediastinum"] = float(rng.uniform(-80, -40))
    p["hu_liver"] = float(rng.uniform(50, 70))
    p["hu_lung"] = float(rng.uniform(-880, -830))
    p["hu_lung_texture"] = float(rng.uniform(20, 40))
    p["hu_blood_left"] = float(rng.uniform(280, 350))
    p["hu_blood_right"] = max(250.0, p["hu_blood_left"] - float(rng.uniform(0, 50)))
    p["hu_myocardium"] = float(rng.uniform(90, 120))
    p["hu_marrow"] = float(rng.uniform(400, 480))
    p["hu_cortex"] = float(rng.uniform(750, 1000))
    p["hu_rib"] = float(rng.uniform(550, 800))
    p["hu_disc"] = float(rng.uniform(80, 100))
    p["noise_hu"] = float(rng.uniform(8, 20))
    p["rib_period"] = float(rng.uniform(10, 12)) * S
    p["vertebra_period"] = float(rng.uniform(9, 10)) * S
    return p


class _CTCanvas:
    """The CT volume being painted: HU and tissue class per voxel; later paint wins."""

    def __init__(self, shape):
        self.shape = shape
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(shape, dtype=np.uint8)

    def paint(self, mask, value, tis=None):
        """Set ``value`` (a number or a broadcastable array) where ``mask``; the tissue class too if given."""
        m3 = np.broadcast_to(mask, self.shape)
        self.hu[m3] = value if np.isscalar(value) else np.broadcast_to(value, self.shape)[m3]
        if tis is not None:
            self.tissue[m3] = tis


class _CTHeart:
    """Heart geometry: heart-local offsets (in units of the heart size) rotated about z, then
    placed; the chamber masks lv_epi, lv_cav, rv_all, rv_wall, la, ra (no painting)."""

    def __init__(self, p: dict, g: _Grid):
        S, (bx, by), zo = p["S"], p["body_centre"], p["z_offset"]
        X, Y, Z = g.X, g.Y, g.Z
        self.hs = hs = p["heart_size"] * S
        self.hx = bx + 4.0 * S + p["heart_offset"][0]
        self.hy = by - 7.0 * S + p["heart_offset"][1]
        self.hz = -8.0 * S + zo + p["heart_offset"][2]
        al = math.radians(p["heart_rotation_deg"])
        self.rot = np.array([[math.cos(al), -math.sin(al), 0], [math.sin(al), math.cos(al), 0], [0, 0, 1]])

        self.lv_c = lv_c = self.place((6, 1, -3))
        self.dL = dL = self.direction((0.5, -0.45, -0.74))
        self.lv_epi = _spheroid(X, Y, Z, lv_c, dL, 20 * hs, 12.5 * hs) <= 1
        self.lv_cav = _spheroid(X, Y, Z, lv_c - 1.5 * hs * dL, dL, 16 * hs, 8 * hs) <= 1
        self.rv_c = rv_c = self.place((6 - 10, 1 - 6, -3 + 1))
        self.dR = dR = self.direction((0.35, -0.55, -0.75))
        self.rv_all = _spheroid(X, Y, Z, rv_c, dR, 17 * hs, 9.5 * hs) <= 1
        self.rv_wall = (_spheroid(X, Y, Z, rv_c, dR, 18.2 * hs, 10.7 * hs) <= 1) & ~self.rv_all & ~self.lv_epi
        self.la = _spheroid(X, Y, Z, self.place((6 - 3, 1 + 12, -3 + 11)), self.direction((1, 0, 0)),
                            9 * hs, 6.5 * hs) <= 1
        self.ra = _spheroid(X, Y, Z, self.place((6 - 17, 1 + 2, -3 + 7)), self.direction((0, 0, 1)),
                            10 * hs, 7.5 * hs) <= 1

    def place(self, offset):
        return np.array([self.hx, self.hy, self.hz]) + self.rot @ (np.asarray(offset, dtype=np.float64) * self.hs)

    def direction(self, v):
        return self.rot @ _unit(v)

    def envelope(self, g: _Grid):
        """The heart grown by a few mm, atria included: kept free of lung."""
        X, Y, Z, hs = g.X, g.Y, g.Z, self.hs
        return (
            (_spheroid(X, Y, Z, self.lv_c, self.dL, 23 * hs, 15.5 * hs) <= 1)
            | (_spheroid(X, Y, Z, self.rv_c, self.dR, 21 * hs, 13.5 * hs) <= 1)
            | (_spheroid(X, Y, Z, self.place((3, 13, 8)), self.direction((1, 0, 0)), 12 * hs, 9.5 * hs) <= 1)
            | (_spheroid(X, Y, Z, self.place((-11, 3, 4)), self.direction((0, 0, 1)), 13 * hs, 10.5 * hs) <= 1)
        )


def _ct_torso(p: dict, g: _Grid, canvas: _CTCanvas) -> tuple:
    """Paint subcutaneous fat, the muscle layer and the mediastinum; returns the in-plane
    (body, inside the fat, thoracic cavity) masks, (X, Y) each."""
    (bx, by), a, b, f, m = p["body_centre"], p["body_a"], p["body_b"], p["fat"], p["muscle"]

    def ell2(ra, rb, ox=bx, oy=by):
        return ((g.X2 - ox) / ra) ** 2 + ((g.Y2 - oy) / rb) ** 2 <= 1.0

    body2 = ell2(a, b)
    inner2 = ell2(a - f, b - f)
    cav2 = ell2(a - f - m, b - f - m)
    canvas.paint(body2[:, :, None], p["hu_fat"], CT_TISSUES["body"])
    canvas.paint(inner2[:, :, None], p["hu_muscle"])
    canvas.paint(cav2[:, :, None], p["hu_mediastinum"])
    return body2, inner2, cav2


def _ct_spine(p: dict, g: _Grid, inner2) -> dict:
    """Spine geometry (global, follows the body): vertebral body y ``y_vb`` and masks (no painting)."""
    S, (bx, by), b, zo = p["S"], p["body_centre"], p["body_b"], p["z_offset"]
    X2, Y2 = g.X2, g.Y2
    y_vb = by + b - 17.0 * S
    canal_y = y_vb + 8.7 * S
    vb2 = ((X2 - bx) / (6.5 * S)) ** 2 + ((Y2 - y_vb) / (5.5 * S)) ** 2 <= 1
    vb_core2 = ((X2 - bx) / (6.5 * S - 0.9)) ** 2 + ((Y2 - y_vb) / (5.5 * S - 0.9)) ** 2 <= 1
    rc = np.hypot(X2 - bx, Y2 - canal_y)
    arch2 = (rc >= 2.6 * S) & (rc <= 4.4 * S) & (Y2 >= canal_y - 1.5 * S)
    spinous2 = (np.abs(X2 - bx) <= 1.2 * S) & (Y2 >= canal_y) & (Y2 <= y_vb + 15.0 * S)
    transverse2 = (np.abs(X2 - bx) <= 9.0 * S) & (np.abs(Y2 - canal_y + 1.0 * S) <= 1.3 * S)
    return {"y_vb": y_vb, "vb2": vb2, "vb_core2": vb_core2,
            "posterior2": (arch2 | spinous2 | transverse2) & inner2,
            "disc": ((g.Z - zo) % p["vertebra_period"]) < 1.6 * S}


def _ct_aorta(p: dict, g: _Grid, heart: _CTHeart, y_vb: float) -> tuple:
    """Ascending aorta, arch and descending aorta beside the spine as a tube: (aorta, the tube
    grown by 2 S mm, the top of the ascending aorta (mm))."""
    S, (bx, _) = p["S"], p["body_centre"]
    ao = p["aorta_size"]
    desc_xy = (bx + 7.5 * S, y_vb - 8.0 * S)
    root = heart.place((6 - 5, 1 + 3, -3 + 9))
    asc_top = root + np.array([-2.0, -3.0, 14.0]) * heart.hs
    arch_end = np.array([desc_xy[0], desc_xy[1], asc_top[2] - 2.0 * S])
    ctrl = np.array([desc_xy[0] + 4.0 * S, 0.5 * (asc_top[1] + desc_xy[1]) - 4.0 * S, asc_top[2] + 14.0 * S])
    arch_pts = _bezier(asc_top, ctrl, arch_end, 12)
    desc_end = np.array([desc_xy[0], desc_xy[1], g.z[0] - 20.0])
    ao_pts = np.vstack([root, asc_top, arch_pts[1:], desc_end])
    ao_r = np.concatenate([[4.5, 4.5], np.linspace(4.5, 3.8, len(arch_pts) - 1), [3.6]]) * S * ao
    coords = (g.x, g.y, g.z)
    return _tube(g.shape, coords, ao_pts, ao_r), _tube(g.shape, coords, ao_pts, ao_r + 2.0 * S), asc_top


def _ct_airways(p: dict, g: _Grid, y_vb: float, asc_top) -> tuple:
    """(trachea, main bronchi) masks: the trachea down to the carina below the arch."""
    S, (bx, _) = p["S"], p["body_centre"]
    coords = (g.x, g.y, g.z)
    tr_xy = (bx - 1.0 * S, y_vb - 10.0 * S)
    carina = np.array([tr_xy[0], tr_xy[1], asc_top[2] + 2.0 * S])
    trachea = _tube(g.shape, coords, [[tr_xy[0], tr_xy[1], g.z[-1] + 20.0], carina], [4.0 * S, 4.0 * S])
    bronchi = np.zeros(g.shape, dtype=bool)
    for side in (-1, 1):
        end = carina + np.array([side * 13.0, 3.0, -14.0]) * S
        bronchi |= _tube(g.shape, coords, [carina, end], [2.8 * S, 2.4 * S])
    return trachea, bronchi


def _ct_lungs(rng, p: dict, g: _Grid, spacing, canvas: _CTCanvas, heart: _CTHeart, cav2, y_vb: float,
              aorta_near, trachea) -> None:
    """Paint the abdomen below the diaphragm dome, the textured lungs (ellipsoids inside the
    thoracic cavity, above the dome, clear of the heart, great vessels and spine) and the
    fat around the heart."""
    S, (bx, by), zo = p["S"], p["body_centre"], p["z_offset"]
    a, b, f, m = p["body_a"], p["body_b"], p["fat"], p["muscle"]
    X, Y, Z, X2, Y2 = g.X, g.Y, g.Z, g.X2, g.Y2
    sx, sy, sz = spacing
    zl = 12.0 * S + zo
    lungs = (
        (((X - (bx - 20 * S)) / (17 * S)) ** 2 + ((Y - (by + 3 * S)) / (24 * S)) ** 2 + ((Z - zl) / (58 * S)) ** 2 <= 1)
        | (((X - (bx + 21 * S)) / (16 * S)) ** 2 + ((Y - (by + 4 * S)) / (23 * S)) ** 2 + ((Z - zl) / (56 * S)) ** 2 <= 1)
    )
    heart_env = heart.envelope(g)
    spine_zone2 = ((X2 - bx) / (11.0 * S)) ** 2 + ((Y2 - (y_vb + 4.0 * S)) / (12.0 * S)) ** 2 <= 1
    rdome = ((X2 - bx) / (a - f - m)) ** 2 + 0.5 * ((Y2 - by) / (b - f - m)) ** 2
    # Dome shape, the right hemidiaphragm (x < 0) a little higher; the logistic step
    # keeps the surface smooth across the midline.
    right = 1.0 / (1.0 + np.exp((X2 - bx) / (6.0 * S)))
    # The posterior recesses reach lower than the anterior dome.
    z_dome = heart.hz - 20.0 * S - 16.0 * S * rdome + 5.0 * S * right - 6.0 * S * (Y2 - by) / (b - f - m)
    abdomen = cav2[:, :, None] & (Z < z_dome[:, :, None])
    lungs &= cav2[:, :, None] & ~abdomen & ~heart_env & ~aorta_near & ~spine_zone2[:, :, None] & ~trachea
    canvas.paint(abdomen, p["hu_liver"])
    lung_tex = _smooth_noise(rng, g.shape, (1.5 / sx, 1.5 / sy, 1.5 / sz)) * p["hu_lung_texture"]
    imp = (rng.random(g.shape, dtype=np.float32) < 0.0015).astype(np.float32)
    vessels = _gaussian_blur(imp, (0.8 / sx, 0.8 / sy, 0.8 / sz))
    vessels *= 500.0 / max(float(vessels.max()), 1e-6)
    canvas.paint(lungs, p["hu_lung"] + lung_tex + vessels, CT_TISSUES["lung"])
    canvas.paint(heart_env & cav2[:, :, None] & ~lungs, p["hu_fat"])


def _ct_bones(p: dict, g: _Grid, canvas: _CTCanvas, spine: dict, heart: _CTHeart) -> None:
    """Paint the vertebrae (cortex, marrow, discs), posterior elements, ribs and sternum."""
    S, (bx, by), zo = p["S"], p["body_centre"], p["z_offset"]
    a, b, f, m = p["body_a"], p["body_b"], p["fat"], p["muscle"]
    Z, X2, Y2, nz = g.Z, g.X2, g.Y2, g.shape[2]
    paint, disc = canvas.paint, spine["disc"]
    vb = spine["vb2"][:, :, None] & np.ones((1, 1, nz), dtype=bool)
    paint(vb, p["hu_cortex"], CT_TISSUES["bone"])
    paint(spine["vb_core2"][:, :, None] & ~disc, p["hu_marrow"])
    paint(vb & disc, p["hu_disc"], CT_TISSUES["body"])
    paint(spine["posterior2"][:, :, None], 0.5 * (p["hu_marrow"] + p["hu_cortex"]), CT_TISSUES["bone"])
    ra_, rb_ = a - f - 0.5 * m, b - f - 0.5 * m
    om = np.arctan2(Y2 - by, X2 - bx)
    ring_r = 1.0 / np.sqrt((np.cos(om) / ra_) ** 2 + (np.sin(om) / rb_) ** 2)
    band2 = np.abs(np.hypot(X2 - bx, Y2 - by) - ring_r) <= 1.3 * S
    band2 &= (np.sin(om) > -0.93) & (np.sin(om) < 0.98)  # anterior cartilage gap, spine
    drop = 18.0 * S * (1.0 - np.sin(om)) / 2.0  # ribs descend from back to front
    z_top = 62.0 * S + zo
    u = (Z + drop[:, :, None] - z_top) / p["rib_period"]
    k = np.rint(u)
    ribs = band2[:, :, None] & (np.abs(u - k) * p["rib_period"] <= 1.6 * S) & (k <= 0) & (k >= -11)
    paint(ribs, p["hu_rib"], CT_TISSUES["bone"])
    st_y = by - (b - f - 0.5 * m)
    st_z = (Z >= heart.hz - 25.0 * S) & (Z <= heart.hz + 55.0 * S)
    st_out2 = ((X2 - bx) / (5.0 * S)) ** 2 + ((Y2 - st_y) / (2.2 * S)) ** 2 <= 1
    st_in2 = ((X2 - bx) / (5.0 * S - 0.8)) ** 2 + ((Y2 - st_y) / max(2.2 * S - 0.8, 0.3)) ** 2 <= 1
    paint(st_out2[:, :, None] & st_z, p["hu_cortex"], CT_TISSUES["bone"])
    paint(st_in2[:, :, None] & st_z, p["hu_marrow"])


def _ct_cardiac_labels(p: dict, canvas: _CTCanvas, heart: _CTHeart, aorta) -> np.ndarray:
    """Paint the labelled cardiac structures (later ones win) and the RV wall; returns the labels."""
    labels = np.zeros(canvas.shape, dtype=np.uint8)
    blood_l, blood_r, myo_hu = p["hu_blood_left"], p["hu_blood_right"], p["hu_myocardium"]
    for mask, name, value in (
        (heart.la, "left_atrium", blood_l),
        (heart.ra, "right_atrium", blood_r),
        (aorta, "aorta", blood_l),
        (heart.rv_all & ~heart.lv_epi, "right_ventricle", blood_r),
        (heart.lv_epi, "myocardium", myo_hu),
        (heart.lv_cav, "left_ventricle", blood_l),
    ):
        labels[mask] = CT_LABELS[name]
        canvas.paint(mask, value, CT_TISSUES["body"])
    canvas.paint(heart.rv_wall & (labels == 0), myo_hu, CT_TISSUES["body"])
    return labels


def make_ct_phantom(
    seed=0,
    shape: Sequence[int] = (128, 128, 64),
    spacing: Sequence[float] = (2.8, 2.8, 4.0),
    scale: float = 1.0,
) -> CTPhantom:
    """Generate a seeded thoracic CT phantom with cardiac labels; see :class:`CTPhantom`.

    shape: (X, Y, Z) voxels, spacing: (sx, sy, sz) mm, axial slices with z superior.
    The thorax is adult-sized, about 300 x 215 mm in-plane (x ``scale``), which fits the
    default 358 x 358 x 256 mm field of view (128 x 128 x 64 voxels of 2.8 x 2.8 x 4 mm;
    for a real-CT spacing such as 0.7 x 0.7 x 2.5 mm use 512 x 512 x 104 voxels).
    Anatomy is defined in mm, so another spacing with the same field of view gives
    the same anatomy sampled differently.
    """
    (nx, ny, nz), (sx, sy, sz) = _check_geometry(shape, spacing)
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale: must be a positive number, got {scale!r}")
    rng = np.random.default_rng(seed)
    p = _draw_ct_params(rng, float(scale))  # the random draws run in this order: parameters, lungs, noise
    shp = (nx, ny, nz)
    # float32 grids halve the peak memory of the many full-volume masks below.
    g = _grid(shp, (sx, sy, sz), np.float32)
    canvas = _CTCanvas(shp)

    body2, inner2, cav2 = _ct_torso(p, g, canvas)
    heart = _CTHeart(p, g)
    spine = _ct_spine(p, g, inner2)
    aorta, aorta_near, asc_top = _ct_aorta(p, g, heart, spine["y_vb"])
    trachea, bronchi = _ct_airways(p, g, spine["y_vb"], asc_top)
    _ct_lungs(rng, p, g, (sx, sy, sz), canvas, heart, cav2, spine["y_vb"], aorta_near, trachea)
    _ct_bones(p, g, canvas, spine, heart)
    canvas.paint(trachea | bronchi, -990.0, CT_TISSUES["lung"])
    labels = _ct_cardiac_labels(p, canvas, heart, aorta)
    # Outside the body everything is air, whatever the geometry above produced.
    outside = ~body2[:, :, None] & np.ones((1, 1, nz), dtype=bool)
    labels[outside] = 0
    canvas.tissue[outside] = 0
    canvas.hu[outside] = -1000.0

    # Partial volume, then spatially correlated noise (CT noise is not white).
    img = _gaussian_blur(canvas.hu, (0.5 / sx, 0.5 / sy, 0.8 / sz))
    noise = _smooth_noise(rng, shp, (0.6, 0.6, 0.0)) * p["noise_hu"]
    img = np.clip(img + noise, -1024.0, 3071.0).astype(np.float32)
    return CTPhantom(
        image=img,
        labels=labels,
        tissue=canvas.tissue,
        affine=phantom_affine(shp, (sx, sy, sz)),
        spacing=(sx, sy, sz),
        seed=seed,
        params=p,
    )


# --------------------------------------------------------------------------- writers


def _progress(iterable, total: int, desc: str, quiet: bool):
    if quiet:
        return iterable
    try:  # tqdm is optional: the data package must import with numpy + nibabel only
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="subject")


def _check_n(n) -> int:
    try:
        n = int(n)
    except (TypeError, ValueError) as e:
        raise ValueError(f"n: expected a positive integer, got {n!r}") from e
    if n < 1:
        raise ValueError(f"n: expected a positive integer, got {n}")
    return n


def write_acdc_dataset(out_dir: PathLike, n: int, seed: int = 0, quiet: bool = False, **phantom_kwargs) -> dict:
    """Write ``n`` cine phantoms in the public ACDC layout; returns the manifest dict.

    out_dir/patientNNN/ (NNN = 001..n) holds patientNNN_4d.nii.gz ((X,Y,Z,T) float32),
    Info.cfg (ED, ES, Group, Height, NbFrame, Weight), and for the ED and ES frames
    patientNNN_frameEE.nii.gz ((X,Y,Z) float32) and patientNNN_frameEE_gt.nii.gz
    (uint8 labels), EE the 1-based frame number with 2 digits. Subject i uses
    ``subject_seed(seed, i)``. out_dir/dataset.json lists parameters and per-subject
    seed, ED, ES, EF. phantom_kwargs go to :func:`make_cine_phantom`.
    """
    n = _check_n(n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subjects = []
    for i in _progress(range(1, n + 1), n, "cmr4d phantoms", quiet):
        s = subject_seed(seed, i)
        ph = make_cine_phantom(s, **phantom_kwargs)
        name = f"patient{i:03d}"
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        write_volume(d / f"{name}_4d.nii.gz", ph.image, ph.affine, kind="mr", frame_duration=ph.frame_duration)
        for frame in (ph.ed, ph.es):
            write_volume(d / f"{name}_frame{frame:02d}.nii.gz", ph.image[..., frame - 1], ph.affine, kind="mr")
            write_volume(d / f"{name}_frame{frame:02d}_gt.nii.gz", ph.labels[..., frame - 1], ph.affine, kind="label")
        with atomic_path(d / "Info.cfg") as tmp:
            tmp.write_text(ph.info_cfg(), encoding="utf-8")
        subjects.append({
            "name": name,
            "seed": s,
            "ed": ph.ed,
            "es": ph.es,
            "n_frames": ph.n_frames,
            "ejection_fraction": round(ph.ejection_fraction, 3),
            "edv_ml": round(ph.edv_ml, 3),
            "esv_ml": round(ph.esv_ml, 3),
            "frame_duration_s": ph.frame_duration,
            "group": ph.params["group"],
            "height_cm": ph.params["height_cm"],
            "weight_kg": ph.params["weight_kg"],
        })
    return _write_manifest(out, {"format": "acdc"}, "make_cine_phantom", n, seed, phantom_kwargs, CMR_LABELS,
                           subjects)


def write_ct_dataset(out_dir: PathLike, n: int, seed: int = 0, quiet: bool = False, **phantom_kwargs) -> dict:
    """Write ``n`` CT phantoms; returns the manifest dict.

    out_dir/images/ct_NNN.nii.gz (int16 HU) and out_dir/masks/ct_NNN.nii.gz (uint8
    :data:`CT_LABELS`), NNN = 001..n, subject i seeded with ``subject_seed(seed, i)``;
    out_dir/dataset.json lists parameters and seeds. phantom_kwargs go to
    :func:`make_ct_phantom`.
    """
    n = _check_n(n)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    subjects = []
    for i in _progress(range(1, n + 1), n, "ct phantoms", quiet):
        s = subject_seed(seed, i)
        ph = make_ct_phantom(s, **phantom_kwargs)
        name = f"ct_{i:03d}"
        write_volume(out / "images" / f"{name}.nii.gz", ph.image, ph.affine, kind="ct")
        write_volume(out / "masks" / f"{name}.nii.gz", ph.labels, ph.affine, kind="label")
        subjects.append({"name": name, "seed": s, "scale": ph.params["S"]})
    return _write_manifest(out, {"format": "volume_folder", "kind": "ct"}, "make_ct_phantom", n, seed,
                           phantom_kwargs, CT_LABELS, subjects)


def _write_manifest(out: Path, layout: dict, generator: str, n: int, seed, phantom_kwargs: dict, labels: dict,
                    subjects: list) -> dict:
    """dataset.json of a written phantom set (layout, generator, seeds, labels, subjects); returns it."""
    manifest = {
        **layout,
        "generator": f"medgen_rt.data.phantoms.{generator}",
        "n": n,
        "seed": int(seed),
        "seed_rule": "subject i (1-based) uses numpy SeedSequence([seed, i]).generate_state(1)[0]",
        "phantom_kwargs": phantom_kwargs,
        "labels": labels,
        "subjects": subjects,
    }
    write_json_atomic(out / "dataset.json", manifest)
    return to_jsonable(manifest)
