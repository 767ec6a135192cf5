"""Quality metrics of synthetic volumes, each a plain function of arrays.

Image metrics take intensities in [0, 1] (``datasets.to_display01``). The slice axis is
the third array axis (Z) for CT and cine; cine frames are the fourth (T).

* MS-SSIM diversity: mean MS-SSIM (MONAI's MultiScaleSSIMMetric) over pairs of volumes
  of one set; lower = more diverse. Scales and kernel shrink to fit small volumes.
* FID: Frechet distance between Gaussians fitted to two feature sets.
* MMD: unbiased squared maximum mean discrepancy, Gaussian kernel, median-heuristic bandwidth.
* Inter-slice consistency of adjacent slices S_k, S_k+1: MAD = mean |S_k - S_k+1|,
  NMAD = MAD / mean intensity of the two slices, Pearson r of their voxels; the
  distributions are compared with the 1-D Wasserstein distance.
* Temporal smoothness (cine): mean |F_t+1 - F_t| per step, and cycle closure
  mean |F_T-1 - F_0| (last frame vs first; about one step for a closed cycle); in quality
  reports after an in-plane Gaussian, so that voxel noise does not count as motion.
* Cardiac function: LV blood-pool volumes (ml) at ED and ES, EF = 100 (EDV - ESV) / EDV.
* Mask adherence, CT: Dice between the label groups of a conditioning map (blood =
  aorta, atria, ventricles; myocardium) and a segmentation of the volume by HU ranges
  near the map's heart. MR: Dice per structure between a mask and an intensity
  segmentation learned from real (image, mask) pairs.
* Realism rows: a volume in [0, 1] area-averaged onto a small common grid and band-passed
  in-plane, one row per volume for the nearest-neighbour realism figure
  (``memorization.nn_realism``).
* Local realism: every structured in-plane patch of a volume against its best match among
  all patches of the real volumes, at any position (``patch_table``, ``local_realism``).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_settings", "ms_ssim", "ms_ssim_diversity", "frechet_distance", "mmd_rbf",
           "wasserstein_1d", "shrink_for_ssim", "interslice", "temporal", "lv_volume_ml", "ejection_fraction",
           "cardiac_function", "dice", "IntensityModel", "dilate", "segment_by_intensity", "mask_adherence", "describe",
           "CT_GROUPS", "CT_HU_RANGES", "CT_REGION_RADIUS", "segment_ct_hu", "ct_mask_adherence", "realism_grid",
           "realism_row", "REALISM_BAND_SIGMAS", "TEMPORAL_DENOISE_SIGMA", "PATCH_SIDE", "patch_table", "local_realism"]

# Wang et al. 2003, the weights MONAI uses by default.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def describe(values) -> dict:
    """n, mean, std, min, median, max of the finite values (n = 0 and nothing else if none)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "median": float(np.median(a)), "max": float(a.max())}


# --------------------------------------------------------------------------- MS-SSIM


def ms_ssim_settings(spatial_shape: Sequence[int], max_kernel: int = 11) -> dict:
    """Kernel size per axis and scale weights that fit ``spatial_shape``.

    MONAI needs, per axis, ``size // (n_scales - 1)**2 > kernel - 1``, and after
    n_scales - 1 halvings the image must still hold a kernel. The most scales (<= 5) for
    which every axis holds an odd kernel >= 3 are used; the kernel is the largest odd
    size <= ``max_kernel`` that fits; the first n standard weights are renormalised to sum 1.
    """
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        div = max(1, n - 1) ** 2
        ks = []
        for s in spatial_shape:
            k = min(max_kernel, s // div, s // 2 ** (n - 1))
            k = k if k % 2 else k - 1
            if s // div <= k - 1:
                k -= 2
            ks.append(k)
        if all(k >= 3 for k in ks):
            w = np.asarray(MS_SSIM_WEIGHTS[:n], dtype=np.float64)
            return {"kernel_size": ks, "weights": [float(v) for v in w / w.sum()], "scales": n}
    raise ValueError(f"volume: shape {tuple(spatial_shape)} is too small for SSIM (every axis needs >= 3 voxels)")


def ms_ssim(a: np.ndarray, b: np.ndarray, spatial_dims: int, settings: Optional[dict] = None,
            data_range: float = 1.0) -> float:
    """MS-SSIM between two images in [0, data_range] of shape (N, *spatial) (N images
    compared pairwise and averaged: e.g. the frames of a cine). MONAI's metric."""
    from monai.metrics import MultiScaleSSIMMetric

    ta = torch.as_tensor(np.asarray(a, dtype=np.float32))[:, None]
    tb = torch.as_tensor(np.asarray(b, dtype=np.float32))[:, None]
    settings = settings or ms_ssim_settings(ta.shape[2:])
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=data_range,
                                  kernel_size=settings["kernel_size"], weights=settings["weights"])
    return float(metric(ta, tb).mean())


