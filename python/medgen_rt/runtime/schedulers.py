"""The samplers of both runtimes: DDPM, DDIM and rectified-flow Euler schedulers and the one
denoising loop, used by the torch runtime (medgen_rt.diffusion.sample) and by the torch-free
ONNX engine (medgen_rt.export.engine).

A scheduler holds numpy float64 tables and, after ``set_timesteps``, the timesteps of one run.
``step(model_output, i, x, noise)`` turns the tables into Python floats (or, for per-sample
timesteps, (B,) arrays made into x's kind by ``_coef``) and touches the sample only with
+, -, * and ``.clip``, which numpy arrays and torch tensors share: both runtimes run the same
arithmetic and give the same sample from the same noise.

Step noise (DDPM, DDIM with eta > 0) comes from ``step_noise``: row b of step i from numpy's
``SeedSequence([seed_b, STEP_NOISE_KEY, i])``, a stream of its own, independent of the initial
noise (drawn from the plain seed) and the same in both runtimes.

Conventions are those of medgen_rt.diffusion (see its docstring): discrete t in 0 .. T-1,
``a_bar_{-1} = 1``; flow time t in [0, 1], the model sees ``t * timestep_scale``.
"""
from __future__ import annotations

import math

import numpy as np

SAMPLERS = ("ddim", "ddpm", "euler")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_TIMESTEP_SCALE = 1000.0
# mixed into the step-noise seeds so that they never coincide with the initial noise's
STEP_NOISE_KEY = int.from_bytes(b"step-noise", "little")


# ---- argument checks -------------------------------------------------------------------------

def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int; got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}; got {value}")
    return value


def check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta must be a finite float >= 0; got {eta!r}")
    return float(eta)


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return prediction_type


def clip_bound(clip_sample):
    """None (no clipping) or the bound c of clip_sample (True means 1)."""
    if clip_sample is None or clip_sample is False:
        return None
    c = 1.0 if clip_sample is True else float(clip_sample)
    if not c > 0:
        raise ValueError(f"clip_sample must be None, True or a positive bound; got {clip_sample!r}")
    return c


# ---- timesteps -------------------------------------------------------------------------------

def timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str = "leading") -> np.ndarray:
    """Descending integer timesteps (int64, length ``num_inference_steps``).

    ``"leading"`` (default; the published DDIM/DDPM ``set_timesteps``):
    ``k * (T // n)`` for k = n-1 .. 0, e.g. n = 50, T = 300 -> 294, 288, ..., 0.
    ``"trailing"``: ``round(T - k * T / n) - 1`` for k = 0 .. n-1 (starts at T-1).
    ``"linspace"``: ``round(linspace(T - 1, 0, n))``.
    All three give ``T-1, ..., 0`` for n = T.
    """
    T = check_int(num_train_timesteps, "num_train_timesteps", 1)
    n = check_int(num_inference_steps, "num_inference_steps", 1, T)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}; got {spacing!r}")
    if spacing == "leading":
        return np.arange(n - 1, -1, -1, dtype=np.int64) * (T // n)
    if spacing == "trailing":
        return np.round(T - np.arange(n, dtype=np.float64) * (T / n)).astype(np.int64) - 1
    return np.round(np.linspace(T - 1, 0, n)).astype(np.int64)


def flow_grid(steps: int) -> np.ndarray:
    """The Euler grid ``[1, 1 - 1/n, ..., 1/n, 0]`` (float64, n = ``steps``)."""
    n = check_int(steps, "steps", 1)
    return np.append(np.arange(n, 0, -1, dtype=np.float64) / n, 0.0)


# ---- the step arithmetic (numpy arrays and torch tensors alike) ------------------------------

def _coef(c, x):
    """A coefficient that multiplies x: a 0-d one as a Python float (x keeps its dtype), a (B,)
    one as (B, 1, ...) in x's kind, dtype and device."""
    c = np.asarray(c, dtype=np.float64)
    if c.ndim == 0:
        return float(c)
    if c.shape != (x.shape[0],):
        raise ValueError(f"per-sample timesteps have shape {c.shape} but the data has batch {x.shape[0]}")
    c = c.reshape((-1,) + (1,) * (x.ndim - 1))
    if isinstance(x, np.ndarray):
        return c.astype(x.dtype)
    import torch  # only reached with torch tensors

    return torch.from_numpy(c).to(dtype=x.dtype).to(x.device)


def _concat(a, b):
    if isinstance(a, np.ndarray):
        return np.concatenate([a, b])
    import torch  # only reached with torch tensors

    return torch.cat([a, b])


def predict_x0_eps(model_output, x_t, a_t, prediction_type: str):
    """``(x0_hat, eps_hat)`` from a model output at x_t, with ``a_t = a_bar_t`` (float or (B,)).

    epsilon:       x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
    v_prediction:  x0 = sqrt(a) x_t - sqrt(1-a) v,   eps = sqrt(a) v + sqrt(1-a) x_t
    sample:        eps = (x_t - sqrt(a) x0) / sqrt(1-a)
    """
    sa, s1a = np.sqrt(a_t), np.sqrt(1.0 - a_t)
    if prediction_type == "epsilon":
        return (x_t - _coef(s1a, x_t) * model_output) * _coef(1.0 / sa, x_t), model_output
    if prediction_type == "v_prediction":
        return (_coef(sa, x_t) * x_t - _coef(s1a, x_t) * model_output,
                _coef(sa, x_t) * model_output + _coef(s1a, x_t) * x_t)
    return model_output, (x_t - _coef(sa, x_t) * model_output) * _coef(1.0 / s1a, x_t)


def ddim_sigma(a_t, a_prev, eta: float):
    """DDIM noise level ``eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``."""
    return eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t)) * np.sqrt(np.maximum(1.0 - a_t / a_prev, 0.0))


