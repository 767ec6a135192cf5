"""The sharing gate: screen a synthetic set for copies of training volumes, then copy only
the volumes that are not copies (with their masks, sidecars and previews) to a folder
meant to leave the hospital, with the screening report beside them.

If the share of copies is above the limit, nothing is shared but the report (unless
forced). The output is assembled in a hidden temporary sibling folder and renamed into
place at the end, so ``out`` is either complete or absent.

The shared report holds no pixels and no names of training volumes (patient data); the
full report with the pictures of the closest pairs goes to a separate, internal folder.

No file is copied as it is: every file that leaves is rebuilt from what was screened, so
nothing can ride along with a screened volume.

* image: written again from the voxels the screen judged (no header extras);
* conditioning mask: withheld when it equals, or nearly equals, a mask of the real sets
  (a training patient's anatomy); otherwise written again as a label map;
* previews: drawn again from the screened volume (a planted picture is never copied);
* sidecar: written again with the keys that describe the sample (seed, sampler, steps,
  guidance, timings, energy, ...) and the gate's verdict; model folders reduced to their
  names; any other key, and the conditioning mask's source path, dropped.
* DICOM (formats with "dicom"): NAME_dicom/ written from the screened voxels and the shared
  mask (medgen_rt.io.dicom), every object carrying the gate's verdict.

A file that is a symbolic link, or lies in a folder reached through one, is never followed:
an image behind a link leaves its whole volume out, a companion behind one is left out.
Everything left out is listed with the reason in the sharing info (and the shared report).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.atomic import check_out, temp_sibling
from .datasets import EvalInputError, _read_label

__all__ = ["check_out_dir", "redact", "gate", "MaskIndex", "safe_sidecar"]

# Sidecar keys that describe how a sample was made and hold no local paths or patient data.
SIDECAR_KEYS = ("kind", "preset", "seed", "index", "rank", "sampler", "steps", "eta", "guidance", "timings_s",
                "peak_process_rss_gb", "peak_cuda_allocated_gb", "plan", "device", "engine", "energy", "modality",
                "shape", "spacing_mm", "frame_duration_s", "frame_duration_note", "final")
# Path-valued keys whose base name is the model's name.
NAME_KEYS = ("model", "vae")
# Report keys whose values are local folders or files.
_REPORT_PATH_KEYS = ("folder", "run", "saved_to", "path")
# A conditioning mask whose foreground overlaps a real mask's this much (intersection over
# union) is that patient's anatomy with small edits. Different CT phantom subjects overlap at
# most 0.90 (16x16x8 voxels) and 0.84 (64x64x32); one voxel changed in an 80-voxel map is 0.99.
NEAR_MASK_IOU = 0.95
LINK = "a symbolic link; links are never followed"


def _base_name(text: str) -> str:
    """'/x/runs/dit/../vae' -> 'vae': a local path reduced to the name it ends in."""
    return os.path.basename(os.path.normpath(text.replace("\\", "/"))) or text


def _paths_to_names(obj, every_path: bool):
    """Recursively reduce path strings to base names. every_path: any string with a slash
    (sidecars: structured values only); else absolute paths alone (reports hold prose)."""
    if isinstance(obj, dict):
        return {k: (_base_name(v) if k in _REPORT_PATH_KEYS and isinstance(v, str) else _paths_to_names(v, every_path))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_paths_to_names(v, every_path) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")
                                 or (every_path and ("/" in obj or "\\" in obj))):
        return _base_name(obj)
    return obj


def safe_sidecar(meta: dict, files: dict, mask_note: Optional[str] = None, verdict: Optional[str] = None) -> dict:
    """The sidecar that leaves with a sample: SIDECAR_KEYS as they are (paths in them reduced
    to names), model folders as names, ``files`` as shared, ``mask`` the shared mask's name or
    why it was withheld (never where it came from), ``sharing.verdict`` the gate's verdict
    (`medgen export dicom` records it); every other key is dropped."""
    out = {k: _paths_to_names(meta[k], True) for k in SIDECAR_KEYS if k in meta}
    if verdict is not None:
        out["sharing"] = {"verdict": verdict}
    for k in NAME_KEYS:
        if isinstance(meta.get(k), str):
            out[k] = _base_name(meta[k])
    if meta.get("mask") == "null condition":
        out["mask"] = "null condition"
    elif "mask" in files:
        out["mask"] = files["mask"]
    elif mask_note is not None:
        out["mask"] = mask_note
    out["files"] = dict(files)
    return out


def check_out_dir(out: Path, synthetic_root: Path) -> None:
    """``out`` must be new or an empty folder, and not inside the synthetic folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty; choose a new folder")
    o, s = out.resolve(), Path(synthetic_root).resolve()
    if o == s or s in o.parents:
        raise ValueError(f"--out: {out} is inside --synthetic {synthetic_root}")
    check_out(out, "--out")  # writable, names the filesystem takes: before the screening


