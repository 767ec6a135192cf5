"""What every converter shares: reading checkpoints without unpickling code,
choosing EMA or raw weights, accounting for every published tensor, the
published YAML configs, and writing medgen_rt run folders.

Checkpoint layouts of the published code (Cardio-AI/voldit, Cardio-AI/cardiodit,
Cardio-AI/medlord), all written with ``torch.save``:

* training checkpoints: ``{"model": state_dict, "ema": {"decay", "shadow":
  {trainable parameter: tensor}, ...}, "optimizer": ..., "epoch": ...}`` (the
  EMA shadow holds only trainable parameters; the published samplers load
  ``model`` and then overwrite it with ``ema["shadow"]``);
* final models: a bare state_dict;
* older MedLoRD scripts: ``{"state_dict": ...}`` (VQ-GAN) and ``{"diffusion": ...}`` (U-Net);
* CardioDiT's newer checkpoints add RNG states (numpy arrays) and provenance.
"""
from __future__ import annotations

import math
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from medgen_rt.io.limits import check_zip_records
from medgen_rt.models.vqgan import strip_wrapper_prefixes

# Entries that hold a model's state_dict, in the order the published loaders look for them.
MODEL_ENTRIES = ("model", "state_dict", "model_state_dict", "diffusion")
# Entries that hold EMA weights: the published EMA class saves {"decay", "shadow": {...}}.
EMA_ENTRIES = ("ema", "model_ema", "ema_state_dict")
_MAX_LISTED = 20


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensors or options at fault."""


# ---- reading ---------------------------------------------------------------------------

def _numpy_array_globals() -> list:
    """numpy's array reconstruction, for the RNG states in CardioDiT checkpoints. Object
    arrays would still need pickled objects, which the weights-only unpickler refuses."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32")), type(np.dtype("float64"))]


