"""Embedded defaults with a distilled student (issue #16 item 4): NAME/student beside the teacher
samples by default when its model.json's default_choice says it is within tolerance of the
50-step teacher; `--teacher` takes the teacher and its full sampler; a student refuses step
counts it was not distilled for; `medgen train distill --teacher NAME` still distils the teacher;
bench/package_default.py writes the student and its record from a bench/fewstep.py result.

The toy default is a copy of the embedded CT model whose "student" is its own TGCA with a
student's model.json (the network does not matter here, only which folder samples)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from medgen_rt.cli import main as medgen
from medgen_rt.sampling import api
from medgen_rt.sampling.spec import ModelSpec, check_inputs
from medgen_rt.train.distill import file_sha256, resolve_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import package_default  # noqa: E402

COMMON = ["--unconditional", "--no-energy", "--quiet", "--device", "cpu"]


def _choice(within: bool) -> dict:
    return {"teacher_steps": 50, "student_steps": 2, "realism_teacher": 0.82, "realism_student": 0.81,
            "mask_dice_teacher": [0.87, 0.77], "mask_dice_student": [0.86, 0.76], "within_tolerance": within,
            "tolerance": 0.05, "source": "bench/results/toy.json"}


@pytest.fixture(scope="module")
def toy_default(tmp_path_factory):
    """defaults/ct-tiny: the embedded CT teacher and VQ-GAN, and a student/ beside them."""
    root = tmp_path_factory.mktemp("defaults") / "ct-tiny"
    shutil.copytree(api.default_model_dir("ct"), root)
    shutil.rmtree(root / "student", ignore_errors=True)  # the toy's own student, whatever ships
    shutil.copytree(root / "tgca", root / "student")
    info = json.loads((root / "tgca" / "model.json").read_text())
    info.update({"vae_run": "../vae",
                 "distilled_from": {"run": "../tgca", "kind": "tgca", "weights": "weights.safetensors",
                                    "sha256": file_sha256(root / "tgca" / "weights.safetensors")},
                 "student_steps": 2, "supported_steps": [1, 2], "default_steps": 2,
                 "distillation": {"method": "toy", "teacher_steps": 16, "guidance": None},
                 "default_choice": _choice(True)})
    info.pop("selected", None)
    (root / "student" / "model.json").write_text(json.dumps(info))
    return root


@pytest.fixture
def embedded(toy_default, monkeypatch):
    """The embedded "ct" model is the toy default for this test."""
    monkeypatch.setattr(api, "default_model_dir",
                        lambda name=api.DEFAULT_MODEL: toy_default.parent / api.ALIASES.get(name, name))
    return toy_default


@pytest.fixture
def choice(embedded):
    """Set the student's default_choice for one test (restored after it)."""
    path = embedded / "student" / "model.json"
    saved = path.read_text()

    def set_choice(value):
        info = json.loads(saved)
        if value is None:
            info.pop("default_choice")
        else:
            info["default_choice"] = value
        path.write_text(json.dumps(info))

    yield set_choice
    path.write_text(saved)


def _sidecar(out: Path) -> dict:
    return json.loads((out / "sample_000.json").read_text())


def test_embedded_name_samples_with_its_student(embedded, tmp_path):
    denoiser, vae = api.resolve_model("ct")
    assert denoiser == embedded / "student" and vae.resolve() == (embedded / "vae").resolve()
    out = tmp_path / "out"
    assert medgen(["sample", "--model", "ct", "--out", str(out), *COMMON]) == 0
    meta = _sidecar(out)
    assert meta["network"] == "student" and meta["steps"] == 2  # the student's default_steps
    teacher = meta["distilled_from"]
    assert teacher["kind"] == "tgca" and teacher["sha256"] == file_sha256(embedded / "tgca" / "weights.safetensors")
    # the teacher folder, resolved from the student's "../tgca", relative to --out like "model"
    assert (out / teacher["run"]).resolve() == (embedded / "tgca").resolve()
    assert (out / meta["model"]).resolve() == (embedded / "student").resolve()


def test_teacher_flag_takes_the_teacher_and_the_full_sampler(embedded, tmp_path):
    prep = api._prepare("ct", 1, 0, None, None, None, None, None, "cpu", 0.0, True, None, teacher=True)
    assert prep.denoiser_dir == embedded / "tgca" and prep.request.steps == 50
    assert prep.spec.network == "teacher"
    out = tmp_path / "out"
    assert medgen(["sample", "--model", "ct", "--teacher", "--steps", "3", "--out", str(out), *COMMON]) == 0
    meta = _sidecar(out)
    assert meta["network"] == "teacher" and meta["distilled_from"] is None and meta["steps"] == 3
    assert (out / meta["model"]).resolve() == (embedded / "tgca").resolve()


@pytest.mark.parametrize("value", [_choice(False), None, {**_choice(True), "within_tolerance": "yes"}])
def test_a_student_outside_tolerance_or_without_a_record_is_not_used(choice, embedded, value):
    choice(value)
    assert api.resolve_model("ct")[0] == embedded / "tgca"
    prep = api._prepare("ct", 1, 0, None, None, None, None, None, "cpu", 0.0, True, None)
    assert prep.request.steps == 50 and prep.spec.network == "teacher"


