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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medgen_rt import ops

__all__ = [
    "VQGANConfig", "PRESETS", "CINE_PRESETS", "vqgan_config", "build_vqgan",
    "ConvBlock", "ResidualUnit", "Encoder", "Decoder",
    "EMACodebook", "VectorQuantizer", "VQGAN3D", "CineVQGAN",
    "decoder_receptive_field", "load_monai_vqvae_state_dict", "monai_vqvae_kwargs",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_OUTPUT_ACTS = {None: None, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


# ---- configuration --------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_axis(value, n: int, what: str) -> tuple:
    """An int, or a sequence of ``n`` ints, as a tuple of ``n`` ints."""
    if _is_int(value):
        return (int(value),) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(_is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{what}: expected an int or {n} ints (one per spatial axis), got {value!r}")


def _freeze(v):
    """Lists (from YAML/JSON) to tuples, recursively."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _level_params(params, n_levels: int, n_items: int, what: str) -> tuple:
    """MONAI's rule: a single tuple of ints applies to every level; otherwise one entry per level."""
    params = _freeze(params)
    if not isinstance(params, tuple):
        raise ValueError(f"{what}: expected a tuple, got {params!r}")
    if len(params) == n_items and all(_is_int(v) for v in params):
        params = (params,) * n_levels
    if len(params) != n_levels:
        raise ValueError(f"{what}: expected one entry per level ({n_levels} levels), got {len(params)}: {params!r}")
    for entry in params:
        if not isinstance(entry, tuple) or len(entry) != n_items:
            raise ValueError(f"{what}: every entry must have {n_items} items, got {entry!r}")
    return params


@dataclass(frozen=True)
class VQGANConfig:
    """Plain-data configuration; field names follow MONAI's ``VQVAE`` arguments.

    downsample_parameters: per level ``(stride, kernel_size, dilation, padding)``;
    upsample_parameters: per level (decoder order, deepest first)
    ``(stride, kernel_size, dilation, padding, output_padding)``. Each item is an
    int or one int per spatial axis. A single tuple of ints applies to every level.
    num_res_channels: None means ``channels``; an int applies to every level.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple = (128, 256, 512)
    num_res_layers: int = 2
    num_res_channels: Any = None
    downsample_parameters: tuple = ((2, 4, 1, 1), (2, 4, 1, 1), (2, 4, 1, 1))
    upsample_parameters: tuple = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    embedding_dim: int = 8
    num_embeddings: int = 4096
    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    embedding_init: str = "normal"
    dropout: float = 0.0
    output_act: Optional[str] = None
    ddp_sync: bool = True
    use_checkpointing: bool = False
    dead_code_threshold: float = 0.0

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")
        channels = _freeze(self.channels)
        if _is_int(channels):
            channels = (channels,)
        if not channels or not all(_is_int(c) and c > 0 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {self.channels!r}")
        put("channels", channels)
        n = len(channels)
        res = self.num_res_channels
        res = channels if res is None else _freeze(res)
        if _is_int(res):
            res = (res,) * n
        if len(res) != n or not all(_is_int(c) and c > 0 for c in res):
            raise ValueError(f"num_res_channels must be an int or {n} positive ints (one per level), "
                             f"got {self.num_res_channels!r}")
        put("num_res_channels", res)
        for name in ("in_channels", "out_channels", "embedding_dim", "num_embeddings"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not _is_int(self.num_res_layers) or self.num_res_layers < 0:
            raise ValueError(f"num_res_layers must be an int >= 0, got {self.num_res_layers!r}")
        down = _level_params(self.downsample_parameters, n, 4, "downsample_parameters")
        up = _level_params(self.upsample_parameters, n, 5, "upsample_parameters")
        for entry in down + up:
            for i, item in enumerate(entry):
                _per_axis(item, self.spatial_dims, "downsample/upsample parameter")
        put("downsample_parameters", down)
        put("upsample_parameters", up)
        if not (0.0 < float(self.decay) < 1.0):
            raise ValueError(f"decay must be in (0, 1), got {self.decay!r}")
        if not (float(self.epsilon) > 0.0):
            raise ValueError(f"epsilon must be positive, got {self.epsilon!r}")
        if not (float(self.commitment_cost) >= 0.0):
            raise ValueError(f"commitment_cost must be >= 0, got {self.commitment_cost!r}")
        if not (float(self.dead_code_threshold) >= 0.0):
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.embedding_init not in ("normal", "kaiming_uniform"):
            raise ValueError(f"embedding_init must be 'normal' or 'kaiming_uniform', got {self.embedding_init!r}")
        out_act = self.output_act.lower() if isinstance(self.output_act, str) else self.output_act
        if out_act not in _OUTPUT_ACTS:
            raise ValueError(f"output_act must be None, 'tanh' or 'sigmoid', got {self.output_act!r}")
        put("output_act", out_act)

    # -- derived ---------------------------------------------------------------------
    @property
    def downsample_factor(self) -> tuple:
        """Per spatial axis, input voxels per latent voxel (product of the encoder strides)."""
        f = [1] * self.spatial_dims
        for entry in self.downsample_parameters:
            for a, s in enumerate(_per_axis(entry[0], self.spatial_dims, "stride")):
                f[a] *= s
        return tuple(f)

    # -- plain data --------------------------------------------------------------------
    def to_dict(self) -> dict:
        def thaw(v):
            return [thaw(x) for x in v] if isinstance(v, tuple) else v

        return {k: thaw(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "VQGANConfig":
        """From plain data, e.g. the ``params`` of a published stage-1 YAML.

        Accepts the published name ``num_channels`` for ``channels`` and ``act: RELU``;
        unknown keys raise (a silently ignored key would build a different network).
        """
        d = dict(d)
        if "num_channels" in d:
            if "channels" in d:
                raise ValueError("give either 'channels' or 'num_channels', not both")
            d["channels"] = d.pop("num_channels")
        act = d.pop("act", "RELU")
        if str(act).upper() != "RELU":
            raise ValueError(f"only act='RELU' is supported (the published VQ-GANs), got {act!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys: {unknown}; known: {sorted(names)}")
        return cls(**d)


_DS2 = (2, 4, 1, 1)
_US2 = (2, 4, 1, 1, 0)

# The published stage-1 configs (VolDiT configs/stage1/vqgan_ds8.yaml and vqgan_ds4.yaml,
# MedLoRD vqgan_ds4.yaml, CardioDiT vqgan_ds4.yaml for (H, W, T) slices) and CPU-sized ones.
PRESETS = {
    "ct-ds8": VQGANConfig(channels=(128, 256, 512), num_res_channels=(128, 256, 512), num_res_layers=2,
                          downsample_parameters=(_DS2,) * 3, upsample_parameters=(_US2,) * 3,
                          num_embeddings=4096, embedding_dim=8),
    "ct-ds4": VQGANConfig(channels=(128, 256), num_res_channels=(128, 256), num_res_layers=2,
                          downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                          num_embeddings=16384, embedding_dim=8),
    "ct-tiny": VQGANConfig(channels=(16, 32), num_res_channels=(16, 32), num_res_layers=1,
                           downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                           num_embeddings=256, embedding_dim=8),
    "cmr": VQGANConfig(channels=(128, 256), num_res_channels=(128, 256), num_res_layers=2,
                       downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                       num_embeddings=16384, embedding_dim=8),
    "cmr-tiny": VQGANConfig(channels=(16, 32), num_res_channels=(16, 32), num_res_layers=1,
                            downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                            num_embeddings=256, embedding_dim=8),
}
CINE_PRESETS = frozenset({"cmr", "cmr-tiny"})


def vqgan_config(name: str, **overrides) -> VQGANConfig:
    """A preset's configuration, with optional field overrides."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown VQ-GAN preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
    return replace(cfg, **overrides) if overrides else cfg


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


# ---- layers ---------------------------------------------------------------------------

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


# ---- vector quantisation ----------------------------------------------------------------

def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    import contextlib

    return contextlib.nullcontext()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class EMACodebook(nn.Module):
    """EMA-learned codebook (van den Oord et al.; MONAI's ``EMAQuantizer``).

    forward(z): z (B, D, *S) channel-first, any number of spatial axes ->
    (quantized (B, D, *S) float32 with straight-through gradient, commitment loss
    (scalar, ``commitment_cost * mse(sg[e], z)``), indices (B, *S) int64).

    In training mode (or with ``update=True``) the codebook moves towards the mean
    of the vectors assigned to each entry: with counts ``n_k`` and sums ``s_k`` of
    this batch (all-reduced over DDP ranks when torch.distributed is initialised
    and ``ddp_sync``), ``N <- decay*N + (1-decay)*n``, ``W <- decay*W + (1-decay)*s``,
    Laplace-smoothed ``N'_k = (N_k + eps) / (sum N + K*eps) * sum N`` and
    ``embedding_k = W_k / N'_k``. Quantized vectors and the loss use the codebook
    from before the update. The embedding has no gradient (``requires_grad=False``).

    dead_code_threshold > 0 (CardioDiT's option; 0, the MONAI / VolDiT behaviour,
    turns it off): after the EMA step, entries whose ``N_k`` fell below it restart at
    randomly drawn vectors of the batch with ``N_k = threshold`` (rank 0 draws them and
    broadcasts, so DDP replicas stay identical).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, decay: float = 0.99,
                 epsilon: float = 1e-5, embedding_init: str = "normal", ddp_sync: bool = True,
                 dead_code_threshold: float = 0.0):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.ddp_sync = bool(ddp_sync)
        self.dead_code_threshold = float(dead_code_threshold)
        self.embedding = nn.Embedding(self.num_embeddings, self.embedding_dim)
        if embedding_init == "kaiming_uniform":
            nn.init.kaiming_uniform_(self.embedding.weight.data, mode="fan_in", nonlinearity="linear")
        self.embedding.weight.requires_grad_(False)
        self.register_buffer("ema_cluster_size", torch.zeros(self.num_embeddings))
        self.register_buffer("ema_w", self.embedding.weight.data.clone())
        self.perplexity = torch.zeros(())

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"EMACodebook: expected (B, {self.embedding_dim}, ...) channel-first latents, "
                             f"got shape {tuple(z.shape)}")
        # A view when z is channels-last in memory; vq_nearest accepts any strides.
        return z.movedim(1, -1).reshape(-1, self.embedding_dim)

    def _nearest(self, flat: torch.Tensor):
        with _no_autocast(flat.device):
            return ops.vq_nearest(flat.float(), self.embedding.weight.float())

    def _unflatten(self, z: torch.Tensor, idx: torch.Tensor, q: torch.Tensor):
        spatial = (z.shape[0],) + tuple(z.shape[2:])
        return idx.view(spatial), q.view(*spatial, self.embedding_dim).movedim(-1, 1)

    def lookup(self, z: torch.Tensor):
        """(indices (B, *S) int64, quantized (B, D, *S) float32) without any update or gradient."""
        flat = self._flatten(z)
        return self._unflatten(z, *self._nearest(flat))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, *S) -> codebook vectors (B, D, *S)."""
        return self.embedding(indices).movedim(-1, 1)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: Optional[torch.Tensor] = None) -> None:
        """One EMA step from assigned vectors ``flat`` (N, D) and their ``indices`` (N,)
        (``counts``: their bincount, when already at hand)."""
        if counts is None:
            counts = torch.bincount(indices, minlength=self.num_embeddings)
        counts = counts.to(torch.float32)
        sums = torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.float32, device=flat.device)
        sums.index_add_(0, indices, flat.float())
        if self.ddp_sync and _distributed():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        d = self.decay
        self.ema_cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.ema_w.mul_(d).add_(sums, alpha=1.0 - d)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.weight.data.copy_(self.ema_w / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.ema_cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())  # the same on every rank: the statistics were all-reduced
        sync = self.ddp_sync and _distributed()
        if num_dead == 0 or (flat.shape[0] == 0 and not sync):
            return
        repl = torch.zeros(num_dead, self.embedding_dim, dtype=torch.float32, device=flat.device)
        if (not sync or torch.distributed.get_rank() == 0) and flat.shape[0] > 0:
            repl.copy_(flat[torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)])
        if sync:
            torch.distributed.broadcast(repl, src=0)
        count = max(self.dead_code_threshold, self.epsilon)
        self.ema_cluster_size[dead] = count
        self.ema_w[dead] = repl * count

    def forward(self, z: torch.Tensor, update: Optional[bool] = None):
        update = self.training if update is None else bool(update)
        with _no_autocast(z.device):
            zf = z.float()
            flat = self._flatten(zf.detach())
            flat_idx, flat_q = self._nearest(flat)
            indices, quantized = self._unflatten(zf, flat_idx, flat_q)
            if flat_idx.device.type != "meta":
                counts = torch.bincount(flat_idx, minlength=self.num_embeddings)
                probs = counts.float() / max(flat_idx.numel(), 1)
                self.perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum()).detach()
                if update:
                    self.ema_update(flat, flat_idx, counts)
            loss = self.commitment_cost * F.mse_loss(quantized, zf)
            quantized = zf + (quantized - zf).detach()  # straight-through: d/dz = identity
        return quantized, loss, indices