def redact(report: dict) -> dict:
    """The screening report without training-volume names, training folders or pictures."""
    r = copy.deepcopy(report)
    r.pop("train", None)
    for s in r.get("synthetic", []):
        s.pop("nearest_train", None)
        s.pop("picture", None)
    for key in ("train", "val"):
        if key in r.get("sets", {}):
            r["sets"][key] = {k: v for k, v in r["sets"][key].items() if k != "folder"}
    r.get("encoder", {}).pop("saved_to", None)  # a local file that is not shared
    r = _paths_to_names(r, False)
    r["redacted"] = ("training-volume names, training folders, local paths and pictures are left out: this report "
                     "is shared with the synthetic volumes")
    return r


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # empty (checked before screening)
    os.replace(tmp, out)


class MaskIndex:
    """Fingerprints of every label map of some real sets (masks, ACDC ground truth): shape, a
    hash of the voxels and the foreground size; a map is read again only to confirm a near match.
    Built before the screening so a broken real mask is reported before the long work."""

    def __init__(self, real_sets=()):
        self.items = []  # (shape, sha256, foreground voxels, path, arg)
        for s in real_sets:
            for e in s.entries:
                for path in _label_files(e):
                    m = _read_label(s.arg, path)
                    self.items.append((m.shape, _digest(m), int(np.count_nonzero(m)), path, s.arg))

    @classmethod
    def for_sets(cls, synthetic_set, real_sets) -> "MaskIndex":
        """The index a synthetic set needs: empty (nothing read) when it holds no masks."""
        needed = any(_label_files(e) for e in synthetic_set.entries)
        return cls(real_sets if needed else ())

    def match(self, m: np.ndarray) -> Optional[str]:
        """Why ``m`` must not be shared (it equals or nearly equals a real mask), else None."""
        digest, fg = _digest(m), int(np.count_nonzero(m))
        for shape, d, n, path, arg in self.items:
            if shape != m.shape:
                continue
            if d == digest:
                return f"voxel-identical to a mask of {arg} (a training mask is patient data)"
            # IoU >= q needs |n - fg| <= (1 - q) * (n + fg): compare voxels only when it can hold
            if fg and n and abs(n - fg) <= (1.0 - NEAR_MASK_IOU) * (n + fg):
                a, b = m != 0, _read_label(arg, path) != 0
                union = np.count_nonzero(a | b)
                if union and np.count_nonzero(a & b) >= NEAR_MASK_IOU * union:
                    return (f"nearly equal to a mask of {arg} (foreground overlap >= {NEAR_MASK_IOU:g}; a training "
                            "mask is patient data)")
        return None


def _label_files(entry) -> list:
    files = [entry.mask] if entry.mask is not None else []
    if entry.acdc is not None:
        files += list(entry.acdc["gt"].values())
    return files


def _digest(m: np.ndarray) -> str:
    return hashlib.sha256(repr(m.shape).encode() + np.ascontiguousarray(m, dtype=np.uint8).tobytes()).hexdigest()


