"""Benchmark gated_residual (``x + gate[b] * y``): the reference against every
backend that can run here, in one run, forward and forward+backward.

    python bench/gated_residual.py                      # CPU, the shapes below, float32
    python bench/gated_residual.py --device cuda --dtype float32 bfloat16 --out bench/results/gated-residual-h100.json

Writes JSON: device, versions, and per (shape, dtype, pass, backend) the median
time, effective GB/s (bytes that must move at least once) and the ratio to the
reference measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmarkable_backends, device_description, median_times, versions, write_json  # noqa: E402

from medgen_rt import ops  # noqa: E402

# (B, N, C): the two sizes first (DiT-S-wide tokens, DiT-B/2 on the 256^2x128 ct-ds8 latent),
# then DiT-L and cine DiT4D-S tokens, as in bench/adaln_modulate.py
DEFAULT_SHAPES = [(2, 4096, 384), (1, 16384, 768), (1, 16384, 1152), (2, 6144, 384)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def min_bytes(shape, dtype, backward: bool) -> int:
    B, N, C = shape
    e = torch.finfo(dtype).bits // 8
    fwd = (3 * B * N * C + B * C) * e  # read x and y, write out, read gate
    # backward: read dout and y, write dy (dx is dout itself), write dgate; the forward runs too
    return fwd + (3 * B * N * C + 2 * B * C) * e if backward else fwd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("B", "N", "C"),
                   help="repeatable; default: the issue's sizes, DiT-L and cine tokens")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--out", default="bench/results/gated-residual.json")
    args = p.parse_args(argv)

    device = args.device
    op = ops.get_op("gated_residual")
    backends, skipped = benchmarkable_backends(op, device)
    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    passes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    results = []
    load_before = os.getloadavg()[0]  # other work on the machine skews the medians; recorded beside them
    print(f"device: {device_description(device)['name']}   backends: {backends}   skipped: {skipped}")
    print(f"{'shape':>18} {'dtype':>9} {'pass':>17} {'backend':>10} {'ms':>9} {'GB/s':>8} {'x ref':>7}")
    for shape, dtype_name in ((s, d) for s in shapes for d in args.dtype):
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(0)
        B, N, C = shape
        x = torch.randn(B, N, C, generator=gen).to(device, dtype)
        gate = torch.randn(B, C, generator=gen).to(device, dtype)
        y = torch.randn(B, N, C, generator=gen).to(device, dtype)
        dout = torch.randn(B, N, C, generator=gen).to(device, dtype)
        for pass_name in passes:
            backward = pass_name != "forward"
            fns = {}
            for backend in backends:
                if backward:
                    xg, gg, yg = (t.clone().requires_grad_(True) for t in (x, gate, y))

                    def fn(backend=backend, xg=xg, gg=gg, yg=yg):
                        out = op(xg, gg, yg, backend=backend)
                        torch.autograd.grad(out, (xg, gg, yg), dout)
                else:
                    def fn(backend=backend):
                        with torch.no_grad():
                            op(x, gate, y, backend=backend)
                fns[backend] = fn
            times = median_times(fns, device, repeats=args.repeats)
            ref_time = times["reference"]
            for backend, t in times.items():
                gbs = min_bytes(shape, dtype, backward) / t / 1e9
                results.append({"shape": list(shape), "dtype": dtype_name, "pass": pass_name, "backend": backend,
                                "median_ms": round(t * 1e3, 4), "gb_per_s": round(gbs, 2),
                                "speedup_vs_reference": round(ref_time / t, 3)})
                print(f"{str(shape):>18} {dtype_name:>9} {pass_name:>17} {backend:>10} {t * 1e3:9.3f} "
                      f"{gbs:8.2f} {ref_time / t:7.2f}")
    write_json(args.out, {"benchmark": "gated_residual", "device": device_description(device),
                          "versions": versions(), "skipped_backends": skipped, "repeats": args.repeats,
                          "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
