"""Benchmark patch_embed (gather + linear + bias + positional embedding) and
unpatchify: the reference against every backend that can run here, in one run;
optionally torch.compile of the reference (--compile).

    python bench/patch_embed.py                     # CPU, the DiT shapes below, float32
    python bench/patch_embed.py --quick             # a small latent, a few repeats: checks the script runs
    python bench/patch_embed.py --device cuda --dtype bfloat16 --compile --out bench/results/patch-embed-h100.json

Shapes: DiT3D-S/B/L with patch 2 on the 512x512x256 ct-ds8 latent (1, 8, 64, 64, 32),
16384 tokens, and DiT4D-B on the cine latent (1, 8, 6, 64, 64, 8), patch (1, 4, 4, 2),
6144 tokens. Writes JSON: device, versions, and per (shape, dtype, pass, backend) the
median time, effective GB/s (bytes that must move at least once), TFLOP/s of the
projection and the ratio to the reference measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmarkable_backends, device_description, median_times, versions, write_json  # noqa: E402

from medgen_rt import ops  # noqa: E402
from medgen_rt.models.dit import CMR_LATENT, CMR_PATCH, CT_DS8_LATENT, DIT3D_SIZES, DIT4D_SIZES  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LATENT_CHANNELS = 8
# name -> (B, spatial, patch, hidden)
SHAPES = {
    "dit3d-s/2": (1, CT_DS8_LATENT, (2, 2, 2), DIT3D_SIZES["S"][1]),
    "dit3d-b/2": (1, CT_DS8_LATENT, (2, 2, 2), DIT3D_SIZES["B"][1]),
    "dit3d-l/2": (1, CT_DS8_LATENT, (2, 2, 2), DIT3D_SIZES["L"][1]),
    "dit4d-b": (1, CMR_LATENT, CMR_PATCH, DIT4D_SIZES["B"][1]),
}
QUICK_SHAPES = {"quick-3d": (1, (16, 16, 8), (2, 2, 2), 384), "quick-4d": (1, (2, 16, 16, 4), CMR_PATCH, 768)}


def _sizes(shape):
    B, spatial, patch, hidden = shape
    N = math.prod(s // p for s, p in zip(spatial, patch))
    K = LATENT_CHANNELS * math.prod(patch)
    return B, N, K, hidden


def min_bytes(shape, dtype, op: str, backward: bool) -> int:
    B, N, K, hidden = _sizes(shape)
    e = torch.finfo(dtype).bits // 8
    if op == "unpatchify":  # read tokens, write the volume (the backward: the same again)
        return 2 * B * N * K * e * (2 if backward else 1)
    fwd = (B * N * K + hidden * K + hidden + N * hidden + B * N * hidden) * e  # x, weight, bias, pos, out
    # backward: read dout and x and weight, write dx, dweight, dbias, dpos
    bwd = (B * N * hidden + 2 * B * N * K + 2 * hidden * K + hidden + N * hidden) * e
    return fwd + bwd if backward else fwd


def flops(shape, op: str, backward: bool) -> int:
    if op == "unpatchify":
        return 0
    B, N, K, hidden = _sizes(shape)
    return 2 * B * N * K * hidden * (3 if backward else 1)  # the backward: dx and dweight GEMMs


def _make(shape, dtype, device, gen):
    B, spatial, patch, hidden = shape
    _, N, K, _ = _sizes(shape)
    x = torch.randn(B, LATENT_CHANNELS, *spatial, generator=gen).to(device, dtype)
    w = (torch.randn(hidden, K, generator=gen) / K ** 0.5).to(device, dtype)
    b = torch.randn(hidden, generator=gen).to(device, dtype)
    pos = torch.randn(1, N, hidden, generator=gen).to(device, dtype)
    tokens = torch.randn(B, N, K, generator=gen).to(device, dtype)  # final layer output, C_out = C_in
    return x, w, b, pos, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: all of them")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small latents and 3 repeats: a smoke run")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    p.add_argument("--out", default="bench/results/patch-embed.json")
    args = p.parse_args(argv)

    device = args.device
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    repeats = 3 if args.quick else args.repeats
    passes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    pe, unp = ops.get_op("patch_embed"), ops.get_op("unpatchify")
    backends, skipped = benchmarkable_backends(pe, device)
    compiled = {}
    if args.compile:
        compiled = {"patch_embed": torch.compile(pe.reference, dynamic=False),
                    "unpatchify": torch.compile(unp.reference, dynamic=False)}
    compile_errors = {}
    results = []
    load_before = os.getloadavg()[0]  # other work on the machine skews the medians; recorded beside them
    print(f"device: {device_description(device)['name']}   backends: {backends}   skipped: {skipped}")
    print(f"{'shape':>10} {'op':>11} {'dtype':>9} {'pass':>17} {'backend':>24} {'ms':>9} {'GB/s':>8} "
          f"{'TFLOP/s':>8} {'x ref':>7}")
    for (name, shape), dtype_name in ((s, d) for s in shapes.items() for d in args.dtype):
        dtype = DTYPES[dtype_name]
        x, w, b, pos, tokens = _make(shape, dtype, device, torch.Generator().manual_seed(0))
        B, spatial, patch, hidden = shape
        grid = tuple(s // q for s, q in zip(spatial, patch))
        for op_name in ("patch_embed", "unpatchify"):
            op = pe if op_name == "patch_embed" else unp
            inputs = (x, w, b, patch, pos) if op_name == "patch_embed" else (tokens, grid, patch, LATENT_CHANNELS)
            for pass_name in passes:
                backward = pass_name != "forward"
                fns = {}
                candidates = [(bk, lambda *a, bk=bk: op(*a, backend=bk)) for bk in backends]
                if op_name in compiled:
                    candidates.append(("reference+torch.compile", compiled[op_name]))
                for label, call in candidates:
                    if backward:
                        leaves = [t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t
                                  for t in inputs]
                        grads_of = [t for t in leaves if isinstance(t, torch.Tensor)]
                        dout = torch.randn_like(call(*leaves))

                        def fn(call=call, leaves=leaves, grads_of=grads_of, dout=dout):
                            torch.autograd.grad(call(*leaves), grads_of, dout)
                    else:
                        def fn(call=call):
                            with torch.no_grad():
                                call(*inputs)
                    try:
                        fn()  # compiles here, outside the timing
                    except Exception as exc:  # noqa: BLE001 - torch.compile may not work on every setup
                        compile_errors[f"{name}/{op_name}/{dtype_name}/{pass_name}/{label}"] = repr(exc)[:300]
                        continue
                    fns[label] = fn
                times = median_times(fns, device, warmup=2 if args.quick else 5, repeats=repeats)
                ref_time = times["reference"]
                for label, t in times.items():
                    gbs = min_bytes(shape, dtype, op_name, backward) / t / 1e9
                    tflops = flops(shape, op_name, backward) / t / 1e12
                    results.append({"shape": name, "x_shape": [B, LATENT_CHANNELS, *spatial], "patch": list(patch),
                                    "hidden": hidden, "op": op_name, "dtype": dtype_name, "pass": pass_name,
                                    "backend": label, "median_ms": round(t * 1e3, 4), "gb_per_s": round(gbs, 2),
                                    "tflop_per_s": round(tflops, 4), "speedup_vs_reference": round(ref_time / t, 3)})
                    print(f"{name:>10} {op_name:>11} {dtype_name:>9} {pass_name:>17} {label:>24} {t * 1e3:9.3f} "
                          f"{gbs:8.2f} {tflops:8.3f} {ref_time / t:7.2f}")
    write_json(args.out, {"benchmark": "patch_embed", "device": device_description(device), "versions": versions(),
                          "skipped_backends": skipped, "compile_errors": compile_errors, "repeats": repeats,
                          "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
