"""DICOM output of generated volumes (numpy + pydicom + highdicom; never torch, so the
torch runtime and the ONNX engine write the same objects through io.outputs).

One generated volume becomes one folder NAME_dicom/:

    CT_0001.dcm ...            CT Image Storage, one file per slice: int16 HU through
                               Rescale Slope 1 / Intercept 0 (Rescale Type HU)
    MR_t001_z001.dcm ...       MR Image Storage, one file per slice and frame: Temporal
                               Position Identifier, Number of Temporal Positions, Trigger
                               Time (ms; empty when the frame duration is unknown). Float
                               intensities as uint16 through Rescale Slope / Intercept
                               (dciodvfy warns that these are outside the MR IOD: most
                               readers, SimpleITK and pydicom among them, apply them)
    SEG.dcm                    the conditioning mask as a DICOM Segmentation referencing
                               the image series (only when the volume had a mask)

Classic single-frame objects rather than Enhanced multi-frame ones: PACS, viewers and
SimpleITK/GDCM read them everywhere. The image objects are built with pydicom (highdicom
constructs no classic CT/MR images); the SEG with highdicom.seg, which checks it.

Geometry: the NIfTI affine maps voxel (i, j, k) to RAS mm; DICOM patient coordinates are
LPS, so x and y change sign. Column index = i, row index = j (pixel rows are
volume[:, :, k].T), slice k at Image Position affine @ (0, 0, k). Readers order slices
along row x column cosines: for a left-handed voxel grid they see k reversed, each voxel
still at its place.

Every object says it is synthetic: Patient Name SYNTHETIC^..., a Patient ID made from
the run, Image Type DERIVED\\SECONDARY, Series Description and Derivation Description
naming medgen_rt, the model and the seed, and a private block (creator "medgen_rt")
with the same and the sharing-gate verdict when there is one. Only the sample's own
settings are written (model name, seed, sampler, ...): never a path, a mask's file name,
a date or anything else a sidecar may hold about training data.

UIDs are derived (pydicom.uid.generate_uid with entropy) from the run's settings and a
hash of the stored voxels: the same volume gives the same Study, Series, Frame of
Reference and SOP Instance UIDs on a rerun or a later `medgen export dicom`, and a
different volume different ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["FORMATS", "parse_format", "write_dicom", "export_samples", "dicom_folder_name", "PRIVATE_CREATOR",
           "PRIVATE_GROUP", "synthetic_text", "need_libraries"]

FORMATS = ("nifti", "dicom", "nifti+dicom")
PRIVATE_CREATOR = "medgen_rt"
PRIVATE_GROUP = 0x0071
# element offsets in the private block: what a reader looks for (the tests read them back)
PRIVATE = {"synthetic": 0x01, "model": 0x02, "seed": 0x03, "version": 0x04, "settings": 0x05, "verdict": 0x06}
# the sidecar keys that describe how a sample was made; nothing else reaches a DICOM tag
SETTINGS_KEYS = ("kind", "index", "sampler", "steps", "eta", "guidance", "engine", "cache")
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ORTHOGONAL_TOL = 1e-4


def parse_format(text: str, arg: str = "--format") -> frozenset:
    """'nifti', 'dicom' or 'nifti+dicom' -> the set of formats; anything else raises ValueError."""
    if text not in FORMATS:
        raise ValueError(f"{arg}: expected one of {', '.join(FORMATS)}, got {text!r}")
    return frozenset(text.split("+"))


def dicom_folder_name(name: str) -> str:
    return f"{name}_dicom"


def need_libraries():
    """Raise ValueError (how to install them) when pydicom or highdicom is missing."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"DICOM output needs pydicom and highdicom ({exc.name} is not installed): "
                         "pip install 'medgen_rt[dicom]'") from None


# ---- what the objects say about the sample ----------------------------------------------------

def _model_name(metadata: dict) -> str:
    """The model as a name, never a local path: an embedded model's name, else the run folder's name
    (at most 64 characters, without the characters that structure DICOM values: backslash, ^, =)."""
    if metadata.get("preset"):
        name = str(metadata["preset"])
    else:
        model = str(metadata.get("model") or "unknown")
        name = os.path.basename(os.path.normpath(model.replace("\\", "/"))) or "unknown"
    return re.sub(r"[\\^=\x00-\x1f]", "_", name)[:64]


