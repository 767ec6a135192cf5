"""Atomic file replacement shared by every writer in medgen_rt.

A writer never writes to its final path directly: it writes to a temporary name in the
same directory (same filesystem, so the final ``os.replace`` is atomic) and renames on
success. A reader therefore sees either the old file, the complete new file, or nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "split_suffix", "MULTI_SUFFIXES", "temp_sibling", "name_max", "check_out", "shown"]

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


def shown(path: PathLike) -> str:
    """A path as text for a message: bytes that are not UTF-8 appear as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def name_max(folder: PathLike) -> int:
    """The longest file name (in bytes) the filesystem of ``folder`` (or of its nearest
    existing ancestor) allows; 255 where it cannot be asked."""
    try:
        return int(os.pathconf(_existing_ancestor(Path(folder)), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def temp_sibling(final_path: PathLike, tag: str = "") -> Path:
    """The hidden temporary sibling ``.{base}[.{tag}].tmp{suffix}`` of a file or folder.

    A legal final name of up to NAME_MAX bytes would overflow NAME_MAX once the dot, tag and
    ``.tmp`` are added, so the base is then shortened (the suffix, which format-sniffing
    writers key on, and the tag, which makes the name unique, are kept whole).
    """
    final = Path(final_path)
    base, suffix = split_suffix(final.name)
    rest = (f".{tag}" if tag else "") + ".tmp" + suffix
    limit = name_max(final.parent)
    while base and len(os.fsencode(f".{base}{rest}")) > limit:
        base = base[:-1]
    return final.with_name(f".{base}{rest}")


def _writable_reason(folder: Path) -> str:
    """Why nothing can be created in an existing folder, or "" when it can."""
    if os.access(folder, os.W_OK | os.X_OK):
        return ""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_out(path: PathLike, arg: str = "--out") -> Path:
    """Check, before any long computation, that the output folder ``path`` can be created or
    written: no file in the way, a writable place, names the filesystem accepts. Creates
    nothing. Raises ValueError naming ``arg`` and the path; returns the path."""
    out = Path(path)
    where = f"{arg} {shown(out)}"
    parts = os.fsencode(os.path.abspath(out)).split(b"/")
    limit = name_max(out)
    for part in parts:
        if len(part) > limit:
            raise ValueError(f"{where}: cannot write there: the name {shown(os.fsdecode(part))[:40]}... is "
                             f"{len(part)} bytes long, the filesystem allows at most {limit}")
    anchor = _existing_ancestor(out)
    if not anchor.is_dir():
        what = "exists and is" if anchor == Path(os.path.abspath(out)) else f"is under {shown(anchor)}, which is"
        raise ValueError(f"{where}: cannot write there: it {what} a file, not a folder")
    reason = _writable_reason(anchor)
    if reason:
        place = "" if anchor == Path(os.path.abspath(out)) else f" (in {shown(anchor)})"
        raise ValueError(f"{where}: cannot write there{place}: {reason}")
    return out


def _final_mode() -> int:
    """The mode a plain open() gives a new file under the current umask (0o666 & ~umask)."""
    try:  # Linux reports the umask without changing it (changing it is not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# Writers that report an I/O failure as their own exception: safetensors ("... (os error 28)"),
# torch.save ("open file failed with strerror: Permission denied"; a failed write of its zip
# container says only "unexpected pos" or "PytorchStreamWriter failed writing file").
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|strerror: ([A-Za-z ]+)")
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter")


def _as_os_error(exc: BaseException, tmp: Path, final: Path) -> "OSError | None":
    """An I/O failure of the writer as an OSError that names ``final`` (the user's file, not
    the temporary one; a failed write() names no file at all), or None to re-raise exc as is."""
    if isinstance(exc, OSError):
        if exc.errno is None or (exc.filename is not None and Path(os.fsdecode(exc.filename)) != tmp):
            return None
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(final))
    if type(exc).__name__ not in ("SafetensorError", "RuntimeError"):
        return None
    match = _OS_ERROR_TEXT.search(str(exc))
    if match is None:
        if not _TORCH_WRITE_FAILED.search(str(exc)):
            return None
        try:  # torch does not say why a write failed; a full disk is the usual reason
            full = os.statvfs(final.parent).f_bavail == 0
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
        return OSError(code, os.strerror(code), str(final))
    if match.group(1):
        code = int(match.group(1))
    else:
        text = match.group(2).strip().lower()
        code = next((c for c in errno.errorcode if os.strerror(c).lower() == text), errno.EIO)
    return OSError(code, os.strerror(code), str(final))


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
    tmp = temp_sibling(final, f"{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: the writer did not create the temporary file {tmp}")
        if fsync:
            _fsync_path(tmp)
        if tmp.is_file():
            # some writers (safetensors, tempfile) create 0600 files: give the file the
            # mode a plain open() would, as the user's umask asks
            os.chmod(tmp, _final_mode())
        os.replace(tmp, final)
    except BaseException as exc:
        err = _as_os_error(exc, tmp, final)  # before the unlink frees the space it looks at
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err is not None:
            raise err from exc
        raise
    if fsync:
        _fsync_path(final.parent, directory=True)


@contextlib.contextmanager
def atomic_folder(final_path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder to fill; on success it replaces ``final_path``
    (an existing folder there is removed first), on any error (including KeyboardInterrupt) it
    is removed and ``final_path`` is left as it was. A leftover of a killed run is cleared.

    Example::

        with atomic_folder("exported") as tmp:
            np.save(tmp / "codebook.npy", codebook)
    """
    final = Path(final_path)
    tmp = temp_sibling(final)  # NAME_MAX-safe hidden sibling
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
