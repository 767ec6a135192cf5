"""Tests of medgen_rt.diffusion against independent references (numpy formulas,
torch.nn.functional losses, oracle models whose exact answer is known)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medgen_rt.diffusion as D
from medgen_rt.diffusion import scaling as scaling_mod

T = 300
F64 = torch.float64


# --------------------------------------------------------------------------- #
# independent numpy references
# --------------------------------------------------------------------------- #
def np_cosine(T_: int, s: float = 0.008, max_beta: float = 0.9999):
    """Improved-DDPM cosine schedule as in Cardio-AI/voldit scheduler.py, in numpy."""
    x = np.linspace(0.0, T_, T_ + 1)
    f = np.cos(((x / T_) + s) / (1.0 + s) * np.pi / 2.0) ** 2
    ab = f / f[0]
    betas = np.clip(1.0 - ab[1:] / ab[:-1], 0.0, max_beta)
    return betas, np.cumprod(1.0 - betas)


NP_BETAS, NP_AB = np_cosine(T)


def np_ab(t):
    """a_bar for integer timesteps t (array-like), -1 -> 1."""
    t = np.asarray(t)
    return np.where(t >= 0, NP_AB[np.clip(t, 0, None)], 1.0)


def bc(v, ndim: int) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(v, dtype=np.float64))
    return v.reshape(-1, *([1] * (ndim - 1)))


@pytest.fixture(scope="module")
def sched():
    return D.make_schedule("cosine", T)


# --------------------------------------------------------------------------- #
# schedules
# --------------------------------------------------------------------------- #
def test_cosine_matches_numpy_and_is_monotone(sched):
    ab = sched.alphas_cumprod
    assert ab.dtype == F64 and ab.shape == (T,)
    np.testing.assert_allclose(ab.numpy(), NP_AB, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sched.betas.numpy(), NP_BETAS, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sched.alphas.numpy(), 1.0 - NP_BETAS, rtol=1e-12, atol=0)
    # closed form a_bar(t+1) = f(t+1)/f(0) wherever the clip does not bite (all but the last step)
    x = np.arange(1, T, dtype=np.float64)
    f = lambda u: np.cos(((u / T) + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(ab.numpy()[:-1], f(x) / f(0.0), rtol=1e-10)
    assert bool((ab[1:] < ab[:-1]).all())
    assert 0.999 < float(ab[0]) < 1.0
    assert 0.0 < float(ab[-1]) < 1e-6
    assert float(sched.betas.max()) == pytest.approx(0.9999)  # the published clip
    # other T, and the improved-DDPM paper's clip at 0.999
    s2 = D.make_schedule("cosine", 1000, max_beta=0.999)
    np.testing.assert_allclose(s2.alphas_cumprod.numpy(), np_cosine(1000, max_beta=0.999)[1], rtol=1e-12)


def test_linear_schedules_and_storage_dtype():
    lin = D.make_schedule("linear", 100, beta_start=1e-4, beta_end=2e-2)
    ref = np.linspace(1e-4, 2e-2, 100)
    np.testing.assert_allclose(lin.betas.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(lin.alphas_cumprod.numpy(), np.cumprod(1 - ref), rtol=1e-12)
    sl = D.make_schedule("scaled_linear", 100)
    np.testing.assert_allclose(sl.betas.numpy(), np.linspace(1e-2, 2e-2**0.5, 100) ** 2, rtol=1e-12)
    f32 = D.make_schedule("cosine", T, dtype=torch.float32)
    assert f32.alphas_cumprod.dtype == torch.float32
    np.testing.assert_allclose(f32.alphas_cumprod.numpy(), NP_AB, rtol=1e-6)


def test_zero_terminal_snr():
    base = D.make_schedule("cosine", T)
    z = D.make_schedule("cosine", T, zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0
    assert float(z.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-12)
    np.testing.assert_allclose(torch.cumprod(z.alphas, 0).numpy(), z.alphas_cumprod.numpy(), atol=1e-12)


# --------------------------------------------------------------------------- #
# forward process and conversions
# --------------------------------------------------------------------------- #
TS = [0, 1, 57, 150, 298, 299]


def test_add_noise_velocity_and_round_trips(sched):
    g = torch.Generator().manual_seed(0)
    shape = (len(TS), 2, 3, 4, 5)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor(TS)
    a = np_ab(TS)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, bc(np.sqrt(a), 5) * x0 + bc(np.sqrt(1 - a), 5) * eps, rtol=1e-13, atol=1e-13)
    v = sched.velocity(x0, eps, t)
    torch.testing.assert_close(v, bc(np.sqrt(a), 5) * eps - bc(np.sqrt(1 - a), 5) * x0, rtol=1e-13, atol=1e-13)

    x0_v, eps_v = sched.predict_x0_eps(v, x_t, t, "v_prediction")
    torch.testing.assert_close(x0_v, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_v, eps, rtol=0, atol=1e-12)
    # eps -> x0 divides by sqrt(a_bar) ~ 5e-5 at t = 299: rounding is amplified 2e4 x
    x0_e, eps_e = sched.predict_x0_eps(eps, x_t, t, "epsilon")
    torch.testing.assert_close(x0_e, x0, rtol=0, atol=1e-10)
    assert eps_e is eps
    x0_s, eps_s = sched.predict_x0_eps(x0, x_t, t, "sample")
    torch.testing.assert_close(eps_s, eps, rtol=0, atol=1e-10)
    assert x0_s is x0

    # one int timestep for the batch == the same value per sample
    x_a = sched.add_noise(x0, eps, 150)
    x_b = sched.add_noise(x0, eps, torch.full((len(TS),), 150))
    torch.testing.assert_close(x_a, x_b, rtol=0, atol=0)
    # targets
    torch.testing.assert_close(D.training_target(x0, eps, t, sched, "v_prediction"), v, rtol=0, atol=0)
    assert D.training_target(x0, eps, t, sched, "epsilon") is eps
    assert D.training_target(x0, eps, t, sched, "sample") is x0
    # float32 data: coefficients cast at the end
    x32 = sched.add_noise(x0.float(), eps.float(), t)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32, x_t.float(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# DDIM(eta = 1) == DDPM, step for step
# --------------------------------------------------------------------------- #
def linear_model(x, t, cond=None):
    """A fixed deterministic map of x_t and t (not an oracle)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / T
    return 0.6 * x - 0.3 * tt * x.flip(-1) + 0.05 * torch.cos(3.0 * tt)


