"""MedLoRD baseline: MONAI's DiffusionModelUNet as the denoiser and, for mask
conditioning, MONAI's ControlNet or MedLoRD's lightweight one (models/controlnet.py),
behind the same call signature as the DiTs so one trainer and one sampler serve
all three published systems.

    UNetDenoiser(cfg)(x, t)                 x (B, C, D, H, W) latents, t (B,)
    ControlledUNet(base, ...)(x, t, mask)   mask (B, K, D*f, H*f, W*f), f = mask_downsample

Published MedLoRD setting (configs/diffusion/medlord.yaml): 3D, 8 latent channels,
2 residual blocks per level, channels 64/128/256/512, attention on the two
deepest levels with 32-channel heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
from monai.networks.nets import ControlNet, DiffusionModelUNet

from medgen_rt.models.conditioning import drop_whole_masks


@dataclass
class UNetConfig:
    spatial_dims: int = 3
    in_channels: int = 8
    out_channels: int = 8
    num_res_blocks: int = 2
    channels: tuple = (64, 128, 256, 512)
    attention_levels: tuple = (False, False, True, True)
    num_head_channels: tuple = (0, 0, 32, 32)
    norm_num_groups: int = 32
    # False: no SiLU before the output convolution, as MedLoRD's U-Net (it comments it out)
    out_silu: bool = True
    # > 0: cine latents (B, C, Z, H, W, T) with T == frames latent frames, folded into the channels of a
    # 3D U-Net over (Z, H, W). MONAI has no 4D convolution; the few latent frames (4 for a 16-frame cycle)
    # are mixed by every convolution, which is what makes the heart move coherently.
    frames: int = 0

    def __post_init__(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 0:
            raise ValueError(f"U-Net frames must be an integer >= 0 (0: no frame axis), got {self.frames!r}")
        self.channels = tuple(self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.num_head_channels = tuple(self.num_head_channels)

    @property
    def folded_channels(self) -> int:
        """Channels the MONAI U-Net sees: the latent channels times the folded frames."""
        return self.in_channels * max(self.frames, 1)

    def monai_kwargs(self) -> dict:
        return dict(spatial_dims=self.spatial_dims, in_channels=self.folded_channels, num_res_blocks=self.num_res_blocks,
                    channels=self.channels, attention_levels=self.attention_levels,
                    num_head_channels=self.num_head_channels, norm_num_groups=self.norm_num_groups,
                    # torch's scaled_dot_product_attention (flash / memory-efficient kernels) instead of MONAI's
                    # explicit matrix, as the published configs set it: the same parameters and results (to
                    # float rounding), but O(tokens) memory; the explicit softmax(QK^T) of the 16384-token level
                    # at MedLoRD's 128x128x64 latent alone is 8 heads x 16384^2 = 4 GiB in bf16, twice over
                    use_flash_attention=True)

    def to_dict(self) -> dict:
        return asdict(self)


UNET_PRESETS = {
    "medlord": UNetConfig(),
    "unet-tiny": UNetConfig(channels=(16, 32, 32), attention_levels=(False, False, True),
                            num_head_channels=(0, 0, 16), norm_num_groups=8),
}


def unet_config(name: str, **overrides) -> UNetConfig:
    try:
        return replace(UNET_PRESETS[name.lower()], **overrides)
    except KeyError:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {', '.join(sorted(UNET_PRESETS))}") from None


class UNetDenoiser(nn.Module):
    """MONAI DiffusionModelUNet with the DiT call signature: forward(x, t, y=None)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.unet = DiffusionModelUNet(out_channels=config.out_channels * max(config.frames, 1),
                                       **config.monai_kwargs())
        if not config.out_silu:
            self.unet.out[1] = nn.Identity()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def check_input(self, x: torch.Tensor) -> None:
        f, cfg = self.downsample_factor, self.config
        axes = cfg.spatial_dims + (1 if cfg.frames else 0)
        if x.dim() != 2 + axes or x.shape[1] != cfg.in_channels or (cfg.frames and x.shape[-1] != cfg.frames):
            frames = f" x {cfg.frames} frames" if cfg.frames else ""
            raise ValueError(f"U-Net expects x of shape (B, {cfg.in_channels}, {cfg.spatial_dims} spatial axes"
                             f"{frames}), got {tuple(x.shape)}")
        spatial = x.shape[2:2 + cfg.spatial_dims]
        if any(s % f for s in spatial):
            raise ValueError(f"U-Net input spatial size {tuple(spatial)} must be divisible by {f}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                down_residuals=None, mid_residual=None) -> torch.Tensor:
        self.check_input(x)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        frames = self.config.frames
        if frames:  # (B, C, Z, H, W, T) -> (B, C*T, Z, H, W)
            b, c = x.shape[:2]
            x = x.movedim(-1, 2).reshape(b, c * frames, *x.shape[2:-1])
        out = self.unet(x, t, down_block_additional_residuals=down_residuals,
                        mid_block_additional_residual=mid_residual)
        if frames:
            out = out.reshape(b, -1, frames, *out.shape[2:]).movedim(2, -1)
        return out


class ControlledUNet(nn.Module):
    """Frozen base U-Net + a trainable ControlNet fed by a mask.

    variant: "monai" (MONAI's ControlNet, a full copy of the U-Net encoder that
    starts from its weights) or "lightweight" (MedLoRD's, models/controlnet.py:
    r x the U-Net's widths, a mask stem with initial_stride, zero 1x1
    projections; trained from scratch). r, initial_stride, transformer_attention,
    num_head_channels and norm_num_groups configure the lightweight one only
    (defaults: the published controlnet_new.yaml, heads and groups the U-Net's).

    mask_downsample: how many times larger the mask is than the latent per axis
    (4 for a ds4 autoencoder with masks at image resolution); the ControlNet's
    conditioning embedder downsamples by that much. Whole-mask dropout per sample
    (condition_dropout_prob) trains the all-zero null condition used for guidance.
    ``options`` holds every setting resolved, for model.json.
    """

    VARIANTS = ("monai", "lightweight")

    def __init__(self, base: UNetDenoiser, mask_channels: int, mask_downsample: int = 4,
                 embedding_channels: Optional[tuple] = None, condition_dropout_prob: float = 0.1,
                 conditioning_scale: float = 1.0, variant: str = "monai", r: Optional[float] = None,
                 initial_stride: Optional[int] = None, transformer_attention: Optional[bool] = None,
                 num_head_channels: Optional[tuple] = None, norm_num_groups: Optional[int] = None):
        super().__init__()
        if base.config.frames:
            raise ValueError("a ControlNet needs a U-Net over 3D latents; this base folds "
                             f"{base.config.frames} cine frames into its channels (config.frames)")
        if variant not in self.VARIANTS:
            raise ValueError(f"ControlNet variant {variant!r}: choose one of {', '.join(self.VARIANTS)}")
        lightweight_only = dict(r=r, initial_stride=initial_stride, transformer_attention=transformer_attention,
                                num_head_channels=num_head_channels, norm_num_groups=norm_num_groups)
        steps = int(round(math.log2(mask_downsample)))
        if mask_downsample < 1 or 2 ** steps != mask_downsample:
            raise ValueError(f"mask_downsample must be a power of two, got {mask_downsample}")
        self.base = base
        self.mask_channels = mask_channels
        self.mask_downsample = mask_downsample
        self.condition_dropout_prob = condition_dropout_prob
        self.conditioning_scale = conditioning_scale
        self.variant = variant
        if variant == "monai":
            given = [k for k, v in lightweight_only.items() if v is not None]
            if given:
                raise ValueError(f"ControlNet {', '.join(given)}: settings of variant 'lightweight', not 'monai'")
            if embedding_channels is None:
                embedding_channels = tuple(16 * 2 ** i for i in range(steps + 1))
            if len(embedding_channels) != steps + 1:
                raise ValueError(f"embedding_channels needs {steps + 1} entries for a {mask_downsample}x mask")
            self.controlnet = ControlNet(conditioning_embedding_in_channels=mask_channels,
                                         conditioning_embedding_num_channels=tuple(embedding_channels),
                                         **base.config.monai_kwargs())
            # Start from the base U-Net's encoder weights, as ControlNet training does.
            self.controlnet.load_state_dict(base.unet.state_dict(), strict=False)
            extra = {}
        else:
            from medgen_rt.models import controlnet as light

            cfg = base.config
            initial_stride = light.PUBLISHED_INITIAL_STRIDE if initial_stride is None else int(initial_stride)
            if embedding_channels is None:
                embedding_channels = light.default_embedding_channels(mask_downsample, initial_stride)
            factor = light.embedding_downsample(embedding_channels, initial_stride)
            if factor != mask_downsample:
                raise ValueError(f"ControlNet mask stem: initial_stride {initial_stride} and {len(embedding_channels)} "
                                 f"embedding_channels shrink masks {factor}x, mask_downsample is {mask_downsample}")
            extra = dict(r=float(light.PUBLISHED_R if r is None else r), initial_stride=initial_stride,
                         transformer_attention=True if transformer_attention is None else bool(transformer_attention),
                         num_head_channels=[int(h) for h in (num_head_channels or cfg.num_head_channels)],
                         norm_num_groups=int(norm_num_groups or cfg.norm_num_groups))
            self.controlnet = light.LightweightControlNet(
                cfg.spatial_dims, cfg.in_channels, cfg.channels, cfg.num_res_blocks, cfg.attention_levels,
                mask_channels=mask_channels, embedding_channels=tuple(embedding_channels), **extra)
        self.options = {"variant": variant, "mask_channels": mask_channels, "mask_downsample": mask_downsample,
                        "embedding_channels": [int(c) for c in embedding_channels],
                        "condition_dropout_prob": condition_dropout_prob, "conditioning_scale": conditioning_scale,
                        **extra}
        for p in self.base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor],
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            return self.base(x, t)
        want = (x.shape[0], self.mask_channels, *(s * self.mask_downsample for s in x.shape[2:]))
        if tuple(mask.shape) != want:
            raise ValueError(f"ControlNet mask must be {want} (latent size x {self.mask_downsample}), "
                             f"got {tuple(mask.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.training:
            mask = drop_whole_masks(mask, self.condition_dropout_prob)
        down, mid = self.controlnet(x, t, mask.to(x.dtype), conditioning_scale=self.conditioning_scale)
        return self.base(x, t, down_residuals=down, mid_residual=mid)
