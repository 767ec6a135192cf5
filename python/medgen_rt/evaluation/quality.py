"""Quality of a synthetic set against a real one (DESIGN.md section 7): every metric of
:mod:`.metrics` over the two sets, as one JSON-ready dict.

Volumes are read one at a time; only the ones kept for MS-SSIM (at most
``max_ms_ssim_volumes`` per set), the example pictures and one small realism row per volume
(at most 64 voxels a side, :func:`.metrics.realism_row`) stay in memory.
"""
from __future__ import annotations

import numpy as np

from . import metrics as M
from .datasets import EvalInputError, EvalSet, check_compatible, same_shape, to_display01

__all__ = ["evaluate_quality"]


def _spacing(affine) -> tuple:
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


def _scan(s: EvalSet, quiet: bool, keep: int, lv_label: int, grid: tuple, segmenter=None,
          reference: bool = False) -> dict:
    """One pass over a set: slice and frame statistics, cardiac function, masks (CT: Dice by HU
    ranges against the own map and, as a control, the previous masked volume's map, the first
    against the last's), a realism row on ``grid`` per volume, and the first ``keep`` volumes
    in [0, 1] for MS-SSIM and pictures; the patches of local realism (``reference``: all of
    them, as the real set needs; else only the scored ones)."""
    from .encoder import progress

    out = {"interslice": {"mad": [], "nmad": [], "pearson": []}, "temporal": [], "cardiac": [], "kept": [],
           "kept_raw": [], "masks": [], "names": [], "rows": [], "ct_dice": [], "patches": []}
    masked = [i for i, e in enumerate(s.entries) if e.mask is not None]
    ct_maps = s.modality == "ct" and not s.is_cine
    prev = (s.names[masked[-1]], s.load_mask(masked[-1])) if ct_maps and len(masked) >= 2 else None
    bar = progress(len(s), f"scan {s.arg}", quiet, "vol")
    for i in range(len(s)):
        item = s.load(i)
        v01 = to_display01(item["image"], s.modality)
        out["rows"].append(M.realism_row(v01, grid))
        table = M.patch_table(v01, seed=i)
        out["patches"].append(table if reference else {"queries": table["queries"]})
        st = M.interslice(v01)
        for k in out["interslice"]:
            out["interslice"][k].append(st[k])
        if s.is_cine:
            out["temporal"].append({"name": item["name"], **{k: v for k, v in M.temporal(v01, M.TEMPORAL_DENOISE_SIGMA).items()
                                                                    if k != "steps"}})
            labels4d = item["mask"] if item["mask"] is not None and item["mask"].ndim == 4 else None
            if segmenter is not None and item["labels"] is None and labels4d is None:
                labels4d = segmenter(item["image"], item["affine"])
            cf = M.cardiac_function(_spacing(item["affine"]), lv_label, item["labels"], labels4d)
            if cf is not None:
                out["cardiac"].append({"name": item["name"], **cf})
        if item["mask"] is not None:
            out["masks"].append((i, item["name"]))
            if ct_maps:
                out["ct_dice"].append(_ct_dice(item, prev))
                prev = None if prev is None else (item["name"], item["mask"])
        if len(out["kept"]) < keep:
            out["kept"].append(M.shrink_for_ssim(v01))
        if len(out["kept_raw"]) < 4:  # example pictures
            out["kept_raw"].append((item["name"], item["image"], item["affine"]))
        out["names"].append(item["name"])
        bar.update(1)
    bar.close()
    for k in out["interslice"]:
        out["interslice"][k] = np.concatenate(out["interslice"][k])
    out["rows"] = np.stack(out["rows"])
    return out


def _ct_dice(item: dict, control) -> dict:
    """One CT volume's Dice per group against its own map and against ``control`` = (name,
    another subject's map) or None; a map of another shape gives no control value."""
    row = {"name": item["name"], **M.ct_mask_adherence(item["image"], item["mask"])}
    if control is not None and control[1].shape == item["mask"].shape:
        row["control_map"] = control[0]
        row.update({f"control_{g}": v for g, v in M.ct_mask_adherence(item["image"], control[1]).items()})
    return row


