"""`medgen export onnx --model RUN --out DIR`: the denoiser, the VQ-GAN decoder
(one tile) and encoder as ONNX, with a manifest that `medgen sample --engine
onnx --model DIR` and medgen_rt.export.engine read (see export/onnx_export.py)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained model (onnx)")
    p.add_argument("format", choices=["onnx"], help="export format")
    p.add_argument("--model", required=True, help="'default', a run folder, or a folder with dit/ and vae/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-fp16", action="store_true", help="float32 only (no *_fp16.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args) -> int:
    from medgen_rt.export.onnx_export import export_model
    from medgen_rt.io.atomic import check_out

    check_out(args.out)  # before the models are traced
    out = export_model(args.model, args.out, fp16=not args.no_fp16, overwrite=args.overwrite, quiet=args.quiet)
    print(f"exported {args.model} to {out}")
    return 0