def ddim_update(model_output, x_t, a_t, a_prev, prediction_type: str, eta: float = 0.0, clip_sample=None,
                noise=None):
    """DDIM step (Song et al. 2021, eq. 12): ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps
    + sigma noise``; returns ``(x_prev, x0_hat)``. With clipping, eps is recomputed from the clipped
    x0 so that the update stays on the same trajectory family."""
    x0, eps = predict_x0_eps(model_output, x_t, a_t, prediction_type)
    c = clip_bound(clip_sample)
    if c is not None:
        x0 = x0.clip(-c, c)
        eps = (x_t - _coef(np.sqrt(a_t), x_t) * x0) * _coef(1.0 / np.sqrt(1.0 - a_t), x_t)
    sigma = ddim_sigma(a_t, a_prev, eta)
    direction = np.sqrt(np.maximum(1.0 - a_prev - sigma ** 2, 0.0))
    prev = _coef(np.sqrt(a_prev), x_t) * x0 + _coef(direction, x_t) * eps
    if eta > 0.0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs step noise")
        prev = prev + _coef(sigma, x_t) * noise
    return prev, x0


def ddpm_update(model_output, x_t, t, a_t, a_prev, beta_t, alpha_t, prediction_type: str, clip_sample=None,
                noise=None):
    """Ancestral DDPM step t -> t-1 (Ho et al. 2020), variance "fixed_small": the posterior mean
    ``sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t`` plus
    ``sqrt(max((1 - a_prev) / (1 - a_t) beta_t, 1e-20)) noise`` where t > 0; returns ``(x_prev, x0_hat)``."""
    x0, _ = predict_x0_eps(model_output, x_t, a_t, prediction_type)
    c = clip_bound(clip_sample)
    if c is not None:
        x0 = x0.clip(-c, c)
    c0 = np.sqrt(a_prev) * beta_t / (1.0 - a_t)
    ct = np.sqrt(alpha_t) * (1.0 - a_prev) / (1.0 - a_t)
    mean = _coef(c0, x_t) * x0 + _coef(ct, x_t) * x_t
    std = np.where(np.asarray(t) > 0, np.sqrt(np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)), 0.0)
    if not np.any(std > 0):  # the last step lands on x0_hat's mean, without noise
        return mean, x0
    if noise is None:
        raise ValueError("a DDPM step with t > 0 needs step noise")
    return mean + _coef(std, x_t) * noise, x0