def _through_link(root: Path, path: Path) -> bool:
    """Whether ``path`` or a folder between ``root`` and it is a symbolic link."""
    p = Path(path)
    for _ in Path(p).relative_to(root).parts:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def _write_previews(dst_image: Path, array: np.ndarray, affine: np.ndarray, modality: str,
                    frame_duration, kinds: set) -> dict:
    """Previews drawn from the screened volume (as `medgen sample` draws them); {kind: path}."""
    from medgen_rt.io.atomic import split_suffix
    from medgen_rt.io.preview import write_ct_preview, write_cine_gif, write_cine_montage

    base = dst_image.with_name(split_suffix(dst_image.name)[0])
    written = {}
    if array.ndim == 4:
        if ".png" in kinds:
            written["preview"] = write_cine_montage(base.with_suffix(".png"), array, affine)
        if ".gif" in kinds:
            written["animation"] = write_cine_gif(base.with_suffix(".gif"), array, affine, frame_duration)
    elif kinds:
        window = (-1000.0, 1000.0)
        if modality != "ct":  # MR in scanner units: the central intensities
            lo, hi = np.percentile(array, [0.5, 99.5])
            window = (float(lo), float(hi if hi > lo else lo + 1.0))
        written["preview"] = write_ct_preview(base.with_suffix(".png"), array, affine, window=window)
    return written


