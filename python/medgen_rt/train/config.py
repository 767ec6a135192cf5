"""Training configurations: YAML presets shipped in medgen_rt/configs/ (or a
path to a YAML file), one file per system with a section per stage:

    name, modality (cmr | ct), data: {...}
    vae:     {model: PRESET, model_overrides: {...}, loss: {...}, train: {...}}
    dit:     {model: PRESET, model_overrides: {...}, diffusion: {...}, train: {...}}
    control: {mask_labels: [...], tgca: {...} (dit base) | controlnet: {variant: monai | lightweight, ...}
              (unet base; see medgen_rt.models.unet.ControlledUNet), train: {...}}
    unet:    {model: PRESET, model_overrides: {...}, diffusion: {...}, train: {...}}
    distill: {student_steps: N, teacher_steps: N, guidance: S | null, train: {...}}
             (a few-step student of a flow dit or tgca run; see medgen_rt.train.distill)

`train` holds medgen_rt.train.loop.TrainSettings fields.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

STAGES = ("vae", "dit", "control", "unet", "distill")


def preset_names() -> list:
    folder = resources.files("medgen_rt") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str) -> tuple:
    """(config dict, YAML text) for a preset name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--config {name_or_path}: no such file")
        text = path.read_text()
    else:
        res = resources.files("medgen_rt") / "configs" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ValueError(f"--config {name_or_path!r}: unknown preset; choose one of {', '.join(preset_names())} "
                             "or give a path to a YAML file")
        text = res.read_text()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {name_or_path}: not valid YAML ({exc})") from exc
    if not isinstance(cfg, dict) or "modality" not in cfg:
        raise ValueError(f"--config {name_or_path}: expected a mapping with at least 'modality'")
    if cfg["modality"] not in ("cmr", "ct"):
        raise ValueError(f"--config {name_or_path}: modality must be cmr or ct, got {cfg['modality']!r}")
    return cfg, text


def stage(cfg: dict, name: str, where: str) -> dict:
    section = cfg.get(name)
    if not isinstance(section, dict):
        raise ValueError(f"{where}: the config has no '{name}' section")
    return section
