"""Reading a finished run folder's model files without torch (numpy-free as well).

    RUN/model.json             what the run holds (kind, model config, extras)
    RUN/weights.safetensors    final raw weights, keys "module/param"
    RUN/ema.safetensors        final EMA weights (when EMA is on)

The layering (DESIGN.md section 2): this module is below models/, sampling/, train/
and the ONNX engine, so any of them may read model.json; loading the tensors
themselves needs torch and lives in :mod:`medgen_rt.models.weights`. Writing run
folders and the training checkpoints stays in :mod:`medgen_rt.train.checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from medgen_rt.io.sidecar import read_json

__all__ = ["read_model_info", "model_weights_path", "flatten_modules", "unflatten_modules"]


def read_model_info(run_dir: Path) -> dict:
    """A finished run's model.json as a dict; errors name the file."""
    info_path = Path(run_dir) / "model.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a medgen_rt run folder (no model.json); "
                                "train one with `medgen train` first")
    info = read_json(info_path)
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: expected a JSON object, found a JSON {type(info).__name__}")
    return info


def model_weights_path(run_dir: Path, prefer_ema: bool = True) -> Path:
    """The weights file a finished run is loaded from: EMA when present and preferred."""
    run_dir = Path(run_dir)
    return run_dir / ("ema.safetensors" if prefer_ema and (run_dir / "ema.safetensors").exists()
                      else "weights.safetensors")


def flatten_modules(modules: dict) -> dict:
    """{module: {param: tensor}} -> {"module/param": tensor}, the key layout of a weights file."""
    return {f"{m}/{k}": v for m, tensors in modules.items() for k, v in tensors.items()}


def unflatten_modules(flat: dict) -> dict:
    """{"module/param": tensor} -> {module: {param: tensor}}; the inverse of :func:`flatten_modules`."""
    out: dict = {}
    for key, value in flat.items():
        module, _, name = key.partition("/")
        out.setdefault(module, {})[name] = value
    return out
