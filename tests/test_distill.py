"""`medgen train distill` (issue #16 item 1): a few-step student of a rectified-flow DiT or TGCA
run. On a toy latent set (four smooth prototypes plus noise, the embedded CT VQ-GAN as decoder)
a tiny DiT trained for 300 steps is the teacher; its student, trained for a few dozen steps,
samples closer to the teacher's 16-step samples at 1 and 2 steps than the untrained student
(the teacher itself), is an ordinary run folder, resumes exactly and refuses bad teachers."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml

from medgen_rt import diffusion as D
from medgen_rt.cli import main as medgen
from medgen_rt.models import load_model
from medgen_rt.models.weights import load_weights
from medgen_rt.sampling.api import default_model_dir
from medgen_rt.train.checkpoint import write_model_files
from medgen_rt.train.latents import write_latent_set

SHAPE = (8, 16, 16, 8)  # the embedded CT VQ-GAN's latent, so that the student samples to a volume
COMMON = ["--quiet", "--no-energy", "--device", "cpu"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill")
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.interpolate(torch.randn(4, 8, 4, 4, 2, generator=g), size=SHAPE[1:],
                                             mode="trilinear") * 1.5
    items = []
    for i in range(16):
        labels = torch.zeros(SHAPE[1:], dtype=torch.uint8)  # small maps: TGCA's encoder resizes to the tokens
        labels[2 * (i % 4):2 * (i % 4) + 8] = 1 + i % 2
        items.append((f"s{i:02d}", protos[i % 4] + 0.1 * torch.randn(SHAPE, generator=g), labels))
    ct = default_model_dir("ct")
    geometry = json.loads((ct / "tgca" / "model.json").read_text())["geometry"]
    write_latent_set(root / "lat", items, 1.0, extra={"modality": "ct", "vae_run": str(ct / "vae"),
                                                      "geometry": geometry})
    cfg = {"name": "toy", "modality": "ct",
           "dit": {"model": "dit3d-tiny",
                   "model_overrides": {"input_size": "auto", "patch_size": [4, 4, 2], "hidden_size": 32, "depth": 2,
                                       "num_heads": 2},
                   "diffusion": {"objective": "flow", "loss": "mse"},
                   "train": {"steps": 300, "batch_size": 8, "lr": 2e-3, "warmup_steps": 10, "checkpoint_every": 1000,
                             "log_every": 100, "val_every": 0, "seed": 0}},
           "distill": {"student_steps": 2, "teacher_steps": 16,
                       "train": {"steps": 40, "batch_size": 4, "lr": 5e-4, "lr_schedule": "constant",
                                 "checkpoint_every": 20, "log_every": 10, "val_every": 20, "seed": 0}}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert medgen(["train", "dit", "--config", str(root / "cfg.yaml"), "--latents", str(root / "lat"),
                   "--out", str(root / "teacher"), *COMMON]) == 0
    return root


def _distill(toy, out, *extra):
    return medgen(["train", "distill", "--teacher", str(toy / "teacher"), "--config", str(toy / "cfg.yaml"),
                   "--latents", str(toy / "lat"), "--out", str(out), *COMMON, *extra])


@pytest.fixture(scope="module")
def student(toy):
    assert _distill(toy, toy / "student") == 0
    return toy / "student"


def _mse(a, b) -> float:
    return float(((a - b) ** 2).mean())


def test_student_beats_the_untrained_student_at_one_and_two_steps(toy, student):
    teacher, _ = load_model(toy / "teacher")
    net, _ = load_model(student)
    noise = torch.randn((6,) + SHAPE, generator=torch.Generator().manual_seed(99))  # not the validation noise

    def run(model, steps):
        return D.sample(D.network_fn(model.eval(), False), noise.shape, sampler="euler", steps=steps, noise=noise)

    reference = run(teacher, 16)
    for steps, factor in ((1, 0.5), (2, 0.8)):  # measured when written: 0.18 -> 0.02 at 1 step, 0.06 -> 0.02 at 2
        untrained, trained = _mse(run(teacher, steps), reference), _mse(run(net, steps), reference)
        assert trained < factor * untrained, (steps, trained, untrained)
    rows = list(csv.DictReader((student / "metrics.csv").open()))
    assert float(rows[-1]["val_mse_1step"]) < 0.5 * float(rows[0]["val_mse_1step"])


def test_student_is_a_run_folder_that_records_its_teacher(toy, student):
    from medgen_rt.train.distill import file_sha256

    info = json.loads((student / "model.json").read_text())
    assert info["kind"] == "dit" and info["student_steps"] == 2 and info["default_steps"] == 2
    assert info["supported_steps"] == [1, 2]
    assert info["distilled_from"]["run"] == str((toy / "teacher").resolve())
    assert info["distilled_from"]["sha256"] == file_sha256(toy / "teacher" / "weights.safetensors")
    assert info["distillation"]["teacher_steps"] == 16 and info["distillation"]["guidance"] is None
    # the same network: every tensor of the teacher, same shapes
    a, b = load_weights(toy / "teacher" / "weights.safetensors"), load_weights(student / "weights.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    resolved = yaml.safe_load((student / "config.yaml").read_text())
    assert resolved["config"]["distill"]["student_steps"] == 2 and resolved["settings"]["monitor_steps"] == 2

    out = toy / "samples"
    assert medgen(["sample", "--model", str(student), "--steps", "2", "--out", str(out), "--no-energy",
                   "--quiet"]) == 0
    side = json.loads((out / "sample_000.json").read_text())
    assert side["steps"] == 2 and side["sampler"] == "euler" and (out / "sample_000.nii.gz").is_file()


def test_sampling_defaults_to_the_students_steps(toy, student):
    out = toy / "samples_default"
    assert medgen(["sample", "--model", str(student), "--out", str(out), "--no-energy", "--quiet"]) == 0
    assert json.loads((out / "sample_000.json").read_text())["steps"] == 2


def test_onnx_engine_samples_the_student_like_the_torch_runtime(toy, student, monkeypatch, capsys):
    """Issue #16: the student exported by `medgen export onnx` and sampled by `medgen sample --engine
    onnx` gives what `medgen sample` (the torch runtime) gives from the same noise, within 1e-3 on the
    latent and on the decoded image's [-1, 1] scale, at its default steps and at 1 step; the manifest
    records the student, and the engine refuses step counts the student was not distilled for."""
    import nibabel as nib
    import numpy as np

    from medgen_rt.export import engine
    from medgen_rt.sampling import api
    from medgen_rt.sampling.spec import teacher_record

    info = json.loads((student / "model.json").read_text())
    exported = toy / "student_onnx"
    assert medgen(["export", "onnx", "--model", str(student), "--out", str(exported), "--no-fp16", "--quiet"]) == 0
    manifest = json.loads((exported / "medgen_export.json").read_text())
    assert set(manifest["files"]) == {"denoiser", "decoder", "encoder"}
    assert manifest["supported_steps"] == info["supported_steps"] == [1, 2]
    assert manifest["default_steps"] == info["default_steps"] == 2
    assert manifest["distilled_from"] == teacher_record(info["distilled_from"], student)
    assert manifest["distilled_from"]["sha256"] == info["distilled_from"]["sha256"]

    # --seed draws the engine's initial noise from numpy and the torch runtime's from torch
    # (medgen_rt.sample's docstring), so the engine is handed the torch runtime's noise of each seed
    def torch_noise(self, indices, seeds, shape):
        return np.concatenate([torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(s)).numpy()
                               for s in seeds])

    monkeypatch.setattr(engine._Denoiser, "noise", torch_noise)
    # each runtime's decoder adapter, watched: the latent it is given (before the codebook snap)
    # and the image it decodes, in [-1, 1] and unclipped (before HU and the NIfTI's int16)
    seen: dict = {}

    def watch(cls, name):
        original = cls.__call__

        def call(self, z, quantize, progress=None):
            image = original(self, z, quantize, progress)
            z = z.numpy() if torch.is_tensor(z) else z
            seen.setdefault(name, []).append((np.array(z, dtype=np.float32), np.array(image, dtype=np.float32)))
            return image

        monkeypatch.setattr(cls, "__call__", call)

    watch(engine._Decoder, "onnx")
    watch(api._TorchDecoder, "torch")
    runs = {"onnx": ["--engine", "onnx", "--model", str(exported)], "torch": ["--model", str(student)]}
    for steps in (None, 1):  # the student's default (2), then 1
        seen.clear()
        outs = {}
        for name, args in runs.items():
            outs[name] = toy / f"student_{name}_{steps or 'default'}"
            assert medgen(["sample", *args, "--n", "2", "--seed", "5", *(["--steps", str(steps)] if steps else []),
                           "--out", str(outs[name]), "--device", "cpu", "--no-energy", "--quiet"]) == 0
        assert len(seen["onnx"]) == len(seen["torch"]) == 2
        # measured when written: at most 1.4e-6 on the latent (values up to 6) and 1e-6 on the image
        # (values up to 1.7 before clipping), at 2 and at 1 step; the codebook snap picked the same entries
        for (z_onnx, image_onnx), (z_torch, image_torch) in zip(seen["onnx"], seen["torch"]):
            assert np.abs(z_onnx - z_torch).max() < 1e-3, steps
            assert np.abs(image_onnx - image_torch).max() < 1e-3, steps
        for i in range(2):
            a, b = (json.loads((outs[k] / f"sample_{i:03d}.json").read_text()) for k in ("onnx", "torch"))
            assert a["engine"] == "onnx" and b["engine"] == "torch" and a["seed"] == b["seed"] == 5 + i
            assert a["network"] == b["network"] == "student"
            assert a["steps"] == b["steps"] == (steps or manifest["default_steps"])
            assert a["distilled_from"]["sha256"] == b["distilled_from"]["sha256"] == info["distilled_from"]["sha256"]
            # the files: int16 HU (1000 per unit of the [-1, 1] scale), so under 1e-3 rounds to at most 1 HU apart
            hu = [np.asarray(nib.load(str(outs[k] / f"sample_{i:03d}.nii.gz")).dataobj, dtype=np.int32)
                  for k in ("onnx", "torch")]
            assert np.abs(hu[0] - hu[1]).max() <= 1
    capsys.readouterr()
    for steps in (3, 50):
        out = toy / f"student_onnx_refused_{steps}"
        code = medgen(["sample", "--engine", "onnx", "--model", str(exported), "--steps", str(steps), "--out", str(out),
                       "--device", "cpu", "--no-energy", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and f"--steps {steps}" in err and "supported_steps" in err, err
        assert not list(out.glob("sample_*"))


def test_resume_continues_exactly(toy, student, capsys):
    out = toy / "resumed"
    assert _distill(toy, out, "--steps", "20") == 0
    assert _distill(toy, out, "--resume") == 0  # 40 steps, from the step-20 checkpoint
    a, b = load_weights(student / "weights.safetensors"), load_weights(out / "weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # another teacher on resume is refused
    other = toy / "other_teacher"
    shutil.copytree(toy / "teacher", other)
    w = load_weights(other / "weights.safetensors")
    write_model_files(other, {"model": {k.partition("/")[2]: v + 0.01 for k, v in w.items()}}, None,
                      json.loads((other / "model.json").read_text()))
    assert medgen(["train", "distill", "--teacher", str(other), "--config", str(toy / "cfg.yaml"), "--latents",
                   str(toy / "lat"), "--out", str(out), "--resume", *COMMON]) == 2
    assert "--teacher" in (err := capsys.readouterr().err) and "differ from those of the teacher this run" in err


def test_bad_teacher_fails_naming_teacher(toy, student, capsys):
    ddpm = toy / "ddpm_teacher"
    shutil.copytree(toy / "teacher", ddpm)
    info = json.loads((ddpm / "model.json").read_text())
    info["diffusion"]["objective"] = "ddpm"
    (ddpm / "model.json").write_text(json.dumps(info))
    cases = [(toy / "no_such_run", "no model to distil"), (toy / "lat", "no model to distil"),
             (default_model_dir("ct") / "vae", "no model to distil"), (ddpm, "rectified-flow"),
             (student, "itself a distilled student")]
    for teacher, words in cases:
        out = toy / "refused"
        code = medgen(["train", "distill", "--teacher", str(teacher), "--config", str(toy / "cfg.yaml"),
                       "--latents", str(toy / "lat"), "--out", str(out), *COMMON])
        err = capsys.readouterr().err
        assert code == 2 and "--teacher" in err and words in err, (teacher, err)
        assert not out.exists()
    assert _distill(toy, toy / "refused", "--guidance", "2") == 2
    assert "only for mask-conditioned" in capsys.readouterr().err
    assert _distill(toy, toy / "refused", "--student-steps", "16") == 2


def test_tgca_student_learns_the_guided_teacher_with_its_whole_model(toy):
    """A TGCA teacher (the toy DiT + an adapter with random, non-zero output) distilled with
    guidance 3 folded in: the student's 1-step samples approach the guided teacher's 16-step ones,
    without guidance, and the base DiT's weights are trained too."""
    base, base_info = load_model(toy / "teacher")
    from medgen_rt.models.tgca import TGCA

    torch.manual_seed(0)
    tgca = TGCA(base, mask_channels=2, encoder_channels=[8, 16], adapter_scale_init=1.0)
    torch.nn.init.normal_(tgca.condition_embedder.conv_out.weight, std=0.5)
    info = {**{k: base_info[k] for k in ("diffusion", "scale_factor", "latent_shape", "vae_run", "modality",
                                         "geometry")},
            "kind": "tgca", "base": base_info, "mask_labels": [1, 2],
            "config": {"mask_channels": 2, "encoder_channels": [8, 16], "adapter_scale_init": 1.0}}
    info["vae_run"] = str(default_model_dir("ct") / "vae")
    run = toy / "tgca"
    write_model_files(run, {"model": {k: v.detach().clone() for k, v in tgca.state_dict().items()}}, None, info)
    out = toy / "tgca_student"
    assert medgen(["train", "distill", "--teacher", str(run), "--config", str(toy / "cfg.yaml"), "--latents",
                   str(toy / "lat"), "--out", str(out), "--guidance", "3", *COMMON]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(rows[-1]["val_mse_1step"]) < 0.6 * float(rows[0]["val_mse_1step"])
    got = json.loads((out / "model.json").read_text())
    assert got["kind"] == "tgca" and got["distillation"]["guidance"] == 3
    assert got["config"] == info["config"]  # condition dropout is the task's during distillation, not the model's
    a, b = load_weights(run / "weights.safetensors"), load_weights(out / "weights.safetensors")
    assert not torch.equal(a["model/base.blocks.0.attn.qkv.weight"], b["model/base.blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["model/condition_embedder.conv_out.weight"],
                           b["model/condition_embedder.conv_out.weight"])
    # the student, sampled without guidance, follows the guided teacher rather than the unguided one
    from medgen_rt.train.latents import open_latents

    labels = torch.stack([open_latents(toy / "lat").load(i)["mask"] for i in (0, 1)])
    mask = torch.stack([labels == 1, labels == 2], dim=1).float()
    noise = torch.randn((2,) + SHAPE, generator=torch.Generator().manual_seed(1))
    teacher, _ = load_model(run)
    fn = D.network_fn(teacher.eval(), True)
    plain = D.sample(fn, noise.shape, sampler="euler", steps=16, noise=noise, cond=mask)
    guided = D.sample(fn, noise.shape, sampler="euler", steps=16, noise=noise, cond=mask, null_cond=0 * mask,
                      guidance_scale=3.0)
    net, _ = load_model(out)
    one = D.sample(D.network_fn(net.eval(), True), noise.shape, sampler="euler", steps=1, noise=noise, cond=mask)
    assert _mse(one, guided) < 0.7 * _mse(one, plain)  # 0.051 against 0.119 when written


@pytest.mark.parametrize("preset", ["ct-tiny", "cmr4d-tiny"])
def test_preset_distill_sections_parse(preset):
    from medgen_rt.train.config import load_config
    from medgen_rt.train.distill import SECTION_KEYS
    from medgen_rt.train.loop import TrainSettings

    section = load_config(preset)[0]["distill"]
    assert set(section) <= set(SECTION_KEYS) and section["student_steps"] == 4
    TrainSettings.from_dict(dict(section["train"]), preset)
