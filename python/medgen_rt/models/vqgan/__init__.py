"""VQ-GAN autoencoders of the latent diffusion models: a 3D one for CT
(:class:`VQGAN3D`) and a spatiotemporal one for cine MRI (:class:`CineVQGAN`).

Architecture (the MONAI ``VQVAE`` kind used by VolDiT, CardioDiT and MedLoRD):
no normalisation, ReLU, dropout only if configured.

  encoder: per level ``i``  conv k4 s2 p1 (``in -> channels[i]``) + ReLU,
           then ``num_res_layers`` residual units; finally conv k3 to ``embedding_dim``.
  residual unit: ``relu(x + conv2(relu(conv1(x))))`` with conv1, conv2 both k3 p1
           (``channels[i] -> num_res_channels[i] -> channels[i]``), as in MONAI.
  decoder: conv k3 ``embedding_dim -> channels[-1]``; per level (reversed) the
           residual units, then a transposed conv k4 s2 p1 to the next level's
           channels + ReLU (the last one to ``out_channels``, no activation).
  quantizer: EMA codebook ``num_embeddings x embedding_dim`` (decay 0.99, epsilon
           1e-5 Laplace smoothing, commitment 0.25, straight-through estimator),
           nearest entries through :func:`medgen_rt.ops.vq_nearest`.

Each level halves every axis (``downsample_parameters`` may give per-axis
stride/kernel/padding, as CardioDiT's asymmetric configs do), so ``ct-ds8``
(3 levels) maps a (1, 512, 512, 256) CT to an (8, 64, 64, 32) latent.

Value ranges: images in [-1, 1] (CT clipped to [-1000, 1000] HU and scaled,
CMR min-max per volume); latents are unbounded codebook vectors.

State-dict compatibility with MONAI / the published checkpoints
---------------------------------------------------------------
Module names follow ``monai.networks.nets.VQVAE`` exactly, so a MONAI (or
VolDiT / CardioDiT / MedLoRD, which copy it) state_dict loads with identical
keys; :func:`load_monai_vqvae_state_dict` only unwraps checkpoint containers and
strips ``module.`` / ``_orig_mod.`` prefixes:

==============================================  =================================================
ours and MONAI                                  what it is
==============================================  =================================================
``encoder.blocks.{i}.conv.{weight,bias}``       strided down-conv of a level; last block: conv
                                                to ``embedding_dim``
``encoder.blocks.{i}.conv1.conv.{weight,bias}`` residual unit, first conv (k3, + ReLU)
``encoder.blocks.{i}.conv2.conv.{weight,bias}`` residual unit, second conv (k3)
``decoder.blocks.0.conv.{weight,bias}``         conv from ``embedding_dim``
``decoder.blocks.{i}.conv{1,2}.conv.*``         residual units
``decoder.blocks.{i}.conv.{weight,bias}``       transposed up-conv (weight ``(C_in, C_out, k..)``)
``quantizer.quantizer.embedding.weight``        codebook ``(K, D)``
``quantizer.quantizer.ema_cluster_size``        EMA code counts ``(K,)``
``quantizer.quantizer.ema_w``                   EMA code sums ``(K, D)``
==============================================  =================================================

Block indices: encoder level ``i`` occupies ``i*(1+R)`` (down-conv) and the next
``R`` indices (residual units), ``R = num_res_layers``; the final conv is at
``L*(1+R)``. Decoder: ``0`` is the input conv, level ``i`` has residual units at
``1 + i*(R+1) .. i*(R+1)+R`` and its up-conv at ``(i+1)*(R+1)``.

Parts: :mod:`.config` (VQGANConfig), :mod:`.presets` (PRESETS, vqgan_config),
:mod:`.layers` (ConvBlock, ResidualUnit, Encoder, Decoder), :mod:`.quantizer`
(EMACodebook, VectorQuantizer), :mod:`.autoencoder` (VQGAN3D, CineVQGAN, build_vqgan),
:mod:`.receptive_field` (decoder_receptive_field, conv_layers), :mod:`.monai_compat`
(MONAI / published checkpoints). Import the names from this package.
"""
from medgen_rt.models.vqgan.autoencoder import VQGAN3D, CineVQGAN, build_vqgan
from medgen_rt.models.vqgan.config import VQGANConfig
from medgen_rt.models.vqgan.layers import ConvBlock, Decoder, Encoder, ResidualUnit
from medgen_rt.models.vqgan.monai_compat import (
    load_monai_vqvae_state_dict,
    monai_vqvae_kwargs,
    strip_wrapper_prefixes,
)
from medgen_rt.models.vqgan.presets import CINE_PRESETS, PRESETS, vqgan_config
from medgen_rt.models.vqgan.quantizer import EMACodebook, VectorQuantizer
from medgen_rt.models.vqgan.receptive_field import conv_layers, decoder_receptive_field

# The old private name, kept ONLY for sampling/planner.py (edited elsewhere) until it imports

__all__ = [
    "VQGANConfig", "PRESETS", "CINE_PRESETS", "vqgan_config", "build_vqgan",
    "ConvBlock", "ResidualUnit", "Encoder", "Decoder",
    "EMACodebook", "VectorQuantizer", "VQGAN3D", "CineVQGAN",
    "decoder_receptive_field", "conv_layers",
    "load_monai_vqvae_state_dict", "monai_vqvae_kwargs", "strip_wrapper_prefixes",
]
