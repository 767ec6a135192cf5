"""medgen share: the sharing gate. Screens --synthetic for copies of --train volumes
(the copy detection of `medgen eval memorization`), shares only the volumes that are not
copies to --out (NIfTI and/or DICOM: --format) and writes the report beside them. Each
shared file is rebuilt from the screened volume: previews drawn again, sidecars without
local paths; a conditioning mask equal to a --train or --val mask is withheld and symbolic
links are never followed (the report lists what was left out and why).

When the share of copies is above --max-copy-share it refuses: --out then holds
only the report, and the exit status is 3 (--force shares the non-copies anyway).

Exit status: 0 shared, 3 refused, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "REFUSED"]

REFUSED = 3


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return v


def add_parser(subparsers) -> None:
    from .eval import add_common

    p = subparsers.add_parser("share", help="copy synthetic volumes that are not copies of training data, with "
                                            "the screening report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=Path, required=True, help="the generated volumes")
    p.add_argument("--train", type=Path, required=True, help="the generative model's training volumes")
    p.add_argument("--val", type=Path, required=True, help="held-out volumes of the same population")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) folder to share")
    p.add_argument("--max-copy-share", type=_share, default=0.0,
                   help="largest share of copies (0..1) that still lets the rest be shared (default 0.0)")
    p.add_argument("--force", action="store_true", help="share the non-copies even above --max-copy-share")
    p.add_argument("--format", choices=["nifti", "dicom", "nifti+dicom"], default="nifti",
                   help="what each shared volume is written as (default nifti): dicom writes NAME_dicom/ with the "
                        "series and the mask as DICOM SEG, marked synthetic and carrying the gate's verdict")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="also write the full internal report (pictures of the closest training volumes) here")
    p.add_argument("--no-calibrate", action="store_true",
                   help="leave out the calibration table (recall of planted degraded copies of training volumes, "
                        "false-positive rate; see `medgen eval memorization --calibrate`) from the reports")
    add_common(p)


def run(args) -> int:
    from medgen_rt.evaluation.datasets import open_set
    from medgen_rt.evaluation.memorization import screen_sets
    from medgen_rt.evaluation.report import public_report, render_memorization, render_shared, write_report
    from medgen_rt.evaluation.share import MaskIndex, check_out_dir, gate, redact
    from medgen_rt.io.dicom import need_libraries, parse_format

    from .eval import _device, encoder_config, energy, keep_encoder, say

    formats = parse_format(args.format)
    if "dicom" in formats:
        need_libraries()  # before the screening
    syn = open_set(args.synthetic, "--synthetic", args.modality)
    check_out_dir(args.out, syn.root)
    if args.report is not None:
        rep_dir, out = Path(args.report).resolve(), Path(args.out).resolve()
        if rep_dir == out or out in rep_dir.parents:
            raise ValueError(f"--report: {args.report} is inside --out; the full report shows training volumes and "
                             "must stay internal")
    train = open_set(args.train, "--train", args.modality)
    val = open_set(args.val, "--val", args.modality)
    # the real masks no shared conditioning mask may equal; read now, so a broken one stops us before the screening
    real_masks = MaskIndex.for_sets(syn, [train, val])
    device = _device(args)
    rep = screen_sets(train, val, syn, cfg=encoder_config(args), quiet=args.quiet, device=device,
                      encoder_path=args.encoder, calibration=not args.no_calibrate, log_fn=say)
    rep["energy"] = energy(args, args.synthetic)
    if args.encoder is None and args.report:
        keep_encoder(rep, args.report)  # never into --out: the encoder was trained on the patients' volumes

    def write(folder, info):
        shared = redact({**public_report(rep), "sharing": info})
        page = render_shared(shared, info)
        page.h2("Files left out")
        page.p(info["files_rule"])
        if info["left_out"]:
            page.table(["file", "why"], [(d["file"], d["reason"]) for d in info["left_out"]])
        else:
            page.p("none")
        write_report(folder, shared, page)

    info = gate(rep, syn, args.out, args.max_copy_share, args.force, write, real_masks=real_masks, formats=formats)
    if args.report:
        public, page, pictures = render_memorization({**rep, "sharing": info}, {"train": train, "synthetic": syn})
        write_report(args.report, public, page, pictures)
    n_copies = len(info["withheld"])
    if info["decision"] == "refused":
        print(f"medgen share: refused: {n_copies} of {len(syn)} synthetic volumes ({100 * rep['copy_share']:.1f}%) "
              f"are copies of training volumes, above --max-copy-share {args.max_copy_share:g}; nothing was shared. "
              f"Report: {Path(args.out) / 'report.html'} (--force shares the other volumes)", file=sys.stderr)
        return REFUSED
    left = f"; {len(info['left_out'])} file(s) left out, listed in the report" if info["left_out"] else ""
    print(f"shared {len(info['shared'])} of {len(syn)} synthetic volumes to {args.out} ({n_copies} withheld as "
          f"copies; threshold r = {rep['threshold']:.4f}{left})")
    return 0