def test_ddim_sigma_eta1_is_ddpm_posterior_std(sched):
    # Both are the std of q(x_{t-1} | x_t, x0): for t_prev = t - 1, a_t / a_prev = alpha_t,
    # so sigma^2 = (1 - a_prev)/(1 - a_t) * (1 - alpha_t) = (1 - a_prev)/(1 - a_t) * beta_t,
    # the "fixed_small" variance of DDPM.
    t = np.arange(1, T)
    post_var = (1 - NP_AB[t - 1]) / (1 - NP_AB[t]) * NP_BETAS[t]
    sig = D.ddim_sigma(sched, torch.tensor(t), torch.tensor(t - 1), 1.0)
    np.testing.assert_allclose(sig.numpy() ** 2, post_var, rtol=1e-10)
    assert float(D.ddim_sigma(sched, 0, -1, 1.0)) == 0.0  # no noise on the last step
    assert float(D.ddim_sigma(sched, 200, 100, 0.0)) == 0.0


@pytest.mark.parametrize(
    "prediction_type, clip_sample",
    [("v_prediction", None), ("epsilon", None), ("sample", None), ("v_prediction", 0.5)],
)
def test_ddim_eta1_equals_ddpm_step_by_step(sched, prediction_type, clip_sample):
    shape = (2, 2, 3, 3, 3)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(shape, generator=g, dtype=F64)
    noises = [torch.randn(shape, generator=g, dtype=F64) for _ in range(T)]
    kw = dict(noise=x_T, step_noises=noises, prediction_type=prediction_type, clip_sample=clip_sample,
              return_trajectory=True)
    _, traj_ddpm = D.sample(linear_model, shape, sched, sampler="ddpm", **kw)
    _, traj_ddim = D.sample(linear_model, shape, sched, sampler="ddim", steps=T, eta=1.0, **kw)
    assert len(traj_ddpm) == len(traj_ddim) == T + 1
    for i, (a, b) in enumerate(zip(traj_ddpm, traj_ddim)):
        scale = float(a.abs().max())
        err = float((a - b).abs().max())
        assert err <= 1e-10 * max(scale, 1.0), (i, err, scale)
    # the noise mattered: deterministic DDIM lands elsewhere
    x_det = D.sample(linear_model, shape, sched, sampler="ddim", steps=T, eta=0.0, noise=x_T,
                     prediction_type=prediction_type, clip_sample=clip_sample)
    assert float((x_det - traj_ddpm[-1]).abs().max()) > 1e-3


