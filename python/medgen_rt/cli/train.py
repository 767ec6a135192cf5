"""`medgen train vae|dit|control|unet|distill`: the arguments here, the work in
medgen_rt.train.run (imported only when training runs, so that building the
parser does not import torch: the ONNX engine's `medgen sample` runs without it)."""
from __future__ import annotations

import argparse

from medgen_rt.cli import checked_type, nonneg_int, positive_float, positive_int
from medgen_rt.train.config import STAGES  # torch-free (yaml only); the CLI imports train, never the reverse


# What each kind reads; every other data option is None on its namespace, so
# medgen_rt.train.run sees the same attributes whatever the kind.
_DATA_OPTIONS = {
    "vae": ("data", "val_data"),
    "dit": ("latents", "val_latents"),
    "unet": ("latents", "val_latents"),
    "control": ("latents", "val_latents", "base"),
    "distill": ("latents", "val_latents", "teacher"),
}
_HELP = {
    "vae": "train a VQ-GAN (the autoencoder) on image volumes",
    "dit": "train a diffusion transformer on latents from `medgen encode`",
    "control": "train a mask-conditioned adapter (TGCA on a dit run, ControlNet on a unet run)",
    "unet": "train a diffusion U-Net (the MedLoRD baseline) on latents from `medgen encode`",
    "distill": "distil a rectified-flow dit or tgca run into a student that samples in 1 to 8 Euler steps",
}

_fraction = checked_type(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a VQ-GAN, DiT, control adapter or U-Net",
                              description="Train one model of the pipeline. `medgen train KIND --help` lists the "
                                          "options of that kind.")
    kinds = p.add_subparsers(dest="stage", metavar="KIND", required=True,
                             help="vae (VQ-GAN), dit, control (TGCA/ControlNet), unet, distill (few-step student)")
    for kind in STAGES:
        add_arguments(kinds.add_parser(kind, help=_HELP[kind], description=_HELP[kind] + "."), kind)


def add_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    from medgen_rt.runtime.energy import country_arg

    if kind == "distill":
        p.add_argument("--config", help="preset name or YAML path whose distill section applies (default: the "
                                        "preset the teacher was trained with)")
    else:
        p.add_argument("--config", required=True, help="preset name (see medgen_rt/configs) or YAML path")
    p.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    options = _DATA_OPTIONS[kind]
    if "data" in options:
        p.add_argument("--data", help="image data folder (ACDC layout for cine, images/ [+ masks/] for CT)")
        p.add_argument("--val-data", help="held-out image folder (default: last 10%% of --data)")
    if "latents" in options:
        p.add_argument("--latents", help="latents folder from `medgen encode`"
                                         + (" (with masks)" if kind == "control" else "")
                                         + (" (default: the teacher's, when its run records a folder that exists)"
                                            if kind == "distill" else ""))
        p.add_argument("--val-latents", help="held-out latents (default: last 10%% of --latents)")
    if "base" in options:
        p.add_argument("--base", help="the trained dit or unet run to condition")
    if "teacher" in options:
        p.add_argument("--teacher", required=True,
                       help="the trained rectified-flow dit or tgca run (or embedded model name) to distil")
        p.add_argument("--student-steps", type=positive_int, metavar="N",
                       help="Euler steps the student samples in, 1 to 8 (overrides distill.student_steps, default 4); "
                            "it also serves every smaller count")
        p.add_argument("--teacher-steps", type=positive_int, metavar="N",
                       help="Euler steps of the teacher's targets (overrides distill.teacher_steps, default 16)")
        p.add_argument("--guidance", type=float, metavar="S",
                       help="tgca teachers: fold classifier-free guidance of scale S into the student (sample it "
                            "without --guidance); overrides distill.guidance")
    p.set_defaults(**{o: None for opts in _DATA_OPTIONS.values() for o in opts if o not in options})
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (from step 0 when it has none)")
    p.add_argument("--steps", type=positive_int, help="override train.steps")
    p.add_argument("--batch-size", type=positive_int, help="override train.batch_size (global)")
    p.add_argument("--lr", type=positive_float, help="override train.lr")
    p.add_argument("--seed", type=nonneg_int, help="override train.seed")
    p.add_argument("--checkpoint-every", type=positive_int, help="override train.checkpoint_every (steps)")
    if kind == "vae":
        p.set_defaults(monitor_samples=None, keep_best_copy_rate=None)
    else:
        p.add_argument("--monitor-samples", type=nonneg_int, metavar="N",
                       help="override train.monitor_samples: volumes sampled at every validation to log local "
                            "and whole-volume realism and copy rate into metrics.csv and quality.png (0: off)")
        p.add_argument("--keep-best", type=_fraction, metavar="COPY_RATE", dest="keep_best_copy_rate",
                       help="keep, in OUT/best/, the validated model whose local realism (mask models: mean "
                            "Dice) is closest to 1 among those whose copy rate is at most COPY_RATE")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--country", type=country_arg,
                   help="ISO 3166 alpha-3 code for the CO2 estimate (default MEDGEN_COUNTRY_ISO or DEU)")
    p.add_argument("--no-energy", action="store_true", help="do not meter energy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from medgen_rt.train.run import main

    return main(args)
