"""NIfTI volumes and JSON sidecars (numpy + nibabel only; never imports torch)."""

from .atomic import atomic_folder, atomic_path, split_suffix
from .nifti import (
    KINDS,
    XFORM_CODE,
    NiftiError,
    Volume,
    VolumeInfo,
    is_nifti_path,
    nifti_stem,
    read_header,
    read_info,
    read_volume,
    spacing_from_affine,
    write_volume,
)
from .sidecar import read_json, sidecar_path, to_jsonable, write_json_atomic

__all__ = [
    "atomic_folder",
    "atomic_path",
    "split_suffix",
    "KINDS",
    "XFORM_CODE",
    "NiftiError",
    "Volume",
    "VolumeInfo",
    "is_nifti_path",
    "nifti_stem",
    "read_header",
    "read_info",
    "read_volume",
    "spacing_from_affine",
    "write_volume",
    "read_json",
    "sidecar_path",
    "to_jsonable",
    "write_json_atomic",
]
