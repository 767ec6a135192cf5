"""What both sampling runtimes know about a model before any weights are loaded, and the input
checks they share. Torch-free (numpy and medgen_rt.io only): the ONNX engine imports it where
PyTorch is not installed.

ModelSpec: a model's sampling facts, read from a run folder's model.json (the torch runtime) or
from an export manifest (the ONNX engine), so that the two cannot drift in what they read.
check_inputs: a request checked against a spec (guidance, sampler and steps defaults, masks),
resolved into a Request that the pipeline (medgen_rt.sampling.pipeline) runs.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SAMPLERS = ("ddim", "ddpm", "euler")
TEACHER_ONNX = ("--teacher: an ONNX export holds one network; export the teacher of an embedded model with "
                "`medgen export onnx --model NAME --teacher` and sample that folder")


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    modality: Optional[str]
    latent_shape: tuple
    diffusion: dict              # objective, timesteps, schedule, prediction
    conditional: bool
    mask_labels: tuple           # label values of the one-hot condition channels
    mask_spatial: tuple          # the mask's spatial shape (the image's)
    default_steps: Optional[int]  # a distilled student's own step count
    geometry: dict               # image_shape, affine, frame_duration (cine)
    scale_factor: float
    flow_timestep_scale: float = 1000.0
    null_condition: bool = False  # the runtime can sample a conditioned model through the null condition
    supported_steps: Optional[tuple] = None  # a distilled student's step counts; None: any
    distilled_from: Optional[dict] = None    # a student's teacher {run, kind, weights, sha256}; None: not a student

    @property
    def network(self) -> str:
        """What the sidecar calls the network that samples: "student" (a distilled run) or
        "teacher" (any other, sampled with the full sampler)."""
        return "student" if self.distilled_from else "teacher"

    @classmethod
    def from_model_json(cls, info: dict, vae_info: Optional[dict] = None, folder=None) -> "ModelSpec":
        """A torch run folder's model.json (checked by validate.check_model_folder); folder: where it
        lies, so that a relative distilled_from.run (an embedded student's "../tgca") is resolved."""
        geometry = info.get("geometry") or {}
        return cls(kind=info["kind"], modality=info.get("modality") or (vae_info or {}).get("modality"),
                   latent_shape=tuple(info["latent_shape"]), diffusion=info["diffusion"],
                   conditional=info["kind"] in ("tgca", "controlnet"),
                   mask_labels=tuple(info.get("mask_labels") or ()),
                   mask_spatial=tuple(geometry.get("image_shape") or ())[:3], default_steps=info.get("default_steps"),
                   geometry=geometry, scale_factor=float(info["scale_factor"]), null_condition=True,
                   supported_steps=_steps(info.get("supported_steps")),
                   distilled_from=teacher_record(info.get("distilled_from"), folder))

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelSpec":
        """An export manifest (checked by validate.check_manifest)."""
        info = manifest.get("model_info") or {}
        return cls(kind=manifest["kind"], modality=manifest.get("modality"),
                   latent_shape=tuple(manifest["latent_shape"]), diffusion=manifest["diffusion"],
                   conditional=manifest["conditional"], mask_labels=tuple(manifest.get("mask_labels") or ()),
                   mask_spatial=tuple((manifest.get("mask_shape") or [0])[1:]),
                   default_steps=manifest.get("default_steps"), geometry=manifest.get("geometry") or {},
                   scale_factor=float(manifest["scale_factor"]),
                   flow_timestep_scale=float(manifest.get("flow_timestep_scale", 1000.0)),
                   # exports made before these keys: the source's model.json (model_info) has them
                   supported_steps=_steps(manifest.get("supported_steps", info.get("supported_steps"))),
                   distilled_from=teacher_record(manifest.get("distilled_from", info.get("distilled_from")), None))

    @property
    def objective(self) -> str:
        return self.diffusion["objective"]

    @property
    def prediction(self) -> str:
        return self.diffusion.get("prediction") or "v_prediction"

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.geometry.get("affine") or np.eye(4))


def _steps(value) -> Optional[tuple]:
    return tuple(int(k) for k in value) if value else None


def teacher_record(record, folder) -> Optional[dict]:
    """A student's distilled_from with its run made absolute where the folder of the model.json that
    records it is known (an embedded student records its teacher as "../tgca"); None: not a student."""
    if not isinstance(record, dict):
        return None
    run = record.get("run")
    if folder is not None and isinstance(run, str) and not Path(run).is_absolute():
        record = {**record, "run": str((Path(folder) / run).resolve())}
    return dict(record)


@dataclass(frozen=True)
class MaskItem:
    """One volume's condition: the file (None: the null condition), the one-hot (K, *image) float32
    map, the label map written beside the volume, and the affine the volume is written with."""
    path: Optional[Path]
    onehot: np.ndarray
    labels: Optional[np.ndarray]
    affine: np.ndarray


