"""Packages trained runs as an embedded default model (python/medgen_rt/default_models/NAME):
the denoiser's shipped weights and the VQ-GAN, in float16 (half the size; the networks run
in float32 after loading), with their config, metrics, energy and curves.

    python bench/package_default.py --denoiser runs/dit --vae runs/vae --name cmr4d-tiny

The denoiser folder is named by its kind (dit/, tgca/, ...); its model.json points at
../vae. A TGCA run carries its base DiT's weights, so no separate base folder is needed.

A distilled student (`medgen train distill --teacher NAME`) is packaged beside its teacher as
NAME/student, with the record that decides whether `medgen sample --model NAME` uses it
(model.json default_choice, read by medgen_rt.sampling.api.embedded_student), computed from a
bench/fewstep.py result that scored the teacher at 50 steps and the student:

    python bench/package_default.py --name ct-tiny --student runs/ct-student \
        --fewstep bench/results/fewstep-ct-cpu-2026-12-02.json [--student-steps 1] [--replace]

This writes only NAME/student (with --denoiser/--vae too, the whole default first). The student
is within tolerance when its realism figure (default local_realism) is at least 95% of the
50-step teacher's and, where the result has mask Dice, each Dice is no more than 0.03 below the
teacher's. Its distilled_from must name the packaged teacher's weights (sha256).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path


from medgen_rt.io.atomic import atomic_folder
from medgen_rt.models.weights import load_weights
from medgen_rt.train.checkpoint import save_weights

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "python" / "medgen_rt" / "default_models"
RECORDS = ("config.yaml", "config_resume.yaml", "metrics.csv", "energy.json", "quality.png")
STUDENT = "student"         # medgen_rt.sampling.api.STUDENT
REALISM_TOLERANCE = 0.05    # the student's realism figure at least (1 - this) x the 50-step teacher's
DICE_TOLERANCE = 0.03       # each mask Dice at most this far below the teacher's
TEACHER_SETTING = re.compile(r"^(euler|ddim)50$")  # bench/fewstep.py's plain 50-step setting, uncached


def half(tensors: dict) -> dict:
    """float32 tensors -> float16 where they fit (EMA counters of a codebook may not)."""
    out = {}
    for k, v in tensors.items():
        fits = v.is_floating_point() and (v.numel() == 0 or float(v.abs().max()) < 6e4)
        out[k] = v.half().contiguous() if fits else v
    return out


def package(run: Path, dest: Path, weights: str, info_update: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)  # an atomic_folder temporary already exists
    save_weights(dest / weights, half(load_weights(run / weights)))
    info = {**json.loads((run / "model.json").read_text()), **info_update}
    (dest / "model.json").write_text(json.dumps(info, indent=2))
    for name in RECORDS:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)


def _fail(message: str):
    raise SystemExit(f"package_default: {message}")


def _student_name(result: dict, run: Path) -> str:
    """The --student NAME=RUN of the fewstep result that is this run (its path, or its last parts:
    the result records paths as given where it ran)."""
    students = result.get("students") or {}
    parts = run.resolve().parts
    found = [name for name, path in students.items()
             if Path(path).resolve() == run.resolve() or parts[-len(Path(path).parts):] == Path(path).parts]
    if len(found) != 1:
        _fail(f"--fewstep: {'no' if not found else 'more than one'} student of the result is {run} "
              f"(its students: {students or 'none'})")
    return found[0]


def default_choice(result: dict, source: str, run: Path, steps: int, figure: str) -> dict:
    """The default_choice record of a student from a bench/fewstep.py result: the 50-step teacher's
    row (setting euler50, uncached) against the student's row at `steps`."""
    rows = result.get("rows") or []
    teacher = [r for r in rows if TEACHER_SETTING.match(r.get("setting", ""))]
    if len(teacher) != 1:
        _fail(f"--fewstep {source}: expected one 50-step teacher row (setting euler50), found "
              f"{[r['setting'] for r in teacher]}")
    name = _student_name(result, run)
    own = re.compile(rf"^student:{re.escape(name)}(@\d+)?$")
    student = [r for r in rows if own.match(r.get("setting", "")) and r.get("steps") == steps]
    if len(student) != 1:
        _fail(f"--fewstep {source}: expected one row of student {name} at {steps} steps (uncached), found "
              f"{[r['setting'] for r in student]}; settings: {[r.get('setting') for r in rows]}")
    t, s = teacher[0], student[0]
    if t.get(figure) is None or s.get(figure) is None:
        _fail(f"--fewstep {source}: no {figure} in rows {t['setting']} / {s['setting']}")
    within = s[figure] >= (1 - REALISM_TOLERANCE) * t[figure]
    groups = dice_t = dice_s = None
    if t.get("mask_dice"):
        groups = list(t["mask_dice"])
        if set(s.get("mask_dice") or {}) != set(groups):
            _fail(f"--fewstep {source}: row {s['setting']} has mask Dice for {list(s.get('mask_dice') or {})}, "
                  f"the teacher's for {groups}")
        dice_t = [t["mask_dice"][g] for g in groups]
        dice_s = [s["mask_dice"][g] for g in groups]
        within = within and all(b >= a - DICE_TOLERANCE for a, b in zip(dice_t, dice_s))
    return {"teacher_steps": t["steps"], "student_steps": steps, "realism_figure": figure,
            "realism_teacher": t[figure], "realism_student": s[figure], "mask_dice_groups": groups,
            "mask_dice_teacher": dice_t, "mask_dice_student": dice_s, "within_tolerance": bool(within),
            "tolerance": REALISM_TOLERANCE, "dice_tolerance": DICE_TOLERANCE,
            "teacher_setting": t["setting"], "student_setting": s["setting"], "source": source}


