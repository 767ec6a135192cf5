"""Checks of what sampling reads before it samples: a run folder's model.json and weights
(check_model_folder) and an ONNX export's manifest (check_manifest).

Corrupt or tampered files otherwise end in a traceback or, worse, in normal-looking output
(a wrong latent_shape decodes a volume of another size under the recorded affine; a scale
factor of 0 divides by zero). Every error is a ValueError whose message starts with the file
and names the key at fault, so the CLI prints one line and exits 2.

Torch-free at import: the ONNX engine uses check_manifest without PyTorch installed;
check_model_folder imports torch when it is called.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DENOISER_KINDS = ("dit", "unet", "tgca", "controlnet")
OBJECTIVES = ("ddpm", "flow")
# medgen_rt.diffusion's (kept here so that the engine needs no torch)
SCHEDULE_KINDS = ("cosine", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---- small checks, each raising "<file>: <key>: <problem>" ---------------------------------------

def _fail(path, key: str, problem: str):
    raise ValueError(f"{path}: {key}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(path, d: dict, key: str, what: str = "a value"):
    if key not in d:
        raise ValueError(f"{path}: missing key {key!r} ({what})")
    return d[key]


def _dict(path, d: dict, key: str, what: str) -> dict:
    value = _require(path, d, key, what)
    if not isinstance(value, dict):
        _fail(path, key, f"expected a JSON object ({what}), got {json.dumps(value)[:80]}")
    return value


def _positive_ints(path, key: str, value, lengths: Sequence[int]) -> tuple:
    if not isinstance(value, list) or len(value) not in lengths or not all(_is_int(v) and v > 0 for v in value):
        _fail(path, key, f"expected a list of {' or '.join(map(str, lengths))} positive integers, "
                         f"got {json.dumps(value)[:80]}")
    return tuple(value)


def check_scale_factor(path, value) -> float:
    """Latents are divided by it: it must be a finite number > 0."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        _fail(path, "scale_factor", f"must be a finite number > 0, got {json.dumps(value)}")
    return float(value)


def check_diffusion(path, diff: dict, key: str = "diffusion") -> dict:
    objective = _require(path, diff, "objective", f"{key}.objective: ddpm or flow")
    if objective not in OBJECTIVES:
        _fail(path, f"{key}.objective", f"expected one of {OBJECTIVES}, got {objective!r}")
    T = _require(path, diff, "timesteps", f"{key}.timesteps: the training steps T")
    if not _is_int(T) or T < 1:
        _fail(path, f"{key}.timesteps", f"expected a positive integer, got {json.dumps(T)}")
    if objective == "ddpm":
        schedule = _require(path, diff, "schedule", f"{key}.schedule: the noise schedule")
        if schedule not in SCHEDULE_KINDS:
            _fail(path, f"{key}.schedule", f"expected one of {SCHEDULE_KINDS}, got {schedule!r}")
        prediction = diff.get("prediction", "v_prediction")
        if prediction not in PREDICTION_TYPES:
            _fail(path, f"{key}.prediction", f"expected one of {PREDICTION_TYPES}, got {prediction!r}")
    return diff


def check_affine(path, key: str, value) -> np.ndarray:
    from medgen_rt.io.nifti import affine_problem

    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape != (4, 4):
        _fail(path, key, f"expected a 4x4 matrix, got {json.dumps(value)[:80]}")
    problem = affine_problem(a)
    if problem is not None:
        _fail(path, key, problem)
    return a


def output_shape(latent_spatial: Sequence[int], factor: Sequence[int], output_axis: Sequence[int]) -> tuple:
    """The decoded image's spatial shape (as medgen_rt.sampling.decode.DecoderGeometry.output_shape)."""
    out = [0] * len(latent_spatial)
    for i, n in enumerate(latent_spatial):
        out[output_axis[i]] = n * factor[i]
    return tuple(out)


