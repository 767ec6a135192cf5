"""summary.json of a sampling run: one file for all its volumes, from one or several
processes, for the torch runtime and the ONNX engine alike (no torch import)."""
from __future__ import annotations

from pathlib import Path


def summarize(metadata: list) -> dict:
    """One summary of a sampling run from its volumes' sidecar metadata (from one or
    several processes): volumes in index order, total time, and energy summed over
    the processes (each metered its own)."""
    metadata = sorted(metadata, key=lambda m: m["index"])
    per_rank = {}
    for m in metadata:
        per_rank.setdefault(m.get("rank", 0), m["energy"])
    metered = [e for e in per_rank.values() if e["run_kwh"] is not None]
    kwh = sum(e["run_kwh"] for e in metered) if metered else None
    kg = sum(e["run_kg_co2e"] for e in metered) if metered else None
    n = len(metadata)
    seconds = sum(m["timings_s"]["denoise"] + m["timings_s"]["decode"] for m in metadata)
    return {"n": n, "processes": len(per_rank), "seconds": round(seconds, 3),
            "energy": {"country": metadata[0]["energy"]["country"] if metadata else None, "kwh": kwh, "kg_co2e": kg,
                       "per_volume": {"kwh": kwh / n if kwh is not None else None,
                                      "kg_co2e": kg / n if kg is not None else None},
                       "tool": "codecarbon OfflineEmissionsTracker"},
            "volumes": [{"index": m["index"], "seed": m["seed"], "rank": m.get("rank", 0), "device": m["device"],
                         "timings_s": m["timings_s"], "peak_memory_gb": m["peak_memory_gb"],
                         "files": m.get("files", {})} for m in metadata],
            "plan": metadata[0].get("plan") if metadata else None}


def write_summary(out, summary: dict) -> Path:
    from medgen_rt.io.sidecar import write_json_atomic

    return write_json_atomic(Path(out) / "summary.json", summary)
