"""`medgen convert voldit|cardiodit|medlord CHECKPOINT... --out DIR`: published
checkpoints -> a medgen_rt model folder that `medgen sample --model DIR` takes.
See medgen_rt.convert for the rules and each system's module for its layout."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert published VolDiT / CardioDiT / MedLoRD checkpoints into a medgen_rt model folder",
        description="Checkpoints in any order: the VQ-GAN, the DiT (voldit, cardiodit) or U-Net (medlord), and "
                    "optionally the TGCA (voldit) or ControlNet (medlord, MONAI's or the lightweight one). EMA "
                    "weights are used when present (medlord's U-Net: see --unet-weights).")
    p.add_argument("system", choices=["voldit", "cardiodit", "medlord"], help="which published code wrote them")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help=".pth/.pt (weights only) or .safetensors")
    p.add_argument("--out", required=True, help="model folder to create (vae/, dit/ or unet/, tgca/ or controlnet/)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="a published YAML config (stage-1, DiT, TGCA, diffusion, ControlNet); repeatable")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--unet-weights", choices=["raw", "ema"],
                   help="medlord: the U-Net's raw or EMA weights (default: raw beside a ControlNet, as the published "
                        "ControlNet code trains and samples with; otherwise EMA, as sample_ldm.py)")
    p.add_argument("--scale-factor", type=float, help="latent scale factor the model was trained with")
    p.add_argument("--num-heads", type=int,
                   help="DiT attention heads (not stored in checkpoints; default: the published value for the "
                        "model's width, else hidden/64)")
    p.add_argument("--patch-size", type=int, nargs="+", help="DiT4D patch (default the published 1 4 4 2)")
    p.add_argument("--latent-shape", type=int, nargs="+", help="spatial latent size (U-Net; checked for DiTs)")
    p.add_argument("--mask-labels", type=int, nargs="+", help="label value of each mask channel (default 1..K)")
    p.add_argument("--allow-deviations", action="store_true",
                   help="convert even where medgen_rt's network computes differently from the published code "
                        "(recorded in model.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from medgen_rt.convert import ConvertOptions, convert

    options = ConvertOptions(raw_weights=args.raw_weights, scale_factor=args.scale_factor, num_heads=args.num_heads,
                             patch_size=args.patch_size, latent_shape=args.latent_shape,
                             mask_labels=args.mask_labels, allow_deviations=args.allow_deviations,
                             unet_weights=args.unet_weights)
    result = convert(args.system, args.checkpoints, args.out, configs=args.config, options=options,
                     overwrite=args.overwrite, log=lambda msg: print(msg, flush=True))
    runs = ", ".join(f"{name}/" for name in result["runs"])
    print(f"wrote {result['out']}: {runs}; sample with `medgen sample --model {result['out']}`"
          + (f" (masks: --model {result['out']}/tgca)" if "tgca" in result["runs"] else "")
          + (f" (masks: --model {result['out']}/controlnet)" if "controlnet" in result["runs"] else ""))
    return 0
