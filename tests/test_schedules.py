"""DDPM / DDIM schedule math: buffers against float64 closed forms, moments, posterior, samplers.

Small stub networks isolate the method's math from any UNet. Inputs are fresh random tensors
(the seed of each test is drawn at random, printed in failure messages, and can be replayed with
FASTFLOW_TEST_SEED=<n>); statistical tests use fixed seeds and a tolerance from the CLT.

The buffers are float32 (computed in float64 and rounded), so they are compared with the closed
forms to float32 rounding. Identities that do not depend on the buffers' rounding (round trips
between ε, x0 and v) are checked in float64 on a ``.double()`` method with stub outputs that are
exactly representable in float32 (the methods cast network outputs to float32).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fastflow.methods import DDPM, DDPMx0

SCHEDULES = [(1000, 1e-4, 0.02), (50, 1e-3, 0.05), (7, 0.01, 0.3)]
EPS32 = 2.0**-24


class Stub(nn.Module):
    """network(x, t) = fn(x, t); records every (x, t) it is called with."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.fn = fn
        self.calls = []
        self.anchor = nn.Parameter(torch.zeros(()))  # BaseMethod.device reads a parameter

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.fn(x, t)


def closed_form(num_timesteps: int, beta_start: float, beta_end: float) -> dict:
    """Every DDPM buffer in float64 numpy, written from the formulas (Ho et al. 2020, eqs. 4, 6-7)."""
    t = np.arange(num_timesteps, dtype=np.float64)
    betas = beta_start + t * (beta_end - beta_start) / (num_timesteps - 1)
    alphas = 1.0 - betas
    alphas_cumprod = np.exp(np.cumsum(np.log(alphas)))  # ᾱ_t = ∏_{i≤t} α_i, independent of torch.cumprod
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    clipped = posterior_variance.copy()
    clipped[0] = posterior_variance[1]
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas": 1.0 / np.sqrt(alphas),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(clipped),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def bcast(values, batch: int, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(values, dtype=dtype).reshape(batch, 1, 1, 1)


# ------------------------------------------------------------------------------ schedule buffers
@pytest.mark.parametrize("num_timesteps,beta_start,beta_end", SCHEDULES)
def test_buffers_match_float64_closed_forms(num_timesteps: int, beta_start: float, beta_end: float) -> None:
    method = DDPM(Stub(lambda x, t: x), num_timesteps, beta_start, beta_end)
    expected = closed_form(num_timesteps, beta_start, beta_end)
    buffers = dict(method.named_buffers())
    for name, ref in expected.items():
        assert name in buffers, f"DDPM has no buffer {name!r}"
        buf = buffers[name]
        assert buf.shape == (num_timesteps,) and buf.dtype == torch.float32, f"{name}: {buf.shape} {buf.dtype}"
        got = buf.double().numpy()
        # float32 rounding of the float64 value (+ a little float64 noise in 1/ᾱ − 1 near t = 0)
        tol = 2 * EPS32 * np.abs(ref) + 1e-12
        bad = np.abs(got - ref) > tol
        assert not bad.any(), (
            f"{name} (T={num_timesteps}, β=[{beta_start}, {beta_end}]): first mismatch at t={np.argmax(bad)}: "
            f"{got[np.argmax(bad)]!r} vs closed form {ref[np.argmax(bad)]!r}"
        )


def test_linear_beta_endpoints_and_spacing() -> None:
    method = DDPM(Stub(lambda x, t: x), 1000, 1e-4, 0.02)
    betas = method.betas.double()
    assert abs(betas[0].item() - 1e-4) <= EPS32 * 1e-4 and abs(betas[-1].item() - 0.02) <= EPS32 * 0.02
    steps = np.diff(betas.numpy())
    np.testing.assert_allclose(steps, (0.02 - 1e-4) / 999, rtol=0, atol=4 * EPS32 * 0.02)


