"""Benchmark vq_nearest (nearest codebook entry by squared L2): the reference
against every backend that can run here, in one run.

    python bench/vq_nearest.py                      # CPU, the shapes below, float32
    python bench/vq_nearest.py --device cuda --out bench/results/vq-nearest-h100.json

Writes JSON: device, versions, and per (shape, dtype, backend) the median time,
effective GB/s (bytes that must move at least once: z, the codebook, indices
and quantized vectors), distances per second (the op is compute bound: N x K
distances of D multiply-adds each), the ratio to the reference measured in the
same run, and whether the backend's indices equal the reference's.
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

# (N, K, D): the issue's size, against the presets' codebooks of 16384, 4096 and 256 entries of dimension 8
DEFAULT_SHAPES = [(32768, 16384, 8), (32768, 4096, 8), (32768, 256, 8)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def min_bytes(shape, dtype) -> int:
    N, K, D = shape
    e = torch.finfo(dtype).bits // 8
    return (2 * N * D + K * D) * e + 8 * N  # read z and the codebook, write quantized and int64 indices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--shape", nargs=3, type=int, action="append", metavar=("N", "K", "D"),
                   help="repeatable; default: the issue's size and the preset codebooks")
    p.add_argument("--repeats", type=int, default=10, help="the reference takes seconds per call on a CPU")
    p.add_argument("--out", default="bench/results/vq-nearest.json")
    args = p.parse_args(argv)

    device = args.device
    op = ops.get_op("vq_nearest")
    backends, skipped = benchmarkable_backends(op, device)
    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    results = []
    load_before = os.getloadavg()[0]  # other work on the machine skews the medians; recorded beside them
    print(f"device: {device_description(device)['name']}   backends: {backends}   skipped: {skipped}")
    print(f"{'shape':>20} {'dtype':>9} {'backend':>10} {'ms':>10} {'GB/s':>7} {'Gdist/s':>8} {'x ref':>7} same")
    for shape, dtype_name in ((s, d) for s in shapes for d in args.dtype):
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(0)
        N, K, D = shape
        z = torch.randn(N, D, generator=gen).to(device, dtype)
        codebook = torch.randn(K, D, generator=gen).to(device, dtype)
        expected = op(z, codebook, backend="reference")[0]
        same = {b: bool(torch.equal(op(z, codebook, backend=b)[0], expected)) for b in backends}
        fns = {b: (lambda b=b: op(z, codebook, backend=b)) for b in backends}
        times = median_times(fns, device, warmup=1, repeats=args.repeats)
        ref_time = times["reference"]
        for backend, t in times.items():
            gbs = min_bytes(shape, dtype) / t / 1e9
            gdist = N * K / t / 1e9
            results.append({"shape": list(shape), "dtype": dtype_name, "backend": backend,
                            "median_ms": round(t * 1e3, 4), "gb_per_s": round(gbs, 3),
                            "gdistances_per_s": round(gdist, 3), "speedup_vs_reference": round(ref_time / t, 3),
                            "indices_equal_reference": same[backend]})
            print(f"{str(shape):>20} {dtype_name:>9} {backend:>10} {t * 1e3:10.3f} {gbs:7.3f} {gdist:8.3f} "
                  f"{ref_time / t:7.2f} {same[backend]}")
    write_json(args.out, {"benchmark": "vq_nearest", "device": device_description(device),
                          "versions": versions(), "skipped_backends": skipped, "repeats": args.repeats,
                          "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
