"""`medgen sample`: generate volumes as NIfTI (and/or DICOM, --format) + sidecar + previews,
with their energy.
With no arguments it samples the embedded cine model into ./samples.

Under torchrun (`torchrun --nproc-per-node N -m medgen_rt.sample ...`) each rank
makes every N-th volume (volume i keeps seed + i, so the set does not depend on
N) and rank 0 writes one merged summary.json and the summary line; rank 0 alone
locks and prepares --out, the others wait for its answer."""
from __future__ import annotations

import os


def add_arguments(p) -> None:
    from medgen_rt.runtime.energy import country_arg

    p.add_argument("--model", default="default",
                   help="an embedded model: 'default' or 'cine' (cine MR), 'ct' (CT from a label map, needs "
                        "--masks); or a run folder, or a folder with dit/ (tgca/, ...) and vae/")
    # -n / --num-volumes for torchrun, which takes "--n" for an abbreviation of its own options
    p.add_argument("-n", "--n", "--num-volumes", dest="n", type=int, default=1, help="number of volumes")
    p.add_argument("--seed", type=int, default=0, help="volume i uses seed + i")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's default_steps (a distilled student's), "
                                             "else 50; all T for ddpm); a student takes only its supported_steps")
    p.add_argument("--teacher", action="store_true",
                   help="an embedded model that ships a distilled student (NAME/student, used by default when "
                        "within 5%% of its 50-step teacher): sample with the teacher and the full sampler instead "
                        "(default 50 steps)")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], help="default: ddim (euler for flow models)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (mask-conditioned models)")
    p.add_argument("--masks", help="mask NIfTI or folder of them (TGCA / ControlNet models)")
    p.add_argument("--unconditional", action="store_true",
                   help="mask-conditioned models: sample through the null condition, without masks")
    p.add_argument("--out", default="samples",
                   help="output folder (default ./samples), locked for the run; each volume is written as soon "
                        "as it is decoded")
    p.add_argument("--format", choices=["nifti", "dicom", "nifti+dicom"], default="nifti",
                   help="what each volume is written as (default nifti): dicom writes NAME_dicom/ with the CT or MR "
                        "series and the mask as DICOM SEG, marked synthetic (needs pydicom and highdicom)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier run's samples: remove them (sample_NNN.*, summary.json) first; "
                        "without it such a folder is refused")
    p.add_argument("--cache", type=float, metavar="THRESHOLD",
                   help="step caching (DiT/TGCA models, torch engine): a transformer block whose modulated input "
                        "changed by less than THRESHOLD (relative L1, e.g. 0.05) since its last evaluation reuses "
                        "that evaluation's residual; 0 gives the uncached result; the sidecar counts skipped blocks")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="onnx: run a `medgen export onnx` folder with onnxruntime, without PyTorch")
    p.add_argument("--max-vram", help="plan batch and decode chunks to fit this much GPU memory, e.g. 8GB")
    p.add_argument("--plan-only", action="store_true",
                   help="print the memory plan (denoiser dtype and batch, decode chunk, predicted peak per phase) "
                        "for these options and exit: nothing is sampled or written (--out is not used; masks "
                        "are optional); --device cuda without a GPU here plans for one of --max-vram from the layer "
                        "shapes; torch engine only")
    p.add_argument("--country", type=country_arg,
                   help="ISO 3166 alpha-3 code for CO2 (default MEDGEN_COUNTRY_ISO or DEU)")
    p.add_argument("--no-energy", action="store_true", help="do not meter energy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    add_arguments(subparsers.add_parser("sample", help="generate volumes (default: the embedded cine model)"))


def run(args) -> int:
    from medgen_rt.io.atomic import check_out

    if args.plan_only:
        return _run_plan(args)
    check_out(args.out)  # before any model is loaded: a folder we cannot write fails first
    if args.engine == "onnx":
        return _run_onnx(args)
    from medgen_rt.sampling.api import sample
    from medgen_rt.sampling.summary import check_request, summarize, write_summary

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_request(args.n, args.seed, args.steps, args.guidance, args.eta)  # before the process group
    device = args.device
    if world > 1:
        from medgen_rt.train.distributed import init_distributed

        device = str(init_distributed(args.device).device)
    # held (rank 0: locked) until summary.json is written
    with _output_folder(args, lead=rank == 0, share=_from_rank0 if world > 1 else None) as folder:
        results = sample(args.model, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                         guidance=args.guidance, masks=args.masks, device=device, out=folder, eta=args.eta,
                         max_vram=args.max_vram, energy=not args.no_energy, country=args.country,
                         quiet=args.quiet or rank > 0, indices=range(rank, args.n, world),
                         unconditional=args.unconditional, cache=args.cache, teacher=args.teacher)
        metadata = [dict(r["metadata"], files=r["files"], rank=rank) for r in results]
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, metadata)
            # every rank past the gather before any tears its gloo pairs down: a rank that
            # destroys the group while another still finishes the collective can abort it
            # (SIGABRT, "terminate called without an active exception"; seen once in CI)
            dist.barrier()
            dist.destroy_process_group()
            metadata = [m for part in gathered for m in part]
        if rank > 0:
            return 0
        summary = summarize(metadata)
        write_summary(folder.path, summary)
    _print_summary(args, summary, world)
    return 0


