"""Dataset readers: a folder of volumes (+ optional masks) and the ACDC cine layout.

Validation policy (both datasets):

* On construction every file's *header* is checked (cheap: the first bytes of each file
  plus, for .nii.gz, the gzip trailer): readable NIfTI, not truncated, right rank,
  image/mask shapes agree, ACDC Info.cfg complete and consistent with the 4D image.
  All problems are collected and raised as one :class:`DataError` listing every file.
* Voxel-level checks (non-finite values, non-integer, negative or unknown mask labels) need the
  whole file; they run when an item is loaded, or for everything with
  ``validate(full=True)``.

Nothing bad is skipped silently: a file that fails raises, it is never dropped.
Items are plain dicts of numpy arrays so a torch Dataset can wrap them without copying.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..io.nifti import NiftiError, Volume, check_labels, is_nifti_path, nifti_stem, read_info, read_volume
from .phantoms import CMR_LABELS, CT_LABELS
from .preprocess import ct_to_unit, frame_indices, minmax_to_unit

__all__ = ["DataError", "VolumeFolder", "ACDCDataset", "parse_info_cfg", "list_volumes", "dataset_labels"]

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A dataset is unusable; the message names every offending file and the problem."""


def _raise_problems(where: Path, problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0])
    lines = "\n".join(f"  - {p}" for p in problems)
    raise DataError(f"{where}: {len(problems)} problems found:\n{lines}")


def list_volumes(folder: PathLike) -> list[Path]:
    """Sorted NIfTI files (*.nii, *.nii.gz) directly in ``folder``, hidden files excluded.

    Hidden names are skipped because atomic writers use hidden temporary files.
    """
    folder = Path(folder)
    named = [p for p in folder.iterdir() if not p.name.startswith(".") and is_nifti_path(p)]
    # a link that loops or points nowhere is an error, not a volume silently left out
    _raise_problems(folder, [f"{p}: a symbolic link that loops or points to nothing"
                             for p in named if p.is_symlink() and not p.exists()])
    return sorted(p for p in named if p.is_file())


