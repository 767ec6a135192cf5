"""medgen_rt.sample(): volumes from a trained model, as arrays and (with `out`) as
files. The denoiser runs the diffusion loop on the latent, the VQ-GAN decodes it
tile by tile, every phase is metered for energy.

model: an embedded model by name (see EMBEDDED_MODELS: "default" or "cine" is the cine
model, "ct" the mask-conditioned CT model), a run folder of `medgen train dit|unet|
control` (its model.json names the VQ-GAN run), or a folder holding `dit/` (or
`unet/`, `tgca/`, `controlnet/`) and `vae/` run folders.
"""
from __future__ import annotations

import inspect
import json
import math
import re
import time
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from medgen_rt import diffusion as D
from medgen_rt.runtime.energy import EnergyMeter

DENOISER_KINDS = ("dit", "unet", "tgca", "controlnet")
DEFAULT_MODEL = "cmr4d-tiny"
# the models shipped in medgen_rt/default_models (name -> what it makes) and their short names
EMBEDDED_MODELS = {"cmr4d-tiny": "cine MR, 96x96x8 x 16 frames, unconditional",
                   "ct-tiny": "thoracic CT, 64x64x32, conditioned on a cardiac label map (TGCA)"}
ALIASES = {"default": DEFAULT_MODEL, "cine": "cmr4d-tiny", "ct": "ct-tiny"}


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    return Path(str(resources.files("medgen_rt") / "default_models" / ALIASES.get(name, name)))


def embedded_name(model: str) -> Optional[str]:
    """The embedded model a --model argument names, or None for a folder."""
    name = ALIASES.get(model, model)
    return name if name in EMBEDDED_MODELS else None


def resolve_model(model: str) -> tuple:
    """(denoiser run folder, VQ-GAN run folder) for a model argument."""
    name = embedded_name(model)
    root = default_model_dir(name) if name else Path(model)
    if not root.exists():
        names = ", ".join(list(ALIASES) + list(EMBEDDED_MODELS))
        raise ValueError(f"model {model!r}: no such model folder and not an embedded model ({names}; or a run "
                         "folder from `medgen train`)")
    if (root / "model.json").is_file():
        denoiser = root
    else:
        found = [root / k for k in DENOISER_KINDS if (root / k / "model.json").is_file()]
        if not found:
            raise ValueError(f"model {model!r}: {root} holds no trained denoiser (model.json of a dit, unet, "
                             "tgca or controlnet run)")
        denoiser = found[0]
    from medgen_rt.sampling.validate import check_model_folder
    from medgen_rt.train.checkpoint import read_model_info

    info = read_model_info(denoiser)  # errors name the file
    if info.get("kind") not in DENOISER_KINDS:
        raise ValueError(f"model {model!r}: {denoiser} is a {info.get('kind')} run, not a denoiser")
    vae = Path(str(info.get("vae_run") or ""))
    candidates = [vae, denoiser / vae, denoiser.parent / "vae"] if str(vae) else [denoiser.parent / "vae"]
    for c in candidates:
        if (c / "model.json").is_file():
            check_model_folder(denoiser, c)  # model.json and weights fit each other, before any sampling
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


