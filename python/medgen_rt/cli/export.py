"""`medgen export onnx --model RUN --out DIR`: the denoiser, the VQ-GAN decoder
(one tile) and encoder as ONNX, with a manifest that `medgen sample --engine
onnx --model DIR` and medgen_rt.export.engine read (see export/onnx_export.py).

`medgen export dicom SAMPLES_DIR --out DIR`: the generated volumes of a `medgen sample`
(or `medgen share`) folder, read from their NIfTI files and sidecars, as DICOM series
marked synthetic, masks as DICOM SEG (see medgen_rt.io.dicom)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained model (onnx) or generated volumes (dicom)")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser("onnx", help="a trained model as ONNX, for `medgen sample --engine onnx`")
    onnx.add_argument("--model", required=True, help="'default', a run folder, or a folder with dit/ and vae/")
    onnx.add_argument("--teacher", action="store_true",
                      help="an embedded model that ships a distilled student (used by default, as by `medgen "
                           "sample`): export its teacher instead")
    onnx.add_argument("--out", required=True, help="output folder")
    onnx.add_argument("--no-fp16", action="store_true", help="float32 only (no *_fp16.onnx)")
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    onnx.add_argument("--quiet", action="store_true", help="no progress messages")
    dicom = formats.add_parser("dicom", help="generated volumes (NIfTI + sidecar) as DICOM series and SEG")
    dicom.add_argument("samples", metavar="SAMPLES_DIR", help="a folder written by `medgen sample` or `medgen share`")
    dicom.add_argument("--out", required=True, help="new (or empty) output folder: one NAME_dicom/ per volume")


def run(args) -> int:
    from medgen_rt.io.atomic import check_out

    if args.format == "dicom":
        from medgen_rt.io.dicom import export_samples

        written = export_samples(args.samples, args.out)
        print(f"wrote {len(written)} DICOM volume folder(s) to {args.out}")
        return 0
    from medgen_rt.export.onnx_export import export_model

    check_out(args.out)  # before the models are traced
    out = export_model(args.model, args.out, fp16=not args.no_fp16, overwrite=args.overwrite, quiet=args.quiet,
                       teacher=args.teacher)
    print(f"exported {args.model} to {out}")
    return 0
