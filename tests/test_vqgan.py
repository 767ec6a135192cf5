"""VQ-GAN: the vq_nearest op, the EMA quantizer, encoder/decoder shapes, structural
equality with MONAI's VQVAE (the independent reference the checkpoint conversion
relies on), the decoder's receptive field, the discriminator and the losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medgen_rt import ops
from medgen_rt.models import losses as L
from medgen_rt.models.discriminator import PatchDiscriminator
from medgen_rt.models.vqgan import (
    PRESETS, CineVQGAN, EMACodebook, VQGAN3D, VQGANConfig, build_vqgan, decoder_receptive_field,
    load_monai_vqvae_state_dict, monai_vqvae_kwargs, vqgan_config,
)
from medgen_rt.ops.vq_nearest import vq_nearest_reference

monai_nets = pytest.importorskip("monai.networks.nets")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- vq_nearest -------------------------------------------------------------------------

def test_vq_nearest_matches_cdist_argmin():
    g = _gen(1)
    z = torch.randn(300, 8, generator=g)
    cb = torch.randn(37, 8, generator=g)
    idx, q = ops.vq_nearest(z, cb)
    expected = torch.cdist(z.double(), cb.double()).argmin(dim=1)
    assert idx.dtype == torch.int64 and idx.shape == (300,)
    assert torch.equal(idx, expected)
    assert q.dtype == torch.float32 and torch.equal(q, cb[expected])
    # 16-bit z: distances still in float32, output in z's dtype
    idx16, q16 = ops.vq_nearest(z.to(torch.bfloat16), cb)
    assert q16.dtype == torch.bfloat16
    assert torch.equal(idx16, torch.cdist(z.to(torch.bfloat16).double(), cb.double()).argmin(1))


def test_vq_nearest_chunking_is_invisible_and_bounded(monkeypatch):
    g = _gen(2)
    z = torch.randn(5003, 8, generator=g)
    cb = torch.randn(300, 8, generator=g)
    cb[150] = cb[1]  # a tie across codebook tiles of 100: the lower index must win
    z[7] = cb[1]
    sizes = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    full_idx, full_q = vq_nearest_reference(z, cb, chunk_elements=1 << 30)  # one block
    assert max(sizes) == 5003 * 300
    sizes.clear()
    idx, q = ops.vq_nearest(z, cb, chunk_elements=1000, backend="reference")  # 3 rows x 300 per block
    assert max(sizes) <= 1000
    assert torch.equal(idx, full_idx) and torch.equal(q, full_q)
    sizes.clear()
    idx_t, _ = ops.vq_nearest(z[:400], cb, chunk_elements=100, backend="reference")  # K > budget: tiled too
    assert max(sizes) <= 100
    assert torch.equal(idx_t, full_idx[:400])
    assert full_idx[7] == 1 and idx_t[7] == 1
    assert torch.equal(full_idx, torch.cdist(z.double(), cb.double()).argmin(1))


def test_vq_nearest_argument_errors():
    z, cb = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="D=8 but the codebook has D=6"):
        ops.vq_nearest(z, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ops.vq_nearest(torch.randn(2, 4, 8), cb)
    with pytest.raises(TypeError, match="float32"):
        ops.vq_nearest(z.long(), cb)
    with pytest.raises(ValueError, match="empty"):
        ops.vq_nearest(z, torch.randn(0, 8))
    with pytest.raises(ValueError, match="chunk_elements"):
        ops.vq_nearest(z, cb, chunk_elements=0)


# ---- the quantizer ------------------------------------------------------------------------

def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(0)
    q = EMACodebook(16, 4).eval()
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    w = torch.randn(2, 4, 3, 5)
    zq, loss, idx = q(z)
    assert idx.shape == (2, 3, 5)
    codes = q.embedding.weight[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(zq.detach(), codes, rtol=0, atol=1e-6)  # z + (e - z): e up to rounding
    # reconstruction part: d/dz of a function of z_q equals its d/dz_q (straight-through)
    (zq * w).sum().backward()
    assert torch.equal(z.grad, w)
    # commitment loss = 0.25 * mse(sg[e], z), gradient only into z
    assert torch.allclose(loss, 0.25 * ((codes - z.detach()) ** 2).mean(), rtol=1e-6)
    z.grad = None
    q(z)[1].backward()
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - codes) / z.numel(), rtol=1e-5, atol=1e-8)


def _tiny_codebook(decay=0.9):
    q = EMACodebook(3, 2, decay=decay, epsilon=1e-5)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        q.ema_w.copy_(q.embedding.weight)
    return q


# four vectors as a (B=1, D=2, 4, 1) latent: two nearest to code 0, two to code 1, none to code 2
_Z = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [9.0, 1.0], [11.0, -1.0]]).t().reshape(1, 2, 4, 1)


def _hand_update():
    """The EMA step worked out by hand: counts (2, 2, 0), sums ((0, 1), (20, 0), (0, 0))."""
    ema_n = [0.1 * 2, 0.1 * 2, 0.0]
    ema_w = [[0.9 * 0 + 0.1 * 0, 0.9 * 0 + 0.1 * 1], [0.9 * 10 + 0.1 * 20, 0.0], [0.0, 0.9 * 10]]
    n = sum(ema_n)
    smoothed = [(c + 1e-5) / (n + 3 * 1e-5) * n for c in ema_n]
    emb = [[w / s for w in row] for row, s in zip(ema_w, smoothed)]
    return torch.tensor(ema_n), torch.tensor(ema_w), torch.tensor(emb)


def test_ema_update_matches_hand_computation():
    q = _tiny_codebook().train()
    zq, _, idx = q(_Z)
    assert idx.flatten().tolist() == [0, 0, 1, 1]
    # outputs use the codebook from before the update
    assert torch.equal(zq[0, :, :, 0].t(), torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]]))
    ema_n, ema_w, emb = _hand_update()
    torch.testing.assert_close(q.ema_cluster_size, ema_n, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.ema_w, ema_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.embedding.weight, emb, rtol=1e-5, atol=1e-5)
    assert abs(q.perplexity.item() - 2.0) < 1e-4  # two codes used equally


def test_dead_code_restart_option():
    q = _tiny_codebook()
    q.dead_code_threshold = 0.15  # CardioDiT's option: code 2 (count 0 < 0.15) restarts at a batch vector
    q.train()(_Z)
    ema_n, ema_w, _ = _hand_update()
    torch.testing.assert_close(q.ema_cluster_size, torch.tensor([0.2, 0.2, 0.15]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.ema_w[:2], ema_w[:2], rtol=1e-6, atol=1e-6)
    restarted = q.ema_w[2] / 0.15
    batch = _Z[0, :, :, 0].t()
    assert any(torch.allclose(restarted, v, atol=1e-5) for v in batch), restarted
    n = 0.55
    smoothed = (0.15 + 1e-5) / (n + 3e-5) * n
    torch.testing.assert_close(q.embedding.weight[2], q.ema_w[2] / smoothed, rtol=1e-5, atol=1e-6)


def test_no_ema_update_in_eval_mode_or_when_disabled():
    q = _tiny_codebook().eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(_Z)
    q.train()
    q(_Z, update=False)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_statistics_are_all_reduced_under_ddp(tmp_path, monkeypatch):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        calls = []

        def fake_all_reduce(t, op=None, **kwargs):  # as if a second replica saw the same batch
            calls.append(tuple(t.shape))
            t.mul_(2)

        monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
        q = _tiny_codebook().train()
        q(_Z)
    finally:
        dist.destroy_process_group()
    assert sorted(calls) == [(3,), (3, 2)]
    # doubled counts and sums
    ema_n = torch.tensor([0.4, 0.4, 0.0])
    ema_w = torch.tensor([[0.0, 0.2], [0.9 * 10 + 0.1 * 40, 0.0], [0.0, 9.0]])
    n = ema_n.sum()
    emb = ema_w / ((ema_n + 1e-5) / (n + 3e-5) * n)[:, None]
    torch.testing.assert_close(q.embedding.weight, emb, rtol=1e-5, atol=1e-5)


# ---- shapes --------------------------------------------------------------------------------

def test_ct_tiny_shapes_and_roundtrip():
    torch.manual_seed(0)
    m = build_vqgan("ct-tiny").eval()
    x = torch.randn(2, 1, 32, 16, 24)
    z = m.encode(x)
    assert z.shape == (2, 8, 8, 4, 6) == m.latent_shape(x.shape)
    zq = m.encode_to_latent(x)
    assert zq.shape == z.shape
    # latents are codebook vectors
    flat = zq.movedim(1, -1).reshape(-1, 8)
    assert torch.equal(ops.vq_nearest(flat, m.quantizer.quantizer.embedding.weight)[1], flat)
    out = m.decode_latent(zq)
    assert out.shape == x.shape == m.output_shape(z.shape)
    recon, vq_loss, extras = m(x)
    assert recon.shape == x.shape and vq_loss.dim() == 0 and extras["indices"].shape == (2, 8, 4, 6)
    torch.testing.assert_close(recon, out)
    with pytest.raises(ValueError, match="multiples"):
        m(torch.randn(1, 1, 30, 16, 16))


def test_cine_layout_shapes_and_per_slice_equivalence():
    torch.manual_seed(0)
    m = build_vqgan("cmr-tiny").eval()
    assert isinstance(m, CineVQGAN)
    x = torch.randn(2, 1, 16, 20, 3, 8)  # (B, C, X, Y, Z, T)
    z = m.encode(x)
    assert z.shape == (2, 8, 3, 4, 5, 2) == m.latent_shape(x.shape)  # (B, D, Z, X', Y', T')
    # slice k of the latent is the 3D network applied to the (X, Y, T) slice k
    for k in range(3):
        torch.testing.assert_close(z[:, :, k], VQGAN3D.encode(m, x[:, :, :, :, k, :]), rtol=1e-5, atol=1e-6)
    out = m.decode(z)
    assert out.shape == x.shape == m.output_shape(z.shape)
    torch.testing.assert_close(out[:, :, :, :, 1, :], VQGAN3D.decode(m, z[:, :, 1]), rtol=1e-5, atol=1e-6)
    # chunked slice passes give the same result
    m.max_slices_per_pass = 4
    torch.testing.assert_close(m.decode(z), out, rtol=1e-5, atol=1e-6)
    recon, _, extras = m(x)
    assert recon.shape == x.shape and extras["indices"].shape == (2, 3, 4, 5, 2)
    # a single 2D+t slice goes through the 3D network
    assert m.encode(x[:, :, :, :, 0, :]).shape == (2, 8, 4, 5, 2)


def test_published_sizes_on_the_meta_device():
    with torch.device("meta"):
        ct = VQGAN3D(PRESETS["ct-ds8"])
        cmr = CineVQGAN(PRESETS["cmr"])
        z = ct.encode(torch.empty(1, 1, 512, 512, 256))
        assert tuple(z.shape) == (1, 8, 64, 64, 32)
        assert tuple(ct.decode(z).shape) == (1, 1, 512, 512, 256)
        zs = cmr.encode(torch.empty(1, 1, 256, 256, 32))  # one (X, Y, T) slice
        assert tuple(zs.shape) == (1, 8, 64, 64, 8)
        zc = cmr.encode(torch.empty(1, 1, 256, 256, 6, 32))
        assert tuple(zc.shape) == (1, 8, 6, 64, 64, 8)
        assert tuple(cmr.decode(zc).shape) == (1, 1, 256, 256, 6, 32)
    assert ct.latent_shape((1, 1, 512, 512, 256)) == (1, 8, 64, 64, 32)
    assert cmr.latent_shape((1, 1, 256, 256, 6, 32)) == (1, 8, 6, 64, 64, 8)
    assert VQGAN3D(vqgan_config("ct-tiny")).latent_shape((1, 1, 64, 64, 32)) == (1, 8, 16, 16, 8)


def test_asymmetric_levels_as_in_cardiodit():
    # CardioDiT's 8x (H, W) / 4x T config: the third level keeps T
    cfg = VQGANConfig(channels=(8, 16, 16), num_res_layers=1, num_embeddings=32,
                      downsample_parameters=[[2, 4, 1, 1], [2, 4, 1, 1], [[2, 2, 1], [4, 4, 1], 1, [1, 1, 0]]],
                      upsample_parameters=[[[2, 2, 1], [4, 4, 1], 1, [1, 1, 0], [0, 0, 0]], [2, 4, 1, 1, 0],
                                           [2, 4, 1, 1, 0]])
    m = VQGAN3D(cfg).eval()
    assert cfg.downsample_factor == (8, 8, 4)
    x = torch.randn(1, 1, 32, 24, 8)
    z = m.encode(x)
    assert z.shape == (1, 8, 4, 3, 2) == m.latent_shape(x.shape)
    assert m.decode(z).shape == x.shape


def _count_params(cfg: VQGANConfig) -> int:
    """Independent count: conv/transposed conv = c_in*c_out*k^3 + c_out; codebook K*D."""
    def conv(cin, cout, k):
        return cin * cout * k ** 3 + cout

    R = cfg.num_res_layers
    enc, prev = 0, cfg.in_channels
    for c, r in zip(cfg.channels, cfg.num_res_channels):
        enc += conv(prev, c, 4) + R * (conv(c, r, 3) + conv(r, c, 3))
        prev = c
    enc += conv(prev, cfg.embedding_dim, 3)
    chans, res = list(cfg.channels[::-1]), list(cfg.num_res_channels[::-1])
    dec = conv(cfg.embedding_dim, chans[0], 3)
    for i, (c, r) in enumerate(zip(chans, res)):
        dec += R * (conv(c, r, 3) + conv(r, c, 3))
        dec += conv(c, chans[i + 1] if i + 1 < len(chans) else cfg.out_channels, 4)
    return enc + dec + cfg.num_embeddings * cfg.embedding_dim


def test_parameter_counts():
    # ct-ds8: 95,568,649 parameters (47,767,944 encoder + 47,767,937 decoder + 32,768 codebook);
    # cmr (= ct-ds4 architecture, codebook 16384x8): 22,150,921 (131,072 in the codebook).
    expected = {"ct-ds8": 95_568_649, "cmr": 22_150_921, "ct-ds4": 22_150_921, "ct-tiny": 221_993}
    for name, n in expected.items():
        cfg = vqgan_config(name)
        assert _count_params(cfg) == n, name
        with torch.device("meta"):
            m = build_vqgan(name)
        assert sum(p.numel() for p in m.parameters()) == n, name
        # the codebook is learned by EMA, not by the optimiser
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == n - cfg.num_embeddings * 8


def test_config_from_published_yaml_params():
    # VolDiT configs/stage1/vqgan_ds8.yaml, stage1.params
    published = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_channels": [128, 256, 512],
                 "num_res_channels": [128, 256, 512], "num_res_layers": 2,
                 "downsample_parameters": [[2, 4, 1, 1]] * 3, "upsample_parameters": [[2, 4, 1, 1, 0]] * 3,
                 "num_embeddings": 4096, "embedding_dim": 8}
    assert VQGANConfig.from_dict(published) == PRESETS["ct-ds8"]
    assert VQGANConfig.from_dict(PRESETS["cmr"].to_dict()) == PRESETS["cmr"]
    # the dict a run folder records rebuilds the same kind of network
    for preset, kind in (("cmr-tiny", CineVQGAN), ("ct-tiny", VQGAN3D)):
        info = build_vqgan(preset).config_dict()
        rebuilt = build_vqgan(info)
        assert type(rebuilt) is kind and rebuilt.config == PRESETS[preset]
    assert type(build_vqgan({"preset": "cmr-tiny", "num_embeddings": 64})) is CineVQGAN
    with pytest.raises(ValueError, match="unknown"):
        VQGANConfig.from_dict({**published, "num_chanels": 3})
    with pytest.raises(ValueError, match="one entry per level"):
        VQGANConfig(channels=(8, 16), downsample_parameters=((2, 4, 1, 1),) * 3)


# ---- MONAI structural equality -------------------------------------------------------------

def _monai_pair(cfg, seed=0):
    torch.manual_seed(seed)
    ref = monai_nets.VQVAE(**monai_vqvae_kwargs(cfg))
    with torch.no_grad():  # a codebook spread like trained latents, so that many codes are used
        ref.quantizer.quantizer.embedding.weight.mul_(0.05)
        ref.quantizer.quantizer.ema_w.copy_(ref.quantizer.quantizer.embedding.weight)
    ours = VQGAN3D(cfg)
    return ref, ours


@pytest.mark.parametrize("preset", ["ct-tiny", "cmr-tiny"])
def test_monai_vqvae_state_dict_loads_and_outputs_match(preset):
    cfg = vqgan_config(preset)
    ref, ours = _monai_pair(cfg)
    sd = ref.state_dict()
    assert set(sd) == set(ours.state_dict())  # identical key names
    # as a DDP checkpoint container
    missing, unexpected = load_monai_vqvae_state_dict(ours, {"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert not missing and not unexpected
    ref.eval(), ours.eval()
    x = torch.randn(2, 1, 16, 24, 8, generator=_gen(3))
    with torch.no_grad():
        z_ref, z = ref.encode(x), ours.encode(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
        idx_ref = ref.index_quantize(x)
        zq, _, idx = ours.quantize(z)
        assert torch.equal(idx, idx_ref.reshape(idx.shape))
        assert idx.unique().numel() > 1
        torch.testing.assert_close(ours.decode(zq), ref.decode(ref.quantize(z_ref)[0]), rtol=1e-5, atol=1e-6)
        recon_ref, loss_ref = ref(x)
        recon, loss, _ = ours(x)
        torch.testing.assert_close(recon, recon_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.decode_latent(z), ref.decode_stage_2_outputs(z_ref), rtol=1e-5, atol=1e-6)
    # one training step: the EMA codebook update agrees with MONAI's EMAQuantizer
    ref.train(), ours.train()
    with torch.no_grad():
        ref(x), ours(x)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_monai_loader_errors_and_missing_ema_buffers():
    cfg = vqgan_config("ct-tiny")
    ref, ours = _monai_pair(cfg)
    sd = {k: v for k, v in ref.state_dict().items() if "ema_" not in k}
    load_monai_vqvae_state_dict(ours, {"model": sd})
    assert torch.equal(ours.quantizer.quantizer.ema_w, ref.quantizer.quantizer.embedding.weight)
    wrong = VQGAN3D(vqgan_config("ct-tiny", num_embeddings=128))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_monai_vqvae_state_dict(wrong, ref.state_dict())


# ---- receptive field ---------------------------------------------------------------------------

def test_decoder_receptive_field_empirically():
    torch.manual_seed(0)
    m = build_vqgan("ct-tiny").eval()
    r = m.receptive_field()
    assert r == decoder_receptive_field(monai_nets.VQVAE(**monai_vqvae_kwargs(m.config)))
    n, c = 13, 6
    z = torch.randn(1, 8, n, n, n)
    z2 = z.clone()
    z2[:, :, c, c, c] += 3.0
    with torch.no_grad():
        out, out2 = m.decode(z), m.decode(z2)
        changed = ((out2 - out).abs() > 1e-6 * out.abs().max())[0, 0]
        reach = [int((torch.nonzero(changed)[:, a] // 4 - c).abs().max()) for a in range(3)]
        assert reach == list(r)  # tight: exactly as far as predicted, never further
        # tiled decoding: a tile with a halo of r latent voxels equals the untiled output
        a = c
        part = m.decode(z[:, :, a - r[0]:])
        torch.testing.assert_close(part[:, :, 4 * r[0]:], out[:, :, 4 * a:], rtol=1e-5, atol=1e-6)
        short = m.decode(z[:, :, a - r[0] + 1:])
        assert not torch.allclose(short[:, :, 4 * (r[0] - 1):], out[:, :, 4 * a:], rtol=1e-5, atol=1e-6)
    with torch.device("meta"):
        assert build_vqgan("ct-ds8").receptive_field() == (9, 9, 9)


# ---- discriminator and losses ---------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_patch_discriminator_matches_monai(norm):
    torch.manual_seed(0)
    ref = monai_nets.PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=3,
                                        norm=norm.upper()).eval()
    d = PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=3, norm=norm).eval()
    d.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 32, 32, 24, generator=_gen(4))
    out, out_ref = d(x), ref(x)
    assert out[-1].shape == (2, 1, 2, 2, 1)
    assert len(out) == len(out_ref) == 5
    torch.testing.assert_close(out[-1], out_ref[-1], rtol=1e-5, atol=1e-6)
    sn = PatchDiscriminator(spatial_dims=3, channels=8, num_layers_d=3, spectral_norm=True)
    assert sn.logits(x).shape == (2, 1, 2, 2, 1)


def test_least_squares_adversarial_losses():
    g = _gen(5)
    real, fake = torch.randn(2, 1, 3, 3, 3, generator=g), torch.randn(2, 1, 3, 3, 3, generator=g)
    assert torch.allclose(L.ls_generator_loss(fake, None), ((fake - 1) ** 2).mean())
    d_formula = 0.5 * (((real - 1) ** 2).mean() + (fake ** 2).mean())
    assert torch.allclose(L.ls_discriminator_loss(real, fake, None), d_formula)
    act = lambda t: torch.where(t > 0, t, 0.05 * t)  # noqa: E731
    assert torch.allclose(L.ls_generator_loss([fake], 0.05), ((act(fake) - 1) ** 2).mean())
    # MONAI's PatchAdversarialLoss (the published criterion) agrees
    from monai.losses import PatchAdversarialLoss

    adv = PatchAdversarialLoss(criterion="least_squares")
    torch.testing.assert_close(L.ls_generator_loss(fake), adv(fake, target_is_real=True, for_discriminator=False))
    d_ref = 0.5 * (adv(real, target_is_real=True, for_discriminator=True)
                   + adv(fake, target_is_real=False, for_discriminator=True))
    torch.testing.assert_close(L.ls_discriminator_loss(real, fake), d_ref)


class _Raises(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the discriminator must not run during the warm-up")


def test_adversarial_warmup_and_combined_loss():
    assert L.adversarial_weight(9, 10, 0.1) == 0.0 and L.adversarial_weight(10, 10, 0.1) == 0.1
    g = _gen(6)
    x, r = torch.randn(1, 1, 16, 16, 16, generator=g), torch.randn(1, 1, 16, 16, 16, generator=g)
    vq = torch.tensor(0.3)
    loss = L.VQGANLoss(adv_weight=0.1, adv_start=10, spectral_weight=0.5)
    before = loss.generator_loss(x, r, vq, _Raises(), step=9)
    assert before["adv_weight"] == 0 and before["adv"] == 0
    assert not loss.adversarial_active(9) and loss.discriminator_loss(x, r, _Raises(), step=9)["loss"] == 0
    from monai.losses import JukeboxLoss

    spectral = JukeboxLoss(spatial_dims=3)(r, x)
    torch.testing.assert_close(before["spectral"], spectral)
    torch.testing.assert_close(before["loss"], (r - x).abs().mean() + 0.3 + 0.5 * spectral)
    disc = PatchDiscriminator(spatial_dims=3, channels=4, num_layers_d=2, norm="instance")
    after = loss.generator_loss(x, r, vq, disc, step=10)
    assert after["adv_weight"] == pytest.approx(0.1)
    torch.testing.assert_close(after["adv"], L.ls_generator_loss(disc(r)))
    torch.testing.assert_close(after["loss"], before["loss"] + 0.1 * after["adv"])
    d = loss.discriminator_loss(x, r, disc, step=10)
    torch.testing.assert_close(d["loss"], L.ls_discriminator_loss(disc(x), disc(r)))
    with pytest.raises(ValueError, match="perceptual"):
        L.VQGANLoss(perceptual_weight=0.1)


def test_perceptual_loss_needs_local_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.PerceptualLoss(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="never downloads"):
        L.PerceptualLoss(None)
    torch.manual_seed(0)
    net = L.MedicalNetResNet(10)
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    sd["module.conv_seg.0.weight"] = torch.zeros(1)  # MedicalNet's head is ignored
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": sd}, path)
    p = L.PerceptualLoss(path).train()
    assert not p.net.training
    x = torch.randn(2, 1, 16, 16, 16, generator=_gen(7), requires_grad=True)
    y = torch.randn(2, 1, 16, 16, 16, generator=_gen(8))
    assert p(y, y).item() < 1e-6
    v = p(x, y)
    assert v.item() > 0
    v.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="MedicalNet"):
        L.PerceptualLoss(tmp_path / "other.pth")


# ---- training sanity ------------------------------------------------------------------------------

def test_short_training_reduces_l1():
    from medgen_rt.data.phantoms import make_ct_phantom
    from medgen_rt.data.preprocess import ct_to_unit

    # two thoracic phantoms over the default field of view, coarsely sampled (16^3)
    vols = [ct_to_unit(make_ct_phantom(seed=s, shape=(16, 16, 16), spacing=(22.4, 22.4, 16.0)).image)
            for s in range(2)]
    x = torch.from_numpy(np.stack(vols)[:, None]).float()
    torch.manual_seed(0)
    m = build_vqgan("ct-tiny").train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    loss_fn = L.VQGANLoss(adv_weight=0.0)
    first = None
    for _ in range(30):
        recon, vq_loss, _ = m(x)
        terms = loss_fn(x, recon, vq_loss)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = terms["l1"].item() if first is None else first
    with torch.no_grad():
        final = F.l1_loss(m.eval()(x)[0], x).item()
    assert math.isfinite(final) and final < 0.7 * first, (first, final)