def decode_latent(vae, latent: torch.Tensor, chunk: int, axis: Optional[int] = None, progress=None,
                  log=None) -> torch.Tensor:
    """Decode with the least memory that works: streamed (medgen_rt VQ-GANs) with `chunk`
    latent planes per step; on CUDA out-of-memory the chunk is halved and the decode
    retried, and below one plane the cross-section is tiled with a halo, halving the
    tile until it fits. Returns (B, C, *output) float32 on the CPU."""
    from medgen_rt.sampling.decode import decoder_geometry, streamable, streamed_decode, tiled_decode

    def retry(what):
        if log is not None:
            log(f"decode: CUDA out of memory, retrying with {what}")
        torch.cuda.empty_cache()

    if streamable(vae):
        while True:
            try:
                return streamed_decode(vae, latent, axis=axis, chunk=chunk, progress=progress)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    break
                chunk //= 2
                retry(f"{chunk} latent plane(s) per step")
    geometry = decoder_geometry(vae)
    core = [min(s, 32) for s in latent.shape[2:]]
    while True:
        try:
            return tiled_decode(vae.decode, latent, geometry, core=core, progress=progress)
        except torch.cuda.OutOfMemoryError:
            if max(core) <= 2:
                raise
            core = [max(1, c // 2) for c in core]
            retry(f"tiles of {core} latent voxels")


def _voxel_size(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _load_masks(masks, info: dict, n: int, image_shape: tuple, affine: np.ndarray) -> list:
    """Mask NIfTI file(s) -> (path, one-hot (K, *image) tensor, labels, the mask's affine), checked
    against the model: shape, integer labels it knows, and its voxel size (a map at another
    scale would be drawn at the model's scale)."""
    from medgen_rt.io import is_nifti_path, read_volume
    from medgen_rt.io.nifti import check_labels

    labels = info.get("mask_labels") or []
    path = Path(masks)
    files = sorted(p for p in path.iterdir() if is_nifti_path(p)) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--masks {masks}: no NIfTI masks found")
    out = []
    for f in files:
        mask = read_volume(f, dtype=None)
        vol = mask.array
        if tuple(vol.shape) != tuple(image_shape[:3]):
            raise ValueError(f"{f}: mask shape {tuple(vol.shape)} but the model generates {tuple(image_shape[:3])}")
        check_labels(f, vol, labels, "the model's mask labels")  # the one label check of every reader (integers too)
        want, got = _voxel_size(affine), _voxel_size(mask.affine)
        if not np.allclose(got, want, rtol=0.01):
            raise ValueError(f"{f}: voxel size {tuple(np.round(got, 3))} mm but the model was trained at "
                             f"{tuple(np.round(want, 3))} mm")
        out.append((f, torch.stack([torch.from_numpy(vol == v) for v in labels]).float(), vol.astype(np.uint8),
                    np.asarray(mask.affine, dtype=np.float64)))
    return [out[i % len(out)] for i in range(n)]


def sample(model: str = "default", n: int = 1, seed: int = 0, steps: Optional[int] = None,
           sampler: Optional[str] = None, guidance: Optional[float] = None, masks=None, max_vram=None,
           device: Optional[str] = None, out=None, engine: str = "torch", eta: float = 0.0,
           energy: bool = True, country: Optional[str] = None, quiet: bool = True,
           indices: Optional[list] = None, quantize: bool = True, unconditional: bool = False,
           overwrite: bool = False, format: str = "nifti", cache: Optional[float] = None) -> list:
    """Generate n volumes; returns a list of dicts {"volume", "affine", "metadata", "files"}.

    volume: CT (X, Y, Z) in HU or cine (X, Y, Z, T) float32 in [0, 1]. Volume i uses
    seed + i and is written as sample_{i:03d}; reproducible on the same device.
    max_vram ("8GB", bytes): plan the denoiser batch and the decode chunk to fit it
    (see medgen_rt.sampling.planner); the plan is in every sidecar. indices: which of
    the n volumes this process makes (several GPUs: see medgen_rt.sample).
    quantize: snap generated latents to the nearest codebook entries before decoding,
    as the published samplers do (False decodes the continuous latent).
    unconditional: a mask-conditioned model samples with the null condition (the all-zero
    map its condition dropout trained), without masks and without guidance.
    engine="onnx": `model` is a `medgen export onnx` folder, run by onnxruntime
    without PyTorch (medgen_rt.export.engine); its initial noise comes from numpy,
    so a seed gives other volumes than the torch runtime's.
    out: a folder (or a medgen_rt.io.outputs.OutputFolder); each volume is written as soon as
    it is decoded. The folder is locked for the call; one that holds an earlier run's samples
    is refused unless overwrite=True, which removes them first (see OutputFolder).
    format: what each volume is written as, "nifti", "dicom" or "nifti+dicom" (medgen_rt.io.dicom);
    an OutputFolder given as `out` carries its own.
    cache: step caching (DiT and TGCA models, torch engine): a block whose modulated input
    changed by less than this relative L1 since its last evaluation reuses that evaluation's
    residual (medgen_rt.models.step_cache); 0 caches nothing and gives the uncached volumes.
    The sidecar's "cache" holds the threshold and the block calls run and skipped.
    """
    from medgen_rt.io.dicom import parse_format
    from medgen_rt.io.outputs import OutputFolder

    formats = parse_format(format, "format")
    if out is not None and not isinstance(out, OutputFolder):
        # a path: this call owns the folder and its lock until it returns
        params = {k: v for k, v in locals().items() if k in _SAMPLE_PARAMS}
        with OutputFolder(out, overwrite=overwrite, formats=formats) as folder:
            return sample(**{**params, "out": folder})
    from medgen_rt.sampling.summary import VolumeWriter, image_to_volume, memory_key, portable_path

    if engine == "onnx":
        from medgen_rt.export.engine import OnnxEngine

        if cache is not None:
            raise ValueError("--cache: step caching needs the network's blocks, so it is torch-runtime only; "
                             "use engine 'torch' or omit cache")
        if max_vram is not None or indices is not None:
            raise ValueError("engine 'onnx': max_vram and indices belong to the torch runtime")
        if unconditional:
            raise ValueError("engine 'onnx': unconditional sampling of a mask-conditioned model is not in the "
                             "ONNX engine yet; use the torch engine")
        return OnnxEngine(model, device=device or "auto").sample(
            n=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance, masks=masks, out=out, eta=eta,
            energy=energy, country=country, quiet=quiet, quantize=quantize)
    if engine != "torch":
        raise ValueError(f"engine must be 'torch' or 'onnx', got {engine!r}")
    prep = _prepare(model, n, seed, steps, sampler, guidance, masks, max_vram, device, eta, unconditional, cache)
    if out is not None:
        out.open()  # locked, checked and cleared of killed runs' temporary files (io.outputs.OutputFolder)
    indices = list(range(n)) if indices is None else list(indices)
    net, vae, plan = _load_and_plan(prep, len(indices) or 1, max_vram)
    denoiser_dir, vae_dir, dev, info, diff = prep.denoiser_dir, prep.vae_dir, prep.dev, prep.info, prep.diff
    objective, sampler, steps, schedule = prep.objective, prep.sampler, prep.steps, prep.schedule
    latent_shape, geometry, affine, modality = prep.latent_shape, prep.geometry, prep.affine, prep.modality
    conditional, mask_items, step_cache = prep.conditional, prep.mask_items, prep.step_cache
    scale = float(info["scale_factor"])
    vae.to("cpu")
    dtype = getattr(torch, plan.denoiser_dtype)
    net.to(dtype)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    batch = plan.batch  # step noise comes per volume (its own seed stream): stochastic samplers batch too
    meter = EnergyMeter(country=country, enabled=energy)
    # each volume goes to disk as soon as it is decoded: a run that fails late keeps what it made
    writer = VolumeWriter(out, meter, modality, geometry)
    mem = memory_key(dev.type)
    base = out.path if out is not None else None  # sidecar paths are relative to the output folder
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(indices) * steps, desc="denoise", unit="step", dynamic_ncols=True)
    fn = D.network_fn(net, conditional, dtype)
    for first in range(0, len(indices), batch):
        group = indices[first:first + batch]
        _give_device(net, vae, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # noise from each volume's own seed, so batching does not change a volume
        noise = torch.cat([torch.randn((1,) + latent_shape, generator=torch.Generator().manual_seed(seed + i))
                           for i in group]).to(dev)
        cond = null = None
        if conditional:
            # in the network's dtype (network_fn casts to it anyway: the same values, not held twice);
            # the null condition only where a guided call needs it (planner.condition_bytes)
            cond = torch.stack([mask_items[i][1] for i in group]).to(dev, dtype)
            null = torch.zeros_like(cond) if prep.guided else None
        t0 = time.perf_counter()
        # the cache starts empty for each batch (attach resets it) and leaves the model afterwards
        with meter.phase("denoise"), (step_cache.attach(net) if step_cache is not None else nullcontext()):
            z = D.sample(fn, noise.shape, schedule, sampler=sampler, steps=steps, eta=eta,
                         guidance_scale=guidance if conditional else None, cond=cond, null_cond=null,
                         noise=noise, step_seeds=[seed + i for i in group], device=dev,
                         # flow runs record the DDPM default prediction; the Euler sampler takes velocity only
                         prediction_type=diff.get("prediction") if objective == "ddpm" else None,
                         progress=(lambda k, total: bar.update(len(group))) if bar is not None else None)
        seconds = (time.perf_counter() - t0) / len(group)
        # one decision per block call for the whole batch: every volume of it ran and skipped the same blocks
        cache_stats = step_cache.stats() if step_cache is not None else None
        peak = _peak_memory(dev)
        latents = {i: (z[j:j + 1] / scale).float().cpu() for j, i in enumerate(group)}
        del z, noise, cond, null
        _give_device(vae, net, dev)  # the decoder gets the GPU to itself
        for i in group:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            tile_bar = None
            if not quiet:
                from tqdm import tqdm

                tile_bar = tqdm(desc="decode", unit="plane", dynamic_ncols=True, leave=False)
            t1 = time.perf_counter()
            with meter.phase("decode"):
                # snapped to the nearest codebook entries first, as the published samplers decode
                z = latents.pop(i).to(dev)
                z = vae.quantizer.lookup(z)[1] if quantize else z
                image = decode_latent(vae, z, plan.decode_chunk, axis=plan.decode_axis,
                                      progress=(lambda k, total: (setattr(tile_bar, "total", total),
                                                                  tile_bar.update(k - tile_bar.n)))
                                      if tile_bar is not None else None,
                                      log=None if quiet else (lambda msg: print(msg, flush=True)))[0, 0].numpy()
            if tile_bar is not None:
                tile_bar.close()
            decode_seconds = round(time.perf_counter() - t1, 3)
            volume = image_to_volume(image, modality)
            entry = {"model": portable_path(denoiser_dir, base), "vae": portable_path(vae_dir, base),
                     "kind": info["kind"], "preset": embedded_name(model), "seed": seed + i, "index": i,
                     "sampler": sampler, "steps": steps, "eta": eta, "guidance": guidance if conditional else None,
                     "timings_s": {"denoise": round(seconds, 3), "decode": decode_seconds},
                     mem: {"denoise": peak, "decode": _peak_memory(dev)},
                     "plan": plan.to_dict(), "device": _device_name(dev), "engine": engine, "cache": cache_stats}
            if conditional:
                entry["mask"] = "null condition" if unconditional else portable_path(mask_items[i][0], base)
            # a conditioned volume takes its map's geometry, so the two overlay in any viewer
            writer.add({"volume": volume, "affine": mask_items[i][3] if conditional else affine,
                        "metadata": entry, "files": {}, "mask": mask_items[i][2] if conditional else None})
    if bar is not None:
        bar.close()
    return writer.finish()


def _prepare(model, n, seed, steps, sampler, guidance, masks, max_vram, device, eta, unconditional, cache,
             need_masks: bool = True) -> SimpleNamespace:
    """The checks of a torch-runtime request that need no weights (the numbers, the cache threshold,
    the model folder and its model.json, guidance, the masks), and what sampling takes from them.
    need_masks=False (a plan only): a mask-conditioned model may come without masks (checked if given)."""
    from medgen_rt.models.step_cache import StepCache
    from medgen_rt.runtime.device import pick_device
    from medgen_rt.sampling.planner import parse_memory
    from medgen_rt.sampling.summary import check_guidance, check_request

    check_request(n, seed, steps, guidance, eta)
    parse_memory(max_vram, "--max-vram")
    step_cache = StepCache(cache) if cache is not None else None  # a bad threshold fails before any load
    denoiser_dir, vae_dir = resolve_model(model)
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
    info = json.loads((denoiser_dir / "model.json").read_text())
    vae_info = json.loads((vae_dir / "model.json").read_text())
    diff = info["diffusion"]
    objective = diff["objective"]
    sampler = sampler or ("euler" if objective == "flow" else "ddim")
    steps = steps or (diff["timesteps"] if sampler == "ddpm" else info.get("default_steps") or 50)
    schedule = D.make_schedule(diff["schedule"], diff["timesteps"]) if objective == "ddpm" else None
    geometry = info.get("geometry") or {}
    image_shape = tuple(geometry.get("image_shape") or ())
    affine = np.asarray(geometry.get("affine") or np.eye(4))
    conditional = info["kind"] in ("tgca", "controlnet")
    check_guidance(guidance, conditional, unconditional, repr(model))
    mask_items = None
    if conditional:
        if unconditional:
            if masks is not None:
                raise ValueError("masks and unconditional exclude each other: the null condition has no map")
            if need_masks:
                null_map = torch.zeros((len(info.get("mask_labels") or []),) + tuple(image_shape[:3]))
                mask_items = [(None, null_map, None, affine)] * n
        elif masks is not None:
            mask_items = _load_masks(masks, info, n, image_shape, affine)
        elif need_masks:
            raise ValueError(f"model {model!r} is mask-conditioned: pass masks (a NIfTI file or a folder), or "
                             "sample unconditionally (--unconditional) through the null condition")
    elif masks is not None:
        raise ValueError(f"model {model!r} is not mask-conditioned; masks cannot be used")
    return SimpleNamespace(
        denoiser_dir=denoiser_dir, vae_dir=vae_dir, dev=dev, info=info, diff=diff, objective=objective,
        sampler=sampler, steps=steps, schedule=schedule, latent_shape=tuple(info["latent_shape"]),
        geometry=geometry, affine=affine, modality=info.get("modality") or vae_info.get("modality"),
        conditional=conditional, mask_items=mask_items, step_cache=step_cache,
        # the sampler runs the doubled (condition + null) batch for any guidance scale, 1.0 included
        guided=conditional and guidance is not None)


def _load_and_plan(prep: SimpleNamespace, n: int, max_vram, on=None) -> tuple:
    """(denoiser, VQ-GAN, SamplingPlan) for n volumes of a prepared request; both networks are
    left on `on` (default prep.dev, the device planned for; the CPU plans a GPU analytically)."""
    from medgen_rt.models import load_model
    from medgen_rt.models.step_cache import cached_dit
    from medgen_rt.sampling.planner import plan_sampling

    net, _ = load_model(prep.denoiser_dir)
    vae, _ = load_model(prep.vae_dir)
    net, vae = net.eval(), vae.eval()
    if prep.step_cache is not None:
        cached_dit(net)  # a U-Net is refused before any sampling
    # the whole plan first (on CUDA it measures both networks once, then only the denoiser stays on the GPU)
    on = prep.dev if on is None else on
    plan = plan_sampling(net.to(on), vae.to(on), prep.latent_shape, n=n, guidance=prep.guided,
                         max_vram=max_vram, device=prep.dev)
    return net, vae, plan


def plan(model: str = "default", n: int = 1, seed: int = 0, steps: Optional[int] = None,
         sampler: Optional[str] = None, guidance: Optional[float] = None, masks=None, max_vram=None,
         device: Optional[str] = None, eta: float = 0.0, unconditional: bool = False,
         cache: Optional[float] = None):
    """The SamplingPlan (medgen_rt.sampling.planner) that `sample` with these arguments follows, made
    without sampling or writing any volume: the same checks first, but a mask-conditioned model
    needs no masks (the plan does not depend on them; given ones are checked). On CUDA the
    planner's probe measurements are cached as for sampling; device "cuda[:N]" where torch sees
    no GPU plans for one of max_vram analytically, the networks on the CPU. Torch runtime only."""
    want = device or "auto"
    on = None
    if isinstance(want, str) and want.startswith("cuda") and not torch.cuda.is_available():
        m = re.fullmatch(r"cuda(?::(\d+))?", want)
        if not m:
            raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {want!r}")
        if max_vram is None:
            raise ValueError(f"--device {want}: torch sees no GPU here, so its memory is unknown; give the GPU's "
                             "with --max-vram to plan for it")
        device, on = torch.device("cuda", int(m.group(1) or 0)), torch.device("cpu")
    prep = _prepare(model, n, seed, steps, sampler, guidance, masks, max_vram, device, eta, unconditional, cache,
                    need_masks=False)
    return _load_and_plan(prep, n, max_vram, on)[2]


def _give_device(active, idle, dev) -> None:
    """On a GPU one network at a time: the other waits in CPU memory (the plan gave each
    phase the whole device)."""
    if dev.type == "cuda":
        idle.to("cpu")
        active.to(dev)
        torch.cuda.empty_cache()


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


_SAMPLE_PARAMS = tuple(inspect.signature(sample).parameters)

