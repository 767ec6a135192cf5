"""The embedded models' figures in one JSON: nearest-neighbour realism of cine sets against fresh
phantoms, plain (as `medgen eval quality`) and band-passed, beside the key numbers of the
`medgen eval quality` / `medgen eval memorization` reports made for the same sets.

    python bench/eval_defaults.py --real FRESH_CINE --set fresh8=DIR new=DIR old=DIR \
        --report quality:new=eval/quality/report.json ... --out bench/results/eval-defaults.json

Band-passed: each slice and frame (min-max to [0, 1]) through a difference of Gaussians
(sigma 1 and 3 voxels in-plane), 2x2 averaged, then the same leave-one-out realism. The plain
figure is carried by the large structures (chest wall, lungs, liver); band-passing leaves the
edges of the heart's structures, so blotches where the phantoms have a clean ring score low.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgen_rt.data.preprocess import frame_indices
from medgen_rt.evaluation.memorization import nn_realism
from medgen_rt.io import read_volume

FRAMES = 16


def cine_volumes(folder: str) -> list:
    paths = sorted(glob.glob(f"{folder}/*/*_4d.nii.gz")) or sorted(
        p for p in glob.glob(f"{folder}/sample_*.nii.gz") if not p.endswith("_mask.nii.gz"))
    out = []
    for p in paths:
        v = read_volume(p).array.astype(np.float32)
        if v.shape[3] != FRAMES:
            v = v[..., frame_indices(v.shape[3], FRAMES, start=0)]
        out.append((v - v.min()) / (v.max() - v.min() + 1e-8))
    if not out:
        raise SystemExit(f"{folder}: no cine volumes")
    return out


def _blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma) + 1
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def rows(volumes: list, band_pass: bool) -> np.ndarray:
    out = []
    for v in volumes:
        t = torch.from_numpy(v).permute(2, 3, 0, 1).reshape(-1, 1, v.shape[0], v.shape[1])
        if band_pass:
            t = _blur(t, 1.0) - _blur(t, 3.0)
        out.append(F.avg_pool2d(t, 2).flatten().numpy())
    return np.stack(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True)
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=DIR")
    p.add_argument("--report", nargs="+", default=[], metavar="KIND:NAME=report.json")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    real = cine_volumes(a.real)
    result = {"real": a.real, "n_real": len(real), "realism": {}, "reports": {}}
    for item in a.set:
        name, folder = item.split("=", 1)
        vols = cine_volumes(folder)
        entry = {"n": len(vols)}
        for kind, band in (("plain", False), ("band_passed", True)):
            r = nn_realism(rows(vols, band), rows(real, band))
            entry[kind] = {"ratio": r["ratio"], "synthetic_median": r["synthetic_median"],
                           "real_median": r["real_median"]}
        result["realism"][name] = entry
        print(name, json.dumps(entry))
    for item in a.report:
        key, path = item.split("=", 1)
        d = json.loads(Path(path).read_text())
        result["reports"][key] = {k: d[k] for k in ("realism", "fid", "mmd", "inter_slice", "temporal", "mask_adherence",
                                                    "threshold", "copy_share", "n_copies", "summary") if k in d}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