def _as_images(vol01: np.ndarray) -> tuple:
    """3D volumes -> (1, X, Y, Z) for 3D MS-SSIM; cine (X,Y,Z,T) -> (Z*T, X, Y) slices for
    2D MS-SSIM (cine stacks have few, thick slices)."""
    v = np.asarray(vol01, dtype=np.float32)
    if v.ndim == 3:
        return v[None], 3
    return np.moveaxis(v, (2, 3), (0, 1)).reshape(-1, v.shape[0], v.shape[1]), 2


def shrink_for_ssim(vol01: np.ndarray, max_side: int = 128) -> np.ndarray:
    """Average-pool the spatial axes (X, Y, Z) by one integer factor so none exceeds
    ``max_side`` (a 512 x 512 x 256 CT becomes 128 x 128 x 64): MONAI's 3D MS-SSIM
    convolves with a full 11^3 kernel, minutes per pair at full size on a CPU."""
    v = np.asarray(vol01, dtype=np.float32)
    f = int(math.ceil(max(v.shape[:3]) / max_side))
    if f <= 1:
        return v
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, 3, 0) if v.ndim == 4 else v[None]))
    t = torch.nn.functional.avg_pool3d(t[:, None], kernel_size=f, ceil_mode=True)[:, 0]
    return np.moveaxis(t.numpy(), 0, 3) if v.ndim == 4 else t[0].numpy()


def ms_ssim_diversity(volumes: Sequence[np.ndarray], max_pairs: int = 50, seed: int = 0) -> dict:
    """Mean MS-SSIM over pairs of volumes of one set (all pairs, or ``max_pairs`` drawn
    at random). Lower means more diverse; a set of copies of one volume gives 1."""
    n = len(volumes)
    if n < 2:
        return {"n_pairs": 0, "note": "needs at least 2 volumes"}
    shape = np.asarray(volumes[0]).shape
    for v in volumes:
        if np.asarray(v).shape != shape:
            raise ValueError(f"volumes: MS-SSIM needs equal shapes, got {shape} and {np.asarray(v).shape}")
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    images = [_as_images(v) for v in volumes]
    dims = images[0][1]
    settings = ms_ssim_settings(images[0][0].shape[1:])
    values = [ms_ssim(images[i][0], images[j][0], dims, settings) for i, j in pairs]
    return {**describe(values), "n_pairs": len(pairs), "spatial_dims": dims, **settings,
            "values": [float(v) for v in values]}


