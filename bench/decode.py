"""Streamed (and halo-tiled) vs full-volume decode of a ct-ds8 or ct-ds4 VQ-GAN (random
weights, fp32): time and peak resident memory, each measured in a fresh child
process, in one run.

    python bench/decode.py                      # ct-ds8, 512x512x256 output (latent 64x64x32)
    python bench/decode.py --vae ct-ds4         # MedLoRD's VQ-GAN: latent 128x128x64
    python bench/decode.py --size 256 256 128   # smaller
    python bench/decode.py --modes streamed tiled full --chunk 4 --core 32 32 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402


def child(mode: str, vae: str, latent_shape, core, chunk, save) -> dict:
    import torch

    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.sampling.decode import decoder_geometry, streamed_decode, tiled_decode

    torch.manual_seed(0)
    model = build_vqgan(vae).eval()
    latent = torch.randn(1, 8, *latent_shape)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "full":
            out = model.decode(latent)
        elif mode == "streamed":
            out = streamed_decode(model, latent, chunk=chunk)
        else:
            out = tiled_decode(model.decode, latent, decoder_geometry(model), core=core)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if save:
        import numpy as np

        np.save(save, out.numpy())
    return {"mode": mode, "seconds": round(seconds, 2), "peak_rss_gb": round(peak_kb / 2**20, 3),
            "rss_before_gb": round(base / 2**20, 3), "output_shape": list(out.shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="ct-ds8", choices=["ct-ds8", "ct-ds4"], help="VQ-GAN preset (8x or 4x)")
    p.add_argument("--size", nargs=3, type=int, default=[512, 512, 256], help="output size (multiples of the factor)")
    p.add_argument("--core", nargs=3, type=int, default=[32, 32, 16], help="tile core in latent voxels")
    p.add_argument("--chunk", type=int, default=2, help="streamed: latent planes per step")
    p.add_argument("--modes", nargs="+", default=["streamed", "full"], choices=["streamed", "tiled", "full"])
    p.add_argument("--out", default="bench/results/decode.json")
    p.add_argument("--no-check", action="store_true", help="do not compare each output with the full decode's")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    factor = 8 if args.vae == "ct-ds8" else 4
    latent = [s // factor for s in args.size]
    if args.child:
        print(json.dumps(child(args.child, args.vae, latent, args.core, args.chunk, args.save)))
        return 0
    results = []
    check = not args.no_check and "full" in args.modes
    scratch = tempfile.TemporaryDirectory(prefix="medgen-bench-decode-")
    for mode in args.modes:
        save = ["--save", str(Path(scratch.name) / f"{mode}.npy")] if check else []
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--vae", args.vae, "--size", *map(str, args.size),
                               "--core", *map(str, args.core), "--chunk", str(args.chunk), *save],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1])
    summary = {r["mode"]: r for r in results}
    if check:  # the output after all: the same volume as the full decode (memory-mapped, one at a time)
        import numpy as np

        full = np.load(Path(scratch.name) / "full.npy", mmap_mode="r")
        for mode in set(summary) - {"full"}:
            other = np.load(Path(scratch.name) / f"{mode}.npy", mmap_mode="r")
            summary[mode]["max_abs_diff_vs_full"] = float(np.max(np.abs(other - full)))
            summary[mode]["full_max_abs"] = float(np.max(np.abs(full)))
            print(f"{mode}: max abs difference to the full decode {summary[mode]['max_abs_diff_vs_full']:.3g}")
    scratch.cleanup()
    if "full" in summary:
        for mode in set(summary) - {"full"}:
            summary[f"{mode}_time_over_full"] = round(summary[mode]["seconds"] / summary["full"]["seconds"], 3)
            print(f"{mode}/full time {summary[f'{mode}_time_over_full']}, peak RSS {mode} "
                  f"{summary[mode]['peak_rss_gb']} GB vs full {summary['full']['peak_rss_gb']} GB")
    write_json(args.out, {"benchmark": f"{args.vae} decode: streamed or tiled vs full volume", "vae": args.vae,
                          "size": args.size, "latent": latent,
                          "core": args.core, "chunk": args.chunk, "device": device_description("cpu"), "versions": versions(),
                          "results": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