def test_single_steps_per_sample_timesteps(sched):
    """(B,) timesteps give, per sample, what the scalar call gives."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, dtype=F64, generator=g)
    out = torch.randn(3, 2, 4, 4, dtype=F64, generator=g)
    n = torch.randn(3, 2, 4, 4, dtype=F64, generator=g)
    t = torch.tensor([250, 40, 0])
    tp = torch.tensor([200, 39, -1])
    ddim = D.ddim_step(sched, out, t, tp, x, 0.7, n, "v_prediction")
    ddpm = D.ddpm_step(sched, out, t, x, n, "epsilon")
    for i in range(3):
        r = D.ddim_step(sched, out[i:i + 1], int(t[i]), int(tp[i]), x[i:i + 1], 0.7, n[i:i + 1], "v_prediction")
        torch.testing.assert_close(ddim.prev_sample[i:i + 1], r.prev_sample, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(ddim.pred_x0[i:i + 1], r.pred_x0, rtol=1e-14, atol=1e-14)
        r = D.ddpm_step(sched, out[i:i + 1], int(t[i]), x[i:i + 1], n[i:i + 1], "epsilon")
        torch.testing.assert_close(ddpm.prev_sample[i:i + 1], r.prev_sample, rtol=1e-14, atol=1e-14)
    # DDIM from an explicit formula with numpy a_bar (t=250 -> 200, eta=0.7)
    a, ap = NP_AB[250], NP_AB[200]
    x0 = math.sqrt(a) * x[0] - math.sqrt(1 - a) * out[0]
    e = math.sqrt(a) * out[0] + math.sqrt(1 - a) * x[0]
    sig = 0.7 * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    ref = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sig**2) * e + sig * n[0]
    torch.testing.assert_close(ddim.prev_sample[0], ref, rtol=1e-12, atol=1e-12)
    # DDPM at t = 0 adds no noise and returns x0_hat
    torch.testing.assert_close(ddpm.prev_sample[2], ddpm.pred_x0[2], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# shapes: 3D (B,C,D,H,W) and 4D (B,C,Z,H,W,T)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(2, 4, 4, 6, 6), (1, 3, 2, 4, 4, 3)])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_samplers_shapes_5d_6d(sched, shape, sampler):
    w = torch.linspace(-0.5, 0.5, shape[1])

    def model(x, t, cond):
        assert x.shape == shape and t.shape == (shape[0],)
        tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x * w.reshape(1, -1, *([1] * (x.ndim - 2))) + 1e-3 * tt)

    calls = []
    out = D.sample(model, shape, sched, sampler=sampler, steps=50, generator=torch.Generator().manual_seed(0),
                   progress=lambda i, n: calls.append((i, n)))
    assert out.shape == shape and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert calls == [(i, 50) for i in range(1, 51)]
    # the same generator seed gives the same sample
    again = D.sample(model, shape, sched, sampler=sampler, steps=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# oracle models: the data distribution is one point x0
# --------------------------------------------------------------------------- #
def make_oracle(x0: torch.Tensor, prediction_type: str):
    def model(x_t, t, cond):
        a = bc(np_ab(t.numpy()), x_t.ndim)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0.expand_as(x_t)

    return model


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_oracle_recovers_x0(sched, prediction_type, steps):
    shape = (2, 3, 4, 4, 4)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    out, traj = D.sample(make_oracle(x0, prediction_type), shape, sched, sampler="ddim", steps=steps, eta=0.0,
                         noise=z, prediction_type=prediction_type, return_trajectory=True)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    # with the exact model, deterministic DDIM stays on x_t = sqrt(a) x0 + sqrt(1-a) eps* with a
    # constant eps* (the one implied by the initial noise at the first timestep)
    ts = list(range(steps - 1, -1, -1))
    ts = [k * (T // steps) for k in ts]
    a0 = np_ab(ts[0])
    eps_star = (z - math.sqrt(a0) * x0) / math.sqrt(1 - a0)
    for i, t_prev in enumerate(ts[1:] + [-1]):
        ap = float(np_ab(t_prev))
        ref = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps_star
        torch.testing.assert_close(traj[i + 1], ref, rtol=0, atol=1e-9)


def test_ddpm_oracle_recovers_x0(sched):
    shape = (1, 2, 3, 3)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    out = D.sample(make_oracle(x0, "v_prediction"), shape, sched, sampler="ddpm", generator=g, dtype=F64)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_euler_oracle_recovers_x0():
    shape = (2, 2, 3, 4, 4, 2)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    seen = []

    def oracle(x_t, t_model, cond):
        seen.append(t_model.clone())
        t = (t_model / 1000.0).reshape(-1, *([1] * (x_t.ndim - 1)))  # published t * 1000 embedding input
        return (x_t - x0) / t  # = eps - x0 on the straight path through x0

    for steps in (1, 7, 50):
        seen.clear()
        out, traj = D.sample(oracle, shape, None, sampler="euler", steps=steps, noise=z, return_trajectory=True)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)
        for k, x in enumerate(traj):  # on the path x_t = (1 - t) x0 + t z at t = 1 - k/steps
            tk = 1.0 - k / steps
            torch.testing.assert_close(x, (1 - tk) * x0 + tk * z, rtol=0, atol=1e-12)
        assert seen[0].dtype == F64 and float(seen[0][0]) == 1000.0
        assert [float(s[0]) for s in seen] == pytest.approx([1000.0 * (1 - k / steps) for k in range(steps)])
    # flow_training_pair is consistent with the oracle: target = (x_t - x0)/t
    t = torch.tensor([0.3, 0.8], dtype=F64)
    x_t, target = D.flow_training_pair(x0, z, t)
    torch.testing.assert_close(x_t, bc([0.7, 0.2], 6) * x0 + bc([0.3, 0.8], 6) * z, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(target, z - x0, rtol=0, atol=0)
    torch.testing.assert_close(oracle(x_t, t * 1000.0, None), target, rtol=1e-12, atol=1e-12)


def test_flow_timestep_sampling():
    g = torch.Generator().manual_seed(6)
    u = D.sample_flow_timesteps(20000, "uniform", generator=g)
    assert u.shape == (20000,) and float(u.min()) >= 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    ln = D.sample_flow_timesteps(20000, "logit_normal", logit_mean=0.5, logit_std=0.7, generator=g, dtype=F64)
    logit = torch.log(ln / (1 - ln))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(logit.std()) == pytest.approx(0.7, abs=0.02)
    torch.testing.assert_close(D.flow_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=F64))


# --------------------------------------------------------------------------- #
# classifier-free guidance
# --------------------------------------------------------------------------- #
class Recorder:
    """A conditioned linear model that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), None if cond is None else cond.clone()))
        c = torch.zeros(x.shape[0], dtype=x.dtype) if cond is None else cond.sum(dim=1)
        c = c.reshape(-1, *([1] * (x.ndim - 1)))
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
        return 0.5 * x + 0.2 * c * x.roll(1, -1) + 0.1 * c + 0.05 * tt


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guidance(sched, sampler):
    shape = (2, 2, 3, 3, 3)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(shape, generator=g, dtype=F64)
    cond = torch.randn(2, 4, generator=g, dtype=F64)
    null = torch.zeros(1, 4, dtype=F64)  # a batch-1 null condition is broadcast
    steps = 8
    kw = dict(sampler=sampler, steps=steps, noise=z)

    # s = 1: the conditional-only result
    cond_only = D.sample(Recorder(), shape, sched, cond=cond, **kw)
    s1 = D.sample(Recorder(), shape, sched, cond=cond, null_cond=null, guidance_scale=1.0, **kw)
    torch.testing.assert_close(s1, cond_only, rtol=0, atol=1e-12)

    # s = 3: one batched call per step, cond first, and out = uncond + s (cond - uncond)
    rec = Recorder()
    s3 = D.sample(rec, shape, sched, cond=cond, null_cond=null, guidance_scale=3.0, **kw)
    assert len(rec.calls) == steps
    for x, t, c in rec.calls:
        assert x.shape[0] == 4 and t.shape == (4,)
        torch.testing.assert_close(x[:2], x[2:], rtol=0, atol=0)
        torch.testing.assert_close(t[:2], t[2:], rtol=0, atol=0)
        torch.testing.assert_close(c[:2], cond, rtol=0, atol=0)
        torch.testing.assert_close(c[2:], null.expand(2, 4), rtol=0, atol=0)

    def manual(x, t, _c):  # two separate calls, combined by hand
        m = Recorder()
        u, k = m(x, t, null.expand(2, 4)), m(x, t, cond)
        return u + 3.0 * (k - u)

    ref = D.sample(manual, shape, sched, **kw)
    torch.testing.assert_close(s3, ref, rtol=0, atol=1e-12)
    assert float((s3 - cond_only).abs().max()) > 1e-3

    # the combination itself
    x = torch.randn(shape, generator=g, dtype=F64)
    t = torch.full((2,), 100)
    out = D.guided_model_output(Recorder(), x, t, cond, null, 2.5)
    u, k = Recorder()(x, t, null.expand(2, 4)), Recorder()(x, t, cond)
    torch.testing.assert_close(out, u + 2.5 * (k - u), rtol=1e-14, atol=1e-14)

    with pytest.raises(ValueError, match="null_cond"):
        D.sample(Recorder(), shape, sched, cond=cond, guidance_scale=2.0, **kw)