def _features(real: EvalSet, synthetic: EvalSet, features: str, encoder, cfg, quiet: bool, device="cpu",
              encoder_path=None, log_fn=None) -> tuple:
    """(real features, synthetic features, description, the CopyEncoder obtained here
    (cached or trained, :func:`.encoder.obtain_encoder`) or None)."""
    from . import encoder as enc
    from .features import PretrainedExtractor, parse_features

    kind, path = parse_features(features)
    if kind == "encoder":
        trained = None
        if encoder is None:
            cfg = cfg or enc.EncoderConfig()
            if len(real) < 2:
                raise EvalInputError(f"--real: need at least 2 volumes to train the feature encoder, found {len(real)}")
            encoder, info, inputs = enc.obtain_encoder(real, cfg, encoder_path, quiet=quiet, device=device, log=log_fn)
            if info["source"] == "file":
                trained = None
                desc = "copy-detection encoder, pooled stage features (loaded from --encoder)"
            else:
                trained = encoder
                desc = ("copy-detection encoder, pooled stage features (NT-Xent on --real, "
                        + ("trained here)" if info["source"] == "trained" else "from the cache)"))
            fr = (enc.embed_inputs(encoder, inputs, features=True) if inputs is not None
                  else enc.embed_set(encoder, real, quiet=quiet, features=True))
        else:
            want = "cine" if real.is_cine else "volume"
            if encoder.cfg.kind != want or encoder.cfg.modality != real.modality:
                raise EvalInputError(f"--encoder: trained on {encoder.cfg.modality.upper()} {encoder.cfg.kind} inputs, "
                                     f"but --real holds {real.modality.upper()} {want} inputs")
            fr = enc.embed_set(encoder, real, quiet=quiet, features=True)
            desc = "copy-detection encoder, pooled stage features (loaded from --encoder)"
        fs = enc.embed_set(encoder, synthetic, quiet=quiet, features=True)
        return fr, fs, desc, trained
    extractor = PretrainedExtractor(kind, path)

    def run(s):
        bar = enc.progress(len(s), f"features {s.arg}", quiet, "vol")
        rows = []
        for i in range(len(s)):
            rows.append(extractor(to_display01(s.load(i)["image"], s.modality)))
            bar.update(1)
        bar.close()
        return np.stack(rows)

    return run(real), run(synthetic), extractor.name, None


def _compare(real_vals, syn_vals) -> dict:
    return {"real": M.describe(real_vals), "synthetic": M.describe(syn_vals),
            "wasserstein": M.wasserstein_1d(real_vals, syn_vals)}


