"""Discrete-time noise schedules (DDPM family) and the conversions between them.

A schedule holds, for every training timestep ``t = 0 .. T-1``::

    betas[t]            noise added by the forward step t-1 -> t
    alphas[t]          = 1 - betas[t]
    alphas_cumprod[t]  = prod_{k <= t} alphas[k]          ("a_bar_t")

and the forward process ``x_t = sqrt(a_bar_t) * x0 + sqrt(1 - a_bar_t) * eps``.

Everything is computed in float64; the tables are stored in the dtype asked for
(float64 by default). Coefficients are looked up and combined in the table's
dtype and only the final per-sample factor is cast to the dtype of the data.

Timesteps ``t`` are either a Python int (one timestep for the whole batch) or an
integer tensor of shape ``(B,)`` (one timestep per sample). Data tensors are
``(B, C, *spatial)`` with any number of spatial axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

# the samplers' own (torch-free, shared with the ONNX engine)
from medgen_rt.runtime.schedulers import PREDICTION_TYPES, check_prediction_type, predict_x0_eps  # noqa: F401

SCHEDULE_KINDS = ("cosine", "linear", "scaled_linear")


# --------------------------------------------------------------------------- #
# argument checks shared by the package
# --------------------------------------------------------------------------- #

def check_timestep(t, num_train_timesteps: int, name: str = "t", allow_minus_one: bool = False):
    """Validate a discrete timestep and return it as an ``int`` or a 1-D integer tensor.

    ``allow_minus_one`` admits ``-1``, which stands for "before the first step",
    where ``a_bar = 1`` (the clean sample).
    """
    lo = -1 if allow_minus_one else 0
    hi = num_train_timesteps - 1
    if isinstance(t, bool):
        raise ValueError(f"{name} must be an integer timestep or integer tensor; got a bool")
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of discrete timesteps; got dtype {t.dtype} "
                "(continuous t in [0, 1] belongs to flow matching, see medgen_rt.diffusion.flow)"
            )
        if t.ndim == 0:
            t = int(t)
        elif t.ndim != 1:
            raise ValueError(f"{name} must be a scalar or have shape (B,); got shape {tuple(t.shape)}")
        else:
            if t.numel() == 0:
                raise ValueError(f"{name} is empty")
            tmin, tmax = torch.aminmax(t)
            tmin, tmax = int(tmin), int(tmax)
            if tmin < lo or tmax > hi:
                raise ValueError(f"{name} must lie in [{lo}, {hi}]; got values in [{tmin}, {tmax}]")
            return t
    try:
        ti = int(t)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer timestep or integer tensor; got {t!r}") from None
    if ti != t:
        raise ValueError(f"{name} must be an integer timestep; got {t!r}")
    if ti < lo or ti > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}]; got {ti}")
    return ti


def _table_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if table.device == device:
        return table
    dtype = table.dtype
    if device.type == "mps" and dtype == torch.float64:  # MPS has no float64
        dtype = torch.float32
    return table.to(device=device, dtype=dtype)


def _gather(table: torch.Tensor, t, fill_minus_one: float | None = None) -> torch.Tensor:
    """``table[t]`` as a 0-d (int t) or (B,) tensor in the table's dtype; ``-1`` -> ``fill``."""
    if isinstance(t, int):
        if t < 0:
            return torch.tensor(fill_minus_one, dtype=table.dtype)
        return table[t]
    tab = _table_on(table, t.device)
    if fill_minus_one is None:
        return tab[t]
    vals = tab[t.clamp(min=0)]
    return torch.where(t >= 0, vals, torch.full_like(vals, fill_minus_one))


