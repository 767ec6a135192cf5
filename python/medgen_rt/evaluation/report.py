"""Reports: ``report.json`` with every number, and ``report.html``, one self-contained page
(inline CSS, pictures as base64 PNG) with the distributions, example slices and pairs.

Plots are drawn with Pillow (already a dependency), so no plotting library is needed.
Every file is written under a temporary name and renamed.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..io.atomic import atomic_path
from ..io.preview import to_ras
from ..io.sidecar import to_jsonable, write_json_atomic

__all__ = ["histogram", "volume_panel", "side_by_side", "data_uri", "save_png", "Html", "write_report",
           "energy_section", "calibration_section", "public_report", "render_memorization", "render_quality", "render_shared"]

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def histogram(series: dict, title: str, xlabel: str, vline: Optional[float] = None, vlabel: str = "",
              bins: int = 30, size: tuple = (640, 320), correlation: bool = False):
    """Overlaid histograms (fraction of each series per bin, so sets of different sizes
    compare) as a PIL image; ``vline`` draws a dashed vertical line (e.g. a threshold).
    correlation=True: the values are correlations near 1, binned on a log scale of 1 - r
    (ticks still read as r) so that 0.99 and 0.999 fall apart."""
    from PIL import Image, ImageDraw

    def tx(v):
        return -np.log10(np.clip(1.0 - np.asarray(v, dtype=np.float64), 1e-6, None)) if correlation else v

    data = {k: tx(np.asarray(v, dtype=np.float64).ravel()) for k, v in series.items()}
    vline = None if vline is None else float(tx(vline))
    data = {k: v[np.isfinite(v)] for k, v in data.items() if np.isfinite(v).any()}
    w, h = size[0], size[1] + 14 * len(data)
    left, right, top, bottom = 56, 16, 28 + 14 * len(data), 44
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img, "RGBA")
    font = _font()
    d.text((left, 8), title, fill="black", font=font)
    if not data:
        d.text((left, h // 2), "no values", fill="black", font=font)
        return img
    pooled = np.concatenate(list(data.values()) + ([np.array([vline])] if vline is not None else []))
    lo, hi = float(pooled.min()), float(pooled.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    fracs = {k: np.histogram(v, bins=edges)[0] / max(1, v.size) for k, v in data.items()}
    ymax = max(float(f.max()) for f in fracs.values()) or 1.0
    pw, ph = w - left - right, h - top - bottom

    def x_px(x):
        return left + (x - lo) / (hi - lo) * pw

    def y_px(y):
        return top + ph - y / ymax * ph

    d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
    for i, (k, f) in enumerate(fracs.items()):
        c = COLORS[i % len(COLORS)]
        for j, val in enumerate(f):
            if val > 0:
                d.rectangle([x_px(edges[j]), y_px(val), x_px(edges[j + 1]), y_px(0)], fill=c + (90,),
                            outline=c + (200,))
        # Legend above the plot, one line per series, so it never hides bars or the line.
        d.rectangle([left, 24 + 14 * i, left + 10, 34 + 14 * i], fill=c)
        d.text((left + 16, 23 + 14 * i), f"{k} (n={data[k].size})", fill="black", font=font)
    for t in np.linspace(lo, hi, 6):
        d.line([x_px(t), top + ph, x_px(t), top + ph + 4], fill="black")
        label = f"{1 - 10 ** -t:.{min(7, max(2, int(math.ceil(t)) + 1))}f}" if correlation else _fmt(float(t))
        d.text((x_px(t) - 12, top + ph + 6), label, fill="black", font=font)
    for t in np.linspace(0, ymax, 5):
        d.text((4, y_px(t) - 6), _fmt(float(t)), fill="black", font=font)
    d.text((left + pw // 2 - 3 * len(xlabel), h - 16), xlabel, fill="black", font=font)
    d.text((left + 4, top + 2), "fraction", fill=(90, 90, 90), font=font)
    if vline is not None and math.isfinite(vline):
        x = x_px(vline)
        for y in range(top, top + ph, 8):
            d.line([x, y, x, min(y + 4, top + ph)], fill=(0, 0, 0), width=2)
        label = vlabel or _fmt(vline)
        d.text((x + 4 if x < left + pw / 2 else x - 6 * len(label) - 4, top + 2), label, fill="black", font=font)
    return img


def _window(a: np.ndarray, modality: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if modality == "ct":
        lo, hi = -1000.0, 1000.0
    else:
        lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
        hi = hi if hi > lo else lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def _plane(a: np.ndarray, sx: float, sy: float, height: int):
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a.T[::-1, ::-1]))  # radiological: right on the left, up = A/S
    width = max(1, int(round(height * a.shape[0] * sx / max(a.shape[1] * sy, 1e-9))))
    return im.resize((width, height), Image.BILINEAR)


def _row(images: Sequence, gap: int = 3):
    from PIL import Image

    height = max(i.height for i in images)
    canvas = Image.new("L", (sum(i.width for i in images) + gap * (len(images) - 1), height))
    x = 0
    for i in images:
        canvas.paste(i, (x, 0))
        x += i.width + gap
    return canvas


def volume_panel(volume: np.ndarray, affine: np.ndarray, modality: str, height: int = 128, frames: int = 4):
    """3D: axial, coronal and sagittal mid-slices; cine: the mid slice at ``frames`` frames."""
    vol = np.asarray(volume)
    if vol.ndim == 3:
        v, (sx, sy, sz) = to_ras(vol, affine)
        g = _window(v, modality)
        x, y, z = (s // 2 for s in g.shape)
        return _row([_plane(g[:, :, z], sx, sy, height), _plane(g[:, y, :], sx, sz, height),
                     _plane(g[x, :, :], sy, sz, height)])
    a = np.asarray(affine, dtype=np.float64)
    sp = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    # In-plane axes to R and A as the cine previews do; slices keep their stored order.
    vol = vol[::-1] if a[0, 0] < 0 else vol
    vol = vol[:, ::-1] if a[1, 1] < 0 else vol
    g = _window(vol, modality)
    z = g.shape[2] // 2
    ts = np.unique(np.linspace(0, g.shape[3] - 1, min(frames, g.shape[3])).round().astype(int))
    return _row([_plane(g[:, :, z, t], sp[0], sp[1], height) for t in ts])


def side_by_side(left, right, caption: str, labels: tuple = ("synthetic", "training")):
    """Two panels next to each other with a caption line and a label over each."""
    from PIL import Image, ImageDraw

    font = _font()
    head = 30
    w = left.width + right.width + 12
    canvas = Image.new("RGB", (w, max(left.height, right.height) + head), "white")
    canvas.paste(left.convert("RGB"), (0, head))
    canvas.paste(right.convert("RGB"), (left.width + 12, head))
    d = ImageDraw.Draw(canvas)
    d.text((2, 2), caption, fill="black", font=font)
    d.text((2, 16), labels[0], fill=(31, 119, 180), font=font)
    d.text((left.width + 14, 16), labels[1], fill=(214, 39, 40), font=font)
    return canvas


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def save_png(image, path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if v is None:
        return "n/a"
    return html.escape(str(v))


class Html:
    """A tiny builder for the self-contained report page."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list = []

    def h2(self, text: str) -> "Html":
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def p(self, text: str, cls: str = "") -> "Html":
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>" if cls else f"<p>{html.escape(text)}</p>")
        return self

    def kv(self, items: Iterable) -> "Html":
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in items)
        self.parts.append(f"<table class='kv'>{rows}</table>")
        return self

    def table(self, headers: Sequence[str], rows: Iterable[Sequence], highlight: Optional[Sequence[bool]] = None,
              limit: int = 500) -> "Html":
        rows = list(rows)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = []
        for i, r in enumerate(rows[:limit]):
            cls = " class='flag'" if highlight is not None and highlight[i] else ""
            body.append(f"<tr{cls}>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>")
        more = f"<p>{len(rows) - limit} more rows in report.json</p>" if len(rows) > limit else ""
        self.parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>{more}")
        return self

    def image(self, image, alt: str) -> "Html":
        self.parts.append(f"<figure><img src='{data_uri(image)}' alt='{html.escape(alt)}'>"
                          f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        return self

    def render(self) -> str:
        css = ("body{font-family:sans-serif;max-width:1100px;margin:24px auto;color:#222}"
               "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;"
               "text-align:left;font-size:13px}table.kv th{background:#f4f4f4}tr.flag td{background:#fde2e2}"
               "figure{display:inline-block;margin:6px}figcaption{font-size:12px;color:#555}"
               "p.big{font-size:20px}p.bad{color:#b00020;font-weight:bold}p.ok{color:#1b5e20;font-weight:bold}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{css}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>\n")


def energy_section(page: Html, energy: Optional[dict]) -> None:
    """The energy table of a report (training, sampling, per volume, driving distance)."""
    if not energy:
        return
    page.h2("Energy and CO2")
    t, s, tot = energy["training"], energy["sampling"], energy["total"]
    rows = [("training", t["kwh"], t["kg_co2e"], t["driving_km"]),
            ("sampling", s["kwh"], s["kg_co2e"], s["driving_km"]),
            ("sampling per volume", s["per_volume"]["kwh"], s["per_volume"]["kg_co2e"], s["per_volume"]["driving_km"]),
            ("total", tot["kwh"], tot["kg_co2e"], tot["driving_km"])]
    page.table(["", "kWh", "kg CO2e", "driving equivalent (km)"], rows)
    page.p(f"{s['n_volumes']} generated volume(s). Driving distance: kg CO2e / "
           f"{energy['driving_factor_g_co2e_per_km']} g per km ({energy['driving_factor_source']}). "
           f"Metering: {energy['metering']}.")


def write_report(out_dir, report: dict, page: Html, pictures: Optional[dict] = None) -> dict:
    """Write report.json, report.html and the pictures (name -> PIL image, saved as
    out_dir/name) atomically; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, image in (pictures or {}).items():
        written[name] = save_png(image, out / name)
    # Pictures a previous report left in the same sub-folders would mislead: remove them.
    for folder in {Path(n).parent for n in written if Path(n).parent != Path(".")}:
        for old in (out / folder).glob("*.png"):
            if str(old.relative_to(out)) not in written:
                old.unlink(missing_ok=True)
    written["json"] = write_json_atomic(out / "report.json", to_jsonable(report))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(page.render(), encoding="utf-8")
    written["html"] = out / "report.html"
    return written


# --------------------------------------------------------------------------- the two reports


def public_report(report: dict) -> dict:
    """The report without the in-memory entries (model, embeddings, pictures)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def render_memorization(report: dict, sets: dict, top_k: int = 8, pictures_of_training: bool = True) -> tuple:
    """(public report dict, Html page, pictures) of a copy-detection report.

    sets: {"train": EvalSet, "synthetic": EvalSet} to draw the top pairs from.
    pictures_of_training=False leaves every picture of a training volume out (the shared
    report of ``medgen share``: training volumes are patient data).
    """
    rep = public_report(report)
    page = Html("Copy detection (memorization) report")
    verdict = "bad" if rep["n_copies"] else "ok"
    page.p(f"{rep['n_copies']} of {len(rep['synthetic'])} synthetic volumes ({100 * rep['copy_share']:.1f}%) are "
           f"copies of a training volume; {rep['n_memorized']} of {len(rep['train'])} training volumes "
           f"({100 * rep['memorized_share']:.1f}%) are memorised.", verdict)
    page.kv(_threshold_rows(rep) + [(f"--{k} folder", f"{v['folder']} ({v['n']} volumes, {v['layout']} "
                                     f"layout, {v['modality'].upper()}{', cine' if v['cine'] else ''})")
                                    for k, v in rep["sets"].items()])
    for note in rep.get("notes", []):
        page.p("Note: " + note)
    pictures = {}
    page.h2("Distributions")
    for sig, key, name in (("encoder", "r", "correlations.png"), ("image", "r_image", "correlations_image.png")):
        thr = rep["thresholds"][sig]
        hist = histogram({"training -> nearest validation": [t["r_val" + key[1:]] for t in rep["train"]],
                          "synthetic -> nearest training": [s[key] for s in rep["synthetic"]],
                          "training -> nearest synthetic": [t[key] for t in rep["train"]]},
                         f"{sig} signal: Pearson r of nearest neighbours", "Pearson r (log scale of 1 - r)", vline=thr,
                         vlabel=f"threshold {thr:.4f}", correlation=True)
        page.image(hist, f"Nearest-neighbour correlations of the {sig} signal and its threshold")
        pictures[name] = hist
    calibration_section(page, rep.get("calibration"))
    order = sorted(range(len(rep["synthetic"])), key=lambda i: -rep["synthetic"][i]["score"])
    page.h2(f"Closest pairs (top {min(top_k, len(order))} synthetic volumes by correlation)")
    if pictures_of_training:
        train_index = {n: i for i, n in enumerate(sets["train"].names)}
        for rank, i in enumerate(order[:top_k]):
            s = rep["synthetic"][i]
            syn = sets["synthetic"].load(i)
            tr = sets["train"].load(train_index[s["nearest_train"]])
            mod = sets["synthetic"].modality
            img = side_by_side(volume_panel(syn["image"], syn["affine"], mod),
                               volume_panel(tr["image"], tr["affine"], mod),
                               f"{s['name']} vs {s['nearest_train']}: r = {s['r']:.4f}, image r = {s['r_image']:.4f}"
                               + ("  COPY" if s["is_copy"] else ""),
                               ("synthetic " + s["name"], "training " + s["nearest_train"]))
            name = f"pairs/{rank + 1:02d}_{s['name']}__{s['nearest_train']}.png"
            pictures[name] = img
            s["picture"] = name
            page.image(img, f"{s['name']} (synthetic) next to {s['nearest_train']} (training), r = {s['r']:.4f}, "
                            f"image r = {s['r_image']:.4f}")
    else:
        page.p("Pictures of the pairs are left out of this report: they would show training (patient) volumes. "
               "Run `medgen eval memorization` for the full report.")
    page.h2("Synthetic volumes")
    page.table(["synthetic", "nearest training", "r (encoder)", "r (image)", "flagged by", "copy"],
               [(s["name"], s["nearest_train"], s["r"], s["r_image"], ", ".join(s["flagged_by"]) or "-", s["is_copy"])
                for s in (rep["synthetic"][i] for i in order)],
               highlight=[rep["synthetic"][i]["is_copy"] for i in order])
    page.h2("Training volumes")
    t_order = sorted(range(len(rep["train"])), key=lambda i: -rep["train"][i]["score"])
    page.table(["training", "nearest synthetic", "r (encoder)", "r (image)", "memorised", "nearest validation",
                "r (validation, encoder)", "r (validation, image)"],
               [(t["name"], t["nearest_synthetic"], t["r"], t["r_image"], t["is_memorized"], t["nearest_val"],
                 t["r_val"], t["r_val_image"]) for t in (rep["train"][i] for i in t_order)],
               highlight=[rep["train"][i]["is_memorized"] for i in t_order])
    page.h2("Encoder")
    enc = rep["encoder"]
    hist_ = enc["config"].get("history") or {}
    page.kv([("obtained", {"trained": "trained here", "cache": "from the cache (trained earlier on this data with "
                           "these settings)", "file": "loaded from --encoder", "given": "given"}.get(enc["source"])),
             ("seconds to obtain", enc.get("seconds")), ("input", enc["representation"]),
             ("architecture", enc["architecture"]), ("loss", enc["loss"]), ("positive pairs", enc["positives"]),
             ("training steps", f"{hist_.get('steps')} ({hist_.get('stopped', 'steps')})"),
             ("loss first -> last", f"{hist_.get('loss_first')} -> {hist_.get('loss_last')}")])
    energy_section(page, rep.get("energy"))
    return rep, page, pictures


def _threshold_rows(rep: dict) -> list:
    return [("threshold, encoder signal (Pearson r)", rep["thresholds"]["encoder"]),
            ("threshold, image signal (Pearson r)", rep["thresholds"]["image"]), ("rule", rep["threshold_rule"]),
            ("method", rep["method"]), ("encoder signal", rep["signals"]["encoder"]),
            ("image signal", rep["signals"]["image"])]


def calibration_section(page: Html, cal: Optional[dict]) -> None:
    """The --calibrate table: recall of planted degraded copies per kind and strength, and the
    false-positive rate among new subjects (no names: it goes into the shared report too)."""
    if not cal:
        return
    page.h2("What this screen can see (calibration)")
    page.p(f"Degraded copies of {cal['sources']} training volumes, every kind at every strength, screened like "
           f"synthetic volumes. Recall: {cal['recall_rule']}. New subjects: {cal['fresh_rule']}: "
           f"{cal['n_fresh_flagged']} of {cal['n_fresh']} flagged ({100 * cal['false_positive_rate']:.1f}%).")
    page.table(["degradation", "copies", "recall", "matched", "lowest r (encoder)"],
               [(r["degradation"], r["n"], r["recall"], r["matched"], r["min_r"])
                for r in cal["rows"]], highlight=[r["recall"] < 0.9 for r in cal["rows"]])


def render_quality(report: dict, modality: str) -> tuple:
    """(public report dict, Html page, pictures) of a quality report."""
    rep = public_report(report)
    pics = report.get("_pictures", {})
    page = Html("Quality report")
    div = rep["ms_ssim_diversity"]
    rows = [("MS-SSIM diversity (synthetic, mean over pairs)", div["synthetic"].get("mean")),
            ("MS-SSIM diversity (real, reference)", div["real"].get("mean")),
            ("FID", rep["fid"]["value"]), ("MMD^2", rep["mmd"]["mmd2"]),
            ("features", f"{rep['features']['extractor']}, {rep['features']['dims']} dims")]
    # Local realism heads the table: it ranks models as their pictures do; the whole-volume
    # figure rates a blurred population-mean-like sample above sharp anatomy a voxel off.
    lr = rep.get("local_realism")
    if lr:
        rows.insert(0, ("local realism (best-matching real patch r, atanh of synthetic median / real median)",
                        f"{_cell(lr['ratio'])} ({_cell(lr['synthetic_median'])} / {_cell(lr['real_median'])})"))
    rl = rep.get("realism")
    if rl:
        rows.insert(1 if lr else 0, ("whole-volume realism (nearest-neighbour r, synthetic median / real median)",
                                     f"{_cell(rl['ratio'])} ({_cell(rl['synthetic_median'])} / "
                                     f"{_cell(rl['real_median'])})"))
    ma = rep["mask_adherence"]
    if "own_map" in (ma.get("synthetic") or {}):
        for g, d in ma["synthetic"]["own_map"].items():
            rows.append((f"mask adherence, {g} Dice: own map / swapped map (control), synthetic mean",
                         f"{_cell(d.get('mean'))} / {_cell(ma['synthetic']['swapped_map'][g].get('mean'))}"))
    for k in ("mad", "nmad", "pearson"):
        rows.append((f"inter-slice {k.upper()}: real / synthetic mean, W1",
                     f"{_cell(rep['inter_slice'][k]['real'].get('mean'))} / "
                     f"{_cell(rep['inter_slice'][k]['synthetic'].get('mean'))}, "
                     f"{_cell(rep['inter_slice'][k]['wasserstein'])}"))
    page.kv([(f"--{k} folder", f"{v['folder']} ({v['n']} volumes)") for k, v in rep["sets"].items()] + rows)
    if rep["fid"].get("note"):
        page.p("FID: " + rep["fid"]["note"])
    page.p("MS-SSIM diversity: " + div["reading"] + f" ({div['metric']}).")
    page.p(f"MMD^2: {rep['mmd']['estimator']}, {rep['mmd']['kernel']} ({_cell(rep['mmd']['bandwidth'])}); near 0, "
           "and possibly slightly negative, when both sets come from one distribution.")
    page.p("Inter-slice consistency: " + rep["inter_slice"]["definition"] + ".")
    if rl:
        page.p("Whole-volume realism: " + rl["reading"] + " Definition: " + rl["definition"] + "; computed on "
               + rl["representation"] + f" (grid {' x '.join(str(v) for v in rl['grid'])}).")
    if lr:
        page.p("Local realism: " + lr["reading"] + " Definition: " + lr["definition"] + "; computed on "
               + lr["representation"] + ".")
    pictures = {}

    def add(name, img, caption):
        pictures[name] = img
        page.image(img, caption)

    page.h2("Distributions")
    ms = pics.get("ms_ssim_values", {})
    add("ms_ssim.png", histogram({"real pairs": ms.get("real", []), "synthetic pairs": ms.get("synthetic", [])},
                                 "MS-SSIM of pairs within a set (lower = more diverse)", "MS-SSIM"),
        "MS-SSIM diversity: " + div["computed_on"])
    isl = pics.get("interslice", {})
    for k, label in (("mad", "MAD"), ("nmad", "NMAD"), ("pearson", "Pearson r")):
        add(f"interslice_{k}.png", histogram({"real": isl.get("real", {}).get(k, []),
                                              "synthetic": isl.get("synthetic", {}).get(k, [])},
                                             f"adjacent slices: {label}", label),
            f"Inter-slice {label}, W1 to real = {_cell(rep['inter_slice'][k]['wasserstein'])}")
    if rep.get("temporal"):
        t = rep["temporal"]["per_volume"]
        add("temporal.png", histogram({"real": [v["step_mean"] for v in t["real"]],
                                       "synthetic": [v["step_mean"] for v in t["synthetic"]]},
                                      "mean frame-to-frame change", "mean |F_t+1 - F_t|"),
            "Temporal smoothness: " + rep["temporal"]["definition"])
        page.table(["", "real mean", "synthetic mean", "W1"],
                   [(k, rep["temporal"][k]["real"].get("mean"), rep["temporal"][k]["synthetic"].get("mean"),
                     rep["temporal"][k]["wasserstein"]) for k in ("motion", "step_mean", "closure", "closure_ratio")])
    if rep.get("cardiac") and "ef_percent" in rep["cardiac"]:
        c = pics.get("cardiac", {})
        add("ejection_fraction.png", histogram({"real": c.get("real", []), "synthetic": c.get("synthetic", [])},
                                               "ejection fraction", "EF (%)", bins=15),
            "Cardiac function from LV labels")
        page.table(["", "real mean", "synthetic mean", "W1"],
                   [(k, rep["cardiac"][k]["real"].get("mean"), rep["cardiac"][k]["synthetic"].get("mean"),
                     rep["cardiac"][k]["wasserstein"]) for k in ("ef_percent", "edv_ml", "esv_ml")])
    elif rep.get("cardiac"):
        page.p("Cardiac function: " + rep["cardiac"].get("note", ""))
    if rl:
        add("realism.png", histogram({"real -> nearest other real": [v["r"] for v in rl["real"]],
                                      "synthetic -> nearest real": [v["r"] for v in rl["synthetic"]]},
                                     "Pearson r with the nearest real volume", "Pearson r"),
            f"Nearest-neighbour realism: ratio of the medians {_cell(rl['ratio'])}")
    if lr:
        add("local_realism.png", histogram({"real -> other real volumes": [v["r"] for v in lr["real"]],
                                            "synthetic -> real volumes": [v["r"] for v in lr["synthetic"]]},
                                           "median over a volume's patches of the best-matching real patch's r",
                                           "Pearson r"),
            f"Local realism: ratio {_cell(lr['ratio'])} (Fisher z of the medians)")
    page.h2("Mask adherence")
    if "own_map" in (ma.get("synthetic") or {}):
        _ct_mask_section(page, ma)
    elif "synthetic" in ma:
        labels = sorted(set(ma["synthetic"]) | set(ma["real_reference"]), key=int)
        page.table(["label", "Dice synthetic (mean)", "n", "Dice real reference (mean)"],
                   [(lab, ma["synthetic"].get(lab, {}).get("mean"), ma["synthetic"].get(lab, {}).get("n"),
                     ma["real_reference"].get(lab, {}).get("mean")) for lab in labels])
        page.p(ma["segmentation"])
    else:
        page.p(ma.get("note", ""))
    page.h2("Example volumes")
    for key in ("synthetic", "real"):
        for name, image, affine in pics.get(key, []):
            add(f"examples/{key}_{name}.png", volume_panel(image, affine, modality), f"{key}: {name}")
    energy_section(page, rep.get("energy"))
    return rep, page, pictures


def _ct_mask_section(page: Html, ma: dict) -> None:
    """The CT mask adherence tables: Dice with the own map against the swapped-map control."""
    ref = ma.get("real_reference") or {}
    rows = []
    for g, d in ma["synthetic"]["own_map"].items():
        lo, hi = ma["groups"][g]["hu_range"]
        rows.append((f"{g} (labels {', '.join(str(v) for v in ma['groups'][g]['labels'])}; {lo:g} to {hi:g} HU)",
                     d.get("mean"), ma["synthetic"]["swapped_map"][g].get("mean"), d.get("n"),
                     ref.get("own_map", {}).get(g, {}).get("mean"), ref.get("swapped_map", {}).get(g, {}).get("mean")))
    page.table(["group", "Dice synthetic, own map (mean)", "Dice synthetic, swapped map (control)", "n",
                "Dice real, own map", "Dice real, swapped map"], rows)
    page.p("Mask adherence: does each generated volume follow its conditioning map? Own map well above the "
           "swapped map (another subject's map) = it does; the two about equal = the map is ignored; the real "
           "columns are what real subjects reach. Segmentation: " + ma["segmentation"] + ". Control: "
           + ma["control"] + ".")
    for note in ma.get("notes", []):
        page.p("Note: " + note)
    groups = list(ma["groups"])
    page.table(["synthetic"] + [f"{g} Dice" for g in groups] + ["control map"]
               + [f"{g} Dice (control)" for g in groups],
               [[v["name"]] + [v.get(g) for g in groups] + [v.get("control_map")]
                + [v.get(f"control_{g}") for g in groups] for v in ma["per_volume"]])


def render_shared(shared: dict, info: dict) -> Html:
    """The page of the report ``medgen share`` puts beside the shared volumes: the numbers,
    the correlation histogram and the decision; no pixels and no names of training volumes
    (``shared`` is the output of ``share.redact``)."""
    page = Html("Synthetic data sharing report")
    cls = "bad" if info["decision"] == "refused" else "ok"
    page.p(f"Decision: {info['decision']}. {shared['n_copies']} of {len(shared['synthetic'])} synthetic volumes "
           f"({100 * shared['copy_share']:.1f}%) are copies of a training volume (limit "
           f"{100 * info['max_copy_share']:.1f}%); {shared['n_memorized']} training volumes "
           f"({100 * shared['memorized_share']:.1f}%) are memorised.", cls)
    page.kv(_threshold_rows(shared) + [("forced", info["forced"]), ("shared volumes", len(info["shared"])),
                                       ("withheld (copies)", ", ".join(info["withheld"]) or "none")])
    for sig, key in (("encoder", "r"), ("image", "r_image")):
        thr = shared["thresholds"][sig]
        page.image(histogram({"synthetic -> nearest training": [s[key] for s in shared["synthetic"]]},
                             f"{sig} signal: Pearson r of each synthetic volume with its nearest training volume",
                             "Pearson r (log scale of 1 - r)", vline=thr, vlabel=f"threshold {thr:.4f}",
                             correlation=True),
                   f"Correlation with the nearest training volume, {sig} signal")
    page.table(["synthetic", "r (encoder)", "r (image)", "flagged by", "copy (withheld)"],
               [(s["name"], s["r"], s["r_image"], ", ".join(s["flagged_by"]) or "-", s["is_copy"])
                for s in shared["synthetic"]],
               highlight=[s["is_copy"] for s in shared["synthetic"]])
    calibration_section(page, shared.get("calibration"))
    page.p(shared["redacted"])
    energy_section(page, shared.get("energy"))
    return page
