"""Few-step sampling trade-off (issue #16): one model (or a teacher and its distilled students)
sampled at several step counts, with and without step caching, each setting scored in the same
run: realism and local realism, FID/MMD (`medgen eval quality`), CT mask adherence, copy rate
(`medgen eval memorization`, with --train), wall time, block evaluations and energy per volume.

    python bench/fewstep.py --model cine --real FRESH16 --train TRAIN400 --encoder ENC \
        --settings euler50 euler50+cache0.05 euler8 euler4 euler2 euler1 ddpm300 \
        [--student NAME=RUN ...] --n 8 --out bench/results/fewstep-cine.json

A setting is SAMPLER STEPS [+cacheTHRESHOLD] (samplers: euler, ddim, ddpm), or
student:NAME[@STEPS][+cacheT] for a --student run. Every setting samples the same seeds, so the
picture row (OUT with .png) shows one noise drawn at every setting.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_description, versions, write_json  # noqa: E402

import medgen_rt  # noqa: E402
from medgen_rt.evaluation.datasets import open_set, to_display01  # noqa: E402

SETTING = re.compile(r"^(?:(?P<sampler>euler|ddim|ddpm)(?P<steps>\d+)|student:(?P<student>[\w.-]+)(?:@(?P<ssteps>\d+))?)"
                     r"(?:\+cache(?P<cache>[\d.]+))?$")


def parse_setting(text: str, students: dict) -> dict:
    m = SETTING.match(text)
    if not m:
        raise SystemExit(f"--settings: {text!r} is not SAMPLERSTEPS[+cacheT] or student:NAME[@STEPS][+cacheT]")
    if m["student"]:
        if m["student"] not in students:
            raise SystemExit(f"--settings: {text!r} names no --student {m['student']}")
        return {"name": text, "model": students[m["student"]], "sampler": None,
                "steps": int(m["ssteps"]) if m["ssteps"] else None, "cache": float(m["cache"]) if m["cache"] else None}
    return {"name": text, "model": None, "sampler": m["sampler"], "steps": int(m["steps"]),
            "cache": float(m["cache"]) if m["cache"] else None}


def cache_counts(meta: list) -> dict:
    """Step-cache counts of one setting from its volumes' sidecars (in index order, indices 0..n-1).

    A sidecar's ``cache`` counts the block calls of the volume's whole batch (the plan's
    ``batch`` volumes denoised together, one decision per block call for all of them), and every
    volume of that batch repeats them, so a sum over volumes counts each batch once per volume.
    Here: each batch counted once (``block_evaluations``, ``blocks_skipped``: the block calls run
    and skipped in the whole setting), and per volume the calls of the batch that made it
    (``block_evaluations_per_volume``, ``blocks_skipped_per_volume``: means over the volumes; a
    batched call makes all its volumes at once, so this is what one volume cost whatever the batch).
    Empty without a cache."""
    stats = [(m.get("index", i), m["cache"], m["plan"]["batch"]) for i, m in enumerate(meta) if m.get("cache")]
    if not stats:
        return {}
    batches: dict = {}
    for index, cache, batch in stats:
        batches.setdefault(index // batch, []).append(cache)
    for group in batches.values():  # one batch, one count: a mismatch means the grouping is wrong
        if any(c != group[0] for c in group):
            raise SystemExit(f"fewstep: the sidecars of one batch disagree on the step cache: {group}")
    evaluated = sum(g[0]["block_evaluations"] for g in batches.values())
    skipped = sum(g[0]["blocks_skipped"] for g in batches.values())
    return {"batches": len(batches), "block_evaluations": evaluated, "blocks_skipped": skipped,
            "block_evaluations_per_volume": float(np.mean([c["block_evaluations"] for _, c, _ in stats])),
            "blocks_skipped_per_volume": float(np.mean([c["blocks_skipped"] for _, c, _ in stats])),
            "skipped_fraction": skipped / (evaluated + skipped) if evaluated + skipped else 0.0}


def run_cli(args: list) -> None:
    subprocess.run([sys.executable, "-m", "medgen_rt", *args], check=True, stdout=subprocess.DEVNULL)


def mid_picture(folder: Path) -> np.ndarray:
    s = open_set(folder, "--synthetic")
    item = s.load(0)
    v = to_display01(item["image"], s.modality)
    v = v[..., 0] if v.ndim == 4 else v
    return v[:, :, v.shape[2] // 2].T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cine", help="the model (teacher) every plain setting samples")
    p.add_argument("--real", required=True, help="real volumes for `medgen eval quality`")
    p.add_argument("--masks", help="CT: label maps to sample from (a folder), as `medgen sample --masks`")
    p.add_argument("--train", help="training set for the copy rate (`medgen eval memorization`)")
    p.add_argument("--encoder", help="copy-detection encoder file to reuse (trained once when missing)")
    p.add_argument("--student", nargs="*", default=[], metavar="NAME=RUN")
    p.add_argument("--settings", nargs="+", default=["euler50", "euler50+cache0.05", "euler8", "euler4"])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="keep the samples and reports under this folder")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    students = dict(s.split("=", 1) for s in a.student)
    settings = [parse_setting(s, students) for s in a.settings]
    work = a.keep or Path(tempfile.mkdtemp(prefix="fewstep-"))
    rows, pictures = [], []
    for st in settings:
        tag = re.sub(r"[^\w.-]", "_", st["name"])
        folder = work / tag / "samples"
        t0 = time.perf_counter()
        # plain settings sample the teacher, also where an embedded --model ships a student (sample's default)
        results = medgen_rt.sample(st["model"] or a.model, n=a.n, seed=a.seed, steps=st["steps"], sampler=st["sampler"],
                                   masks=a.masks, cache=st["cache"], out=folder, overwrite=True, quiet=True,
                                   teacher=st["model"] is None)
        wall = time.perf_counter() - t0
        meta = [r["metadata"] for r in results]
        energy = meta[-1].get("energy") or {}
        row = {"setting": st["name"], "n": len(results), "wall_s": wall, "wall_s_per_volume": wall / len(results),
               "kwh_per_volume": (energy.get("run_kwh") / len(results)) if energy.get("run_kwh") is not None else None,
               "steps": meta[0].get("steps"), "sampler": meta[0].get("sampler"),
               "block_evaluations": None, "blocks_skipped": None, **cache_counts(meta)}
        q = work / tag / "quality"
        run_cli(["eval", "quality", "--real", str(a.real), "--synthetic", str(folder), "--out", str(q), "--quiet",
                 *(["--encoder", a.encoder] if a.encoder else [])])
        rep = json.loads((q / "report.json").read_text())
        row.update({"realism": rep["realism"]["ratio"], "local_realism": rep["local_realism"]["ratio"],
                    "fid": rep["fid"]["value"], "mmd2": rep["mmd"]["mmd2"],
                    "ms_ssim_diversity": rep["ms_ssim_diversity"]["synthetic"].get("mean")})
        own = (rep["mask_adherence"].get("synthetic") or {}).get("own_map")
        if own:
            row["mask_dice"] = {g: d.get("mean") for g, d in own.items()}
        if a.train:
            m = work / tag / "memo"
            run_cli(["eval", "memorization", "--train", str(a.train), "--val", str(a.real), "--synthetic", str(folder),
                     "--out", str(m), "--quiet", *(["--encoder", a.encoder] if a.encoder else [])])
            row["copy_share"] = json.loads((m / "report.json").read_text())["copy_share"]
        rows.append(row)
        pictures.append(mid_picture(folder))
        print(json.dumps(row), flush=True)
    result = {"what": "few-step sampling trade-off (issue #16)", "model": a.model, "students": students,
              "real": str(a.real), "masks": a.masks, "n": a.n, "seed": a.seed, "rows": rows,
              "device": device_description("cpu"), "versions": versions(),
              "command": "python bench/fewstep.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json(a.out, result)
    from PIL import Image, ImageDraw

    h = max(pic.shape[0] for pic in pictures)
    strip = np.concatenate([np.pad(pic, ((0, h - pic.shape[0]), (0, 2))) for pic in pictures], axis=1)
    img = Image.fromarray((np.clip(strip, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    x = 0
    for st, pic in zip(settings, pictures):
        draw.text((x + 3, 3), st["name"], fill=(255, 255, 0))
        x += (pic.shape[1] + 2) * 2
    img.save(a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
