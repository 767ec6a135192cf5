"""`medgen sample --plan-only` and the plan's share for the sampler's masks: the plan is printed for
the given options without sampling or writing anything, bad options exit 2 naming themselves; the
sampler holds the mask in the network's dtype and its null only where guidance runs, and that
changes no sample."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen_rt import diffusion as D
from medgen_rt.cli import main
from medgen_rt.sampling import api


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture
def ct_mask(tmp_path):
    """An all-background label map at the embedded CT model's geometry."""
    info = json.loads((api.default_model_dir("ct") / "tgca" / "model.json").read_text())
    path = tmp_path / "maps" / "map.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(info["geometry"]["image_shape"], np.uint8),
                             np.asarray(info["geometry"]["affine"])), str(path))
    return path


@pytest.mark.parametrize("args", [(), ("--model", "ct", "--guidance", "2", "--max-vram", "1GB", "-n", "3")],
                         ids=["default", "ct-guided"])
def test_plan_only_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--plan-only", *args]) == 0
    out = capsys.readouterr().out
    assert "plan for cpu" in out and "denoise" in out and "decode" in out, out
    if "--max-vram" in args:
        assert "max_vram 1.00 GiB" in out and "guided" in out
    assert list(tmp_path.iterdir()) == []  # no ./samples, nothing else


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU this machine lacks")
def test_plan_only_for_a_gpu_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """Analytic, from the layer shapes: the planned card's memory must be given."""
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--plan-only", "--device", "cuda", "--max-vram", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "plan for cuda:0, max_vram 8.00 GiB: denoiser bfloat16" in out and "[analytic" in out, out
    assert main(["sample", "--plan-only", "--device", "cuda"]) == 2
    assert "--max-vram" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_plan_is_the_one_sampling_follows(ct_mask):
    """Guided: the planner counts the doubled batch and the mask's null; a mask is optional for a plan."""
    made = api.sample("ct", n=1, seed=0, steps=2, guidance=2.0, masks=ct_mask, energy=False)
    planned = api.plan("ct", n=1, guidance=2.0)
    assert made[0]["metadata"]["plan"] == planned.to_dict()
    assert planned.sampler_bytes > api.plan("ct", n=1).sampler_bytes


@pytest.mark.parametrize("args, named", [
    (("--max-vram", "eight"), "--max-vram"),
    (("--max-vram", "1KB"), "--max-vram"),
    (("--engine", "onnx"), "--plan-only"),
    (("-n", "0"), "-n"),
    (("--steps", "0"), "--steps"),
    (("--guidance", "2"), "--guidance"),  # the default model has no condition
    (("--model", "ct", "--unconditional", "--guidance", "2"), "--unconditional"),
    (("--model", "no-such-model"), "no-such-model"),
    (("--cache", "-1"), "--cache"),
    (("--device", "tpu"), "--device"),
])
def test_plan_only_refuses_bad_options_naming_them(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--plan-only", *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("guidance", [None, 2.0], ids=["unguided", "guided"])
def test_the_sampler_holds_the_mask_in_the_networks_dtype_and_a_null_only_for_guidance(
        monkeypatch, ct_mask, guidance):
    seen = []
    real = D.sample

    def spy(*args, cond=None, null_cond=None, **kwargs):
        seen.append((cond, null_cond))
        return real(*args, cond=cond, null_cond=null_cond, **kwargs)

    monkeypatch.setattr(api.D, "sample", spy)
    api.sample("ct", n=1, seed=0, steps=2, guidance=guidance, masks=ct_mask, energy=False)
    (cond, null), = seen
    assert cond.dtype == torch.float32  # the CPU plan's denoiser dtype
    assert (null is None) == (guidance is None)
    if null is not None:
        assert null.dtype == cond.dtype and not null.any()


@pytest.mark.parametrize("guidance", [None, 2.0], ids=["unguided", "guided"])
def test_a_mask_held_in_bf16_samples_the_same_bits_as_one_held_in_float32(guidance):
    """network_fn casts the condition to the network's dtype: holding it in that dtype from the
    start (and its null with it) gives the same network inputs, hence the same sample."""
    from medgen_rt.models import load_model

    denoiser_dir, _ = api.resolve_model("ct")
    net, info = load_model(denoiser_dir)
    net = net.eval().to(torch.bfloat16)
    latent = (1,) + tuple(info["latent_shape"])
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand((1, net.mask_channels, 64, 64, 32), generator=g) > 0.7).float()
    noise = torch.randn(latent, generator=g)
    fn = D.network_fn(net, True, torch.bfloat16)

    def run(cond, null):
        return D.sample(fn, latent, None, sampler="euler", steps=2, guidance_scale=guidance, cond=cond,
                        null_cond=null, noise=noise.clone())

    before = run(mask, torch.zeros_like(mask))  # float32, the null always made
    held = mask.to(torch.bfloat16)
    after = run(held, torch.zeros_like(held) if guidance is not None else None)
    assert torch.equal(before, after)
