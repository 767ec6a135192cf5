"""VQ-GAN training task: L1 + commitment + least-squares PatchGAN (after a
warm-up) + optional spectral loss, on image data in [-1, 1].

Cine (modality cmr): items are single short-axis slices (1, X, Y, T) of the
ACDC-layout subjects, frames cycled to data.frames from ED, in-plane random
crops of data.crop. CT: random crops data.crop of the volumes. Validation
reconstructs whole held-out subjects and reports L1 and PSNR (data range 2).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from medgen_rt.train.latents import per_sample_generator
from medgen_rt.train.tasks import TrainingTask


def open_image_set(path: str, modality: str, data_cfg: dict):
    """The loader for a data folder: ACDCDataset for cine, VolumeFolder for CT."""
    from medgen_rt.data import ACDCDataset, VolumeFolder

    if modality == "cmr":
        return ACDCDataset(path, n_frames=int(data_cfg.get("frames", 16)))
    return VolumeFolder(path, kind="ct")


def _random_crop(vol: torch.Tensor, size, gen: torch.Generator) -> torch.Tensor:
    """vol (C, *S); crops the leading len(size) spatial axes (padding with -1 if smaller)."""
    out = vol
    for axis, want in enumerate(size):
        dim = axis + 1
        n = out.shape[dim]
        if n < want:  # smaller than the crop: pad with background (-1)
            out = torch.nn.functional.pad(out, _pad_spec(out.dim(), dim, want - n), value=-1.0)
        elif n > want:
            start = int(torch.randint(0, n - want + 1, (), generator=gen))
            out = out.narrow(dim, start, want)
    return out


def _pad_spec(ndim: int, dim: int, amount: int) -> list:
    spec = [0, 0] * ndim  # F.pad lists the last axis first
    spec[2 * (ndim - 1 - dim) + 1] = amount
    return spec


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    mse = float(torch.mean((x.double() - y.double()) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


class VQGANTask(TrainingTask):
    name = "vae"

    def __init__(self, model, discriminator, loss, train_set, val_set, modality: str, data_cfg: dict, device,
                 model_info: dict, disc_lr: Optional[float] = None):
        self.model = model.to(device)
        self.discriminator = discriminator.to(device)
        self.loss = loss
        self.train_set, self.val_set = train_set, val_set
        self.modality = modality
        self.device = device
        self._info = model_info
        self.disc_lr = disc_lr
        self.crop = tuple(data_cfg.get("crop", ()))
        self.crops_per_volume = int(data_cfg.get("crops_per_volume", 4))
        self.cache_volumes = int(data_cfg.get("cache_volumes", 32))
        self._cache: OrderedDict = OrderedDict()
        first = self._volume(self.train_set, 0)
        self.n_slices = first.shape[2] if modality == "cmr" else 1

    def _volume(self, dataset, i: int) -> torch.Tensor:
        """Preprocessed volume, from a bounded in-memory cache (data.cache_volumes, default 32):
        small sets stay in memory, large ones do not exhaust it."""
        key = (id(dataset), i)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        vol = torch.from_numpy(np.ascontiguousarray(dataset[i]["image"], dtype=np.float32))
        self._cache[key] = vol
        if len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return vol

    def modules(self) -> dict:
        return {"model": self.model, "discriminator": self.discriminator}

    def parameter_groups(self) -> dict:
        return {"generator": list(self.model.parameters()), "discriminator": list(self.discriminator.parameters())}

    def learning_rates(self) -> dict:
        return {"discriminator": self.disc_lr} if self.disc_lr else {}

    def num_train(self) -> int:
        per = self.n_slices if self.modality == "cmr" else self.crops_per_volume
        return len(self.train_set) * per

    def _training_item(self, index: int, gen: torch.Generator) -> torch.Tensor:
        if self.modality == "cmr":
            subject, z = divmod(index, self.n_slices)
            vol = self._volume(self.train_set, subject)  # (X, Y, Z, T)
            item = vol[:, :, z, :][None]  # (1, X, Y, T)
        else:
            vol = self._volume(self.train_set, index // self.crops_per_volume)
            item = vol[None]  # (1, X, Y, Z)
        return _random_crop(item, self.crop, gen) if self.crop else item

    def make_batch(self, indices, positions, step, seed) -> dict:
        items = [self._training_item(i, per_sample_generator(seed, step, p)) for i, p in zip(indices, positions)]
        return {"images": torch.stack(items).to(self.device)}

    def losses(self, batch, step) -> tuple:
        images = batch["images"]
        recon, vq_loss, extras = self.model(images)
        g = self.loss.generator_loss(images, recon, vq_loss, self.discriminator, step)
        d = self.loss.discriminator_loss(images, recon, self.discriminator, step)
        logs = {k: float(g[k].detach()) for k in ("l1", "vq", "adv")}
        logs["perplexity"] = float(extras["perplexity"].detach())
        if self.loss.adversarial_active(step):
            logs.update(d_real=float(d["d_real"].detach()), d_fake=float(d["d_fake"].detach()))
        disc = d["loss"] if d["loss"].requires_grad else sum(p.sum() * 0.0 for p in self.discriminator.parameters())
        return {"generator": g["loss"], "discriminator": disc}, logs

    @torch.no_grad()
    def reconstruct(self, volume: torch.Tensor) -> torch.Tensor:
        """A whole subject through the autoencoder: (X, Y, Z, T) cine or (X, Y, Z) CT, same shape out."""
        x = volume[None, None].to(self.device)
        return self.model.decode(self.model.encode_to_latent(x))[0, 0].cpu()

    @torch.no_grad()
    def validate(self) -> dict:
        was = self.model.training
        self.model.eval()
        l1, scores = [], []
        for i in range(len(self.val_set)):
            vol = self._volume(self.val_set, i)
            rec = self.reconstruct(vol)
            l1.append(float((rec - vol).abs().mean()))
            scores.append(psnr(rec, vol))
        self.model.train(was)
        return {"l1": float(np.mean(l1)), "psnr": float(np.mean(scores))}


def build_vae_task(args, cfg: dict, section: dict, device, where: str) -> VQGANTask:
    from medgen_rt.models.discriminator import PatchDiscriminator
    from medgen_rt.models.losses import VQGANLoss
    from medgen_rt.models.vqgan import build_vqgan

    modality = cfg["modality"]
    data_cfg = dict(cfg.get("data", {}))
    dataset = open_image_set(args.data, modality, data_cfg)
    if args.val_data:
        train, val = dataset, open_image_set(args.val_data, modality, data_cfg)
    else:
        n = len(dataset)
        if n < 2:
            raise ValueError(f"--data {args.data}: at least 2 subjects are needed to hold one out (or pass --val-data)")
        n_val = max(1, int(round(0.1 * n)))
        train, val = _Subset(dataset, range(n - n_val)), _Subset(dataset, range(n - n_val, n))
    model = build_vqgan(section["model"], **dict(section.get("model_overrides", {})))
    disc_cfg = dict(section.get("discriminator", {}))
    disc = PatchDiscriminator(spatial_dims=3, in_channels=model.config.in_channels, **disc_cfg)
    loss_cfg = dict(section.get("loss", {}))
    weights = loss_cfg.pop("perceptual_weights", None)  # a local MedicalNet-style file; never downloaded
    perceptual = None
    if loss_cfg.get("perceptual_weight", 0) > 0:
        from medgen_rt.models.losses import PerceptualLoss

        perceptual = PerceptualLoss(weights, depth=int(loss_cfg.pop("perceptual_depth", 10)))
    loss = VQGANLoss(perceptual=perceptual, **loss_cfg)
    info = {"kind": "vqgan", "config": model.config_dict(), "modality": modality, "data": data_cfg,
            "downsample_factor": list(model.downsample_factor)}
    return VQGANTask(model, disc, loss, train, val, modality, data_cfg, device, info,
                     disc_lr=section.get("discriminator_lr"))


class _Subset:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]
