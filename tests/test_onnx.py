"""ONNX export and the torch-free engine: every exported model matches PyTorch on
the same input, a full ONNX sampling run matches the torch runtime from the same
noise, the engine runs where `import torch` fails, and bad exports fail clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import medgen_rt
from medgen_rt.export.engine import ExportError, OnnxEngine, read_manifest
from medgen_rt.export.onnx_export import export_model
from medgen_rt.models import load_model
from medgen_rt.sampling.api import resolve_model
from cli_run import medgen

CPU = ["CPUExecutionProvider"]


def _session(path):
    return ort.InferenceSession(str(path), providers=CPU)


def _close(got, want, what):
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max abs difference {err} at output scale {scale}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "default"
    export_model("default", out, fp16=True)
    return out


def _write_run(folder, model, info):
    from medgen_rt.train.checkpoint import write_model_files

    write_model_files(folder, {"model": model.state_dict()}, None, info)


@pytest.fixture(scope="module")
def ct_runs(tmp_path_factory):
    """CT models with random weights: a TGCA-conditioned DiT3D and a ControlNet U-Net, one VQ-GAN."""
    from medgen_rt.models.dit import DiT, dit_config
    from medgen_rt.models.tgca import TGCA
    from medgen_rt.models.unet import ControlledUNet, UNetDenoiser, unet_config
    from medgen_rt.models.vqgan import build_vqgan

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ct-runs")
    vae = build_vqgan("ct-tiny").eval()
    _write_run(root / "vae", vae, {"kind": "vqgan", "config": vae.config_dict(), "modality": "ct"})
    latent = (8, 8, 8, 4)
    affine = np.diag([2.0, 2.0, 3.0, 1.0]).tolist()
    common = {"diffusion": {"objective": "ddpm", "schedule": "cosine", "timesteps": 300,
                            "prediction": "v_prediction"}, "scale_factor": 1.5, "latent_shape": list(latent),
              "vae_run": "../vae", "modality": "ct", "mask_labels": [1, 2],
              "geometry": {"image_shape": [32, 32, 16], "affine": affine}}
    base = DiT(dit_config("dit3d-tiny", input_size=latent[1:]))
    tgca = TGCA(base, mask_channels=2, inject_layers=2)
    for p in tgca.parameters():  # zero-initialised gates would hide the adapter
        p.data.normal_(0, 0.05)
    _write_run(root / "tgca", tgca, {**common, "kind": "tgca", "config": {"mask_channels": 2, "inject_layers": 2},
                                     "base": {"kind": "dit", "config": base.config.to_dict()}})
    unet_cfg = unet_config("unet-tiny")
    unet = UNetDenoiser(unet_cfg)
    control = ControlledUNet(unet, mask_channels=2, mask_downsample=4)
    for p in control.parameters():
        p.data.normal_(0, 0.05)
    _write_run(root / "controlnet", control,
               {**common, "kind": "controlnet", "config": {"mask_channels": 2, "mask_downsample": 4},
                "base": {"kind": "unet", "config": unet_cfg.to_dict()}})
    return root


def test_exported_default_models_match_pytorch(exported):
    manifest = read_manifest(exported)
    assert manifest["format_version"] == 1 and manifest["medgen_rt_version"] == medgen_rt.__version__
    assert set(manifest["files"]) == {"denoiser", "decoder", "encoder", "denoiser_fp16", "decoder_fp16",
                                      "encoder_fp16"}
    import onnx

    for name in manifest["files"].values():  # onnx.checker passed at export; the stamp is in each file
        props = {p.key: p.value for p in onnx.load(str(exported / name), load_external_data=False).metadata_props}
        assert props["medgen_rt_version"] == medgen_rt.__version__
    denoiser_dir, vae_dir = resolve_model("default")
    net, info = load_model(denoiser_dir)
    vae, _ = load_model(vae_dir)
    net.eval(), vae.eval()
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):  # dynamic batch
        x = torch.randn((batch,) + tuple(info["latent_shape"]), generator=g)
        t = torch.tensor([5.0, 150.0, 299.0][:batch])
        with torch.no_grad():
            want = net(x, t).numpy()
        _close(_session(exported / "denoiser.onnx").run(None, {"x": x.numpy(), "t": t.numpy()})[0], want,
               f"denoiser batch {batch}")
    for shape in ((1, 8, 5, 7, 3), (4, 8, 12, 12, 6)):  # dynamic tile sizes
        z = torch.randn(shape, generator=g)
        with torch.no_grad():
            want = vae.decoder(z).numpy()
        _close(_session(exported / "decoder.onnx").run(None, {"z": z.numpy()})[0], want, f"decoder {shape}")
    image = torch.randn(2, 1, 32, 24, 16, generator=g)
    with torch.no_grad():
        want = vae.encoder(image).numpy()
    _close(_session(exported / "encoder.onnx").run(None, {"image": image.numpy()})[0], want, "encoder")
    np.testing.assert_array_equal(np.load(exported / "codebook.npy"),
                                  vae.quantizer.quantizer.embedding.weight.detach().numpy())


def test_onnx_sampling_matches_the_torch_runtime(exported, tmp_path):
    noise = np.concatenate([torch.randn((1, 8, 8, 24, 24, 4), generator=torch.Generator().manual_seed(11 + i)).numpy()
                            for i in range(2)])
    # the continuous path: the same volume within 1e-3
    ref = medgen_rt.sample("default", n=2, seed=11, steps=6, energy=False, quantize=False)
    got = OnnxEngine(exported).sample(n=2, steps=6, noise=noise, energy=False, quantize=False)
    for r, g in zip(ref, got):
        assert np.abs(r["volume"] - g["volume"]).max() < 1e-3
    # snapped to the codebook (the default): a latent vector within rounding of two entries may
    # snap differently (the engines' distances round differently), changing only its own patch
    ref = medgen_rt.sample("default", n=2, seed=11, steps=6, energy=False)
    got = OnnxEngine(exported).sample(n=2, steps=6, noise=noise, energy=False)
    for r, g in zip(ref, got):
        assert np.mean(np.abs(r["volume"] - g["volume"]) < 1e-3) > 0.995
    # the public API with engine="onnx" (its own numpy noise), files as from the torch runtime
    made = medgen_rt.sample(str(exported), n=1, steps=3, engine="onnx", energy=False, out=tmp_path)
    assert made[0]["volume"].shape == (96, 96, 8, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_000.gif", "sample_000.json", "sample_000.nii.gz",
                                                          "sample_000.png"]
    # a flow model (the embedded cine model) cannot take a DDPM-family sampler
    with pytest.raises(ValueError, match="flow"):
        OnnxEngine(exported).sample(n=1, steps=2, sampler="ddim", energy=False)


def test_conditioned_ct_models_export_and_sample(ct_runs, tmp_path):
    import nibabel as nib

    mask = np.zeros((32, 32, 16), dtype=np.int16)
    mask[8:20, 8:20, 4:10] = 1
    mask[20:26, 10:16, 6:12] = 2
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "mask.nii.gz"))
    for kind in ("tgca", "controlnet"):
        out = tmp_path / f"onnx-{kind}"
        export_model(str(ct_runs / kind), out, fp16=False)
        manifest = read_manifest(out)
        assert manifest["conditional"] and manifest["mask_shape"] == [2, 32, 32, 16]
        net, info = load_model(ct_runs / kind)
        net.eval()
        x = torch.randn(2, 8, 8, 8, 4, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([7.0, 120.0])
        onehot = torch.from_numpy(np.stack([mask == 1, mask == 2]).astype(np.float32))[None].repeat(2, 1, 1, 1, 1)
        with torch.no_grad():
            want = net(x, t, onehot).numpy()
        got = _session(out / "denoiser.onnx").run(None, {"x": x.numpy(), "t": t.numpy(), "mask": onehot.numpy()})[0]
        _close(got, want, kind)
        # the whole guided sampling run, same noise as the torch runtime's
        ref = medgen_rt.sample(str(ct_runs / kind), n=1, seed=2, steps=4, guidance=2.0,
                               masks=str(tmp_path / "mask.nii.gz"), energy=False, quantize=False)
        noise = torch.randn((1, 8, 8, 8, 4), generator=torch.Generator().manual_seed(2)).numpy()
        res = OnnxEngine(out).sample(n=1, steps=4, guidance=2.0, masks=str(tmp_path / "mask.nii.gz"),
                                     noise=noise, energy=False, out=tmp_path / f"s-{kind}", quantize=False)
        assert np.abs(res[0]["volume"] - ref[0]["volume"]).max() < 1e-3 * 1000  # HU: 1e-3 of the [-1, 1] scale
        assert (tmp_path / f"s-{kind}" / "sample_000_mask.nii.gz").is_file()
        bad = np.zeros((16, 16, 8), dtype=np.int16)
        nib.save(nib.Nifti1Image(bad, affine), str(tmp_path / "small.nii.gz"))
        with pytest.raises(ValueError, match="mask shape"):
            OnnxEngine(out).sample(n=1, steps=2, masks=str(tmp_path / "small.nii.gz"), energy=False)


_NO_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here (blocked by the test)")
sys.meta_path.insert(0, _Block())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
from medgen_rt.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "the engine imported torch"
sys.exit(code)
"""


