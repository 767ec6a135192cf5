"""One scheduler layer for both runtimes: every sampler (DDPM, DDIM with eta 0 and > 0 in every
spacing, flow Euler), with and without guidance, gives the same sample through the torch runtime
(medgen_rt.diffusion.sample) and through the ONNX engine's loop (export.engine.sample_loop) from
the same noise and seeds; and step noise is a stream of its own, independent of x_T."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import medgen_rt.diffusion as D
from medgen_rt.export import engine
from medgen_rt.runtime import schedulers as S

T = 40
SHAPE = (2, 3, 4, 5, 6)
SEED = 5


def toy(x: np.ndarray, t: np.ndarray, cond) -> np.ndarray:
    """A small deterministic 'network' in float32 numpy: both runtimes call this same function, so
    any difference between them comes from the samplers."""
    tt = (np.asarray(t, dtype=np.float32) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    out = 0.8 * x - 0.1 * np.roll(x, 1, axis=-1) + 0.05 * np.tanh(3.0 * tt)
    if cond is not None:
        out = out + 0.3 * cond.mean(axis=1, keepdims=True) * (1.0 + x)
    return out.astype(np.float32)


def torch_toy(x, t, cond):
    return torch.from_numpy(toy(x.numpy(), t.numpy().astype(np.float32), None if cond is None else cond.numpy()))


def manifest(prediction: str) -> dict:
    s = D.make_schedule("cosine", T)
    return {"diffusion": {"prediction": prediction}, "flow_timestep_scale": 1000.0,
            "schedule": {"betas": s.betas.tolist(), "alphas_cumprod": s.alphas_cumprod.tolist()}}


DISCRETE = ([("ddpm", T, 0.0, "leading", None)]
            + [("ddim", 7, eta, spacing, None) for eta in (0.0, 0.7) for spacing in S.SPACINGS]
            + [("ddim", 7, 0.7, "trailing", 0.5), ("ddpm", T, 0.0, "leading", 1.0)])
# (sampler, steps, eta, spacing, clip_sample, prediction); the flow sampler predicts velocity only
CASES = ([c + (p,) for c in DISCRETE for p in ("v_prediction", "epsilon", "sample")]
         + [("euler", 7, 0.0, "leading", None, "flow")])


def run_both(sampler, steps, eta, spacing, clip, prediction, guided):
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal(SHAPE, dtype=np.float32)
    cond = rng.uniform(size=(SHAPE[0], 2) + SHAPE[2:]).astype(np.float32) if guided else None
    m = manifest("v_prediction" if prediction == "flow" else prediction)
    sched = engine.scheduler_for(m, sampler, steps, eta, spacing=spacing, clip_sample=clip)
    got = engine.sample_loop(toy, x_T, sched, guidance=2.5 if guided else None, cond=cond, seed=SEED)
    ref = D.sample(torch_toy, SHAPE, None if sampler == "euler" else D.make_schedule("cosine", T), sampler=sampler,
                   steps=steps, eta=eta, spacing=spacing, clip_sample=clip, noise=torch.from_numpy(x_T),
                   prediction_type=None if sampler == "euler" else prediction, step_seeds=[SEED, SEED + 1],
                   guidance_scale=2.5 if guided else None, cond=None if cond is None else torch.from_numpy(cond),
                   null_cond=None if cond is None else torch.zeros(cond.shape))
    return ref.numpy(), got, x_T


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("sampler, steps, eta, spacing, clip, prediction", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_every_sampler_is_equal_in_both_runtimes(sampler, steps, eta, spacing, clip, prediction, guided):
    ref, got, x_T = run_both(sampler, steps, eta, spacing, clip, prediction, guided)
    assert got.dtype == np.float32 and got.shape == SHAPE and np.isfinite(got).all()
    err = float(np.abs(ref - got).max())
    assert err <= 1e-3 * max(1.0, float(np.abs(ref).max())), err
    assert float(np.abs(got - x_T).max()) > 1e-2  # the run did something


def test_stochastic_samplers_use_their_step_noise():
    """eta > 0 depends on the step seeds (so the parity above covers the noise), eta = 0 does not."""
    x_T = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    sched = engine.scheduler_for(manifest("v_prediction"), "ddim", 7, 0.7)
    a, b = (engine.sample_loop(toy, x_T, sched, seed=s) for s in (SEED, SEED + 10))
    assert float(np.abs(a - b).max()) > 1e-2
    sched = engine.scheduler_for(manifest("v_prediction"), "ddim", 7, 0.0)
    np.testing.assert_array_equal(engine.sample_loop(toy, x_T, sched, seed=SEED),
                                  engine.sample_loop(toy, x_T, sched, seed=SEED + 10))


def _corr(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_step_noise_is_independent_of_the_initial_noise(monkeypatch, sampler, eta):
    """The first step's noise is not x_T (it was, in both runtimes, when both came from one seed)."""
    shape = (1, 4, 16, 16, 16)  # 16384 values: |corr| of independent draws is ~0.008
    bound = 5.0 / np.sqrt(np.prod(shape))
    drawn, original = [], S.step_noise

    def recording(seeds, step, shape_):
        n = original(seeds, step, shape_)
        drawn.append(n)
        return n

    sched = D.make_schedule("cosine", T)
    # torch runtime, initial noise and step noise from one torch generator seed
    monkeypatch.setattr(S, "step_noise", recording)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    D.sample(lambda x, t, c: 0.5 * x, shape, sched, sampler=sampler, steps=T, eta=eta,
             generator=torch.Generator().manual_seed(SEED))
    assert len(drawn) == (T - 1 if sampler == "ddpm" else T)
    assert not np.allclose(drawn[0], x_T.numpy()) and abs(_corr(drawn[0], x_T.numpy())) < bound
    # the torch runtime as medgen_rt.sample drives it: noise from seed, step noise from the same seed
    drawn.clear()
    D.sample(lambda x, t, c: 0.5 * x, shape, sched, sampler=sampler, steps=T, eta=eta, noise=x_T, step_seeds=[SEED])
    assert abs(_corr(drawn[0], x_T.numpy())) < bound
    # the engine: its initial noise from numpy's default_rng(seed), its step noise from the same seed
    drawn.clear()
    monkeypatch.setattr(engine, "step_noise", recording)
    start = np.random.default_rng(SEED).standard_normal(shape, dtype=np.float32)
    engine.sample_loop(lambda x, t, c: 0.5 * x, start, engine.scheduler_for(manifest("v_prediction"), sampler,
                                                                              T, eta), seed=SEED)
    assert not np.allclose(drawn[0], start) and abs(_corr(drawn[0], start)) < bound
    # and successive steps are independent of each other
    assert abs(_corr(drawn[0], drawn[1])) < bound


def test_step_noise_rows_follow_their_seeds():
    """Row b is the stream of seed b whatever the batch: a volume's noise does not depend on its batch."""
    both = S.step_noise([3, 4], 2, (2, 2, 3))
    np.testing.assert_array_equal(both[1:], S.step_noise([4], 2, (1, 2, 3)))
    assert not np.array_equal(S.step_noise([3], 2, (1, 2, 3)), S.step_noise([3], 3, (1, 2, 3)))
    with pytest.raises(ValueError, match="seeds"):
        S.step_noise([3], 0, (2, 2))
