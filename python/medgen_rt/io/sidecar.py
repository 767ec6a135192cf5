"""JSON sidecars written next to NIfTI outputs (model, seed, sampler, energy, timings)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePath
from typing import Any, Union

import numpy as np

from .atomic import atomic_path

__all__ = ["sidecar_path", "to_jsonable", "write_json_atomic", "read_json"]

PathLike = Union[str, "os.PathLike[str]"]


def sidecar_path(nifti_path: PathLike) -> Path:
    """``dir/x.nii.gz`` or ``dir/x.nii`` -> ``dir/x.json``; other suffixes raise ValueError."""
    p = Path(nifti_path)
    name = p.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"nifti_path: {nifti_path} does not end in .nii or .nii.gz")


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` recursively to plain JSON types.

    numpy scalars -> Python scalars, numpy arrays -> nested lists, Paths -> str,
    tuples/sets -> lists, dict keys -> str. Non-finite floats become None so the output
    is strict JSON (many readers reject NaN/Infinity). Anything else raises TypeError.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):  # e.g. np.str_
        return to_jsonable(obj.item())
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = k if isinstance(k, str) else str(to_jsonable(k))
            out[key] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented (2) UTF-8 JSON to ``path`` atomically; returns the path."""
    final = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a garbled file raises ValueError naming the path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from e