def package_student(dest: Path, run: Path, fewstep: Path, steps, figure: str, replace: bool,
                    teacher_sources=()) -> dict:
    """dest/student from a distilled run: its weights in float16, model.json with distilled_from.run
    "../KIND" (the packaged teacher), vae_run "../vae", default_steps = steps (default: its own) and
    default_choice. Refuses a student of other teacher weights than the packaged teacher's (or those
    of teacher_sources, the run packaged as the teacher in the same call); writes nothing else."""
    from medgen_rt.io.run_folder import model_weights_path
    from medgen_rt.train.distill import file_sha256

    info = json.loads((run / "model.json").read_text())
    origin = info.get("distilled_from")
    if not isinstance(origin, dict):
        _fail(f"--student {run}: not a distilled run (model.json has no distilled_from)")
    kind = origin.get("kind")
    teacher = dest / str(kind)
    if not (teacher / "model.json").is_file() or not (dest / "vae" / "model.json").is_file():
        _fail(f"--student {run}: its teacher is a {kind} run, but {dest} holds no packaged {kind}/ and vae/; "
              "package the default first (--denoiser, --vae)")
    shas = {file_sha256(model_weights_path(teacher))} | {file_sha256(p) for p in teacher_sources}
    if origin.get("sha256") not in shas:
        _fail(f"--student {run}: distilled from weights with sha256 {str(origin.get('sha256'))[:12]}..., not "
              f"those of {teacher}; distil from the packaged default (`medgen train distill --teacher NAME`)")
    supported = info.get("supported_steps") or []
    steps = info.get("default_steps") if steps is None else steps
    if steps not in supported:
        _fail(f"--student-steps {steps}: the student supports {supported}")
    out = dest / STUDENT
    if out.exists() and not replace:
        _fail(f"{out} exists; pass --replace to replace it")
    try:
        source = str(fewstep.resolve().relative_to(REPO))
    except ValueError:
        source = str(fewstep)
    choice = default_choice(json.loads(fewstep.read_text()), source, run, steps, figure)
    with atomic_folder(out) as tmp:
        package(run, tmp, model_weights_path(run).name,  # the file sampling loads (EMA when present)
                {"vae_run": "../vae", "distilled_from": {**origin, "run": f"../{kind}"}, "default_steps": steps,
                 "default_choice": choice})
    return choice


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--denoiser", type=Path, help="the teacher run (with --vae: package the whole default)")
    p.add_argument("--vae", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--root", type=Path, default=ROOT, help="where the defaults lie (default: the package's)")
    p.add_argument("--student", type=Path, help="a `medgen train distill` run of the packaged teacher: write NAME/student")
    p.add_argument("--fewstep", type=Path, help="with --student: the bench/fewstep.py result JSON that scored the "
                                                "teacher at 50 steps (euler50) and this student")
    p.add_argument("--student-steps", type=int, metavar="K",
                   help="with --student: the step count it samples with by default and is judged at (one of its "
                        "supported_steps; default: its default_steps)")
    p.add_argument("--figure", choices=["local_realism", "realism"], default="local_realism",
                   help="the realism figure of the fewstep rows compared (default local_realism)")
    p.add_argument("--replace", action="store_true", help="with --student: replace an existing NAME/student")
    p.add_argument("--weights", choices=["ema", "weights"], default="ema",
                   help="which of the denoiser's weights to ship (default: EMA)")
    p.add_argument("--frame-duration", type=float, metavar="SECONDS",
                   help="cine: geometry.frame_duration for a run whose latents were encoded before `medgen "
                        "encode` recorded it")
    a = p.parse_args(argv)
    dest = a.root / a.name
    if (a.denoiser is None) != (a.vae is None):
        _fail("--denoiser and --vae go together")
    if a.denoiser is None and a.student is None:
        _fail("nothing to package: give --denoiser and --vae, or --student")
    if a.student is not None and a.fewstep is None:
        _fail("--student needs --fewstep (the measurement that decides whether it is used by default)")
    sources = ()
    if a.denoiser is not None:
        if dest.exists():
            shutil.rmtree(dest)
        kind = json.loads((a.denoiser / "model.json").read_text())["kind"]
        update = {"vae_run": "../vae"}
        if a.frame_duration is not None:
            geometry = json.loads((a.denoiser / "model.json").read_text())["geometry"]
            update["geometry"] = {**geometry, "frame_duration": a.frame_duration}
        package(a.denoiser, dest / kind, f"{a.weights}.safetensors", update)
        package(a.vae, dest / "vae", "weights.safetensors", {})
        sources = (a.denoiser / f"{a.weights}.safetensors",)  # a student of the run is one of this teacher
    if a.student is not None:
        choice = package_student(dest, a.student, a.fewstep, a.student_steps, a.figure, a.replace, sources)
        used = "used by default" if choice["within_tolerance"] else "NOT used by default (outside tolerance)"
        print(f"{dest / STUDENT}: {choice['student_steps']} steps, {a.figure} {choice['realism_student']:.4f} vs "
              f"{choice['realism_teacher']:.4f}, Dice {choice['mask_dice_student']} vs {choice['mask_dice_teacher']}: "
              f"{used}")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