def test_engine_runs_without_torch(exported, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, "sample", "--engine", "onnx", "--model", str(exported),
                           "--steps", "3", "--out", str(out), "--quiet", "--format", "nifti+dicom"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import nibabel as nib

    img = nib.load(str(out / "sample_000.nii.gz"))
    assert img.shape == (96, 96, 8, 16)
    side = json.loads((out / "sample_000.json").read_text())
    assert side["engine"] == "onnx" and side["energy"]["run_kwh"] > 0
    assert json.loads((out / "summary.json").read_text())["n"] == 1
    # the training data's frame duration travels in the manifest to the header, the sidecar and
    # SimpleITK's reading (tests/test_frame_duration.py: the torch runtime), and DICOM is written without torch
    frame = read_manifest(exported)["geometry"]["frame_duration"]
    assert frame == json.loads((resolve_model("default")[0] / "model.json").read_text())["geometry"]["frame_duration"]
    assert float(img.header["pixdim"][4]) == pytest.approx(frame) and side["frame_duration_s"] == frame
    sitk = pytest.importorskip("SimpleITK")
    assert sitk.ReadImage(str(out / "sample_000.nii.gz")).GetSpacing()[3] == pytest.approx(frame)
    assert len(list((out / "sample_000_dicom").glob("MR_*.dcm"))) == 8 * 16


def test_bad_exports_fail_clearly(exported, tmp_path):
    proc = medgen("sample", "--engine", "onnx", "--model", str(tmp_path), "--no-energy", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "not a medgen_rt ONNX export" in proc.stderr and "Traceback" not in proc.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    manifest = json.loads((exported / "medgen_export.json").read_text())
    (newer / "medgen_export.json").write_text(json.dumps({**manifest, "format_version": 99, "files": {}}))
    with pytest.raises(ExportError, match="upgrade"):
        OnnxEngine(newer)
    with pytest.raises(ValueError, match="noise must have shape"):
        OnnxEngine(exported).sample(n=1, noise=np.zeros((1, 8, 4, 4, 4, 4), np.float32), energy=False)
    with pytest.raises(ValueError, match="not mask-conditioned"):
        OnnxEngine(exported).sample(n=1, masks=str(tmp_path), energy=False)
    proc = medgen("export", "onnx", "--model", "no-such-run", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no-such-run" in proc.stderr and not (tmp_path / "x").exists()