def test_posterior_coefficients_are_the_gaussian_product() -> None:
    """q(x_{t−1}|x_t, x0) ∝ N(x_t; √α_t x_{t−1}, β_t) · N(x_{t−1}; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1}).

    Completing the square in x_{t−1}: precision λ = α_t/β_t + 1/(1 − ᾱ_{t−1}),
    mean = (√α_t/β_t · x_t + √ᾱ_{t−1}/(1 − ᾱ_{t−1}) · x0)/λ, variance = 1/λ (t ≥ 1; at t = 0 the
    prior is a point mass at x0: coef1 = 1, coef2 = 0, variance 0).
    """
    num_timesteps = 1000
    method = DDPM(Stub(lambda x, t: x), num_timesteps)
    cf = closed_form(num_timesteps, 1e-4, 0.02)
    beta, alpha, ab_prev = cf["betas"][1:], cf["alphas"][1:], cf["alphas_cumprod_prev"][1:]
    precision = alpha / beta + 1.0 / (1.0 - ab_prev)
    coef_x0 = np.sqrt(ab_prev) / (1.0 - ab_prev) / precision
    coef_xt = np.sqrt(alpha) / beta / precision
    for name, ref in [("posterior_mean_coef1", coef_x0), ("posterior_mean_coef2", coef_xt),
                      ("posterior_variance", 1.0 / precision)]:
        got = getattr(method, name).double().numpy()
        np.testing.assert_allclose(got[1:], ref, rtol=4 * EPS32, err_msg=name)
    assert method.posterior_mean_coef1[0].item() == pytest.approx(1.0, abs=4 * EPS32)
    assert method.posterior_mean_coef2[0].item() == 0.0
    assert method.posterior_variance[0].item() == 0.0


