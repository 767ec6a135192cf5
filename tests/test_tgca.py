"""TGCA: starts as the base model, the gate and scale act on the output, the base
stays frozen, multi-label and single-channel masks, guidance null condition."""
from __future__ import annotations

import pytest
import torch

from medgen_rt.models.dit import DiT, DiTConfig
from medgen_rt.models.tgca import TGCA, one_hot_mask

CFG = DiTConfig(input_size=(16, 16, 16), patch_size=(2, 2, 2), in_channels=4, hidden_size=32, depth=3, num_heads=2)


def _base(seed=0):
    torch.manual_seed(seed)
    model = DiT(CFG)
    with torch.no_grad():  # non-zero adaLN and head so the output depends on the control
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(mask_channels=6):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, 16, generator=g)
    labels = torch.randint(0, 7, (2, 64, 64, 64), generator=g)  # image resolution, 4x the latent
    mask = one_hot_mask(labels, range(1, 7)) if mask_channels == 6 else (labels[:, None] / 6.0)
    return x, torch.tensor([10, 200]), mask


def _open_encoder(tgca):
    with torch.no_grad():
        torch.nn.init.normal_(tgca.condition_embedder.conv_out.weight, std=0.05)


def test_starts_as_the_base_model():
    base = _base()
    tgca = TGCA(base, mask_channels=6).eval()
    x, t, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(tgca(x, t, mask), base(x, t))


def test_gate_value_changes_the_output():
    """In the published block a LayerNorm after gate and scale cancels them; here they act."""
    tgca = TGCA(_base(), mask_channels=6).eval()
    _open_encoder(tgca)
    x, t, mask = _inputs()
    outs = []
    with torch.no_grad():
        for bias in (-3.0, 0.0, 3.0):
            tgca.time_gate.bias.fill_(bias)
            outs.append(tgca(x, t, mask))
        null = tgca(x, t, None)
    assert not torch.allclose(outs[0], outs[1], atol=1e-6) and not torch.allclose(outs[1], outs[2], atol=1e-6)
    # a nearly closed gate leaves nearly the base output
    assert (outs[0] - null).abs().max() < (outs[2] - null).abs().max()
    with torch.no_grad():
        tgca.time_gate.bias.fill_(0.0)
        tgca.adapter_scales.mul_(2.0)
        assert not torch.allclose(tgca(x, t, mask), outs[1], atol=1e-6)


def test_gate_is_per_sample_and_depends_on_timestep():
    tgca = TGCA(_base(), mask_channels=1)
    with torch.no_grad():
        tgca.time_gate.weight.normal_()
    t_emb = tgca.base.t_embedder(torch.tensor([0, 299]))
    gate = torch.sigmoid(tgca.time_gate(t_emb))
    assert gate.shape == (2, 1) and not torch.allclose(gate[0], gate[1])


def test_base_frozen_and_adapter_trainable():
    tgca = TGCA(_base(), mask_channels=1, finetune_last_n_blocks=1).train()
    _open_encoder(tgca)
    x, t, mask = _inputs(mask_channels=1)
    tgca(x, t, mask).square().mean().backward()
    assert all(p.grad is None for p in tgca.base.blocks[0].parameters())
    assert all(p.grad is not None for p in tgca.base.blocks[-1].parameters())
    assert tgca.condition_embedder.conv_out.weight.grad is not None
    assert tgca.adapter_scales.grad is not None and tgca.time_gate.weight.grad is not None


def test_inject_layers_and_errors():
    assert TGCA(_base(), 1, inject_layers=2).inject_layers == [1, 2]
    assert TGCA(_base(), 1, inject_layers=[0, 2]).inject_layers == [0, 2]
    with pytest.raises(ValueError, match="inject_layers"):
        TGCA(_base(), 1, inject_layers=[5])
    tgca = TGCA(_base(), 6)
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="mask must be"):
        tgca(x, t, torch.zeros(2, 1, 64, 64, 64))
    four_d = DiT(DiTConfig(input_size=(2, 8, 8, 4), patch_size=(1, 2, 2, 2), in_channels=4, hidden_size=32,
                           depth=1, num_heads=2))
    with pytest.raises(ValueError, match="DiT3D"):
        TGCA(four_d, 1)


def test_condition_dropout_zeroes_whole_samples():
    tgca = TGCA(_base(), 1, condition_dropout_prob=1.0).train()
    _open_encoder(tgca)
    x, t, mask = _inputs(mask_channels=1)
    with torch.no_grad():
        dropped = tgca(x, t, mask)
        tgca.eval()
        null = tgca(x, t, torch.zeros_like(mask))
    torch.testing.assert_close(dropped, null)
