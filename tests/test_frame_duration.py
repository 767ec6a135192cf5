"""Cine outputs carry the frame duration of the model's training data: `medgen encode` records
it (the median seconds per model frame), model.json and the ONNX manifest carry it, and every
cine NIfTI says it in pixdim[4] (seconds) and its sidecar, so SimpleITK reads it back instead
of 1.0 s. A model.json from before it was recorded samples as before, with the sidecar saying
the duration is unknown (never 0)."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import medgen_rt
from medgen_rt.sampling.api import default_model_dir, resolve_model

# the embedded cine model's value (python/medgen_rt/default_models/cmr4d-tiny/*/model.json)
DEFAULT_FRAME_DURATION = 0.053475


def _check_cine_files(folder, frame_duration):
    """The NIfTI header, SimpleITK's reading of it and the sidecar agree on the frame duration."""
    img = nib.load(str(folder / "sample_000.nii.gz"))
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert float(img.header["pixdim"][4]) == pytest.approx(frame_duration, rel=1e-6)
    side = json.loads((folder / "sample_000.json").read_text())
    assert side["frame_duration_s"] == pytest.approx(frame_duration, rel=1e-9)
    sitk = pytest.importorskip("SimpleITK")
    spacing = sitk.ReadImage(str(folder / "sample_000.nii.gz")).GetSpacing()
    assert len(spacing) == 4 and spacing[3] == pytest.approx(frame_duration, rel=1e-6)
    return spacing[3]


def test_embedded_model_records_the_frame_duration_of_its_training_phantoms():
    """0.053475 s: the median over the 400 training cines (`medgen phantom cmr4d --n 400`, seed 0,
    20 frames per cycle at 55-85 bpm) of the spacing of the 16 frames per cycle the model was
    trained on (medgen_rt.data.preprocess.sampled_frame_duration), as `medgen encode` records it."""
    from medgen_rt.data.phantoms import _draw_cine_params, subject_seed
    from medgen_rt.data.preprocess import sampled_frame_duration

    info = json.loads((resolve_model("default")[0] / "model.json").read_text())
    frames = info["geometry"]["image_shape"][3]
    durations = []
    for i in range(1, 401):  # the heart rate alone, as make_cine_phantom draws it (no images)
        bpm = _draw_cine_params(np.random.default_rng(subject_seed(0, i)), 20)["heart_rate_bpm"]
        durations.append(sampled_frame_duration(60.0 / bpm / 20, 20, frames))
    assert round(float(np.median(durations)), 6) == info["geometry"]["frame_duration"] == DEFAULT_FRAME_DURATION


def test_sampled_frame_duration():
    from medgen_rt.data.preprocess import sampled_frame_duration

    assert sampled_frame_duration(0.04, 20, 16) == pytest.approx(0.05)  # 16 frames over the whole cycle
    assert sampled_frame_duration(0.04, 12, 16) == pytest.approx(0.04)  # consecutive frames, repeated
    assert sampled_frame_duration(None, 20, 16) is None


def test_torch_cine_outputs_carry_the_training_frame_duration(tmp_path):
    made = medgen_rt.sample("default", n=1, steps=1, energy=False, out=tmp_path)
    assert made[0]["metadata"]["frame_duration_s"] == DEFAULT_FRAME_DURATION
    _check_cine_files(tmp_path, DEFAULT_FRAME_DURATION)


def test_encode_records_the_median_frame_duration(tmp_path):
    from medgen_rt.data.phantoms import write_acdc_dataset
    from medgen_rt.train.encode import encode_dataset

    meta = write_acdc_dataset(tmp_path / "cmr", 3, seed=4, quiet=True, shape=(32, 32, 2), n_frames=20)
    native = [s["frame_duration_s"] for s in meta["subjects"]]
    encode_dataset(str(default_model_dir() / "vae"), str(tmp_path / "cmr"), str(tmp_path / "lat"), device="cpu",
                   quiet=True)
    geometry = json.loads((tmp_path / "lat" / "latents.json").read_text())["geometry"]
    # the embedded VQ-GAN takes 16 frames per cycle: each stands for 20/16 source frames
    assert geometry["frame_duration"] == pytest.approx(round(float(np.median(native)) * 20 / 16, 6), abs=1e-6)


def test_a_model_without_the_frame_duration_says_it_is_unknown(tmp_path):
    model = tmp_path / "old-model"
    shutil.copytree(default_model_dir(), model)
    info_path = model / resolve_model("default")[0].name / "model.json"  # the denoiser: unet/ (dit/ before)
    info = json.loads(info_path.read_text())
    del info["geometry"]["frame_duration"]
    info_path.write_text(json.dumps(info))
    medgen_rt.sample(str(model), n=1, steps=1, energy=False, out=tmp_path / "out", format="nifti+dicom")
    out = tmp_path / "out"
    side = json.loads((out / "sample_000.json").read_text())
    assert side["frame_duration_s"] is None and side["frame_duration_note"].startswith("unknown")
    assert float(nib.load(str(out / "sample_000.nii.gz")).header["pixdim"][4]) == 0.0  # NIfTI's "unknown"
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(next((out / "sample_000_dicom").glob("MR_t002_*.dcm")), stop_before_pixels=True)
    assert ds.TriggerTime is None or ds.TriggerTime == ""  # left empty, not 0
    # a value that is not a duration is refused, naming the file and the key
    info["geometry"]["frame_duration"] = -0.05
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="geometry.frame_duration") as err:
        medgen_rt.sample(str(model), n=1, steps=1, energy=False)
    assert "model.json" in str(err.value)
