"""Fault injection for what medgen_rt reads (issue #13, findings 2, 3, 5, 6 and 7): corrupt or
tampered weights and model.json, NIfTI headers and checkpoint archives that claim more memory
than the file holds, ONNX export manifests that point outside their folder or do not fit their
models, unknown mask labels and unusable affines. Each must end as one clear line naming the
file (and the key), exit 2, no traceback, nothing written, and little memory used."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from cli_run import assert_clean_error, medgen
from safetensors.torch import load_file, save_file

from medgen_rt.sampling.api import default_model_dir, resolve_model

PEAK_LIMIT_MB = 200


# ---- helpers ---------------------------------------------------------------------------------------

def _model_copy(tmp_path) -> Path:
    """A writable cine DiT model (dit/ + vae/) to tamper with: the embedded cine VQ-GAN and a DiT4D
    with the previous cine default's model.json (tests/data) and seeded random weights. The
    embedded cine default is a U-Net now; these checks are of a DiT's model.json."""
    from medgen_rt.io.run_folder import flatten_modules
    from medgen_rt.models import build_model

    root = tmp_path / "model-cine-dit"
    shutil.copytree(default_model_dir("cine") / "vae", root / "vae")
    (root / "dit").mkdir()
    info = json.loads((Path(__file__).parent / "data" / "cine-dit-model.json").read_text())
    (root / "dit" / "model.json").write_text(json.dumps(info))
    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in build_model(info).state_dict().items()}
    save_file(flatten_modules({"model": weights}), str(root / "dit" / "ema.safetensors"))
    return root


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    new = change(data)
    path.write_text(json.dumps(data if new is None else new))


def _sample(model, out, *extra):
    return medgen("sample", "--model", model, "--steps", "1", "--no-energy", "--quiet", "--out", out, *extra)


def _header_only_nifti(path: Path, shape=(1024, 1024, 1024), dtype=np.int16) -> Path:
    """A .nii.gz holding only a header that claims ``shape`` voxels: 65 bytes for 2 GiB."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    buf = io.BytesIO()
    hdr.write_to(buf)
    path.write_bytes(gzip.compress(buf.getvalue() + b"\0" * 4, mtime=0))
    return path


# The child's own peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries the parent's
# high-water mark across fork+exec into ru_maxrss, so a child of this (torch-loaded) pytest process
# would report at least the parent's size.
_PEAK = ("def _peak_kb():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n"
         "            return int(line.split()[1])\n")


def _peak_rss_mb(code: str) -> tuple:
    """Run ``code`` in a fresh interpreter; (process, its peak resident memory in MB)."""
    wrapped = code + "\n" + _PEAK + "print('PEAK_KB', _peak_kb())\n"
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.split("PEAK_KB")[-1].split()[0]) / 1024
    return proc, peak


def _cli_peak_rss_mb(*args) -> tuple:
    """``medgen ARGS`` in a fresh interpreter that reports its own peak resident memory on exit."""
    code = ("import atexit, runpy, sys\n" + _PEAK +
            "atexit.register(lambda: sys.stderr.write('PEAK_KB %d\\n' % _peak_kb()))\n"
            f"sys.argv = ['medgen'] + {[str(a) for a in args]!r}\n"
            "runpy.run_module('medgen_rt', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = int(proc.stderr.split("PEAK_KB")[-1].split()[0]) / 1024
    return proc, peak


def _pth_with_a_huge_record(path: Path, size: int = 64 << 20) -> Path:
    """A torch.save checkpoint whose tensor record is rewritten as ``size`` deflated zero bytes:
    a file of ~1/1000 of what its zip directory says it expands to."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
                continue
            big = zipfile.ZipInfo(info.filename)
            big.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(big, "w", force_zip64=True) as f:
                chunk = bytes(1 << 22)
                for _ in range(size // len(chunk)):
                    f.write(chunk)
    return path


def _patch_nifti_header(path: Path, **fields) -> None:
    """Rewrite header fields of a .nii.gz in place (nibabel would recompute them on save)."""
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
    for key, value in fields.items():
        hdr[key] = value
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:], mtime=0))