# ------------------------------------------------------------------------------ forward process
@pytest.mark.parametrize("step", [0, 10, 500, 999])
def test_forward_process_moments(step: int) -> None:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε: mean √ᾱ_t·x0, variance 1 − ᾱ_t (CLT tolerance, fixed seed)."""
    seed = 1000 + step
    torch.manual_seed(seed)
    method = DDPM(Stub(lambda x, t: x), 1000)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    t = torch.full((n,), step, dtype=torch.long)
    x_t, noise = method.forward_process(x0, t)
    ab = closed_form(1000, 1e-4, 0.02)["alphas_cumprod"][step]
    mean, var = x_t.mean().item(), x_t.var().item()
    # 5 standard errors: sd(mean) = √((1 − ᾱ)/n), sd(sample variance) = (1 − ᾱ)·√(2/n)
    assert abs(mean - math.sqrt(ab) * 0.7) <= 5 * math.sqrt((1 - ab) / n) + 1e-7, f"seed {seed}: mean {mean}"
    assert abs(var - (1 - ab)) <= 5 * (1 - ab) * math.sqrt(2 / n), f"seed {seed}: var {var} vs {1 - ab}"
    # the returned noise is the one used
    sab, s1m = method.sqrt_alphas_cumprod[step].double(), method.sqrt_one_minus_alphas_cumprod[step].double()
    expected = sab * x0 + s1m * noise
    torch.testing.assert_close(x_t, expected, rtol=0, atol=0)


def test_forward_process_uses_given_noise_per_sample_timesteps(seed: int) -> None:
    method = DDPM(Stub(lambda x, t: x), 1000)
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t, noise = method.forward_process(x0, t, eps)
    assert noise is eps
    cf = closed_form(1000, 1e-4, 0.02)
    ab = bcast(cf["alphas_cumprod"][t.numpy()], 5)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"seed {seed}: {m}")


# ------------------------------------------------------------------------------ ε / x0 / v round trips
def test_epsilon_x0_round_trip_float64(seed: int) -> None:
    """forward_process(x0, ε) → x_t; ε-prediction recovers x0 and x0-prediction recovers ε (float64)."""
    # float32-representable values: the methods cast network outputs to float32
    x0_32 = (0.5 * torch.randn(6, 3, 5, 5)).double()
    eps32 = torch.randn(6, 3, 5, 5).double()
    eps_method = DDPM(Stub(lambda x, t: eps32), 1000).double()
    x0_method = DDPMx0(Stub(lambda x, t: x0_32), 1000).double()
    t = torch.randint(0, 1000, (6,))
    x_t, _ = eps_method.forward_process(x0_32, t, eps32)
    x0_hat, eps_hat = eps_method.predict_x0_and_eps(x_t, t, clip=False)
    torch.testing.assert_close(x0_hat, x0_32, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}, t={t}: {m}")
    assert torch.equal(eps_hat, eps32)
    x0_hat2, eps_hat2 = x0_method.predict_x0_and_eps(x_t, t, clip=False)
    assert torch.equal(x0_hat2, x0_32)
    torch.testing.assert_close(eps_hat2, eps32, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}, t={t}: {m}")


# ------------------------------------------------------------------------------ training targets
@pytest.mark.parametrize("cls", [DDPM, DDPMx0])
def test_training_target(cls, seed: int) -> None:
    """ε-prediction regresses the noise, x0-prediction regresses x0; network time = integer t."""
    stub = Stub(lambda x, t: 0.5 * x)
    method = cls(stub, 1000).double()
    x0 = 0.3 * torch.randn(16, 2, 4, 4, dtype=torch.float64)
    loss, metrics = method.compute_loss(x0)
    (x_t, t_in), = stub.calls
    assert torch.all(t_in == t_in.round()) and t_in.min() >= 0 and t_in.max() <= 999
    t = t_in.long()
    sab = method.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    s1m = method.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = x0 if cls is DDPMx0 else (x_t - sab * x0) / s1m  # ε recovered from x_t
    expected = ((0.5 * x_t - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4), f"seed {seed}"
    assert metrics["t_mean"].item() == pytest.approx(t_in.mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------ DDPM ancestral step
def test_ddpm_reverse_step_mean_and_noise(seed: int) -> None:
    """x_{t−1} = coef1·x̂0 + coef2·x_t + exp(½·log σ̃²_t)·z, with z replayed from the generator; t = 0 adds none."""
    eps = torch.randn(4, 3, 4, 4)
    method = DDPM(Stub(lambda x, t: eps), 1000)
    x_t = 0.2 * torch.randn(4, 3, 4, 4)
    t = torch.tensor([999, 500, 1, 0])
    out = method.reverse_process(x_t, t, generator=torch.Generator().manual_seed(seed))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed))
    cf = closed_form(1000, 1e-4, 0.02)
    tn = t.numpy()
    sab, s1m = bcast(np.sqrt(cf["alphas_cumprod"][tn]), 4), bcast(np.sqrt(1 - cf["alphas_cumprod"][tn]), 4)
    x0_hat = ((x_t.double() - s1m * eps.double()) / sab).clamp(-1, 1)
    mean = bcast(cf["posterior_mean_coef1"][tn], 4) * x0_hat + bcast(cf["posterior_mean_coef2"][tn], 4) * x_t.double()
    std = bcast(np.exp(0.5 * cf["posterior_log_variance_clipped"][tn]) * (tn != 0), 4)
    torch.testing.assert_close(out.double(), mean + std * z.double(), rtol=1e-5, atol=2e-5,
                               msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(out[3].double(), x0_hat[3], rtol=1e-5, atol=1e-5)  # t = 0: x̂0


# ------------------------------------------------------------------------------ DDIM
def test_ddim_timesteps_even_descending_sentinel() -> None:
    for num_timesteps, num_steps in [(1000, 100), (1000, 1000), (1000, 3), (1000, 37), (10, 10), (50, 2)]:
        steps = DDPM.ddim_timesteps(num_timesteps, num_steps)
        assert len(steps) == num_steps + 1 and steps[-1] == -1, (num_timesteps, num_steps, steps[-3:])
        body = steps[:-1]
        assert body[0] == num_timesteps - 1 and body[-1] == 0, (num_timesteps, num_steps, body[:2], body[-2:])
        assert all(a > b for a, b in zip(body, body[1:])), f"not strictly descending: {body}"
        spacing = (num_timesteps - 1) / (num_steps - 1)
        gaps = np.diff(body[::-1])
        assert gaps.min() >= math.floor(spacing) and gaps.max() <= math.ceil(spacing), (num_steps, gaps.min(),
                                                                                       gaps.max())
        expected = np.floor(np.linspace(0, num_timesteps - 1, num_steps) + 1e-9).astype(int)[::-1].tolist()
        assert body == expected


def test_ddim_single_step_starts_at_the_last_timestep() -> None:
    assert DDPM.ddim_timesteps(1000, 1) == [999, -1]


def test_ddim_timesteps_exact_at_every_step_count() -> None:
    """⌊k·(T−1)/(n−1)⌋ exactly for every n (float32 linspace gives 332 for 333 at n = 220)."""
    for num_steps in range(2, 1001):
        body = DDPM.ddim_timesteps(1000, num_steps)[:-1][::-1]
        assert body == [k * 999 // (num_steps - 1) for k in range(num_steps)], num_steps
    assert 333 in DDPM.ddim_timesteps(1000, 220)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=f"num_steps={bad}"):
            DDPM.ddim_timesteps(1000, bad)


@pytest.mark.parametrize("cls", [DDPM, DDPMx0])
def test_ddim_eta0_is_deterministic_given_x_T(cls, seed: int) -> None:
    stub = Stub(lambda x, t: 0.5 * torch.tanh(x) + t.reshape(-1, 1, 1, 1) / 2000)
    method = cls(stub, 1000)
    x_T = torch.randn(3, 2, 4, 4)
    runs = [method.sample(3, (2, 4, 4), num_steps=10, sampler="ddim", eta=0.0, x_T=x_T.clone(),
                          generator=torch.Generator().manual_seed(s)) for s in (seed, seed + 1)]
    assert torch.equal(runs[0], runs[1]), f"seed {seed}: DDIM η=0 depends on the generator"
    noisy = [method.sample(3, (2, 4, 4), num_steps=10, sampler="ddim", eta=0.5, x_T=x_T.clone(),
                           generator=torch.Generator().manual_seed(s)) for s in (seed, seed + 1)]
    assert not torch.equal(noisy[0], noisy[1]), "η=0.5 should draw noise"
    # η=0 leaves the generator's stream where it was (so a later batch's noise does not depend on
    # how many steps this one took)
    gen = torch.Generator().manual_seed(seed)
    method.sample(3, (2, 4, 4), num_steps=10, sampler="ddim", eta=0.0, x_T=x_T.clone(), generator=gen)
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_ddim_eta_outside_0_1_is_refused(eta: float) -> None:
    """Above 1, σ² exceeds the step's noise budget 1 − ᾱ_prev (the clamp would hide it)."""
    method = DDPM(Stub(lambda x, t: torch.zeros_like(x)), 1000)
    with pytest.raises(ValueError, match="eta=.*expected a number in \\[0, 1\\]"):
        method.sample(2, (1, 4, 4), num_steps=5, sampler="ddim", eta=eta)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_last_step_returns_x0_hat_exactly(eta: float, seed: int) -> None:
    x0 = 0.8 * torch.rand(4, 3, 4, 4) - 0.4
    eps = torch.randn(4, 3, 4, 4)
    method = DDPM(Stub(lambda x, t: eps), 1000)
    t = torch.tensor([0, 3, 40, 999])
    x_t, _ = method.forward_process(x0, t, eps)
    out = method.reverse_process_DDIM(x_t, t, torch.full((4,), -1), eta=eta,
                                      generator=torch.Generator().manual_seed(seed))
    x0_hat, _ = method.predict_x0_and_eps(x_t, t)
    assert torch.equal(out, x0_hat), f"seed {seed}: t_prev=-1 must return x̂0 exactly"
    # x̂0 recovers x0 up to float32 rounding amplified by 1/√ᾱ_t (≈ 160 at t = 999)
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-4, msg=lambda m: f"seed {seed}: {m}")


