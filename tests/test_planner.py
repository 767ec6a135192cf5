"""The memory planner (sizes, the 512x512x256 CT plan under 8 GB, shrinking to a
budget), decoding's out-of-memory retries, and batched / multi-process sampling
giving the same volumes as one at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import medgen_rt
from medgen_rt.models.dit import DiT, dit_config
from medgen_rt.models.vqgan import build_vqgan
from medgen_rt.sampling import api
from medgen_rt.sampling.planner import GIB, analytic_decode_cost, parse_memory, plan_sampling


def test_parse_memory():
    assert parse_memory("8GB") == parse_memory("8 GiB") == 8 * GIB
    assert parse_memory("512MB") == 512 * 2**20 and parse_memory(1000) == 1000 and parse_memory(None) is None
    for bad in ("eight", "8XB", "-1GB", 0):
        with pytest.raises(ValueError, match="max_vram"):
            parse_memory(bad)


def test_512_ct_sample_plans_under_8gb():
    # DiT-B/2 on the ct-ds8 latent of a 512x512x256 CT, then its decode, on a CUDA device
    # (planned analytically here: the networks are on the CPU)
    latent = (8, 64, 64, 32)
    net = DiT(dit_config("dit3d-b/2", input_size=latent[1:], in_channels=8))
    vae = build_vqgan("ct-ds8").eval()
    plan = plan_sampling(net, vae, latent, n=4, max_vram="8GB", device="cuda", measure=False)
    assert plan.denoiser_dtype == "bfloat16" and plan.decode_chunk >= 1
    assert 0 < plan.predicted_peak_bytes["denoise"] < 8 * GIB and 0 < plan.predicted_peak_bytes["decode"] < 8 * GIB
    # the denoiser's share: its bf16 weights (~260 MB) and 16384 tokens of activations
    weights = sum(p.numel() for p in net.parameters()) * 2
    assert weights < plan.predicted_peak_bytes["denoise"] < weights + plan.batch * 16384 * 768 * 2 * 20
    json.dumps(plan.to_dict())  # goes into every sidecar


def test_tight_budget_shrinks_the_chunk_and_an_impossible_one_is_refused():
    vae = build_vqgan("ct-ds8").eval()
    cost = analytic_decode_cost(vae, (64, 64, 32), axis=0)
    net = DiT(dit_config("dit3d-tiny", input_size=(64, 64, 32), in_channels=8))
    roomy = plan_sampling(net, vae, (8, 64, 64, 32), max_vram="1TB", measure=False)
    tight_bytes = int(cost.bytes(2) + 8 * 64 * 64 * 32 * 4 + 1)
    tight = plan_sampling(net, vae, (8, 64, 64, 32), max_vram=tight_bytes, measure=False)
    assert roomy.decode_chunk == 64 and tight.decode_chunk == 2  # the whole streamed axis when it fits
    with pytest.raises(ValueError, match="too small"):
        plan_sampling(net, vae, (8, 64, 64, 32), max_vram="100MB", measure=False)


def test_decode_halves_the_chunk_then_tiles_on_out_of_memory(monkeypatch):
    from medgen_rt.sampling import decode as dec

    vae = build_vqgan("ct-tiny").eval()
    z = torch.randn(1, 8, 6, 5, 4)
    with torch.no_grad():
        full = vae.decode(z)
    chunks, real = [], dec.streamed_decode

    def flaky(model, latent, axis=None, chunk=2, **kw):
        chunks.append(chunk)
        if chunk > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, latent, axis=axis, chunk=chunk, **kw)

    monkeypatch.setattr(dec, "streamed_decode", flaky)
    messages = []
    out = api.decode_latent(vae, z, chunk=4, log=messages.append)
    assert chunks == [4, 2, 1] and len(messages) == 2 and (out - full).abs().max() < 1e-5

    def always(model, latent, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(dec, "streamed_decode", always)
    real_tiled, cores = dec.tiled_decode, []

    def tiled(decode, latent, geometry, core, **kw):
        cores.append(list(core))
        if max(core) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_tiled(decode, latent, geometry, core, **kw)

    monkeypatch.setattr(dec, "tiled_decode", tiled)
    out = api.decode_latent(vae, z, chunk=1)
    assert cores == [[6, 5, 4], [3, 2, 2]] and (out - full).abs().max() < 1e-5


def test_batched_sampling_equals_one_at_a_time():
    # the continuous latent agrees to rounding; snapped to the codebook, a vector within rounding
    # of two entries may snap differently (a batch of 2 rounds its GEMMs differently), changing
    # only its own patch
    both = medgen_rt.sample("default", n=2, seed=5, steps=4, energy=False, quantize=False)
    second = medgen_rt.sample("default", n=1, seed=6, steps=4, energy=False, quantize=False)
    assert both[0]["metadata"]["plan"]["batch"] == 2 and both[1]["metadata"]["seed"] == 6
    np.testing.assert_allclose(both[1]["volume"], second[0]["volume"], atol=1e-4)
    both = medgen_rt.sample("default", n=2, seed=5, steps=4, energy=False)
    second = medgen_rt.sample("default", n=1, seed=6, steps=4, energy=False)
    assert np.mean(np.abs(both[1]["volume"] - second[0]["volume"]) < 1e-4) > 0.99


def test_torchrun_splits_volumes_and_merges_one_summary(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "medgen_rt.sample", "-n", "3", "--steps", "4", "--seed", "7", "--device", "cpu", "--quiet",
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 3 volume(s)" in proc.stdout and "2 processes" in proc.stdout
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["processes"] == 2
    assert [(v["index"], v["seed"], v["rank"]) for v in summary["volumes"]] == [(0, 7, 0), (1, 8, 1), (2, 9, 0)]
    assert summary["energy"]["kwh"] > 0
    import nibabel as nib

    one = medgen_rt.sample("default", n=3, seed=7, steps=4, energy=False, indices=[1])
    made = nib.load(str(tmp_path / "two" / "sample_001.nii.gz")).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(made, one[0]["volume"], atol=1e-4)


def test_probe_sizes_fit_a_cine_unet():
    """The denoiser probes (analytic on the CPU, measured on CUDA) run a cine U-Net at sizes it
    accepts: axes rounded up to its downsampling, the folded frame axis whole."""
    from medgen_rt.models.unet import UNetDenoiser, unet_config
    from medgen_rt.sampling import planner as P

    net = UNetDenoiser(unet_config("unet-tiny", frames=4)).eval()
    latent = (8, 8, 24, 24, 4)
    small = P._probe_spatial(net, latent, divisor=4, floor=1)
    assert small == (4, 8, 8, 4)
    for spatial in (small, tuple(min(2 * s, full) for s, full in zip(small, latent[1:]))):
        x, t = P.denoiser_inputs(net, 8, spatial, "cpu", torch.float32)
        with torch.no_grad():
            assert net(x, t).shape == x.shape
    cost = P.analytic_denoise_cost(net, latent, torch.float32)
    assert cost.unit == "latent voxel" and cost.per_unit > 0