def _ct_data(tmp_path, name="ct") -> Path:
    from medgen_rt.data import write_ct_dataset

    root = tmp_path / name
    write_ct_dataset(root, n=1, quiet=True, shape=(32, 32, 16))
    return root


# ---- a tiny ONNX export, built by hand (exporting a real model takes ~30 s) -----------------------

LATENT = [8, 4, 4, 2]


def _tiny_export(folder: Path) -> Path:
    """An export folder the engine samples from: a denoiser that returns x/2, a decoder that is one
    transposed convolution (4x up), a codebook and a complete manifest."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from medgen_rt.export.onnx_export import FORMAT, FORMAT_VERSION

    folder.mkdir(parents=True)
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    den = helper.make_graph(
        [helper.make_node("Mul", ["x", "half"], ["output"])], "denoiser",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"] + LATENT),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch"] + LATENT)], [half])
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (8, 1, 4, 4, 4)).astype(np.float32), "w")
    dec = helper.make_graph(
        [helper.make_node("ConvTranspose", ["z", "w"], ["image"], kernel_shape=[4, 4, 4], strides=[4, 4, 4])],
        "decoder", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8, "d", "h", "w"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "D", "H", "W"])], [w])
    for name, graph in (("denoiser", den), ("decoder", dec)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        onnx.save(model, str(folder / f"{name}.onnx"))
    np.save(folder / "codebook.npy", np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32))
    T = 10
    betas = np.linspace(0.01, 0.2, T)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "medgen_rt_version": "test", "kind": "dit",
        "conditional": False, "mask_shape": None, "mask_labels": None, "latent_shape": LATENT, "scale_factor": 1.5,
        "modality": "ct", "geometry": {"image_shape": [16, 16, 8], "affine": np.diag([2.0, 2.0, 3.0, 1.0]).tolist()},
        "diffusion": {"objective": "ddpm", "schedule": "linear", "timesteps": T, "prediction": "v_prediction"},
        "schedule": {"betas": betas.tolist(), "alphas_cumprod": np.cumprod(1 - betas).tolist()},
        "flow_timestep_scale": 1000.0,
        "decoder": {"cine": False, "factor": [4, 4, 4], "halo": [0, 0, 0], "output_axis": [0, 1, 2],
                    "out_channels": 1, "embedding_dim": 8},
        "files": {"denoiser": "denoiser.onnx", "decoder": "decoder.onnx"}, "codebook": "codebook.npy",
    }
    (folder / "medgen_export.json").write_text(json.dumps(manifest))
    return folder


def _onnx_sample(folder, out):
    return medgen("sample", "--engine", "onnx", "--model", folder, "--steps", "2", "--no-energy", "--quiet",
                  "--out", out)


# ---- finding 2: corrupt weights and model.json give exit 0 and normal-looking output ---------------

def test_nan_weights_are_refused_before_sampling(tmp_path):
    root = _model_copy(tmp_path)
    weights = root / "dit" / "ema.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, str(weights))
    proc = _sample(root, tmp_path / "out")
    assert_clean_error(proc, str(weights), "model/", "non-finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0, -1.5, "nan", None])
def test_scale_factor_must_be_finite_and_positive(tmp_path, value):
    root = _model_copy(tmp_path)
    info = root / "dit" / "model.json"
    _edit_json(info, lambda d: d.__setitem__("scale_factor", float(value) if value == "nan" else value))
    with pytest.raises(ValueError, match="scale_factor") as exc:
        resolve_model(str(root))
    assert str(info) in str(exc.value)
    if value == 0:  # and through the CLI: one line, exit 2, nothing written
        proc = _sample(root, tmp_path / "out")
        assert_clean_error(proc, str(info), "scale_factor")
        assert not (tmp_path / "out").exists()


def test_latent_shape_that_does_not_fit_the_geometry_is_refused(tmp_path):
    """A latent twice as wide decoded a 192x192 volume and wrote it with the 96x96 affine."""
    root = _model_copy(tmp_path)
    info = root / "dit" / "model.json"
    _edit_json(info, lambda d: d.__setitem__("latent_shape", [8, 8, 48, 48, 4]))
    proc = _sample(root, tmp_path / "out")
    assert_clean_error(proc, str(info), "latent_shape", "image_shape")
    assert not (tmp_path / "out").exists()
    # consistent with geometry.image_shape but not with the network it describes
    _edit_json(info, lambda d: d["geometry"].__setitem__("image_shape", [192, 192, 8, 16]))
    with pytest.raises(ValueError, match=r"latent_shape.*input_size"):
        resolve_model(str(root))
    # one channel too many for the VQ-GAN's codebook
    _edit_json(info, lambda d: d.__setitem__("latent_shape", [9, 8, 24, 24, 4]))
    with pytest.raises(ValueError, match=r"latent_shape.*9 channels"):
        resolve_model(str(root))


# ---- finding 6 (part): malformed model.json is a traceback, and its errors do not name the file ----

def _pop(key):
    def change(d):
        del d[key]
    return change


def _config(key, value=None, drop=False):
    def change(d):
        if drop:
            d["config"].pop(key)
        else:
            d["config"][key] = value
    return change


TAMPERED_MODEL_JSON = {
    # case: (run, change, the file the error names, what else it names); a config that no longer
    # fits the weights is reported against the weights file, with model.json and the tensor
    "missing-diffusion": ("dit", _pop("diffusion"), "model.json", "'diffusion'"),
    "missing-latent_shape": ("dit", _pop("latent_shape"), "model.json", "'latent_shape'"),
    "extra-config-key": ("dit", _config("bogus", 1), "model.json", "bogus"),
    "missing-config-key": ("dit", _config("hidden_size", drop=True), "ema.safetensors", "lacks hidden_size"),
    "changed-hidden_size": ("dit", _config("hidden_size", 128), "ema.safetensors", "blocks.0."),
    "json-list": ("dit", lambda d: [d], "model.json", "JSON object"),
    "vae-json-list": ("vae", lambda d: [d], "model.json", "JSON object"),
    "vae-changed-channels": ("vae", _config("channels", [16, 64]), "weights.safetensors", "decoder."),
    "singular-affine": ("dit", lambda d: d["geometry"].__setitem__("affine", np.diag([1.0, 0, 1, 1]).tolist()),
                        "model.json", "geometry.affine"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_MODEL_JSON))
def test_malformed_model_json_is_one_line_naming_the_file(tmp_path, case):
    run, change, named, needle = TAMPERED_MODEL_JSON[case]
    root = _model_copy(tmp_path)
    _edit_json(root / run / "model.json", change)
    proc = _sample(root, tmp_path / "out")
    assert_clean_error(proc, f"{run}/{named}", needle)
    if named != "model.json":
        assert f"{run}/model.json" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- finding 3: headers and zip directories that claim more memory than the file holds ------------

_LINUX_PEAK = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory read from /proc")


@_LINUX_PEAK
def test_nifti_header_claiming_1024_cubed_voxels_is_read_with_little_memory(tmp_path):
    bomb = _header_only_nifti(tmp_path / "claims_2GiB.nii.gz")
    assert bomb.stat().st_size < 100
    reads = {
        # how sample --masks, the ONNX engine and eval read masks, and how every image is read
        "mask": "read_volume(p, dtype=None)",
        "image": "read_volume(p, dtype=np.float32)",
        # the training/encode loaders: the same file as a mask of a data folder and as its image
        "loader mask": "VolumeFolder(root_m)",
        "loader image": "VolumeFolder(root_i)",
    }
    from medgen_rt.io import write_volume

    for root, where in (("root_m", "masks"), ("root_i", "images")):
        (tmp_path / root / where).mkdir(parents=True)
        shutil.copy(bomb, tmp_path / root / where / "x.nii.gz")
    # beside the bomb mask, an ordinary image
    (tmp_path / "root_m" / "images").mkdir()
    write_volume(tmp_path / "root_m" / "images" / "x.nii.gz", np.zeros((4, 4, 4)), kind="ct")
    for what, call in reads.items():
        code = (f"import numpy as np\nfrom pathlib import Path\nfrom medgen_rt.io import read_volume\n"
                f"from medgen_rt.data import VolumeFolder\n"
                f"p = Path({str(bomb)!r}); root_m = Path({str(tmp_path / 'root_m')!r}); "
                f"root_i = Path({str(tmp_path / 'root_i')!r})\n"
                f"try:\n    {call}\n    print('NO ERROR')\nexcept ValueError as e:\n    print('ERROR', e)\n")
        proc, peak = _peak_rss_mb(code)
        print(f"peak RSS reading a {bomb.stat().st_size}-byte NIfTI claiming 1024^3 int16 as {what}: {peak:.0f} MB")
        assert "ERROR" in proc.stdout and "NO ERROR" not in proc.stdout, proc.stdout
        assert "x.nii.gz" in proc.stdout or str(bomb) in proc.stdout
        assert peak < PEAK_LIMIT_MB, (what, peak)


@_LINUX_PEAK
def test_sample_masks_with_a_header_claiming_1024_cubed_voxels_fails_fast(tmp_path):
    bomb = _header_only_nifti(tmp_path / "mask.nii.gz")
    proc, peak = _cli_peak_rss_mb("sample", "--model", "ct", "--masks", bomb, "--no-energy", "--quiet",
                                  "--out", tmp_path / "out")
    print(f"peak RSS of `medgen sample --masks` on it (torch loaded): {peak:.0f} MB")
    assert_clean_error(proc, str(bomb))
    assert peak < 1024, peak  # was 2.3 GB; torch alone takes ~250 MB
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_pth_whose_record_expands_far_beyond_the_file(tmp_path):
    ckpt = _pth_with_a_huge_record(tmp_path / "tiny.pth")
    assert ckpt.stat().st_size < 1 << 20
    proc = medgen("convert", "voldit", ckpt, "--out", tmp_path / "out")
    assert_clean_error(proc, str(ckpt), "archive/data/0")
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_trainer_state_whose_record_expands_far_beyond_the_file(tmp_path):
    from medgen_rt.train.checkpoint import read_checkpoint, save_weights

    step = tmp_path / "step_0000003"
    step.mkdir()
    save_weights(step / "weights.safetensors", {"model/w": torch.zeros(2)})
    (step / "state.json").write_text("{}")
    _pth_with_a_huge_record(step / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt: record 'archive/data/0'"):
        read_checkpoint(step)


# ---- finding 5 and 6: export manifests ------------------------------------------------------------

def test_manifest_may_only_name_files_inside_the_export(tmp_path):
    export = _tiny_export(tmp_path / "export")
    ok = _onnx_sample(export, tmp_path / "ok")  # the untampered export samples
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert nib.load(str(tmp_path / "ok" / "sample_000.nii.gz")).shape == (16, 16, 8)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(export / "denoiser.onnx", outside)
    manifest = export / "medgen_export.json"
    pristine = manifest.read_text()
    for key, value in (("files.denoiser", str(outside)), ("files.denoiser", "../elsewhere.onnx"),
                       ("codebook", "/etc/hostname"), ("files.decoder", "link.onnx")):
        manifest.write_text(pristine)
        if value == "link.onnx":  # a link in the folder that leads out of it
            (export / "link.onnx").symlink_to(outside)
        section, _, name = key.rpartition(".")
        _edit_json(manifest, lambda d: (d[section] if section else d).__setitem__(name, value))
        proc = _onnx_sample(export, tmp_path / "out")
        assert_clean_error(proc, str(manifest), key, "outside the export folder")
        assert not (tmp_path / "out").exists()


def _set(key, value):
    def change(d):
        section, _, name = key.rpartition(".")
        (d[section] if section else d)[name] = value
    return change


def _other_latent(d):
    d["latent_shape"] = [8, 8, 8, 4]
    d["geometry"]["image_shape"] = [32, 32, 16]


TAMPERED_MANIFESTS = {
    "json-list": (lambda d: [d], "JSON object"),
    "missing-diffusion": (_pop("diffusion"), "'diffusion'"),
    "missing-decoder": (_pop("decoder"), "'decoder'"),
    "missing-schedule": (_pop("schedule"), "'schedule'"),
    "scale_factor-0": (_set("scale_factor", 0), "scale_factor"),
    # consistent with the decoder and geometry, but not what the ONNX denoiser takes
    "latent_shape-for-another-model": (_other_latent, "latent_shape"),
    "latent_shape-vs-image_shape": (_set("latent_shape", [8, 8, 8, 4]), "image_shape"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_MANIFESTS))
def test_malformed_manifest_is_one_line_naming_the_file(tmp_path, case):
    change, needle = TAMPERED_MANIFESTS[case]
    export = _tiny_export(tmp_path / "export")
    _edit_json(export / "medgen_export.json", change)
    proc = _onnx_sample(export, tmp_path / "out")
    assert_clean_error(proc, str(export / "medgen_export.json"), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_truncated_or_random_onnx_file_is_one_line_naming_it(tmp_path, damage):
    export = _tiny_export(tmp_path / "export")
    victim = export / "decoder.onnx"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(len(data)))
    proc = _onnx_sample(export, tmp_path / "out")
    assert_clean_error(proc, str(victim), "not a loadable ONNX model")
    assert not (tmp_path / "out").exists()


# ---- finding 7 (part): unknown mask labels and unusable affines are accepted by train and encode ---

def test_unknown_mask_label_is_refused_by_encode_and_the_training_loader(tmp_path):
    from medgen_rt.data import DataError, VolumeFolder

    data = _ct_data(tmp_path)
    mask_path = data / "masks" / "ct_001.nii.gz"
    mask = nib.load(str(mask_path))
    labels = np.asarray(mask.dataobj).copy()
    labels[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(labels, mask.affine, mask.header), str(mask_path))
    with pytest.raises(DataError, match=r"ct_001\.nii\.gz: labels \[9\]"):
        VolumeFolder(data)[0]  # what `medgen train vae` and `medgen encode` read CT data with
    proc = medgen("encode", "--vae", default_model_dir("ct") / "vae", "--data", data, "--out", tmp_path / "lat",
                  "--quiet", "--device", "cpu")
    assert_clean_error(proc, str(mask_path), "labels [9]", "dataset.json")
    assert not (tmp_path / "lat").exists()


def test_unknown_mask_label_is_refused_by_eval(tmp_path):
    from medgen_rt.data import write_ct_dataset

    data = tmp_path / "ct"
    write_ct_dataset(data, n=2, quiet=True, shape=(32, 32, 16))
    mask_path = data / "masks" / "ct_001.nii.gz"
    mask = nib.load(str(mask_path))
    labels = np.asarray(mask.dataobj).copy()
    labels[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(labels, mask.affine, mask.header), str(mask_path))
    proc = medgen("eval", "quality", "--real", data, "--synthetic", data, "--out", tmp_path / "q", "--steps", "2",
                  "--quiet")
    assert_clean_error(proc, "--real", str(mask_path), "labels [9]")
    assert not (tmp_path / "q").exists()


def test_unknown_label_in_acdc_ground_truth_is_refused(tmp_path):
    from medgen_rt.data import ACDCDataset, DataError, write_acdc_dataset

    write_acdc_dataset(tmp_path / "cmr", n=1, quiet=True, shape=(16, 16, 3), n_frames=4)
    gt = sorted((tmp_path / "cmr").rglob("*_gt.nii.gz"))[0]
    img = nib.load(str(gt))
    labels = np.asarray(img.dataobj).copy()
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), str(gt))
    with pytest.raises(DataError, match=rf"{gt.name}: labels \[7\]"):
        ACDCDataset(tmp_path / "cmr")[0]


@pytest.mark.parametrize("affine", ["nan", "singular"])
def test_nan_or_singular_affine_is_refused_at_read_time(tmp_path, affine):
    from medgen_rt.io import NiftiError, read_info, read_volume

    data = _ct_data(tmp_path)
    image = data / "images" / "ct_001.nii.gz"
    row = [np.nan, 0, 0, 0] if affine == "nan" else [0, 0, 0, 0]
    _patch_nifti_header(image, srow_x=row)
    for read in (read_info, read_volume):
        with pytest.raises(NiftiError, match=r"ct_001\.nii\.gz: invalid affine"):
            read(image)
    proc = medgen("encode", "--vae", default_model_dir("ct") / "vae", "--data", data, "--out", tmp_path / "lat",
                  "--quiet", "--device", "cpu")
    assert_clean_error(proc, str(image), "affine")
    assert not (tmp_path / "lat").exists()
