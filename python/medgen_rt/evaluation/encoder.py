"""The self-supervised copy-detection encoder (Dar et al.): a small 3D conv encoder of
MONAI blocks, trained with the NT-Xent contrastive loss on the training volumes only.

A positive pair is a volume and its augmented version (in-plane flips, a small random
affine - rotation, scale, shift - and, for half the pairs, a little Gaussian noise);
every other volume of the batch is a negative (MONAI's ``ContrastiveLoss``).

Input representation (``EncoderConfig``):

* 3D volumes: one channel, the volume in [-1, 1] (CT: [-1000, 1000] HU; MR: min-max),
  resampled to ``size`` (area averaging when shrinking, trilinear when enlarging).
* cine (X, Y, Z, T): **frames as channels**: ``n_frames`` frames evenly spaced over the
  cycle from the first stored frame (ED for ACDC and medgen_rt samples), each resampled
  to ``size``. Motion is part of the input, so a copy must match the training subject in
  anatomy and in its contraction.

The embedding is the projection head's output, the space the loss makes invariant to
the augmentations, averaged over the input shifted by -1, 0, +1 voxel along X and Y
(``tta_shift``): a copy that was re-positioned or re-noised stays next to its source.
(With the pooled features before the head, or without the shift average, 1-voxel
shifted copies of phantoms were missed more often in our measurements.) FID and MMD use
the pooled stage features before the head (``features=True``), which keep more detail.

Saved as safetensors with the configuration in the file's metadata.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..data.preprocess import frame_indices
from ..io.atomic import atomic_path

__all__ = ["EncoderConfig", "CopyEncoder", "default_size", "encoder_input", "make_augment", "train_encoder",
           "load_inputs", "embed_inputs", "embed_set", "save_encoder", "load_encoder", "progress"]

FORMAT = "medgen_rt.copy_encoder/1"
MAX_SIZE = (64, 64, 32)


@dataclass
class EncoderConfig:
    """kind: "volume" (3D) or "cine"; modality: "ct" or "mr"; size: encoder grid (X, Y, Z),
    None = the training volumes' own, capped at 64 x 64 x 32; n_frames: cine frames used as
    channels; channels: widths of the four conv stages; proj_dim: the embedding length.
    aug_*: augmentation strength (rotation in degrees about each axis, relative scale,
    shift as a fraction of the grid, noise std on the [-1, 1] scale); tta_shift: the
    embedding is averaged over in-plane shifts of up to this many voxels (0 = off)."""

    kind: str = "volume"
    modality: str = "ct"
    size: Optional[tuple] = None
    n_frames: int = 8
    channels: tuple = (8, 16, 32, 64)
    proj_dim: int = 64
    temperature: float = 0.2
    aug_rotate_deg: float = 5.0
    aug_scale: float = 0.05
    aug_shift: float = 0.06
    aug_noise: float = 0.02
    tta_shift: int = 1
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    history: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return self.n_frames if self.kind == "cine" else 1

    @property
    def feature_dim(self) -> int:
        return int(sum(self.channels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = None if self.size is None else [int(s) for s in self.size]
        d["channels"] = [int(c) for c in self.channels]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("size") is not None:
            known["size"] = tuple(int(v) for v in known["size"])
        known["channels"] = tuple(int(v) for v in known.get("channels", cls.channels))
        return cls(**known)


def default_size(shape) -> tuple:
    """The encoder grid for volumes of ``shape`` (X, Y, Z[, T]): their own, capped at 64 x 64 x 32."""
    return tuple(int(min(s, m)) for s, m in zip(shape[:3], MAX_SIZE))


class CopyEncoder(nn.Module):
    """Four stages, each a MONAI ``Convolution`` (3^3 conv, batch norm, ReLU) at stride 1,
    the first three followed by 2x average pooling; the global average of every stage,
    concatenated, goes through a two-layer projection head.

    Average pooling instead of strided convolutions keeps the features from aliasing, so a
    one-voxel shift changes them little (a strided MONAI ResNet missed most 1-voxel
    shifted copies in our phantom tests). forward(x): x (B, C, X, Y, Z) in [-1, 1] ->
    embedding (B, proj_dim); features(x): the pooled stage features (B, sum(channels)).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from monai.networks.blocks import Convolution

        self.cfg = cfg
        stages, cin = [], cfg.in_channels
        for cout in cfg.channels:
            stages.append(Convolution(spatial_dims=3, in_channels=cin, out_channels=int(cout), kernel_size=3,
                                      strides=1, act="RELU", norm="BATCH"))
            cin = int(cout)
        self.stages = nn.ModuleList(stages)
        d = cfg.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, cfg.proj_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, stage in enumerate(self.stages):
            if i:  # halve every axis that still has 2 voxels or more (thin cine stacks run out first)
                x = nn.functional.avg_pool3d(x, kernel_size=tuple(2 if n > 1 else 1 for n in x.shape[2:]),
                                             ceil_mode=True)
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def encoder_input(unit: np.ndarray, cfg: EncoderConfig) -> torch.Tensor:
    """A volume in [-1, 1] ((X,Y,Z) or cine (X,Y,Z,T)) -> the encoder's input (C, *cfg.size)."""
    a = np.asarray(unit, dtype=np.float32)
    if cfg.kind == "cine":
        if a.ndim != 4:
            raise ValueError(f"volume: the cine encoder needs (X,Y,Z,T), got shape {a.shape}")
        idx = frame_indices(a.shape[3], cfg.n_frames, start=0)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a[..., idx], 3, 0)))
    else:
        if a.ndim != 3:
            raise ValueError(f"volume: the 3D encoder needs (X,Y,Z), got shape {a.shape}")
        x = torch.from_numpy(np.ascontiguousarray(a))[None]
    size = tuple(cfg.size) if cfg.size is not None else default_size(a.shape)
    if tuple(x.shape[1:]) != size:
        # Area averaging when shrinking (a 512^3 CT to 64^3 would alias with trilinear taps).
        shrink = all(t <= s for t, s in zip(size, x.shape[1:]))
        x = torch.nn.functional.interpolate(x[None], size=size, mode="area" if shrink else "trilinear",
                                            **({} if shrink else {"align_corners": False}))[0]
    return x


