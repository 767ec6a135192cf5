"""Benchmark tile_blend (``out[region] += w * tile; weight_sum[region] += w``) and
tile_normalize: the reference against every backend that can run here, in one run.

    python bench/tile_blend.py                         # CPU, the shapes below
    python bench/tile_blend.py --device cuda --out bench/results/tile-blend-h100.json

Shapes are those of decoding a 512x512x256 CT: a halo tile of 128^3 voxels with
blend weights, and a streamed chunk (8 output planes of the whole cross-section,
disjoint, no weights). On CUDA the output lives in pinned CPU memory, as in
sampling, so the device-to-host copy is part of what is timed.

Writes JSON: device, versions, and per (case, backend) the median time,
effective GB/s (bytes that must move at least once) and the ratio to the
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

OUT_SHAPE = (1, 1, 512, 512, 256)
# name -> (region as (start, size) per axis, weighted)
CASES = {
    "halo-tile-128^3-weighted": (((192, 128), (192, 128), (64, 128)), True),
    "streamed-chunk-512x512x8": (((0, 512), (0, 512), (120, 8)), False),
}


def min_bytes(size, weighted: bool) -> int:
    n = 1
    for s in size:
        n *= s
    # read tile, read+write the output region; with weights also read w and read+write weight_sum
    return 4 * n * (3 + (3 if weighted else 0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="bench/results/tile-blend.json")
    args = p.parse_args(argv)

    device = args.device
    op = ops.get_op("tile_blend")
    normalize = ops.get_op("tile_normalize")
    backends, skipped = benchmarkable_backends(op, device)
    # the output stays on the host (pinned when a GPU decodes), as in sampling
    pin = device.startswith("cuda")
    out = torch.zeros(OUT_SHAPE, pin_memory=pin)
    weight_sum = torch.zeros(OUT_SHAPE[2:], pin_memory=pin)
    gen = torch.Generator().manual_seed(0)
    results = []
    load_before = os.getloadavg()[0]
    print(f"device: {device_description(device)['name']}   backends: {backends}   skipped: {skipped}")
    print(f"{'case':>28} {'backend':>10} {'ms':>9} {'GB/s':>8} {'x ref':>7}")
    for case, (spec, weighted) in CASES.items():
        region = tuple(slice(s, s + n) for s, n in spec)
        size = tuple(n for _, n in spec)
        tile = torch.randn((1, 1, *size), generator=gen).to(device)
        weight = torch.rand(size, generator=gen).to(device) if weighted else None
        sums = weight_sum if weighted else None
        fns = {b: (lambda b=b: op(out, sums, tile, region, weight, backend=b)) for b in backends}
        times = median_times(fns, device, repeats=args.repeats)
        for backend, t in times.items():
            gbs = min_bytes(size, weighted) / t / 1e9
            results.append({"case": case, "out_shape": list(OUT_SHAPE), "tile_shape": list(tile.shape),
                            "backend": backend, "median_ms": round(t * 1e3, 4), "gb_per_s": round(gbs, 2),
                            "speedup_vs_reference": round(times["reference"] / t, 3)})
            print(f"{case:>28} {backend:>10} {t * 1e3:9.3f} {gbs:8.2f} {times['reference'] / t:7.2f}")
    # the final normalisation over the whole output (weight_sum was filled above)
    weight_sum.clamp_(min=1.0)
    norm_backends, norm_skipped = benchmarkable_backends(normalize, "cpu")
    fns = {b: (lambda b=b: normalize(out, weight_sum, backend=b)) for b in norm_backends}
    times = median_times(fns, "cpu", warmup=2, repeats=max(5, args.repeats // 3))
    n = out.numel()
    for backend, t in times.items():
        gbs = 4 * (3 * n) / t / 1e9  # read+write out, read weight_sum (one channel)
        results.append({"case": "normalize-512x512x256", "backend": backend, "median_ms": round(t * 1e3, 4),
                        "gb_per_s": round(gbs, 2), "speedup_vs_reference": round(times["reference"] / t, 3)})
        print(f"{'normalize-512x512x256':>28} {backend:>10} {t * 1e3:9.3f} {gbs:8.2f} {times['reference'] / t:7.2f}")
    write_json(args.out, {"benchmark": "tile_blend", "device": device_description(device),
                          "versions": versions(), "skipped_backends": {**skipped, **norm_skipped},
                          "repeats": args.repeats,
                          "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
