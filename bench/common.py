"""Shared benchmark helpers: timing with warm-up and device sync, device and
version description, and JSON output. Benchmarks print a table and write JSON;
they never assert on speed."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns: dict, device: str, warmup: int = 5, repeats: int = 30) -> dict:
    """Median seconds per call for each named callable. Calls are interleaved
    (a, b, c, a, b, c, ...) so that drift in machine state (thread pools waking,
    allocator state, other load) affects every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def benchmarkable_backends(op, device: str) -> tuple:
    """(backends to time, {skipped backend: reason}) for a registry op on `device`. Triton on
    the CPU runs only in its interpreter, which measures numpy, not Triton: never timed."""
    avail = op.availability(device.split(":")[0])
    backends = [b for b, reason in avail.items() if reason is None]
    skipped = {b: reason for b, reason in avail.items() if reason is not None}
    if device == "cpu" and "triton" in backends:
        backends.remove("triton")
        skipped["triton"] = "interpreter only on the CPU; not benchmarked"
    return backends, skipped


def device_description(device: str) -> dict:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "sm": f"{props.major}{props.minor}",
                "memory_gb": round(props.total_memory / 2**30, 1)}
    cpu_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": cpu_name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    import medgen_rt

    out = {"medgen_rt": medgen_rt.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def write_json(path: str, payload: dict) -> None:
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **payload}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(p)
    print(f"wrote {p}")