def make_augment(cfg: EncoderConfig, seed: int):
    """The positive-pair augmentation, applied to a whole batch (B, C, X, Y, Z) at once:
    flips along X and Y (each p = 0.5), a random affine about the centre (rotation up to
    ``aug_rotate_deg`` about each axis, scale 1 +- ``aug_scale``, shift up to ``aug_shift``
    of the grid) and, for half of the volumes, Gaussian noise of std ``aug_noise``.

    The affine is one batched MONAI ``AffineTransform`` (grid_sample, border padding):
    MONAI's per-volume RandAffine cost ~60 ms a volume on the CPU, more than a training step.
    No flip along Z: a head-foot (base-apex) mirrored volume is never a plausible copy.
    """
    from monai.networks.layers import AffineTransform

    warp = AffineTransform(normalized=False, zero_centered=True, padding_mode="border", align_corners=True)
    gen = torch.Generator().manual_seed(int(seed))
    max_rot = math.radians(cfg.aug_rotate_deg)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        b = int(x.shape[0])
        size = torch.tensor([float(s) for s in x.shape[2:]], dtype=torch.float64)
        a = uniform((b, 3), -max_rot, max_rot)
        c, s = torch.cos(a), torch.sin(a)
        one, zero = torch.ones(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(b, 3, 3)
        ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(b, 3, 3)
        rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
        flips = torch.where(torch.rand((b, 3), generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        flips[:, 2] = 1.0
        scale = uniform((b, 1), 1.0 - cfg.aug_scale, 1.0 + cfg.aug_scale)
        theta = torch.zeros((b, 4, 4), dtype=torch.float64)
        theta[:, :3, :3] = (rz @ ry @ rx) * scale[:, :, None] * flips[:, None, :]
        theta[:, :3, 3] = uniform((b, 3), -1.0, 1.0) * cfg.aug_shift * size
        theta[:, 3, 3] = 1.0
        out = warp(x.float(), theta.float().to(x.device))
        noisy = (torch.rand((b, 1, 1, 1, 1), generator=gen) < 0.5).float().to(x.device)
        return out + noisy * cfg.aug_noise * torch.randn(out.shape, generator=gen).to(x.device)

    return apply


def progress(total: int, desc: str, quiet: bool, unit: str = "it"):
    """A tqdm bar, or a silent stand-in when quiet."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_encoder(inputs: torch.Tensor, cfg: EncoderConfig, quiet: bool = True, device="cpu",
                  log: Optional[Callable[[str], None]] = None) -> CopyEncoder:
    """Train a CopyEncoder with NT-Xent on ``inputs`` (N, C, X, Y, Z), N >= 2.

    Each step takes ``cfg.batch_size`` volumes (all when fewer), pairs each with its
    augmented version and minimises MONAI's ContrastiveLoss; both views go through the
    network as one batch so batch norm sees the whole 2B batch. Deterministic for a seed
    on one machine. The loss at the start and the end is kept in ``cfg.history``.
    """
    from monai.losses import ContrastiveLoss

    n = int(inputs.shape[0])
    if n < 2:
        raise ValueError(f"--train: the encoder needs at least 2 training volumes, got {n}")
    cfg.size = tuple(int(s) for s in inputs.shape[2:])
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = CopyEncoder(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    loss_fn = ContrastiveLoss(temperature=cfg.temperature)
    augment = make_augment(cfg, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, n)
    losses = []
    model.train()
    bar = progress(cfg.steps, "encoder (NT-Xent)", quiet, "step")
    for _ in range(cfg.steps):
        x = inputs[torch.randperm(n, generator=gen)[:batch]].to(device)
        z = model(torch.cat([x, augment(x)]))
        loss = loss_fn(z[:batch], z[batch:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    k = max(1, min(20, len(losses) // 10))
    cfg.history = {"steps": len(losses), "loss_first": float(np.mean(losses[:k])) if losses else None,
                   "loss_last": float(np.mean(losses[-k:])) if losses else None,
                   "loss_chance": float(math.log(2 * batch - 1)), "batch": batch, "n_train": n}
    if log is not None and losses:
        log(f"encoder: {len(losses)} NT-Xent steps, loss {cfg.history['loss_first']:.3f} -> "
            f"{cfg.history['loss_last']:.3f}")
    return model


def load_inputs(eval_set, cfg: EncoderConfig, quiet: bool = True, desc: str = "") -> torch.Tensor:
    """Every volume of an EvalSet as encoder input (N, C, *size); read one at a time, so
    only the (small) encoder grids are held."""
    if cfg.size is None:
        from ..io.nifti import read_info

        cfg.size = default_size(read_info(eval_set.entries[0].image).shape)
    bar = progress(len(eval_set), desc or f"read {eval_set.arg}", quiet, "vol")
    xs = []
    for i in range(len(eval_set)):
        xs.append(encoder_input(eval_set.unit(i), cfg))
        bar.update(1)
    bar.close()
    return torch.stack(xs)


def shifted_views(x: torch.Tensor, shift: int) -> list:
    """x (B, C, X, Y, Z) moved by -shift..+shift voxels along X and Y (edges replicated,
    nothing wraps around): (2 shift + 1)^2 views, the unshifted one included."""
    if shift <= 0:
        return [x]
    xp = torch.nn.functional.pad(x, (0, 0, shift, shift, shift, shift), mode="replicate")
    nx, ny = x.shape[2], x.shape[3]
    return [xp[:, :, shift + dx:shift + dx + nx, shift + dy:shift + dy + ny]
            for dx in range(-shift, shift + 1) for dy in range(-shift, shift + 1)]


def _apply(model: CopyEncoder, x: torch.Tensor, features: bool) -> torch.Tensor:
    if features:
        return model.features(x).double().cpu()
    # The copy-detection embedding: the mean over in-plane shifts of the input. The conv
    # encoder is not exactly shift-invariant; averaging over shifts puts a re-positioned
    # copy next to its source (it raised the share of 1-voxel shifted phantom copies found
    # from 8/10 to 10/10 in our runs, and flagged fewer new subjects).
    views = shifted_views(x, model.cfg.tta_shift)
    return torch.stack([model(v) for v in views]).mean(0).double().cpu()


@torch.no_grad()
def embed_inputs(model: CopyEncoder, inputs: torch.Tensor, batch_size: int = 16, features: bool = False) -> np.ndarray:
    """Embeddings (N, proj_dim) float64 of prepared inputs (N, C, ...); ``features=True``:
    the pooled stage features (N, sum(channels)) instead (for FID and MMD)."""
    model.eval()
    dev = _device(model)
    out = [_apply(model, inputs[i:i + batch_size].to(dev), features)
           for i in range(0, int(inputs.shape[0]), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def embed_set(model: CopyEncoder, eval_set, batch_size: int = 8, quiet: bool = True,
              features: bool = False) -> np.ndarray:
    """Embed an EvalSet batch by batch (one batch of volumes in memory), with a progress bar."""
    model.eval()
    dev = _device(model)
    n = len(eval_set)
    bar = progress(n, f"embed {eval_set.arg}", quiet, "vol")
    out = []
    for start in range(0, n, batch_size):
        x = torch.stack([encoder_input(eval_set.unit(i), model.cfg) for i in range(start, min(n, start + batch_size))])
        out.append(_apply(model, x.to(dev), features))
        bar.update(int(x.shape[0]))
    bar.close()
    return torch.cat(out).numpy()


def save_encoder(path, model: CopyEncoder) -> Path:
    """safetensors file; the metadata holds the format tag and the EncoderConfig as JSON."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict())}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_encoder(path, arg: str = "--encoder", device="cpu") -> CopyEncoder:
    """Load a CopyEncoder written by :func:`save_encoder`; ValueError naming ``arg`` otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{arg}: {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{arg}: {path} is not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{arg}: {path} is not a medgen_rt copy-detection encoder (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    cfg = EncoderConfig.from_dict(json.loads(meta["config"]))
    model = CopyEncoder(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{arg}: {path}: the weights do not fit the stored configuration ({exc})") from exc
    return model.to(torch.device(device)).eval()