def euler_step(model_output, t: float, t_next: float, x_t):
    """One Euler step of the flow ODE from t to t_next < t: ``(x_t + (t_next - t) v, x_t - t v)``,
    the next sample and x0_hat."""
    if tuple(model_output.shape) != tuple(x_t.shape):
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected {tuple(x_t.shape)}")
    t, t_next = float(t), float(t_next)
    return x_t + (t_next - t) * model_output, x_t - t * model_output


# ---- schedulers ------------------------------------------------------------------------------

class _DiscreteScheduler:
    """DDPM-family tables (numpy float64) and the timesteps of one run."""

    stochastic = False

    def __init__(self, betas, alphas_cumprod, prediction_type: str = "v_prediction", clip_sample=None,
                 alphas=None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.alphas = 1.0 - self.betas if alphas is None else np.asarray(alphas, dtype=np.float64)
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape or not len(self.betas):
            raise ValueError("betas and alphas_cumprod must be 1-D tables of the same length T >= 1")
        self.num_train_timesteps = len(self.betas)
        self.prediction_type = check_prediction_type(prediction_type)
        clip_bound(clip_sample)
        self.clip_sample = clip_sample
        self.timesteps = np.zeros(0, dtype=np.int64)

    def a_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def model_time(self, i: int) -> int:
        """What the network receives at step i (the same for the whole batch)."""
        return int(self.timesteps[i])


class DDPMScheduler(_DiscreteScheduler):
    """Ancestral DDPM through all T steps."""

    stochastic = True

    def set_timesteps(self, steps: int | None = None) -> "DDPMScheduler":
        T = self.num_train_timesteps
        steps = T if steps is None else check_int(steps, "steps", 1, T)
        if steps != T:
            raise ValueError(f"steps must equal num_train_timesteps={T} for the ddpm sampler (got {steps}); "
                             "ancestral DDPM is only defined step by step; use sampler='ddim' (eta=1 for the "
                             "stochastic variant) for fewer steps")
        self.timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)
        return self

    def adds_noise(self, i: int) -> bool:
        return self.timesteps[i] > 0

    def step(self, model_output, i: int, x, noise=None):
        t = int(self.timesteps[i])
        return ddpm_update(model_output, x, t, self.a_bar(t), self.a_bar(t - 1), self.betas[t], self.alphas[t],
                           self.prediction_type, self.clip_sample, noise)


class DDIMScheduler(_DiscreteScheduler):
    """DDIM over any number of steps; eta > 0 adds noise (eta = 1 with all steps is DDPM)."""

    def __init__(self, betas, alphas_cumprod, prediction_type: str = "v_prediction", clip_sample=None,
                 alphas=None, eta: float = 0.0):
        super().__init__(betas, alphas_cumprod, prediction_type, clip_sample, alphas)
        self.eta = check_eta(eta)
        self.stochastic = self.eta > 0.0

    def set_timesteps(self, steps: int | None = None, spacing: str = "leading") -> "DDIMScheduler":
        T = self.num_train_timesteps
        steps = min(50, T) if steps is None else check_int(steps, "steps", 1, T)
        self.timesteps = timesteps(steps, T, spacing)
        return self

    def adds_noise(self, i: int) -> bool:
        return self.stochastic

    def step(self, model_output, i: int, x, noise=None):
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        return ddim_update(model_output, x, self.a_bar(t), self.a_bar(t_prev), self.prediction_type, self.eta,
                           self.clip_sample, noise)


class FlowEulerScheduler:
    """Euler integration of the rectified-flow ODE from t = 1 (noise) to t = 0 (data)."""

    stochastic = False

    def __init__(self, timestep_scale: float = DEFAULT_TIMESTEP_SCALE):
        self.timestep_scale = float(timestep_scale)
        self.sigmas = np.zeros(1)
        self.timesteps = self.sigmas[:-1]

    def set_timesteps(self, steps: int | None = None) -> "FlowEulerScheduler":
        self.sigmas = flow_grid(50 if steps is None else steps)
        self.timesteps = self.sigmas[:-1]
        return self

    def model_time(self, i: int) -> float:
        return float(self.sigmas[i]) * self.timestep_scale

    def adds_noise(self, i: int) -> bool:
        return False

    def step(self, model_output, i: int, x, noise=None):
        return euler_step(model_output, self.sigmas[i], self.sigmas[i + 1], x)