def load_checkpoint(path) -> object:
    """A checkpoint file's content: safetensors, or torch.load(weights_only=True) that only
    accepts tensors, containers and numbers (plus numeric numpy arrays); never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        # torch.load allocates each record at the size the zip directory claims: check that first
        check_zip_records(path)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            refused = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            refused = []
        what = f" (it holds {', '.join(refused[:8])})" if refused else ""
        raise ConversionError(
            f"{path}: not a weights-only checkpoint{what}; medgen convert never unpickles code. "
            "Save its weights with torch.save(ckpt['model']) or safetensors and convert that file.") from None
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc


def _is_tensor_map(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


@dataclass
class Weights:
    """The tensors chosen from one checkpoint file, with where they came from."""

    path: Path
    tensors: dict
    chosen: str  # "ema", "raw" or "state_dict" (a checkpoint without EMA)
    extras: dict = field(default_factory=dict)  # non-weight entries the converters may read
    ignored: list = field(default_factory=list)  # top-level entries that are not model weights


def _ema_shadow(ckpt: Mapping) -> Optional[dict]:
    for name in EMA_ENTRIES:
        entry = ckpt.get(name)
        if entry is None:
            continue
        if isinstance(entry, Mapping) and _is_tensor_map(entry.get("shadow")):
            return dict(entry["shadow"])
        if _is_tensor_map(entry):
            return dict(entry)
        if isinstance(entry, Mapping) and _is_tensor_map(entry.get("state_dict")):
            return dict(entry["state_dict"])
    return None


def select_weights(path, raw: bool = False, checkpoint=None) -> Weights:
    """The model weights of a published checkpoint: the EMA weights when present (the
    ``model`` state with the EMA shadow written over it, as the published samplers load
    them), or the raw ``model`` weights with raw=True. ``checkpoint``: the file's content
    when already loaded (choosing again without reading it twice)."""
    path = Path(path)
    ckpt = load_checkpoint(path) if checkpoint is None else checkpoint
    if _is_tensor_map(ckpt):
        return Weights(path, strip_wrapper_prefixes(ckpt), "state_dict")
    if not isinstance(ckpt, Mapping):
        raise ConversionError(f"{path}: expected a state_dict or a checkpoint dict, found {type(ckpt).__name__}")
    model_entry = next((n for n in MODEL_ENTRIES if _is_tensor_map(ckpt.get(n))), None)
    model = dict(ckpt[model_entry]) if model_entry else None
    shadow = _ema_shadow(ckpt)
    if model is None and shadow is None:
        raise ConversionError(f"{path}: no model weights found; looked for {', '.join(MODEL_ENTRIES + EMA_ENTRIES)} "
                              f"(entries present: {sorted(map(str, ckpt))})")
    used = {model_entry} | ({n for n in EMA_ENTRIES if n in ckpt} if shadow is not None else set())
    ignored = sorted(str(k) for k in ckpt if k not in used)
    extras = {k: ckpt[k] for k in ("latent_mean", "latent_std", "scale_factor", "normalize_latents") if k in ckpt}
    if raw:
        if model is None:
            raise ConversionError(f"{path}: --raw-weights asked for, but the checkpoint holds only EMA weights")
        return Weights(path, strip_wrapper_prefixes(model), "raw", extras, ignored)
    if shadow is None:
        return Weights(path, strip_wrapper_prefixes(model), "state_dict", extras, ignored)
    merged = dict(strip_wrapper_prefixes(model)) if model is not None else {}
    merged.update(strip_wrapper_prefixes(shadow))
    return Weights(path, merged, "ema", extras, ignored)


# ---- accounting ----------------------------------------------------------------------------

def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


class Source:
    """A published state_dict of which every tensor must be used or explicitly dropped."""

    def __init__(self, tensors: Mapping, origin: str):
        self.tensors = dict(tensors)
        self.origin = origin
        self.used: set = set()
        self.dropped: dict = {}  # key -> why it has no counterpart in medgen_rt

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self, prefix: str = "") -> list:
        return sorted(k for k in self.tensors if k.startswith(prefix))

    def require(self, key: str) -> torch.Tensor:
        """A tensor the configuration is read from; missing -> ConversionError naming it."""
        if key not in self.tensors:
            raise ConversionError(f"{self.origin}: missing key {key!r} (needed to infer the model configuration)")
        return self.tensors[key]

    def drop(self, key: str, why: str) -> None:
        if key in self.tensors:
            self.dropped[key] = why

    def sub(self, prefix: str, origin: Optional[str] = None) -> "Source":
        """The tensors under ``prefix`` (prefix removed) as their own Source; they count as used here."""
        keys = self.keys(prefix)
        self.used.update(keys)
        return Source({k[len(prefix):]: self.tensors[k] for k in keys}, origin or f"{self.origin} [{prefix}*]")


@dataclass
class Rule:
    """Where a medgen_rt tensor comes from: a source key (optionally transformed), or a
    value computed here (``value``) for a tensor the published model does not have.
    ``consumes``: source keys that must exist but have no counterpart (``why`` says why)."""

    key: Optional[str] = None
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    value: Optional[torch.Tensor] = None
    consumes: tuple = ()
    why: str = ""


def map_state(target: Mapping, source: Source, rule_for: Callable[[str], Rule]) -> dict:
    """Fill every tensor of ``target`` (name -> tensor, for names and shapes) from ``source``.

    Raises ConversionError naming every missing key, wrong shape and unknown key at once.
    """
    out, missing, wrong = {}, [], []
    for name, want in target.items():
        rule = rule_for(name)
        for key in rule.consumes:
            if key in source.tensors:
                source.dropped[key] = rule.why
            else:
                missing.append(key)
        if rule.value is not None:
            value = rule.value
        else:
            if rule.key not in source.tensors:
                missing.append(rule.key)
                continue
            source.used.add(rule.key)
            value = source.tensors[rule.key]
            if rule.transform is not None and value.numel() == want.numel():
                value = rule.transform(value)
        if tuple(value.shape) != tuple(want.shape):
            shape = tuple(source.tensors[rule.key].shape) if rule.key else tuple(value.shape)
            wrong.append(f"{rule.key or name}: checkpoint {shape}, expected {tuple(want.shape)} "
                         f"(medgen_rt {name})")
            continue
        out[name] = value.detach().to(dtype=want.dtype).contiguous().clone()
    unknown = sorted(k for k in source.tensors if k not in source.used and k not in source.dropped)
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {_listing(unknown)}")
    if missing:
        problems.append(f"missing key(s) {_listing(missing)}")
    if wrong:
        problems.append(f"wrong shape(s): {_listing(wrong)}")
    if problems:
        raise ConversionError(f"{source.origin}: " + "; ".join(problems))
    return out


def same_name(name: str) -> Rule:
    return Rule(key=name)


# ---- published YAML configs -------------------------------------------------------------

@dataclass
class PublishedConfig:
    """The sections of one or more published YAML files, by what they configure."""

    vqgan: dict = field(default_factory=dict)
    dit: dict = field(default_factory=dict)
    tgca: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)
    controlnet: dict = field(default_factory=dict)
    condition_keys: list = field(default_factory=list)  # MedLoRD ControlNet: the mask channels, in order
    scheduler: dict = field(default_factory=dict)
    scheduler_type: Optional[str] = None
    training: dict = field(default_factory=dict)
    files: list = field(default_factory=list)


def _params(section) -> dict:
    return dict(section.get("params") or {}) if isinstance(section, Mapping) else {}


def read_configs(paths: Sequence) -> PublishedConfig:
    """Reads the published YAML files (stage1 VQ-GAN, DiT, TGCA, MedLoRD diffusion and ControlNet configs)."""
    import yaml

    cfg = PublishedConfig()
    for path in paths or ():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConversionError(f"--config {path}: not valid YAML ({exc})") from None
        if not isinstance(data, Mapping):
            raise ConversionError(f"--config {path}: expected a mapping at the top level")
        cfg.files.append(str(path))
        model = _params(data.get("model"))
        if "stage1" in data:
            cfg.vqgan.update(_params(data["stage1"]))
        elif "embedding_dim" in model or "num_embeddings" in model:
            cfg.vqgan.update(model)
        if isinstance(data.get("dit"), Mapping):
            cfg.dit.update(_params(data["dit"]))
            cfg.scheduler.update(data["dit"].get("scheduler") or {})
        elif "hidden_size" in model:
            cfg.dit.update(model)
        if "tgca" in data:
            cfg.tgca.update(_params(data["tgca"]))
        if "controlnet" in data:
            cfg.controlnet.update(_params(data["controlnet"]))
            if isinstance(data["controlnet"], Mapping) and data["controlnet"].get("condition_keys"):
                cfg.condition_keys = [str(k) for k in data["controlnet"]["condition_keys"]]
        for name in ("ldm", "pretrained_model"):
            if isinstance(data.get(name), Mapping):
                cfg.unet.update(_params(data[name]))
                cfg.scheduler.update(data[name].get("scheduler") or {})
        if "attention_levels" in model and "conditioning_embedding_in_channels" not in model:
            cfg.unet.update(model)
        if isinstance(data.get("scheduler"), Mapping):
            cfg.scheduler.update(data["scheduler"])
        if data.get("scheduler_type") is not None:
            cfg.scheduler_type = str(data["scheduler_type"])
        if isinstance(data.get("training"), Mapping):
            cfg.training.update(data["training"])
    return cfg


def as_float(value, what: str) -> float:
    """YAML 1.1 reads '1e-5' as a string; the published configs write floats that way."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{what}: expected a number, got {value!r}") from None