# --------------------------------------------------------------------------- distributions


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FID between feature sets x (N, D) and y (M, D): |mu_x - mu_y|^2 + tr(Sx + Sy - 2 (Sx Sy)^1/2).

    The trace of the matrix square root is computed as the sum of the square roots of the
    eigenvalues of Sx^1/2 Sy Sx^1/2 (symmetric, so eigh is stable). MONAI's FIDMetric
    needs scipy.linalg.sqrtm, and scipy is not a dependency.
    Covariances with ddof = 1; needs N, M >= 2.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features: expected (N, D) and (M, D), got {x.shape} and {y.shape}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("features: FID needs at least 2 volumes in each set")
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    w, v = np.linalg.eigh(sx)
    root_sx = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_sx @ sy @ root_sx
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2.0 * tr_sqrt)


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: Optional[float] = None) -> dict:
    """Unbiased MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)).

    bandwidth: default the median pairwise distance of the pooled features. Returns
    dict(mmd2, bandwidth). Needs N, M >= 2. (MONAI's MMDMetric compares two image batches
    voxel by voxel with a linear kernel; here two sets of feature vectors are compared.)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("features: MMD needs at least 2 volumes in each set")
    z = np.concatenate([x, y])
    sq = (z * z).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0, None)
    if bandwidth is None:
        off = d2[np.triu_indices(n + m, 1)]
        bandwidth = float(np.sqrt(np.median(off))) if off.size else 1.0
        bandwidth = bandwidth if bandwidth > 0 else 1.0
    k = np.exp(-d2 / (2.0 * bandwidth ** 2))
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    mmd2 = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2.0 * kxy.mean())
    return {"mmd2": float(mmd2), "bandwidth": float(bandwidth)}


def wasserstein_1d(u, v) -> float:
    """W1 between two empirical distributions: the integral of |F_u - F_v| over x (what
    scipy.stats.wasserstein_distance computes; scipy is not a dependency)."""
    u = np.sort(np.asarray(u, dtype=np.float64).ravel())
    v = np.sort(np.asarray(v, dtype=np.float64).ravel())
    u, v = u[np.isfinite(u)], v[np.isfinite(v)]
    if u.size == 0 or v.size == 0:
        return float("nan")
    allv = np.sort(np.concatenate([u, v]))
    deltas = np.diff(allv)
    cu = np.searchsorted(u, allv[:-1], side="right") / u.size
    cv = np.searchsorted(v, allv[:-1], side="right") / v.size
    return float(np.sum(np.abs(cu - cv) * deltas))


# --------------------------------------------------------------------------- slices and frames


def interslice(vol01: np.ndarray) -> dict:
    """Adjacent-slice statistics along Z of a volume (X,Y,Z) or every frame of a cine.

    Returns arrays with one value per adjacent pair (per frame): mad, nmad, pearson.
    NMAD is NaN where both slices are 0; Pearson r is NaN where a slice is constant.
    """
    v = np.asarray(vol01)
    if v.ndim == 3:
        v = v[..., None]
    if v.shape[2] < 2:
        raise ValueError(f"volume: inter-slice statistics need at least 2 slices, got shape {v.shape}")
    mad, nmad, r = [], [], []
    for t in range(v.shape[3]):  # one frame at a time, one slice pair at a time: no volume-sized copies
        for k in range(v.shape[2] - 1):
            a = v[:, :, k, t].astype(np.float64).ravel()
            b = v[:, :, k + 1, t].astype(np.float64).ravel()
            m = float(np.abs(a - b).mean())
            level = 0.5 * (float(np.abs(a).mean()) + float(np.abs(b).mean()))
            ac, bc = a - a.mean(), b - b.mean()
            den = math.sqrt(float((ac * ac).sum()) * float((bc * bc).sum()))
            mad.append(m)
            nmad.append(m / level if level > 0 else float("nan"))
            r.append(float((ac * bc).sum()) / den if den > 0 else float("nan"))
    return {"mad": np.array(mad), "nmad": np.array(nmad), "pearson": np.array(r)}


# In-plane Gaussian (voxels) applied before the frame-to-frame change in quality reports:
# the phantoms' independent voxel noise alone made a real cine's mean step 0.030 against 0.011
# denoised, so samples decoded by a VQ-GAN (no noise) seemed to move half as much as they did.
TEMPORAL_DENOISE_SIGMA = 1.0


def temporal(vol01: np.ndarray, denoise_sigma: float = 0.0) -> dict:
    """Frame-to-frame change of a cine (X,Y,Z,T) in [0, 1], after an in-plane Gaussian of
    ``denoise_sigma`` voxels (0: none).

    steps: mean |F_t+1 - F_t| for t = 0..T-2; step_mean, step_max; closure: mean
    |F_T-1 - F_0|; closure_ratio = closure / step_mean (about 1 when the cycle closes).
    motion: the change that is motion, not noise: with D1 and D2 the mean squared change over
    one and two frames, independent noise adds the same 2 sigma^2 to both and a steady motion
    of m per frame gives D2 - D1 = 3 m^2, so m = sqrt((D2 - D1) / 3); reported per cycle (T m)
    so that cines with other frame counts compare (NaN below 3 frames). The blur alone leaves
    most of step_mean to the phantoms' noise: 0.0138 per frame with it, 0.0040 without.
    """
    v = np.asarray(vol01, dtype=np.float64)
    if v.ndim != 4 or v.shape[3] < 2:
        raise ValueError(f"volume: temporal smoothness needs a cine (X,Y,Z,T>=2), got shape {v.shape}")
    if denoise_sigma > 0:
        from .degrade import as_batch, from_batch, gaussian_blur

        v = from_batch(gaussian_blur(as_batch(v), (denoise_sigma, denoise_sigma, 0)), 4).astype(np.float64)
    steps = np.abs(np.diff(v, axis=3)).mean(axis=(0, 1, 2))
    closure = float(np.abs(v[..., -1] - v[..., 0]).mean())
    step_mean = float(steps.mean())
    motion = float("nan")
    if v.shape[3] >= 3:
        d1 = float(np.mean(np.square(v[..., 1:] - v[..., :-1])))
        d2 = float(np.mean(np.square(v[..., 2:] - v[..., :-2])))
        motion = v.shape[3] * math.sqrt(max(0.0, (d2 - d1) / 3))
    return {"steps": steps, "step_mean": step_mean, "step_max": float(steps.max()), "closure": closure,
            "closure_ratio": closure / step_mean if step_mean > 0 else float("nan"), "motion": motion}


# --------------------------------------------------------------------------- cardiac function


def lv_volume_ml(labels: np.ndarray, spacing: Sequence[float], lv_label: int = 3) -> float:
    """LV blood-pool volume in ml of a label map (X,Y,Z): voxel count x voxel volume."""
    voxel_ml = float(np.prod([float(s) for s in spacing[:3]])) / 1000.0
    return float(np.count_nonzero(np.asarray(labels) == lv_label)) * voxel_ml


def ejection_fraction(edv: float, esv: float) -> float:
    """EF in percent; NaN when EDV is 0."""
    return 100.0 * (edv - esv) / edv if edv > 0 else float("nan")


def cardiac_function(spacing, lv_label: int = 3, ed_es: Optional[dict] = None,
                     labels4d: Optional[np.ndarray] = None) -> Optional[dict]:
    """EDV, ESV (ml) and EF (%) from ED/ES label maps ({"ed": .., "es": ..}) or from a 4D
    label map (X,Y,Z,T): ED = the frame with the largest LV blood pool, ES the smallest."""
    if ed_es and "ed" in ed_es and "es" in ed_es:
        edv, esv = lv_volume_ml(ed_es["ed"], spacing, lv_label), lv_volume_ml(ed_es["es"], spacing, lv_label)
        source = "ED/ES label maps"
    elif labels4d is not None and np.asarray(labels4d).ndim == 4:
        vols = [lv_volume_ml(labels4d[..., t], spacing, lv_label) for t in range(labels4d.shape[3])]
        edv, esv = max(vols), min(vols)
        source = "4D label map (ED = largest, ES = smallest LV blood pool)"
    else:
        return None
    return {"edv_ml": edv, "esv_ml": esv, "ef_percent": ejection_fraction(edv, esv), "source": source}


# --------------------------------------------------------------------------- masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A and B| / (|A| + |B|) of two boolean arrays; NaN when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else float("nan")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (X,Y,Z) or (X,Y,Z,T) (per frame) by a (2r+1)^3 cube (torch max-pool)."""
    m = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return m.copy()
    t = torch.from_numpy(m.astype(np.float32))
    t = t[None, None] if m.ndim == 3 else t.permute(3, 0, 1, 2)[:, None]
    out = torch.nn.functional.max_pool3d(t, kernel_size=2 * radius + 1, stride=1, padding=radius)
    out = out[0, 0] if m.ndim == 3 else out[:, 0].permute(1, 2, 3, 0)
    return out.numpy() > 0.5


