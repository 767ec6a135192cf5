"""DiT3D / DiT4D: parameter counts against the published ones, and the forward
pass against an independent re-computation from the published formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medgen_rt.models.dit import DiT, DiTConfig, count_parameters, dit_config


def _count(name):
    with torch.device("meta"):
        return count_parameters(DiT(dit_config(name)))


# VolDiT's published counts include its positional table, an nn.Parameter (frozen)
# sized for its 2048-token grid (a 256x256x128 CT -> ct-ds8 latent 32x32x16, patch 2).
# Ours is a fixed buffer recomputed per grid, so the table is added here to compare.
@pytest.mark.parametrize("name,hidden,published", [
    ("dit3d-xs/2", 384, 17.2e6), ("dit3d-s/2", 384, 33.2e6), ("dit3d-b/2", 768, 131e6), ("dit3d-l/2", 1152, 580e6)])
def test_dit3d_parameter_counts_match_published(name, hidden, published):
    assert _count(name) + 2048 * hidden == pytest.approx(published, rel=0.02)


# CardioDiT's published counts exclude the frozen positional table.
@pytest.mark.parametrize("name,published", [("dit4d-s", 87e6), ("dit4d-b", 130e6), ("dit4d-l", 172e6)])
def test_dit4d_parameter_counts_match_published(name, published):
    assert _count(name) == pytest.approx(published, rel=0.02)


def test_cmr_token_count_is_6144():
    cfg = dit_config("dit4d-b")
    assert math.prod(s // p for s, p in zip(cfg.input_size, cfg.patch_size)) == 6144


# ---- independent re-computation ----------------------------------------------------------

def _np_sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], 1)


def _np_pos_embed(hidden, grid):
    mesh = [m.reshape(-1) for m in np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")]
    if len(grid) == 3:  # VolDiT: pad to a multiple of 6, a third per axis, truncate
        padded = hidden + (6 - hidden % 6) % 6
        return np.concatenate([_np_sincos_1d(padded // 3, m) for m in mesh], 1)[:, :hidden]
    return np.concatenate([_np_sincos_1d(hidden // 4, m) for m in mesh], 1)  # CardioDiT: a quarter per axis


def _randomise(model, seed=0):
    """Non-zero values everywhere (the zero-initialised adaLN/output would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p.shape[-1], 1))) + 0.01)
    return model


