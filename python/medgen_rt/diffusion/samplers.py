"""Reverse-process samplers: DDPM, DDIM (any number of steps) and Euler for rectified flow.

``model_fn(x_t, t, cond) -> model_output`` is the only interface to a network:
``x_t`` is (B, C, *spatial); ``t`` is a long tensor (B,) of discrete timesteps
for DDPM/DDIM, or a float tensor (B,) of ``t_continuous * timestep_scale`` for
the flow sampler; ``cond`` is whatever the network takes as a condition (a
tensor or a dict/list/tuple of tensors with the batch first, or None).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .flow import DEFAULT_TIMESTEP_SCALE, euler_step, flow_model_timesteps, flow_timesteps
from .schedule import (
    NoiseSchedule,
    _gather,
    broadcast_coef,
    check_prediction_type,
    check_timestep,
)

SAMPLERS = ("ddim", "ddpm", "euler")
SPACINGS = ("leading", "trailing", "linspace")


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


def _check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int; got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}; got {value}")
    return value


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta must be a finite float >= 0; got {eta!r}")
    return float(eta)


def _clip(x0: torch.Tensor, clip_sample) -> torch.Tensor:
    if clip_sample is None or clip_sample is False:
        return x0
    c = 1.0 if clip_sample is True else float(clip_sample)
    if not c > 0:
        raise ValueError(f"clip_sample must be None, True or a positive bound; got {clip_sample!r}")
    return x0.clamp(-c, c)


def _draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gdev = generator.device if generator is not None else like.device
    n = torch.randn(like.shape, generator=generator, device=gdev, dtype=like.dtype)
    return n.to(like.device)


def _check_noise(noise: torch.Tensor, x: torch.Tensor, name: str = "noise") -> torch.Tensor:
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"{name} has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------- #
# timesteps
# --------------------------------------------------------------------------- #
def timesteps_for(num_inference_steps: int, num_train_timesteps: int, spacing: str = "leading") -> torch.Tensor:
    """Descending integer timesteps (long tensor, length ``num_inference_steps``).

    ``"leading"`` (default; the published DDIM/DDPM ``set_timesteps``):
    ``k * (T // n)`` for k = n-1 .. 0, e.g. n = 50, T = 300 -> 294, 288, ..., 0.
    ``"trailing"``: ``round(T - k * T / n) - 1`` for k = 0 .. n-1 (starts at T-1).
    ``"linspace"``: ``round(linspace(T - 1, 0, n))``.
    All three give ``T-1, ..., 0`` for n = T.
    """
    T = _check_int(num_train_timesteps, "num_train_timesteps", 1)
    n = _check_int(num_inference_steps, "num_inference_steps", 1, T)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    if spacing == "leading":
        ts = np.arange(n - 1, -1, -1, dtype=np.int64) * (T // n)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(n, dtype=np.float64) * (T / n)).astype(np.int64) - 1
    else:
        ts = np.round(np.linspace(T - 1, 0, n)).astype(np.int64)
    return torch.from_numpy(ts.copy())


# --------------------------------------------------------------------------- #
# single steps
# --------------------------------------------------------------------------- #
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
    """Ancestral DDPM step t -> t-1 (Ho et al. 2020), variance "fixed_small".

    ``x_{t-1} = c0 * x0_hat + ct * x_t + sqrt(var) * noise`` with the posterior
    q(x_{t-1} | x_t, x0) coefficients ``c0 = sqrt(a_bar_{t-1}) beta_t / (1 - a_bar_t)``,
    ``ct = sqrt(alpha_t) (1 - a_bar_{t-1}) / (1 - a_bar_t)`` and
    ``var = (1 - a_bar_{t-1}) / (1 - a_bar_t) * beta_t`` (clamped at 1e-20), where
    ``a_bar_{-1} = 1``; no noise is added where t = 0. ``noise`` defaults to a
    draw from ``generator``. ``clip_sample`` (None, True = 1, or a bound c)
    clamps x0_hat to [-c, c]. Returns ``StepOutput(prev_sample, pred_x0)``.
    """
    check_prediction_type(prediction_type)
    T = schedule.num_train_timesteps
    t = check_timestep(t, T, "t")
    x0, _ = schedule.predict_x0_eps(model_output, x_t, t, prediction_type)
    x0 = _clip(x0, clip_sample)

    t_prev = t - 1  # -1 (only for t = 0) means a_bar_prev = 1
    a_t = _gather(schedule.alphas_cumprod, t)
    a_prev = _gather(schedule.alphas_cumprod, t_prev, 1.0)
    beta_t = _gather(schedule.betas, t)
    alpha_t = _gather(schedule.alphas, t)

    c0 = a_prev.sqrt() * beta_t / (1.0 - a_t)
    ct = alpha_t.sqrt() * (1.0 - a_prev) / (1.0 - a_t)
    mean = broadcast_coef(c0, x_t) * x0 + broadcast_coef(ct, x_t) * x_t

    var = ((1.0 - a_prev) / (1.0 - a_t) * beta_t).clamp(min=1e-20)
    if isinstance(t, int):
        if t == 0:
            return StepOutput(mean, x0)
        std = var.sqrt()
    else:
        std = torch.where(t > 0, var.sqrt(), torch.zeros_like(var))
    noise = _draw_noise(x_t, generator) if noise is None else _check_noise(noise, x_t)
    return StepOutput(mean + broadcast_coef(std, x_t) * noise, x0)


def ddim_sigma(schedule: NoiseSchedule, t, t_prev, eta: float) -> torch.Tensor:
    """DDIM noise level ``eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``.

    For eta = 1 and t_prev = t - 1 this is the DDPM posterior std ("fixed_small"):
    ``a_t / a_prev = alpha_t = 1 - beta_t``, so sigma^2 = (1 - a_prev)/(1 - a_t) * beta_t.
    """
    T = schedule.num_train_timesteps
    t = check_timestep(t, T, "t")
    t_prev = check_timestep(t_prev, T, "t_prev", allow_minus_one=True)
    a_t = _gather(schedule.alphas_cumprod, t)
    a_prev = _gather(schedule.alphas_cumprod, t_prev, 1.0)
    return float(eta) * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).clamp(min=0.0).sqrt()


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
    """DDIM step t -> t_prev (Song et al. 2021, eq. 12) for any ``t_prev < t``.

    ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma noise``
    with ``sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t / a_prev)`` and
    ``a_prev = 1`` for ``t_prev = -1`` (the final step to the clean sample).
    eta = 0 is deterministic DDIM; eta = 1 with t_prev = t - 1 is exactly the
    DDPM ancestral step. With ``clip_sample`` the eps estimate is recomputed
    from the clipped x0 so that the update stays on the same trajectory family.
    ``t``/``t_prev`` are ints or (B,) long tensors. Returns ``StepOutput``.
    """
    check_prediction_type(prediction_type)
    eta = _check_eta(eta)
    T = schedule.num_train_timesteps
    t = check_timestep(t, T, "t")
    t_prev = check_timestep(t_prev, T, "t_prev", allow_minus_one=True)
    if isinstance(t, int) and isinstance(t_prev, int):
        if t_prev >= t:
            raise ValueError(f"t_prev must be < t; got t={t}, t_prev={t_prev}")
    elif bool((torch.as_tensor(t_prev, device=torch.as_tensor(t).device) >= torch.as_tensor(t)).any()):
        raise ValueError("t_prev must be < t for every sample")

    x0, eps = schedule.predict_x0_eps(model_output, x_t, t, prediction_type)
    if clip_sample is not None and clip_sample is not False:
        x0 = _clip(x0, clip_sample)
        a_t = _gather(schedule.alphas_cumprod, t)
        eps = (x_t - broadcast_coef(a_t.sqrt(), x_t) * x0) * broadcast_coef(1.0 / (1.0 - a_t).sqrt(), x_t)

    a_prev = _gather(schedule.alphas_cumprod, t_prev, 1.0)
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    dir_coef = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt()
    prev = broadcast_coef(a_prev.sqrt(), x_t) * x0 + broadcast_coef(dir_coef, x_t) * eps
    if eta > 0.0:
        noise = _draw_noise(x_t, generator) if noise is None else _check_noise(noise, x_t)
        prev = prev + broadcast_coef(sigma, x_t) * noise
    return StepOutput(prev, x0)


# --------------------------------------------------------------------------- #
# classifier-free guidance
# --------------------------------------------------------------------------- #
def _batch_size_of(cond) -> int | None:
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.ndim else None
    if isinstance(cond, dict):
        for v in cond.values():
            b = _batch_size_of(v)
            if b is not None:
                return b
    if isinstance(cond, (list, tuple)):
        for v in cond:
            b = _batch_size_of(v)
            if b is not None:
                return b
    return None


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
    """One model evaluation, with classifier-free guidance when asked for.

    Without guidance (``guidance_scale is None`` or ``cond is None``):
    ``model_fn(x, t_model, cond)``. With guidance: one batched call on
    ``cat([x, x])``, ``cat([t, t])``, ``cat([cond, null_cond])`` and
    ``out = uncond + s * (cond_out - uncond)``.
    """
    if guidance_scale is None or cond is None:
        return model_fn(x, t_model, cond)
    b = x.shape[0]
    both = model_fn(torch.cat([x, x], dim=0), torch.cat([t_model, t_model], dim=0), _cat_cond(cond, null_cond, b))
    if both.shape[0] != 2 * b:
        raise ValueError(f"model_fn returned batch {both.shape[0]} for a guided batch of {2 * b}")
    out_c, out_u = both[:b], both[b:]
    return out_u + guidance_scale * (out_c - out_u)


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
    spacing: str = "leading",
    clip_sample=None,
    timestep_scale: float = DEFAULT_TIMESTEP_SCALE,
    return_trajectory: bool = False,
):
    """Run a reverse process from pure noise and return the final sample ``x0``.

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
               ``step_noises(i) -> tensor``; default: drawn with ``generator``.
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
    eta = _check_eta(eta)

    if sampler == "euler":
        if prediction_type not in (None, "flow"):
            raise ValueError(
                f"prediction_type for the euler (rectified-flow) sampler must be 'flow'; got {prediction_type!r}"
            )
        steps = 50 if steps is None else _check_int(steps, "steps", 1)
    else:
        if schedule is None or not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule for sampler {sampler!r}")
        prediction_type = "v_prediction" if prediction_type is None else prediction_type
        check_prediction_type(prediction_type)
        T = schedule.num_train_timesteps
        if sampler == "ddpm":
            steps = T if steps is None else _check_int(steps, "steps", 1, T)
            if steps != T:
                raise ValueError(
                    f"steps must equal num_train_timesteps={T} for the ddpm sampler (got {steps}); "
                    "ancestral DDPM is only defined step by step; use sampler='ddim' (eta=1 for the "
                    "stochastic variant) for fewer steps"
                )
        else:
            steps = min(50, T) if steps is None else _check_int(steps, "steps", 1, T)

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

    if step_noises is not None and not callable(step_noises) and len(step_noises) < steps:
        raise ValueError(f"step_noises has {len(step_noises)} entries for {steps} steps")

    def step_noise(i: int) -> torch.Tensor:
        if step_noises is None:
            return _draw_noise(x, generator)
        n = step_noises(i) if callable(step_noises) else step_noises[i]
        return _check_noise(n, x, f"step_noises[{i}]")

    B = shape[0]
    traj = [x] if return_trajectory else None

    with torch.no_grad():
        if sampler == "euler":
            grid = flow_timesteps(steps).tolist() + [0.0]
            t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            for i in range(steps):
                t_cur, t_next = grid[i], grid[i + 1]
                t_model = flow_model_timesteps(torch.full((B,), t_cur, device=device, dtype=t_dtype), timestep_scale)
                out = guided_model_output(model_fn, x, t_model, cond, null_cond, guidance_scale).to(dtype)
                x, _ = euler_step(out, t_cur, t_next, x)
                if traj is not None:
                    traj.append(x)
                if progress is not None:
                    progress(i + 1, steps)
        else:
            if sampler == "ddpm":
                ts = list(range(T - 1, -1, -1))
            else:
                ts = timesteps_for(steps, T, spacing).tolist()
            for i, t in enumerate(ts):
                t_model = torch.full((B,), t, device=device, dtype=torch.long)
                out = guided_model_output(model_fn, x, t_model, cond, null_cond, guidance_scale).to(dtype)
                if sampler == "ddpm":
                    n = step_noise(i) if t > 0 else None
                    x, _ = ddpm_step(schedule, out, t, x, n, prediction_type, clip_sample)
                else:
                    t_prev = ts[i + 1] if i + 1 < len(ts) else -1
                    n = step_noise(i) if eta > 0.0 else None
                    x, _ = ddim_step(schedule, out, t, t_prev, x, eta, n, prediction_type, clip_sample)
                if traj is not None:
                    traj.append(x)
                if progress is not None:
                    progress(i + 1, steps)

    return (x, traj) if return_trajectory else x