class IntensityModel:
    """Mean and standard deviation of the intensity of every structure, fitted on real
    (image, mask) pairs; segments a structure as the voxels near it whose intensity
    lies within ``k`` standard deviations of its mean."""

    def __init__(self, k: float = 2.5, radius: int = 2):
        self.k, self.radius = float(k), int(radius)
        self._sums: dict = {}

    def fit(self, image01: np.ndarray, mask: np.ndarray) -> "IntensityModel":
        img, m = np.asarray(image01, dtype=np.float64), np.asarray(mask)
        for label in np.unique(m):
            if label == 0:
                continue
            vals = img[m == label]
            s = self._sums.setdefault(int(label), [0, 0.0, 0.0])
            s[0] += vals.size
            s[1] += float(vals.sum())
            s[2] += float((vals * vals).sum())
        return self

    @property
    def stats(self) -> dict:
        out = {}
        for label, (n, s1, s2) in sorted(self._sums.items()):
            mean = s1 / n
            out[label] = {"mean": mean, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "n_voxels": n}
        return out

    def segment(self, image01: np.ndarray, mask: np.ndarray, label: int) -> np.ndarray:
        return segment_by_intensity(image01, mask, label, self.stats[label]["mean"], self.stats[label]["std"],
                                    self.k, self.radius)