def _settings(metadata: dict) -> dict:
    return {k: metadata[k] for k in SETTINGS_KEYS if metadata.get(k) is not None}


def synthetic_text(metadata: dict, verdict: Optional[str] = None) -> str:
    """The one sentence every object carries (Derivation Description, Image Comments)."""
    from medgen_rt import __version__

    text = (f"SYNTHETIC image generated by medgen_rt {__version__} (model {_model_name(metadata)}, "
            f"seed {metadata.get('seed', 'unknown')}); not an image of a patient")
    return text + (f". Sharing gate: {verdict}" if verdict else "")


def _uid_key(metadata: dict, modality: str, digest: str, verdict: Optional[str]) -> str:
    # what makes the objects what they are: the same key gives the same UIDs (a rerun)
    return json.dumps({"medgen_rt": "dicom/1", "model": _model_name(metadata), "seed": metadata.get("seed"),
                       "settings": _settings(metadata), "modality": modality, "voxels": digest,
                       "verdict": verdict}, sort_keys=True, default=str)


def _uid(key: str, what: str):
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[key, what])  # pydicom's root + a SHA-512 of the key: reproducible


# ---- geometry -------------------------------------------------------------------------------------

def _geometry(affine: np.ndarray, n_slices: int) -> dict:
    """Image Plane values of every slice from a RAS affine (see the module docstring)."""
    a = _LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if not np.all(np.isfinite(a)) or np.any(spacing <= 0):
        raise ValueError("affine: not a usable voxel-to-world matrix for DICOM")
    u = a[:3, :3] / spacing
    dots = np.abs(u.T @ u - np.eye(3))
    if dots.max() > _ORTHOGONAL_TOL:
        raise ValueError("affine: the voxel axes are not perpendicular (shear or gantry tilt); DICOM image "
                         "planes with one slice spacing cannot hold it")
    normal = np.cross(u[:, 0], u[:, 1])
    positions = [(a @ np.array([0.0, 0.0, k, 1.0]))[:3] for k in range(n_slices)]
    return {"orientation": list(u[:, 0]) + list(u[:, 1]), "pixel_spacing": [spacing[1], spacing[0]],
            "thickness": float(spacing[2]), "positions": positions,
            "locations": [float(np.dot(p, normal)) for p in positions]}


def _ds(value: float):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)  # at most 16 characters, as DS allows


# ---- voxels ---------------------------------------------------------------------------------------

