"""Encoder and decoder of the VQ-GAN and their blocks, named like MONAI's ``VQVAE`` modules."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medgen_rt.models.vqgan.config import _OUTPUT_ACTS, VQGANConfig, _per_axis

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ConvBlock(nn.Module):
    """A convolution (or transposed convolution) named ``conv`` like MONAI's
    ``Convolution``, then dropout and ReLU when ``act`` (MONAI's "DA" ordering)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 dilation=1, padding=None, output_padding=0, transposed: bool = False, act: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        n = spatial_dims
        k = _per_axis(kernel_size, n, "kernel_size")
        d = _per_axis(dilation, n, "dilation")
        p = tuple((ki - 1) // 2 * di for ki, di in zip(k, d)) if padding is None else _per_axis(padding, n, "padding")
        s = _per_axis(stride, n, "stride")
        if transposed:
            self.conv = _CONV_T[n](in_channels, out_channels, k, stride=s, padding=p,
                                   output_padding=_per_axis(output_padding, n, "output_padding"), dilation=d)
        else:
            self.conv = _CONV[n](in_channels, out_channels, k, stride=s, padding=p, dilation=d)
        self.dropout = nn.Dropout(dropout) if act and dropout > 0 else None
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return F.relu(x, inplace=True) if self.act else x


class ResidualUnit(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))``, both convs k3 p1 (MONAI's ``VQVAEResidualUnit``)."""

    def __init__(self, spatial_dims: int, channels: int, res_channels: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = ConvBlock(spatial_dims, channels, res_channels, 3, act=True, dropout=dropout)
        self.conv2 = ConvBlock(spatial_dims, res_channels, channels, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)), inplace=True)


class Encoder(nn.Module):
    """(B, in_channels, *S) -> (B, embedding_dim, *S / downsample_factor)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = cfg.spatial_dims
        blocks = []
        prev = cfg.in_channels
        for i, (c, rc) in enumerate(zip(cfg.channels, cfg.num_res_channels)):
            stride, kernel, dilation, padding = cfg.downsample_parameters[i]
            blocks.append(ConvBlock(n, prev, c, kernel, stride, dilation, padding, act=True,
                                    dropout=0.0 if i == 0 else cfg.dropout))
            blocks.extend(ResidualUnit(n, c, rc, cfg.dropout) for _ in range(cfg.num_res_layers))
            prev = c
        blocks.append(ConvBlock(n, prev, cfg.embedding_dim, 3, act=False))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """(B, embedding_dim, *L) -> (B, out_channels, *L * upsampling)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = cfg.spatial_dims
        chans = list(reversed(cfg.channels))
        res = list(reversed(cfg.num_res_channels))
        blocks = [ConvBlock(n, cfg.embedding_dim, chans[0], 3, act=False)]
        last = len(chans) - 1
        for i, (c, rc) in enumerate(zip(chans, res)):
            blocks.extend(ResidualUnit(n, c, rc, cfg.dropout) for _ in range(cfg.num_res_layers))
            stride, kernel, dilation, padding, out_pad = cfg.upsample_parameters[i]
            blocks.append(ConvBlock(n, c, cfg.out_channels if i == last else chans[i + 1], kernel, stride, dilation,
                                    padding, out_pad, transposed=True, act=i != last,
                                    dropout=0.0 if i == last else cfg.dropout))
        if cfg.output_act is not None:
            blocks.append(_OUTPUT_ACTS[cfg.output_act]())
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
