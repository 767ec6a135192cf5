"""``medgen phantom cmr4d|ct``: write a procedural training dataset (no download).

The dataset is written into a hidden temporary sibling folder and renamed to ``--out``
only when complete, so a failure or Ctrl-C never leaves a partial dataset behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

from . import error_message, nonneg_int, positive_float, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``phantom`` on an ``ArgumentParser.add_subparsers()`` object; returns it."""
    p = subparsers.add_parser(
        "phantom",
        help="write procedural training data with labels (cine MR or CT)",
        description=(
            "Write N seeded phantoms. cmr4d: ACDC layout (patientNNN/ with the 4D cine, "
            "Info.cfg, ED/ES frames and labels). ct: images/ct_NNN.nii.gz (int16 HU) and "
            "masks/ct_NNN.nii.gz (cardiac labels). Both write dataset.json."
        ),
    )
    p.add_argument("kind", choices=("cmr4d", "ct"), help="which phantom")
    p.add_argument("--n", type=positive_int, required=True, help="number of subjects")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be new or empty)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="dataset seed (default 0)")
    p.add_argument("--shape", type=positive_int, nargs=3, metavar=("X", "Y", "Z"),
                   help="volume size in voxels (cmr4d default 96 96 8, ct 128 128 64)")
    p.add_argument("--spacing", type=positive_float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (cmr4d default 1.5 1.5 8, ct 0.8 0.8 2.5)")
    p.add_argument("--frames", type=positive_int, metavar="T",
                   help="cine frames per cycle, cmr4d only (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)
    return p


def _error(msg: str) -> None:
    print(f"medgen phantom: error: {msg}", file=sys.stderr)


def _remove(path: Path) -> None:
    try:  # cleanup after a failure must not raise a second error over the first
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and then deleted.

    If the final rename fails, the previous ``out`` is restored.
    """
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    from ..io.atomic import temp_sibling

    old = temp_sibling(out, f"old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def run(args: argparse.Namespace) -> int:
    """Execute ``medgen phantom``; returns the process exit code (0 on success)."""
    out = Path(args.out)
    if args.kind == "ct" and args.frames is not None:
        _error("--frames only applies to cmr4d")
        return 2
    if args.frames is not None and args.frames < 2:
        _error(f"--frames must be at least 2, got {args.frames}")
        return 2
    from ..io.atomic import check_out, temp_sibling  # here: building the parser must not import nibabel

    try:
        check_out(out)  # a file in the way, a read-only place, a name too long
    except ValueError as e:
        _error(str(e))
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        _error(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
        return 2

    from ..data.phantoms import write_acdc_dataset, write_ct_dataset

    kwargs: dict = {}
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    if args.spacing is not None:
        kwargs["spacing"] = tuple(args.spacing)
    if args.frames is not None:
        kwargs["n_frames"] = args.frames
    writer = write_acdc_dataset if args.kind == "cmr4d" else write_ct_dataset

    out = out.absolute()
    tmp = temp_sibling(out, f"{os.getpid()}-{secrets.token_hex(4)}")  # fits NAME_MAX for any legal --out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer(tmp, args.n, seed=args.seed, quiet=args.quiet, **kwargs)
        _move_into_place(tmp, out)
    except KeyboardInterrupt:
        _remove(tmp)
        _error("interrupted; nothing was written")
        return 130
    except OSError as e:  # the machine refused (disk full, read-only): bad input, exit 2
        _remove(tmp)
        _error(f"{error_message(e)} (nothing was written to {out})")
        return 2
    except Exception as e:  # report any failure as a message, not a traceback
        _remove(tmp)
        _error(f"{e} (nothing was written to {out})")
        return 1
    if not args.quiet:
        print(f"wrote {args.n} {args.kind} phantom(s) to {out}")
    return 0
