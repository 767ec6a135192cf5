"""Reverse-process samplers: DDPM, DDIM (any number of steps) and Euler for rectified flow.

``model_fn(x_t, t, cond) -> model_output`` is the only interface to a network:
``x_t`` is (B, C, *spatial); ``t`` is a long tensor (B,) of discrete timesteps
for DDPM/DDIM, or a float tensor (B,) of ``t_continuous * timestep_scale`` for
the flow sampler; ``cond`` is whatever the network takes as a condition (a
tensor or a dict/list/tuple of tensors with the batch first, or None).

The step arithmetic, the schedulers and the loop are medgen_rt.runtime.schedulers, shared
with the torch-free ONNX engine; this module is their torch face (tensors, generators,
per-sample timesteps, structured conditions).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from medgen_rt.runtime import schedulers as S
from medgen_rt.runtime.schedulers import DEFAULT_TIMESTEP_SCALE, SAMPLERS, SPACINGS  # noqa: F401 - SPACINGS re-exported

from .schedule import NoiseSchedule, _gather, check_prediction_type, check_timestep


class StepOutput(tuple):
    """``(prev_sample, pred_x0)`` returned by the step functions."""

    __slots__ = ()

    def __new__(cls, prev_sample, pred_x0):
        return super().__new__(cls, (prev_sample, pred_x0))

    @property
    def prev_sample(self) -> torch.Tensor:
        return self[0]

    @property
    def pred_x0(self) -> torch.Tensor:
        return self[1]


def _draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gdev = generator.device if generator is not None else like.device
    n = torch.randn(like.shape, generator=generator, device=gdev, dtype=like.dtype)
    return n.to(like.device)


def _check_noise(noise: torch.Tensor, x: torch.Tensor, name: str = "noise") -> torch.Tensor:
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"{name} has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def timesteps_for(num_inference_steps: int, num_train_timesteps: int, spacing: str = "leading") -> torch.Tensor:
    """:func:`medgen_rt.runtime.schedulers.timesteps` as a long tensor."""
    return torch.from_numpy(S.timesteps(num_inference_steps, num_train_timesteps, spacing))


# --------------------------------------------------------------------------- #
# single steps with per-sample timesteps (the loop uses the scheduler objects)
# --------------------------------------------------------------------------- #
def _tables(schedule: NoiseSchedule, t) -> np.ndarray:
    """``a_bar`` at t (int or (B,) tensor; -1 gives 1) as numpy float64, the schedulers' precision."""
    return _gather(schedule.alphas_cumprod, t, 1.0).detach().to("cpu", torch.float64).numpy()


