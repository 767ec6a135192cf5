"""Diffusion processes for latent volumes: schedules, training targets, samplers.

Pure PyTorch (plus numpy); no model code. Conventions:

Tensors
    Data, noise and model outputs are ``(B, C, *spatial)`` with any number of
    spatial axes: (B, C, D, H, W) for 3D CT latents, (B, C, Z, H, W, T) for cine
    MRI latents. Nothing here looks at the spatial axes.

Discrete diffusion (DDPM / DDIM)
    Training timesteps ``t`` are integers 0 .. T-1 (T = ``num_train_timesteps``,
    300 in the published setting); t = 0 is the least noisy. They are either a
    Python int for the whole batch or a long tensor (B,), one per sample, and
    are what ``model_fn`` receives. ``x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps``.
    In DDIM, ``t_prev = -1`` means ``a_bar_prev = 1`` (the final step to x0).
    Schedules: cosine (default, improved DDPM as in the published code), linear,
    scaled_linear; see :func:`make_schedule`.

Prediction types
    ``"epsilon"`` (the noise), ``"v_prediction"`` (``v = sqrt(a_bar) eps -
    sqrt(1 - a_bar) x0``; the published setting, with smooth-L1 loss) and
    ``"sample"`` (x0 itself). Rectified flow is separate (``"flow"``):
    continuous t in [0, 1], ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``,
    model timestep ``t * 1000``; see :mod:`medgen_rt.diffusion.flow`.

Sampling
    :func:`sample` runs DDPM (all T steps), DDIM (any number of steps, eta for
    stochasticity) or Euler (rectified flow), with optional classifier-free
    guidance ``uncond + s * (cond - uncond)`` evaluated in one batched call. The
    schedulers and the loop are :mod:`medgen_rt.runtime.schedulers`, which the ONNX
    engine runs too; stochastic samplers draw their step noise from a seed stream of
    its own, independent of the initial noise.

Latent scaling
    Latents are multiplied by :func:`latent_scale_factor` = 1 / std before
    diffusion and divided by it before decoding.
"""
from __future__ import annotations

from .flow import (
    DEFAULT_TIMESTEP_SCALE,
    FLOW_TIMESTEP_SAMPLING,
    euler_step,
    flow_model_timesteps,
    flow_timesteps,
    flow_training_pair,
    sample_flow_timesteps,
)
from .losses import LOSS_KINDS, diffusion_loss, training_target
from .samplers import (
    SAMPLERS,
    SPACINGS,
    StepOutput,
    ddim_sigma,
    ddim_step,
    ddpm_step,
    euler_sample,
    guided_model_output,
    network_fn,
    sample,
    timesteps_for,
)
from .scaling import latent_scale_factor, latent_stats
from .schedule import (
    PREDICTION_TYPES,
    SCHEDULE_KINDS,
    NoiseSchedule,
    cosine_betas,
    make_schedule,
)

__all__ = [
    "DEFAULT_TIMESTEP_SCALE",
    "FLOW_TIMESTEP_SAMPLING",
    "LOSS_KINDS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "SPACINGS",
    "NoiseSchedule",
    "StepOutput",
    "cosine_betas",
    "ddim_sigma",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "euler_sample",
    "euler_step",
    "flow_model_timesteps",
    "flow_timesteps",
    "flow_training_pair",
    "guided_model_output",
    "latent_scale_factor",
    "latent_stats",
    "make_schedule",
    "network_fn",
    "sample",
    "sample_flow_timesteps",
    "timesteps_for",
    "training_target",
]
