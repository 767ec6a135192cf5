"""The files of one generated volume, written together or not at all:

    NAME.nii.gz       CT: int16 HU (scl_slope 1, scl_inter 0); cine: float32 (X, Y, Z, T)
    NAME_mask.nii.gz  the conditioning mask, when the sample was conditioned
    NAME.json         sidecar: model, seed, sampler, steps, guidance, timings, memory, energy, files
    NAME.png          preview (CT: orthogonal mid-slices; cine: slice x frame montage)
    NAME.gif          cine only: all slices over the cycle

numpy, nibabel and Pillow only, so the torch runtime and the ONNX engine write
identical outputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .nifti import spacing_from_affine, write_volume
from .preview import write_ct_preview, write_cine_gif, write_cine_montage
from .sidecar import write_json_atomic

MODALITIES = ("ct", "cmr")


def write_generated(out_dir, name: str, volume: np.ndarray, affine: np.ndarray, modality: str, metadata: dict,
                    mask: Optional[np.ndarray] = None, frame_duration: Optional[float] = None) -> dict:
    """Writes a generated volume's files (see the module docstring); returns {kind: path}.

    volume: CT (X, Y, Z) in HU, or cine (X, Y, Z, T) float. If any file fails, the
    ones already written for this volume are removed and the error is raised.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    volume = np.asarray(volume)
    want = 3 if modality == "ct" else 4
    if volume.ndim != want:
        raise ValueError(f"{name}: a {modality} volume must be {want}-D, got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{name}: the generated volume has non-finite values; nothing was written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spacing = spacing_from_affine(affine)
    written: dict = {}
    try:
        written["image"] = write_volume(out / f"{name}.nii.gz", volume, affine, kind="ct" if modality == "ct" else "mr",
                                        frame_duration=frame_duration if modality == "cmr" else None)
        if mask is not None:
            written["mask"] = write_volume(out / f"{name}_mask.nii.gz", mask, affine, kind="label")
        if modality == "ct":
            written["preview"] = write_ct_preview(out / f"{name}.png", volume, affine)
        else:
            written["preview"] = write_cine_montage(out / f"{name}.png", volume, affine)
            written["animation"] = write_cine_gif(out / f"{name}.gif", volume, affine, frame_duration)
        sidecar = {**metadata, "modality": modality, "shape": list(volume.shape),
                   "spacing_mm": [round(s, 6) for s in spacing],
                   "files": {k: Path(p).name for k, p in written.items()}}
        written["sidecar"] = write_json_atomic(out / f"{name}.json", sidecar)
    except BaseException:
        for path in written.values():
            Path(path).unlink(missing_ok=True)
        raise
    return {k: Path(v) for k, v in written.items()}
