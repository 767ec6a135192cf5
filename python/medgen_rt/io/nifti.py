"""NIfTI-1 reading and writing for 3D (X,Y,Z) and 4D cine (X,Y,Z,T) volumes.

Conventions for everything medgen_rt writes:

* Array axis order is the on-disk voxel order: (X, Y, Z) or (X, Y, Z, T). Nothing is
  transposed or reoriented; the affine maps voxel indices (i, j, k) to world millimetres.
* sform and qform are both set from the same affine, both with code 1
  (NIFTI_XFORM_SCANNER_ANAT). A qform cannot express shear; for a sheared affine the qform
  holds the nearest rotation+zoom and a warning is issued (readers use the sform).
* Units are millimetres and seconds (xyzt_units). For 4D, pixdim[4] is the frame duration
  in seconds, or 0 when unknown.
* kind="ct": int16 Hounsfield units, scl_slope=1, scl_inter=0 written explicitly.
  kind="mr": float32, kind="label": uint8 (int16 when a label exceeds 255), intent "label".
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import nibabel as nib
import numpy as np

from .atomic import atomic_path
from .limits import available_memory, format_bytes

__all__ = [
    "NiftiError",
    "Volume",
    "VolumeInfo",
    "KINDS",
    "XFORM_CODE",
    "is_nifti_path",
    "nifti_stem",
    "read_volume",
    "read_header",
    "read_info",
    "write_volume",
    "check_labels",
    "affine_problem",
    "spacing_from_affine",
]

PathLike = Union[str, "os.PathLike[str]"]

KINDS = ("mr", "ct", "label")
# NIFTI_XFORM_SCANNER_ANAT: coordinates are the scanner's (or the phantom's) world space.
XFORM_CODE = 1
_INT16 = np.iinfo(np.int16)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# zlib's documented best case is 1032:1, so a .nii.gz of n bytes cannot hold more than this many
# times n bytes of voxel data: a header claiming more is refused without decompressing anything.
_MAX_DEFLATE_RATIO = 1032


class NiftiError(ValueError):
    """A NIfTI file could not be read; the message starts with the file path."""


def is_nifti_path(path: PathLike) -> bool:
    """True when the file name ends in .nii or .nii.gz (case-insensitive)."""
    name = Path(path).name.lower()
    return any(name.endswith(s) and len(name) > len(s) for s in _NIFTI_SUFFIXES)


def nifti_stem(path: PathLike) -> str:
    """File name without .nii/.nii.gz: ``patient001_4d.nii.gz -> patient001_4d``."""
    name = Path(path).name
    for s in _NIFTI_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm: the lengths of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


@dataclass
class Volume:
    """A volume in memory.

    array: (X, Y, Z) or (X, Y, Z, T), in voxel order on disk. CT in HU, MR in scanner units.
    affine: (4, 4) float64, voxel index -> world mm (sform if set, else qform).
    frame_duration: seconds per frame for 4D cine (pixdim[4]), None when unknown or 3D.
    """

    array: np.ndarray
    affine: np.ndarray
    frame_duration: Optional[float] = None
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (sx, sy, sz) in mm, from the affine."""
        return spacing_from_affine(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def n_frames(self) -> Optional[int]:
        """T for a 4D volume, None for 3D."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else None


@dataclass
class VolumeInfo:
    """Header-only description of a NIfTI file (no voxel data read).

    shape: on-disk data shape; dtype: on-disk dtype; slope/inter: raw scl_slope/scl_inter
    (None when the header says "no scaling"); affine: best affine (4x4 float64).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    frame_duration: Optional[float]
    slope: Optional[float]
    inter: Optional[float]
    header: nib.Nifti1Header = field(repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def ndim(self) -> int:
        return len(self.shape)


# --------------------------------------------------------------------------- reading


def _time_scale(header) -> float:
    """Multiplier that turns pixdim[4] into seconds, from the header's time unit."""
    unit = header.get_xyzt_units()[1]
    return {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)  # "sec" and "unknown" -> seconds


def _frame_duration(header, shape: Sequence[int]) -> Optional[float]:
    if len(shape) < 4:
        return None
    value = float(header["pixdim"][4]) * _time_scale(header)
    return value if math.isfinite(value) and value > 0 else None


def _check_path(p: Path) -> None:
    if not p.exists():
        raise NiftiError(f"{p}: file not found")
    if p.is_dir():
        raise NiftiError(f"{p}: is a directory, not a NIfTI file")
    if not is_nifti_path(p):
        raise NiftiError(f"{p}: not a NIfTI file name (expected .nii or .nii.gz)")


def read_header(path: PathLike) -> nib.Nifti1Header:
    """Return the header exactly as stored on disk (NIfTI-1 or NIfTI-2).

    Unlike ``nib.load(path).header``, scl_slope/scl_inter and vox_offset are the raw
    stored values (nibabel resets them on the loaded image's header).
    """
    p = Path(path)
    _check_path(p)
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            raw = f.read(540)  # 540 = NIfTI-2 header size, the larger of the two
    except (OSError, EOFError, zlib.error) as e:
        raise NiftiError(f"{p}: cannot read the header ({type(e).__name__}: {e})") from e
    if len(raw) < 348:
        raise NiftiError(f"{p}: file too short for a NIfTI header ({len(raw)} bytes)")
    sizeof_hdr = {struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]}
    klass = nib.Nifti2Header if 540 in sizeof_hdr else nib.Nifti1Header
    if 348 not in sizeof_hdr and 540 not in sizeof_hdr:
        raise NiftiError(f"{p}: not a NIfTI file (sizeof_hdr is not 348 or 540)")
    try:
        return klass.from_fileobj(io.BytesIO(raw[: klass.sizeof_hdr]), check=True)
    except Exception as e:  # nibabel raises several types for bad headers
        raise NiftiError(f"{p}: invalid NIfTI header ({type(e).__name__}: {e})") from e


def _gzip_stream_length(p: Path) -> int:
    """Decompress the whole file, return its length; raise NiftiError if it is corrupt."""
    total = 0
    try:
        with gzip.open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise NiftiError(
            f"{p}: truncated or corrupt gzip stream ({type(e).__name__}: {e})"
        ) from e
    return total


def _check_file_size(p: Path, header, shape: Sequence[int]) -> None:
    """Raise NiftiError when the file holds fewer bytes than the header promises.

    For .nii.gz the gzip trailer's ISIZE (uncompressed length mod 2**32) is compared with
    what the header implies; only on a mismatch is the stream decompressed to be sure
    (multi-member gzip files carry the last member's size, and trailing bytes are legal).
    """
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    expected = int(header.get_data_offset()) + math.prod(int(s) for s in shape) * itemsize
    if not p.name.lower().endswith(".gz"):
        size = p.stat().st_size
        if size < expected:
            raise NiftiError(
                f"{p}: truncated file: {size} bytes on disk, header implies {expected}"
            )
        return
    with open(p, "rb") as f:
        f.seek(0, os.SEEK_END)
        compressed = f.tell()
        if compressed < 18:  # minimal gzip member: 10-byte header + 8-byte trailer
            raise NiftiError(f"{p}: truncated gzip file ({compressed} bytes)")
        if expected > _MAX_DEFLATE_RATIO * compressed:
            raise NiftiError(
                f"{p}: the header claims {format_bytes(expected)} of data ({tuple(shape)} "
                f"{np.dtype(header.get_data_dtype())}) but a {compressed}-byte gzip file cannot hold more "
                f"than {format_bytes(_MAX_DEFLATE_RATIO * compressed)}: truncated or corrupt"
            )
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == expected % (1 << 32):
        return
    length = _gzip_stream_length(p)
    if length < expected:
        raise NiftiError(
            f"{p}: truncated data: {length} uncompressed bytes, header implies {expected}"
        )


def read_info(path: PathLike, check_size: bool = True) -> VolumeInfo:
    """Read only the header (and check the file is long enough); no voxel data.

    Raises NiftiError (message starts with the path) for a missing, non-NIfTI, or, with
    ``check_size``, truncated file. Cheap: for .nii.gz it reads the first 540 decompressed
    bytes and the 4-byte gzip trailer.
    """
    p = Path(path)
    hdr = read_header(p)
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if check_size:
        _check_file_size(p, hdr, shape)
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        slope, inter = hdr.get_slope_inter()
    except Exception as e:
        raise NiftiError(f"{p}: invalid header fields ({type(e).__name__}: {e})") from e
    _check_read_affine(p, affine)
    return VolumeInfo(
        path=p,
        shape=shape,
        dtype=np.dtype(hdr.get_data_dtype()),
        affine=affine,
        frame_duration=_frame_duration(hdr, shape),
        slope=slope,
        inter=inter,
        header=hdr,
    )


def read_volume(path: PathLike, dtype=np.float32) -> Volume:
    """Read a 3D (X,Y,Z) or 4D (X,Y,Z,T) NIfTI file into a :class:`Volume`.

    scl_slope/scl_inter are applied. ``dtype``: a float dtype (default float32); an
    integer dtype (e.g. np.uint8 for label maps), which requires integer values within
    range; or None for the on-disk dtype (scaled data may come back as float).
    The affine is the sform when its code is set, else the qform.
    Any failure raises NiftiError whose message starts with the path; voxel data is read
    eagerly, so a truncated .nii.gz fails here and not later.
    """
    p = Path(path)
    want = None if dtype is None else np.dtype(dtype)
    # the header's claims checked against the file's size and free memory before anything is allocated
    _check_memory(p, read_info(p), want)
    try:
        img = nib.load(str(p))
    except Exception as e:
        raise NiftiError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise NiftiError(f"{p}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = tuple(img.shape)
    if len(shape) not in (3, 4):
        raise NiftiError(f"{p}: expected a 3D (X,Y,Z) or 4D (X,Y,Z,T) volume, got shape {shape}")
    try:
        # Reading inside the try is what catches truncated/corrupt data: nib.load only
        # reads the header.
        if want is not None and want.kind == "f":
            read_as = want if want in (np.float32, np.float64) else np.float32
            array = np.asarray(img.get_fdata(dtype=read_as, caching="unchanged"))
            array = array.astype(want, copy=False)
        else:
            array = np.asarray(img.dataobj)
    except Exception as e:
        raise NiftiError(
            f"{p}: could not read the voxel data; the file is truncated or corrupt "
            f"({type(e).__name__}: {e})"
        ) from e
    if want is not None and want.kind in "iub":
        array = _to_integer(p, array, want)
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise NiftiError(f"{p}: invalid affine ({type(e).__name__}: {e})") from e
    _check_read_affine(p, affine)
    return Volume(array=array, affine=affine, frame_duration=_frame_duration(img.header, shape), path=p)


def _to_integer(p: Path, array: np.ndarray, want: np.dtype) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise NiftiError(f"{p}: non-finite values cannot be read as {want}")
        if not np.array_equal(array, np.rint(array)):
            raise NiftiError(f"{p}: non-integer values cannot be read as {want}")
    if array.size and want.kind != "b":
        info = np.iinfo(want)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise NiftiError(f"{p}: values in [{lo}, {hi}] do not fit {want}")
    return array.astype(want, copy=False)


def _check_memory(p: Path, info: "VolumeInfo", want: Optional[np.dtype]) -> None:
    """Raise NiftiError when reading the voxels would need more memory than is available:
    the on-disk array plus the converted copy."""
    n = math.prod(info.shape)  # Python ints: no int64 overflow for absurd headers
    need = n * (info.dtype.itemsize + (want.itemsize if want is not None else 0))
    avail = available_memory()
    if avail is not None and need > avail:
        raise NiftiError(
            f"{p}: reading {info.shape} {info.dtype} voxels needs {format_bytes(need)} of memory, "
            f"only {format_bytes(avail)} available"
        )


def affine_problem(a: np.ndarray) -> Optional[str]:
    """What makes a 4x4 voxel-to-world affine unusable (for reading, writing and model geometry), or None."""
    if not np.all(np.isfinite(a)):
        return "contains non-finite values"
    if not np.allclose(a[3], [0, 0, 0, 1]):
        return f"last row must be [0, 0, 0, 1], got {a[3].tolist()}"
    cols = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if np.any(cols == 0) or abs(np.linalg.det(a[:3, :3])) <= 1e-9 * float(np.prod(cols)):
        return "the 3x3 part is singular (zero or collinear voxel axes)"
    return None


def _check_read_affine(p: Path, affine: np.ndarray) -> None:
    # a NaN or singular affine fails only much later (resampling, writing); refuse it at read time
    problem = affine_problem(affine)
    if problem is not None:
        raise NiftiError(f"{p}: invalid affine in the header: {problem}")


def check_labels(path: PathLike, labels: np.ndarray, known, whose: str = "the known labels") -> None:
    """Raise NiftiError naming the file when a label map holds values other than integers, 0 and ``known``.

    The one check of label values for every reader of masks (training data, sampling in both
    engines, eval).
    """
    known = sorted({int(v) for v in known})
    values = np.unique(np.asarray(labels))
    if values.dtype.kind in "fc":  # int() below would turn 1.5 into label 1 and fail on NaN
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            raise NiftiError(f"{path}: mask values must be integer labels, found {bad[0].item()!r}")
    unknown = sorted({int(v) for v in values.tolist()} - {0} - set(known))
    if unknown:
        raise NiftiError(f"{path}: labels {unknown} are not among {whose}: {known}")


# --------------------------------------------------------------------------- writing


def _resolve_affine(affine, spacing) -> np.ndarray:
    sp = None
    if spacing is not None:
        try:
            sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"spacing: not numeric ({spacing!r})") from e
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing: expected 3 positive finite voxel sizes in mm, got {spacing!r}")
    if affine is None:
        a = np.eye(4)
        if sp is not None:
            a[[0, 1, 2], [0, 1, 2]] = sp
        return a
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"affine: not numeric ({type(affine).__name__})") from e
    if a.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {a.shape}")
    problem = affine_problem(a)
    if problem is not None:
        raise ValueError(f"affine: {problem}")
    cols = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if sp is not None and not np.allclose(cols, sp, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"spacing: {sp.tolist()} conflicts with the affine's voxel sizes {cols.tolist()}"
        )
    return a


