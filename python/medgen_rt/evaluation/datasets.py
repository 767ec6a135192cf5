"""The volume sets that evaluation reads: training, validation, real and synthetic folders.

A folder is recognised by its layout (first match wins):

* ACDC: ``patientNNN/`` sub-folders (``medgen phantom cmr4d``, the public ACDC data);
  labels at ED and ES come from ``patientNNN_frameEE_gt.nii.gz``.
* images + masks: ``images/*.nii.gz`` and optional ``masks/`` with the same names
  (``medgen phantom ct``).
* flat: ``*.nii[.gz]`` directly in the folder (``medgen sample`` output); ``NAME_mask.nii.gz``
  is NAME's mask, ``NAME.json`` its sidecar, ``NAME.png``/``NAME.gif`` its previews.

Volumes are read lazily (``load(i)``), so large sets are never held in memory at once.
Every problem raises :class:`EvalInputError` whose message starts with the argument
(e.g. ``--synthetic``) so the user knows which folder is wrong.
"""
from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.loaders import DataError, dataset_labels, list_volumes, parse_info_cfg
from ..data.phantoms import CMR_LABELS, CT_LABELS
from ..data.preprocess import ct_to_unit, minmax_to_unit
from ..io.nifti import NiftiError, check_labels, is_nifti_path, nifti_stem, read_header, read_info, read_volume

__all__ = ["EvalInputError", "EvalEntry", "EvalSet", "open_set", "check_compatible", "same_shape", "to_unit",
           "to_display01"]

MODALITIES = ("ct", "mr")
_PATIENT = re.compile(r"^patient\d+$")
_MASK_SUFFIXES = ("_mask", "_gt", "_seg", "_label")
_COMPANIONS = (".json", ".png", ".gif")


class EvalInputError(ValueError):
    """Bad evaluation input; the message names the command-line argument."""


@dataclass
class EvalEntry:
    """One volume of a set (nothing read yet).

    files: every file that belongs to this volume, for the sharing gate (image, mask,
    sidecar, previews; for ACDC the whole patient folder).
    """

    name: str
    image: Path
    mask: Optional[Path] = None
    sidecar: Optional[Path] = None
    files: list = field(default_factory=list)
    acdc: Optional[dict] = None  # Info.cfg and the ED/ES label paths of an ACDC patient