def test_ddim_x0_prediction_uses_the_prediction_directly(seed: int) -> None:
    known = torch.rand(3, 1, 4, 4) * 1.8 - 0.9
    method = DDPMx0(Stub(lambda x, t: known), 1000)
    x_t = torch.randn(3, 1, 4, 4) * 3
    out = method.reverse_process_DDIM(x_t, torch.tensor([999, 500, 2]), torch.full((3,), -1), eta=0.0)
    assert torch.equal(out, known), f"seed {seed}"
    # outside [−1, 1] it is clipped
    method_far = DDPMx0(Stub(lambda x, t: 3 * known.sign()), 1000)
    out_far = method_far.reverse_process_DDIM(x_t, torch.tensor([999, 500, 2]), torch.full((3,), -1), eta=0.0)
    assert torch.equal(out_far, known.sign())


@pytest.mark.parametrize("step", [1, 10, 600, 999])
def test_ddim_eta1_noise_is_the_posterior_std(step: int) -> None:
    """Zero ε̂ and fixed x_t: x_prev − √ᾱ_{t−1}·x̂0 = σ·z; z replayed exactly and measured statistically."""
    gen_seed = 7 + step
    n = 100_000
    method = DDPM(Stub(lambda x, t: torch.zeros_like(x)), 1000)
    x_t = torch.full((1, 1, n, 1), 0.001)
    t, t_prev = torch.tensor([step]), torch.tensor([step - 1])
    out = method.reverse_process_DDIM(x_t, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(gen_seed))
    cf = closed_form(1000, 1e-4, 0.02)
    mean = math.sqrt(cf["alphas_cumprod_prev"][step]) * min(1.0, 0.001 / math.sqrt(cf["alphas_cumprod"][step]))
    resid = out.double().flatten() - mean
    z = torch.randn((1, 1, n, 1), generator=torch.Generator().manual_seed(gen_seed)).double().flatten()
    sigma2 = cf["posterior_variance"][step]
    # float32: 1 − ᾱ_t/ᾱ_{t−1} = β_t loses ≈ 4·2⁻²⁴/β_t relative precision
    rel = 1e-5 + 8 * EPS32 / cf["betas"][step]
    measured = (resid / z)[z.abs() > 0.1]
    assert torch.allclose(measured**2, torch.full_like(measured, sigma2), rtol=rel), (
        f"seed {gen_seed}: σ² {measured[:3] ** 2} vs β_t(1−ᾱ_{{t−1}})/(1−ᾱ_t) = {sigma2}"
    )
    var = resid.var().item()
    assert abs(var - sigma2) <= 5 * sigma2 * math.sqrt(2 / n) + rel * sigma2, f"seed {gen_seed}: var {var} vs {sigma2}"
    assert abs(resid.mean().item()) <= 5 * math.sqrt(sigma2 / n) + 1e-6


