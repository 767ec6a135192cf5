"""Reconstruction quality of a trained VQ-GAN run on a data folder (held-out
subjects): PSNR (data range 2, images in [-1, 1]) per subject and the mean.

    python bench/vqgan_psnr.py runs/vae data/heldout --out bench/results/vqgan-psnr.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402

from medgen_rt.models import load_model  # noqa: E402
from medgen_rt.train.vae import open_image_set, psnr  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="VQ-GAN run folder")
    p.add_argument("data", help="data folder of held-out subjects")
    p.add_argument("--out", default="bench/results/vqgan-psnr.json")
    args = p.parse_args(argv)
    model, info = load_model(args.run)
    model.eval()
    dataset = open_image_set(args.data, info["modality"], info.get("data", {}))
    rows = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            vol = torch.from_numpy(np.ascontiguousarray(item["image"], dtype=np.float32))
            rec = model.decode(model.encode_to_latent(vol[None, None]))[0, 0]
            rows.append({"name": item["name"], "psnr_db": round(psnr(rec, vol), 3),
                         "l1": round(float((rec - vol).abs().mean()), 5)})
            print(f"{item['name']}: {rows[-1]['psnr_db']:.2f} dB")
    mean = float(np.mean([r["psnr_db"] for r in rows]))
    print(f"mean PSNR {mean:.2f} dB over {len(rows)} subject(s)")
    write_json(args.out, {"benchmark": "vqgan_psnr", "run": str(args.run), "data": str(args.data),
                          "device": device_description("cpu"), "versions": versions(), "subjects": rows,
                          "mean_psnr_db": round(mean, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