def check_geometry(path, latent_shape: Sequence[int], embedding_dim: int, factor: Sequence[int],
                   output_axis: Sequence[int], geometry) -> None:
    """latent_shape fits the VQ-GAN (channels, number of axes) and decodes to the image_shape
    whose affine the outputs are written with."""
    if latent_shape[0] != embedding_dim:
        _fail(path, "latent_shape", f"{list(latent_shape)} has {latent_shape[0]} channels but the VQ-GAN's "
                                    f"codebook vectors have {embedding_dim}")
    if len(latent_shape) - 1 != len(factor):
        _fail(path, "latent_shape", f"{list(latent_shape)} has {len(latent_shape) - 1} spatial axes but the "
                                    f"VQ-GAN decodes {len(factor)}")
    if geometry is None:
        return
    if not isinstance(geometry, dict):
        _fail(path, "geometry", f"expected a JSON object, got {json.dumps(geometry)[:80]}")
    decoded = output_shape(latent_shape[1:], factor, output_axis)
    image = geometry.get("image_shape")
    if image is not None:
        image = _positive_ints(path, "geometry.image_shape", image, (3, 4))
        if tuple(image) != decoded:
            _fail(path, "latent_shape", f"{list(latent_shape)} decodes to {list(decoded)} (the VQ-GAN's downsampling "
                                        f"{list(factor)}), not to geometry.image_shape {list(image)}")
    if geometry.get("affine") is not None:
        check_affine(path, "geometry.affine", geometry["affine"])
    # cine: seconds per frame of the training data (absent in runs made before it was recorded)
    duration = geometry.get("frame_duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not math.isfinite(duration) or duration <= 0):
        _fail(path, "geometry.frame_duration",
              f"expected a positive number of seconds, got {json.dumps(duration)[:80]}")


def check_mask_labels(path, value) -> list:
    if not isinstance(value, list) or not value or not all(_is_int(v) and 0 < v <= 255 for v in value):
        _fail(path, "mask_labels", f"expected a non-empty list of label values 1..255, got {json.dumps(value)[:80]}")
    return value


def check_sampling_keys(path, info: dict) -> tuple:
    """The keys sampling reads from model.json and the export manifest alike; returns latent_shape."""
    check_diffusion(path, _dict(path, info, "diffusion", "the diffusion settings"))
    latent_shape = _positive_ints(path, "latent_shape", _require(path, info, "latent_shape", "the latent's shape"),
                                  (4, 5))
    check_scale_factor(path, _require(path, info, "scale_factor", "the latent scale factor"))
    if info.get("geometry") is not None and not isinstance(info["geometry"], dict):
        _fail(path, "geometry", f"expected a JSON object, got {json.dumps(info['geometry'])[:80]}")
    return latent_shape


# ---- run folders (torch) -------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict:
    """{name: shape} from a safetensors file's header, without reading any tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit the {size}-byte file")
            header = json.loads(f.read(n))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _missing_config_keys(model, info: dict) -> list:
    """Fields of the network's config dataclass that model.json does not give (defaults were used);
    for TGCA / ControlNet, those of the base network under "base"."""
    if hasattr(model, "base"):
        model, info = model.base, info.get("base") or {}
    obj, config = getattr(model, "config", None), info.get("config") or {}
    return sorted(f.name for f in fields(obj) if f.name not in config) if is_dataclass(obj) else []


def _build(path: Path, info: dict):
    """The network model.json describes, on the meta device (no memory, no weights)."""
    import torch

    from medgen_rt.models import build_model

    try:
        with torch.device("meta"):
            return build_model(info)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        msg = re.sub(r"^[\w.]*__init__\(\) ", "", str(exc))  # "DiTConfig.__init__() got an unexpected ..."
        raise ValueError(f"{path}: config does not describe a {info.get('kind')} model ({msg})") from None


def check_weights_fit(info_path: Path, weights_path: Path, model, info: dict) -> None:
    """The weights file holds exactly the tensors, with the shapes, of the model built from model.json."""
    have = {k[len("model/"):]: s for k, s in read_safetensors_header(weights_path).items() if k.startswith("model/")}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append("; ".join(f"{k}: {list(have[k])} in the file, {list(want[k])} from the config"
                                  for k in wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
    if problems:
        hint = ""
        defaults = _missing_config_keys(model, info)
        if defaults:
            hint = f" (model.json's config lacks {', '.join(defaults)}: defaults were used)"
        raise ValueError(f"{weights_path}: weights do not fit the model in {info_path}{hint}: "
                         + "; ".join(problems))


def check_weights_finite(path: Path) -> None:
    """No NaN/Inf in a safetensors file, read one tensor at a time (models.weights.check_finite)."""
    from safetensors import safe_open

    from medgen_rt.models.weights import check_finite

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith("model/"):  # what is loaded (a VQ-GAN run also keeps its discriminator)
                    check_finite(path, {key: f.get_tensor(key)})
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def check_model_folder(denoiser_dir, vae_dir) -> tuple:
    """Validate a denoiser run and its VQ-GAN run before anything is loaded for sampling:
    model.json structure, scale factor, geometry, that each weights file's tensors fit the
    model its model.json describes, and that they are finite. Returns (denoiser info, VQ-GAN info)."""
    from medgen_rt.sampling.decode import decoder_geometry
    from medgen_rt.io.run_folder import model_weights_path, read_model_info

    denoiser_dir, vae_dir = Path(denoiser_dir), Path(vae_dir)
    info_path, vae_path = denoiser_dir / "model.json", vae_dir / "model.json"
    info, vae_info = read_model_info(denoiser_dir), read_model_info(vae_dir)
    kind = info.get("kind")
    if kind not in DENOISER_KINDS:
        _fail(info_path, "kind", f"expected one of {DENOISER_KINDS} (a denoiser), got {kind!r}")
    if vae_info.get("kind") != "vqgan":
        _fail(vae_path, "kind", f"expected 'vqgan' (the denoiser's VQ-GAN), got {vae_info.get('kind')!r}")
    latent_shape = check_sampling_keys(info_path, info)
    _dict(info_path, info, "config", "the network's settings")
    _dict(vae_path, vae_info, "config", "the network's settings")
    if kind in ("tgca", "controlnet"):
        base = _dict(info_path, info, "base", "the frozen base denoiser")
        _dict(info_path, base, "config", "base.config: the base network's settings")
        check_mask_labels(info_path, _require(info_path, info, "mask_labels", "the label values it conditions on"))
    net, vae = _build(info_path, info), _build(vae_path, vae_info)
    check_weights_fit(vae_path, model_weights_path(vae_dir), vae, vae_info)
    check_weights_fit(info_path, model_weights_path(denoiser_dir), net, info)
    geo = decoder_geometry(vae)
    check_geometry(info_path, latent_shape, int(vae.config.embedding_dim), geo.factor, geo.output_axis,
                   info.get("geometry"))
    core = getattr(net, "base", net)  # TGCA / ControlNet wrap the network that takes the latent
    cfg = getattr(core, "config", None)
    channels = getattr(cfg, "in_channels", None)
    if channels is not None and channels != latent_shape[0]:
        _fail(info_path, "latent_shape", f"{list(latent_shape)} has {latent_shape[0]} channels but the "
                                         f"{core.__class__.__name__} takes {channels}")
    size = getattr(cfg, "input_size", None)
    if size is not None and tuple(size) != tuple(latent_shape[1:]):
        _fail(info_path, "latent_shape", f"{list(latent_shape)} but the {core.__class__.__name__} was built "
                                         f"for latents of spatial size {list(size)} (config.input_size)")
    multiple = getattr(core, "downsample_factor", None)
    frames = getattr(cfg, "frames", 0)  # a cine U-Net folds its last (frame) axis into channels
    if frames and latent_shape[-1] != frames:
        _fail(info_path, "latent_shape", f"{list(latent_shape)} but the U-Net folds {frames} latent frames "
                                         "(config.frames)")
    halved = latent_shape[1:len(latent_shape) - (1 if frames else 0)]
    dims = getattr(cfg, "spatial_dims", None)
    if isinstance(multiple, int) and isinstance(dims, int) and len(halved) != dims:
        _fail(info_path, "latent_shape", f"{list(latent_shape)} but the U-Net is {dims}D"
                                         + (f" with {frames} folded frames" if frames else ""))
    if isinstance(multiple, int) and any(s % multiple for s in halved):
        _fail(info_path, "latent_shape", f"{list(latent_shape)}: the U-Net needs spatial sizes divisible by "
                                         f"{multiple}")
    k = getattr(net, "mask_channels", None)
    if k is not None and k != len(info["mask_labels"]):
        _fail(info_path, "mask_labels", f"{info['mask_labels']} names {len(info['mask_labels'])} labels but the "
                                        f"model takes {k} mask channels")
    # last: the one check that reads every weight (a NaN file samples constant, normal-looking volumes)
    check_weights_finite(model_weights_path(denoiser_dir))
    check_weights_finite(model_weights_path(vae_dir))
    return info, vae_info


# ---- ONNX export manifests (no torch) ------------------------------------------------------------

def export_file(folder: Path, manifest_path: Path, key: str, name) -> Path:
    """A file the manifest names, which must lie inside the export folder (no absolute paths,
    no '..', no links out of it)."""
    if not isinstance(name, str) or not name:
        _fail(manifest_path, key, f"expected a file name, got {json.dumps(name)[:80]}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        _fail(manifest_path, key, f"{name!r} is outside the export folder; a manifest may only name files in it")
    root = folder.resolve()
    target = (folder / name).resolve()
    if target != root and root not in target.parents:
        _fail(manifest_path, key, f"{name!r} leads outside the export folder (to {target}); a manifest may only "
                                  "name files in it")
    if not target.is_file():
        _fail(manifest_path, key, f"{name} is missing from the export")
    return target


def check_manifest(folder, manifest: dict) -> dict:
    """Validate an export manifest (already parsed, format and version checked) before any
    session is created. Returns {"files": {key: Path}, "codebook": Path}."""
    folder = Path(folder)
    path = folder / "medgen_export.json"
    latent_shape = check_sampling_keys(path, manifest)
    diff = manifest["diffusion"]
    files = _dict(path, manifest, "files", "the ONNX files of the export")
    resolved = {key: export_file(folder, path, f"files.{key}", name) for key, name in files.items()}
    for part in ("denoiser", "decoder"):
        if part not in files:
            raise ValueError(f"{path}: missing key 'files.{part}' (the {part} ONNX file)")
    codebook = export_file(folder, path, "codebook", _require(path, manifest, "codebook", "the codebook file"))
    if diff["objective"] == "ddpm":
        schedule = _dict(path, manifest, "schedule", "the DDPM schedule tables")
        for key in ("betas", "alphas_cumprod"):
            table = _require(path, schedule, key, f"schedule.{key}")
            try:
                values = np.asarray(table, dtype=np.float64)
            except (TypeError, ValueError):
                values = np.zeros(0)
            if values.shape != (diff["timesteps"],) or not np.all((values > 0) & (values <= 1)):
                _fail(path, f"schedule.{key}", f"expected {diff['timesteps']} values in (0, 1] "
                                               "(diffusion.timesteps)")
    decoder = _dict(path, manifest, "decoder", "the decoder's geometry")
    n = len(latent_shape) - 1
    factor = _positive_ints(path, "decoder.factor", _require(path, decoder, "factor", "decoder.factor"), (n,))
    halo = _require(path, decoder, "halo", "decoder.halo")
    if not isinstance(halo, list) or len(halo) != n or not all(_is_int(v) and v >= 0 for v in halo):
        _fail(path, "decoder.halo", f"expected {n} non-negative integers, got {json.dumps(halo)[:80]}")
    axis = _require(path, decoder, "output_axis", "decoder.output_axis")
    if not isinstance(axis, list) or sorted(axis) != list(range(n)):
        _fail(path, "decoder.output_axis", f"expected a permutation of 0..{n - 1}, got {json.dumps(axis)[:80]}")
    if not isinstance(decoder.get("cine"), bool):
        _fail(path, "decoder.cine", f"expected true or false, got {json.dumps(decoder.get('cine'))}")
    out_channels = _require(path, decoder, "out_channels", "decoder.out_channels")
    if not _is_int(out_channels) or out_channels < 1:
        _fail(path, "decoder.out_channels", f"expected a positive integer, got {json.dumps(out_channels)}")
    emb = _require(path, decoder, "embedding_dim", "decoder.embedding_dim")
    if not _is_int(emb) or emb < 1:
        _fail(path, "decoder.embedding_dim", f"expected a positive integer, got {json.dumps(emb)}")
    check_geometry(path, latent_shape, emb, factor, axis, manifest.get("geometry"))
    if not isinstance(manifest.get("conditional"), bool):
        _fail(path, "conditional", f"expected true or false, got {json.dumps(manifest.get('conditional'))}")
    if manifest["conditional"]:
        labels = check_mask_labels(path, _require(path, manifest, "mask_labels", "the label values"))
        mask_shape = _positive_ints(path, "mask_shape", _require(path, manifest, "mask_shape", "the mask's shape"),
                                    (len(latent_shape),))
        if mask_shape[0] != len(labels):
            _fail(path, "mask_shape", f"{list(mask_shape)} has {mask_shape[0]} channels for {len(labels)} mask labels")
    scale = manifest.get("flow_timestep_scale", 1000.0)
    if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
        _fail(path, "flow_timestep_scale", f"must be a finite number > 0, got {json.dumps(scale)}")
    return {"files": resolved, "codebook": codebook}


def load_codebook(path: Path, manifest_path: Path, embedding_dim: int) -> np.ndarray:
    """The (K, D) codebook, memory-mapped first so a header claiming more than the file holds
    fails before anything is allocated."""
    try:
        book = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable codebook (.npy) ({exc})") from None
    if book.ndim != 2 or book.shape[1] != embedding_dim or book.shape[0] < 1 or book.dtype.kind != "f":
        raise ValueError(f"{path}: codebook of shape {book.shape} {book.dtype}; {manifest_path} "
                         f"(decoder.embedding_dim) needs (K, {embedding_dim}) floats")
    book = np.array(book, dtype=np.float32)
    if not np.all(np.isfinite(book)):
        raise ValueError(f"{path}: the codebook has non-finite values (NaN/Inf); the export is corrupt")
    return book


def check_session_input(path: Path, manifest_path: Path, session, name: str, want: Sequence[Optional[int]],
                        key: str) -> None:
    """The ONNX model's input ``name`` takes the shape the manifest says (batch and symbolic dims free)."""
    inputs = {i.name: i for i in session.get_inputs()}
    if name not in inputs:
        raise ValueError(f"{path}: has no input {name!r} (inputs: {', '.join(inputs)}); it is not the model "
                         f"{manifest_path} describes")
    got = list(inputs[name].shape)
    fixed = [d if isinstance(d, int) else None for d in got]
    if len(got) != len(want) or any(g is not None and w is not None and g != w for g, w in zip(fixed, want)):
        shown = [d if isinstance(d, int) else "N" for d in got]
        raise ValueError(f"{manifest_path}: {key}: the ONNX model {path.name} takes {name} of shape {shown}, "
                         f"the manifest says {['N' if w is None else w for w in want]}")