def test_guidance_dict_condition(sched):
    def model(x, t, cond):
        assert set(cond) == {"mask", "scale"} and cond["mask"].shape[0] == x.shape[0]
        return 0.5 * x * cond["scale"].reshape(-1, *([1] * (x.ndim - 1))) + 0.1 * cond["mask"]

    shape = (2, 1, 4, 4)
    cond = {"mask": torch.ones(shape), "scale": torch.full((2,), 2.0)}
    null = {"mask": torch.zeros(shape), "scale": torch.ones(2)}
    out = D.sample(model, shape, sched, steps=5, cond=cond, null_cond=null, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #
def test_losses_match_torch():
    g = torch.Generator().manual_seed(8)
    pred = 3.0 * torch.randn(4, 2, 3, 4, 5, generator=g)  # errors on both sides of beta
    tgt = torch.randn(4, 2, 3, 4, 5, generator=g)
    for beta in (1.0, 0.5):
        ref = F.smooth_l1_loss(pred, tgt, beta=beta)
        torch.testing.assert_close(D.diffusion_loss(pred, tgt, "smooth_l1", beta), ref)
    torch.testing.assert_close(D.diffusion_loss(pred, tgt), F.smooth_l1_loss(pred, tgt))  # the default
    torch.testing.assert_close(D.diffusion_loss(pred, tgt, "l1"), F.l1_loss(pred, tgt))
    torch.testing.assert_close(D.diffusion_loss(pred, tgt, "mse"), F.mse_loss(pred, tgt))
    # an explicit Huber formula
    d = (pred - tgt).abs().double()
    huber = torch.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()
    assert float(D.diffusion_loss(pred, tgt)) == pytest.approx(float(huber), rel=1e-6)
    # per-sample weights and reduction
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    per = D.diffusion_loss(pred, tgt, "mse", reduction="per_sample")
    torch.testing.assert_close(per, ((pred - tgt) ** 2).mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(D.diffusion_loss(pred, tgt, "mse", weights=w), (per * w).mean())
    # half precision inputs are computed in float32
    lb = D.diffusion_loss(pred.bfloat16(), tgt.bfloat16())
    assert lb.dtype == torch.float32
    torch.testing.assert_close(lb, F.smooth_l1_loss(pred.bfloat16().float(), tgt.bfloat16().float()))


# --------------------------------------------------------------------------- #
# latent scaling
# --------------------------------------------------------------------------- #
def test_latent_scale_factor(monkeypatch):
    g = torch.Generator().manual_seed(9)
    parts = [
        1.7 * torch.randn(2, 8, 4, 4, 4, generator=g) + 0.3,
        0.9 * torch.randn(1, 8, 3, 5, 2, generator=g) - 0.2,
        2.5 * torch.randn(3, 8, 2, 2, 2, 2, generator=g),
    ]
    flat = torch.cat([p.reshape(-1) for p in parts]).double()
    ref = 1.0 / float(flat.std())
    assert D.latent_scale_factor(parts) == pytest.approx(ref, rel=1e-12)
    assert D.latent_scale_factor(iter(parts)) == pytest.approx(ref, rel=1e-12)  # a one-pass stream
    assert D.latent_scale_factor(p for p in parts) == pytest.approx(ref, rel=1e-12)
    assert D.latent_scale_factor(parts[0]) == pytest.approx(1.0 / float(parts[0].double().std()), rel=1e-12)
    assert D.latent_scale_factor(parts, unbiased=False) == pytest.approx(
        1.0 / float(flat.std(correction=0)), rel=1e-12)
    # many small chunks merge to the same value; a big offset does not lose precision
    monkeypatch.setattr(scaling_mod, "_CHUNK", 7)
    shifted = [p + 1e4 for p in parts]
    ref_shifted = 1.0 / float(torch.cat([p.reshape(-1) for p in shifted]).double().std())
    assert D.latent_scale_factor(shifted) == pytest.approx(ref_shifted, rel=1e-12)
    with pytest.raises(ValueError, match="latents"):
        D.latent_scale_factor(torch.ones(10))
    with pytest.raises(ValueError, match="latents"):
        D.latent_scale_factor([torch.ones(1)])


# --------------------------------------------------------------------------- #
# timesteps and argument errors
# --------------------------------------------------------------------------- #
def test_timesteps_for():
    for spacing in D.SPACINGS:
        torch.testing.assert_close(D.timesteps_for(T, T, spacing), torch.arange(T - 1, -1, -1))
    lead = D.timesteps_for(50, T)
    torch.testing.assert_close(lead, torch.arange(294, -1, -6))
    assert int(D.timesteps_for(50, T, "trailing")[0]) == T - 1
    lin = D.timesteps_for(50, T, "linspace")
    assert int(lin[0]) == T - 1 and int(lin[-1]) == 0
    for spacing in D.SPACINGS:
        for n in (1, 7, 49, 150, 299):
            ts = D.timesteps_for(n, T, spacing)
            assert ts.dtype == torch.long and len(ts) == n
            assert bool((ts[:-1] > ts[1:]).all()) and int(ts.min()) >= 0 and int(ts.max()) <= T - 1


def test_bad_arguments(sched):
    model = lambda x, t, c: x  # noqa: E731
    shape = (1, 1, 2, 2)
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match="kind"):
        D.make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        D.make_schedule("cosine", 0)
    with pytest.raises(ValueError, match="sampler"):
        D.sample(model, shape, sched, sampler="heun")
    with pytest.raises(ValueError, match="prediction_type"):
        D.sample(model, shape, sched, prediction_type="score")
    with pytest.raises(ValueError, match="prediction_type"):
        D.sample(model, shape, None, sampler="euler", prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        sched.predict_x0_eps(x, x, 3, "x_start")
    with pytest.raises(ValueError, match="prediction_type"):
        D.training_target(x, x, 3, sched, "noise")
    for steps in (0, -3, T + 1):
        with pytest.raises(ValueError, match="steps"):
            D.sample(model, shape, sched, sampler="ddim", steps=steps)
    with pytest.raises(ValueError, match="steps"):
        D.sample(model, shape, sched, sampler="ddpm", steps=50)
    with pytest.raises(ValueError, match="steps"):
        D.sample(model, shape, None, sampler="euler", steps=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        D.timesteps_for(0, T)
    with pytest.raises(ValueError, match="num_inference_steps"):
        D.timesteps_for(T + 1, T)
    with pytest.raises(ValueError, match="spacing"):
        D.timesteps_for(10, T, "middle")
    with pytest.raises(ValueError, match="schedule"):
        D.sample(model, shape, None, sampler="ddim")
    with pytest.raises(ValueError, match="eta"):
        D.sample(model, shape, sched, eta=-1.0)
    with pytest.raises(ValueError, match="noise"):
        D.sample(model, shape, sched, noise=torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="kind"):
        D.diffusion_loss(x, x, "huber2")
    with pytest.raises(ValueError, match="t"):
        sched.add_noise(x, x, torch.tensor([0.5]))  # continuous t is flow matching
    with pytest.raises(ValueError, match="t"):
        sched.add_noise(x, x, T)
    with pytest.raises(ValueError, match="t_prev"):
        D.ddim_step(sched, x, 10, 20, x)
    with pytest.raises(ValueError, match="method"):
        D.sample_flow_timesteps(4, "beta")
    with pytest.raises(ValueError, match="t"):
        D.flow_training_pair(x, x, torch.tensor([1.5]))


def test_flow_logit_mean_moves_training_times_to_high_noise():
    """flow_logit_mean = log(s) draws times as SD3's shift s: median t = s / (1 + s)."""
    import math

    from medgen_rt.train.tasks import DiffusionSettings

    x0 = torch.zeros(1, 2, 4, 4, 4)
    for mean, median in ((0.0, 0.5), (math.log(3.0), 0.75)):
        d = DiffusionSettings(objective="flow", flow_logit_mean=mean)
        gens = [torch.Generator().manual_seed(i) for i in range(4000)]
        t = torch.cat([d.noisy_pair(x0, [g], "cpu")[1] for g in gens]) / 1000.0
        assert abs(float(t.median()) - median) < 0.02
        assert d.to_dict()["flow_logit_mean"] == mean
