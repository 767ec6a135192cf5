"""MedLoRD baseline: MONAI's U-Net and ControlNet behind the DiT call signature."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from medgen_rt.models.unet import ControlledUNet, UNetDenoiser, unet_config


def _base():
    """A U-Net with no zero-initialised layers left (MONAI zeroes its output conv)."""
    torch.manual_seed(0)
    base = UNetDenoiser(unet_config("unet-tiny"))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return base


def test_denoiser_is_monais_unet():
    cfg = unet_config("unet-tiny")
    model = _base().eval()
    # MONAI's explicit attention matrix as the reference: ours runs scaled_dot_product_attention
    ref = DiffusionModelUNet(out_channels=cfg.out_channels, **{**cfg.monai_kwargs(), "use_flash_attention": False})
    ref.eval()
    ref.load_state_dict(model.unet.state_dict())
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 250])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref(x, t))


def test_published_medlord_channels():
    cfg = unet_config("medlord")
    assert cfg.channels == (64, 128, 256, 512) and cfg.attention_levels == (False, False, True, True)
    assert cfg.num_head_channels == (0, 0, 32, 32) and cfg.num_res_blocks == 2


def test_controlnet_starts_neutral_and_then_conditions():
    base = _base().eval()
    ctrl = ControlledUNet(base, mask_channels=6, mask_downsample=2).eval()
    x, t = torch.randn(1, 8, 8, 8, 8), torch.tensor([100])
    mask = (torch.rand(1, 6, 16, 16, 16) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(ctrl(x, t, mask), base(x, t))  # zero convs: no effect yet
        for p in ctrl.controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        assert not torch.allclose(ctrl(x, t, mask), base(x, t))
    with pytest.raises(ValueError, match="mask must be"):
        ctrl(x, t, torch.zeros(1, 6, 8, 8, 8))


def test_only_controlnet_trains():
    base = _base()
    ctrl = ControlledUNet(base, mask_channels=1, mask_downsample=2).train()
    x, t, mask = torch.randn(1, 8, 8, 8, 8), torch.tensor([5]), torch.rand(1, 1, 16, 16, 16)
    ctrl(x, t, mask).square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctrl.controlnet.parameters())


def test_cine_unet_folds_frames_into_channels():
    """frames > 0: a cine latent (B, C, Z, H, W, T) is MONAI's 3D U-Net over (Z, H, W) on channels
    c * T + t (built here frame by frame with torch.cat, not with the model's reshape), and back."""
    torch.manual_seed(0)
    cfg = unet_config("unet-tiny", frames=3)
    model = UNetDenoiser(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert cfg.folded_channels == 24
    x, t = torch.randn(2, 8, 4, 8, 8, 3), torch.tensor([7, 400])
    folded = torch.cat([x[:, c:c + 1, ..., f] for c in range(8) for f in range(3)], dim=1)
    with torch.no_grad():
        ref = model.unet(folded, t)
        out = model(x, t)
    assert out.shape == x.shape
    for c in range(8):
        for f in range(3):
            torch.testing.assert_close(out[:, c, ..., f], ref[:, c * 3 + f])
    with pytest.raises(ValueError, match="3 frames"):
        model(torch.randn(1, 8, 4, 8, 8, 4), t[:1])
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 8, 6, 8, 8, 3), t[:1])
    with pytest.raises(ValueError, match="folds 3 cine frames"):
        ControlledUNet(model, mask_channels=2)
    for bad in (-1, True, "auto"):
        with pytest.raises(ValueError, match="frames must be an integer"):
            unet_config("unet-tiny", frames=bad)