def segment_by_intensity(image01: np.ndarray, mask: np.ndarray, label: int, mean: float, std: float,
                         k: float = 2.5, radius: int = 2) -> np.ndarray:
    """Voxels within ``radius`` voxels of the mask's structure ``label`` whose intensity is in
    mean +- k std. The search region keeps structures of equal intensity elsewhere (e.g.
    the two ventricles' blood) out of each other's segmentation."""
    region = dilate(np.asarray(mask) == label, radius)
    img = np.asarray(image01, dtype=np.float64)
    return region & (np.abs(img - mean) <= k * max(std, 1e-6))


def mask_adherence(image01: np.ndarray, mask: np.ndarray, model: IntensityModel) -> dict:
    """Dice per structure (label -> Dice) between the mask and the intensity segmentation."""
    out = {}
    for label in model.stats:
        if np.any(np.asarray(mask) == label):
            out[label] = dice(np.asarray(mask) == label, model.segment(image01, mask, label))
    return out


# CT mask adherence: which label groups of a conditioning map (medgen_rt.data.phantoms.CT_LABELS)
# a segmentation by HU ranges is compared with.
CT_GROUPS = {"blood": (1, 2, 3, 4, 5), "myocardium": (6,)}  # aorta, LA, RA, LV, RV; LV myocardium
# HU ranges [lo, hi) and the search region, chosen by measuring on real CT phantoms (each image
# against its own map; 18 subjects at 64x64x32 of 5.6x5.6x8 mm, 14 at 128x128x64 of 2.8x2.8x4 mm):
# * 185 HU splits myocardium (90-120 HU) from contrast blood (250-350 HU) about midway;
# * 380 HU keeps bone marrow (sternum, vertebrae: 400-480 HU) beside the heart and the descending
#   aorta out of blood while blood (<= 350 HU) keeps its 8-20 HU noise tail;
# * 60 HU sits just above muscle (35-55 HU) and below liver's top (70 HU) rather than midway to
#   myocardium (90 HU): noisy myocardium dips below 70 HU (one subject lost 12% of its
#   myocardium at a 70 HU cut), and little liver lies within the region;
# * region = the map's heart (all groups) dilated by 1 voxel: structures a little off the map
#   count against the Dice, while the discs (80-100 HU) and marrow beside the descending aorta and
#   the liver under the apex mostly stay out (2 or 3 voxels lowered the worst own-map myocardium
#   Dice at 5.6 mm from 0.87 to 0.83 and 0.75);
# * no smoothing: a 3x3 mean or median, or a Gaussian of 0.5-0.7 voxel, lowered the own-map Dice
#   (worst blood 0.995 -> 0.96 and 0.88 at 0.5 and 0.7 voxel) because the walls are 2-5 voxels
#   thick and blurring blood (300 HU) into fat (-100 HU) passes through the myocardium range;
#   8-20 HU noise alone moves few voxels across cuts 30 HU or more away from a tissue's range.
# Measured: own map worst blood 0.985, myocardium 0.88 (mean 0.998, 0.91-0.92) at both shapes; a
# swapped (other subject's) map 0.60-0.71 and 0.45-0.62 on average. The myocardium Dice stays
# below 1 because the phantom's RV free wall has myocardium HU but no label.
CT_HU_RANGES = {"blood": (185.0, 380.0), "myocardium": (60.0, 185.0)}
CT_REGION_RADIUS = 1


