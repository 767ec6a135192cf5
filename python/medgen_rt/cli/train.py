"""`medgen train vae|dit|control|unet`: the arguments here, the work in
medgen_rt.train.run (imported only when training runs, so that building the
parser does not import torch: the ONNX engine's `medgen sample` runs without it)."""
from __future__ import annotations

import argparse

STAGES = ("vae", "dit", "control", "unet")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a VQ-GAN, DiT, control adapter or U-Net")
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES, help="what to train: vae (VQ-GAN), dit, control (TGCA/ControlNet), unet")
    p.add_argument("--config", required=True, help="preset name (see medgen_rt/configs) or YAML path")
    p.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--data", help="vae: image data folder (ACDC layout for cine, images/ [+ masks/] for CT)")
    p.add_argument("--val-data", help="vae: held-out image folder (default: last 10%% of --data)")
    p.add_argument("--latents", help="dit/unet/control: latents folder from `medgen encode`")
    p.add_argument("--val-latents", help="held-out latents (default: last 10%% of --latents)")
    p.add_argument("--base", help="control: the trained dit or unet run to condition")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (global)")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    p.add_argument("--monitor-samples", type=int, metavar="N",
                   help="override train.monitor_samples: volumes sampled at every validation to log realism and "
                        "copy rate into metrics.csv and quality.png (0: off)")
    p.add_argument("--keep-best", type=float, metavar="COPY_RATE", dest="keep_best_copy_rate",
                   help="keep, in OUT/best/, the validated model whose realism is closest to 1 among those whose "
                        "copy rate is at most COPY_RATE")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--country", help="ISO 3166 alpha-3 code for the CO2 estimate (default MEDGEN_COUNTRY_ISO or DEU)")
    p.add_argument("--no-energy", action="store_true", help="do not meter energy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")



def run(args) -> int:
    from medgen_rt.train.run import main

    return main(args)
