"""Builds a task from a config and command-line arguments and runs it. Used by
`medgen train ...` and by `torchrun --nproc-per-node N -m medgen_rt.train ...`.
Every input is checked before the first step: a bad preset, latents that do not
fit the model, an empty data folder or masks that do not match fail at once."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from medgen_rt.train.config import load_config, stage
from medgen_rt.train.distributed import broadcast_modules, init_distributed, shutdown
from medgen_rt.train.loop import Trainer, TrainSettings

log = logging.getLogger("medgen_rt.train")


def _settings(section: dict, args, where: str) -> TrainSettings:
    s = TrainSettings.from_dict(dict(section.get("train", {})), where + ".train")
    overrides = {k: getattr(args, a) for k, a in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"),
                                                  ("seed", "seed"), ("checkpoint_every", "checkpoint_every"),
                                                  ("monitor_samples", "monitor_samples"),
                                                  ("keep_best_copy_rate", "keep_best_copy_rate"))
                 if getattr(args, a) is not None}
    if overrides:
        s = replace(s, **overrides)
        s.check(where + ".train with the command-line overrides")
    return s


def _require(args, *names) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"medgen train {args.stage} needs {', '.join(missing)}")


def build_task(args, cfg: dict, device):
    where = f"config {args.config!r}"
    if args.stage in ("dit", "unet"):
        return _denoiser_task(args, cfg, device, where)
    if args.stage == "control":
        return _control_task(args, cfg, device, where)
    if args.stage == "distill":
        from medgen_rt.train.distill import build_distill_task

        return build_distill_task(args, stage(cfg, "distill", where), lambda masks: _latent_sets(args, masks), device)
    from medgen_rt.train.vae import build_vae_task

    _require(args, "data")
    return build_vae_task(args, cfg, stage(cfg, "vae", where), device, where)


def _latent_sets(args, require_masks=False):
    from medgen_rt.train.latents import open_latents, split_train_val

    _require(args, "latents")
    latents = open_latents(args.latents, require_masks=require_masks)
    val = open_latents(args.val_latents, require_masks=require_masks) if args.val_latents else None
    return split_train_val(latents, val)


def _diffusion(section: dict):
    from medgen_rt.train.tasks import DiffusionSettings

    return DiffusionSettings(**section.get("diffusion", {}))


def _denoiser_task(args, cfg, device, where):
    from medgen_rt.models import build_model
    from medgen_rt.train.latents import check_latents_fit
    from medgen_rt.train.tasks import DenoiserTask

    section = stage(cfg, args.stage, where)
    train, val = _latent_sets(args)
    overrides = dict(section.get("model_overrides", {}))
    if args.stage == "dit":
        from medgen_rt.models.dit import dit_config

        if overrides.get("input_size") == "auto":
            overrides["input_size"] = tuple(train.latent_shape[1:])
        model_cfg = dit_config(section["model"], **overrides)
        check_latents_fit(train, model_cfg.in_channels, model_cfg.input_size, where)
    else:
        from medgen_rt.models.unet import unet_config

        if overrides.get("frames") == "auto":  # cine latents (C, Z, H, W, T): fold T into channels
            dims = unet_config(section["model"]).spatial_dims if "spatial_dims" not in overrides \
                else overrides["spatial_dims"]
            overrides["frames"] = int(train.latent_shape[-1]) if len(train.latent_shape) == dims + 2 else 0
        model_cfg = unet_config(section["model"], **overrides)
        if train.latent_shape[0] != model_cfg.in_channels:
            raise ValueError(f"{where}: latents have {train.latent_shape[0]} channels, the U-Net expects "
                             f"{model_cfg.in_channels}")
        spatial = tuple(train.latent_shape[1:])
        if model_cfg.frames:
            if len(spatial) != model_cfg.spatial_dims + 1 or spatial[-1] != model_cfg.frames:
                raise ValueError(f"{where}: model_overrides.frames {model_cfg.frames} needs cine latents with "
                                 f"{model_cfg.frames} latent frames, got latents of shape {tuple(train.latent_shape)}")
            spatial = spatial[:-1]
        elif len(spatial) != model_cfg.spatial_dims:
            raise ValueError(f"{where}: latents of shape {tuple(train.latent_shape)} have {len(spatial)} axes; a "
                             f"{model_cfg.spatial_dims}D U-Net takes {model_cfg.spatial_dims} (cine latents: "
                             "model_overrides.frames: auto)")
        f = 2 ** (len(model_cfg.channels) - 1)
        if any(n % f for n in spatial):
            raise ValueError(f"{where}: latent size {spatial} is not divisible by {f}, the U-Net's downsampling "
                             f"over {len(model_cfg.channels)} levels")
    diffusion = _diffusion(section)
    info = {"kind": args.stage, "config": model_cfg.to_dict(), "diffusion": diffusion.to_dict(),
            "scale_factor": train.scale_factor, "latent_shape": list(train.latent_shape),
            "vae_run": train.index.get("vae_run"), "modality": cfg["modality"], "geometry": train.index.get("geometry")}
    model = build_model(info)
    return DenoiserTask(model, train, val, diffusion, device, info)


def _control_task(args, cfg, device, where):
    from medgen_rt.models import build_model, load_model
    from medgen_rt.train.tasks import DenoiserTask

    section = stage(cfg, "control", where)
    _require(args, "base")
    base, base_info = load_model(args.base)
    if base_info["kind"] not in ("dit", "unet"):
        raise ValueError(f"--base {args.base}: a control adapter needs a trained dit or unet run, "
                         f"not a {base_info['kind']} run")
    train, val = _latent_sets(args, require_masks=True)
    labels = list(section.get("mask_labels", []))
    if not labels:
        raise ValueError(f"{where}: control.mask_labels must list the label values to condition on")
    kind = "tgca" if base_info["kind"] == "dit" else "controlnet"
    params = dict(section.get(kind, {}))  # control.tgca or control.controlnet, by the base model
    params["mask_channels"] = len(labels)
    info = {"kind": kind, "config": params, "base": base_info, "mask_labels": labels,
            "diffusion": base_info["diffusion"], "scale_factor": base_info["scale_factor"],
            "latent_shape": base_info["latent_shape"], "vae_run": base_info.get("vae_run"),
            "modality": cfg["modality"], "geometry": base_info.get("geometry")}
    model = build_model(info, base=base)
    if kind == "controlnet":  # every setting resolved (variant defaults included), so the run rebuilds as trained
        info["config"] = dict(model.options)
    from medgen_rt.train.tasks import DiffusionSettings

    return DenoiserTask(model, train, val, DiffusionSettings(**base_info["diffusion"]), device, info,
                        conditional=True, mask_labels=labels)


def build_monitor(task, settings, stage_name: str):
    """The SampleMonitor of a denoiser run, or None (monitoring off, or a VQ-GAN run)."""
    if stage_name == "vae" or not settings.monitor_samples:
        return None
    from medgen_rt.models import load_model
    from medgen_rt.train.monitor import SampleMonitor

    vae_run = task.train_set.index.get("vae_run")
    if not vae_run or not (Path(vae_run) / "model.json").is_file():
        raise ValueError(f"monitor_samples: the VQ-GAN run the latents were encoded with ({vae_run}) is not found; "
                         "set train.monitor_samples to 0 (or --monitor-samples 0) to train without sample figures")
    if len(task.val_set) < 3:
        log.warning("monitor off: the sample figures need at least 3 validation latents, found %d",
                    len(task.val_set))
        return None
    vae, _ = load_model(vae_run)
    log.info("monitor: decoding reference latents for the sample figures")
    return SampleMonitor(task, vae.to(task.device), n_samples=settings.monitor_samples, steps=settings.monitor_steps)


def main(args) -> int:
    from medgen_rt.io.atomic import check_out

    check_out(args.out)  # a file in the way or a read-only place fails now, not at the first checkpoint
    dist = init_distributed(args.device)
    try:
        if args.stage == "distill":  # the config may come from the teacher's run; its section is resolved
            from medgen_rt.train.distill import distill_config

            cfg = distill_config(args)
        else:
            cfg, _ = load_config(args.config)
        where = f"config {args.config!r}" if args.config else "the teacher's config"
        section = stage(cfg, args.stage, where)
        settings = _settings(section, args, f"{where}.{args.stage}")
        # Same initial weights for the same seed, on every rank (DDP replicas must start equal).
        torch.manual_seed(settings.seed)
        task = build_task(args, cfg, dist.device)
        broadcast_modules(task.modules().values(), dist)
        resolved = yaml.safe_dump({"config": cfg, "stage": args.stage,
                                   "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in vars(settings).items()},
                                   "command": {k: v for k, v in vars(args).items() if k != "func"}},
                                  sort_keys=False)
        monitor = build_monitor(task, settings, args.stage) if dist.is_main else None
        trainer = Trainer(task, settings, Path(args.out), dist, resume=args.resume, quiet=args.quiet,
                          energy=not args.no_energy, country=args.country, config_text=resolved, monitor=monitor)
        result = trainer.fit()
        if dist.is_main and not args.quiet:
            print(f"{'interrupted at' if result['interrupted'] else 'finished'} step {result['step']}: {args.out}")
        return 130 if result["interrupted"] else 0
    finally:
        shutdown(dist)