def _run_plan(args) -> int:
    """--plan-only: the plan sampling with these options would follow, printed; nothing written."""
    if args.engine == "onnx":
        raise ValueError("--plan-only plans the torch runtime; the onnx engine decodes with fixed tiles "
                         "(use --engine torch)")
    from medgen_rt.sampling.api import plan

    p = plan(args.model, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
             masks=args.masks, max_vram=args.max_vram, device=args.device, eta=args.eta,
             unconditional=args.unconditional, cache=args.cache, teacher=args.teacher)
    print(f"model {args.model}, {args.n} volume(s){', guided' if args.guidance is not None else ''}")
    print(p.describe())
    return 0


def _output_folder(args, **kwargs):
    from medgen_rt.io.dicom import parse_format
    from medgen_rt.io.outputs import OutputFolder

    return OutputFolder(args.out, overwrite=args.overwrite, arg="--out", overwrite_arg="--overwrite",
                        formats=parse_format(args.format), **kwargs)


def _from_rank0(message):
    """Rank 0's answer (an error message, or None) on every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_onnx(args) -> int:
    """The torch-free path: imports nothing that needs PyTorch."""
    from medgen_rt.export.engine import OnnxEngine
    from medgen_rt.sampling.summary import check_request, summarize, write_summary

    if args.max_vram:
        raise ValueError("--max-vram plans the torch runtime; the onnx engine decodes with fixed tiles")
    if args.unconditional:
        raise ValueError("--unconditional is not in the onnx engine yet; use --engine torch")
    if args.cache is not None:
        raise ValueError("--cache: step caching needs the network's blocks, so it is torch-runtime only; "
                         "use --engine torch")
    if args.teacher:
        from medgen_rt.sampling.spec import TEACHER_ONNX

        raise ValueError(TEACHER_ONNX)
    check_request(args.n, args.seed, args.steps, args.guidance, args.eta)
    engine = OnnxEngine(args.model, device=args.device)
    with _output_folder(args) as folder:
        results = engine.sample(n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                                guidance=args.guidance, masks=args.masks, out=folder, eta=args.eta,
                                energy=not args.no_energy, country=args.country, quiet=args.quiet)
        summary = summarize([dict(r["metadata"], files=r["files"]) for r in results])
        write_summary(folder.path, summary)
    _print_summary(args, summary, 1)
    return 0


def _print_summary(args, summary: dict, world: int) -> None:
    energy = summary["energy"]
    if energy["kwh"] is not None:
        energy_text = (f"{energy['kwh'] * 1000:.3f} Wh, {energy['kg_co2e'] * 1000:.3f} g CO2e "
                       f"({energy['country']}; {energy['per_volume']['kwh'] * 1000:.3f} Wh per volume)")
    else:
        energy_text = "energy not metered"
    ranks = f" on {world} processes" if world > 1 else ""
    print(f"wrote {summary['n']} volume(s) to {args.out}{ranks} in {summary['seconds']:.1f} s: {energy_text}")
