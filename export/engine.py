"""The torch-free sampling engine: numpy + onnxruntime on a `medgen export onnx`
folder. It runs the same sampling loop as the torch runtime (DDIM, DDPM, Euler
flow, classifier-free guidance), decodes with the same tile planner
(medgen_rt.runtime.tiling) and unit-weight blending, and writes the same NIfTI,
sidecar, previews and energy figures (medgen_rt.io, medgen_rt.runtime.energy).

Nothing here imports torch: it runs where PyTorch is not installed.

    from medgen_rt.export.engine import OnnxEngine
    volumes = OnnxEngine("exported/").sample(n=2, seed=0, out="samples")

Providers: CUDA when onnxruntime-gpu sees a GPU (inputs and outputs then stay
on the device through IO binding), else the CPU.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from medgen_rt.export.onnx_export import FORMAT, FORMAT_VERSION
from medgen_rt.runtime.schedulers import denoise_loop, make_scheduler, step_noise
from medgen_rt.runtime.tiling import plan_tiles
from medgen_rt.sampling.pipeline import SamplingPipeline
from medgen_rt.sampling.spec import ModelSpec, check_inputs, output_folder
from medgen_rt.sampling.summary import check_request, memory_key
from medgen_rt.sampling.validate import check_manifest, check_session_input, export_file, load_codebook

MANIFEST = "medgen_export.json"


class ExportError(ValueError):
    """The folder is not a usable export (bad input: the CLI exits 2)."""


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: not a medgen_rt ONNX export (no {MANIFEST}); "
                          "make one with `medgen export onnx --model RUN --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ExportError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: expected a JSON object, found a JSON {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{folder}: exported by medgen_rt {manifest.get('medgen_rt_version')} in format "
                          f"version {version}; this medgen_rt reads up to version {FORMAT_VERSION}: upgrade it")
    try:  # keys, geometry, and files only inside the export folder (medgen_rt.sampling.validate)
        check_manifest(folder, manifest)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return manifest


def _providers(device: str) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ValueError("device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


class _Session:
    """One ONNX model; with the CUDA provider, runs through IO binding so the
    outputs stay on the GPU until asked for."""

    def __init__(self, path: Path, providers: list):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's own error types: a truncated or foreign file
            raise ExportError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self.cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self.inputs, arrays))
        if not self.cuda:
            return self.session.run([self.output], feeds)[0]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(self.output, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


# ---- sampling: the schedulers and the loop of the torch runtime (medgen_rt.runtime.schedulers) --

def scheduler_for(manifest: dict, sampler: str, steps: Optional[int] = None, eta: float = 0.0,
                  spacing: str = "leading", clip_sample=None):
    """The shared scheduler for an export, its tables from the manifest."""
    if sampler == "euler":
        return make_scheduler("euler", steps, timestep_scale=float(manifest.get("flow_timestep_scale", 1000.0)))
    schedule = manifest["schedule"]
    if schedule is None:
        raise ValueError(f"sampler {sampler!r} needs a DDPM-family model; this export is a flow model (use euler)")
    return make_scheduler(sampler, steps, betas=schedule["betas"], alphas_cumprod=schedule["alphas_cumprod"],
                          prediction_type=manifest["diffusion"].get("prediction") or "v_prediction", eta=eta,
                          spacing=spacing, clip_sample=clip_sample)


def sample_loop(model: Callable, noise: np.ndarray, scheduler, guidance: Optional[float] = None,
                cond: Optional[np.ndarray] = None, seed: int = 0, progress=None) -> np.ndarray:
    """model(x, t (B,) float32, cond) -> output; the whole reverse process on float32 numpy arrays,
    the engine's denoiser in the pipeline (and, in the parity tests, beside medgen_rt.diffusion.sample).
    Step noise of row b comes from the stream of seed + b (the torch runtime's for that volume);
    the null condition of guidance is the all-zero map."""
    x = noise.astype(np.float32)
    seeds = [seed + b for b in range(x.shape[0])]
    return denoise_loop(lambda x_, t, c: model(x_, np.full(x_.shape[0], t, dtype=np.float32), c), x, scheduler,
                        guidance_scale=guidance, cond=cond, null_cond=None if cond is None else np.zeros_like(cond),
                        noise_fn=lambda i: step_noise(seeds, i, x.shape), progress=progress)


# ---- decoding -------------------------------------------------------------------------------

def snap_to_codebook(z: np.ndarray, codebook: np.ndarray, rows_per_chunk: int = 65536) -> np.ndarray:
    """Each latent vector (channel axis 1) replaced by its nearest codebook row (squared
    L2 as |c|^2 - 2 z.c in float32, ties to the lowest index, like medgen_rt.ops.vq_nearest),
    in chunks so that no N x K matrix of the whole latent is built."""
    flat = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]).astype(np.float32)
    norms = (codebook.astype(np.float32) ** 2).sum(axis=1)
    out = np.empty_like(flat)
    for start in range(0, len(flat), rows_per_chunk):
        part = flat[start:start + rows_per_chunk]
        index = np.argmin(norms[None, :] - 2.0 * part @ codebook.T, axis=1)
        out[start:start + rows_per_chunk] = codebook[index]
    return np.moveaxis(out.reshape(z.shape[:1] + z.shape[2:] + z.shape[1:2]), -1, 1)


def tiled_decode_numpy(decode: Callable, latent: np.ndarray, manifest: dict, core: Sequence[int],
                       progress=None) -> np.ndarray:
    """Decode (B, D, *L) tile by tile with the decoder's halo, exactly like
    medgen_rt.sampling.decode.tiled_decode; cine latents (B, D, Z, X', Y', T')
    decode slice-batched with tiles over (X', Y', T')."""
    geo = manifest["decoder"]
    if geo["cine"] and latent.ndim == 6:
        B, D, Z = latent.shape[:3]
        slices = latent.transpose(0, 2, 1, 3, 4, 5).reshape(B * Z, D, *latent.shape[3:])
        image = tiled_decode_numpy(decode, slices, {"decoder": {**geo, "cine": False,
                                                                "factor": geo["factor"][1:], "halo": geo["halo"][1:],
                                                                "output_axis": [0, 1, 2]}},
                                   core[-3:], progress)
        C, X, Y, T = image.shape[1:]
        return image.reshape(B, Z, C, X, Y, T).transpose(0, 2, 3, 4, 1, 5)
    spatial = latent.shape[2:]
    tiles = plan_tiles(spatial, core, geo["halo"], geo["factor"])
    out = np.zeros((latent.shape[0], geo["out_channels"]) + tuple(n * f for n, f in zip(spatial, geo["factor"])),
                   dtype=np.float32)
    for done, tile in enumerate(tiles, 1):
        decoded = decode(np.ascontiguousarray(latent[(slice(None), slice(None)) + tile.latent_slices()]))
        out[(slice(None), slice(None)) + tile.output_slices()] += \
            decoded[(slice(None), slice(None)) + tile.crop_slices()]
        if progress:
            progress(done, len(tiles))
    return out


# ---- the engine -------------------------------------------------------------------------------

def _peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


class OnnxEngine:
    def __init__(self, folder, device: str = "auto", precision: str = "fp32"):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.spec = ModelSpec.from_manifest(self.manifest)
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        suffix = "" if precision == "fp32" else "_fp16"
        files = self.manifest["files"]
        for part in ("denoiser", "decoder"):
            if f"{part}{suffix}" not in files:
                raise ExportError(f"{self.folder}: no {precision} {part} in this export")
        self.providers = _providers(device)
        self.dtype = np.float32 if precision == "fp32" else np.float16
        manifest_path = self.folder / MANIFEST
        denoiser, decoder = (export_file(self.folder, manifest_path, f"files.{k}{suffix}", files[f"{k}{suffix}"])
                             for k in ("denoiser", "decoder"))
        self.denoiser = _Session(denoiser, self.providers)
        self.decoder = _Session(decoder, self.providers)
        self._check_sessions(manifest_path, denoiser, decoder)
        self.codebook = load_codebook(export_file(self.folder, manifest_path, "codebook", self.manifest["codebook"]),
                                      manifest_path, self.manifest["decoder"]["embedding_dim"])

    def _check_sessions(self, manifest_path: Path, denoiser: Path, decoder: Path) -> None:
        """The ONNX models take the shapes the manifest says (a wrong latent_shape fails here, not mid-run)."""
        m = self.manifest
        try:
            check_session_input(denoiser, manifest_path, self.denoiser.session, "x",
                                [None] + list(m["latent_shape"]), "latent_shape")
            if m["conditional"]:
                check_session_input(denoiser, manifest_path, self.denoiser.session, "mask",
                                    [None] + list(m["mask_shape"]), "mask_shape")
            check_session_input(decoder, manifest_path, self.decoder.session, "z",
                                [None, m["decoder"]["embedding_dim"], None, None, None], "decoder.embedding_dim")
        except ValueError as exc:
            raise ExportError(str(exc)) from None

    @property
    def device(self) -> str:
        return "cuda" if self.denoiser.cuda else "cpu"

    def denoise(self, x, t, cond=None) -> np.ndarray:
        args = (x.astype(self.dtype), t.astype(self.dtype))
        if self.manifest["conditional"]:
            if cond is None:
                raise ValueError("this export is mask-conditioned: pass masks")
            args += (cond.astype(self.dtype),)
        return self.denoiser(*args).astype(np.float32)

    def decode(self, z) -> np.ndarray:
        return self.decoder(z.astype(self.dtype)).astype(np.float32)

    def sample(self, n: int = 1, seed: int = 0, steps: Optional[int] = None, sampler: Optional[str] = None,
               guidance: Optional[float] = None, masks=None, out=None, eta: float = 0.0, energy: bool = True,
               country: Optional[str] = None, quiet: bool = True, noise: Optional[np.ndarray] = None,
               core: Optional[Sequence[int]] = None, quantize: bool = True, overwrite: bool = False,
               format: str = "nifti") -> list:
        """Like medgen_rt.sample, through the same pipeline (medgen_rt.sampling.pipeline) with the
        onnxruntime sessions as its adapters; noise (n, *latent) replaces the seeded initial noise
        (to compare with the torch runtime on the same start)."""
        with output_folder(out, overwrite, format) as out:  # a path: locked until this call returns
            check_request(n, seed, steps, guidance, eta)
            request = check_inputs(self.spec, repr(str(self.folder)), n, seed, steps, sampler, guidance, eta, masks)
            scheduler = scheduler_for(self.manifest, request.sampler, request.steps, eta)
            if noise is not None and tuple(noise.shape) != (n,) + self.spec.latent_shape:
                raise ValueError(f"noise must have shape {(n,) + self.spec.latent_shape}, got {tuple(noise.shape)}")
            if out is not None:
                out.open()  # locked, checked and cleared of killed runs' temporary files (io.outputs.OutputFolder)
            pipeline = SamplingPipeline(
                self.spec, request, _Denoiser(self, scheduler, noise),
                _Decoder(self, core or [min(s, 32) for s in self.spec.latent_shape[1:]]),
                sources={"model": self.folder},
                # process peak RSS so far, also on a GPU (onnxruntime reports no GPU peak)
                extra={"device": self.device, "engine": "onnx", "providers": self.providers,
                       "precision": "fp32" if self.dtype == np.float32 else "fp16",
                       "exported_by": self.manifest.get("medgen_rt_version")}, quantize=quantize)
            return pipeline(range(n), out, energy=energy, country=country, quiet=quiet)


class _Denoiser:
    """The pipeline's denoiser adapter: the denoiser session, one volume at a time, on numpy arrays."""

    batch = 1
    memory_key = memory_key("cpu")

    def __init__(self, engine: OnnxEngine, scheduler, noise: Optional[np.ndarray]):
        self.engine, self.scheduler, self.given = engine, scheduler, noise

    def session(self):
        return nullcontext()

    def noise(self, indices, seeds, shape) -> np.ndarray:
        if self.given is not None:
            return np.concatenate([self.given[i:i + 1] for i in indices]).astype(np.float32)
        return np.concatenate([np.random.default_rng(s).standard_normal((1,) + tuple(shape), dtype=np.float32)
                               for s in seeds])

    def condition(self, a):
        return a

    def denoise(self, x, guidance, cond, null, seeds, progress=None):
        # one volume per batch: sample_loop's row streams seed + b are the volume's own
        return sample_loop(self.engine.denoise, x, self.scheduler, guidance=guidance, cond=cond, seed=seeds[0],
                           progress=progress)

    def host(self, z):
        return z

    def peak_memory(self) -> float:
        return _peak_rss_gb()

    def batch_metadata(self) -> dict:
        return {}


class _Decoder:
    """The pipeline's decoder adapter: codebook snap, then the decoder session tile by tile."""

    unit = "tile"

    def __init__(self, engine: OnnxEngine, core):
        self.engine, self.core = engine, core

    def session(self):
        return nullcontext()

    def __call__(self, z, quantize: bool, progress=None) -> np.ndarray:
        z = snap_to_codebook(z, self.engine.codebook) if quantize else z
        return tiled_decode_numpy(self.engine.decode, z, self.engine.manifest, self.core, progress=progress)[0, 0]

    def peak_memory(self) -> float:
        return _peak_rss_gb()