class VectorQuantizer(nn.Module):
    """Wrapper holding the codebook as ``quantizer`` (MONAI's layout, so the
    state-dict keys are ``quantizer.quantizer.*``) and its last ``perplexity``."""

    def __init__(self, quantizer: EMACodebook):
        super().__init__()
        self.quantizer = quantizer

    @property
    def perplexity(self) -> torch.Tensor:
        return self.quantizer.perplexity

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def forward(self, z: torch.Tensor, update: Optional[bool] = None):
        """-> (quantized, loss, indices); see :class:`EMACodebook`."""
        return self.quantizer(z, update=update)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(indices)

    def lookup(self, z: torch.Tensor):
        return self.quantizer.lookup(z)


# ---- models ----------------------------------------------------------------------------

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


# ---- receptive field ---------------------------------------------------------------------

def _conv_layers(module: nn.Module) -> list:
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
    layers = _conv_layers(decoder)
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


# ---- MONAI / published checkpoints ---------------------------------------------------------

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_EMA_KEYS = ("quantizer.quantizer.ema_cluster_size", "quantizer.quantizer.ema_w")


def monai_vqvae_kwargs(config: VQGANConfig) -> dict:
    """Arguments for ``monai.networks.nets.VQVAE`` that build the same network
    (isotropic levels only: MONAI rejects per-axis stride/kernel tuples)."""
    if config.dead_code_threshold > 0:
        raise ValueError("MONAI's VQVAE has no dead-code restart; use dead_code_threshold=0")
    return dict(spatial_dims=config.spatial_dims, in_channels=config.in_channels, out_channels=config.out_channels,
                channels=config.channels, num_res_layers=config.num_res_layers,
                num_res_channels=config.num_res_channels, downsample_parameters=config.downsample_parameters,
                upsample_parameters=config.upsample_parameters, num_embeddings=config.num_embeddings,
                embedding_dim=config.embedding_dim, commitment_cost=config.commitment_cost, decay=config.decay,
                epsilon=config.epsilon, embedding_init=config.embedding_init, dropout=config.dropout,
                output_act=config.output_act.upper() if config.output_act else None)