def evaluate_quality(real: EvalSet, synthetic: EvalSet, features: str = "encoder", encoder=None, cfg=None,
                     max_pairs: int = 50, max_ms_ssim_volumes: int = 20, lv_label: int = 3, segmenter=None,
                     quiet: bool = True, seed: int = 0, device="cpu", encoder_path=None, log_fn=None) -> dict:
    """All quality metrics of ``synthetic`` against ``real``; see the module docstrings.

    ``real`` needs at least 2 volumes (the realism figure's reference is each real volume's
    nearest other one).

    features: "encoder" (default), "medicalnet:PATH" or "radimagenet:PATH".
    encoder: a loaded CopyEncoder to use instead of training one on ``real``; else
    encoder_path (loaded when present), the cache or a training (``.encoder.obtain_encoder``).
    segmenter: optional callable (image, affine) -> 4D label map for cine without labels.
    Returns the report dict; ``"_pictures"`` holds example volumes for the report and
    ``"_model"`` the encoder obtained here, trained or cached (None when given or loaded).
    """
    check_compatible(real, synthetic)
    syn_shape = same_shape(synthetic)
    if len(real) < 2:
        raise EvalInputError(f"{real.arg}: need at least 2 volumes: the realism figure compares each real volume "
                             f"with its nearest other real volume; found {len(real)}")
    grid = M.realism_grid(syn_shape)
    scan_r = _scan(real, quiet, max_ms_ssim_volumes, lv_label, grid, segmenter, reference=True)
    scan_s = _scan(synthetic, quiet, max_ms_ssim_volumes, lv_label, grid, segmenter)

    report: dict = {"kind": "quality",
                    "sets": {k: {"folder": str(x.root), "layout": x.layout, "n": len(x), "modality": x.modality,
                                 "cine": x.is_cine} for k, x in (("real", real), ("synthetic", synthetic))},
                    "synthetic_shape": list(syn_shape)}

    # Diversity: pairs within each set; the real set's value is the reference.
    div_s = M.ms_ssim_diversity(scan_s["kept"], max_pairs, seed)
    try:
        same_shape(real)
        div_r = M.ms_ssim_diversity(scan_r["kept"], max_pairs, seed)
    except EvalInputError as exc:
        div_r = {"n_pairs": 0, "note": str(exc)}
    report["ms_ssim_diversity"] = {
        "synthetic": div_s, "real": div_r, "metric": "monai.metrics.MultiScaleSSIMMetric, data range 1",
        "reading": "mean MS-SSIM over pairs within a set; lower = more diverse; near 1 = near-identical volumes",
        "computed_on": ("2D slices (every slice and frame of a cine)" if synthetic.is_cine else "3D volumes")
        + f", at most {max_ms_ssim_volumes} volumes and {max_pairs} pairs per set; volumes over 128 voxels along "
        "an axis are average-pooled by an integer factor first"}

    fr, fs, desc, trained = _features(real, synthetic, features, encoder, cfg, quiet, device, encoder_path, log_fn)
    fid_note = None
    if fs.shape[0] < fs.shape[1] or fr.shape[0] < fr.shape[1]:
        fid_note = (f"fewer volumes ({fr.shape[0]} real, {fs.shape[0]} synthetic) than feature dimensions "
                    f"({fs.shape[1]}): the covariances are singular and FID is biased upwards; compare FIDs only "
                    "between sets of equal size")
    report["features"] = {"extractor": desc, "dims": int(fs.shape[1])}
    report["fid"] = {"value": M.frechet_distance(fr, fs), "note": fid_note}
    report["mmd"] = {**M.mmd_rbf(fr, fs), "kernel": "Gaussian, bandwidth = median pairwise distance (pooled)",
                     "estimator": "unbiased MMD^2"}

    report["realism"] = _realism(scan_r, scan_s, grid, synthetic.is_cine)
    report["local_realism"] = _local_realism(scan_r, scan_s)

    report["inter_slice"] = {
        k: _compare(scan_r["interslice"][k], scan_s["interslice"][k]) for k in ("mad", "nmad", "pearson")}
    report["inter_slice"]["definition"] = ("adjacent slices along the third axis, intensities in [0, 1]: MAD = mean "
                                           "|S_k - S_k+1|, NMAD = MAD / mean intensity of the two slices, Pearson r "
                                           "of their voxels; wasserstein = 1-D W1 between the real and synthetic "
                                           "distributions of all adjacent pairs")

    if synthetic.is_cine:
        keys = ("motion", "step_mean", "closure", "closure_ratio")
        tr = {k: np.array([t[k] for t in scan_r["temporal"]]) for k in keys}
        ts = {k: np.array([t[k] for t in scan_s["temporal"]]) for k in keys}
        report["temporal"] = {k: _compare(tr[k], ts[k]) for k in tr}
        report["temporal"]["definition"] = ("frame-to-frame change = mean |F_t+1 - F_t| (intensities in [0, 1], "
                                            f"each frame through an in-plane Gaussian of sigma "
                                            f"{M.TEMPORAL_DENOISE_SIGMA:g} voxel first, so voxel noise does not "
                                            "count as motion) "
                                            "averaged over the cycle; closure = mean |F_T-1 - F_0| (last frame "
                                            "vs first); closure_ratio = closure / mean step, about 1 when the "
                                            "cycle closes smoothly; motion = the change that is motion and not "
                                            "noise, per cycle: T sqrt((D2 - D1) / 3), D1 and D2 the mean squared "
                                            "change over one and two frames (independent noise adds the same to "
                                            "both; the blur leaves most of the frame-to-frame change of noisy "
                                            "phantoms to their noise, so compare motion, not step_mean, with "
                                            "noise-free samples)")
        report["temporal"]["per_volume"] = {"real": scan_r["temporal"], "synthetic": scan_s["temporal"]}
        cr, cs = scan_r["cardiac"], scan_s["cardiac"]
        if cr or cs:
            report["cardiac"] = {
                k: _compare([c[k] for c in cr], [c[k] for c in cs]) for k in ("ef_percent", "edv_ml", "esv_ml")}
            report["cardiac"]["lv_label"] = lv_label
            report["cardiac"]["per_volume"] = {"real": cr, "synthetic": cs}
            if not cs:
                report["cardiac"]["note"] = "--synthetic has no labels: only the real distribution is shown"
        else:
            report["cardiac"] = {"note": "no LV labels in either set (ACDC ground truth or 4D masks needed)"}
    else:
        report["temporal"] = None
        report["cardiac"] = None

    report["mask_adherence"] = (_ct_mask_adherence(scan_r, scan_s) if synthetic.modality == "ct"
                                and not synthetic.is_cine else _mask_adherence(real, synthetic, scan_r, scan_s))
    report["_pictures"] = {"real": scan_r["kept_raw"][:4], "synthetic": scan_s["kept_raw"][:4],
                           "ms_ssim_values": {"real": div_r.get("values", []), "synthetic": div_s.get("values", [])},
                           "interslice": {"real": scan_r["interslice"], "synthetic": scan_s["interslice"]},
                           "cardiac": {"real": [c["ef_percent"] for c in scan_r["cardiac"]],
                                       "synthetic": [c["ef_percent"] for c in scan_s["cardiac"]]}}
    report["_model"] = trained
    return report


