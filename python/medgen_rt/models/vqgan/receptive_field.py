"""The decoder's receptive field in latent voxels: the halo a tiled decode needs to be exact."""
from __future__ import annotations

import torch.nn as nn


def conv_layers(module: nn.Module) -> list:
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return [m for m in module.modules() if isinstance(m, convs)]


def decoder_receptive_field(model: nn.Module) -> tuple:
    """Per spatial axis, the radius r in latent voxels that influences one output voxel.

    The output voxels of latent voxel ``c`` (``c*f .. c*f+f-1`` with upsampling ``f``)
    depend only on latent voxels ``c-r .. c+r``; a tiled decoder that gives each tile
    a halo of ``r`` latent voxels reproduces the untiled output exactly.

    Walks the Conv/ConvTranspose layers of ``model.decoder`` (or ``model`` itself) in
    registration order, which for this decoder (and MONAI's) is the forward order;
    residual units count as their conv branch, whose cone contains the identity's.
    Works on a MONAI ``VQVAE`` too. For each output phase the dependency interval is
    propagated backwards exactly through every layer (conv: ``[lo*s-p, hi*s-p+d(k-1)]``;
    transposed conv: ``[ceil((lo+p-d(k-1))/s), floor((hi+p)/s)]``).
    """
    decoder = getattr(model, "decoder", model)
    layers = conv_layers(decoder)
    if not layers:
        raise ValueError("decoder_receptive_field: no convolution layers found")
    n = len(layers[0].kernel_size)
    radii = []
    for a in range(n):
        up, down = 1, 1
        for m in layers:
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                up *= m.stride[a]
            else:
                down *= m.stride[a]
        if up % down:
            raise ValueError(f"decoder_receptive_field: axis {a} has a non-integer upsampling {up}/{down}")
        f = up // down
        radius = 0
        for phase in range(f):
            lo = hi = phase
            for m in reversed(layers):
                k, s, d, p = m.kernel_size[a], m.stride[a], m.dilation[a], m.padding[a]
                if isinstance(m, nn.modules.conv._ConvTransposeNd):
                    lo, hi = -((-(lo + p - d * (k - 1))) // s), (hi + p) // s
                else:
                    lo, hi = lo * s - p, hi * s - p + d * (k - 1)
            radius = max(radius, -lo, hi)  # the phase's own latent voxel is 0
        radii.append(radius)
    return tuple(radii)