def diffusion_settings(cfg: PublishedConfig, notes: list) -> dict:
    """model.json "diffusion" from the published scheduler config (published defaults otherwise)."""
    sched = dict(cfg.scheduler)
    objective = "flow" if (cfg.scheduler_type or "ddpm") == "flow_matching" else "ddpm"
    if cfg.scheduler_type not in (None, "ddpm", "flow_matching"):
        raise ConversionError(f"scheduler_type {cfg.scheduler_type!r}: medgen_rt samples 'ddpm' and "
                              "'flow_matching' models")
    if str(sched.get("zero_terminal_snr", False)).lower() == "true":
        raise ConversionError("scheduler.zero_terminal_snr: true is not supported by medgen_rt's samplers "
                              "(they use the schedule without the rescaling)")
    if not sched:
        notes.append("no scheduler config given: assumed the published setting (cosine, 300 steps, v-prediction); "
                     "pass the training YAML with --config if yours differs")
    timesteps = int(sched.get("num_train_timesteps", 1000 if objective == "flow" else 300))
    if objective == "flow":
        if timesteps != 1000:
            raise ConversionError(f"flow matching with num_train_timesteps {timesteps}: medgen_rt's Euler sampler "
                                  "feeds t * 1000 to the network, as the published setting does")
        return {"objective": "flow", "schedule": "cosine", "timesteps": 1000, "prediction": "flow",
                "loss": "smooth_l1", "flow_timestep_sampling": str(sched.get("sample_method", "logit_normal"))}
    schedule = str(sched.get("schedule", "cosine"))
    prediction = str(sched.get("prediction_type", "v_prediction"))
    from medgen_rt.diffusion import PREDICTION_TYPES, SCHEDULE_KINDS

    if schedule not in SCHEDULE_KINDS:
        raise ConversionError(f"scheduler.schedule {schedule!r}: medgen_rt has {', '.join(SCHEDULE_KINDS)}")
    if prediction not in PREDICTION_TYPES:
        raise ConversionError(f"scheduler.prediction_type {prediction!r}: medgen_rt has {', '.join(PREDICTION_TYPES)}")
    return {"objective": "ddpm", "schedule": schedule, "timesteps": timesteps, "prediction": prediction,
            "loss": "smooth_l1", "flow_timestep_sampling": "logit_normal"}