@dataclass
class EvalSet:
    """A folder of volumes. ``modality``: "ct" (HU) or "mr"; ``ndim``: 3 or 4 (cine)."""

    arg: str
    root: Path
    layout: str
    entries: list
    modality: str
    ndim: int
    labels: object = None  # data.loaders._Labels: the values its masks may hold (None: any 0..255)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list:
        return [e.name for e in self.entries]

    @property
    def is_cine(self) -> bool:
        return self.ndim == 4

    def load(self, i: int) -> dict:
        """Volume i: dict(name, image float32 raw values, affine, mask uint8 or None,
        labels dict {"ed": (X,Y,Z), "es": (X,Y,Z)} for ACDC cine (else None), ed/es
        1-based frame numbers or None, sidecar dict or None)."""
        e = self.entries[i]
        try:
            vol = read_volume(e.image, dtype=np.float32)
        except NiftiError as exc:
            raise EvalInputError(f"{self.arg}: {exc}") from exc
        image = vol.array
        if image.ndim != self.ndim:
            raise EvalInputError(f"{self.arg}: {e.image} is {image.ndim}-D but the set's first volume is "
                                 f"{self.ndim}-D; a set holds either 3D volumes or cines")
        if not np.all(np.isfinite(image)):
            raise EvalInputError(f"{self.arg}: {e.image} has non-finite values (NaN/Inf)")
        mask = None
        if e.mask is not None:
            mask = _read_label(self.arg, e.mask, image.shape, self.labels)
        labels, ed, es = None, None, None
        if e.acdc is not None:
            ed, es = e.acdc["ED"], e.acdc["ES"]
            labels = {k: _read_label(self.arg, p, image.shape[:3], self.labels) for k, p in e.acdc["gt"].items()}
        sidecar = None
        if e.sidecar is not None:
            try:
                sidecar = json.loads(e.sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                sidecar = None  # a broken sidecar does not make the volume unusable
        return {"name": e.name, "image": image, "affine": vol.affine, "mask": mask, "labels": labels,
                "ed": ed, "es": es, "sidecar": sidecar, "frame_duration": vol.frame_duration}

    def load_mask(self, i: int) -> Optional[np.ndarray]:
        """Volume i's mask alone (uint8), or None: e.g. another subject's map for a control."""
        e = self.entries[i]
        if e.mask is None:
            return None
        try:
            shape = read_info(e.image).shape
        except NiftiError as exc:
            raise EvalInputError(f"{self.arg}: {exc}") from exc
        return _read_label(self.arg, e.mask, shape, self.labels)

    def unit(self, i: int) -> np.ndarray:
        """Volume i in [-1, 1]: CT clipped to [-1000, 1000] HU / 1000; MR per-volume min-max."""
        return to_unit(self.load(i)["image"], self.modality)


def to_unit(image: np.ndarray, modality: str) -> np.ndarray:
    """The published preprocessing: CT [-1000, 1000] HU -> [-1, 1]; MR min-max -> [-1, 1]."""
    return ct_to_unit(image) if modality == "ct" else minmax_to_unit(image)


def to_display01(image: np.ndarray, modality: str) -> np.ndarray:
    """[0, 1] intensities for the image metrics (MS-SSIM, slice statistics)."""
    return (to_unit(image, modality) + 1.0) * 0.5


def _read_label(arg: str, path: Path, shape=None, known=None) -> np.ndarray:
    """A label map as uint8 (values 0..255); shape: its image's, checked when given; known:
    the set's label values (data.loaders._Labels), checked when it lists them."""
    try:
        m = read_volume(path, dtype=None).array
    except NiftiError as exc:
        raise EvalInputError(f"{arg}: {exc}") from exc
    if shape is not None and tuple(m.shape) != tuple(shape):
        raise EvalInputError(f"{arg}: mask {path} has shape {tuple(m.shape)}, its image {tuple(shape)}")
    if m.dtype.kind == "f" and not np.array_equal(m, np.rint(m)):
        raise EvalInputError(f"{arg}: mask {path} has non-integer values")
    if m.size and (m.min() < 0 or m.max() > 255):
        raise EvalInputError(f"{arg}: mask {path} values must be in 0..255")
    if known is not None and known.values is not None:
        try:
            check_labels(path, m, known.values, known.whose)
        except NiftiError as exc:
            raise EvalInputError(f"{arg}: {exc}") from None
    return m.astype(np.uint8)


def _is_mask_name(stem: str) -> bool:
    return any(stem.endswith(s) for s in _MASK_SUFFIXES)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for suffix in (".nii.gz", ".nii"):
        p = folder / (stem + suffix)
        if p.is_file():
            return p
    return None


def _check_links(arg: str, folder: Path) -> None:
    """Refuse links that lead nowhere among a folder's entries: a loop (or a NIfTI name whose
    target is gone) would otherwise drop out of the listing silently, and a set would be
    evaluated without telling the user that volumes are missing."""
    try:
        items = list(os.scandir(folder))
    except OSError as exc:
        raise EvalInputError(f"{arg}: cannot list {folder}: {exc.strerror or exc}") from None
    for item in items:
        if item.name.startswith(".") or not item.is_symlink():
            continue
        try:
            os.stat(item.path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise EvalInputError(f"{arg}: {item.path} is a symbolic link loop; remove it") from None
            if is_nifti_path(item.name):
                raise EvalInputError(f"{arg}: {item.path} is a symbolic link to a missing file; remove it") from None


def _is_sample_sidecar(path: Optional[Path]) -> bool:
    """A JSON sidecar as `medgen sample` writes it (other tools' JSON files do not count)."""
    if path is None:
        return False
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "modality" in meta and "files" in meta


def _check_sidecars(arg: str, entries: list) -> None:
    """In a folder of samples, a volume without its sidecar was left by an interrupted `medgen sample`
    (the sidecar is the last file it writes): possibly without its mask or preview, and not what the
    run reports. Refuse rather than skip, so that a copy rate is never computed on a set that
    silently differs from the folder. Folders without sample sidecars (real data, phantoms) pass."""
    with_sidecar = [e for e in entries if _is_sample_sidecar(e.sidecar)]
    if not with_sidecar:
        return
    missing = [e for e in entries if e.sidecar is None]
    if missing:
        e = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvalInputError(f"{arg}: {e.image} has no sidecar {e.name}.json{more} while {len(with_sidecar)} other "
                             "volume(s) have one: it looks left by an interrupted `medgen sample`; delete it or "
                             "sample it again")


def _acdc_entries(arg: str, root: Path, folders: list) -> list:
    entries = []
    for f in folders:
        _check_links(arg, f)
        image = _find(f, f"{f.name}_4d")
        if image is None:
            raise EvalInputError(f"{arg}: {f / (f.name + '_4d.nii.gz')}: 4D image not found")
        try:
            info = parse_info_cfg(f / "Info.cfg")
        except DataError as exc:
            raise EvalInputError(f"{arg}: {exc}") from exc
        gt = {}
        for key in ("ed", "es"):
            p = _find(f, f"{f.name}_frame{info[key.upper()]:02d}_gt")
            if p is not None:
                gt[key] = p
        entries.append(EvalEntry(name=f.name, image=image, files=[f.relative_to(root)],
                                 acdc={"ED": info["ED"], "ES": info["ES"], "gt": gt}))
    return entries


def _folder_entries(root: Path, images_dir: Path, masks_dir: Optional[Path]) -> list:
    entries = []
    for p in list_volumes(images_dir):
        stem = nifti_stem(p)
        if images_dir == root and _is_mask_name(stem) and any(
                _find(root, stem[: -len(s)]) for s in _MASK_SUFFIXES if stem.endswith(s)):
            continue  # NAME_mask.nii.gz next to NAME.nii.gz is a mask, not a volume
        files = [p.relative_to(root)]
        mask = None
        if masks_dir is not None:
            mask = masks_dir / p.name if (masks_dir / p.name).is_file() else None
        else:
            for s in _MASK_SUFFIXES:
                mask = mask or _find(images_dir, stem + s)
        if mask is not None:
            files.append(mask.relative_to(root))
        sidecar = None
        for ext in _COMPANIONS:
            c = p.with_name(stem + ext)
            if c.is_file():
                files.append(c.relative_to(root))
                if ext == ".json":
                    sidecar = c
        entries.append(EvalEntry(name=stem, image=p, mask=mask, sidecar=sidecar, files=files))
    return entries


def _detect_modality(arg: str, entry: EvalEntry, ndim: int) -> str:
    if entry.sidecar is not None:
        try:
            m = json.loads(entry.sidecar.read_text(encoding="utf-8")).get("modality")
        except (OSError, ValueError, AttributeError):
            m = None
        if m in ("ct", "cmr", "mr"):
            return "ct" if m == "ct" else "mr"
    if ndim == 4:
        return "mr"
    descrip = bytes(read_header(entry.image)["descrip"]).split(b"\0")[0].decode("ascii", "replace")
    if descrip.startswith("medgen_rt "):
        return "ct" if descrip.endswith("ct") else "mr"
    # Unknown origin: CT in HU has air near -1000, MR magnitudes are >= 0.
    image = read_volume(entry.image).array
    return "ct" if float(image.min()) <= -500.0 else "mr"


def open_set(path, arg: str, modality: str = "auto") -> EvalSet:
    """Open a folder of volumes (see the module docstring); nothing but headers is read.

    arg: the command-line argument it came from, used in every error message.
    modality: "auto" (sidecar "modality", the medgen_rt NIfTI description, cine -> mr,
    else CT when the first volume reaches -500 or below), "ct" or "mr".
    """
    if modality not in ("auto", *MODALITIES):
        raise EvalInputError(f"--modality: expected auto, ct or mr, got {modality!r}")
    if path is None:
        raise EvalInputError(f"{arg}: a folder is required")
    root = Path(path)
    if not root.exists():
        if root.is_symlink():
            raise EvalInputError(f"{arg}: {root} is a symbolic link to nothing (or a loop)")
        raise EvalInputError(f"{arg}: {root} does not exist")
    if not root.is_dir():
        raise EvalInputError(f"{arg}: {root} is not a folder")
    _check_links(arg, root)
    patients = sorted(p for p in root.iterdir() if p.is_dir() and _PATIENT.match(p.name))
    if patients:
        layout, entries = "acdc", _acdc_entries(arg, root, patients)
    elif (root / "images").is_dir():
        masks = root / "masks"
        for folder in (root / "images", masks):
            if folder.is_dir():
                _check_links(arg, folder)
        layout, entries = "images", _folder_entries(root, root / "images", masks if masks.is_dir() else None)
    else:
        layout, entries = "flat", _folder_entries(root, root, None)
    _check_sidecars(arg, entries)
    if not entries:
        raise EvalInputError(f"{arg}: {root} holds no NIfTI volumes (*.nii, *.nii.gz; ACDC patientNNN/ "
                             "folders or images/ are recognised too)")
    ranks = {}
    for e in entries:
        try:
            info = read_info(e.image)
        except NiftiError as exc:
            raise EvalInputError(f"{arg}: {exc}") from exc
        if info.ndim not in (3, 4):
            raise EvalInputError(f"{arg}: {e.image} has shape {info.shape}; expected 3D (X,Y,Z) or cine (X,Y,Z,T)")
        ranks.setdefault(info.ndim, e.image)
    if len(ranks) > 1:
        raise EvalInputError(f"{arg}: mixes 3D volumes ({ranks[3].name}) and cines ({ranks[4].name})")
    ndim = next(iter(ranks))
    if modality == "auto":
        modality = _detect_modality(arg, entries[0], ndim)
    if ndim == 4 and modality == "ct":
        raise EvalInputError(f"{arg}: cine (4D) volumes must be MR, not CT")
    # the training data's conventions: ACDC's labels, medgen_rt's CT labels (dataset.json may list others)
    try:
        labels = dataset_labels(root, *(({**CMR_LABELS}, "ACDC") if layout == "acdc" else
                                        (CT_LABELS, "medgen_rt CT") if modality == "ct" else (None, "")))
    except DataError as exc:
        raise EvalInputError(f"{arg}: {exc}") from None
    return EvalSet(arg=arg, root=root, layout=layout, entries=entries, modality=modality, ndim=ndim, labels=labels)


def check_compatible(reference: EvalSet, *others: EvalSet) -> None:
    """All sets must hold the same kind of volume (3D vs cine, CT vs MR)."""
    for s in others:
        if s.ndim != reference.ndim:
            kinds = {3: "3D volumes", 4: "cines (X,Y,Z,T)"}
            raise EvalInputError(f"{s.arg}: holds {kinds[s.ndim]} but {reference.arg} holds {kinds[reference.ndim]}")
        if s.modality != reference.modality:
            raise EvalInputError(f"{s.arg}: looks like {s.modality.upper()} but {reference.arg} like "
                                 f"{reference.modality.upper()}; pass --modality if the guess is wrong")


def same_shape(s: EvalSet) -> tuple:
    """The common (X,Y,Z[,T]) shape of a set's volumes; EvalInputError when they differ."""
    shapes = {}
    for e in s.entries:
        shapes.setdefault(tuple(read_info(e.image).shape), e.image)
    if len(shapes) > 1:
        (a, pa), (b, pb) = list(shapes.items())[:2]
        raise EvalInputError(f"{s.arg}: volumes differ in shape ({pa.name}: {a}, {pb.name}: {b}); this metric "
                             "compares volumes voxel by voxel")
    return next(iter(shapes))
