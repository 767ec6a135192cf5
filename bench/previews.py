"""The README's pictures: training phantoms beside default-model samples, drawn with the
same preview code `medgen sample` uses (medgen_rt.io.preview), so both sides look alike.

    python bench/previews.py cine --real P1_4d.nii.gz ... --synthetic S1.nii.gz ... --out bench/results/NAME
        -> NAME.png (mid-cycle frames, every slice: real rows, then synthetic rows) and NAME.gif
    python bench/previews.py ct --real CT.nii.gz ... --synthetic S.nii.gz ... --masks M.nii.gz ... --out ...
        -> NAME.png: per row the label map, the phantom it belongs to and the sample generated from it
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medgen_rt.evaluation.report import _font
from medgen_rt.io import read_volume
from medgen_rt.io.preview import write_cine_gif, write_cine_montage, write_ct_preview


def _caption(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + 14), "white")
    out.paste(img.convert("RGB"), (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black", font=_font())
    return out


def _stack(images: list, vertical: bool, gap: int = 6) -> Image.Image:
    w = sum(i.width for i in images) + gap * (len(images) - 1) if not vertical else max(i.width for i in images)
    h = max(i.height for i in images) if not vertical else sum(i.height for i in images) + gap * (len(images) - 1)
    out, pos = Image.new("RGB", (w, h), "white"), 0
    for i in images:
        out.paste(i.convert("RGB"), (pos, 0) if not vertical else (0, pos))
        pos += (i.width if not vertical else i.height) + gap
    return out


def cine(real: list, synthetic: list, out: Path, frames: int = 6, tile: int = 72) -> None:
    tmp = Path(tempfile.mkdtemp())
    columns = []
    for kind, paths in (("phantom (training data)", real), ("default model sample", synthetic)):
        montages = []
        for k, p in enumerate(paths):
            v = read_volume(p)
            montages.append(_caption(Image.open(write_cine_montage(tmp / f"{kind[:3]}{k}.png", v.array, v.affine,
                                                                   max_frames=frames, tile=tile)),
                                     f"{kind} {k + 1}: slices (rows) x frames over the cycle"))
        columns.append(_stack(montages, vertical=True))
    _stack(columns, vertical=False, gap=16).convert("L").save(out.with_suffix(".png"), optimize=True)
    # the GIF: first real and first synthetic volume side by side, every slice, every frame
    gifs = []
    for kind, p in (("phantom", real[0]), ("sample", synthetic[0])):
        v = read_volume(p)
        gifs.append(Image.open(write_cine_gif(tmp / f"{kind}.gif", v.array, v.affine, tile=tile)))
    frames_out = []
    for t in range(min(g.n_frames for g in gifs)):
        pics = []
        for g in gifs:
            g.seek(t)
            pics.append(g.convert("RGB"))
        frames_out.append(_stack(pics, vertical=False, gap=12).convert("P", palette=Image.ADAPTIVE))
    frames_out[0].save(out.with_suffix(".gif"), save_all=True, append_images=frames_out[1:], duration=80, loop=0)


def ct(real: list, synthetic: list, masks: list, out: Path, height: int = 160) -> None:
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for k, (r, s, m) in enumerate(zip(real, synthetic, masks)):
        lab = read_volume(m, dtype=None)
        # the label map drawn in HU-like grey levels so the same preview code shows it
        shown = np.where(lab.array > 0, -600.0 + 150.0 * lab.array, -1000.0).astype(np.float32)
        cells = []
        for name, vol, affine in (("label map", shown, lab.affine), ("phantom", *(_read(r))),
                                  ("generated from the map", *(_read(s)))):
            cells.append(_caption(Image.open(write_ct_preview(tmp / f"{k}{name[:3]}.png", vol, affine,
                                                              height=height)), f"{name} {k + 1}"))
        rows.append(_stack(cells, vertical=False, gap=12))
    _stack(rows, vertical=True, gap=8).convert("L").save(out.with_suffix(".png"), optimize=True)


def _read(path) -> tuple:
    v = read_volume(path)
    return v.array, v.affine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["cine", "ct"])
    p.add_argument("--real", nargs="+", required=True)
    p.add_argument("--synthetic", nargs="+", required=True)
    p.add_argument("--masks", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.kind == "cine":
        cine(a.real, a.synthetic, a.out)
    else:
        ct(a.real, a.synthetic, a.masks or [], a.out)
    print(f"wrote {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