def scale_factor_of(option: Optional[float], cfg: PublishedConfig, weights: Sequence[Weights], notes: list) -> float:
    """The latent scale factor: --scale-factor, else the training YAML's, else the checkpoint's, else 1.0."""
    for w in weights:
        if w is not None and "latent_mean" in w.extras:
            raise ConversionError(f"{w.path}: the model was trained on per-channel normalised latents "
                                  "(latent_mean/latent_std); medgen_rt divides latents by one scale factor only")
    if str(cfg.training.get("normalize_latents", False)).lower() == "true":
        raise ConversionError("training.normalize_latents: true is not supported (medgen_rt divides latents by "
                              "one scale factor only)")
    if option is not None:
        value = float(option)
    elif "scale_factor" in cfg.training:
        value = as_float(cfg.training["scale_factor"], "training.scale_factor")
    else:
        found = [w.extras["scale_factor"] for w in weights if w is not None and "scale_factor" in w.extras]
        if found:
            value = float(found[0])
        else:
            value = 1.0
            notes.append("latent scale factor 1.0 (the published samplers' default); pass --scale-factor with the "
                         "value the model was trained with (training.scale_factor of its YAML)")
    if not (math.isfinite(value) and value > 0):
        raise ConversionError(f"scale factor must be a positive number, got {value}")
    return value


# ---- writing ------------------------------------------------------------------------------

def prepare_out(out, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    return out


def write_run(run_dir: Path, model: torch.nn.Module, info: dict) -> Path:
    """A run folder medgen_rt loads: model.json + weights.safetensors ({"model/<name>": tensor})."""
    from medgen_rt.train.checkpoint import state_dict_tensors, write_model_files

    run_dir.mkdir(parents=True, exist_ok=True)
    write_model_files(run_dir, {"model": state_dict_tensors(model)}, None, info)
    return run_dir


def conversion_record(system: str, weights: Sequence[Weights], notes: list, deviations: list,
                      dropped: Mapping) -> dict:
    """What model.json keeps about the conversion (sources, EMA or raw, what was dropped and why)."""
    return {"system": system,
            "sources": [{"path": str(w.path.resolve()), "weights": w.chosen, "ignored_entries": w.ignored}
                        for w in weights if w is not None],
            "dropped_tensors": dict(dropped), "notes": list(notes), "deviations": list(deviations)}