def _realism(scan_r: dict, scan_s: dict, grid: tuple, cine: bool) -> dict:
    """Nearest-neighbour realism (:func:`.memorization.nn_realism`) of the scanned rows."""
    from .memorization import nn_realism

    rows_r, rows_s = scan_r.pop("rows"), scan_s.pop("rows")
    nn = nn_realism(rows_s, rows_r)
    return {"ratio": nn["ratio"], "synthetic_median": nn["synthetic_median"], "real_median": nn["real_median"],
            "synthetic": [{"name": n, "r": float(r)} for n, r in zip(scan_s["names"], nn["synthetic_nn_r"])],
            "real": [{"name": n, "r": float(r)} for n, r in zip(scan_r["names"], nn["real_nn_r"])],
            "grid": list(grid),
            "representation": ("intensities in [0, 1] (CT: [-1000, 1000] HU; MR: min-max per volume), "
                               "area-averaged by one integer factor so no spatial side exceeds 64 voxels, then "
                               "each slice band-passed by a difference of Gaussians (sigma "
                               f"{M.REALISM_BAND_SIGMAS[0]:g} and {M.REALISM_BAND_SIGMAS[1]:g} grid voxels) so "
                               "the edges of structures count, not only their layout"
                               + ("; every frame kept (a real cine with another frame count: frames evenly "
                                  "spaced over its cycle)" if cine else "")),
            "definition": ("r = Pearson correlation of two volumes' voxels; synthetic: each synthetic volume's "
                           "highest r with any real volume; real: each real volume's highest r with another real "
                           "volume (leave one out); ratio = median synthetic / median real"),
            "reading": ("1.0 = the samples are as close to the real population as new real subjects are; near 0 "
                        "= noise or blotches; above 1 = closer than new subjects, as copies are (see `medgen eval "
                        "memorization`). It compares aligned wholes, so a blurred, population-mean-like volume "
                        "correlates with every subject while sharp anatomy a voxel or two off does not: it rated "
                        "the blotchy cine DiT (0.80) above fresh phantoms (0.79) and the phantom-like cine U-Net at "
                        "0.49. Rank models by local realism; read this one for the layout, with the MS-SSIM "
                        "diversity, which is near 1 for samples that are all alike.")}


def _local_realism(scan_r: dict, scan_s: dict) -> dict:
    """Local (patch) realism (:func:`.metrics.local_realism`) of the scanned patch tables."""
    lr = M.local_realism(scan_s.pop("patches"), scan_r.pop("patches"))
    return {"ratio": lr["ratio"], "synthetic_median": lr["synthetic_median"], "real_median": lr["real_median"],
            "synthetic": [{"name": n, "r": float(r)} for n, r in zip(scan_s["names"], lr["synthetic_r"])],
            "real": [{"name": n, "r": float(r)} for n, r in zip(scan_r["names"], lr["real_r"])],
            "representation": (f"in-plane patches of {M.PATCH_SIDE}x{M.PATCH_SIDE} voxels of the volume in [0, 1] "
                               "area-averaged in-plane so no side exceeds 64 voxels, denoised by a Gaussian of "
                               f"sigma {M.PATCH_DENOISE_SIGMA:g} voxel, at most {M.PATCH_MAX_SLICES} slices and "
                               f"{M.PATCH_FRAMES} frames; scored: up to {M.PATCH_QUERIES} patches per volume with a "
                               f"standard deviation of at least {M.PATCH_MIN_STD:g}"),
            "definition": ("each scored patch's highest Pearson r with any patch of the real volumes at any position "
                           "(a real volume's: of the other real volumes); a volume's r = the median over its "
                           "patches; ratio = atanh(median synthetic r) / atanh(median real r)"),
            "reading": ("1.0 = every piece of the samples looks like some piece of the real population as much as a "
                        "new subject's pieces do, wherever it sits; blotches, block artefacts and invented edges "
                        "score low (cine: the earlier DiT default 0.72, the U-Net default 0.88, the VQ-GAN's "
                        "reconstructions 0.99). "
                        "It does not see the layout: read it with the whole-volume realism.")}


