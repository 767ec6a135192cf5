"""medgen_rt.sample(): volumes from a trained model, as arrays and (with `out`) as
files. The denoiser runs the diffusion loop on the latent, the VQ-GAN decodes it
tile by tile, every phase is metered for energy.

model: "default" (the embedded cine model), a run folder of `medgen train dit|unet|
control` (its model.json names the VQ-GAN run), or a folder holding `dit/` (or
`unet/`, `tgca/`, `controlnet/`) and `vae/` run folders.
"""
from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from medgen_rt import diffusion as D
from medgen_rt.runtime.energy import EnergyMeter

DENOISER_KINDS = ("dit", "unet", "tgca", "controlnet")
DEFAULT_MODEL = "cmr4d-tiny"


def default_model_dir() -> Path:
    return Path(str(resources.files("medgen_rt") / "default_models" / DEFAULT_MODEL))


def resolve_model(model: str) -> tuple:
    """(denoiser run folder, VQ-GAN run folder) for a model argument."""
    root = default_model_dir() if model in ("default", DEFAULT_MODEL) else Path(model)
    if not root.exists():
        raise ValueError(f"model {model!r}: no such model folder and not a known name (use 'default' or a run "
                         "folder from `medgen train`)")
    if (root / "model.json").is_file():
        denoiser = root
    else:
        found = [root / k for k in DENOISER_KINDS if (root / k / "model.json").is_file()]
        if not found:
            raise ValueError(f"model {model!r}: {root} holds no trained denoiser (model.json of a dit, unet, "
                             "tgca or controlnet run)")
        denoiser = found[0]
    info = json.loads((denoiser / "model.json").read_text())
    if info.get("kind") not in DENOISER_KINDS:
        raise ValueError(f"model {model!r}: {denoiser} is a {info.get('kind')} run, not a denoiser")
    vae = Path(info.get("vae_run") or "")
    candidates = [vae, denoiser / vae, denoiser.parent / "vae"] if str(vae) else [denoiser.parent / "vae"]
    for c in candidates:
        if (c / "model.json").is_file():
            return denoiser, c
    raise ValueError(f"model {model!r}: the VQ-GAN run it was trained on ({info.get('vae_run')}) was not found")


