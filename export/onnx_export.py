"""`medgen export onnx`: a trained model folder -> ONNX files and a manifest that
the torch-free engine (medgen_rt.export.engine) samples from.

Written into OUT (atomically: a temporary folder renamed at the end):

    medgen_export.json        manifest: format version, medgen_rt version, model and
                              VQ-GAN info, scheduler constants, decoder geometry, files
    denoiser.onnx             (x, t[, mask]) -> model output; dynamic batch
    decoder.onnx              one latent tile -> image tile; dynamic batch and tile size
    encoder.onnx              image tile -> latent before quantisation; dynamic sizes
    codebook.npy              the VQ codebook (K, D): generated latents snap to it before decoding
    *_fp16.onnx               the same in float16 (for GPUs), unless fp16=False

Export traces the reference ops (MEDGEN_BACKEND=reference): ONNX has no custom
kernels of ours; onnxruntime fuses LayerNorm, GELU, attention (MatMul+Softmax)
and Conv+Add itself. Models whose weights exceed 2 GB keep them in external
data files beside the .onnx, as ONNX requires.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from medgen_rt.io.atomic import atomic_folder

FORMAT = "medgen_rt-onnx"
FORMAT_VERSION = 1
OPSET = 18
_TWO_GB = 2 ** 31
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _reference_ops():
    from medgen_rt.ops.registry import ENV_VAR

    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def _denoiser_wrapper(net, conditional: bool):
    import torch

    class Denoiser(torch.nn.Module):
        """A fixed signature for export: (x, t) or (x, t, mask); t float (B,)."""

        def __init__(self):
            super().__init__()
            self.net = net

        if conditional:
            def forward(self, x, t, mask):
                return self.net(x, t, mask)
        else:
            def forward(self, x, t):
                return self.net(x, t)

    return Denoiser().eval()


def _export(module, args: tuple, names: list, dynamic: dict, path: Path, output_name: str) -> None:
    """torch.onnx.export (dynamo) with `dynamic` {input name: {axis: Dim}}; external data
    only for weights over 2 GB; then onnx.checker and a version stamp."""
    import onnx
    import torch

    import medgen_rt

    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                                    output_names=[output_name], opset_version=OPSET, verbose=False)
    external = weight_bytes > _TWO_GB
    program.save(str(path), external_data=external)
    model = onnx.load(str(path))
    for key, value in (("medgen_rt_version", medgen_rt.__version__), ("medgen_export_format", str(FORMAT_VERSION))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and warnings; keep the CLI readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    import io
    import sys

    saved = sys.stdout
    sys.stdout = io.StringIO()
    try:
        yield
    finally:
        sys.stdout = saved
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(model: str, out, fp16: bool = True, overwrite: bool = False, quiet: bool = True,
                 teacher: bool = False) -> Path:
    """Export a model folder (what `medgen sample --model` takes) to ONNX in `out`; an embedded model
    that ships a distilled student exports the student, as it samples, unless teacher=True."""
    import torch

    import medgen_rt
    from medgen_rt import diffusion as D
    from medgen_rt.models import load_model
    from medgen_rt.diffusion.flow import DEFAULT_TIMESTEP_SCALE
    from medgen_rt.models.vqgan import CineVQGAN
    from medgen_rt.sampling.api import resolve_model
    from medgen_rt.sampling.decode import decoder_geometry
    from medgen_rt.sampling.spec import teacher_record

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: exists and is not empty; choose another folder or pass --overwrite")
    denoiser_dir, vae_dir = resolve_model(model, teacher=teacher)
    info = json.loads((denoiser_dir / "model.json").read_text())
    vae_info = json.loads((vae_dir / "model.json").read_text())
    net, _ = load_model(denoiser_dir)
    vae, _ = load_model(vae_dir)
    net, vae = net.eval().float(), vae.eval().float()
    conditional = info["kind"] in ("tgca", "controlnet")
    latent_shape = tuple(info["latent_shape"])
    cine = isinstance(vae, CineVQGAN)
    files: dict = {}
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    with atomic_folder(out) as tmp:  # NAME_MAX-safe temporary sibling; no half export is left on any error
        B = torch.export.Dim("batch", min=1, max=4096)
        x = torch.randn((2,) + latent_shape)
        t = torch.tensor([3.0, 100.0])
        names, args = ["x", "t"], (x, t)
        dynamic = {"x": {0: B}, "t": {0: B}}
        mask_shape = None
        if conditional:
            mask_shape = _mask_shape(net, info, latent_shape)
            names, args = names + ["mask"], args + (torch.zeros((2,) + mask_shape),)
            dynamic["mask"] = {0: B}
        # the decoder / encoder tiles: 3D networks (a cine model's slices are batched by the engine)
        D_ = torch.export.Dim.DYNAMIC
        spatial = {0: D_, 2: D_, 3: D_, 4: D_}
        emb = vae.config.embedding_dim
        factor = tuple(vae.downsample_factor)
        z_tile = torch.randn(2, emb, 5, 6, 4)
        x_tile = torch.randn((2, vae.config.in_channels) + tuple(f * s for f, s in zip(factor, (3, 4, 2))))
        parts = [("denoiser", _denoiser_wrapper(net, conditional), args, names, dynamic, "output"),
                 ("decoder", vae.decoder, (z_tile,), ["z"], {"x": spatial}, "image"),
                 ("encoder", vae.encoder, (x_tile,), ["image"], {"x": spatial}, "z")]
        with _reference_ops(), torch.no_grad():
            for name, module, a, n, dyn, out_name in parts:
                for dtype, suffix in ((torch.float32, ""), (torch.float16, "_fp16")) if fp16 else \
                        ((torch.float32, ""),):
                    say(f"export {name}{suffix}")
                    m = module if dtype == torch.float32 else _half_copy(module)
                    a_cast = tuple(v.to(dtype) for v in a)
                    path = tmp / f"{name}{suffix}.onnx"
                    _export(m, a_cast, n, dyn, path, out_name)
                    files[f"{name}{suffix}"] = path.name
        np.save(tmp / "codebook.npy", vae.quantizer.quantizer.embedding.weight.detach().float().numpy())
        diff = info["diffusion"]
        schedule = None
        if diff["objective"] == "ddpm":
            s = D.make_schedule(diff["schedule"], diff["timesteps"])
            schedule = {"betas": s.betas.tolist(), "alphas_cumprod": s.alphas_cumprod.tolist()}
        geometry = decoder_geometry(vae)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "medgen_rt_version": medgen_rt.__version__,
            "opset": OPSET, "source_model": str(denoiser_dir), "source_vae": str(vae_dir),
            "kind": info["kind"], "conditional": conditional, "mask_shape": list(mask_shape) if mask_shape else None,
            "mask_labels": info.get("mask_labels"), "latent_shape": list(latent_shape),
            "scale_factor": float(info["scale_factor"]), "modality": info.get("modality") or vae_info.get("modality"),
            "geometry": info.get("geometry") or {}, "diffusion": diff, "schedule": schedule,
            "default_steps": info.get("default_steps"),  # a distilled student's own step count
            # a student's step counts and its teacher (the run resolved: an embedded student records "../tgca")
            "supported_steps": info.get("supported_steps"),
            "distilled_from": teacher_record(info.get("distilled_from"), denoiser_dir),
            "flow_timestep_scale": DEFAULT_TIMESTEP_SCALE,
            "decoder": {"cine": cine, "factor": list(geometry.factor), "halo": list(geometry.halo),
                        "output_axis": list(geometry.output_axis), "out_channels": geometry.out_channels,
                        "embedding_dim": emb},
            "files": files, "codebook": "codebook.npy",
            "model_info": info, "vae_info": vae_info,
        }
        from medgen_rt.io.sidecar import write_json_atomic

        write_json_atomic(tmp / "medgen_export.json", manifest)
    return out


def _half_copy(module):
    import copy

    return copy.deepcopy(module).half()


def _mask_shape(net, info: dict, latent_shape: tuple) -> tuple:
    """The mask a conditioned denoiser takes for one volume: (K, *spatial)."""
    labels = info.get("mask_labels") or []
    k = getattr(net, "mask_channels", None) or len(labels)
    down = getattr(net, "mask_downsample", None)
    image = (info.get("geometry") or {}).get("image_shape")
    if image:  # the sampling runtime passes masks at image resolution
        return (k,) + tuple(image[:len(latent_shape) - 1])
    if down is not None:
        return (k,) + tuple(s * down for s in latent_shape[1:])
    raise ValueError("cannot tell the mask shape of this conditioned model (no image_shape in model.json)")