@dataclass(frozen=True)
class Request:
    """A checked request with its defaults filled in (what the sidecars record)."""
    n: int
    seed: int
    sampler: str
    steps: int
    eta: float
    guidance: Optional[float]    # None for a model without a condition
    guided: bool                 # the doubled (condition + null) batch runs, for any scale (1.0 too)
    masks: Optional[list]        # a MaskItem per volume of a conditioned model


def _voxel_size(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def load_masks(masks, labels, shape, n: int, affine) -> list:
    """Mask NIfTI file(s) -> a MaskItem per volume (the files in turn), checked against the model:
    shape, integer labels it knows, and its voxel size (a map at another scale would be drawn at the
    model's scale). A conditioned volume takes its map's affine, so the two overlay in any viewer."""
    from medgen_rt.io import is_nifti_path, read_volume
    from medgen_rt.io.nifti import check_labels

    path = Path(masks)
    files = sorted(p for p in path.iterdir() if is_nifti_path(p)) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"--masks {masks}: no NIfTI masks found")
    out = []
    for f in files:
        mask = read_volume(f, dtype=None)
        vol = mask.array
        if tuple(vol.shape) != tuple(shape):
            raise ValueError(f"{f}: mask shape {tuple(vol.shape)} but the model generates {tuple(shape)}")
        check_labels(f, vol, labels, "the model's mask labels")  # the one label check of every reader (integers too)
        want, got = _voxel_size(affine), _voxel_size(mask.affine)
        if not np.allclose(got, want, rtol=0.01):
            raise ValueError(f"{f}: voxel size {tuple(np.round(got, 3))} mm but the model was trained at "
                             f"{tuple(np.round(want, 3))} mm")
        out.append(MaskItem(f, np.stack([vol == v for v in labels]).astype(np.float32), vol.astype(np.uint8),
                            np.asarray(mask.affine, dtype=np.float64)))
    return [out[i % len(out)] for i in range(n)]


def check_inputs(spec: ModelSpec, model: str, n: int, seed: int, steps: Optional[int], sampler: Optional[str],
                 guidance: Optional[float], eta: float, masks=None, unconditional: bool = False,
                 need_masks: bool = True) -> Request:
    """The checks of a request against the model (after summary.check_request's numbers), and its
    defaults: the sampler (euler for flow models, else ddim) and the steps (all T for ddpm, else the
    model's default_steps, else 50); a distilled student refuses steps outside its supported_steps.
    need_masks=False (a plan only): masks may be left out."""
    from medgen_rt.sampling.summary import check_guidance

    check_guidance(guidance, spec.conditional, unconditional, model)
    sampler = sampler or ("euler" if spec.objective == "flow" else "ddim")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be ddim, ddpm or euler, got {sampler!r}")
    if (sampler == "euler") != (spec.objective == "flow"):
        raise ValueError(f"sampler {sampler!r} does not fit this {spec.objective} model: "
                         "euler is for flow models, ddim and ddpm for DDPM-family ones")
    steps = steps or (spec.diffusion["timesteps"] if sampler == "ddpm" else spec.default_steps or 50)
    if spec.supported_steps and steps not in spec.supported_steps:
        counts = ", ".join(str(k) for k in spec.supported_steps)
        raise ValueError(f"--steps {steps}: model {model} is a distilled student that samples in {counts} step(s) "
                         "only (its supported_steps); for other step counts sample its teacher with the full "
                         "sampler (--teacher with an embedded model, else --model TEACHER_RUN)")
    items = None
    if not spec.conditional:
        if masks is not None:
            raise ValueError(f"model {model} is not mask-conditioned; masks cannot be used")
    elif unconditional:
        if masks is not None:
            raise ValueError("masks and unconditional exclude each other: the null condition has no map")
        # the all-zero map its condition dropout trained, in the model's geometry
        null = np.zeros((len(spec.mask_labels),) + spec.mask_spatial, dtype=np.float32)
        items = [MaskItem(None, null, None, spec.affine)] * n
    elif masks is not None:
        items = load_masks(masks, spec.mask_labels, spec.mask_spatial, n, spec.affine)
    elif need_masks:
        hint = ", or sample unconditionally (--unconditional) through the null condition" if spec.null_condition else ""
        raise ValueError(f"model {model} is mask-conditioned: pass masks (a NIfTI file or a folder){hint}")
    return Request(n=n, seed=seed, sampler=sampler, steps=steps, eta=eta,
                   guidance=guidance if spec.conditional else None,
                   guided=spec.conditional and guidance is not None, masks=items)


def output_folder(out, overwrite: bool, format: str):
    """The output folder of one call as a context: a path becomes an io.outputs.OutputFolder that this
    call locks until it returns; an OutputFolder (the CLI's, which carries its own formats) or None
    passes through."""
    from medgen_rt.io.dicom import parse_format
    from medgen_rt.io.outputs import OutputFolder

    formats = parse_format(format, "format")
    if out is None or isinstance(out, OutputFolder):
        return nullcontext(out)
    return OutputFolder(out, overwrite=overwrite, formats=formats)