def segment_ct_hu(image_hu: np.ndarray, label_map: np.ndarray, radius: int = CT_REGION_RADIUS) -> dict:
    """Group -> boolean segmentation of a CT volume (HU) by :data:`CT_HU_RANGES`, within the map's
    heart dilated by ``radius`` voxels (elsewhere bone, liver and muscle share these ranges)."""
    img = np.asarray(image_hu)
    heart = np.isin(np.asarray(label_map), [v for g in CT_GROUPS.values() for v in g])
    region = dilate(heart, radius)
    return {g: region & (img >= lo) & (img < hi) for g, (lo, hi) in CT_HU_RANGES.items()}


def ct_mask_adherence(image_hu: np.ndarray, label_map: np.ndarray, radius: int = CT_REGION_RADIUS) -> dict:
    """Group -> Dice between the map's label group and the HU segmentation; NaN for a group
    absent from the map (and for every group of a map without a heart).

    Computed inside the bounding box of the dilated heart: nothing outside it counts either way.
    """
    img, lab = np.asarray(image_hu), np.asarray(label_map)
    if img.shape != lab.shape:
        raise ValueError(f"label map: shape {lab.shape}, image {img.shape}")
    heart = np.isin(lab, [v for g in CT_GROUPS.values() for v in g])
    if not heart.any():
        return {g: float("nan") for g in CT_GROUPS}
    idx = np.nonzero(heart)
    box = tuple(slice(max(0, int(i.min()) - radius), int(i.max()) + radius + 1) for i in idx)
    img, lab = img[box], lab[box]
    seg = segment_ct_hu(img, lab, radius)
    out = {}
    for g, labels in CT_GROUPS.items():
        truth = np.isin(lab, labels)
        out[g] = dice(truth, seg[g]) if truth.any() else float("nan")
    return out


# --------------------------------------------------------------------------- realism rows


def realism_grid(shape: Sequence[int], max_side: int = 64) -> tuple:
    """The grid realism rows are compared on: (X, Y, Z) of ``shape`` divided by one integer
    factor so that no side exceeds ``max_side`` (rounded up), T of a cine kept."""
    f = max(1, int(math.ceil(max(int(s) for s in shape[:3]) / max_side)))
    return tuple(int(math.ceil(int(s) / f)) for s in shape[:3]) + tuple(int(t) for t in shape[3:])


# In-plane difference of Gaussians (sigmas in realism-grid voxels) applied to every slice and
# frame of a realism row. Without it the whole-volume correlation is carried by the large
# structures (chest wall, lungs, liver): blotches with the right layout scored 0.96 on the
# cine phantoms, while band-passed they score 0.58 of the phantoms' figure (see the README).
REALISM_BAND_SIGMAS = (0.5, 1.5)