def _published_forward(sd, cfg, x, t):
    """DiT forward written out from the published VolDiT/CardioDiT formulas, sharing
    no code with medgen_rt: conv / einops patching, adaLN-Zero blocks, unpatchify."""
    B, C = x.shape[:2]
    p = cfg.patch_size
    h = cfg.hidden_size
    nd = len(p)
    grid = [s // q for s, q in zip(x.shape[2:], p)]
    if nd == 3:  # Conv3d(kernel=stride=p) with the Linear weight viewed as (h, C, p, p, p)
        w = sd["x_embedder.proj.weight"].reshape(h, C, *p)
        tok = F.conv3d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    else:  # rearrange "b c (z pz) (h ph) (w pw) (t pt) -> b (z h w t) (c pz ph pw pt)"
        xs = x.reshape(B, C, grid[0], p[0], grid[1], p[1], grid[2], p[2], grid[3], p[3])
        xs = xs.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9).reshape(B, math.prod(grid), -1)
        tok = xs @ sd["x_embedder.proj.weight"].T + sd["x_embedder.proj.bias"]
    tok = tok + torch.from_numpy(_np_pos_embed(h, grid)).float()

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = F.silu(tf @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"])
    c = c @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]

    def lin(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    def modulate(v, shift, scale):
        return F.layer_norm(v, (h,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    heads, hd = cfg.num_heads, h // cfg.num_heads
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        mod = lin(F.silu(c), pre + "adaLN_modulation.1")
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = mod.chunk(6, dim=1)
        a = modulate(tok, s_msa, sc_msa)
        qkv = lin(a, pre + "attn.qkv").reshape(B, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # over tokens
        o = (att @ v).transpose(1, 2).reshape(B, -1, h)
        tok = tok + g_msa[:, None] * lin(o, pre + "attn.proj")
        m = modulate(tok, s_mlp, sc_mlp)
        m = lin(F.gelu(lin(m, pre + "mlp.fc1")), pre + "mlp.fc2")
        tok = tok + g_mlp[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulate(tok, shift, scale), "final_layer.linear")
    Cout = cfg.out_channels
    out = out.reshape(B, *grid, *p, Cout)
    if nd == 3:
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
    else:
        out = out.permute(0, 9, 1, 5, 2, 6, 3, 7, 4, 8)
    return out.reshape(B, Cout, *[g * q for g, q in zip(grid, p)])


@pytest.mark.parametrize("cfg,shape", [
    (DiTConfig(input_size=(8, 4, 6), patch_size=(2, 2, 2), in_channels=3, hidden_size=64, depth=2, num_heads=4),
     (2, 3, 8, 4, 6)),
    (DiTConfig(input_size=(8, 8, 4), patch_size=(4, 4, 4), in_channels=2, hidden_size=30, depth=1, num_heads=3),
     (1, 2, 8, 8, 4)),  # hidden not a multiple of 6: the padded-and-truncated 3D table
    (DiTConfig(input_size=(3, 8, 8, 4), patch_size=(1, 4, 4, 2), in_channels=8, hidden_size=64, depth=2,
               num_heads=2), (2, 8, 3, 8, 8, 4)),
])
@pytest.mark.parametrize("backend", ["reference", None])
def test_forward_matches_published_formulas(cfg, shape, backend, monkeypatch):
    if backend:
        monkeypatch.setenv("MEDGEN_BACKEND", backend)
    model = _randomise(DiT(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([7, 250][: shape[0]])
    with torch.no_grad():
        ours = model(x, t)
        expected = _published_forward(model.state_dict(), cfg, x, t)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_adaln_modulate_zero_initialisation_outputs_zero():
    model = DiT(dit_config("dit3d-tiny"))
    out = model(torch.randn(2, 8, 16, 16, 8), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_rope_and_qknorm_change_the_output_and_keep_shapes():
    base = dict(input_size=(2, 8, 8, 4), patch_size=(1, 2, 2, 2), in_channels=4, hidden_size=32, depth=1,
                num_heads=2)
    torch.manual_seed(0)
    plain = _randomise(DiT(DiTConfig(**base)))
    roped = DiT(DiTConfig(**base, rope=True))
    roped.load_state_dict(plain.state_dict())
    x, t = torch.randn(1, 4, 2, 8, 8, 4), torch.tensor([5])
    assert not torch.allclose(plain(x, t), roped(x, t))
    qk = _randomise(DiT(DiTConfig(**base, qk_norm=True)))
    assert qk(x, t).shape == x.shape
    assert "blocks.0.attn.q_norm.weight" in qk.state_dict()


def test_rope_scores_depend_on_relative_position_only():
    from medgen_rt.models.embeddings import rope_tables
    from medgen_rt.ops.attention import apply_rope

    cos, sin = rope_tables(16, (12,))  # 1D grid: positions 0..11
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    qs = apply_rope(q.expand(12, 16), cos, sin)
    ks = apply_rope(k.expand(12, 16), cos, sin)
    scores = qs @ ks.T  # scores[i, j] = f(i - j)
    assert torch.allclose(scores[3, 1], scores[9, 7], atol=1e-5)
    assert torch.allclose(scores[0, 5], scores[4, 9], atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    cfg = dict(input_size=(8, 8, 4), patch_size=(2, 2, 2), in_channels=2, hidden_size=32, depth=2, num_heads=2)
    a = _randomise(DiT(DiTConfig(**cfg))).train()
    b = DiT(DiTConfig(**cfg, gradient_checkpointing=True)).train()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 2, 8, 8, 4), torch.tensor([3, 9])
    a(x, t).square().sum().backward()
    b(x, t).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_class_conditioning_uses_a_null_class():
    cfg = DiTConfig(input_size=(4, 4, 4), patch_size=(2, 2, 2), in_channels=2, hidden_size=32, depth=1,
                    num_heads=2, num_classes=3, class_dropout_prob=0.1)
    model = _randomise(DiT(cfg)).eval()
    x, t = torch.randn(2, 2, 4, 4, 4), torch.tensor([1, 2])
    uncond = model(x, t)
    explicit_null = model(x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(uncond, explicit_null)
    assert not torch.allclose(model(x, t, torch.tensor([0, 1])), uncond)


def test_bad_inputs_are_rejected():
    model = DiT(dit_config("dit3d-tiny"))
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.randn(1, 4, 16, 16, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(torch.randn(1, 8, 15, 16, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("dit3d-huge")
