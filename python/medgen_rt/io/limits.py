"""Memory bounds for readers: a file's header or directory claims how much memory reading it
takes; these checks compare that claim with the file's real size and the memory available,
before anything is allocated, so a 67-byte file cannot make a reader allocate gigabytes."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["MAX_ZIP_EXPANSION", "available_memory", "check_zip_records", "format_bytes"]

# torch.save stores its records uncompressed, and trained weights barely deflate; a record
# that expands to many times the size of the file holding it is a decompression bomb.
MAX_ZIP_EXPANSION = 16
_SLACK = 1 << 20  # tiny archives: their directory and pickle may expand more than 16x


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate (MemAvailable, capped by a cgroup v2 limit);
    None when the system does not say."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            avail = None
    try:  # a container's limit is tighter than the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = max(int(limit) - used, 0)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_zip_records(path, max_expansion: int = MAX_ZIP_EXPANSION) -> None:
    """Raise ValueError naming the file and the record when a zip archive (a torch.save
    checkpoint) claims records larger than its size on disk allows or than memory holds.
    Reads only the zip directory. Files that are not zip archives pass (their reader reports them)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            records = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint archive ({exc})") from None
    limit = max_expansion * size + _SLACK
    for r in records:
        if r.file_size > limit:
            raise ValueError(f"{path}: record {r.filename!r} claims {format_bytes(r.file_size)} uncompressed in a "
                             f"{format_bytes(size)} file (more than {max_expansion}x); refusing to read a corrupt "
                             "or hostile checkpoint")
    total = sum(r.file_size for r in records)
    if total > limit:
        largest = max(records, key=lambda r: r.file_size)
        raise ValueError(f"{path}: records claim {format_bytes(total)} uncompressed in a {format_bytes(size)} file "
                         f"(largest: {largest.filename!r}); refusing to read a corrupt or hostile checkpoint")
    avail = available_memory()
    if avail is not None and total > avail:
        largest = max(records, key=lambda r: r.file_size)
        raise ValueError(f"{path}: reading it needs {format_bytes(total)} of memory (largest record "
                         f"{largest.filename!r}), only {format_bytes(avail)} available")