def strip_wrapper_prefixes(state: Mapping) -> dict:
    """A state_dict without the DDP ``module.`` and torch.compile ``_orig_mod.`` key prefixes."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def load_monai_vqvae_state_dict(model: VQGAN3D, state_dict: Mapping, strict: bool = True):
    """Load a MONAI ``VQVAE`` (or VolDiT / CardioDiT / MedLoRD VQ-GAN) state_dict into ``model``.

    Keys are identical (see the module docstring); this unwraps a checkpoint dict
    (``state_dict`` / ``model_state_dict`` / ``model`` entries), strips the DDP and
    torch.compile prefixes ``module.`` / ``_orig_mod.``, and checks shapes with a
    readable error. A checkpoint without the EMA buffers (inference exports) gets
    ``ema_w = embedding`` and ``ema_cluster_size = 0``, a fresh EMA state; they only
    matter for further training. Returns torch's ``(missing_keys, unexpected_keys)``.
    """
    sd = state_dict
    for key in _CONTAINER_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    out = strip_wrapper_prefixes(sd)
    emb = "quantizer.quantizer.embedding.weight"
    if emb in out and not any(k in out for k in _EMA_KEYS):
        out[_EMA_KEYS[0]] = torch.zeros(out[emb].shape[0], dtype=torch.float32)
        out[_EMA_KEYS[1]] = out[emb].detach().clone().float()
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in out.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("load_monai_vqvae_state_dict: shape mismatch (is the configuration the checkpoint's?):\n  "
                         + "\n  ".join(bad))
    return model.load_state_dict(out, strict=strict)