def _check_finite(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind == "f":
        n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if n_bad:
            raise DataError(f"{path}: contains {n_bad} non-finite values (NaN/Inf)")


class _Labels:
    """The label values a data folder's masks may hold, and where that list comes from."""

    def __init__(self, values: Optional[Sequence[int]], whose: str):
        self.values = None if values is None else sorted({int(v) for v in values})
        self.whose = whose


def dataset_labels(root: PathLike, default: Optional[dict] = None, convention: str = "") -> _Labels:
    """Label values of a data folder: the ``labels`` of ROOT/dataset.json when it lists them
    ({name: value} as `medgen phantom` writes, or a list of values), else ``default`` (the
    layout's convention; None: any value 0..255)."""
    path = Path(root) / "dataset.json"
    labels = None
    if path.is_file():
        try:
            labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{path}: not a readable dataset description ({type(e).__name__}: {e})") from None
    if labels is not None:
        values = list(labels.values()) if isinstance(labels, dict) else labels
        if not isinstance(values, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 255 for v in values):
            raise DataError(f'{path}: "labels" must map names to label values 1..255 (or list them), got {labels!r}')
        return _Labels(values, f"the labels listed in {path}")
    if default is None:
        return _Labels(None, "")
    return _Labels(default.values(), f'the {convention} labels {default} (list yours as "labels" in {path} '
                                     "if they differ)")


def _read_mask(path: Path, shape: tuple[int, ...], known: Optional[_Labels] = None) -> np.ndarray:
    """Read a label map; integer values 0..255 required (and among ``known`` when given);
    returned as uint8 of ``shape``."""
    try:
        vol = read_volume(path, dtype=None)
    except NiftiError as e:
        raise DataError(str(e)) from e
    m = vol.array
    _check_finite(path, m)
    if m.dtype.kind == "f" and not np.array_equal(m, np.rint(m)):
        bad = m[m != np.rint(m)].flat[0]
        raise DataError(f"{path}: mask has non-integer values (e.g. {bad!r})")
    if m.size and (m.min() < 0 or m.max() > 255):
        raise DataError(f"{path}: mask values must be in 0..255, found [{m.min()}, {m.max()}]")
    if tuple(m.shape) != tuple(shape):
        raise DataError(f"{path}: mask shape {tuple(m.shape)} does not match the image shape {tuple(shape)}")
    if known is not None and known.values is not None:
        try:
            check_labels(path, m, known.values, known.whose)
        except NiftiError as e:
            raise DataError(str(e)) from None
    return m.astype(np.uint8)


def _read_image(path: Path, ranks: tuple[int, ...]) -> tuple[np.ndarray, Volume]:
    try:
        vol = read_volume(path, dtype=np.float32)
    except NiftiError as e:
        raise DataError(str(e)) from e
    if vol.array.ndim not in ranks:
        raise DataError(f"{path}: expected a {' or '.join(f'{r}D' for r in ranks)} volume, got shape {vol.shape}")
    _check_finite(path, vol.array)
    return vol.array, vol


# --------------------------------------------------------------------------- folder


class VolumeFolder:
    """A folder of volumes with optional masks.

    Layout: ``root/images/*.nii[.gz]`` (or ``root/*.nii[.gz]`` without an images/
    folder) and, when ``root/masks/`` exists, masks with the same file names there.
    kind="ct": 3D volumes in HU -> ``ct_to_unit`` ([-1000, 1000] HU -> [-1, 1]);
    kind="mr": 3D or 4D volumes -> per-volume ``minmax_to_unit`` ([-1, 1]).
    require_masks: every image must have a mask (otherwise a missing mask gives None).
    normalize=False returns the raw float32 values instead.
    labels: the label values masks may hold; default: the ``labels`` of root/dataset.json,
    else for CT the medgen_rt convention (CT_LABELS); a mask with another value is an error.

    ``ds[i]`` -> dict(image=float32 (X,Y,Z[,T]), mask=uint8 (X,Y,Z[,T]) or None,
    affine=(4,4) float64, path=Path, name=str). Construction runs ``validate()``.
    """

    def __init__(self, root: PathLike, kind: str = "ct", require_masks: bool = False, normalize: bool = True,
                 labels: Optional[Sequence[int]] = None):
        if kind not in ("ct", "mr"):
            raise ValueError(f"kind: expected 'ct' or 'mr', got {kind!r}")
        self.root = Path(root)
        self.kind = kind
        self.require_masks = bool(require_masks)
        self.normalize = bool(normalize)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.labels = _Labels(labels, "the labels asked for") if labels is not None else \
            dataset_labels(self.root, CT_LABELS if kind == "ct" else None, "medgen_rt CT")
        self.images_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
        masks_dir = self.root / "masks"
        self.masks_dir: Optional[Path] = masks_dir if masks_dir.is_dir() else None
        self.image_paths = list_volumes(self.images_dir)
        if not self.image_paths:
            raise DataError(f"{self.images_dir}: no NIfTI volumes (*.nii, *.nii.gz) found")
        self.mask_paths: list[Optional[Path]] = []
        for p in self.image_paths:
            m = self.masks_dir / p.name if self.masks_dir is not None else None
            self.mask_paths.append(m if m is not None and m.is_file() else None)
        self.validate()

    @property
    def ranks(self) -> tuple[int, ...]:
        return (3,) if self.kind == "ct" else (3, 4)

    @property
    def names(self) -> list[str]:
        return [nifti_stem(p) for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def validate(self, full: bool = False) -> None:
        """Check every file; raise one DataError listing all problems.

        full=False reads headers only; full=True also reads every voxel (non-finite
        values, mask values).
        """
        problems: list[str] = []
        stems: dict[str, Path] = {}
        for img_path, mask_path in zip(self.image_paths, self.mask_paths):
            stem = nifti_stem(img_path)
            if stem in stems:
                problems.append(f"{img_path}: same name as {stems[stem].name}; keep one of them")
            stems[stem] = img_path
            try:
                info = read_info(img_path)
            except NiftiError as e:
                problems.append(str(e))
                info = None
            if info is not None and info.ndim not in self.ranks:
                problems.append(
                    f"{img_path}: expected a {' or '.join(f'{r}D' for r in self.ranks)} "
                    f"{self.kind} volume, got shape {info.shape}"
                )
                info = None
            if mask_path is None:
                if self.require_masks:
                    where = self.masks_dir or (self.root / "masks")
                    problems.append(f"{where / img_path.name}: missing mask for {img_path}")
            else:
                try:
                    minfo = read_info(mask_path)
                except NiftiError as e:
                    problems.append(str(e))
                    minfo = None
                if minfo is not None and info is not None and minfo.shape != info.shape:
                    problems.append(
                        f"{mask_path}: mask shape {minfo.shape} does not match image "
                        f"{img_path.name} shape {info.shape}"
                    )
                    minfo = None
                if full and minfo is not None and info is not None:
                    try:
                        _read_mask(mask_path, info.shape, self.labels)
                    except DataError as e:
                        problems.append(str(e))
            if full and info is not None:
                try:
                    _read_image(img_path, self.ranks)
                except DataError as e:
                    problems.append(str(e))
        if self.masks_dir is not None:
            orphans = sorted(
                p.name for p in list_volumes(self.masks_dir) if not (self.images_dir / p.name).is_file()
            )
            if orphans:
                warnings.warn(f"{self.masks_dir}: masks without an image are ignored: {', '.join(orphans)}", stacklevel=2)
        _raise_problems(self.root, problems)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} volumes")
        path = self.image_paths[i]
        array, vol = _read_image(path, self.ranks)
        mask = None
        if self.mask_paths[i] is not None:
            mask = _read_mask(self.mask_paths[i], array.shape, self.labels)
        if self.normalize:
            array = ct_to_unit(array) if self.kind == "ct" else minmax_to_unit(array)
        return {
            "image": np.asarray(array, dtype=np.float32),
            "mask": mask,
            "affine": vol.affine,
            "path": path,
            "name": nifti_stem(path),
        }


# --------------------------------------------------------------------------- ACDC

_PATIENT = re.compile(r"^patient\d+$")


def parse_info_cfg(path: PathLike) -> dict:
    """Parse an ACDC Info.cfg (``Key: value`` lines).

    Returns a dict with int ``ED``, ``ES``, ``NbFrame`` (required, 1 <= ED, ES <= NbFrame)
    and the other keys as float when numeric (Height, Weight) else str (Group).
    Raises DataError naming the file for a missing file, garbled line, missing or
    non-integer required key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: Info.cfg not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {e})") from e
    out: dict = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise DataError(f"{p}: line {n} is not 'Key: value': {line!r}")
        key, value = key.strip(), value.strip()
        try:
            num = float(value)
            out[key] = num if math.isfinite(num) else value
        except ValueError:
            out[key] = value
    for key in ("ED", "ES", "NbFrame"):
        if key not in out:
            raise DataError(f"{p}: missing required key '{key}'")
        v = out[key]
        if not isinstance(v, float) or v != int(v):
            raise DataError(f"{p}: '{key}' must be an integer, got {v!r}")
        out[key] = int(v)
    if out["NbFrame"] < 1:
        raise DataError(f"{p}: NbFrame must be >= 1, got {out['NbFrame']}")
    for key in ("ED", "ES"):
        if not 1 <= out[key] <= out["NbFrame"]:
            raise DataError(f"{p}: {key}: {out[key]} is not a frame number in 1..{out['NbFrame']}")
    return out


def _find_nifti(folder: Path, stem: str) -> Optional[Path]:
    for suffix in (".nii.gz", ".nii"):
        p = folder / (stem + suffix)
        if p.is_file():
            return p
    return None


@dataclass
class _Patient:
    name: str
    folder: Path
    info: dict = field(default_factory=dict)
    image: Optional[Path] = None
    gt: dict = field(default_factory=dict)  # "ed"/"es" -> Path


class ACDCDataset:
    """ACDC-layout cine MR: ``root/patientNNN/{patientNNN_4d.nii.gz, Info.cfg, ...}``.

    Only direct children of ``root`` named ``patientNNN`` are used (point root at
    ``training/`` or ``testing/``, not at their parent). Ground truth
    ``patientNNN_frameEE_gt.nii.gz`` at ED and ES is optional.

    frames="all": image (X,Y,Z,T); with ``n_frames`` it becomes (X,Y,Z,n_frames) via
    ``cycle_frames`` starting at ED. frames="ed_es": image (X,Y,Z,2) = [ED, ES].
    Intensities: per-volume min-max over the whole 4D cine to [-1, 1] (normalize=True).

    ``ds[i]`` -> dict(image=float32, ed, es (1-based as in Info.cfg), frame_indices
    (0-based source frame of each returned frame), label_ed, label_es (uint8 (X,Y,Z) or
    None), affine (4,4), frame_duration (s or None), info (Info.cfg dict), name, path).
    """

    def __init__(self, root: PathLike, n_frames: Optional[int] = None, frames: str = "all", normalize: bool = True):
        if frames not in ("all", "ed_es"):
            raise ValueError(f"frames: expected 'all' or 'ed_es', got {frames!r}")
        if n_frames is not None:
            if frames == "ed_es":
                raise ValueError("n_frames: not used with frames='ed_es'")
            if int(n_frames) < 1:
                raise ValueError(f"n_frames: must be >= 1, got {n_frames}")
            n_frames = int(n_frames)
        self.root = Path(root)
        self.n_frames = n_frames
        self.frames = frames
        self.normalize = bool(normalize)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and _PATIENT.match(p.name))
        if not folders:
            raise DataError(f"{self.root}: no ACDC patient folders (patientNNN/) found")
        self.patients = [_Patient(name=f.name, folder=f) for f in folders]
        # ACDC's labels are fixed (1 RV, 2 myocardium, 3 LV); dataset.json may list others
        self.labels = dataset_labels(self.root, CMR_LABELS, "ACDC")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.validate()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def _check_patient(self, pt: _Patient, full: bool) -> list[str]:
        problems: list[str] = []
        cfg = pt.folder / "Info.cfg"
        try:
            pt.info = parse_info_cfg(cfg)
        except DataError as e:
            problems.append(str(e))
            pt.info = {}
        pt.image = _find_nifti(pt.folder, f"{pt.name}_4d")
        if pt.image is None:
            problems.append(f"{pt.folder / (pt.name + '_4d.nii.gz')}: 4D image not found")
            return problems
        try:
            info = read_info(pt.image)
        except NiftiError as e:
            problems.append(str(e))
            return problems
        if info.ndim != 4:
            problems.append(f"{pt.image}: expected a 4D (X,Y,Z,T) cine, got shape {info.shape}")
            return problems
        self._shapes[pt.name] = info.shape
        if pt.info and info.shape[3] != pt.info["NbFrame"]:
            problems.append(
                f"{pt.image}: has T={info.shape[3]} frames but {cfg} says NbFrame: {pt.info['NbFrame']}"
            )
        pt.gt = {}
        for key in ("ed", "es"):
            if not pt.info:
                break
            gt = _find_nifti(pt.folder, f"{pt.name}_frame{pt.info[key.upper()]:02d}_gt")
            if gt is None:
                continue
            pt.gt[key] = gt
            try:
                ginfo = read_info(gt)
            except NiftiError as e:
                problems.append(str(e))
                continue
            if ginfo.shape != info.shape[:3]:
                problems.append(
                    f"{gt}: label shape {ginfo.shape} does not match the image's (X,Y,Z) {info.shape[:3]}"
                )
            elif full:
                try:
                    _read_mask(gt, info.shape[:3], self.labels)
                except DataError as e:
                    problems.append(str(e))
        if full:
            try:
                _read_image(pt.image, (4,))
            except DataError as e:
                problems.append(str(e))
        return problems

    def validate(self, full: bool = False) -> None:
        """Check every patient; raise one DataError listing all problems.

        full=False: Info.cfg and headers only; full=True also reads every voxel.
        """
        problems: list[str] = []
        for pt in self.patients:
            problems.extend(self._check_patient(pt, full))
        _raise_problems(self.root, problems)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} patients")
        pt = self.patients[i]
        array, vol = _read_image(pt.image, (4,))
        if array.shape[3] != pt.info["NbFrame"]:
            raise DataError(f"{pt.image}: has T={array.shape[3]} frames but Info.cfg says NbFrame: {pt.info['NbFrame']}")
        ed, es = pt.info["ED"], pt.info["ES"]
        labels = {k: _read_mask(p, array.shape[:3], self.labels) for k, p in pt.gt.items()}
        if self.normalize:
            array = minmax_to_unit(array)  # over the whole cine, before frame selection
        if self.frames == "ed_es":
            idx = np.array([ed - 1, es - 1], dtype=np.int64)
        elif self.n_frames is not None:
            idx = frame_indices(array.shape[3], self.n_frames, start=ed - 1)
        else:
            idx = np.arange(array.shape[3], dtype=np.int64)
        image = np.take(array, idx, axis=3) if not np.array_equal(idx, np.arange(array.shape[3])) else array
        return {
            "image": np.asarray(image, dtype=np.float32),
            "ed": ed,
            "es": es,
            "frame_indices": idx,
            "label_ed": labels.get("ed"),
            "label_es": labels.get("es"),
            "affine": vol.affine,
            "frame_duration": vol.frame_duration,
            "info": dict(pt.info),
            "name": pt.name,
            "path": pt.folder,
        }