def realism_row(vol01: np.ndarray, grid: Sequence[int], band_pass: bool = True) -> np.ndarray:
    """A volume in [0, 1] on ``grid`` as one float32 row: area averaging when shrinking
    (point samples of a 512^3 CT would alias), trilinear otherwise; a cine with another
    frame count gets ``grid[3]`` frames evenly spaced over its cycle from the first.
    ``band_pass``: each slice and frame through the in-plane difference of Gaussians of
    REALISM_BAND_SIGMAS, so the row carries the edges of structures, not their layout."""
    from ..data.preprocess import frame_indices

    v = np.asarray(vol01, dtype=np.float32)
    if v.ndim != len(grid):
        raise ValueError(f"volume: shape {v.shape} does not match the realism grid {tuple(grid)}")
    if v.ndim == 4 and v.shape[3] != grid[3]:
        v = v[..., frame_indices(v.shape[3], int(grid[3]), start=0)]
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(v, 3, 0) if v.ndim == 4 else v[None]))[:, None]
    size = tuple(int(s) for s in grid[:3])
    if tuple(t.shape[2:]) != size:
        shrink = all(g <= s for g, s in zip(size, t.shape[2:]))
        t = torch.nn.functional.interpolate(t, size=size, mode="area" if shrink else "trilinear",
                                            **({} if shrink else {"align_corners": False}))
    if band_pass:
        from .degrade import band_pass_in_plane

        t = band_pass_in_plane(t, REALISM_BAND_SIGMAS)
    return t.reshape(-1).numpy()


# --------------------------------------------------------------------------- local realism

# The whole-volume figure above compares volumes as aligned wholes: phantoms differ in where
# the heart sits, so a new subject's nearest neighbour correlates at only 0.15-0.77 and a
# blotchy sample with the right layout scores as well as a new subject (cine default, step
# 4000: 0.80 vs 0.79). Local realism asks instead whether every small piece of a sample looks
# like some piece of a real volume, at any position: patches of PATCH_SIDE grid voxels in-plane
# (cine 96x96 -> 48x48 grid: 8 voxels = a sixth of the field, about the LV), denoised by a
# Gaussian of PATCH_DENOISE_SIGMA grid voxels on both sides so that voxel noise, which samples
# decoded by a VQ-GAN lack, does not decide it.
PATCH_SIDE = 8
PATCH_DENOISE_SIGMA = 0.5
PATCH_MIN_STD = 0.04  # a patch below this contrast (lung, air, flat tissue) carries no structure
PATCH_MAX_SLICES = 16
PATCH_FRAMES = 4
PATCH_QUERIES = 512  # structured patches scored per volume (a seeded subset)