def _denoiser_from(method: DDPM, x0_of_x: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """ε̂(x, t) consistent with x̂0 = x0_of_x(x_t) (bounded inside ±1: no clipping acts)."""

    def fn(x: Tensor, t: Tensor) -> Tensor:
        ti = t.long()
        sab = method.sqrt_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
        s1m = method.sqrt_one_minus_alphas_cumprod[ti].reshape(-1, 1, 1, 1)
        return (x - sab * x0_of_x(x)) / s1m

    return fn


def test_ddim_eta1_full_schedule_equals_ddpm_ancestral_sampling(seed: int) -> None:
    """η = 1 over every timestep is the DDPM chain, draw for draw: with the same generator both
    samplers visit the same x_t at every step. x̂0 = 0.6·tanh(x_t) depends on the state, so the
    chain (not only its end point) is compared, and another generator visibly changes it."""
    method = DDPM(Stub(lambda x, t: x), 20, 1e-3, 0.2)
    method.model.fn = _denoiser_from(method, lambda x: 0.6 * torch.tanh(x))
    x_T = torch.randn(2, 3, 4, 4)

    def chain(sampler: str, gen_seed: int):
        method.model.calls.clear()
        kwargs = dict(num_steps=20, eta=1.0) if sampler == "ddim" else {}
        out = method.sample(2, (3, 4, 4), sampler=sampler, x_T=x_T.clone(),
                            generator=torch.Generator().manual_seed(gen_seed), **kwargs)
        return out, [(x, t) for x, t in method.model.calls]

    ddpm, ddpm_calls = chain("ddpm", seed)
    ddim, ddim_calls = chain("ddim", seed)
    assert len(ddpm_calls) == len(ddim_calls) == 20
    for step, ((x_a, t_a), (x_b, t_b)) in enumerate(zip(ddpm_calls, ddim_calls)):
        assert torch.equal(t_a, t_b) and t_a[0].item() == 19 - step, (step, t_a, t_b)
        torch.testing.assert_close(x_b, x_a, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}, step {step}: {m}")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    other, _ = chain("ddim", seed + 1)
    assert (other - ddpm).abs().max() > 1e-2, f"seed {seed}: the noise stream does not reach the output"


@pytest.mark.parametrize("t_cur,t_prev", [(999, 899), (500, 250), (40, 0)])
def test_ddim_sigma_formula_for_skipped_steps(t_cur: int, t_prev: int) -> None:
    """σ = η·√[(1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)] and direction √(1−ᾱ_prev−σ²) on non-adjacent steps."""
    gen_seed = t_cur
    eps = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(gen_seed + 1))
    method = DDPM(Stub(lambda x, t: eps), 1000).double()
    x_t = 0.01 * torch.randn(1, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(gen_seed + 2))
    eta = 0.7
    out = method.reverse_process_DDIM(x_t, torch.tensor([t_cur]), torch.tensor([t_prev]), eta=eta,
                                      generator=torch.Generator().manual_seed(gen_seed))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(gen_seed)).double()
    ab_t, ab_p = method.alphas_cumprod[t_cur].item(), method.alphas_cumprod[t_prev].item()
    sigma = eta * math.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
    # x̂0 uses the stored √(1−ᾱ_t), √ᾱ_t buffers (not √ of the stored ᾱ_t: they differ by float32 rounding)
    sab, s1m = method.sqrt_alphas_cumprod[t_cur].item(), method.sqrt_one_minus_alphas_cumprod[t_cur].item()
    x0_hat = ((x_t - s1m * eps.double()) / sab).clamp(-1, 1)
    expected = math.sqrt(ab_p) * x0_hat + math.sqrt(1 - ab_p - sigma**2) * eps.double() + sigma * z
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
