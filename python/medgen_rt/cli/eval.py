"""`medgen eval memorization|quality`: copy detection and quality reports. The help text is
DESCRIPTION below: plain text, pointing to the README, which every clone has."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgen_rt.cli import positive_int as _positive_int

__all__ = ["add_parser", "run"]

# evaluation.encoder's EncoderConfig().steps and MAX_SIZE, repeated so that building the parser
# does not import torch (tests/test_copy_screen.py checks they agree)
DEFAULT_STEPS = 400
MAX_SIZE = (32, 32, 16)

DESCRIPTION = """\
Evaluate synthetic volumes.

  medgen eval memorization --train DIR --val DIR --synthetic DIR --out REPORT_DIR [--encoder PATH] [--calibrate]
  medgen eval quality --real DIR --synthetic DIR --out REPORT_DIR [--features encoder|medicalnet:PATH|...]

A folder may be a `medgen sample` output, an images/ (+ masks/) folder or the ACDC layout.
Each writes REPORT_DIR/report.json (every number) and report.html (one self-contained page).
The copy-detection encoder is trained once per training set and settings and kept in
$MEDGEN_CACHE/encoders (default ~/.cache/medgen_rt/encoders); `eval memorization`, `eval
quality` and `share` reuse it, and an interrupted training resumes there.
The README, section "Before sharing synthetic data", shows both in use.
"""


def add_common(p) -> None:
    """Options shared by `eval memorization`, `eval quality` and `share`."""
    p.add_argument("--encoder", type=Path, metavar="PATH",
                   help="copy-detection encoder (.safetensors): loaded when the file exists, else taken from the "
                        "cache or trained, and saved there")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"most NT-Xent training steps (default {DEFAULT_STEPS}; training stops earlier when the loss "
                        "levels off)")
    p.add_argument("--size", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"),
                   help="encoder grid (default: the volumes' own divided by a whole number, at most "
                        f"{' '.join(map(str, MAX_SIZE))})")
    p.add_argument("--frames", type=_positive_int, default=8, help="cine frames used as encoder channels (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the encoder training (default 0)")
    p.add_argument("--modality", choices=("auto", "ct", "mr"), default="auto",
                   help="intensity handling: CT in HU or MR (default: from sidecars and headers)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the encoder")
    p.add_argument("--train-run", type=Path, action="append", default=[], metavar="DIR",
                   help="a `medgen train` run folder whose energy.json goes into the report (repeatable)")
    p.add_argument("--sample-run", type=Path, action="append", default=[], metavar="DIR",
                   help="a `medgen sample` folder whose energy goes into the report (repeatable; default: "
                        "--synthetic when it holds sampling energy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate synthetic volumes: copy detection and quality",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True, help="memorization or quality")
    m = sub.add_parser("memorization", help="which synthetic volumes copy a training volume (Dar et al.)")
    m.add_argument("--train", type=Path, required=True, help="the generative model's training volumes")
    m.add_argument("--val", type=Path, required=True, help="held-out volumes of the same population")
    m.add_argument("--synthetic", type=Path, required=True, help="the generated volumes")
    m.add_argument("--out", type=Path, required=True, help="report folder")
    m.add_argument("--top-k", type=_positive_int, default=8, help="pairs shown as pictures (default 8)")
    m.add_argument("--calibrate", action="store_true",
                   help="also plant degraded copies of a few training volumes (noise, blur, intensity, shift, "
                        "deformation; cine: temporal shift; several strengths) and report the recall per kind and "
                        "strength and the false-positive rate among the validation volumes")
    add_common(m)
    q = sub.add_parser("quality", help="MS-SSIM diversity, FID/MMD, nearest-neighbour and local realism, slice and frame "
                                       "consistency, EF, mask Dice")
    q.add_argument("--real", type=Path, required=True, help="real volumes (the reference; at least 2)")
    q.add_argument("--synthetic", type=Path, required=True, help="the generated volumes")
    q.add_argument("--out", type=Path, required=True, help="report folder")
    q.add_argument("--features", default="encoder",
                   help="feature extractor for FID/MMD: 'encoder' (the copy-detection encoder, default), "
                        "'medicalnet:PATH' or 'radimagenet:PATH' (local weights; nothing is downloaded)")
    q.add_argument("--max-pairs", type=_positive_int, default=50, help="MS-SSIM pairs per set (default 50)")
    q.add_argument("--lv-label", type=int, default=3, help="LV blood-pool label value (ACDC: 3)")
    add_common(q)


def encoder_config(args):
    """The EncoderConfig the options ask for."""
    from medgen_rt.evaluation.encoder import EncoderConfig

    cfg = EncoderConfig(size=tuple(args.size) if args.size else None, n_frames=args.frames, seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
        cfg.min_steps = min(cfg.min_steps, args.steps)
    return cfg


def say(text: str) -> None:
    """One line to stderr (the expected encoder training time, resuming): shown even with
    --quiet, which only hides the progress bars."""
    print(text, file=sys.stderr, flush=True)


def keep_encoder(rep: dict, folder) -> None:
    """Save the report's encoder to folder/encoder.safetensors (not when --encoder named a
    file: it is there already), so a report folder holds the encoder that made it."""
    from medgen_rt.evaluation.encoder import save_encoder

    model = rep["_model"]
    path = Path(folder) / "encoder.safetensors"
    save_encoder(path, model, getattr(model, "meta", None))
    rep["encoder"]["saved_to"] = str(path)


def energy(args, synthetic_dir):
    """The energy section: --train-run and --sample-run folders, else --synthetic when it
    holds sampling energy (a `medgen sample` folder)."""
    from medgen_rt.evaluation.energy import energy_summary

    return energy_summary(args.train_run, list(args.sample_run) or [synthetic_dir], quiet_missing=not args.sample_run)


def _device(args):
    from medgen_rt.runtime.device import pick_device

    return pick_device(args.device)


def check_outputs(args) -> None:
    """The report folder, and the file a trained encoder is saved to, must be writable: checked
    before the encoder trains and every volume is read, not when the report is written."""
    from medgen_rt.io.atomic import check_out

    check_out(args.out)
    if args.encoder is not None and not args.encoder.exists():
        check_out(args.encoder.parent, "--encoder")


def run_memorization(args) -> int:
    from medgen_rt.evaluation.datasets import open_set
    from medgen_rt.evaluation.memorization import screen_sets
    from medgen_rt.evaluation.report import render_memorization, write_report

    check_outputs(args)
    device = _device(args)
    train = open_set(args.train, "--train", args.modality)
    val = open_set(args.val, "--val", args.modality)
    syn = open_set(args.synthetic, "--synthetic", args.modality)
    rep = screen_sets(train, val, syn, cfg=encoder_config(args), quiet=args.quiet, device=device,
                      encoder_path=args.encoder, calibration=args.calibrate, log_fn=say)
    rep["energy"] = energy(args, args.synthetic)
    out = Path(args.out)
    if args.encoder is None:
        keep_encoder(rep, out)
    public, page, pictures = render_memorization(rep, {"train": train, "synthetic": syn}, args.top_k)
    write_report(out, public, page, pictures)
    print(f"copies: {rep['n_copies']} of {len(syn)} synthetic volumes ({100 * rep['copy_share']:.1f}%); memorized: "
          f"{rep['n_memorized']} of {len(train)} training volumes ({100 * rep['memorized_share']:.1f}%); "
          f"thresholds r = {rep['thresholds']['encoder']:.4f} (encoder), {rep['thresholds']['image']:.4f} (image); "
          f"report: {out / 'report.html'}")
    if "calibration" in rep:
        print(calibration_text(rep["calibration"]))
    return 0


def calibration_text(cal: dict) -> str:
    """The --calibrate table as plain text."""
    lines = [f"calibration: degraded copies of {cal['sources']} training volumes; recall per kind and strength"]
    for r in cal["rows"]:
        lines.append(f"  {r['degradation']:<40} recall {r['recall']:.2f} ({round(r['recall'] * r['n'])}/{r['n']})")
    lines.append(f"  new subjects (validation volumes, leave-one-out) flagged: {cal['n_fresh_flagged']} of "
                 f"{cal['n_fresh']} ({100 * cal['false_positive_rate']:.1f}%)")
    return "\n".join(lines)


def run_quality(args) -> int:
    from medgen_rt.evaluation.datasets import open_set
    from medgen_rt.evaluation.encoder import save_encoder
    from medgen_rt.evaluation.features import parse_features
    from medgen_rt.evaluation.quality import evaluate_quality
    from medgen_rt.evaluation.report import render_quality, write_report

    check_outputs(args)
    device = _device(args)
    parse_features(args.features)  # a bad --features fails before any volume is read
    real = open_set(args.real, "--real", args.modality)
    syn = open_set(args.synthetic, "--synthetic", args.modality)
    rep = evaluate_quality(real, syn, features=args.features, cfg=encoder_config(args), max_pairs=args.max_pairs,
                           lv_label=args.lv_label, quiet=args.quiet, device=device, encoder_path=args.encoder,
                           log_fn=say)
    rep["energy"] = energy(args, args.synthetic)
    out = Path(args.out)
    if rep["_model"] is not None and args.encoder is None:
        path = out / "encoder.safetensors"
        save_encoder(path, rep["_model"], getattr(rep["_model"], "meta", None))
        rep["features"]["encoder_saved_to"] = str(path)
    public, page, pictures = render_quality(rep, syn.modality)
    write_report(out, public, page, pictures)
    div = rep["ms_ssim_diversity"]["synthetic"].get("mean")
    ma = (rep["mask_adherence"].get("synthetic") or {}).get("own_map")
    dice = "" if not ma else ", mask Dice own/swapped map " + ", ".join(
        f"{g} {_num(d.get('mean'))}/{_num(rep['mask_adherence']['synthetic']['swapped_map'][g].get('mean'))}"
        for g, d in ma.items())
    print(f"local realism {_num(rep['local_realism']['ratio'])}, whole-volume realism {_num(rep['realism']['ratio'])}, "
          f"FID {rep['fid']['value']:.4g}, MMD^2 {rep['mmd']['mmd2']:.4g}, "
          f"MS-SSIM diversity {_num(div)}{dice}; report: {out / 'report.html'}")
    return 0


def _num(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def run(args) -> int:
    if args.eval_command == "memorization":
        return run_memorization(args)
    return run_quality(args)