def _encode(arr: np.ndarray, kind: str) -> tuple[np.ndarray, bool]:
    """Return (on-disk array, is_label)."""
    if kind == "ct":
        if arr.dtype.kind == "f":
            arr = np.rint(arr)
        # HU outside int16 cannot be stored; clipping is documented rather than silent wrap.
        return np.clip(arr, _INT16.min, _INT16.max).astype(np.int16), False
    if kind == "mr":
        big = np.finfo(np.float32).max
        if arr.size and float(np.max(np.abs(arr))) > big:
            raise ValueError("array: values exceed the float32 range")
        return arr.astype(np.float32), False
    # label
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr)):
        bad = arr[arr != np.rint(arr)].flat[0]
        raise ValueError(f"array: kind='label' needs integer values, found {bad!r}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"array: kind='label' needs non-negative values, found {arr.min()!r}")
    top = arr.max() if arr.size else 0
    if top <= 255:
        return arr.astype(np.uint8), True
    if top <= _INT16.max:
        return arr.astype(np.int16), True
    raise ValueError(f"array: label value {top!r} exceeds the int16 range")


def write_volume(
    path: PathLike,
    array,
    affine=None,
    spacing=None,
    kind: str = "mr",
    frame_duration: Optional[float] = None,
) -> Path:
    """Write a 3D (X,Y,Z) or 4D (X,Y,Z,T) array as NIfTI-1, atomically; returns the path.

    path: ends in .nii.gz (compressed) or .nii. Parent folders are created.
    affine: (4,4) voxel->world mm; if None, diag(spacing) with the origin at voxel 0.
    spacing: (sx,sy,sz) mm, default 1 mm; if given with an affine it must match it.
    kind: "ct" (HU, rounded and clipped to int16, scl_slope=1/scl_inter=0), "mr"
    (float32) or "label" (non-negative integers; uint8, or int16 above 255).
    frame_duration: seconds per frame, 4D only (pixdim[4]; 0 = unknown when None).
    Bad arguments raise ValueError naming the argument; nothing is left on disk on failure.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"path: {path} must end in .nii or .nii.gz")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"array: expected a 3D (X,Y,Z) or 4D (X,Y,Z,T) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"array: empty array of shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"array: expected a real numeric dtype, got {arr.dtype}")
    if arr.dtype.kind == "f":
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            raise ValueError(f"array: contains {n_bad} non-finite values (NaN/Inf); not writing {path}")
    a = _resolve_affine(affine, spacing)
    if frame_duration is not None:
        if arr.ndim != 4:
            raise ValueError("frame_duration: only valid for a 4D (X,Y,Z,T) array")
        try:
            frame_duration = float(frame_duration)
        except (TypeError, ValueError) as e:
            raise ValueError(f"frame_duration: not a number ({frame_duration!r})") from e
        if not math.isfinite(frame_duration) or frame_duration <= 0:
            raise ValueError(f"frame_duration: must be a positive number of seconds, got {frame_duration}")

    data, is_label = _encode(arr, kind)
    img = nib.Nifti1Image(data, a)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(a, code=XFORM_CODE)
    hdr.set_qform(a, code=XFORM_CODE)
    if not np.allclose(hdr.get_qform(), a, atol=1e-4):
        warnings.warn(
            f"{path}: the affine has shear, which a qform cannot express; the qform holds "
            "the nearest rotation+zoom and the sform holds the exact affine",
            stacklevel=2,
        )
    hdr.set_xyzt_units("mm", "sec")
    if arr.ndim == 4:
        zooms = hdr.get_zooms()
        hdr.set_zooms(tuple(zooms[:3]) + (frame_duration or 0.0,))
    # Explicit identity scaling: with NaN here readers must guess, and some treat the
    # int16 CT values as unscaled raw counts.
    hdr.set_slope_inter(1.0, 0.0)
    if is_label:
        hdr.set_intent("label")
    hdr["descrip"] = f"medgen_rt {kind}".encode()

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
        raw = read_header(tmp)
        if float(raw["scl_slope"]) != 1.0 or float(raw["scl_inter"]) != 0.0:
            raise NiftiError(
                f"{path}: nibabel stored scl_slope={raw['scl_slope']}, "
                f"scl_inter={raw['scl_inter']} instead of 1 and 0"
            )
    return path