def _ct_mask_adherence(scan_r: dict, scan_s: dict) -> dict:
    """CT: Dice between each volume's conditioning map (label groups) and a segmentation by HU
    ranges, against its own map and, as the control, another subject's map; the real set's
    (image, map) pairs, when it has maps, give what a perfect generator reaches."""
    groups = list(M.CT_GROUPS)

    def summary(rows):
        return {"own_map": {g: M.describe([r[g] for r in rows]) for g in groups},
                "swapped_map": {g: M.describe([r[f"control_{g}"] for r in rows if f"control_{g}" in r])
                                for g in groups}}

    if not scan_s["ct_dice"]:
        return {"note": "--synthetic has no conditioning masks (NAME_mask.nii.gz or masks/)"}
    out = {"synthetic": summary(scan_s["ct_dice"]),
           "real_reference": summary(scan_r["ct_dice"]) if scan_r["ct_dice"] else None,
           "per_volume": scan_s["ct_dice"], "real_per_volume": scan_r["ct_dice"],
           "groups": {g: {"labels": list(M.CT_GROUPS[g]), "hu_range": list(M.CT_HU_RANGES[g])} for g in groups},
           "segmentation": (f"voxels within {M.CT_REGION_RADIUS} voxel of the map's heart (every label of the "
                            "groups) whose HU lie in the group's range [lo, hi), no smoothing; Dice against the "
                            "map's voxels of the group. Ranges and region were chosen on real CT phantoms, where "
                            "an image against its own map gives blood >= 0.98, myocardium >= 0.88"),
           "control": ("swapped_map = each volume against the map of the previous volume with a map (the first "
                       "against the last's)"),
           "notes": []}
    if len(scan_s["ct_dice"]) < 2:
        out["notes"].append("one synthetic volume with a map: no swapped-map control")
    if not scan_r["ct_dice"]:
        out["notes"].append("--real has no masks: no real reference")
    return out


def _mask_adherence(real: EvalSet, synthetic: EvalSet, scan_r: dict, scan_s: dict) -> dict:
    """MR: Dice per structure between each synthetic volume's conditioning mask and an intensity
    segmentation; the model of each structure's intensity is fitted on the real (image, mask)
    pairs, and the same segmentation of the real volumes gives the reference Dice."""
    if not scan_s["masks"]:
        return {"note": "--synthetic has no conditioning masks (NAME_mask.nii.gz or masks/)"}
    if not scan_r["masks"]:
        return {"note": "--real has no masks: each structure's intensity cannot be learned"}
    model = M.IntensityModel()
    for i, _ in scan_r["masks"]:
        item = real.load(i)
        model.fit(to_display01(item["image"], real.modality), item["mask"])

    def dice_all(s: EvalSet, entries) -> dict:
        per = []
        for i, name in entries:
            item = s.load(i)
            d = M.mask_adherence(to_display01(item["image"], s.modality), item["mask"], model)
            per.append({"name": name, "dice": {str(k): v for k, v in d.items()}})
        return per

    syn, ref = dice_all(synthetic, scan_s["masks"]), dice_all(real, scan_r["masks"])

    def per_label(rows):
        labels = sorted({k for r in rows for k in r["dice"]}, key=int)
        return {k: M.describe([r["dice"][k] for r in rows if k in r["dice"]]) for k in labels}

    return {"synthetic": per_label(syn), "real_reference": per_label(ref), "per_volume": syn,
            "intensity_model": {str(k): v for k, v in model.stats.items()},
            "segmentation": (f"voxels within {model.radius} voxels of the structure in the mask whose [0, 1] "
                             f"intensity is within {model.k} standard deviations of the structure's mean in the real "
                             "set; real_reference = the same segmentation of the real volumes against their own masks "
                             "(the best a perfect generator can reach)")}
