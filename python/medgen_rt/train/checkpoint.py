"""Writing run folders, and the training checkpoints (write, find, read back to resume).

    RUN/config.yaml            the resolved configuration of the run
    RUN/model.json             what the run trains (kind, model config, extras)
    RUN/weights.safetensors    final raw weights (written at the end)
    RUN/ema.safetensors        final EMA weights (when EMA is on)
    RUN/metrics.csv            one row per logged step
    RUN/energy.json            kWh and kg CO2e, summed over sessions
    RUN/checkpoints/step_NNNNNNN/{weights,ema}.safetensors, trainer_state.pt, state.json
    RUN/checkpoints/latest     name of the newest complete checkpoint

Weights are safetensors. trainer_state.pt holds optimizer and RNG states and is
read back with torch.load(weights_only=True): nothing is unpickled. A
checkpoint folder is written under a temporary name and renamed when complete,
so a killed run never leaves a half checkpoint that `--resume` would pick up.

Reading a finished run's model (model.json, weights) lives below train/, in
:mod:`medgen_rt.io.run_folder` (torch-free) and :mod:`medgen_rt.models.weights`, so
models/ and sampling/ never import train/.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from medgen_rt.io.atomic import atomic_path
from medgen_rt.io.limits import check_zip_records
from medgen_rt.io.run_folder import flatten_modules, unflatten_modules
from medgen_rt.io.sidecar import write_json_atomic
from medgen_rt.models.weights import load_weights


def state_dict_tensors(module: torch.nn.Module) -> dict:
    """Contiguous CPU copies, as safetensors wants (no shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_weights(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def write_checkpoint(run_dir: Path, step: int, weights: dict, ema: Optional[dict], trainer_state: dict,
                     state: dict, keep: int = 3) -> Path:
    """weights/ema: {module name: tensors}; trainer_state: optimizer, scheduler, RNG (weights_only-safe)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_weights(tmp / "weights.safetensors", flatten_modules(weights))
        if ema is not None:
            save_weights(tmp / "ema.safetensors", flatten_modules(ema))
        with atomic_path(tmp / "trainer_state.pt") as path:  # a full disk becomes an OSError naming the file
            torch.save(trainer_state, path)
        with atomic_path(tmp / "state.json") as path:
            path.write_text(json.dumps(state, indent=2))
    except BaseException:  # a full disk or a kill signal: no half checkpoint folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with atomic_path(final.parent / "latest") as tmp:
        tmp.write_text(final.name + "\n")
    _prune(final.parent, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    latest = Path(run_dir) / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = latest.parent / latest.read_text().strip()
    return path if path.is_dir() else None


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    out = {
        "weights": unflatten_modules(load_weights(path / "weights.safetensors")),
        "ema": (unflatten_modules(load_weights(path / "ema.safetensors"))
                if (path / "ema.safetensors").exists() else None),
        "trainer_state": _load_trainer_state(path / "trainer_state.pt"),
        "state": json.loads((path / "state.json").read_text()),
    }
    return out


def _load_trainer_state(path: Path) -> dict:
    check_zip_records(path)  # the zip directory's claimed sizes, before torch.load allocates them
    return torch.load(path, map_location="cpu", weights_only=True)


def write_model_files(run_dir: Path, weights: dict, ema: Optional[dict], model_info: dict) -> None:
    """The final, loadable model of a run: what `medgen encode` / `medgen sample` read."""
    run_dir = Path(run_dir)
    save_weights(run_dir / "weights.safetensors", flatten_modules(weights))
    if ema is not None:
        save_weights(run_dir / "ema.safetensors", flatten_modules(ema))
    write_json_atomic(run_dir / "model.json", model_info)


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
