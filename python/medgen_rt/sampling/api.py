"""medgen_rt.sample(): volumes from a trained model, as arrays and (with `out`) as
files. The denoiser runs the diffusion loop on the latent, the VQ-GAN decodes it
tile by tile, every phase is metered for energy.

model: an embedded model by name (see EMBEDDED_MODELS: "default" or "cine" is the cine
model, "ct" the mask-conditioned CT model), a run folder of `medgen train dit|unet|
control` (its model.json names the VQ-GAN run), or a folder holding `dit/` (or
`unet/`, `tgca/`, `controlnet/`) and `vae/` run folders.

An embedded model may ship a distilled student beside its teacher (NAME/student/, a run of
`medgen train distill`); it samples by default when its model.json's default_choice says it is
within tolerance of the 50-step teacher (see resolve_model); teacher=True (`--teacher`) takes
the teacher and its full sampler.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from medgen_rt import diffusion as D
from medgen_rt.sampling.summary import memory_key

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


STUDENT = "student"  # an embedded model's distilled student: NAME/student/


def embedded_student(root: Path) -> Optional[Path]:
    """The student an embedded model folder samples with by default: NAME/student/ when its
    model.json carries default_choice.within_tolerance true (bench/package_default.py writes it
    from a bench/fewstep.py measurement: realism within 5% of the 50-step teacher's, mask Dice
    within 0.03); else None (the teacher samples)."""
    from medgen_rt.io.run_folder import read_model_info

    folder = root / STUDENT
    if not (folder / "model.json").is_file():
        return None
    choice = read_model_info(folder).get("default_choice")  # errors name the file
    return folder if isinstance(choice, dict) and choice.get("within_tolerance") is True else None


def resolve_model(model: str, teacher: bool = False) -> tuple:
    """(denoiser run folder, VQ-GAN run folder) for a model argument. An embedded model gives its
    distilled student when it ships one within tolerance (embedded_student), unless teacher=True;
    a folder given by path is taken as it is (teacher=True refuses a student's folder)."""
    name = embedded_name(model)
    root = default_model_dir(name) if name else Path(model)
    if not root.exists():
        names = ", ".join(list(ALIASES) + list(EMBEDDED_MODELS))
        raise ValueError(f"model {model!r}: no such model folder and not an embedded model ({names}; or a run "
                         "folder from `medgen train`)")
    if (root / "model.json").is_file():
        denoiser = root
    elif name and not teacher and embedded_student(root) is not None:
        denoiser = root / STUDENT
    else:
        found = [root / k for k in DENOISER_KINDS if (root / k / "model.json").is_file()]
        if not found:
            raise ValueError(f"model {model!r}: {root} holds no trained denoiser (model.json of a dit, unet, "
                             "tgca or controlnet run)")
        denoiser = found[0]
    from medgen_rt.sampling.validate import check_model_folder
    from medgen_rt.io.run_folder import read_model_info

    info = read_model_info(denoiser)  # errors name the file
    if info.get("kind") not in DENOISER_KINDS:
        raise ValueError(f"model {model!r}: {denoiser} is a {info.get('kind')} run, not a denoiser")
    if teacher and "distilled_from" in info:  # a student's folder given by path: --teacher cannot pick for it
        raise ValueError(f"--teacher: model {model!r} is the folder of a distilled student; give its teacher's "
                         f"folder as --model (distilled_from.run: {(info['distilled_from'] or {}).get('run')})")
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


def sample(model: str = "default", n: int = 1, seed: int = 0, steps: Optional[int] = None,
           sampler: Optional[str] = None, guidance: Optional[float] = None, masks=None, max_vram=None,
           device: Optional[str] = None, out=None, engine: str = "torch", eta: float = 0.0,
           energy: bool = True, country: Optional[str] = None, quiet: bool = True,
           indices: Optional[list] = None, quantize: bool = True, unconditional: bool = False,
           overwrite: bool = False, format: str = "nifti", cache: Optional[float] = None,
           teacher: bool = False) -> list:
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
    teacher: an embedded model that ships a distilled student samples with its teacher instead
    (and the teacher's default steps, 50); the sidecar's "network" says which sampled.

    The choice of engine is made here, once: each supplies its denoiser and decoder adapters
    to the one pipeline (medgen_rt.sampling.pipeline); nothing below branches on it.
    """
    from medgen_rt.sampling.pipeline import SamplingPipeline
    from medgen_rt.sampling.spec import output_folder

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
        if teacher:
            from medgen_rt.sampling.spec import TEACHER_ONNX

            raise ValueError(TEACHER_ONNX)
        return OnnxEngine(model, device=device or "auto").sample(
            n=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance, masks=masks, out=out, eta=eta,
            energy=energy, country=country, quiet=quiet, quantize=quantize, overwrite=overwrite, format=format)
    if engine != "torch":
        raise ValueError(f"engine must be 'torch' or 'onnx', got {engine!r}")
    with output_folder(out, overwrite, format) as out:  # a path: locked until this call returns
        prep = _prepare(model, n, seed, steps, sampler, guidance, masks, max_vram, device, eta, unconditional, cache,
                        teacher=teacher)
        if out is not None:
            out.open()  # locked, checked and cleared of killed runs' temporary files (io.outputs.OutputFolder)
        indices = list(range(n)) if indices is None else list(indices)
        net, vae, plan = _load_and_plan(prep, len(indices) or 1, max_vram)
        dev = prep.dev
        vae.to("cpu")
        net.to(getattr(torch, plan.denoiser_dtype))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        pipeline = SamplingPipeline(
            prep.spec, prep.request, _TorchDenoiser(net, vae, dev, plan, prep),
            _TorchDecoder(vae, net, dev, plan, log=None if quiet else (lambda msg: print(msg, flush=True))),
            sources={"model": prep.denoiser_dir, "vae": prep.vae_dir}, labels={"preset": embedded_name(model)},
            extra={"plan": plan.to_dict(), "device": _device_name(dev), "engine": engine}, quantize=quantize)
        return pipeline(indices, out, energy=energy, country=country, quiet=quiet)


class _TorchDenoiser:
    """The pipeline's denoiser adapter for the torch runtime: the network in the planned dtype,
    the planned batch, on a GPU alone on the device while it runs, with the step cache attached."""

    def __init__(self, net, vae, dev, plan, prep: SimpleNamespace):
        self.net, self.vae, self.dev, self.step_cache = net, vae, dev, prep.step_cache
        self.spec, self.request, self.schedule = prep.spec, prep.request, prep.schedule
        self.dtype = getattr(torch, plan.denoiser_dtype)
        self.batch = plan.batch
        self.memory_key = memory_key(dev.type)
        self.fn = D.network_fn(net, self.spec.conditional, self.dtype)

    @contextmanager
    def session(self):
        _give_device(self.net, self.vae, self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        # the cache starts empty for each batch (attach resets it) and leaves the model afterwards
        with torch.no_grad(), (self.step_cache.attach(self.net) if self.step_cache is not None else nullcontext()):
            yield

    def noise(self, indices, seeds, shape):
        return torch.cat([torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(s))
                          for s in seeds]).to(self.dev)

    def condition(self, a):
        # in the network's dtype (network_fn casts to it anyway: the same values, not held twice)
        return torch.from_numpy(a).to(self.dev, self.dtype)

    def denoise(self, x, guidance, cond, null, seeds, progress=None):
        req, spec = self.request, self.spec
        return D.sample(self.fn, x.shape, self.schedule, sampler=req.sampler, steps=req.steps, eta=req.eta,
                        guidance_scale=guidance, cond=cond, null_cond=null, noise=x, step_seeds=seeds,
                        device=self.dev, progress=progress,
                        # flow runs record the DDPM default prediction; the Euler sampler takes velocity only
                        prediction_type=spec.prediction if spec.objective == "ddpm" else None)

    def host(self, z):
        return z.float().cpu()

    def peak_memory(self) -> float:
        return _peak_memory(self.dev)

    def batch_metadata(self) -> dict:
        return {"cache": self.step_cache.stats() if self.step_cache is not None else None}


class _TorchDecoder:
    """The pipeline's decoder adapter for the torch runtime: codebook lookup, then the streamed
    (or tiled) decode of the plan's chunk, retried smaller on CUDA out-of-memory."""

    unit = "plane"

    def __init__(self, vae, net, dev, plan, log=None):
        self.vae, self.net, self.dev, self.plan, self.log = vae, net, dev, plan, log

    @contextmanager
    def session(self):
        _give_device(self.vae, self.net, self.dev)  # the decoder gets the GPU to itself
        with torch.no_grad():
            yield

    def __call__(self, z, quantize: bool, progress=None) -> np.ndarray:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        z = z.to(self.dev)
        z = self.vae.quantizer.lookup(z)[1] if quantize else z
        return decode_latent(self.vae, z, self.plan.decode_chunk, axis=self.plan.decode_axis, progress=progress,
                             log=self.log)[0, 0].numpy()

    def peak_memory(self) -> float:
        return _peak_memory(self.dev)


def _prepare(model, n, seed, steps, sampler, guidance, masks, max_vram, device, eta, unconditional, cache,
             need_masks: bool = True, teacher: bool = False) -> SimpleNamespace:
    """The checks of a torch-runtime request that need no weights (the numbers, the cache threshold,
    the model folder and its model.json, then spec.check_inputs: guidance, sampler, steps, masks), and
    the noise schedule. need_masks=False (a plan only): masks may be left out (checked if given)."""
    from medgen_rt.models.step_cache import StepCache
    from medgen_rt.runtime.device import pick_device
    from medgen_rt.sampling.planner import parse_memory
    from medgen_rt.sampling.spec import ModelSpec, check_inputs
    from medgen_rt.sampling.summary import check_request

    check_request(n, seed, steps, guidance, eta)
    parse_memory(max_vram, "--max-vram")
    step_cache = StepCache(cache) if cache is not None else None  # a bad threshold fails before any load
    denoiser_dir, vae_dir = resolve_model(model, teacher=teacher)
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
    spec = ModelSpec.from_model_json(json.loads((denoiser_dir / "model.json").read_text()),
                                     json.loads((vae_dir / "model.json").read_text()), folder=denoiser_dir)
    request = check_inputs(spec, repr(model), n, seed, steps, sampler, guidance, eta, masks, unconditional,
                           need_masks)
    diff = spec.diffusion
    schedule = D.make_schedule(diff["schedule"], diff["timesteps"]) if spec.objective == "ddpm" else None
    return SimpleNamespace(denoiser_dir=denoiser_dir, vae_dir=vae_dir, dev=dev, spec=spec, request=request,
                           schedule=schedule, step_cache=step_cache, guided=request.guided)


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
    plan = plan_sampling(net.to(on), vae.to(on), prep.spec.latent_shape, n=n, guidance=prep.guided,
                         max_vram=max_vram, device=prep.dev)
    return net, vae, plan


def plan(model: str = "default", n: int = 1, seed: int = 0, steps: Optional[int] = None,
         sampler: Optional[str] = None, guidance: Optional[float] = None, masks=None, max_vram=None,
         device: Optional[str] = None, eta: float = 0.0, unconditional: bool = False,
         cache: Optional[float] = None, teacher: bool = False):
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
                    need_masks=False, teacher=teacher)
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