def _peak_memory(device) -> float:
    """GB: CUDA peak allocated since the last call on a GPU (then reset); on the CPU the
    process's peak resident memory so far (the OS keeps no per-phase peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _model_fn(model, conditional: bool):
    def fn(x, t, cond):
        t = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return model(x, t, cond) if conditional else model(x, t)
    return fn


def _load_masks(masks, info: dict, n: int, image_shape: tuple) -> list:
    """Mask NIfTI file(s) -> one-hot (K, *image) tensors, checked against the model."""
    from medgen_rt.io import is_nifti_path, read_volume

    labels = info.get("mask_labels") or []
    path = Path(masks)
    files = sorted(p for p in path.iterdir() if is_nifti_path(p)) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--masks {masks}: no NIfTI masks found")
    out = []
    for f in files:
        vol = read_volume(f, dtype=None).array
        if tuple(vol.shape) != tuple(image_shape[:3]):
            raise ValueError(f"{f}: mask shape {tuple(vol.shape)} but the model generates {tuple(image_shape[:3])}")
        if not np.all(np.equal(np.mod(vol, 1), 0)):
            raise ValueError(f"{f}: mask values must be integer labels")
        unknown = sorted(set(np.unique(vol).astype(int).tolist()) - {0} - set(labels))
        if unknown:
            raise ValueError(f"{f}: labels {unknown} are not among the model's mask labels {labels}")
        out.append((f, torch.stack([torch.from_numpy(vol == v) for v in labels]).float(), vol.astype(np.uint8)))
    return [out[i % len(out)] for i in range(n)]


def sample(model: str = "default", n: int = 1, seed: int = 0, steps: Optional[int] = None,
           sampler: Optional[str] = None, guidance: Optional[float] = None, masks=None, max_vram=None,
           device: Optional[str] = None, out=None, engine: str = "torch", eta: float = 0.0,
           energy: bool = True, country: Optional[str] = None, quiet: bool = True) -> list:
    """Generate n volumes; returns a list of dicts {"volume", "affine", "metadata", "files"}.

    volume: CT (X, Y, Z) in HU or cine (X, Y, Z, T) float32 in [0, 1]. Reproducible
    for a seed on the same device (volume i uses seed + i).
    """
    from medgen_rt.models import load_model
    from medgen_rt.runtime.device import pick_device
    from medgen_rt.sampling.decode import decoder_geometry, tiled_decode

    if engine != "torch":
        raise ValueError(f"engine {engine!r}: only 'torch' exists yet (the ONNX engine comes with its issue)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    denoiser_dir, vae_dir = resolve_model(model)
    dev = pick_device(device or "auto")
    # Check the cheap things (masks, output folder) from model.json before loading any weights.
    info = json.loads((denoiser_dir / "model.json").read_text())
    vae_info = json.loads((vae_dir / "model.json").read_text())
    diff = info["diffusion"]
    objective = diff["objective"]
    sampler = sampler or ("euler" if objective == "flow" else "ddim")
    steps = steps or (diff["timesteps"] if sampler == "ddpm" else 50)
    schedule = D.make_schedule(diff["schedule"], diff["timesteps"]) if objective == "ddpm" else None
    latent_shape = tuple(info["latent_shape"])
    scale = float(info["scale_factor"])
    geometry = info.get("geometry") or {}
    image_shape = tuple(geometry.get("image_shape") or ())
    affine = np.asarray(geometry.get("affine") or np.eye(4))
    modality = info.get("modality") or vae_info.get("modality")
    conditional = info["kind"] in ("tgca", "controlnet")
    mask_items = None
    if conditional:
        if masks is None:
            raise ValueError(f"model {model!r} is mask-conditioned: pass masks (a NIfTI file or a folder)")
        mask_items = _load_masks(masks, info, n, image_shape)
    elif masks is not None:
        raise ValueError(f"model {model!r} is not mask-conditioned; masks cannot be used")
    if out is not None:
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".medgen_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"out {out}: cannot write there ({exc})") from None

    net, _ = load_model(denoiser_dir)
    vae, _ = load_model(vae_dir)
    net, vae = net.to(dev).eval(), vae.to(dev).eval()
    meter = EnergyMeter(country=country, enabled=energy)
    dec_geometry = decoder_geometry(vae)
    core = tuple(min(s, 32) for s in latent_shape[1:])
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=n * steps, desc="denoise", unit="step", dynamic_ncols=True)
    results = []
    fn = _model_fn(net, conditional)
    for i in range(n):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        noise = torch.randn((1,) + latent_shape, generator=gen).to(dev)
        cond = null = None
        if conditional:
            cond = mask_items[i][1][None].to(dev)
            null = torch.zeros_like(cond)
        t0 = time.perf_counter()
        with meter.phase("denoise"):
            z = D.sample(fn, (1,) + latent_shape, schedule, sampler=sampler, steps=steps, eta=eta,
                         guidance_scale=guidance if conditional else None, cond=cond, null_cond=null,
                         noise=noise, generator=gen, device=dev, prediction_type=diff.get("prediction"),
                         progress=(lambda k, total: bar.update(1)) if bar is not None else None)
        t1 = time.perf_counter()
        memory = {"denoise": _peak_memory(dev)}
        tile_bar = None
        if not quiet:
            from tqdm import tqdm

            tile_bar = tqdm(desc="decode", unit="tile", dynamic_ncols=True, leave=False)
        with meter.phase("decode"):
            image = tiled_decode(vae.decode, z / scale, dec_geometry, core=core,
                                 progress=(lambda k, total: (setattr(tile_bar, "total", total), tile_bar.update(1)))
                                 if tile_bar is not None else None)[0, 0].numpy()
        if tile_bar is not None:
            tile_bar.close()
        t2 = time.perf_counter()
        memory["decode"] = _peak_memory(dev)
        if modality == "ct":
            from medgen_rt.data.preprocess import unit_to_ct

            volume = unit_to_ct(np.clip(image, -1.0, 1.0)).astype(np.float32)
        else:
            volume = ((np.clip(image, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32)
        meta = {"model": str(denoiser_dir), "vae": str(vae_dir), "kind": info["kind"],
                "preset": model if model in ("default", DEFAULT_MODEL) else None, "seed": seed + i,
                "sampler": sampler, "steps": steps, "eta": eta, "guidance": guidance if conditional else None,
                "timings_s": {"denoise": round(t1 - t0, 3), "decode": round(t2 - t1, 3)},
                "peak_memory_gb": memory,
                "device": str(dev), "engine": engine}
        if conditional:
            meta["mask"] = str(mask_items[i][0])
        results.append({"volume": volume, "affine": affine, "metadata": meta, "files": {},
                        "mask": mask_items[i][2] if conditional else None})
    if bar is not None:
        bar.close()
    report = meter.report(per=n)
    for i, r in enumerate(results):
        r["metadata"]["energy"] = {"country": report["country"], "run_kwh": report["kwh"],
                                   "run_kg_co2e": report["kg_co2e"], "per_volume": report.get("per_item"),
                                   "phases": report["phases"], "tool": report["tool"]}
        if out is not None:
            from medgen_rt.io.outputs import write_generated

            frame = float(geometry.get("frame_duration") or 0) or None
            r["files"] = write_generated(out, f"sample_{i:03d}", r["volume"], affine,
                                         "ct" if modality == "ct" else "cmr", r["metadata"], mask=r["mask"],
                                         frame_duration=frame)
    return results
