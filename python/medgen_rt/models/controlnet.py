"""MedLoRD's lightweight ControlNet (Cardio-AI/medlord, src/models/controlnet.py),
written here from its published description; ControlledUNet (models/unet.py)
runs it beside a frozen U-Net with ``variant: lightweight``.

Where it differs from MONAI's ControlNet (a full-width copy of the U-Net encoder):

- its encoder is r times as wide as the U-Net: level i has max(1, int(r * C_i))
  channels (published config controlnet_new.yaml: r = 0.5);
- the mask stem downsamples at once (``initial_stride``, published 2), then each
  further entry of ``embedding_channels`` adds a 3x3 refinement and a stride-2
  3x3 convolution, SiLU after each; a zero-initialised 3x3 convolution maps the
  result to the encoder's first width, added to conv_in(x);
- every encoder feature (conv_in output, each residual block, each downsampler)
  and the middle block's output go through a bare zero-initialised 1x1
  convolution to the U-Net's width at that level: the residuals the U-Net adds;
- it is trained from scratch: nothing is copied from the U-Net (widths differ).

The published config sets ``with_conditioning: true`` without a context, so its
attention levels are spatial transformers whose "cross"-attention attends to the
features themselves (``transformer_attention``); with false they are plain
self-attention blocks whose output projection is created but never applied.

Parameter names follow the published ones (conv_in, time_embed,
controlnet_cond_embedding.{conv_in,blocks,conv_out}, down_blocks, middle_block,
controlnet_down_blocks, controlnet_mid_block); the attention blocks are MONAI
core's, whose names medgen convert maps (convert/medlord.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.diffusion_model_unet import get_down_block, get_mid_block, get_timestep_embedding

PUBLISHED_R = 0.5
PUBLISHED_INITIAL_STRIDE = 2
PUBLISHED_EMBEDDING_CHANNELS = (32, 64)  # with initial_stride 2: 4x, MedLoRD's ct-ds4 latent


def _conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> Convolution:
    return Convolution(spatial_dims=dims, in_channels=cin, out_channels=cout, strides=stride, kernel_size=kernel,
                       padding=kernel // 2, conv_only=True)


def _zero(conv: nn.Module) -> nn.Module:
    for p in conv.parameters():
        nn.init.zeros_(p)
    return conv


def control_widths(unet_channels: Sequence[int], r: float) -> list:
    """The published encoder widths: max(1, int(r * C)) per U-Net level."""
    return [max(1, int(c * r)) for c in unet_channels]


def embedding_downsample(embedding_channels: Sequence[int], initial_stride: int) -> int:
    """How much the mask stem shrinks a mask per axis."""
    return initial_stride * 2 ** (len(embedding_channels) - 1)


def default_embedding_channels(mask_downsample: int, initial_stride: int) -> tuple:
    """The published (32, 64) for 4x with stride 2; one doubling per further stride-2 step."""
    steps = math.log2(mask_downsample / initial_stride)
    if steps < 0 or steps != int(steps):
        raise ValueError(f"initial_stride {initial_stride} does not divide mask_downsample {mask_downsample} "
                         "into stride-2 steps")
    return tuple(32 * 2 ** i for i in range(int(steps) + 1))


class ConditioningEmbedding(nn.Module):
    """Mask (B, K, *S) -> features (B, out_channels, *S / (initial_stride * 2^(len(channels)-1)))."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 initial_stride: int):
        super().__init__()
        self.conv_in = _conv(spatial_dims, in_channels, channels[0], stride=initial_stride)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(channels[:-1], channels[1:]):
            self.blocks.append(_conv(spatial_dims, cin, cin))  # refine at this resolution
            self.blocks.append(_conv(spatial_dims, cin, cout, stride=2))  # then halve it
        # zero at the start: the ControlNet adds nothing to conv_in(x) before training
        self.conv_out = _zero(_conv(spatial_dims, channels[-1], out_channels).conv)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(mask))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class LightweightControlNet(nn.Module):
    """forward(x, t, mask, conditioning_scale) -> (down residuals, mid residual) in the U-Net's widths.

    unet_channels, num_res_blocks, attention_levels: the U-Net's (the residuals must line up with
    its skip connections); num_head_channels and norm_num_groups apply to this encoder's widths.
    """

    def __init__(self, spatial_dims: int, in_channels: int, unet_channels: Sequence[int], num_res_blocks: int,
                 attention_levels: Sequence[bool], num_head_channels: Sequence[int], norm_num_groups: int,
                 mask_channels: int, embedding_channels: Sequence[int], r: float = PUBLISHED_R,
                 initial_stride: int = PUBLISHED_INITIAL_STRIDE, transformer_attention: bool = True):
        super().__init__()
        widths = control_widths(unet_channels, r)
        bad = [w for w in widths if w % norm_num_groups]
        if bad:
            raise ValueError(f"ControlNet r {r} gives widths {widths}, not all multiples of norm_num_groups "
                             f"{norm_num_groups}; choose another r or norm_num_groups")
        for w, attn, head in zip(widths, attention_levels, num_head_channels):
            if attn and (head <= 0 or w % head):
                raise ValueError(f"ControlNet width {w} (r {r}) is not a multiple of num_head_channels {head}")
        self.widths = widths
        dims = spatial_dims
        temb = widths[0] * 4
        self.conv_in = _conv(dims, in_channels, widths[0])
        self.time_embed = nn.Sequential(nn.Linear(widths[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.controlnet_cond_embedding = ConditioningEmbedding(dims, mask_channels, widths[0], embedding_channels,
                                                               initial_stride)
        # self-attention blocks: the published forward never applies their output projection, so
        # MONAI's is left out (include_fc=False); the transformer path applies both of its own
        common = dict(spatial_dims=dims, temb_channels=temb, norm_num_groups=norm_num_groups, norm_eps=1e-6,
                      transformer_num_layers=1, cross_attention_dim=None, include_fc=transformer_attention,
                      use_flash_attention=True)  # O(tokens) attention memory, as the U-Net's (models/unet.py)
        self.down_blocks = nn.ModuleList()
        conv1x1 = nn.Conv3d if dims == 3 else nn.Conv2d
        self.controlnet_down_blocks = nn.ModuleList([_zero(conv1x1(widths[0], unet_channels[0], 1))])
        cin = widths[0]
        last = len(widths) - 1
        for i, (w, attn, head) in enumerate(zip(widths, attention_levels, num_head_channels)):
            self.down_blocks.append(get_down_block(
                in_channels=cin, out_channels=w, num_res_blocks=num_res_blocks, add_downsample=i < last,
                resblock_updown=False, with_attn=attn and not transformer_attention,
                with_cross_attn=attn and transformer_attention, num_head_channels=head, **common))
            for _ in range(num_res_blocks + (i < last)):  # one per residual block, one for the downsampler
                self.controlnet_down_blocks.append(_zero(conv1x1(w, unet_channels[i], 1)))
            cin = w
        self.middle_block = get_mid_block(in_channels=widths[-1], with_conditioning=transformer_attention,
                                          num_head_channels=num_head_channels[-1], **common)
        self.controlnet_mid_block = _zero(conv1x1(widths[-1], unet_channels[-1], 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                conditioning_scale: float = 1.0) -> tuple:
        emb = self.time_embed(get_timestep_embedding(t, self.widths[0]).to(x.dtype))
        h = self.conv_in(x) + self.controlnet_cond_embedding(mask)
        features = [h]
        for block in self.down_blocks:
            h, residuals = block(hidden_states=h, temb=emb, context=None)
            features.extend(residuals)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        down = [proj(f) * conditioning_scale for proj, f in zip(self.controlnet_down_blocks, features)]
        return down, self.controlnet_mid_block(h) * conditioning_scale