def _stored(volume: np.ndarray, modality: str) -> tuple:
    """(stored integer voxels, slope, intercept, is_signed). CT: the NIfTI's own int16 HU, so both
    files hold the same numbers. MR (float): uint16 over the volume's range, values read back
    as stored * slope + intercept, within slope / 2."""
    from pydicom.valuerep import DSfloat

    from .nifti import _encode

    if modality == "ct":
        return _encode(np.asarray(volume), "ct")[0], 1.0, 0.0, True
    v = np.asarray(volume, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    # the slope and intercept as the file will state them (16-character decimal strings)
    slope = float(DSfloat((hi - lo) / 65535.0, auto_format=True)) if hi > lo else 1.0
    intercept = float(DSfloat(lo, auto_format=True))
    stored = np.clip(np.rint((v - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept, False


# ---- the objects ----------------------------------------------------------------------------------

def _common(ctx: dict):
    """Patient, study, series, frame of reference, equipment and synthetic markers: the same in
    every image object of the volume."""
    from pydicom.dataset import Dataset

    from medgen_rt import __version__

    m, key = ctx["metadata"], ctx["key"]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient: made from the run, never a training subject's
    ds.PatientName = f"SYNTHETIC^{_model_name(m)} seed {m.get('seed', '')}"[:64]
    ds.PatientID = "SYN-" + hashlib.sha256(key.encode()).hexdigest()[:16].upper()
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientComments = "SYNTHETIC: generated by medgen_rt, not a person"
    # Study and series: UIDs from the run; no dates (none from training data, and a rerun is identical)
    ds.StudyInstanceUID = ctx["uids"]["study"]
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "MEDGEN"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC medgen_rt"
    ds.Modality = ctx["dicom_modality"]
    ds.SeriesInstanceUID = ctx["uids"]["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"SYNTHETIC medgen_rt {_model_name(m)} seed {m.get('seed', '')}"[:64]
    ds.PatientPosition = "HFS"
    if ctx["cardiac"]:
        ds.BodyPartExamined = "HEART"  # cine models are cardiac: an unpaired part, so no Laterality
    else:
        ds.Laterality = ""  # type 2C; which body part a CT (or 3D MR) model makes is not recorded: unknown
    ds.FrameOfReferenceUID = ctx["uids"]["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "medgen_rt"
    ds.ManufacturerModelName = _model_name(m)[:64]
    ds.SoftwareVersions = __version__
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if ctx["dicom_modality"] == "CT" else "OTHER"]
    ds.DerivationDescription = ctx["text"]
    ds.ImageComments = ctx["text"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    _private(ds, ctx)
    return ds


def _private(ds, ctx: dict) -> None:
    from medgen_rt import __version__

    m = ctx["metadata"]
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE["synthetic"], "LO", "SYNTHETIC")
    block.add_new(PRIVATE["model"], "LO", _model_name(m)[:64])
    block.add_new(PRIVATE["seed"], "LO", str(m.get("seed", "")))  # seeds reach 2**63: text
    block.add_new(PRIVATE["version"], "LO", f"medgen_rt {__version__}")
    block.add_new(PRIVATE["settings"], "LT", json.dumps(_settings(m), sort_keys=True, default=str))
    if ctx["verdict"]:
        block.add_new(PRIVATE["verdict"], "LT", ctx["verdict"])


def _image(ctx: dict, common, pixels: np.ndarray, k: int, instance: int, t: Optional[int]):
    """One slice (k) of one frame (t, cine) as a classic CT or MR image object."""
    import copy

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    geo = ctx["geometry"]
    ds = copy.deepcopy(common)
    ct = ctx["dicom_modality"] == "CT"
    ds.SOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.SOPInstanceUID = _uid(ctx["key"], f"image/{k}/{t}")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(v) for v in geo["positions"][k]]
    ds.ImageOrientationPatient = [_ds(v) for v in geo["orientation"]]
    ds.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
    ds.SliceThickness = _ds(geo["thickness"])
    ds.SpacingBetweenSlices = _ds(geo["thickness"])
    ds.SliceLocation = _ds(geo["locations"][k])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if ctx["signed"] else 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2" if ctx["signed"] else "<u2").tobytes()
    ds.RescaleIntercept = _ds(ctx["intercept"])
    ds.RescaleSlope = _ds(ctx["slope"])
    if ct:
        ds.RescaleType = "HU"
        ds.KVP = ""
        ds.AcquisitionNumber = None
        return ds
    ds.ScanningSequence = "RM"  # research mode: no sequence made these pixels
    ds.SequenceVariant = "NONE"
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = None
    ds.EchoTrainLength = None
    ds.RepetitionTime = None
    ds.ScanOptions = ""
    if t is not None:
        ds.ScanOptions = "CG"  # cardiac gating: the frames are phases of one heartbeat (Trigger Time applies)
        ds.TemporalPositionIdentifier = t + 1
        ds.NumberOfTemporalPositions = ctx["frames"]
        ds.CardiacNumberOfImages = ctx["frames"]
        # ms after the R wave; unknown timing is left empty (type 2), never written as 0
        fd = ctx["frame_duration"]
        ds.TriggerTime = _ds(1000.0 * t * fd) if fd is not None else None
    return ds


def _segmentation(ctx: dict, sources: list, mask: np.ndarray):
    """The conditioning mask as a highdicom Segmentation of the source slices (one segment per label)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medgen_rt import __version__

    quiet = logging.getLogger("highdicom")
    if quiet.level == logging.NOTSET:  # one INFO line per copied module would flood the CLI's log
        quiet.setLevel(logging.WARNING)
    labels = sorted(int(v) for v in np.unique(mask) if v != 0)
    if not labels:
        return None  # an all-background map (the null condition) has no segment to store
    numbers = np.zeros(int(mask.max()) + 1, dtype=np.uint8)
    numbers[labels] = np.arange(1, len(labels) + 1)
    frames = np.stack([numbers[mask[:, :, k].T.astype(np.int64)] for k in range(mask.shape[2])])
    algorithm = hd.AlgorithmIdentificationSequence(name="medgen_rt conditioning map", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(segment_number=i + 1, segment_label=f"label {v}",
                                              segmented_property_category=codes.SCT.Tissue,
                                              segmented_property_type=codes.SCT.Tissue,
                                              algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                              algorithm_identification=algorithm)
                    for i, v in enumerate(labels)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=ctx["uids"]["seg_series"], series_number=2,
        sop_instance_uid=_uid(ctx["key"], "seg"), instance_number=1, manufacturer="medgen_rt",
        manufacturer_model_name=_model_name(ctx["metadata"])[:64], software_versions=__version__,
        device_serial_number="none", series_description=f"SYNTHETIC conditioning map, seed "
                                                       f"{ctx['metadata'].get('seed', '')}"[:64],
        content_description="conditioning label map of a synthetic image", content_label="MASK",
    )
    seg.DerivationDescription = ctx["text"]  # not in the SEG IOD's modules: kept in the private block too
    _private(seg, ctx)
    return seg


def write_dicom(folder, volume, affine, modality: str, metadata: dict, mask=None,
                frame_duration: Optional[float] = None, verdict: Optional[str] = None) -> Path:
    """Write the DICOM objects of one generated volume into the new folder ``folder`` (see the
    module docstring); returns it. volume: CT (X, Y, Z) HU or cine (X, Y, Z, T); mask (X, Y, Z)
    labels; frame_duration: seconds per cine frame or None (unknown: empty Trigger Times);
    verdict: the sharing gate's verdict, recorded when given. Bad input raises ValueError and
    leaves no folder."""
    need_libraries()
    if modality not in ("ct", "cmr", "mr"):
        raise ValueError(f"modality must be 'ct', 'cmr' (cine MR) or 'mr', got {modality!r}")
    volume = np.asarray(volume)
    if volume.ndim not in ((3,) if modality == "ct" else (3, 4)):
        raise ValueError(f"volume: a {modality} volume for DICOM must be {'3-D' if modality == 'ct' else '3-D or 4-D'}"
                         f", got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume: non-finite values cannot be written as DICOM")
    if frame_duration is not None and not (math.isfinite(frame_duration) and frame_duration > 0):
        raise ValueError(f"frame_duration: must be a positive number of seconds, got {frame_duration}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != volume.shape[:3]:
            raise ValueError(f"mask: shape {mask.shape} does not match the volume's {volume.shape[:3]}")
        if mask.size and (not np.array_equal(mask, np.rint(mask)) or mask.min() < 0 or mask.max() > 255):
            raise ValueError("mask: a label map of integers 0..255 is needed for a DICOM SEG")
        mask = mask.astype(np.uint8)
    stored, slope, intercept, signed = _stored(volume, modality)
    digest = hashlib.sha256(repr(stored.shape).encode() + stored.tobytes()
                            + (b"" if mask is None else np.ascontiguousarray(mask).tobytes())
                            ).hexdigest()
    key = _uid_key(metadata, modality, digest, verdict)
    ctx = {"metadata": metadata, "key": key, "verdict": verdict, "text": synthetic_text(metadata, verdict),
           "dicom_modality": "CT" if modality == "ct" else "MR", "cardiac": modality == "cmr",
           "slope": slope, "intercept": intercept, "signed": signed, "frame_duration": frame_duration,
           "frames": int(volume.shape[3]) if volume.ndim == 4 else 1,
           "geometry": _geometry(affine, volume.shape[2]),
           "uids": {k: _uid(key, k) for k in ("study", "series", "frame_of_reference", "seg_series")}}
    common = _common(ctx)
    folder = Path(folder)
    folder.mkdir()
    try:
        sources = []  # the slices of the first frame: what a SEG of the (X, Y, Z) mask refers to
        Z = volume.shape[2]
        for t in range(ctx["frames"]):
            for k in range(Z):
                pixels = (stored[:, :, k] if volume.ndim == 3 else stored[:, :, k, t]).T
                ds = _image(ctx, common, pixels, k, t * Z + k + 1, None if volume.ndim == 3 else t)
                name = f"CT_{k + 1:04d}.dcm" if modality == "ct" else f"MR_t{t + 1:03d}_z{k + 1:03d}.dcm"
                ds.save_as(folder / name, enforce_file_format=True)
                if t == 0:
                    sources.append(ds)
        seg = _segmentation(ctx, sources, mask) if mask is not None else None
        if seg is not None:
            seg.save_as(folder / "SEG.dcm")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # the objects of a volume exist together or not at all
        raise
    return folder


# ---- `medgen export dicom`: DICOM from a folder of samples ------------------------------------------

def _sample_sidecars(root: Path) -> list:
    """(sidecar path, sidecar) of every generated volume in ``root``: NAME.json that names its image."""
    from .sidecar import read_json

    found = []
    for path in sorted(root.glob("*.json")):
        try:
            meta = read_json(path)
        except ValueError:
            continue
        if isinstance(meta, dict) and isinstance(meta.get("files"), dict) and meta["files"].get("image") \
                and meta.get("modality") in ("ct", "cmr"):
            found.append((path, meta))
    return found


def export_samples(samples, out, *, arg: str = "SAMPLES_DIR", out_arg: str = "--out") -> list:
    """DICOM folders for every generated volume of a `medgen sample` (or `medgen share`) folder,
    read from its NIfTI files and sidecars, into the new or empty folder ``out`` (all or nothing:
    written into a hidden sibling and renamed). Returns the written folders."""
    from .atomic import check_out, temp_sibling
    from .nifti import NiftiError, read_volume

    need_libraries()
    root = Path(samples)
    if not root.is_dir():
        raise ValueError(f"{arg} {samples}: not a folder")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out_arg} {out}: exists and is not an empty folder; choose a new one")
    if out.resolve() == root.resolve():
        raise ValueError(f"{out_arg} {out}: is {arg} itself; choose a new folder")
    check_out(out, out_arg)
    items = _sample_sidecars(root)
    if not items:
        raise ValueError(f"{arg} {samples}: holds no generated volumes (NAME.json sidecars of `medgen sample` "
                         "naming a NIfTI image)")
    volumes = []  # read and checked before anything is written
    for path, meta in items:
        image = root / meta["files"]["image"]
        if Path(meta["files"]["image"]).name != meta["files"]["image"] or not image.is_file():
            raise ValueError(f"{path}: names the image {meta['files']['image']!r}, which is not a file beside it")
        try:
            vol = read_volume(image, dtype=np.float32)
            mask = None
            if meta["files"].get("mask"):
                mask_path = root / meta["files"]["mask"]
                mask = read_volume(mask_path, dtype=np.uint8).array if mask_path.is_file() else None
        except NiftiError as exc:
            raise ValueError(str(exc)) from None
        if vol.array.ndim != (3 if meta["modality"] == "ct" else 4):
            raise ValueError(f"{image}: shape {vol.shape} is not a {meta['modality']} volume, as {path.name} says")
        sharing = meta.get("sharing")
        verdict = sharing.get("verdict") if isinstance(sharing, dict) else None
        volumes.append((image, vol, mask, meta, verdict))
    tmp = temp_sibling(out, f"{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    written = []
    try:
        for image, vol, mask, meta, verdict in volumes:
            name = dicom_folder_name(image.name[: -len(".nii.gz")] if image.name.endswith(".nii.gz")
                                     else image.stem)
            write_dicom(tmp / name, vol.array, vol.affine, meta["modality"], meta, mask=mask,
                        frame_duration=vol.frame_duration if vol.array.ndim == 4 else None, verdict=verdict)
            written.append(out / name)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
