"""`medgen encode`: a trained VQ-GAN turns an image data set into cached latents
(see medgen_rt.train.latents) with their 1/std scale factor, so the diffusion
model trains without the autoencoder. Masks (CT label maps) are kept beside the
latents at image resolution for TGCA / ControlNet training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medgen_rt.data.preprocess import sampled_frame_duration
from medgen_rt.diffusion import latent_scale_factor
from medgen_rt.io.atomic import atomic_folder, check_out
from medgen_rt.train.latents import write_latent_set
from medgen_rt.train.vae import open_image_set

# volumes above this many voxels are encoded streamed (slab by slab), not at once:
# a 512x512x256 CT through the ct-ds8 encoder would otherwise need ~17 GB
STREAM_ENCODE_VOXELS = 2 ** 24


def encode_dataset(vae_run: str, data: str, out: str, device: str = "auto", quiet: bool = False,
                   overwrite: bool = False) -> dict:
    from medgen_rt.models import load_model
    from medgen_rt.runtime.device import pick_device

    out = check_out(out)  # before the model is loaded and every volume encoded
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: exists and is not empty; choose another folder or pass --overwrite")
    model, info = load_model(vae_run)
    if info.get("kind") != "vqgan":
        raise ValueError(f"--vae {vae_run}: a VQ-GAN run is needed, this is a {info.get('kind')} run")
    dev = pick_device(device)
    model = model.to(dev).eval()
    modality = info["modality"]
    dataset = open_image_set(data, modality, info.get("data", {}))
    if len(dataset) == 0:
        raise ValueError(f"--data {data}: no volumes found")

    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc="encode", unit="volume", dynamic_ncols=True)
    latents, names, masks, geometry, durations = [], [], [], None, []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            image = torch.from_numpy(np.ascontiguousarray(item["image"], dtype=np.float32))
            x = image[None, None].to(dev)
            if image.numel() > STREAM_ENCODE_VOXELS:
                from medgen_rt.sampling.decode import streamed_encode

                z = model.quantizer.lookup(streamed_encode(model, x))[1][0].cpu()
            else:
                z = model.encode_to_latent(x)[0].cpu()
            latents.append(z)
            names.append(item["name"])
            mask = item.get("mask")
            masks.append(None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.uint8)))
            if geometry is None:
                geometry = {"image_shape": list(image.shape), "affine": np.asarray(item["affine"]).tolist()}
            if item.get("frame_duration") is not None:  # cine: the spacing of the frames the model sees
                durations.append(sampled_frame_duration(item["frame_duration"], item["info"]["NbFrame"],
                                                        len(item["frame_indices"])))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if any(m is None for m in masks) and any(m is not None for m in masks):
        raise ValueError(f"--data {data}: some volumes have masks and some do not; all or none must")
    if durations:
        # the cines' heart rates differ: a generated cine gets their median (written to every
        # output's NIfTI pixdim[4] and sidecar; medgen_rt.sampling.summary.VolumeWriter)
        geometry["frame_duration"] = round(float(np.median(durations)), 6)
    scale = latent_scale_factor(latents)
    with atomic_folder(out) as tmp:  # a full disk or an unwritable name: no half latents folder is left
        write_latent_set(tmp, zip(names, latents, masks), scale,
                         extra={"vae_run": str(Path(vae_run).resolve()), "modality": modality,
                                "geometry": geometry, "data": str(Path(data).resolve())})
    return {"items": len(latents), "latent_shape": list(latents[0].shape), "scale_factor": scale, "out": str(out)}
