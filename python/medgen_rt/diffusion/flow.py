"""Rectified flow / flow matching on a straight path between data and noise.

Convention (the one of the published code, Cardio-AI/voldit
``src/models/flow_matching_scheduler.py`` and its trainer):

* continuous time ``t`` in [0, 1]; ``t = 0`` is data, ``t = 1`` is noise;
* ``x_t = (1 - t) * x0 + t * noise``;
* the model predicts the constant velocity ``v = noise - x0`` (data -> noise),
  so ``x0_hat = x_t - t * v``;
* the model's timestep input is ``t * timestep_scale`` with ``timestep_scale =
  1000`` by default (the published FlowMatchingScheduler's
  ``num_train_timesteps``, which there only scales t for the sinusoidal
  embedding), as a float tensor (B,);
* sampling integrates ``dx/dt = v`` with Euler from t = 1 to t = 0 on the grid
  ``1, 1 - 1/n, ..., 1/n`` (the last step lands on t = 0):
  ``x_{t - dt} = x_t - dt * v(x_t, t)``.
"""
from __future__ import annotations

import torch

from medgen_rt.runtime.schedulers import DEFAULT_TIMESTEP_SCALE, euler_step, flow_grid  # noqa: F401 - re-exported

FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def _bcast_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got shape {tuple(t.shape)}")
    return t.to(device=x.device, dtype=x.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))


def flow_training_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """``(x_t, v_target)`` with ``x_t = (1 - t) x0 + t noise`` and ``v_target = noise - x0``.

    ``t`` is continuous, float (B,) (or a scalar) in [0, 1].
    """
    if tuple(noise.shape) != tuple(x0.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)}")
    tt = torch.as_tensor(t)
    if not tt.dtype.is_floating_point:
        raise ValueError(f"t must be a float tensor of continuous times in [0, 1]; got dtype {tt.dtype}")
    if tt.numel() and (float(tt.min()) < 0.0 or float(tt.max()) > 1.0):
        raise ValueError("t must lie in [0, 1]")
    tb = _bcast_t(tt, x0)
    return (1.0 - tb) * x0 + tb * noise, noise - x0


def sample_flow_timesteps(
    batch_size: int,
    method: str = "logit_normal",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training times t (B,) in (0, 1).

    ``"uniform"``: t ~ U(0, 1). ``"logit_normal"``: t = sigmoid(N(logit_mean,
    logit_std^2)) (Esser et al. 2024), the published default (mean 0, std 1).
    Random numbers are drawn on the generator's device and moved to ``device``.
    """
    if method not in FLOW_TIMESTEP_SAMPLING:
        raise ValueError(f"method must be one of {FLOW_TIMESTEP_SAMPLING}; got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not logit_std > 0.0:
        raise ValueError(f"logit_std must be > 0; got {logit_std}")
    gdev = generator.device if generator is not None else device
    if method == "uniform":
        t = torch.rand(batch_size, generator=generator, device=gdev, dtype=dtype)
    else:
        u = torch.randn(batch_size, generator=generator, device=gdev, dtype=dtype)
        t = torch.sigmoid(u * logit_std + logit_mean)
    return t.to(device) if device is not None else t


def flow_model_timesteps(t: torch.Tensor, timestep_scale: float = DEFAULT_TIMESTEP_SCALE) -> torch.Tensor:
    """What the network's timestep embedding receives for continuous t: ``t * timestep_scale``."""
    return t * timestep_scale


def flow_timesteps(steps: int) -> torch.Tensor:
    """The Euler grid ``[1, 1 - 1/n, ..., 1/n]`` (float64, descending), n = ``steps``."""
    return torch.from_numpy(flow_grid(steps)[:-1].copy())