def _np_t(t):
    return t if isinstance(t, int) else t.detach().cpu().numpy()


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    noise: torch.Tensor | None = None,
    prediction_type: str = "v_prediction",
    clip_sample=None,
    *,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Ancestral DDPM step t -> t-1 (:func:`medgen_rt.runtime.schedulers.ddpm_update`) for an int or
    (B,) long ``t``; no noise where t = 0. ``noise`` defaults to a draw from ``generator``.
    ``clip_sample`` (None, True = 1, or a bound c) clamps x0_hat to [-c, c]."""
    check_prediction_type(prediction_type)
    t = check_timestep(t, schedule.num_train_timesteps, "t")
    _check_noise(model_output, x_t, "model_output")
    beta, alpha = (_gather(tab, t).detach().to("cpu", torch.float64).numpy()
                   for tab in (schedule.betas, schedule.alphas))
    if noise is None and bool((torch.as_tensor(t) > 0).any()):
        noise = _draw_noise(x_t, generator)
    elif noise is not None:
        noise = _check_noise(noise, x_t)
    return StepOutput(*S.ddpm_update(model_output, x_t, _np_t(t), _tables(schedule, t), _tables(schedule, t - 1),
                                     beta, alpha, prediction_type, clip_sample, noise))


def ddim_sigma(schedule: NoiseSchedule, t, t_prev, eta: float) -> torch.Tensor:
    """DDIM noise level ``eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)`` (float64).

    For eta = 1 and t_prev = t - 1 this is the DDPM posterior std ("fixed_small"):
    ``a_t / a_prev = alpha_t = 1 - beta_t``, so sigma^2 = (1 - a_prev)/(1 - a_t) * beta_t.
    """
    T = schedule.num_train_timesteps
    t = check_timestep(t, T, "t")
    t_prev = check_timestep(t_prev, T, "t_prev", allow_minus_one=True)
    return torch.as_tensor(S.ddim_sigma(_tables(schedule, t), _tables(schedule, t_prev), float(eta)))


def ddim_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    t,
    t_prev,
    x_t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "v_prediction",
    clip_sample=None,
    *,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """DDIM step t -> t_prev (:func:`medgen_rt.runtime.schedulers.ddim_update`) for any ``t_prev < t``,
    ints or (B,) long tensors; ``t_prev = -1`` is the final step to the clean sample. eta = 0 is
    deterministic; eta = 1 with t_prev = t - 1 is the DDPM step. ``noise`` defaults to a draw from
    ``generator``."""
    check_prediction_type(prediction_type)
    eta = S.check_eta(eta)
    T = schedule.num_train_timesteps
    t = check_timestep(t, T, "t")
    t_prev = check_timestep(t_prev, T, "t_prev", allow_minus_one=True)
    if bool(np.any(np.asarray(_np_t(t_prev)) >= np.asarray(_np_t(t)))):
        raise ValueError(f"t_prev must be < t for every sample; got t={t}, t_prev={t_prev}")
    _check_noise(model_output, x_t, "model_output")
    if eta > 0.0:
        noise = _draw_noise(x_t, generator) if noise is None else _check_noise(noise, x_t)
    return StepOutput(*S.ddim_update(model_output, x_t, _tables(schedule, t), _tables(schedule, t_prev),
                                     prediction_type, eta, clip_sample, noise))


# --------------------------------------------------------------------------- #
# classifier-free guidance
# --------------------------------------------------------------------------- #
def _cat_cond(cond, null_cond, batch: int):
    """Concatenate a condition and its null along the batch (cond first)."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(null_cond, torch.Tensor):
            raise ValueError("null_cond must have the same structure as cond (a tensor)")
        null = null_cond.to(device=cond.device, dtype=cond.dtype)
        if null.ndim == cond.ndim and null.shape[0] == 1 and cond.shape[0] == batch and batch != 1:
            null = null.expand(batch, *null.shape[1:])
        if tuple(null.shape) != tuple(cond.shape):
            raise ValueError(f"null_cond has shape {tuple(null.shape)}, expected {tuple(cond.shape)}")
        return torch.cat([cond, null], dim=0)
    if isinstance(cond, dict):
        if not isinstance(null_cond, dict) or set(null_cond) != set(cond):
            raise ValueError("null_cond must be a dict with the same keys as cond")
        return {k: _cat_cond(cond[k], null_cond[k], batch) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(null_cond, (list, tuple)) or len(null_cond) != len(cond):
            raise ValueError("null_cond must be a sequence of the same length as cond")
        return type(cond)(_cat_cond(c, n, batch) for c, n in zip(cond, null_cond))
    if cond is None and null_cond is None:
        return None
    raise ValueError(f"cannot batch a condition of type {type(cond).__name__}; use tensors")


def guided_model_output(model_fn, x, t_model, cond, null_cond, guidance_scale):
    """One model evaluation, with classifier-free guidance when asked for
    (:func:`medgen_rt.runtime.schedulers.guided_output`; conditions may be tensors or
    dicts/lists/tuples of them, a batch-1 null condition is broadcast)."""
    b = x.shape[0]
    return S.guided_output(model_fn, x, t_model, cond, null_cond, guidance_scale,
                           join=lambda c, n: _cat_cond(c, n, b))


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #
def network_fn(model, conditional: bool, dtype: torch.dtype = torch.float32) -> Callable:
    """A denoiser network as the samplers call it (``model_fn(x_t, t, cond)``): float32 latents
    in and out, the network in ``dtype``, a scalar or 0-d ``t`` spread over the batch; ``cond``
    is passed on only for conditional networks."""
    def fn(x, t, cond):
        t = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        x = x.to(dtype)
        out = model(x, t, cond.to(dtype)) if conditional else model(x, t)
        return out.float()
    return fn


def sample(
    model_fn: Callable,
    shape: Sequence[int],
    schedule: NoiseSchedule | None = None,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    guidance_scale: float | None = None,
    cond=None,
    null_cond=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    step_noises=None,
    step_seeds: Sequence[int] | None = None,
    spacing: str = "leading",
    clip_sample=None,
    timestep_scale: float = DEFAULT_TIMESTEP_SCALE,
    return_trajectory: bool = False,
):
    """Run a reverse process from pure noise and return the final sample ``x0``, with the
    schedulers and the loop of :mod:`medgen_rt.runtime.schedulers` (those of the ONNX engine too).

    model_fn:  ``model_fn(x_t, t, cond) -> output`` (see the module docstring).
    shape:     (B, C, *spatial) of the latent.
    schedule:  the :class:`NoiseSchedule` (DDPM/DDIM; unused by ``"euler"``).
    sampler:   ``"ddim"`` (``steps`` default 50, ``eta`` 0 = deterministic),
               ``"ddpm"`` (all T steps; any other ``steps`` is a ValueError) or
               ``"euler"`` (rectified flow, ``steps`` default 50).
    prediction_type: ``"epsilon"``, ``"v_prediction"`` (default for DDPM/DDIM) or
               ``"sample"``; the Euler sampler takes velocity (``"flow"``) only.
    guidance_scale, cond, null_cond: classifier-free guidance, see
               :func:`guided_model_output`; ``guidance_scale=None`` (or ``cond=None``)
               is one plain call per step, any number (also 1.0) runs the batched
               conditional + unconditional call.
    generator, noise: initial noise ``noise`` (shape ``shape``) or drawn with
               ``generator`` (on the generator's device, then moved).
    step_noises: per-step noise for the stochastic samplers (DDPM, DDIM with eta > 0):
               a sequence indexed by step number (0-based) or a callable
               ``step_noises(i) -> tensor``.
    step_seeds: otherwise, one seed per batch row: step noise from
               :func:`medgen_rt.runtime.schedulers.step_noise`, the ONNX engine's for the same
               seeds; default: seeds drawn from ``generator`` (or torch's global generator).
               Either way independent of the initial noise.
    device, dtype: where and in which dtype the sample lives (default: those of
               ``noise``, else CPU / float32). Model outputs are cast to it.
    progress:  ``progress(i, total)`` after each step, i = 1 .. total.
    spacing:   DDIM timestep spacing, see :func:`timesteps_for`.
    clip_sample: clamp x0_hat to [-c, c] in DDPM/DDIM (None: off).
    timestep_scale: Euler only, the model receives ``t * timestep_scale``.
    return_trajectory: also return ``[x_start, x_after_step_1, ..., x_final]``.

    Runs under ``torch.no_grad()``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, *spatial) with positive sizes; got {shape}")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number or None; got {guidance_scale!r}")
        if cond is not None and null_cond is None:
            raise ValueError("null_cond is required for classifier-free guidance (guidance_scale with cond)")
    tables = {}
    if sampler != "euler":
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule for sampler {sampler!r}")
        tables = {k: getattr(schedule, k).detach().to("cpu", torch.float64).numpy()
                  for k in ("betas", "alphas", "alphas_cumprod")}
    scheduler = S.make_scheduler(sampler, steps, prediction_type=prediction_type, eta=eta, spacing=spacing,
                                 clip_sample=clip_sample, timestep_scale=timestep_scale, **tables)
    steps = len(scheduler.timesteps)

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype; got {dtype}")
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        device = noise.device if device is None else torch.device(device)
        dtype = noise.dtype if dtype is None else dtype
        x = noise.to(device=device, dtype=dtype).clone()
    else:
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        gdev = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)
    if not dtype.is_floating_point:
        raise ValueError(f"noise must be a floating tensor; got dtype {dtype}")

    if step_noises is not None:
        if not callable(step_noises) and len(step_noises) < steps:
            raise ValueError(f"step_noises has {len(step_noises)} entries for {steps} steps")

        start = x

        def noise_fn(i: int) -> torch.Tensor:
            n = step_noises(i) if callable(step_noises) else step_noises[i]
            return _check_noise(n, start, f"step_noises[{i}]")
    else:
        if step_seeds is not None and len(step_seeds) != shape[0]:
            raise ValueError(f"step_seeds has {len(step_seeds)} seeds for a batch of {shape[0]}")
        if step_seeds is None and scheduler.stochastic:  # drawn only when needed: deterministic runs keep the generator
            gdev = generator.device if generator is not None else "cpu"
            step_seeds = torch.randint(0, 2**63 - 1, (shape[0],), generator=generator, device=gdev).tolist()

        def noise_fn(i: int) -> torch.Tensor:
            return torch.from_numpy(S.step_noise(step_seeds, i, shape)).to(device=device, dtype=dtype)

    # the discrete samplers give the network long timesteps, the flow sampler t * scale as floats
    t_dtype = torch.long if sampler != "euler" else (torch.float64 if dtype == torch.float64 else torch.float32)

    def fn(x_, t, c):
        return model_fn(x_, torch.full((x_.shape[0],), t, device=device, dtype=t_dtype), c).to(dtype)

    traj = [x] if return_trajectory else None
    with torch.no_grad():
        x = S.denoise_loop(fn, x, scheduler, guidance_scale=guidance_scale, cond=cond, null_cond=null_cond,
                           noise_fn=noise_fn, join=lambda c, n: _cat_cond(c, n, shape[0]), progress=progress,
                           trajectory=traj)
    return (x, traj) if return_trajectory else x


def euler_sample(model_fn, shape, *, steps: int = 50, **kwargs):
    """Shortcut for ``sample(model_fn, shape, sampler="euler", steps=steps, **kwargs)``."""
    return sample(model_fn, shape, None, sampler="euler", steps=steps, **kwargs)