def broadcast_coef(c, x: torch.Tensor):
    """Turn a 0-d / (B,) coefficient into something that multiplies ``x`` (B, C, ...).

    A 0-d coefficient becomes a Python float (so ``x`` keeps its dtype); a (B,)
    one becomes ``(B, 1, 1, ...)`` in ``x``'s dtype and device.
    """
    if isinstance(c, (int, float)):
        return float(c)
    if c.ndim == 0:
        return float(c)
    if c.shape[0] != x.shape[0]:
        raise ValueError(
            f"per-sample timesteps have batch {c.shape[0]} but the data has batch {x.shape[0]}"
        )
    return c.to(device=x.device, dtype=x.dtype).reshape(c.shape[0], *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------- #
# the schedule
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Betas, alphas and their cumulative product for ``num_train_timesteps`` steps.

    Build one with :func:`make_schedule`. Tables are 1-D tensors of length T on
    the CPU; lookups move them to the timestep's device on the fly.
    """

    kind: str
    num_train_timesteps: int
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    params: dict = field(default_factory=dict)

    # ---- tables ----------------------------------------------------------- #
    @property
    def dtype(self) -> torch.dtype:
        return self.alphas_cumprod.dtype

    def to(self, dtype: torch.dtype | None = None, device=None) -> "NoiseSchedule":
        """A copy with the tables in another dtype and/or on another device."""
        kw = {}
        if dtype is not None:
            kw["dtype"] = dtype
        if device is not None:
            kw["device"] = device
        return replace(
            self,
            betas=self.betas.to(**kw),
            alphas=self.alphas.to(**kw),
            alphas_cumprod=self.alphas_cumprod.to(**kw),
        )

    def alpha_bar(self, t, allow_minus_one: bool = False) -> torch.Tensor:
        """``a_bar_t`` as a 0-d or (B,) tensor; ``t = -1`` gives 1 when allowed."""
        t = check_timestep(t, self.num_train_timesteps, "t", allow_minus_one)
        return _gather(self.alphas_cumprod, t, 1.0)

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ``a_bar_t / (1 - a_bar_t)``."""
        a = self.alpha_bar(t)
        return a / (1.0 - a)

    # ---- forward process --------------------------------------------------- #
    def _sqrt_pair(self, t, x: torch.Tensor):
        t = check_timestep(t, self.num_train_timesteps, "t")
        a = _gather(self.alphas_cumprod, t)
        return broadcast_coef(a.sqrt(), x), broadcast_coef((1.0 - a).sqrt(), x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """``x_t = sqrt(a_bar_t) * x0 + sqrt(1 - a_bar_t) * noise``."""
        _same_shape(x0, noise, "noise")
        sa, s1a = self._sqrt_pair(t, x0)
        return sa * x0 + s1a * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v-prediction target ``v = sqrt(a_bar_t) * eps - sqrt(1 - a_bar_t) * x0``
        (Salimans & Ho 2022; the same as MONAI/voldit ``get_velocity``)."""
        _same_shape(x0, noise, "noise")
        sa, s1a = self._sqrt_pair(t, x0)
        return sa * noise - s1a * x0

    def model_target(self, x0: torch.Tensor, noise: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
        """What a model of ``prediction_type`` should output at ``x_t = add_noise(x0, noise, t)``."""
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            _same_shape(x0, noise, "noise")
            check_timestep(t, self.num_train_timesteps, "t")
            return noise
        if prediction_type == "sample":
            _same_shape(x0, noise, "noise")
            check_timestep(t, self.num_train_timesteps, "t")
            return x0
        return self.velocity(x0, noise, t)

    # ---- inverse: model output -> (x0, eps) -------------------------------- #
    def predict_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str):
        """Estimates ``(x0_hat, eps_hat)`` from a model output at ``x_t``.

        epsilon:       x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
        v_prediction:  x0 = sqrt(a) x_t - sqrt(1-a) v,   eps = sqrt(a) v + sqrt(1-a) x_t
        sample:        eps = (x_t - sqrt(a) x0) / sqrt(1-a)
        """
        check_prediction_type(prediction_type)
        _same_shape(x_t, model_output, "model_output")
        t = check_timestep(t, self.num_train_timesteps, "t")
        a = _gather(self.alphas_cumprod, t).detach().to("cpu", torch.float64).numpy()
        return predict_x0_eps(model_output, x_t, a, prediction_type)  # the samplers' own formula


def _same_shape(ref: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if tuple(other.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(other.shape)}, expected {tuple(ref.shape)}")


# --------------------------------------------------------------------------- #
# construction
# --------------------------------------------------------------------------- #
def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    """Cosine schedule of improved DDPM (Nichol & Dhariwal 2021, eq. 17), float64.

    With ``x = 0, 1, ..., T`` (T + 1 points)::

        f(x)      = cos^2( ((x / T) + s) / (1 + s) * pi / 2 )
        a_bar(x)  = f(x) / f(0)
        beta_k    = clip(1 - a_bar(k + 1) / a_bar(k), 0, max_beta),   k = 0 .. T-1

    and ``alphas_cumprod = cumprod(1 - beta)`` (so ``alphas_cumprod[t] = a_bar(t + 1)``
    except where the clip bites, i.e. the last step). This is exactly the
    ``cosine`` schedule of the published VolDiT/CardioDiT code
    (Cardio-AI/voldit ``src/models/scheduler.py::_cosine_beta``), including its
    clip at 0.9999; the improved-DDPM paper clipped at 0.999 — pass
    ``max_beta=0.999`` for that.
    """
    T = int(num_train_timesteps)
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    f = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    a_bar = f / f[0]
    betas = 1.0 - a_bar[1:] / a_bar[:-1]
    return betas.clamp(0.0, max_beta)


def make_schedule(
    kind: str = "cosine",
    num_train_timesteps: int = 300,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    s: float = 0.008,
    max_beta: float = 0.9999,
    zero_terminal_snr: bool = False,
    dtype: torch.dtype = torch.float64,
) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule`.

    kind:
        ``"cosine"`` (default; see :func:`cosine_betas`, parameters ``s``, ``max_beta``),
        ``"linear"`` (betas linear from ``beta_start`` to ``beta_end``) or
        ``"scaled_linear"`` (sqrt(beta) linear, then squared). The beta defaults
        are MONAI's (1e-4, 2e-2), as in the published code.
    num_train_timesteps:
        T; the published VolDiT setting is 300.
    zero_terminal_snr:
        rescale ``sqrt(a_bar)`` linearly so that ``a_bar[T-1] = 0`` while
        ``a_bar[0]`` is unchanged (Lin et al. 2024), as the published code's
        option of the same name. Needs v- or x0-prediction to sample from t = T-1.
    dtype:
        storage dtype of the tables (computed in float64 regardless).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULE_KINDS}; got {kind!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int; got {num_train_timesteps!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}")
    T = num_train_timesteps
    if kind == "cosine":
        if not (0.0 < max_beta < 1.0):
            raise ValueError(f"max_beta must lie in (0, 1); got {max_beta}")
        betas = cosine_betas(T, s=s, max_beta=max_beta)
        params = {"s": s, "max_beta": max_beta}
    else:
        if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
            raise ValueError(f"beta_start and beta_end must lie in (0, 1); got {beta_start}, {beta_end}")
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        params = {"beta_start": beta_start, "beta_end": beta_end}
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    if zero_terminal_snr:
        sq = alphas_cumprod.sqrt()
        s0, sT = sq[0].clone(), sq[-1].clone()
        sq = (sq - sT) * (s0 / (s0 - sT))
        alphas_cumprod = sq**2
        alphas = torch.empty_like(alphas_cumprod)
        alphas[0] = alphas_cumprod[0]
        alphas[1:] = alphas_cumprod[1:] / alphas_cumprod[:-1]
        betas = 1.0 - alphas
    params["zero_terminal_snr"] = bool(zero_terminal_snr)
    return NoiseSchedule(
        kind=kind,
        num_train_timesteps=T,
        betas=betas.to(dtype),
        alphas=alphas.to(dtype),
        alphas_cumprod=alphas_cumprod.to(dtype),
        params=params,
    )
