"""What a sampling run hands back and writes, shared by the torch runtime and the
ONNX engine (no torch import): volumes from decoded images, the energy figures
in every sidecar, the files of each volume, and summary.json for the whole run
(from one or several processes)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def image_to_volume(image: np.ndarray, modality: str) -> np.ndarray:
    """A decoded image in [-1, 1] -> CT in HU or cine intensities in [0, 1], float32."""
    clipped = np.clip(image, -1.0, 1.0)
    if modality == "ct":
        from medgen_rt.data.preprocess import unit_to_ct

        return unit_to_ct(clipped).astype(np.float32)
    return ((clipped + 1.0) / 2.0).astype(np.float32)


def finish_results(results: list, energy_report: dict, out: Optional[Path], modality: str,
                   geometry: dict) -> list:
    """Adds the run's energy to each volume's metadata and, with `out`, writes its files
    (NIfTI, mask, sidecar, previews) as sample_{index:03d}."""
    for r in results:
        r["metadata"]["energy"] = {"country": energy_report["country"], "run_kwh": energy_report["kwh"],
                                   "run_kg_co2e": energy_report["kg_co2e"],
                                   "per_volume": energy_report.get("per_item"), "phases": energy_report["phases"],
                                   "tool": energy_report["tool"]}
        if out is not None:
            from medgen_rt.io.outputs import write_generated

            frame = float(geometry.get("frame_duration") or 0) or None
            r["files"] = write_generated(out, f"sample_{r['metadata']['index']:03d}", r["volume"], r["affine"],
                                         "ct" if modality == "ct" else "cmr", r["metadata"], mask=r["mask"],
                                         frame_duration=frame)
    return results


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
