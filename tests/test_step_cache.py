"""Step caching (models.step_cache): threshold 0 is the uncached sampler bit for bit (DiT3D,
DiT4D, guided TGCA); a positive threshold skips blocks and counts them; the halves of a CFG
batch keep their own residuals; the sidecar records the counts; ONNX and U-Nets refuse it."""
from __future__ import annotations

import json

import pytest
import torch

from medgen_rt import diffusion as D
from medgen_rt.models.dit import DiT, DiTConfig, dit_config
from medgen_rt.models.step_cache import StepCache, cached_dit
from medgen_rt.models.tgca import TGCA
from medgen_rt.sampling.api import resolve_model
from cli_run import medgen


def _dit(name_or_cfg, seed=0, scale=0.02):
    torch.manual_seed(seed)
    net = DiT(dit_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg)
    with torch.no_grad():  # non-zero adaLN and head: zero-initialised blocks would be the identity
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net.eval()


def _sample(net, shape, cache=None, steps=8, **kw):
    fn = D.network_fn(net, "cond" in kw)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if cache is None:
        return D.sample(fn, shape, sampler="euler", steps=steps, noise=noise, **kw)
    with cache.attach(net):
        return D.sample(fn, shape, sampler="euler", steps=steps, noise=noise, **kw)


@pytest.mark.parametrize("name", ["dit3d-tiny", "dit4d-tiny"])
def test_threshold_zero_is_the_uncached_sampler_exactly(name):
    net = _dit(name)
    shape = (2, 8) + net.config.input_size
    cache = StepCache(0)
    cached = _sample(net, shape, cache)
    assert torch.equal(cached, _sample(net, shape))
    assert cache.stats() == {"threshold": 0.0, "block_evaluations": 8 * net.config.depth, "blocks_skipped": 0,
                             "skipped_fraction": 0.0}
    assert net.step_cache is None  # detached after the sample


def test_a_positive_threshold_skips_slowly_changing_blocks_and_counts_them():
    # a random-init DiT predicts small velocities: the latent, and so every block's input, moves slowly
    net = _dit("dit3d-tiny")
    shape = (1, 8) + net.config.input_size
    uncached = _sample(net, shape, steps=10)
    cache = StepCache(0.05)
    cached = _sample(net, shape, cache, steps=10)
    s = cache.stats()
    assert s["block_evaluations"] + s["blocks_skipped"] == 10 * net.config.depth
    assert s["blocks_skipped"] > 0 and s["block_evaluations"] >= net.config.depth  # the first step runs all
    assert s["skipped_fraction"] == round(s["blocks_skipped"] / 20, 4)
    assert (cached - uncached).abs().max() < 1e-2 * uncached.abs().max()
    # a new sample starts empty: the same call gives the same counts and the same result
    again = StepCache(0.05)
    assert torch.equal(_sample(net, shape, again, steps=10), cached) and again.stats() == s


def test_cfg_halves_keep_their_own_residuals():
    net = _dit(DiTConfig(input_size=(4, 4, 4), patch_size=(2, 2, 2), in_channels=4, hidden_size=32, depth=1,
                         num_heads=2), scale=0.2)
    block, cache = net.blocks[0], StepCache(0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, generator=g)  # rows: conditional, null
    c = torch.randn(2, 32, generator=g)
    control = torch.cat([torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32)])  # only the cond row
    with torch.no_grad():
        first = block(x, c, None, control, cache, 0)
        residual = first - x
        assert not torch.allclose(residual[0], residual[1])
        # a small move of both rows: skipped, each row with its own residual
        x2 = x + 0.01 * torch.randn(x.shape, generator=g)
        assert torch.equal(block(x2, c, None, control, cache, 0), x2 + residual) and cache.skipped == 1
        # only the null row moves far: the whole batch is recomputed, exactly as without a cache
        x3 = x.clone()
        x3[1] = 5 * torch.randn(8, 32, generator=g)
        assert torch.equal(block(x3, c, None, control, cache, 0), block(x3, c, None, control))
    assert cache.stats()["blocks_skipped"] == 1 and cache.stats()["block_evaluations"] == 2


def test_guided_tgca_threshold_zero_is_exact_and_a_threshold_skips():
    base = _dit(DiTConfig(input_size=(8, 8, 8), patch_size=(2, 2, 2), in_channels=4, hidden_size=32, depth=3,
                          num_heads=2))
    tgca = TGCA(base, mask_channels=2).eval()
    with torch.no_grad():  # an open adapter, so the condition reaches the blocks
        torch.nn.init.normal_(tgca.condition_embedder.conv_out.weight, std=0.05)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(2, 2, 32, 32, 32, generator=g) > 0.5).float()
    kw = dict(cond=mask, null_cond=torch.zeros_like(mask), guidance_scale=3.0)
    fn = D.network_fn(tgca, True)
    noise = torch.randn((2, 4, 8, 8, 8), generator=g)

    def run(cache):
        if cache is None:
            return D.sample(fn, noise.shape, sampler="euler", steps=6, noise=noise, **kw)
        with cache.attach(tgca):
            return D.sample(fn, noise.shape, sampler="euler", steps=6, noise=noise, **kw)

    plain = run(None)
    assert torch.equal(run(StepCache(0)), plain)
    cache = StepCache(0.2)
    cached = run(cache)
    assert cache.skipped > 0 and cache.evaluated + cache.skipped == 6 * 3
    assert (cached - plain).abs().max() < 0.05 * plain.abs().max()


def test_only_dit_models_and_sane_thresholds():
    with pytest.raises(ValueError, match="--cache"):
        cached_dit(torch.nn.Linear(2, 2))
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="--cache"):
            StepCache(bad)


def _medgen(*args, cwd):
    return medgen(*args, cwd=cwd, timeout=300)


def test_sidecar_records_the_cache_and_onnx_refuses_it(tmp_path):
    # the embedded CT teacher (a TGCA on a DiT; the cine default is a U-Net, which has no blocks to cache),
    # unconditional through the null map
    proc = _medgen("sample", "--model", "ct", "--teacher", "--unconditional", "--steps", "4", "--cache", "0.3", "--no-energy", "--quiet",
                   "--out", "s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    side = json.loads((tmp_path / "s" / "sample_000.json").read_text())
    cache = side["cache"]
    depth = json.loads((resolve_model("ct", teacher=True)[0] / "model.json").read_text())["base"]["config"]["depth"]
    assert cache["threshold"] == 0.3 and cache["block_evaluations"] + cache["blocks_skipped"] == 4 * depth
    assert cache["block_evaluations"] >= depth and cache["blocks_skipped"] > 0
    proc = _medgen("sample", "--engine", "onnx", "--model", str(tmp_path), "--cache", "0.1", "--no-energy",
                   "--out", "o", cwd=tmp_path)
    assert proc.returncode == 2 and "--cache" in proc.stderr and "torch" in proc.stderr
