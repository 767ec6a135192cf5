"""Tiled vs full-volume decode of a ct-ds8 VQ-GAN (random weights, fp32): time and
peak resident memory, each measured in a fresh child process, in one run.

    python bench/decode.py                      # 512x512x256 output (latent 64x64x32)
    python bench/decode.py --size 256 256 128   # smaller
    python bench/decode.py --core 32 32 16 --out bench/results/decode-cpu.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402


def child(mode: str, latent_shape, core) -> dict:
    import torch

    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.sampling.decode import decoder_geometry, tiled_decode

    torch.manual_seed(0)
    model = build_vqgan("ct-ds8").eval()
    latent = torch.randn(1, 8, *latent_shape)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "full":
            out = model.decode(latent)
        else:
            out = tiled_decode(model.decode, latent, decoder_geometry(model), core=core)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "seconds": round(seconds, 2), "peak_rss_gb": round(peak_kb / 2**20, 3),
            "rss_before_gb": round(base / 2**20, 3), "output_shape": list(out.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", nargs=3, type=int, default=[512, 512, 256], help="output size (multiples of 8)")
    p.add_argument("--core", nargs=3, type=int, default=[32, 32, 16], help="tile core in latent voxels")
    p.add_argument("--modes", nargs="+", default=["tiled", "full"], choices=["tiled", "full"])
    p.add_argument("--out", default="bench/results/decode.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    latent = [s // 8 for s in args.size]
    if args.child:
        print(json.dumps(child(args.child, latent, args.core)))
        return 0
    results = []
    for mode in args.modes:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--size", *map(str, args.size),
                               "--core", *map(str, args.core)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1])
    summary = {r["mode"]: r for r in results}
    if len(summary) == 2:
        summary["tiled_time_over_full"] = round(summary["tiled"]["seconds"] / summary["full"]["seconds"], 3)
        print(f"tiled/full time {summary['tiled_time_over_full']}, peak RSS tiled "
              f"{summary['tiled']['peak_rss_gb']} GB vs full {summary['full']['peak_rss_gb']} GB")
    write_json(args.out, {"benchmark": "ct-ds8 decode, tiled vs full", "size": args.size, "latent": latent,
                          "core": args.core, "device": device_description("cpu"), "versions": versions(),
                          "results": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
