"""The sampling pipeline of both runtimes, in steps: 1 plan the batches, 2 initial noise,
3 denoise, 4 decode, 5 write. Torch-free.

A runtime supplies only two adapters (the torch runtime's in medgen_rt.sampling.api, the ONNX
engine's in medgen_rt.export.engine); the batches, seeds, conditions, timings, energy phases and
the per-volume metadata are written once here. Both denoisers run the one loop and step-noise
stream of medgen_rt.runtime.schedulers (denoise_loop, step_noise): the torch runtime through
medgen_rt.diffusion.sample, the engine through its sample_loop.

denoiser adapter:
    batch                      volumes per denoising run (the memory plan's)
    memory_key                 the sidecar key of its peak memory (summary.memory_key)
    session()                  context around one batch (device, no autograd, step cache, ...)
    noise(indices, seeds, shape) -> x       initial noise of those volumes, in the runtime's arrays
    condition(a)               a float32 numpy (B, K, *image) map as the network's condition
    denoise(x, guidance, cond, null, seeds, progress) -> z   the reverse process of the run's sampler
    host(z)                    a latent row brought back for decoding
    peak_memory()              GB since the last call; batch_metadata() -> sidecar keys of the batch
decoder adapter:
    unit                       what its progress counts ("plane", "tile")
    session()                  context around decoding one batch's volumes
    __call__(z, quantize, progress) -> image   numpy (X, Y, Z[, T]) in [-1, 1]
    peak_memory()
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from medgen_rt.runtime.energy import EnergyMeter
from medgen_rt.sampling.spec import ModelSpec, Request
from medgen_rt.sampling.summary import VolumeWriter, image_to_volume, portable_path


class SamplingPipeline:
    """spec, request (checked: spec.check_inputs); the two adapters;
    sources: {"model": folder, ...} recorded in each sidecar relative to the output folder;
    labels: sidecar keys after "kind" (e.g. the preset); extra: sidecar keys after the memory;
    quantize: snap latents to the codebook before decoding, as the published samplers do."""

    def __init__(self, spec: ModelSpec, request: Request, denoiser, decoder, *, sources: dict,
                 labels: Optional[dict] = None, extra: Optional[dict] = None, quantize: bool = True):
        self.spec, self.request, self.quantize = spec, request, quantize
        self.denoiser, self.decoder = denoiser, decoder
        self.sources, self.labels, self.extra = sources, labels or {}, extra or {}

    def __call__(self, indices, out=None, energy: bool = True, country: Optional[str] = None,
                 quiet: bool = True) -> list:
        """Volumes `indices` (volume i from seed + i); each is written to `out` (an opened
        io.outputs.OutputFolder, or None) as soon as it is decoded, so a run that fails late
        keeps what it made. Returns VolumeWriter.finish()'s list."""
        spec, req, den, dec = self.spec, self.request, self.denoiser, self.decoder
        indices = list(indices)
        meter = EnergyMeter(country=country, enabled=energy)
        writer = VolumeWriter(out, meter, spec.modality, spec.geometry)
        base = out.path if out is not None else None  # sidecar paths are relative to the output folder
        bar = _bar(quiet, total=len(indices) * req.steps, desc="denoise", unit="step")
        # 1. plan: the batches the memory plan allows; step noise comes per volume (its own seed
        #    stream), so batching changes no volume and stochastic samplers batch too
        for first in range(0, len(indices), den.batch):
            group = indices[first:first + den.batch]
            seeds = [req.seed + i for i in group]
            with den.session():
                # 2. initial noise, from each volume's own seed
                x = den.noise(group, seeds, spec.latent_shape)
                cond = null = None
                if req.masks is not None:
                    cond = den.condition(np.stack([req.masks[i].onehot for i in group]))
                    null = 0 * cond if req.guided else None  # the null condition only where guidance needs it
                # 3. denoise
                t0 = time.perf_counter()
                with meter.phase("denoise"):
                    z = den.denoise(x, req.guidance, cond, null, seeds,
                                    progress=(lambda k, total: bar.update(len(group))) if bar else None)
                seconds = (time.perf_counter() - t0) / len(group)
            batch_meta = den.batch_metadata()  # one decision per block call for the whole batch (step cache)
            peak = den.peak_memory()
            latents = {i: den.host(z[j:j + 1] / spec.scale_factor) for j, i in enumerate(group)}
            del z, x, cond, null
            with dec.session():
                for i in group:
                    # 4. decode
                    tile_bar = _bar(quiet, desc="decode", unit=dec.unit, leave=False)
                    t1 = time.perf_counter()
                    with meter.phase("decode"):
                        image = dec(latents.pop(i), quantize=self.quantize, progress=_progress(tile_bar))
                    if tile_bar is not None:
                        tile_bar.close()
                    timings = {"denoise": round(seconds, 3), "decode": round(time.perf_counter() - t1, 3)}
                    # 5. write
                    writer.add(self._result(i, image_to_volume(image, spec.modality), base, timings,
                                            {"denoise": peak, "decode": dec.peak_memory()}, batch_meta))
        if bar is not None:
            bar.close()
        return writer.finish()

    def _result(self, i: int, volume: np.ndarray, base, timings: dict, peaks: dict, batch_meta: dict) -> dict:
        """The volume and its sidecar metadata, the same keys in both runtimes."""
        req = self.request
        meta = {**{k: portable_path(v, base) for k, v in self.sources.items()}, "kind": self.spec.kind,
                **self.labels, **self._network(base), "seed": req.seed + i, "index": i, "sampler": req.sampler,
                "steps": req.steps, "eta": req.eta, "guidance": req.guidance, "timings_s": timings,
                self.denoiser.memory_key: peaks, **self.extra, **batch_meta}
        item = req.masks[i] if req.masks is not None else None
        if item is not None:
            meta["mask"] = "null condition" if item.path is None else portable_path(item.path, base)
        return {"volume": volume, "affine": item.affine if item is not None else self.spec.affine,
                "metadata": meta, "files": {}, "mask": item.labels if item is not None else None}

    def _network(self, base) -> dict:
        """Which network sampled: "student" (a distilled run, with its teacher: the run as a portable
        path, its kind and the sha256 of the weights it was distilled from) or "teacher"."""
        teacher = self.spec.distilled_from
        if teacher and teacher.get("run"):
            teacher = {**teacher, "run": portable_path(teacher["run"], base)}
        return {"network": self.spec.network, "distilled_from": teacher}


def _bar(quiet: bool, **kwargs):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def _progress(bar):
    """progress(done, total) for a bar whose total is known only once the work starts."""
    if bar is None:
        return None
    return lambda k, total: (setattr(bar, "total", total), bar.update(k - bar.n))
