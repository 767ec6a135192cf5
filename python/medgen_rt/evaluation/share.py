"""The sharing gate: screen a synthetic set for copies of training volumes, then copy only
the volumes that are not copies (with their masks, sidecars and previews) to a folder
meant to leave the hospital, with the screening report beside them.

If the share of copies is above the limit, nothing is shared but the report (unless
forced). The output is assembled in a hidden temporary sibling folder and renamed into
place at the end, so ``out`` is either complete or absent.

The shared report holds no pixels and no names of training volumes (patient data); the
full report with the pictures of the closest pairs goes to a separate, internal folder.
"""
from __future__ import annotations

import copy
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["check_out_dir", "redact", "gate"]


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
    r["redacted"] = ("training-volume names, training folders and pictures are left out: this report is shared "
                     "with the synthetic volumes")
    return r


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # empty (checked before screening)
    os.replace(tmp, out)


def gate(report: dict, synthetic_set, out, max_copy_share: float = 0.0, force: bool = False,
         write=None) -> dict:
    """Share the non-copies of ``synthetic_set`` into ``out`` given a screening ``report``.

    write(folder, sharing_info): writes the shared report into ``folder``.
    Returns the sharing info: decision ("shared" or "refused"), the limit, and the
    names shared and withheld.
    """
    out = Path(out).absolute()
    copies = {s["name"] for s in report["synthetic"] if s["is_copy"]}
    share = report["copy_share"]
    refused = share > max_copy_share and not force
    kept = [e for e in synthetic_set.entries if e.name not in copies]
    info = {"decision": "refused" if refused else "shared", "max_copy_share": float(max_copy_share),
            "copy_share": share, "forced": bool(force and share > max_copy_share),
            "shared": [] if refused else [e.name for e in kept], "withheld": sorted(copies),
            "rule": "volumes whose nearest training volume correlates above the threshold are withheld; when "
                    "their share is above max_copy_share nothing is shared unless forced"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        if not refused:
            for e in kept:
                for rel in e.files:
                    src, dst = synthetic_set.root / rel, tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if src.is_dir():
                        shutil.copytree(src, dst)
                    else:
                        shutil.copy2(src, dst)
        if write is not None:
            write(tmp, info)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