def patch_table(vol01: np.ndarray, max_side: int = 64, seed: int = 0) -> dict:
    """The patches one volume in [0, 1] contributes to :func:`local_realism`.

    The volume is area-averaged in-plane by one integer factor so that neither side exceeds
    ``max_side``, cut to at most PATCH_MAX_SLICES slices and (cine) PATCH_FRAMES frames evenly
    spaced, and denoised in-plane. Returns ``reference``: every PATCH_SIDE^2 patch at a
    stride of 2, and ``queries``: at most PATCH_QUERIES of the patches at a stride of
    PATCH_SIDE / 2 whose standard deviation is at least PATCH_MIN_STD; both as float32 rows
    of zero mean and unit norm (so a dot product is a Pearson r)."""
    from .degrade import gaussian_blur

    v = np.asarray(vol01, dtype=np.float32)
    if v.ndim == 3:
        v = v[..., None]
    if v.ndim != 4:
        raise ValueError(f"volume: local realism needs (X,Y,Z) or (X,Y,Z,T), got shape {vol01.shape}")
    zs = np.unique(np.linspace(0, v.shape[2] - 1, min(v.shape[2], PATCH_MAX_SLICES)).round().astype(int))
    ts = np.unique(np.linspace(0, v.shape[3] - 1, min(v.shape[3], PATCH_FRAMES)).round().astype(int))
    v = v[:, :, zs][..., ts]
    t = torch.from_numpy(np.ascontiguousarray(v.transpose(3, 2, 0, 1))).reshape(-1, 1, v.shape[0], v.shape[1])
    f = max(1, int(math.ceil(max(v.shape[:2]) / max_side)))
    if f > 1:
        t = torch.nn.functional.avg_pool2d(t, f, ceil_mode=True)
    t = gaussian_blur(t[..., None], (PATCH_DENOISE_SIGMA, PATCH_DENOISE_SIGMA, 0))[..., 0]
    p = PATCH_SIDE
    if min(t.shape[2:]) < p:  # too small to hold a patch: nothing to compare (the figure reads n/a)
        empty = torch.zeros((0, p * p))
        return {"reference": empty, "queries": empty}

    def unit(stride):
        u = torch.nn.functional.unfold(t, p, stride=stride).transpose(1, 2).reshape(-1, p * p)
        u = u - u.mean(dim=1, keepdim=True)
        norm = u.norm(dim=1, keepdim=True)
        return u / norm.clamp_min(1e-12), norm[:, 0] / p  # norm / p = the patch's standard deviation

    ref, _ = unit(2)
    q, std = unit(max(1, p // 2))
    q = q[std >= PATCH_MIN_STD]
    if len(q) > PATCH_QUERIES:
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), PATCH_QUERIES, replace=False))]
    return {"reference": ref.contiguous(), "queries": q.contiguous()}


def _best_r(queries: torch.Tensor, reference: torch.Tensor, owner: Optional[torch.Tensor], own: int,
            chunk: int = 1024) -> torch.Tensor:
    best = []
    for i in range(0, len(queries), chunk):
        r = queries[i:i + chunk] @ reference.T
        if owner is not None:
            r[:, owner == own] = -2.0  # leave the query's own volume out
        best.append(r.max(dim=1).values)
    return torch.cat(best) if best else torch.empty(0)


def local_realism(synthetic: Sequence[dict], real: Sequence[dict]) -> dict:
    """Local realism of synthetic volumes against real ones (each a :func:`patch_table`).

    Each structured patch of a volume gets its best Pearson r with any patch of the real
    volumes, at any position; a volume's score is the median over its patches. A real volume
    is scored against the other real volumes. The figure is the ratio of the medians over
    volumes on Fisher's z scale (atanh r, where a gap of correlations near 1 is measured
    fairly): 1 = the pieces of the samples look like pieces of the real population as much
    as a new subject's do; a volume without any structured patch scores 0."""
    if len(real) < 2:
        raise ValueError(f"local realism: need at least 2 real volumes, got {len(real)}")
    if not any(len(t["reference"]) for t in real):
        nan = float("nan")
        return {"ratio": nan, "synthetic_median": nan, "real_median": nan,
                "synthetic_r": np.full(len(synthetic), nan), "real_r": np.full(len(real), nan)}
    reference = torch.cat([t["reference"] for t in real])
    owner = torch.cat([torch.full((len(t["reference"]),), i) for i, t in enumerate(real)])

    def score(t, own=-1):
        if len(t["queries"]) == 0:
            return 0.0
        b = _best_r(t["queries"], reference, owner if own >= 0 else None, own)
        return float(b.median())

    real_r = np.array([score(t, i) for i, t in enumerate(real)])
    syn_r = np.array([score(t) for t in synthetic])

    def z(r):
        return float(np.arctanh(np.clip(r, -0.9999, 0.9999)))

    real_med, syn_med = float(np.median(real_r)), float(np.median(syn_r))
    return {"ratio": z(syn_med) / z(real_med) if z(real_med) > 0 else float("nan"),
            "synthetic_median": syn_med, "real_median": real_med, "synthetic_r": syn_r, "real_r": real_r}
