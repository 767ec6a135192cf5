"""The README's walk-through runs as written: every ```bash block that follows a
``<!-- walkthrough -->`` line is run top to bottom in one empty folder, through the CLI.

The commands are taken from README.md, not copied here, and made fast by generic rewrites
of their options (few subjects, two training steps, two sampling steps, a two-step copy-
detection encoder, no energy metering), so the test breaks when the walk-through does: a
folder no earlier command makes, an option that does not exist, a preset that does not fit.
Each command must exit 0 (or with a status its own comment documents, e.g. ``# exit 3``)
and leave what the README promises in its ``--out``.
"""
from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
from cli_run import medgen

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- walkthrough -->"

# fast settings; a command keeps a smaller value of its own
PHANTOM_SUBJECTS = 3      # cine: 2 to train + 1 held out (the last ~10%, at least one)
SAMPLE_VOLUMES = 2
TRAIN_FAST = {"--steps": "2", "--batch-size": "2"}
DENOISER_FAST = {"--monitor-samples": "0"}  # `train vae` has no sample monitor
SAMPLE_STEPS = "2"
ENCODER_STEPS = "2"       # eval memorization / share / eval quality: NT-Xent steps of the copy-detection encoder


def walkthrough_lines(text: str) -> list:
    """(command line, comment) for every command of the marked bash blocks, in order."""
    blocks = re.findall(r"^" + re.escape(MARKER) + r"[ \t]*\n```bash[ \t]*\n(.*?)^```", text, re.M | re.S)
    out = []
    for block in blocks:
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            command, _, comment = line.partition(" #")
            out.append((command.strip(), comment.strip()))
    return out


def _get(args: list, flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def _set(args: list, flag: str, value=None) -> None:
    """Give flag this value (replacing the command's own), or add a bare flag."""
    if flag in args:
        if value is not None:
            args[args.index(flag) + 1] = value
    else:
        args.extend([flag] if value is None else [flag, value])


def _cap(args: list, flag: str, limit: int) -> None:
    if flag in args:
        args[args.index(flag) + 1] = str(min(int(_get(args, flag)), limit))


def fast(args: list) -> list:
    """The same command with tiny step counts and few volumes (generic: by subcommand and option)."""
    args = list(args)
    sub = args[1] if len(args) > 1 else ""
    if sub == "phantom":
        _cap(args, "--n", PHANTOM_SUBJECTS)
        _set(args, "--quiet")
    elif sub == "train":
        fast = {**TRAIN_FAST, **(DENOISER_FAST if args[2:3] != ["vae"] else {})}
        for flag, value in fast.items():
            _set(args, flag, value)
        _set(args, "--no-energy")
        _set(args, "--quiet")
    elif sub == "encode":
        _set(args, "--quiet")
    elif sub == "sample":
        for alias in ("-n", "--num-volumes"):
            if alias in args:
                args[args.index(alias)] = "--n"
        _set(args, "--n", _get(args, "--n") or "1")
        _cap(args, "--n", SAMPLE_VOLUMES)
        _set(args, "--steps", SAMPLE_STEPS)
        _set(args, "--no-energy")
        _set(args, "--quiet")
    elif sub in ("eval", "share"):
        _set(args, "--steps", ENCODER_STEPS)
        _set(args, "--quiet")
    return args


def allowed_status(comment: str) -> set:
    """0, and any exit status the command's own comment documents ("exit 3", "exits 3")."""
    return {0} | {int(x) for x in re.findall(r"\bexits? (?:status )?(\d+)\b", comment)}


def _volumes(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.nii.gz") if not p.name.endswith("_mask.nii.gz"))


def check_outputs(args: list, cwd: Path, status: int) -> None:
    """What the README promises each command leaves behind."""
    sub = args[1]
    out = _get(args, "--out")
    if out is not None:
        out = cwd / out
        assert out.is_dir() and any(out.iterdir()), f"{shlex.join(args)}: --out {out} missing or empty"
    if sub == "phantom":
        n = int(_get(args, "--n"))
        assert (out / "dataset.json").is_file()
        if args[2] == "cmr4d":
            patients = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("patient"))
            assert len(patients) == n
            assert all((p / f"{p.name}_4d.nii.gz").is_file() for p in patients)
        else:
            assert len(list((out / "images").glob("*.nii.gz"))) == n
            assert len(list((out / "masks").glob("*.nii.gz"))) == n  # what the control training needs
    elif sub == "train":  # the run folder the README describes
        for name in ("config.yaml", "model.json", "weights.safetensors", "metrics.csv", "energy.json"):
            assert (out / name).is_file(), f"{shlex.join(args)}: no {name} in {out}"
        assert (out / "checkpoints").is_dir()
    elif sub == "encode":
        assert any(out.rglob("*")), f"{shlex.join(args)}: empty latents folder"
    elif sub == "sample":
        n = int(_get(args, "--n"))
        assert (out / "summary.json").is_file()
        assert len(list(out.glob("sample_*[0-9].nii.gz"))) == n
        assert len(list(out.glob("sample_*[0-9].json"))) == n
        if "--masks" in args:
            assert len(list(out.glob("sample_*_mask.nii.gz"))) == n
    elif sub == "eval":
        assert (out / "report.json").is_file() and (out / "report.html").is_file()
    elif sub == "share":
        report = json.loads((out / "report.json").read_text())
        shared, made = _volumes(out), _volumes(cwd / _get(args, "--synthetic"))
        # 0: every volume that is not a copy is shared; 3 (refused): only the report
        assert shared == (made - int(report["n_copies"]) if status == 0 else 0), (status, shared, made, report)
    enc = _get(args, "--encoder")
    if enc is not None:
        assert (cwd / enc).is_file(), f"{shlex.join(args)}: --encoder {enc} was not saved"


def test_walkthrough_is_complete():
    """The marked blocks hold both paths and the sharing step, and only medgen commands."""
    lines = walkthrough_lines(README.read_text())
    commands = [" ".join(shlex.split(c)[:3]) for c, _ in lines]
    for want in ("medgen phantom cmr4d", "medgen phantom ct", "medgen train vae", "medgen encode",
                 "medgen train dit", "medgen train control", "medgen train unet", "medgen sample",
                 "medgen eval memorization", "medgen share", "medgen eval quality"):
        assert any(c.startswith(want) for c in commands), f"the README walk-through has no `{want}`"
    assert all(shlex.split(c)[0] == "medgen" for c, _ in lines), "walk-through lines must be medgen commands"
    assert any("--masks" in c for c, _ in lines), "no mask-conditioned sampling in the walk-through"


@pytest.mark.slow  # ~1.5 min on a 2-core CPU
def test_walkthrough_runs(tmp_path):
    lines = walkthrough_lines(README.read_text())
    assert lines, f"no ```bash block after {MARKER} in README.md"
    env = {"MEDGEN_CACHE": str(tmp_path / ".cache")}
    work = tmp_path / "walk"
    work.mkdir()
    log = []
    for command, comment in lines:
        args = fast(shlex.split(command))
        t0 = time.perf_counter()
        proc = medgen(*args[1:], cwd=work, env=env)
        log.append(f"{time.perf_counter() - t0:6.1f} s  {shlex.join(args)}")
        ok = allowed_status(comment)
        assert proc.returncode in ok, (f"README: `{command}`\nran as: {shlex.join(args)}\n"
                                       f"exit {proc.returncode} (expected {sorted(ok)})\n{proc.stderr[-3000:]}")
        check_outputs(args, work, proc.returncode)
    print("\n".join(log))
