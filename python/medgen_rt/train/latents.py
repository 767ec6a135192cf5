"""Cached latents (written by `medgen encode`), so the diffusion model trains
without the autoencoder in memory.

    LATENTS/latents.json   vae run, modality, latent shape, scale factor (1/std),
                           image geometry {image_shape, affine, and for cine
                           frame_duration: the median seconds per model frame},
                           items [{name, file, mask}]
    LATENTS/items/NAME.safetensors   "latent": (C, ...) float32, and "mask":
                           (K, ...) uint8 at image resolution when masks exist
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

INDEX = "latents.json"


@dataclass
class LatentSet:
    root: Path
    index: dict
    items: list

    def __len__(self) -> int:
        return len(self.items)

    @property
    def scale_factor(self) -> float:
        return float(self.index["scale_factor"])

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.index["latent_shape"])

    @property
    def has_masks(self) -> bool:
        return all(item.get("mask") for item in self.items)

    def load(self, i: int) -> dict:
        item = self.items[i]
        path = self.root / item["file"]
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: unreadable latent file ({exc})") from exc
        return tensors

    def subset(self, indices) -> "LatentSet":
        return LatentSet(self.root, self.index, [self.items[i] for i in indices])


def open_latents(root, require_masks: bool = False) -> LatentSet:
    root = Path(root)
    index_path = root / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{root}: not a latents folder (no {INDEX}); make one with `medgen encode`")
    index = json.loads(index_path.read_text())
    items = index.get("items", [])
    if not items:
        raise ValueError(f"{root}: the latents folder lists no items")
    missing = [it["file"] for it in items if not (root / it["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: latent files missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    out = LatentSet(root, index, items)
    if require_masks and not out.has_masks:
        raise ValueError(f"{root}: this training needs masks, but the latents were encoded without them "
                         "(encode a data folder that has masks)")
    return out


def split_train_val(latents: LatentSet, val: Optional[LatentSet], val_fraction: float = 0.1) -> tuple:
    """Training and validation sets: a given validation folder, else the last ~10% of items."""
    if val is not None:
        return latents, val
    n = len(latents)
    if n < 2:
        raise ValueError(f"{latents.root}: at least 2 items are needed to hold one out for validation "
                         "(or pass --val-latents)")
    n_val = max(1, int(round(n * val_fraction)))
    return latents.subset(range(n - n_val)), latents.subset(range(n - n_val, n))


def check_latents_fit(latents: LatentSet, in_channels: int, spatial: tuple, where: str) -> None:
    shape = latents.latent_shape
    if shape[0] != in_channels or tuple(shape[1:]) != tuple(spatial):
        raise ValueError(f"{where}: the latents in {latents.root} have shape {shape} but the model expects "
                         f"({in_channels}, {', '.join(map(str, spatial))})")


def per_sample_generator(seed: int, step: int, position: int, stream: int = 0) -> torch.Generator:
    """A generator owned by one sample of one step: the same on any process count and after resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + position * 7 + stream) % (2**63 - 1))


def write_latent_set(root, items, scale_factor: float, extra: Optional[dict] = None) -> LatentSet:
    """Writes a latents folder. items: iterable of (name, latent (C, ...) tensor,
    mask uint8 tensor or None). The index is written last, so a folder with an
    index is complete."""
    from medgen_rt.io.sidecar import write_json_atomic
    from medgen_rt.train.checkpoint import save_weights

    root = Path(root)
    (root / "items").mkdir(parents=True, exist_ok=True)
    listed, shape = [], None
    for name, latent, mask in items:
        if shape is None:
            shape = tuple(latent.shape)
        elif tuple(latent.shape) != shape:
            raise ValueError(f"{name}: latent shape {tuple(latent.shape)} differs from the first item's {shape}")
        tensors = {"latent": latent.detach().float().cpu().contiguous()}
        if mask is not None:
            tensors["mask"] = mask.detach().to(torch.uint8).cpu().contiguous()
        rel = f"items/{name}.safetensors"
        save_weights(root / rel, tensors)
        listed.append({"name": name, "file": rel, "mask": mask is not None})
    index = {**(extra or {}), "latent_shape": list(shape), "scale_factor": float(scale_factor), "items": listed}
    write_json_atomic(root / INDEX, index)
    return LatentSet(root, index, listed)
