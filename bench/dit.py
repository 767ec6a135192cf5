"""A DiT with the default (fastest) backends against the same DiT on the
reference backends, in one run: one DiT block and the whole forward, at the token
counts of the published latents (DiT3D-S/2 and -B/2 on the 512x512x256 ct-ds8
latent: 16384 tokens); optionally torch.compile of the reference (--compile).

    python bench/dit.py                               # CPU: DiT3D-S/2 at 16384 tokens
    python bench/dit.py --device cuda --dtype bfloat16 --presets dit3d-s/2 dit3d-b/2 dit3d-l/2
    python bench/dit.py --models cmr4d-tiny ct --compile   # the embedded defaults' denoisers, as sampled

With --models, each embedded model's denoiser (its shipped weights) is called as the sampler
calls it: at its latent shape, batch 1, and for a mask-conditioned model (TGCA) batch 2 with a
mask (the conditional and the null branch of guidance). --compile adds torch.compile(fullgraph)
of the model on the default and on the reference backends.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, median_times, versions, write_json  # noqa: E402

from medgen_rt.models.dit import DiT, dit_config  # noqa: E402
from medgen_rt.ops.registry import ENV_VAR  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _with_backend(fn, backend):
    """Run fn with MEDGEN_BACKEND=backend (None: automatic choice)."""
    def run():
        old = os.environ.pop(ENV_VAR, None)
        if backend:
            os.environ[ENV_VAR] = backend
        try:
            return fn()
        finally:
            os.environ.pop(ENV_VAR, None)
            if old is not None:
                os.environ[ENV_VAR] = old
    return run


def _embedded(name: str, device, dtype, args) -> list:
    """Default vs reference backends (and compiled) on one embedded model's denoiser."""
    from medgen_rt.models import load_model
    from medgen_rt.sampling.api import resolve_model

    # the teacher network: a shipped student has the same architecture, so the same cost
    model, info = load_model(resolve_model(name, teacher=True)[0])
    model = model.eval().to(device, dtype)
    torch.manual_seed(0)
    latent = tuple(info["latent_shape"])
    if info["kind"] == "tgca":
        image = tuple(info["geometry"]["image_shape"])
        labels = torch.randint(0, model.mask_channels + 1, (2, *image), device=device)
        mask = torch.nn.functional.one_hot(labels, model.mask_channels + 1)[..., 1:].movedim(-1, 1).to(dtype)
        x, extra = torch.randn(2, *latent, device=device, dtype=dtype), (mask,)
    else:
        x, extra = torch.randn(1, *latent, device=device, dtype=dtype), ()
    t = torch.full((x.shape[0],), 0.5 if info["diffusion"]["objective"] == "flow" else 150.0, device=device)

    def call(net):
        def run():
            with torch.no_grad():
                return net(x, t, *extra)
        return run

    fns = {"default": _with_backend(call(model), None), "reference": _with_backend(call(model), "reference")}
    if args.compile:
        for backend in ("default", "reference"):
            compiled = torch.compile(model, fullgraph=True)
            fns[f"{backend}+torch.compile"] = _with_backend(call(compiled), None if backend == "default" else backend)
    outputs = {k: fn() for k, fn in fns.items()}  # also compiles before timing
    times = median_times(fns, device, warmup=2, repeats=args.repeats)
    rows = []
    for key, seconds in times.items():
        ref = times["reference"]
        diff = (outputs[key] - outputs["reference"]).abs().max().item()
        rows.append({"model": name, "kind": info["kind"], "batch": x.shape[0], "latent": list(latent),
                     "backends": key, "median_ms": round(seconds * 1e3, 3), "time_over_reference": round(seconds / ref, 3),
                     "max_abs_diff_vs_reference": diff})
        print(f"{name:>12} batch {x.shape[0]} {key:>28} {seconds * 1e3:9.2f} ms  {seconds / ref:6.3f}x ref  diff {diff:.2g}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--presets", nargs="+", default=["dit3d-s/2"])
    p.add_argument("--models", nargs="+", help="embedded models (e.g. cmr4d-tiny ct) instead of --presets")
    p.add_argument("--latent", nargs=3, type=int, default=[64, 64, 32], help="latent spatial size (ct-ds8 of 512^2x256)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also torch.compile the reference model")
    p.add_argument("--out", default="bench/results/dit.json")
    args = p.parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    results = []
    if args.models:
        for name in args.models:
            results += _embedded(name, device, dtype, args)
        write_json(args.out, {"benchmark": "embedded denoisers' forward, default vs reference backends",
                              "device": device_description(device), "versions": versions(),
                              "threads": torch.get_num_threads(), "results": results})
        return 0
    for preset in args.presets:
        torch.manual_seed(0)
        model = DiT(dit_config(preset, input_size=tuple(args.latent), in_channels=8)).eval().to(device, dtype)
        # the published zero init makes every block an identity and the output zero
        for linear in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.linear,
                                                                        model.final_layer.adaLN_modulation[-1]]:
            torch.nn.init.normal_(linear.weight, std=0.02)
        x = torch.randn(1, 8, *args.latent, device=device, dtype=dtype)
        t = torch.tensor([500.0], device=device)
        tokens, c, _, _, rope = model.embed(x, t)
        block = model.blocks[0]

        def forward():
            with torch.no_grad():
                return model(x, t)

        def one_block():
            with torch.no_grad():
                return block(tokens, c, rope)

        fns = {"forward/default": _with_backend(forward, None), "forward/reference": _with_backend(forward, "reference"),
               "block/default": _with_backend(one_block, None), "block/reference": _with_backend(one_block, "reference")}
        if args.compile:
            compiled = torch.compile(model)

            def compiled_forward():
                with torch.no_grad():
                    return compiled(x, t)
            fns["forward/reference+torch.compile"] = _with_backend(compiled_forward, "reference")
        diff = (fns["forward/default"]() - fns["forward/reference"]()).abs().max().item()
        times = median_times(fns, device, warmup=2, repeats=args.repeats)
        n_tokens = tokens.shape[1]
        for name, seconds in times.items():
            part = name.split("/")[0]
            ref = times[f"{part}/reference"]
            results.append({"preset": preset, "tokens": n_tokens, "dtype": args.dtype, "part": part,
                            "backends": name.split("/", 1)[1], "median_ms": round(seconds * 1e3, 3),
                            "time_over_reference": round(seconds / ref, 3)})
            print(f"{preset:>10} {n_tokens:>6} tokens {name:>34} {seconds * 1e3:10.2f} ms  {seconds / ref:6.3f}x ref")
        results.append({"preset": preset, "max_abs_diff_default_vs_reference": diff})
        print(f"{preset}: max abs difference default vs reference {diff:.3g}")
    write_json(args.out, {"benchmark": "DiT forward and block, default vs reference backends",
                          "device": device_description(device), "versions": versions(), "latent": args.latent,
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
