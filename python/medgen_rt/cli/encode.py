"""`medgen encode --vae RUN --data DIR --out DIR`: cache latents for diffusion training."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode a data set into latents with a trained VQ-GAN")
    p.add_argument("--vae", required=True, help="VQ-GAN run folder (from `medgen train vae`)")
    p.add_argument("--data", required=True, help="image data folder (ACDC layout for cine, images/ [+ masks/] for CT)")
    p.add_argument("--out", required=True, help="latents folder to create")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the VQ-GAN encoder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from medgen_rt.train.encode import encode_dataset

    result = encode_dataset(args.vae, args.data, args.out, device=args.device, quiet=args.quiet,
                            overwrite=args.overwrite)
    print(f"encoded {result['items']} volume(s) to {result['out']}: latent {tuple(result['latent_shape'])}, "
          f"scale factor {result['scale_factor']:.4g}")
    return 0