def _share_entry(synthetic_set, e, tmp: Path, real_masks: "MaskIndex", left_out: list,
                 formats=frozenset({"nifti"}), verdict: Optional[str] = None) -> bool:
    """Rebuild one screened volume's files under ``tmp`` (NIfTI and/or a DICOM folder, as
    ``formats`` says); False when the volume itself is not shared."""
    from medgen_rt.io.nifti import NiftiError, read_volume, write_volume
    from medgen_rt.io.sidecar import write_json_atomic

    root = synthetic_set.root

    def rel(p):
        return Path(p).relative_to(root)

    def leave(p, why):
        left_out.append({"file": str(rel(p)), "reason": why})

    if _through_link(root, e.image):
        leave(e.image, LINK + "; the volume and its files are not shared")
        return False
    try:
        vol = read_volume(e.image, dtype=np.float32)
    except NiftiError as exc:
        leave(e.image, f"unreadable ({exc}); the volume and its files are not shared")
        return False
    image, modality = vol.array, synthetic_set.modality
    frame = vol.frame_duration if image.ndim == 4 else None
    dst = tmp / rel(e.image)
    dst.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    if "nifti" in formats:
        write_volume(dst, image, vol.affine, kind="ct" if modality == "ct" else "mr", frame_duration=frame)
        files["image"] = dst.name

    meta = None
    if e.sidecar is not None:
        if _through_link(root, e.sidecar):
            leave(e.sidecar, LINK)
        else:
            try:
                meta = json.loads(e.sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                leave(e.sidecar, f"unreadable JSON ({exc})")
            if meta is not None and not isinstance(meta, dict):
                leave(e.sidecar, "not a JSON object")
                meta = None

    mask_note, seg_mask = None, None
    labels = [("mask", e.mask)] if e.mask is not None else []
    if e.acdc is not None:
        labels += [(f"labels_{k}", p) for k, p in e.acdc["gt"].items()]
    for kind, p in labels:
        if _through_link(root, p):
            leave(p, LINK)
            mask_note = "withheld: " + LINK
            continue
        try:
            m = _read_label(synthetic_set.arg, p, image.shape[:3] if e.acdc is not None else image.shape)
        except EvalInputError as exc:
            leave(p, f"not a valid label map ({exc})")
            continue
        why = real_masks.match(m)
        if why is not None:
            leave(p, why)
            mask_note = "withheld: " + why
            continue
        if kind == "mask":
            seg_mask = m  # the conditioning mask: the DICOM SEG of the image
        if "nifti" in formats:
            write_volume(tmp / rel(p), m, vol.affine, kind="label")
            files[kind] = os.path.relpath(rel(p), rel(e.image).parent)  # as the sidecar beside the image sees it
        elif kind != "mask":
            leave(p, "ACDC frame labels are shared as NIfTI only (--format nifti or nifti+dicom)")

    if "dicom" in formats:
        from medgen_rt.io.atomic import split_suffix
        from medgen_rt.io.dicom import dicom_folder_name, write_dicom

        folder = dst.with_name(dicom_folder_name(split_suffix(dst.name)[0]))
        write_dicom(folder, image, vol.affine, "ct" if modality == "ct" else ("cmr" if image.ndim == 4 else "mr"),
                    safe_sidecar(meta or {}, {}), mask=seg_mask, frame_duration=frame, verdict=verdict)
        files["dicom"] = folder.name

    if e.acdc is not None:  # only the frames and their count; no patient details (height, weight, group)
        cfg = tmp / rel(e.image).parent / "Info.cfg"
        cfg.write_text(f"ED: {e.acdc['ED']}\nES: {e.acdc['ES']}\nNbFrame: {image.shape[3]}\n", encoding="utf-8")

    kinds = set()
    for f in e.files:
        p = root / f
        if p.suffix in (".png", ".gif") and p != e.image:
            kinds.add(p.suffix)
            if _through_link(root, p):
                leave(p, LINK + "; the preview was drawn again from the screened volume")
    for kind, path in _write_previews(dst, image, vol.affine, modality, frame, kinds).items():
        files[kind] = Path(path).name

    if meta is not None:
        write_json_atomic(tmp / rel(e.sidecar), safe_sidecar(meta, files, mask_note, verdict))
    return True


def _verdict(report: dict, name: str, forced: bool) -> str:
    """What the gate found for one shared volume, in words (recorded in its sidecar and DICOM objects)."""
    entry = next((s for s in report.get("synthetic", []) if s.get("name") == name), {})
    r, thr = entry.get("r"), report.get("threshold")
    found = f" (nearest training volume r = {r:.4f}, threshold {thr:.4f})" if r is not None and thr is not None else ""
    return (f"shared by medgen share: not a copy of a training volume{found}"
            + ("; the gate was forced (--force) over the copy-share limit" if forced else ""))


def gate(report: dict, synthetic_set, out, max_copy_share: float = 0.0, force: bool = False,
         write=None, real_masks=(), formats=frozenset({"nifti"})) -> dict:
    """Share the non-copies of ``synthetic_set`` into ``out`` given a screening ``report``.

    write(folder, sharing_info): writes the shared report into ``folder``.
    real_masks: a MaskIndex, or the real EvalSets (training, validation) whose masks no
    shared conditioning mask may equal. formats: the shared volumes as "nifti" and/or "dicom"
    (medgen_rt.io.dicom: the DICOM objects carry the gate's verdict).
    Returns the sharing info: decision ("shared" or "refused"), the limit, the names shared
    and withheld, and the files left out with the reason (``left_out``).
    """
    if not isinstance(real_masks, MaskIndex):
        real_masks = MaskIndex(real_masks)
    out = Path(out).absolute()
    copies = {s["name"] for s in report["synthetic"] if s["is_copy"]}
    share = report["copy_share"]
    refused = share > max_copy_share and not force
    kept = [e for e in synthetic_set.entries if e.name not in copies]
    info = {"decision": "refused" if refused else "shared", "max_copy_share": float(max_copy_share),
            "copy_share": share, "forced": bool(force and share > max_copy_share),
            "shared": [], "withheld": sorted(copies), "left_out": [],
            "rule": "volumes whose nearest training volume correlates above the threshold are withheld; when "
                    "their share is above max_copy_share nothing is shared unless forced",
            "files_rule": "every shared file is rebuilt from the screened volume: the image from its voxels, "
                          "previews drawn again, sidecars with the sampling settings only (no paths but model "
                          "names); conditioning masks equal or nearly equal to a mask of the real sets are "
                          "withheld; symbolic links are never followed"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, f"{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        if not refused:
            for e in kept:
                if _share_entry(synthetic_set, e, tmp, real_masks, info["left_out"], formats,
                                _verdict(report, e.name, info["forced"])):
                    info["shared"].append(e.name)
        if write is not None:
            write(tmp, info)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
