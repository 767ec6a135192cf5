"""PatchGAN discriminator for VQ-GAN training (Pix2PixHD / MONAI ``PatchDiscriminator``).

Layers: ``initial_conv`` (k4 s2, bias, LeakyReLU 0.2, no normalisation), then
``num_layers_d`` convs ``"0" .. "n-1"`` doubling the channels (k4, stride 2, the
last stride 1, no bias, normalisation, LeakyReLU 0.2), then ``final_conv`` (k4 s1 to
``out_channels`` logits, no activation). The published configs use
``channels=64, num_layers_d=3``; CardioDiT and MedLoRD's ds8 use instance norm.

Input (B, in_channels, *S) in the images' range; output of ``forward``: the list
of every layer's output, the last being the patch logits
(B, out_channels, *S/2^num_layers_d - 1 per axis for k4 p1), as MONAI returns it.

Module names match MONAI's ``PatchDiscriminator`` (``initial_conv.conv.weight``,
``0.conv.weight``, ``0.adn.N.weight`` for batch norm, ``final_conv.conv.*``), so a
published discriminator state_dict loads unchanged (without spectral norm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["PatchDiscriminator"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class _ADN(nn.Sequential):
    """Normalisation, dropout, activation as MONAI names them (N, D, A)."""

    def __init__(self, spatial_dims: int, channels: int, norm: Optional[str], dropout: float, negative_slope: float):
        super().__init__()
        if norm == "batch":
            self.add_module("N", _BATCH[spatial_dims](channels))
        elif norm == "instance":
            self.add_module("N", _INSTANCE[spatial_dims](channels))
        if dropout > 0:
            self.add_module("D", nn.Dropout(dropout))
        self.add_module("A", nn.LeakyReLU(negative_slope))


class _ConvLayer(nn.Sequential):
    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride, padding, bias,
                 norm=None, dropout=0.0, negative_slope=0.2, act=True, spectral_norm=False):
        super().__init__()
        conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        if spectral_norm:
            conv = nn.utils.parametrizations.spectral_norm(conv)
        self.add_module("conv", conv)
        if act:
            self.add_module("adn", _ADN(spatial_dims, out_channels, norm, dropout, negative_slope))


def _normal_init(m: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) conv weights and zero biases; norm weights N(1, 0.02) (MONAI's ``normal_init``)."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(w.data, 0.0, std)
        if m.bias is not None:
            nn.init.zeros_(m.bias.data)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
        nn.init.normal_(m.weight.data, 1.0, std)
        nn.init.zeros_(m.bias.data)


class PatchDiscriminator(nn.Sequential):
    """PatchGAN discriminator.

    spatial_dims: 1, 2 or 3; channels: filters of the first layer (doubled per layer);
    norm: "batch" (MONAI's default), "instance" or None; spectral_norm wraps every
    convolution in ``torch.nn.utils.parametrizations.spectral_norm``.
    """

    def __init__(self, spatial_dims: int = 3, channels: int = 64, in_channels: int = 1, out_channels: int = 1,
                 num_layers_d: int = 3, kernel_size: int = 4, norm: Optional[str] = "batch", bias: bool = False,
                 padding: int = 1, dropout: float = 0.0, negative_slope: float = 0.2,
                 last_conv_kernel_size: Optional[int] = None, spectral_norm: bool = False):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        norm = norm.lower() if isinstance(norm, str) else norm
        if norm not in (None, "none", "batch", "instance"):
            raise ValueError(f"norm must be 'batch', 'instance' or None, got {norm!r}")
        norm = None if norm == "none" else norm
        if num_layers_d < 1 or channels < 1:
            raise ValueError(f"num_layers_d and channels must be positive, got {num_layers_d}, {channels}")
        last_k = kernel_size if last_conv_kernel_size is None else last_conv_kernel_size
        self.num_layers_d = num_layers_d
        self.add_module("initial_conv", _ConvLayer(spatial_dims, in_channels, channels, kernel_size, 2, padding,
                                                   True, None, dropout, negative_slope, spectral_norm=spectral_norm))
        cin, cout = channels, channels * 2
        for i in range(num_layers_d):
            stride = 1 if i == num_layers_d - 1 else 2
            self.add_module(str(i), _ConvLayer(spatial_dims, cin, cout, kernel_size, stride, padding, bias, norm,
                                               dropout, negative_slope, spectral_norm=spectral_norm))
            cin, cout = cout, cout * 2
        self.add_module("final_conv", _ConvLayer(spatial_dims, cin, out_channels, last_k, 1, (last_k - 1) // 2,
                                                 True, act=False, spectral_norm=spectral_norm))
        self.apply(_normal_init)

    def forward(self, x: torch.Tensor) -> list:
        """-> [features of every layer ..., logits]; use ``[-1]`` for the patch logits."""
        outs = []
        for layer in self.children():
            x = layer(x)
            outs.append(x)
        return outs

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[-1]