def test_folders_given_by_path_are_taken_as_they_are(embedded):
    assert api.resolve_model(str(embedded))[0] == embedded / "tgca"  # a folder with tgca/: the teacher
    assert api.resolve_model(str(embedded / "student"))[0] == embedded / "student"
    with pytest.raises(ValueError, match="--teacher: .* distilled student"):  # not silently the student
        api.resolve_model(str(embedded / "student"), teacher=True)


def test_student_refuses_steps_it_was_not_distilled_for(embedded, tmp_path, capsys):
    out = tmp_path / "out"
    assert medgen(["sample", "--model", "ct", "--steps", "10", "--out", str(out), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "--steps 10" in err and "1, 2 step(s)" in err and "--teacher" in err and "Traceback" not in err
    assert not out.exists()
    # the same check in the ONNX engine's spec (read from an export manifest)
    info = json.loads((embedded / "student" / "model.json").read_text())
    manifest = {"kind": info["kind"], "conditional": True, "latent_shape": info["latent_shape"],
                "diffusion": info["diffusion"], "scale_factor": info["scale_factor"], "model_info": info}
    spec = ModelSpec.from_manifest(manifest)
    assert spec.supported_steps == (1, 2) and spec.network == "student"
    with pytest.raises(ValueError, match="--steps 3"):
        check_inputs(spec, "'export'", 1, 0, 3, None, None, 0.0, unconditional=True)


def test_onnx_engine_has_no_teacher_flag(embedded, tmp_path, capsys):
    assert medgen(["sample", "--engine", "onnx", "--model", str(tmp_path), "--teacher",
                   "--out", str(tmp_path / "out"), "--no-energy", "--quiet"]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_distill_of_an_embedded_name_takes_the_teacher(embedded):
    teacher, vae, info = resolve_teacher("ct")
    assert teacher == embedded / "tgca" and "distilled_from" not in info
    with pytest.raises(ValueError, match="itself a distilled student"):
        resolve_teacher(str(embedded / "student"))


# ---- bench/package_default.py --student ----------------------------------------------------------

def _fewstep(student_local=0.79, dice=(0.85, 0.75), steps=2) -> dict:
    return {"students": {"s": "runs/ct-student"},
            "rows": [{"setting": "euler50", "steps": 50, "realism": 1.08, "local_realism": 0.82,
                      "mask_dice": {"blood": 0.87, "myocardium": 0.77}},
                     {"setting": "euler50+cache0.05", "steps": 50, "realism": 1.09, "local_realism": 0.70,
                      "mask_dice": {"blood": 0.87, "myocardium": 0.77}},
                     {"setting": f"student:s@{steps}", "steps": steps, "realism": 1.1, "local_realism": student_local,
                      "mask_dice": {"blood": dice[0], "myocardium": dice[1]}}]}


@pytest.mark.parametrize("local, dice, within", [(0.79, (0.85, 0.75), True),     # 0.79 >= 0.95 x 0.82
                                                 (0.77, (0.85, 0.75), False),    # realism 6% below
                                                 (0.79, (0.85, 0.73), False),    # myocardium 0.04 below
                                                 (0.79, (0.90, 0.80), True)])    # better Dice is no loss
def test_default_choice_from_a_fewstep_result(local, dice, within):
    rec = package_default.default_choice(_fewstep(local, dice), "bench/results/toy.json",
                                         Path("/x/runs/ct-student"), 2, "local_realism")
    assert rec["within_tolerance"] is within
    assert rec["teacher_steps"] == 50 and rec["student_steps"] == 2 and rec["realism_teacher"] == 0.82
    assert rec["mask_dice_teacher"] == [0.87, 0.77] and rec["mask_dice_student"] == list(dice)
    assert rec["tolerance"] == 0.05 and rec["source"] == "bench/results/toy.json"
    with pytest.raises(SystemExit, match="at 3 steps"):
        package_default.default_choice(_fewstep(), "x.json", Path("/x/runs/ct-student"), 3, "local_realism")
    with pytest.raises(SystemExit, match="no student"):
        package_default.default_choice(_fewstep(), "x.json", Path("/x/runs/other"), 2, "local_realism")


def test_package_student_writes_only_name_student(toy_default, tmp_path):
    dest = tmp_path / "ct-tiny"
    dest.mkdir()
    for part in ("tgca", "vae"):  # an already packaged default
        (dest / part).symlink_to(toy_default / part, target_is_directory=True)
    run = tmp_path / "runs" / "ct-student"
    shutil.copytree(toy_default / "student", run)
    fewstep = tmp_path / "fewstep.json"
    fewstep.write_text(json.dumps(_fewstep()))
    args = ["--root", str(tmp_path), "--name", "ct-tiny", "--student", str(run), "--fewstep", str(fewstep)]
    assert package_default.main(args) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["student", "tgca", "vae"]
    info = json.loads((dest / "student" / "model.json").read_text())
    assert info["distilled_from"]["run"] == "../tgca" and info["vae_run"] == "../vae"
    assert info["default_choice"]["within_tolerance"] is True and info["default_choice"]["student_steps"] == 2
    with pytest.raises(SystemExit, match="--replace"):
        package_default.main(args)
    assert package_default.main(args + ["--replace"]) == 0
    # a student of other teacher weights is refused
    bad = json.loads((run / "model.json").read_text())
    bad["distilled_from"]["sha256"] = "0" * 64
    (run / "model.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="sha256"):
        package_default.main(args + ["--replace"])
