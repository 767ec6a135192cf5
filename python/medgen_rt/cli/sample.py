"""`medgen sample`: generate volumes as NIfTI + sidecar + previews, with their energy.
With no arguments it samples the embedded cine model into ./samples."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate volumes (default: the embedded cine model)")
    p.add_argument("--model", default="default", help="'default', a run folder, or a folder with dit/ and vae/")
    p.add_argument("--n", type=int, default=1, help="number of volumes")
    p.add_argument("--seed", type=int, default=0, help="volume i uses seed + i")
    p.add_argument("--steps", type=int, help="denoising steps (default 50; all T for ddpm)")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], help="default: ddim (euler for flow models)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 deterministic)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (mask-conditioned models)")
    p.add_argument("--masks", help="mask NIfTI or folder of them (TGCA / ControlNet models)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--device", default="auto")
    p.add_argument("--country", help="ISO 3166 alpha-3 code for CO2 (default MEDGEN_COUNTRY_ISO or DEU)")
    p.add_argument("--no-energy", action="store_true", help="do not meter energy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from medgen_rt.sampling.api import sample

    results = sample(args.model, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                     guidance=args.guidance, masks=args.masks, device=args.device, out=args.out, eta=args.eta,
                     energy=not args.no_energy, country=args.country, quiet=args.quiet)
    energy = results[0]["metadata"]["energy"]
    timings = [r["metadata"]["timings_s"] for r in results]
    seconds = sum(t["denoise"] + t["decode"] for t in timings)
    if energy["run_kwh"] is not None:
        energy_text = (f"{energy['run_kwh'] * 1000:.3f} Wh, {energy['run_kg_co2e'] * 1000:.3f} g CO2e "
                       f"({energy['country']}; {energy['per_volume']['kwh'] * 1000:.3f} Wh per volume)")
    else:
        energy_text = "energy not metered"
    print(f"wrote {len(results)} volume(s) to {args.out} in {seconds:.1f} s: {energy_text}")
    return 0
