"""The self-supervised copy-detection encoder (Dar et al.): a small 3D conv encoder of
MONAI blocks, trained with the NT-Xent contrastive loss on the training volumes only.

A positive pair is a volume and a degraded view of it, made of what a generative model's
copy goes through (:mod:`.degrade`): a small affine (rotation, scale, shift), a smooth
deformation, Gaussian blur, additive noise and, for cine, a temporal shift. Every other
volume of the batch is a negative (MONAI's ``ContrastiveLoss``). No flips: a mirrored
volume is not what a copy looks like, and flip invariance would spend the embedding on it.

Input representation (``EncoderConfig``):

* 3D volumes: one channel, the volume in [-1, 1] (CT: [-1000, 1000] HU; MR: min-max),
  area-averaged to ``size`` (trilinear when enlarging), then **standardised** (zero mean,
  unit std over the volume): a global intensity scale or offset of a copy does not reach
  the encoder at all.
* cine (X, Y, Z, T): **frames as channels**: ``n_frames`` frames evenly spaced over the
  cycle from the first stored frame, each resampled to ``size``, standardised over the cine.

The embedding is the projection head's output averaged over the input shifted by -1, 0, +1
voxel along X and Y (``tta_shift``). The copy screen compares embeddings centred on the
training mean (:mod:`.memorization`). FID and MMD use the pooled stage features before the
head (``features=True``).

Training is cheap by design: the default grid is at most 32 x 32 x 16 (area averaging to it
also averages a copy's added noise away), and it stops when the NT-Xent loss stops falling.
A trained encoder is cached under the hash of its training data and settings
(:func:`obtain_encoder`), so `eval memorization`, `eval quality` and `share` on the same
training set train it once; an interrupted training resumes from its last checkpoint.

Saved as safetensors with the configuration in the file's metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..data.preprocess import frame_indices
from ..io.atomic import atomic_path

__all__ = ["EncoderConfig", "CopyEncoder", "default_size", "encoder_input", "make_augment", "train_encoder",
           "load_inputs", "embed_inputs", "embed_set", "save_encoder", "load_encoder", "progress",
           "data_fingerprint", "cache_key", "cache_dir", "obtain_encoder"]

# /2: standardised inputs, degradation views, no flips (an encoder of /1 sees other inputs)
FORMAT = "medgen_rt.copy_encoder/2"
MAX_SIZE = (32, 32, 16)
CACHE_ENV = "MEDGEN_CACHE"


@dataclass
class EncoderConfig:
    """kind: "volume" (3D) or "cine"; modality: "ct" or "mr"; size: encoder grid (X, Y, Z),
    None = the training volumes' own, capped at MAX_SIZE; n_frames: cine frames used as
    channels; channels: widths of the conv stages (their number is the depth); proj_dim: the
    embedding length. aug_*: strength of the training views (rotation in degrees about each
    axis, relative scale, shift as a fraction of the grid, largest deformation and blur sigma
    in grid voxels, noise std on the standardised scale, temporal shift in channel frames);
    tta_shift: the embedding is averaged over in-plane shifts of up to this many voxels.
    steps: the most training steps; training stops earlier once the loss has not fallen by
    ``plateau`` (relative) over ``plateau_window`` steps, after ``min_steps``."""

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
    aug_deform: float = 1.0
    aug_blur: float = 1.0
    aug_noise: float = 0.15
    aug_temporal: float = 1.0
    tta_shift: int = 1
    # On 64 x 64 x 32 CT phantoms both signals together found every copy at the issue #14
    # strengths from 300 steps on (the encoder alone from about 500); 400 for a margin.
    steps: int = 400
    min_steps: int = 150
    plateau_window: int = 50
    plateau: float = 0.05
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

    def training_settings(self) -> dict:
        """Everything that changes the trained weights (the cache key), not the history."""
        d = self.to_dict()
        d.pop("history", None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("size") is not None:
            known["size"] = tuple(int(v) for v in known["size"])
        known["channels"] = tuple(int(v) for v in known.get("channels", cls.channels))
        return cls(**known)


def default_size(shape) -> tuple:
    """The encoder grid for volumes of ``shape`` (X, Y, Z[, T]): an integer fraction of their
    own (so area averaging pools whole voxels), each side at most MAX_SIZE."""
    return tuple(int(math.ceil(s / math.ceil(s / m))) for s, m in zip(shape[:3], MAX_SIZE))


class CopyEncoder(nn.Module):
    """Stages of MONAI ``Convolution`` (3^3 conv, batch norm, ReLU) at stride 1, each but
    the first after a 2x average pooling; the global average of every stage, concatenated,
    goes through a two-layer projection head.

    Average pooling instead of strided convolutions keeps the features from aliasing, so a
    one-voxel shift changes them little. forward(x): x (B, C, X, Y, Z) standardised ->
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


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each volume of (B, C, X, Y, Z) to zero mean and unit std over all its channels and voxels."""
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / std.clamp_min(1e-6)


def encoder_input(unit: np.ndarray, cfg: EncoderConfig) -> torch.Tensor:
    """A volume in [-1, 1] ((X,Y,Z) or cine (X,Y,Z,T)) -> the encoder's input (C, *cfg.size),
    standardised."""
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
        # Area averaging when shrinking (a 512^3 CT to 32^3 would alias with trilinear taps).
        shrink = all(t <= s for t, s in zip(size, x.shape[1:]))
        x = torch.nn.functional.interpolate(x[None], size=size, mode="area" if shrink else "trilinear",
                                            **({} if shrink else {"align_corners": False}))[0]
    return standardise(x[None])[0]


def _rotations(a: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles -> (B, 3, 3) rotation matrices Rz Ry Rx."""
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(a[:, 0]), torch.zeros_like(a[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def make_augment(cfg: EncoderConfig, gen: torch.Generator):
    """The positive-pair view, applied to a whole batch (B, C, X, Y, Z) at once; random
    numbers come from ``gen`` (so a resumed training draws what the uninterrupted one would).

    One resampling per volume (grid_sample, border values) of a random affine about the
    centre (rotation up to ``aug_rotate_deg`` about each axis, scale 1 +- ``aug_scale``,
    shift up to ``aug_shift`` of the grid) plus a smooth deformation (normal vectors on a
    4^3 control grid, upsampled, largest displacement up to ``aug_deform`` voxels); then a
    Gaussian blur (sigma up to ``aug_blur`` voxels), noise (std up to ``aug_noise``), for cine
    a cyclic shift of the frames by up to ``aug_temporal`` channels (fractional: blended
    between neighbours), and the result standardised again as an input would be.
    """
    from .degrade import gaussian_blur

    max_rot = math.radians(cfg.aug_rotate_deg)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        b, dev = int(x.shape[0]), x.device
        shape = tuple(int(s) for s in x.shape[2:])
        size = torch.tensor([float(s) for s in shape], dtype=torch.float64)
        mat = _rotations(uniform((b, 3), -max_rot, max_rot)) * uniform((b, 1, 1), 1 - cfg.aug_scale,
                                                                       1 + cfg.aug_scale)
        shift = uniform((b, 3), -1.0, 1.0) * cfg.aug_shift * size
        ctrl = torch.randn((b, 3, 4, 4, 4), generator=gen, dtype=torch.float64)
        disp = torch.nn.functional.interpolate(ctrl, size=shape, mode="trilinear", align_corners=True)
        disp = disp * torch.tensor([0.0 if s == 1 else 1.0 for s in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
        amax = disp.pow(2).sum(1).sqrt().amax(dim=(1, 2, 3)).clamp_min(1e-9)
        disp = disp * (uniform((b,), 0.0, cfg.aug_deform) / amax).view(b, 1, 1, 1, 1)
        centre = (size - 1) / 2
        axes = [torch.arange(s, dtype=torch.float64) for s in shape]
        vox = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) - centre  # (X, Y, Z, 3)
        pos = torch.einsum("bij,xyzj->bxyzi", mat, vox) + centre + shift.view(b, 1, 1, 1, 3)
        pos = pos + disp.permute(0, 2, 3, 4, 1)
        norm = 2.0 * pos / (size - 1).clamp_min(1.0) - 1.0
        grid = norm.flip(-1).float().to(dev)  # grid_sample wants (last axis, ..., first axis)
        out = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                              align_corners=True)
        sig = uniform((b,), 0.0, cfg.aug_blur)
        out = torch.cat([gaussian_blur(out[i:i + 1], (float(s),) * 3) for i, s in enumerate(sig)])
        noise = uniform((b, 1, 1, 1, 1), 0.0, cfg.aug_noise).float().to(dev)
        out = out + noise * torch.randn(out.shape, generator=gen).to(dev)
        if cfg.kind == "cine" and cfg.aug_temporal > 0 and out.shape[1] > 1:
            d = uniform((b,), -cfg.aug_temporal, cfg.aug_temporal)
            rolled = []
            for i in range(b):
                k, a = int(math.floor(float(d[i]))), float(d[i]) - math.floor(float(d[i]))
                v = out[i]
                rolled.append((1 - a) * torch.roll(v, k, 0) + a * torch.roll(v, k + 1, 0))
            out = torch.stack(rolled)
        return standardise(out)

    return apply


def progress(total: int, desc: str, quiet: bool, unit: str = "it"):
    """A tqdm bar, or a silent stand-in when quiet."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _save_checkpoint(path: Path, model, opt, step: int, losses: list, gens: dict, settings: dict) -> None:
    """The whole training state as tensors and plain values (loadable with weights_only=True)."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
             "step": int(step), "losses": [float(v) for v in losses],
             "rng": {k: g.get_state() for k, g in gens.items()}, "settings": json.dumps(settings, sort_keys=True)}
    with atomic_path(path, fsync=False) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, settings: dict) -> Optional[dict]:
    """A checkpoint of a training with these settings, or None (missing, unreadable, other)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than fail
        return None
    if not isinstance(state, dict) or state.get("settings") != json.dumps(settings, sort_keys=True):
        return None
    return state


def plateaued(losses: list, cfg: EncoderConfig, chance: float = math.log(31)) -> bool:
    """True once the mean loss of the last ``plateau_window`` steps is less than ``plateau``
    (relative) below the mean of the window before, and below half the ``chance`` loss
    (log(2 batch - 1)), after ``min_steps``. NT-Xent often idles near chance before it takes off
    (a CT run sat at 2.5 of 3.4 for 200 steps and found a quarter of the shifted copies), so a
    level stretch counts only once the positives are told apart. Checked at the end of every
    window only, so a resumed training stops where the uninterrupted one would."""
    w = int(cfg.plateau_window)
    n = len(losses)
    if w <= 0 or n < max(int(cfg.min_steps), 2 * w) or n % w:
        return False
    prev, last = float(np.mean(losses[-2 * w:-w])), float(np.mean(losses[-w:]))
    return last > prev * (1.0 - float(cfg.plateau)) and last < 0.5 * chance


def train_encoder(inputs: torch.Tensor, cfg: EncoderConfig, quiet: bool = True, device="cpu",
                  log: Optional[Callable[[str], None]] = None, checkpoint: Optional[Path] = None,
                  checkpoint_every_s: float = 30.0, on_step: Optional[Callable[[int], None]] = None) -> CopyEncoder:
    """Train a CopyEncoder with NT-Xent on ``inputs`` (N, C, X, Y, Z), N >= 2.

    Each step takes ``cfg.batch_size`` volumes (all when fewer), pairs each with a view of it
    (:func:`make_augment`) and minimises MONAI's ContrastiveLoss; both go through the network
    as one batch so batch norm sees the whole 2B batch. Deterministic for a seed on one machine.
    Stops after ``cfg.steps`` or on the loss plateau (:func:`plateaued`).

    log: gets the expected time after the first step (and a summary at the end).
    checkpoint: a file for the training state, written every ``checkpoint_every_s`` seconds
    and when interrupted (KeyboardInterrupt); a matching one is resumed from, and removed at
    the end. on_step(step): called after every step (tests interrupt with it).
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
    gens = {"batch": torch.Generator().manual_seed(cfg.seed), "augment": torch.Generator().manual_seed(cfg.seed + 1)}
    augment = make_augment(cfg, gens["augment"])
    batch = min(cfg.batch_size, n)
    settings = {**cfg.training_settings(), "n": n, "inputs": _tensor_digest(inputs)}
    losses: list = []
    state = _load_checkpoint(checkpoint, settings) if checkpoint is not None and checkpoint.is_file() else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        losses = list(state["losses"])
        for k, g in gens.items():
            g.set_state(state["rng"][k])
        if log is not None:
            log(f"encoder: resuming from step {len(losses)} ({checkpoint})")
    model.train()
    bar = progress(cfg.steps, "encoder (NT-Xent)", quiet, "step")
    bar.update(len(losses))
    last_save = time.monotonic()
    step_t0 = time.monotonic()
    try:
        while len(losses) < cfg.steps and not plateaued(losses, cfg, math.log(2 * batch - 1)):
            x = inputs[torch.randperm(n, generator=gens["batch"])[:batch]].to(device)
            z = model(torch.cat([x, augment(x)]))
            loss = loss_fn(z[:batch], z[batch:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None and len(losses) == (state["step"] if state else 0) + 1:
                sec = time.monotonic() - step_t0
                left = cfg.steps - len(losses)
                log(f"encoder: training on {n} volumes, grid {'x'.join(map(str, cfg.size))}: about "
                    f"{_duration(sec * left)} for up to {left} more steps at {sec:.2f} s each (it stops "
                    f"earlier when the loss levels off)" + (f"; an interrupted run resumes from {checkpoint}"
                                                            if checkpoint is not None else ""))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_step is not None:
                on_step(len(losses))
            if checkpoint is not None and time.monotonic() - last_save >= checkpoint_every_s:
                _save_checkpoint(checkpoint, model, opt, len(losses), losses, gens, settings)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        if checkpoint is not None and losses:
            _save_checkpoint(checkpoint, model, opt, len(losses), losses, gens, settings)
        raise
    finally:
        bar.close()
    model.eval()
    k = max(1, min(20, len(losses) // 10))
    w = max(1, int(cfg.plateau_window))
    cfg.history = {"steps": len(losses), "stopped": "plateau" if len(losses) < cfg.steps else "steps",
                   "loss_first": float(np.mean(losses[:k])) if losses else None,
                   "loss_last": float(np.mean(losses[-k:])) if losses else None,
                   "loss_chance": float(math.log(2 * batch - 1)), "batch": batch, "n_train": n,
                   "loss_per_window": [round(float(np.mean(losses[i:i + w])), 4) for i in range(0, len(losses), w)]}
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    if log is not None and losses:
        log(f"encoder: {len(losses)} NT-Xent steps ({cfg.history['stopped']}), loss {cfg.history['loss_first']:.3f} "
            f"-> {cfg.history['loss_last']:.3f}")
    return model


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


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
    # copy next to its source.
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


def save_encoder(path, model: CopyEncoder, extra: Optional[dict] = None) -> Path:
    """safetensors file; the metadata holds the format tag, the EncoderConfig as JSON and
    ``extra`` (e.g. the cache key and the training data's fingerprint)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(model.cfg.to_dict()),
            **{k: str(v) for k, v in (extra or {}).items()}}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_metadata(path) -> dict:
    """The metadata of an encoder file ({} when it cannot be read)."""
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


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
    if meta.get("format", "").startswith("medgen_rt.copy_encoder/") and meta.get("format") != FORMAT:
        raise ValueError(f"{arg}: {path} was written by an older medgen_rt (format {meta.get('format')!r}, expected "
                         f"{FORMAT!r}); delete it and it is trained again")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{arg}: {path} is not a medgen_rt copy-detection encoder (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    cfg = EncoderConfig.from_dict(json.loads(meta["config"]))
    model = CopyEncoder(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{arg}: {path}: the weights do not fit the stored configuration ({exc})") from exc
    model.meta = {k: v for k, v in meta.items() if k not in ("format", "config")}
    return model.to(torch.device(device)).eval()


# --------------------------------------------------------------------------- the cache


def data_fingerprint(eval_set) -> str:
    """A hash of a set's volumes as files: each image's name relative to the folder, size and
    modification time (ns), plus the modality. Cheap for any data size; copying or rewriting a
    file changes it (the encoder is then trained again, which is safe)."""
    h = hashlib.sha256(f"{eval_set.modality}|{eval_set.ndim}".encode())
    for e in eval_set.entries:
        st = e.image.stat()
        h.update(f"|{e.image.relative_to(eval_set.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(fingerprint: str, cfg: EncoderConfig) -> str:
    """The cache key of an encoder: its format, the training data and the training settings."""
    blob = json.dumps({"format": FORMAT, "data": fingerprint, "settings": cfg.training_settings()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir() -> Path:
    """Where trained encoders are kept: $MEDGEN_CACHE/encoders, else $XDG_CACHE_HOME/medgen_rt/
    encoders, else ~/.cache/medgen_rt/encoders."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medgen_rt")
    return Path(root) / "encoders"


def obtain_encoder(train_set, cfg: EncoderConfig, path: Optional[Path] = None, quiet: bool = True, device="cpu",
                   log: Optional[Callable[[str], None]] = None, arg: str = "--encoder") -> tuple:
    """The copy encoder for ``train_set`` with the settings ``cfg``: (model, info, inputs).

    1. ``path`` given and present: loaded as it is (any encoder; info says whether it was
       trained on this very data).
    2. the cache (:func:`cache_dir`) holds one for this data and these settings: loaded.
    3. else trained, checkpointing beside its cache file (a matching checkpoint is resumed),
       and saved to the cache and to ``path`` when given.

    cfg.kind and cfg.modality are set from the set. info: source ("file", "cache" or
    "trained"), key, fingerprint, file (where it lives), matches_data (bool or None), seconds,
    saved_to (``path``, when it was written there).
    inputs: the training set's encoder inputs when they were read here (else None), so the
    caller need not read them again.
    """
    from .datasets import EvalInputError

    t0 = time.monotonic()
    cfg.kind, cfg.modality = ("cine" if train_set.is_cine else "volume"), train_set.modality
    fp = data_fingerprint(train_set)
    if path is not None and Path(path).exists():
        model = load_encoder(path, arg, device)
        want = cfg.kind, cfg.modality
        if (model.cfg.kind, model.cfg.modality) != want:
            raise EvalInputError(f"{arg}: trained on {model.cfg.modality.upper()} {model.cfg.kind} inputs but "
                                 f"{train_set.arg} holds {train_set.modality.upper()} {cfg.kind} inputs")
        fp_file = model.meta.get("data_fingerprint")
        return model, {"source": "file", "file": str(path), "key": model.meta.get("key"), "fingerprint": fp,
                       "matches_data": None if fp_file is None else fp_file == fp,
                       "seconds": time.monotonic() - t0}, None
    if cfg.size is None:
        from ..io.nifti import read_info

        cfg.size = default_size(read_info(train_set.entries[0].image).shape)
    key = cache_key(fp, cfg)
    folder = cache_dir()
    cached = folder / f"{key[:24]}.safetensors"
    if cached.is_file():
        try:
            model = load_encoder(cached, "cache", device)
        except ValueError as exc:  # a damaged cache file is trained again, never fatal
            if log is not None:
                log(f"encoder: ignoring {cached}: {exc}")
        else:
            info = {"source": "cache", "file": str(cached), "key": key, "fingerprint": fp, "matches_data": True}
            if path is not None:
                info["saved_to"] = str(save_encoder(path, model, model.meta))
            return model, {**info, "seconds": time.monotonic() - t0}, None
    if len(train_set) < 2:
        raise EvalInputError(f"{train_set.arg}: need at least 2 volumes to train the encoder, found {len(train_set)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usable = os.access(folder, os.W_OK)
    except OSError:
        usable = False
    if not usable and log is not None:
        log(f"encoder: the cache folder {folder} is not writable (set {CACHE_ENV}); training without a cache")
    inputs = load_inputs(train_set, cfg, quiet, f"read {train_set.arg}")
    model = train_encoder(inputs, cfg, quiet=quiet, device=device, log=log,
                          checkpoint=folder / f"{key[:24]}.partial.pt" if usable else None)
    meta = {"key": key, "data_fingerprint": fp, "n_train": len(train_set)}
    model.meta = meta
    if usable:
        try:
            save_encoder(cached, model, meta)
        except OSError as exc:
            if log is not None:
                log(f"encoder: could not cache it in {folder}: {exc}")
    info = {"source": "trained", "file": str(cached) if usable else None, "key": key, "fingerprint": fp,
            "matches_data": True}
    if path is not None:
        info["saved_to"] = str(save_encoder(path, model, meta))
    return model, {**info, "seconds": time.monotonic() - t0}, inputs
