"""The VQ-GAN networks: :class:`VQGAN3D`, :class:`CineVQGAN` (per-slice 3D on cine), and
:func:`build_vqgan` (from a preset name, a config or model.json's plain data)."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from medgen_rt.models.vqgan.config import VQGANConfig, _is_int, _per_axis
from medgen_rt.models.vqgan.layers import Decoder, Encoder
from medgen_rt.models.vqgan.presets import CINE_PRESETS, PRESETS, vqgan_config
from medgen_rt.models.vqgan.quantizer import EMACodebook, VectorQuantizer
from medgen_rt.models.vqgan.receptive_field import decoder_receptive_field


def _conv_out(n: int, k: int, s: int, d: int, p: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_t_out(n: int, k: int, s: int, d: int, p: int, op: int) -> int:
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


class VQGAN3D(nn.Module):
    """VQ-GAN on (B, C, X, Y, Z) volumes (``spatial_dims`` axes in general).

    x in [-1, 1] -> ``encode`` -> z_e (B, D, *S/f) -> ``quantize`` -> z_q -> ``decode`` -> x'.
    """

    def __init__(self, config: Optional[VQGANConfig] = None, **overrides):
        super().__init__()
        cfg = config if config is not None else VQGANConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = VectorQuantizer(EMACodebook(
            cfg.num_embeddings, cfg.embedding_dim, cfg.commitment_cost, cfg.decay, cfg.epsilon,
            cfg.embedding_init, cfg.ddp_sync, cfg.dead_code_threshold))

    def config_dict(self) -> dict:
        """Plain data that :func:`build_vqgan` turns back into this network."""
        return {"cine": isinstance(self, CineVQGAN), **self.config.to_dict()}

    # -- shapes --------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> tuple:
        return self.config.downsample_factor

    def _check_volume(self, x: torch.Tensor, channels: int, what: str) -> None:
        n = self.config.spatial_dims
        if x.dim() != n + 2 or x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__}.{what}: expected (B, {channels}, {n} spatial axes), "
                             f"got shape {tuple(x.shape)}")

    def _spatial_latent_shape(self, spatial: Sequence[int]) -> tuple:
        n = self.config.spatial_dims
        out = list(spatial)
        for stride, kernel, dilation, padding in self.config.downsample_parameters:
            s, k, d, p = (_per_axis(v, n, "") for v in (stride, kernel, dilation, padding))
            out = [_conv_out(o, k[a], s[a], d[a], p[a]) for a, o in enumerate(out)]
        if any(o < 1 for o in out):
            raise ValueError(f"input spatial shape {tuple(spatial)} is too small for this encoder")
        return tuple(out)  # the encoder's k3 convs keep the size

    def _spatial_output_shape(self, spatial: Sequence[int]) -> tuple:
        n = self.config.spatial_dims
        out = list(spatial)
        for stride, kernel, dilation, padding, out_pad in self.config.upsample_parameters:
            s, k, d, p, op = (_per_axis(v, n, "") for v in (stride, kernel, dilation, padding, out_pad))
            out = [_conv_t_out(o, k[a], s[a], d[a], p[a], op[a]) for a, o in enumerate(out)]
        return tuple(out)

    def latent_shape(self, input_shape: Sequence[int]) -> tuple:
        """Shape of ``encode(x)`` for x of ``input_shape`` (B, C, *S), by conv arithmetic only."""
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != self.config.spatial_dims + 2:
            raise ValueError(f"input_shape must be (B, C, {self.config.spatial_dims} spatial axes), got {shape}")
        return (shape[0], self.config.embedding_dim) + self._spatial_latent_shape(shape[2:])

    def output_shape(self, latent_shape: Sequence[int]) -> tuple:
        """Shape of ``decode(z)`` for z of ``latent_shape`` (B, D, *L)."""
        shape = tuple(int(v) for v in latent_shape)
        if len(shape) != self.config.spatial_dims + 2:
            raise ValueError(f"latent_shape must be (B, D, {self.config.spatial_dims} spatial axes), got {shape}")
        return (shape[0], self.config.out_channels) + self._spatial_output_shape(shape[2:])

    def receptive_field(self) -> tuple:
        """Per spatial axis, the decoder's halo in latent voxels; see :func:`decoder_receptive_field`."""
        return decoder_receptive_field(self)

    # -- the network -----------------------------------------------------------------------
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.use_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, *S) -> z_e (B, D, *S/f), before quantisation."""
        self._check_volume(x, self.config.in_channels, "encode")
        return self._run(self.encoder, x)

    def quantize(self, z_e: torch.Tensor, update: Optional[bool] = None):
        """z_e (B, D, ...) -> (z_q float32 with straight-through gradient, commitment loss, indices (B, ...)).
        Updates the codebook by EMA in training mode unless ``update=False``."""
        return self.quantizer(z_e, update=update)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, *L) -> x (B, out_channels, *L*f)."""
        self._check_volume(z_q, self.config.embedding_dim, "decode")
        return self._run(self.decoder, z_q)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, *L) -> z_q (B, D, *L)."""
        return self.quantizer.embed(indices)

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.encode(x))[0]

    def encode_to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized latent the diffusion model is trained on: exact codebook
        vectors (float32), no codebook update and no gradient to the encoder."""
        return self.quantizer.lookup(self.encode(x))[1]

    def decode_latent(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Decode a (generated) latent; by default snapped to the nearest codebook
        entries first, as the published sampling code does (no codebook update)."""
        if quantize:
            z = self.quantizer.lookup(z)[1]
        return self.decode(z)

    def forward(self, x: torch.Tensor):
        """x -> (reconstruction, commitment loss, extras {"indices", "perplexity"})."""
        z_q, vq_loss, indices = self.quantize(self.encode(x))
        recon = self.decode(z_q)
        if recon.shape != x.shape:
            raise ValueError(f"reconstruction shape {tuple(recon.shape)} differs from the input's {tuple(x.shape)}: "
                             f"spatial sizes must be multiples of the downsampling factor {self.downsample_factor}")
        return recon, vq_loss, {"indices": indices, "perplexity": self.quantizer.perplexity}


class CineVQGAN(VQGAN3D):
    """Spatiotemporal VQ-GAN for cine MRI: the 3D network applied to (X, Y, T) slices.

    Cine input is (B, C, X, Y, Z, T), the NIfTI axis order. Z moves into the
    batch, each slice (B*Z, C, X, Y, T) is encoded (``cmr``: 4x on X, Y and T,
    (1, 256, 256, 32) -> (8, 64, 64, 8)), and the slices stack into the latent
    (B, D, Z, X', Y', T') (``cmr``, Z=6: (B, 8, 6, 64, 64, 8)). ``decode`` inverts it.
    5-D inputs (B, C, X, Y, T) / latents (B, D, X', Y', T') are single slices and go
    through the 3D network unchanged (the published models train on slices).

    max_slices_per_pass: encode/decode at most this many slices at once (bounds memory).
    """

    def __init__(self, config: Optional[VQGANConfig] = None, max_slices_per_pass: Optional[int] = None,
                 **overrides):
        super().__init__(config if config is not None else PRESETS["cmr"], **overrides)
        if self.config.spatial_dims != 3:
            raise ValueError(f"CineVQGAN needs spatial_dims=3 (X, Y, T slices), got {self.config.spatial_dims}")
        if max_slices_per_pass is not None and (not _is_int(max_slices_per_pass) or max_slices_per_pass < 1):
            raise ValueError(f"max_slices_per_pass must be a positive int or None, got {max_slices_per_pass!r}")
        self.max_slices_per_pass = max_slices_per_pass

    def _per_slice(self, fn, slices: torch.Tensor) -> torch.Tensor:
        m = self.max_slices_per_pass
        if m is None or slices.shape[0] <= m:
            return fn(slices)
        return torch.cat([fn(part) for part in slices.split(m, dim=0)], dim=0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z, T) -> (B, D, Z, X', Y', T'); (B, C, X, Y, T) -> (B, D, X', Y', T')."""
        if x.dim() == 5:
            return super().encode(x)
        if x.dim() != 6 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"CineVQGAN.encode: expected cine (B, {self.config.in_channels}, X, Y, Z, T) "
                             f"or a slice (B, C, X, Y, T), got shape {tuple(x.shape)}")
        B, C, X, Y, Z, T = x.shape
        slices = x.permute(0, 4, 1, 2, 3, 5).reshape(B * Z, C, X, Y, T)
        z = self._per_slice(super().encode, slices)
        D, Xl, Yl, Tl = z.shape[1:]
        return z.reshape(B, Z, D, Xl, Yl, Tl).transpose(1, 2)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, D, Z, X', Y', T') -> (B, C, X, Y, Z, T); (B, D, X', Y', T') -> (B, C, X, Y, T)."""
        if z_q.dim() == 5:
            return super().decode(z_q)
        if z_q.dim() != 6 or z_q.shape[1] != self.config.embedding_dim:
            raise ValueError(f"CineVQGAN.decode: expected a latent (B, {self.config.embedding_dim}, Z, X', Y', T') "
                             f"or a slice latent (B, D, X', Y', T'), got shape {tuple(z_q.shape)}")
        B, D, Z, Xl, Yl, Tl = z_q.shape
        slices = z_q.transpose(1, 2).reshape(B * Z, D, Xl, Yl, Tl)
        x = self._per_slice(super().decode, slices)
        C, X, Y, T = x.shape[1:]
        return x.reshape(B, Z, C, X, Y, T).permute(0, 2, 3, 4, 1, 5)

    def latent_shape(self, input_shape: Sequence[int]) -> tuple:
        """(B, C, X, Y, Z, T) -> (B, D, Z, X', Y', T'); 5-D slice shapes as in VQGAN3D."""
        shape = tuple(int(v) for v in input_shape)
        if len(shape) == 5:
            return super().latent_shape(shape)
        if len(shape) != 6:
            raise ValueError(f"input_shape must be (B, C, X, Y, Z, T) or (B, C, X, Y, T), got {shape}")
        B, _, X, Y, Z, T = shape
        Xl, Yl, Tl = self._spatial_latent_shape((X, Y, T))
        return (B, self.config.embedding_dim, Z, Xl, Yl, Tl)

    def output_shape(self, latent_shape: Sequence[int]) -> tuple:
        shape = tuple(int(v) for v in latent_shape)
        if len(shape) == 5:
            return super().output_shape(shape)
        if len(shape) != 6:
            raise ValueError(f"latent_shape must be (B, D, Z, X', Y', T') or (B, D, X', Y', T'), got {shape}")
        B, _, Z, Xl, Yl, Tl = shape
        X, Y, T = self._spatial_output_shape((Xl, Yl, Tl))
        return (B, self.config.out_channels, X, Y, Z, T)


def build_vqgan(spec, **overrides) -> "VQGAN3D":
    """Build a VQ-GAN from a preset name, a :class:`VQGANConfig` or plain data.

    ``ct-*`` presets build a :class:`VQGAN3D`, ``cmr*`` a :class:`CineVQGAN`. A dict
    is what :meth:`VQGAN3D.config_dict` writes: the config fields plus ``"cine"``
    (bool; default False), optionally ``"preset"`` (a base whose fields the others
    override). A VQGANConfig builds a VQGAN3D unless ``cine=True`` is passed.
    """
    cine = overrides.pop("cine", None)
    if isinstance(spec, str):
        cfg = vqgan_config(spec, **overrides)
        cine = spec in CINE_PRESETS if cine is None else cine
    elif isinstance(spec, VQGANConfig):
        cfg = replace(spec, **overrides) if overrides else spec
    elif isinstance(spec, Mapping):
        d = {**spec, **overrides}
        cine = d.pop("cine", cine)
        preset = d.pop("preset", None)
        if preset is not None:
            base = vqgan_config(preset).to_dict()
            if "num_channels" in d:
                base.pop("channels")
            cfg = VQGANConfig.from_dict({**base, **d})
            cine = preset in CINE_PRESETS if cine is None else cine
        else:
            cfg = VQGANConfig.from_dict(d)
    else:
        raise TypeError(f"build_vqgan: expected a preset name, a VQGANConfig or a dict, got {type(spec).__name__}")
    return CineVQGAN(cfg) if cine else VQGAN3D(cfg)
