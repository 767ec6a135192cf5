"""Realism and copy rate against training steps for a finished (or running) denoiser run,
from its kept checkpoints: the figures `medgen train` logs when train.monitor_samples is set
(medgen_rt.train.monitor), for runs trained without it.

    python bench/train_curve.py RUN_DIR --out bench/results/NAME [--samples 8 --steps 8]

Writes NAME.json (one row per checkpoint) and NAME.png (the curves).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import yaml

from medgen_rt.train import checkpoint as ckpt
from medgen_rt.train.monitor import SampleMonitor, draw_curves
from medgen_rt.train.run import build_task


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--out", required=True, help="path prefix of the JSON and PNG")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--train-refs", type=int, default=48, help="training reconstructions to screen copies against")
    p.add_argument("--latents", help="latents folder (default: the one recorded in the run's config.yaml)")
    p.add_argument("--vae", help="VQ-GAN run (default: the one the latents name)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    resolved = yaml.safe_load((a.run / "config.yaml").read_text())
    cmd = Namespace(**resolved["command"])
    if a.latents:
        cmd.latents = a.latents
    task = build_task(cmd, resolved["config"], torch.device("cpu"))
    from medgen_rt.models import load_model

    vae, _ = load_model(a.vae or task.train_set.index["vae_run"])
    t0 = time.perf_counter()
    monitor = SampleMonitor(task, vae, n_samples=a.samples, steps=a.steps, n_train_refs=a.train_refs)
    print(f"references decoded in {time.perf_counter() - t0:.0f} s; copy threshold {monitor.threshold:.4f}",
          flush=True)
    model = task.modules()["model"]
    rows = []
    folders = sorted((a.run / "checkpoints").glob("step_*"))
    for folder in folders:
        data = ckpt.read_checkpoint(folder)
        weights = (data["ema"] or data["weights"])["model"]
        model.load_state_dict(weights)
        t0 = time.perf_counter()
        figures = monitor.evaluate(model)
        row = {"step": int(data["state"]["step"]), **{f"sample_{k}": v for k, v in figures.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"run": str(a.run), "samples": a.samples, "train_refs": len(monitor.train_rows),
              "val_refs": len(monitor.val_rows), "sampler_steps": a.steps, "sampler": monitor.sampler,
              "copy_threshold": monitor.threshold, "weights": "EMA", "rows": rows,
              "definition": "medgen_rt.train.monitor: realism = median nearest-neighbour r of the samples with the "
                            "validation reconstructions / the validation reconstructions' own leave-one-out median; "
                            "copy rate = share of samples whose nearest training reconstruction is above the "
                            "95th-percentile training-to-validation threshold"}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    draw_curves([{k: str(v) for k, v in r.items()} for r in rows], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
