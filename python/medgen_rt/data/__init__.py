"""Datasets, preprocessing and procedural phantoms (numpy + nibabel only; never torch)."""

from .loaders import ACDCDataset, DataError, VolumeFolder, list_volumes, parse_info_cfg
from .phantoms import (
    CMR_LABELS,
    CT_LABELS,
    CT_TISSUES,
    CinePhantom,
    CTPhantom,
    contraction_curve,
    make_cine_phantom,
    make_ct_phantom,
    phantom_affine,
    subject_seed,
    write_acdc_dataset,
    write_ct_dataset,
)
from .preprocess import HU_MAX, HU_MIN, ct_to_unit, cycle_frames, frame_indices, minmax_to_unit, unit_to_ct

__all__ = [
    "ACDCDataset",
    "DataError",
    "VolumeFolder",
    "list_volumes",
    "parse_info_cfg",
    "CMR_LABELS",
    "CT_LABELS",
    "CT_TISSUES",
    "CinePhantom",
    "CTPhantom",
    "contraction_curve",
    "make_cine_phantom",
    "make_ct_phantom",
    "phantom_affine",
    "subject_seed",
    "write_acdc_dataset",
    "write_ct_dataset",
    "HU_MAX",
    "HU_MIN",
    "ct_to_unit",
    "cycle_frames",
    "frame_indices",
    "minmax_to_unit",
    "unit_to_ct",
]
