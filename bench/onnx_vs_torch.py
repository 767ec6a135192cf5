"""(Not bench/onnx.py: a script of that name would shadow the onnx package.)
onnxruntime vs PyTorch eager on the same exported model, in one run: one
denoiser step and one decoded tile (medians of interleaved calls).

    python bench/onnx_vs_torch.py                                   # the embedded default model, CPU
    python bench/onnx_vs_torch.py --model runs/dit --device cuda    # CUDA provider vs torch on the GPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, median_times, versions, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tile", nargs="+", type=int, default=[16, 16, 8], help="decoder tile in latent voxels")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results/onnx-vs-torch.json")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from medgen_rt.export.onnx_export import export_model
    from medgen_rt.models import load_model
    from medgen_rt.sampling.api import resolve_model

    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    dev = torch.device(args.device)
    denoiser_dir, vae_dir = resolve_model(args.model)
    net, info = load_model(denoiser_dir)
    vae, _ = load_model(vae_dir)
    net, vae = net.eval().to(dev), vae.eval().to(dev)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_model(args.model, Path(tmp) / "x", fp16=False)
        den = ort.InferenceSession(str(Path(tmp) / "x" / "denoiser.onnx"), providers=providers)
        dec = ort.InferenceSession(str(Path(tmp) / "x" / "decoder.onnx"), providers=providers)
        x = torch.randn((1,) + tuple(info["latent_shape"]))
        t = torch.tensor([100.0])
        z = torch.randn((1, vae.config.embedding_dim, *args.tile))
        xd, td, zd = x.to(dev), t.to(dev), z.to(dev)
        feeds_den = {"x": x.numpy(), "t": t.numpy()}
        feeds_dec = {"z": z.numpy()}

        def torch_den():
            with torch.no_grad():
                return net(xd, td)

        def torch_dec():
            with torch.no_grad():
                return vae.decoder(zd)

        times = median_times({"denoiser_torch": torch_den, "denoiser_onnxruntime": lambda: den.run(None, feeds_den),
                              "decoder_torch": torch_dec, "decoder_onnxruntime": lambda: dec.run(None, feeds_dec)},
                             args.device, warmup=3, repeats=args.repeats)
        # the same numbers, checked
        diff_den = float(np.abs(den.run(None, feeds_den)[0] - torch_den().cpu().numpy()).max())
        diff_dec = float(np.abs(dec.run(None, feeds_dec)[0] - torch_dec().cpu().numpy()).max())
    for part in ("denoiser", "decoder"):
        results[part] = {"torch_ms": round(times[f"{part}_torch"] * 1e3, 3),
                         "onnxruntime_ms": round(times[f"{part}_onnxruntime"] * 1e3, 3),
                         "torch_over_onnxruntime": round(times[f"{part}_torch"] / times[f"{part}_onnxruntime"], 3),
                         "max_abs_diff": diff_den if part == "denoiser" else diff_dec}
        print(part, results[part])
    write_json(args.out, {"benchmark": "onnxruntime vs torch eager", "model": args.model,
                          "latent_shape": info["latent_shape"], "decoder_tile": args.tile,
                          "providers": providers, "onnxruntime": ort.__version__,
                          "device": device_description(args.device), "versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
