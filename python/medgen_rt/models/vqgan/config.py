"""VQ-GAN configuration: :class:`VQGANConfig` (MONAI ``VQVAE`` argument names) and its checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import torch.nn as nn

_OUTPUT_ACTS = {None: None, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


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