def make_scheduler(sampler: str, steps: int | None = None, *, betas=None, alphas_cumprod=None, alphas=None,
                   prediction_type: str | None = None, eta: float = 0.0, spacing: str = "leading",
                   clip_sample=None, timestep_scale: float = DEFAULT_TIMESTEP_SCALE):
    """A checked scheduler with its timesteps set. ``steps=None``: all T for DDPM, min(50, T) for
    DDIM, 50 for Euler. DDPM/DDIM need the tables; Euler takes velocity ("flow") only."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
    eta = check_eta(eta)
    if sampler == "euler":
        if prediction_type not in (None, "flow"):
            raise ValueError(
                f"prediction_type for the euler (rectified-flow) sampler must be 'flow'; got {prediction_type!r}")
        return FlowEulerScheduler(timestep_scale).set_timesteps(steps)
    if betas is None or alphas_cumprod is None:
        raise ValueError(f"sampler {sampler!r} needs a DDPM-family noise schedule (betas, alphas_cumprod)")
    prediction_type = "v_prediction" if prediction_type is None else prediction_type
    if sampler == "ddpm":
        return DDPMScheduler(betas, alphas_cumprod, prediction_type, clip_sample, alphas).set_timesteps(steps)
    return DDIMScheduler(betas, alphas_cumprod, prediction_type, clip_sample, alphas, eta).set_timesteps(
        steps, spacing)


# ---- step noise and the loop -----------------------------------------------------------------

def step_noise(seeds, step: int, shape) -> np.ndarray:
    """float32 noise of ``shape`` for step ``step``; row b from ``SeedSequence([seeds[b],
    STEP_NOISE_KEY, step])``, so it neither repeats the initial noise nor depends on the batch."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} step-noise seeds for a batch of {shape[0]}")
    row = (1,) + tuple(shape[1:])
    return np.concatenate([np.random.default_rng([int(s), STEP_NOISE_KEY, int(step)])
                           .standard_normal(row, dtype=np.float32) for s in seeds])


def guided_output(model_fn, x, t, cond, null_cond, guidance_scale, join=None):
    """``model_fn(x, t, cond)``; with guidance (a scale and a cond) one call on the doubled batch,
    cond first then ``null_cond`` (joined by ``join``, default concatenation), combined as
    ``uncond + s * (cond - uncond)``. A per-sample ``t`` is doubled too."""
    if guidance_scale is None or cond is None:
        return model_fn(x, t, cond)
    b = x.shape[0]
    both = model_fn(_concat(x, x), t if np.ndim(t) == 0 else _concat(t, t), (join or _concat)(cond, null_cond))
    if both.shape[0] != 2 * b:
        raise ValueError(f"model_fn returned batch {both.shape[0]} for a guided batch of {2 * b}")
    out_c, out_u = both[:b], both[b:]
    return out_u + guidance_scale * (out_c - out_u)


def denoise_loop(model_fn, x, scheduler, *, guidance_scale=None, cond=None, null_cond=None, noise_fn=None,
                 join=None, progress=None, trajectory=None):
    """Run ``scheduler`` from the initial noise ``x`` to the sample; the one loop of both runtimes.

    model_fn(x, t, cond) -> output like x; ``t`` is ``scheduler.model_time(i)``, a Python number
    for the whole batch (each runtime's model_fn spreads it in its own dtype). Guidance: see
    :func:`guided_output`. noise_fn(i) -> step noise like x, asked only for steps that add noise.
    progress(i, total) after each step; ``trajectory`` (a list) collects x after each step.
    """
    total = len(scheduler.timesteps)
    for i in range(total):
        out = guided_output(model_fn, x, scheduler.model_time(i), cond, null_cond, guidance_scale, join)
        noise = None
        if scheduler.adds_noise(i):
            if noise_fn is None:
                raise ValueError("this sampler adds noise at every step: pass noise_fn")
            noise = noise_fn(i)
        x, _ = scheduler.step(out, i, x, noise)
        if trajectory is not None:
            trajectory.append(x)
        if progress is not None:
            progress(i + 1, total)
    return x
