"""What a sampling run hands back and writes, shared by the torch runtime and the
ONNX engine (no torch import): volumes from decoded images, the energy figures
in every sidecar, the files of each volume, and summary.json for the whole run
(from one or several processes)."""
from __future__ import annotations

import math
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


def check_request(n: int, seed: int, steps: Optional[int], guidance: Optional[float], eta: float = 0.0) -> None:
    """The numbers of a sampling request, checked before any model is loaded (both engines);
    the errors name the command-line options."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"-n/--n: the number of volumes must be >= 1, got {n!r}")
    # volume i uses seed + i: every one must be a valid generator seed (torch and numpy: 0 .. 2**63-1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed + n > 2 ** 63:
        raise ValueError(f"--seed must be an integer in [0, 2**63 - n], got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"--steps must be >= 1, got {steps!r}")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance!r}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"--eta must be a finite number >= 0, got {eta!r}")


def check_guidance(guidance: Optional[float], conditional: bool, unconditional: bool, model) -> None:
    """Guidance mixes the conditioned and the null-condition prediction: refused where there
    is no condition, rather than silently ignored."""
    if guidance is None:
        return
    if not conditional:
        raise ValueError(f"--guidance: model {model} is not mask-conditioned; classifier-free guidance needs a "
                         "condition (omit --guidance)")
    if unconditional:
        raise ValueError("--guidance and --unconditional exclude each other: the null condition has nothing "
                         "to guide towards")


def memory_key(kind: str) -> str:
    """The sidecar key of a volume's measured peak memory per phase, named for what it measures:
    on CUDA the peak of PyTorch's allocations on the device during the phase (comparable with
    the plan's planned_tensor_peak_gb); elsewhere the peak resident memory (RSS) of the whole
    process so far: Python, libraries and weights included."""
    return "peak_cuda_allocated_gb" if kind == "cuda" else "peak_process_rss_gb"


def portable_path(path, base=None) -> str:
    """A path for a sidecar that means something on another machine and leaks no local folder
    names: an embedded model by its name, anything else relative to `base` (the output folder;
    the working directory without one), resolved so no `dir/../x` is left."""
    import os

    models = Path(__file__).resolve().parent.parent / "default_models"
    real = Path(os.path.realpath(path))
    if real.is_relative_to(models):
        return real.relative_to(models).as_posix()
    try:
        return Path(os.path.relpath(real, os.path.realpath(base if base is not None else "."))).as_posix()
    except ValueError:  # another drive (Windows): the name alone
        return real.name


def _energy_entry(report: dict, final: bool) -> dict:
    return {"country": report["country"], "run_kwh": report["kwh"], "run_kg_co2e": report["kg_co2e"],
            "per_volume": report.get("per_item"), "phases": report["phases"], "tool": report["tool"],
            "final": final}


class VolumeWriter:
    """Hands each volume of a run to disk as soon as it is decoded (both engines), so a run
    that fails late keeps what it made. Its sidecar first carries the energy metered so far
    ("final": false); finish() puts the run's totals into every sidecar ("final": true).

    folder: an io.outputs.OutputFolder or None (arrays only)."""

    def __init__(self, folder, meter, modality: str, geometry: dict):
        self.folder, self.meter, self.modality = folder, meter, modality
        # seconds per frame of the cines the model was trained on (model.json or the export
        # manifest: geometry.frame_duration); None for models trained before it was recorded
        self.frame = float(geometry.get("frame_duration") or 0) or None
        self.results: list = []

    def add(self, result: dict) -> dict:
        self.results.append(result)
        if self.modality != "ct":  # cine: the training data's seconds per frame, or why it is unknown
            from medgen_rt.io.outputs import frame_timing

            result["metadata"].update(frame_timing(self.frame))
        result["metadata"]["energy"] = _energy_entry(self.meter.report(per=len(self.results)), final=False)
        if self.folder is not None:
            result["files"] = self.folder.write(f"sample_{result['metadata']['index']:03d}", result["volume"],
                                                result["affine"], "ct" if self.modality == "ct" else "cmr",
                                                result["metadata"], mask=result["mask"], frame_duration=self.frame)
        return result

    def finish(self) -> list:
        from medgen_rt.io.sidecar import read_json, write_json_atomic

        energy = _energy_entry(self.meter.report(per=len(self.results)), final=True)
        for r in self.results:
            r["metadata"]["energy"] = energy
            sidecar = r["files"].get("sidecar") if r["files"] else None
            if sidecar is not None:
                write_json_atomic(sidecar, {**read_json(sidecar), "energy": energy})
        return self.results


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
            # file names only: summary.json lies in the folder it lists
            "volumes": [{"index": m["index"], "seed": m["seed"], "rank": m.get("rank", 0), "device": m["device"],
                         "timings_s": m["timings_s"],
                         **{k: m[k] for k in (memory_key("cuda"), memory_key("cpu")) if k in m},
                         "files": {k: Path(v).name for k, v in (m.get("files") or {}).items()}} for m in metadata],
            "plan": metadata[0].get("plan") if metadata else None}


def write_summary(out, summary: dict) -> Path:
    from medgen_rt.io.sidecar import write_json_atomic

    return write_json_atomic(Path(out) / "summary.json", summary)
