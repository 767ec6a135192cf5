"""Atomic file replacement shared by every writer in medgen_rt.

A writer never writes to its final path directly: it writes to a temporary name in the
same directory (same filesystem, so the final ``os.replace`` is atomic) and renames on
success. A reader therefore sees either the old file, the complete new file, or nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "split_suffix", "MULTI_SUFFIXES"]

PathLike = Union[str, "os.PathLike[str]"]

# Suffixes made of two dots that tools key the file format on; the temp name must keep
# them whole, or nibabel would e.g. write an uncompressed file for "x.nii.gz.tmp".
MULTI_SUFFIXES = (".nii.gz", ".tar.gz")


def split_suffix(name: str) -> tuple[str, str]:
    """Split a file name into (base, suffix), keeping ``.nii.gz``-style suffixes whole.

    ``"a.nii.gz" -> ("a", ".nii.gz")``, ``"a.json" -> ("a", ".json")``, ``"a" -> ("a", "")``.
    """
    lower = name.lower()
    for suffix in MULTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    base, dot, ext = name.rpartition(".")
    if not dot or not base:
        return name, ""
    return base, "." + ext


def _fsync_path(path: Path, directory: bool = False) -> None:
    # Best effort: without fsync a crash right after the rename can leave an empty file
    # on some filesystems; directories cannot be opened for fsync everywhere.
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final_path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it to ``final_path`` on success.

    The temporary name is hidden (leading dot), lives in the same directory and keeps the
    final suffix (``.nii.gz``, ``.nii``, ``.json``, ...) so format-sniffing writers behave
    the same as for the final name. Parent directories are created. If the block raises
    (including KeyboardInterrupt) the temporary file is removed and ``final_path`` is left
    untouched; if the block ends without creating the file, FileNotFoundError is raised.

    Example::

        with atomic_path("out/vol.nii.gz") as tmp:
            nib.save(img, tmp)
    """
    final = Path(final_path)
    if not final.name:
        raise ValueError(f"final_path: {final_path!r} has no file name")
    final.parent.mkdir(parents=True, exist_ok=True)
    base, suffix = split_suffix(final.name)
    tmp = final.with_name(f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: the writer did not create the temporary file {tmp}")
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_path(final.parent, directory=True)
