"""Tiled and streamed decoding equal the full-volume decode (fp32, max abs
difference < 1e-4): tiles when the halo covers the decoder's receptive field (a
halo one voxel short does not), streaming along any axis with any chunk, for the
ct-ds8 structure and along time for the cine decoder. bench/decode.py checks the
same at 512x512x256."""
from __future__ import annotations

import pytest
import torch

from medgen_rt.models.vqgan import build_vqgan
from medgen_rt.runtime.tiling import plan_tiles
from medgen_rt.sampling.decode import (DecoderGeometry, decoder_geometry, stream_network, streamed_decode,
                                       tiled_decode)


def _randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return model.eval()


def test_plan_covers_the_volume_once():
    tiles = plan_tiles((10, 7, 5), core=(4, 4, 5), halo=(2, 1, 0), factor=(2, 2, 4))
    assert len(tiles) == 3 * 2 * 1
    cover = torch.zeros(20, 14, 20)
    for t in tiles:
        cover[t.output_slices()] += 1
        for (la, lb), (ca, cb) in zip(t.latent, t.core):
            assert la <= ca and cb <= lb
    assert torch.all(cover == 1)


def test_ct_ds8_decoder_tiled_equals_full():
    # the published ct-ds8 decoder (channels 512/256/128), random weights, 8 tiles
    model = _randomised(build_vqgan("ct-ds8"))
    geometry = decoder_geometry(model)
    assert geometry.factor == (8, 8, 8) and geometry.halo == (9, 9, 9)
    latent = torch.randn(1, 8, 8, 8, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.decode(latent)
    tiled = tiled_decode(model.decode, latent, geometry, core=(4, 4, 2))
    assert len(plan_tiles((8, 8, 4), (4, 4, 2), geometry.halo, geometry.factor)) == 8
    assert tiled.shape == full.shape == (1, 1, 64, 64, 32)
    assert (tiled - full).abs().max().item() < 1e-4


def test_ct_structure_larger_latent_and_short_halo():
    # same layer structure as ct-ds8 with fewer channels, on a latent where the halo is interior
    model = _randomised(build_vqgan("ct-ds8", channels=(8, 8, 16), num_res_channels=(8, 8, 16)))
    geometry = decoder_geometry(model)
    latent = torch.randn(1, 8, 24, 24, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.decode(latent)
    tiled = tiled_decode(model.decode, latent, geometry, core=(8, 8, 6))  # 3 x 3 x 2 = 18 tiles
    exact = (tiled - full).abs().max().item()
    assert exact < 1e-4
    # one latent voxel short of the receptive field: the outermost kernel taps are lost
    # (small with these weights, but far above float rounding)
    short = DecoderGeometry(geometry.factor, tuple(h - 1 for h in geometry.halo), geometry.output_axis,
                            geometry.out_channels)
    assert (tiled_decode(model.decode, latent, short, core=(8, 8, 6)) - full).abs().max().item() > 10 * exact


def test_cine_decoder_tiled_along_time_and_space_equals_full():
    model = _randomised(build_vqgan("cmr-tiny"))
    geometry = decoder_geometry(model)
    assert geometry.output_axis == (2, 0, 1, 3) and geometry.halo[0] == 0
    latent = torch.randn(1, 8, 3, 16, 16, 12, generator=torch.Generator().manual_seed(3))  # (Z, X', Y', T')
    with torch.no_grad():
        full = model.decode(latent)  # (1, 1, X, Y, Z, T)
    tiled = tiled_decode(model.decode, latent, geometry, core=(2, 8, 8, 4))  # tiles along slices, space, time
    assert tiled.shape == full.shape == (1, 1, 64, 64, 3, 48)
    assert (tiled - full).abs().max().item() < 1e-4


def test_mismatched_latent_rank_is_rejected():
    model = build_vqgan("ct-tiny")
    with pytest.raises(ValueError, match="spatial axes"):
        tiled_decode(model.decode, torch.zeros(1, 8, 4, 4), decoder_geometry(model), core=(2, 2))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ct_ds8_decoder_streamed_equals_full(axis):
    model = _randomised(build_vqgan("ct-ds8"))
    latent = torch.randn(1, 8, 7, 6, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model.decode(latent)
    for chunk in (1, 3):
        streamed = streamed_decode(model, latent, axis=axis, chunk=chunk)
        assert streamed.shape == full.shape == (1, 1, 56, 48, 40)
        assert (streamed - full).abs().max().item() < 1e-4


def test_streaming_holds_a_bounded_slab_and_reports_progress():
    # a deeper latent than the receptive field: every step emits about one chunk's worth of
    # output planes, including while the pipeline's lag drains at the end (no burst)
    model = _randomised(build_vqgan("ct-ds8", channels=(8, 8, 16), num_res_channels=(8, 8, 16)))
    latent = torch.randn(2, 8, 40, 5, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model.decode(latent)
    sizes = []
    stream_network(model.decoder, latent, 2, 2, lambda start, planes: sizes.append((start, planes.shape[2])))
    assert sum(n for _, n in sizes) == 320 and [s for s, _ in sizes] == [sum(n for _, n in sizes[:i])
                                                                      for i in range(len(sizes))]
    assert max(n for _, n in sizes) <= 2 * 8 + 1
    seen = []
    out = streamed_decode(model, latent, chunk=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (320, 320) and (out - full).abs().max().item() < 1e-4


def test_cine_decoder_streamed_along_time_and_space_equals_full():
    model = _randomised(build_vqgan("cmr-tiny"))
    latent = torch.randn(2, 8, 3, 10, 9, 12, generator=torch.Generator().manual_seed(6))  # (Z, X', Y', T')
    with torch.no_grad():
        full = model.decode(latent)
    for axis, per_pass in ((2, None), (0, 2), (1, 5)):  # T', X' (2 slices a pass), Y'
        streamed = streamed_decode(model, latent, axis=axis, chunk=2, slices_per_pass=per_pass)
        assert streamed.shape == full.shape == (2, 1, 40, 36, 3, 48)
        assert (streamed - full).abs().max().item() < 1e-4


def test_streaming_needs_eval_mode_and_a_fitting_latent():
    model = build_vqgan("ct-tiny")
    with pytest.raises(ValueError, match="eval mode"):
        streamed_decode(model.train(), torch.zeros(1, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        streamed_decode(model.eval(), torch.zeros(1, 8, 4, 4))


def test_streamed_encode_equals_encode():
    from medgen_rt.sampling.decode import streamed_encode

    model = _randomised(build_vqgan("ct-ds8", channels=(8, 8, 16), num_res_channels=(8, 8, 16)))
    x = torch.randn(1, 1, 48, 40, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model.encode(x)
    for axis, chunk in ((0, 8), (2, 5)):
        assert (streamed_encode(model, x, axis=axis, chunk=chunk) - full).abs().max().item() < 1e-4
    cine = _randomised(build_vqgan("cmr-tiny"))
    x = torch.randn(1, 1, 32, 24, 3, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = cine.encode(x)
    assert (streamed_encode(cine, x, chunk=4) - full).abs().max().item() < 1e-4
