"""`medgen train vae|dit|control|unet`: see medgen_rt.train.run for the arguments."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from medgen_rt.train.run import add_arguments

    p = subparsers.add_parser("train", help="train a VQ-GAN, DiT, control adapter or U-Net")
    add_arguments(p)


def run(args) -> int:
    from medgen_rt.train.run import main

    return main(args)
