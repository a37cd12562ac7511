"""Flow Matching and Flow Map Matching: paths, losses, ODE solvers, time pairs, sampling.

Solvers are checked on fields whose exact discrete solutions are known (constant and linear
velocities); dyadic inputs make the constant-field results bit-exact. Inputs are fresh random
tensors (seed drawn at random, printed on failure, replayable with FASTFLOW_TEST_SEED=<n>); the
statistical tests on the time-pair distribution use fixed seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fastflow.methods import FlowMapMatching, FlowMatching
from fastflow.models import DualTimeUNet, UNet

try:
    from scipy import stats as scipy_stats
except ImportError:  # pragma: no cover - scipy is a dev dependency
    scipy_stats = None

TINY = dict(in_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            num_heads=2, num_groups=8, image_size=8, dropout=0.0)


class VelocityStub(nn.Module):
    """v(x, t) = fn(x, t) for FlowMatching; records the network time argument of every call."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.fn = fn
        self.times: List[Tensor] = []
        self.inputs: List[Tensor] = []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.times.append(t.detach().clone())
        self.inputs.append(x.detach().clone())
        return self.fn(x, t)


class MapStub(nn.Module):
    """v(x, s, t) = a·x + c·(1 + t) for FlowMapMatching, with the dual (tangent) interface.

    ∂_t v = c, ∂_x v·ẋ = a·ẋ, ∂_s v = 0. ``a`` and ``c`` are parameters (gradients are checked).
    """

    def __init__(self, a: float, c: Tensor):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.c = nn.Parameter(c.clone())
        self.calls: List[Tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, s: Tensor, t: Tensor, *, x_dot=None, s_dot=None, t_dot=None):
        self.calls.append((s.detach().clone(), t.detach().clone()))
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        v = self.a * x + self.c * (1 + tb)
        if x_dot is None and s_dot is None and t_dot is None:
            return v
        dv = torch.zeros_like(v)
        if x_dot is not None:
            dv = dv + self.a * x_dot
        if t_dot is not None:
            dv = dv + self.c * t_dot.reshape_as(tb)
        return v, dv


class ConstantMapStub(nn.Module):
    """v(x, s, t) = c; records (s, t)."""

    def __init__(self, c: Tensor):
        super().__init__()
        self.c = nn.Parameter(c.clone())
        self.calls: List[Tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        self.calls.append((s.clone(), t.clone()))
        return self.c.expand_as(x)


def dyadic(*shape: int, scale: int = 16, span: int = 64) -> Tensor:
    """Random multiples of 1/scale in [−span/scale, span/scale): exact in every float format used."""
    return torch.randint(-span, span, shape).double() / scale


# ==================================================================================== Flow Matching
def test_fm_forward_process_endpoints_and_target(seed: int) -> None:
    fm = FlowMatching(VelocityStub(lambda x, t: x))
    x0, x1 = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x_t, v = fm.forward_process(x0, x1, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(x_t, x0) and torch.equal(v, x1 - x0)
    x_t, _ = fm.forward_process(x0, x1, torch.ones(4, dtype=torch.float64))
    assert torch.equal(x_t, x1)
    t = torch.rand(4, dtype=torch.float64)
    x_t, v = fm.forward_process(x0, x1, t)
    tb = t.reshape(4, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tb) * x0 + tb * x1, rtol=1e-14, atol=1e-14)
    # round trip (x_t, v) → (x0, x1): x0 = x_t − t·v, x1 = x_t + (1 − t)·v
    torch.testing.assert_close(x_t - tb * v, x0, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(x_t + (1 - tb) * v, x1, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


def test_fm_compute_loss_is_mse_to_x1_minus_x0(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stub v = sin(x); the noise x0 is recorded as drawn: loss = mean((sin(x_t) − (x1 − x0))²)."""
    drawn = []
    randn_like = torch.randn_like

    def recording_randn_like(x, *args, **kwargs):
        drawn.append(randn_like(x, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(torch, "randn_like", recording_randn_like)
    stub = VelocityStub(lambda x, t: torch.sin(x))
    fm = FlowMatching(stub, num_timesteps=1000, sigma_min=1e-4).double()
    x1 = torch.randn(32, 2, 3, 3, dtype=torch.float64)
    loss, metrics = fm.compute_loss(x1)
    (x0,), (x_t,), (t_in,) = drawn, stub.inputs, stub.times
    t = t_in.double() / 999  # network time is t·(T − 1)
    assert t.min() >= 1e-4 - 1e-7 and t.max() <= 1.0 + 1e-7, f"seed {seed}: t outside [σ_min, 1]"
    tb = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - tb) * x0 + tb * x1, rtol=1e-6, atol=1e-6)
    expected = ((torch.sin(x_t) - (x1 - x0)) ** 2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-6), f"seed {seed}"
    assert metrics["loss"].item() == loss.item()
    assert metrics["t_mean"].item() == pytest.approx(t.mean().item(), rel=1e-5)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 16])
def test_fm_solvers_exact_on_constant_field(solver: str, num_steps: int, seed: int) -> None:
    """v ≡ c: every solver gives x_1 = x_0 + c, bit for bit (dyadic data and power-of-two steps)."""
    c = dyadic(1, 3, 4, 4, scale=4, span=8).float()
    fm = FlowMatching(VelocityStub(lambda x, t: c.expand(x.shape[0], -1, -1, -1)))
    x0 = dyadic(2, 3, 4, 4)
    out = fm.sample(2, (3, 4, 4), num_steps=num_steps, solver=solver, x_0=x0)
    assert torch.equal(out, x0 + c.double()), f"seed {seed}: {solver} with {num_steps} steps"


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_fm_solvers_constant_field_any_step_count(solver: str, seed: int) -> None:
    c = torch.randn(1, 2, 3, 3)
    fm = FlowMatching(VelocityStub(lambda x, t: c.expand(x.shape[0], -1, -1, -1)))
    x0 = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    out = fm.sample(3, (2, 3, 3), num_steps=7, solver=solver, x_0=x0)
    # dt·v is formed in float32 (the network output is cast to float32): a few float32 ulps
    torch.testing.assert_close(out, x0 + c.double(), rtol=0, atol=7 * 2.0**-23 * c.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("solver,growth", [
    ("euler", lambda h: 1 + h),
    ("midpoint", lambda h: 1 + h + h**2 / 2),
    ("heun", lambda h: 1 + h + h**2 / 2),
])
def test_fm_solvers_on_linear_field(solver: str, growth, seed: int) -> None:
    """v = a·x: x_N = g(a·dt)^N·x_0 with g the solver's stability polynomial (float32 network output)."""
    a = float(torch.empty(()).uniform_(-2.0, 2.0))
    num_steps = 6
    fm = FlowMatching(VelocityStub(lambda x, t: a * x))
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = fm.sample(2, (3, 4, 4), num_steps=num_steps, solver=solver, x_0=x0)
    expected = growth(a / num_steps) ** num_steps * x0
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6, msg=lambda m: f"seed {seed}, a={a}: {m}")
    # the three solvers differ at O((a·dt)²): the check above tells them apart
    h = a / num_steps
    other = (1 + h) ** num_steps if solver != "euler" else (1 + h + h**2 / 2) ** num_steps
    if abs(a) > 0.3:
        assert not torch.allclose(out, other * x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver,growth", [("euler", (5, 4)), ("midpoint", (41, 32)), ("heun", (41, 32))])
def test_fm_solvers_on_linear_field_bit_exact(solver: str, growth: Tuple[int, int], seed: int) -> None:
    """a = 1/2, dt = 1/2: Euler multiplies by 5/4 per step, midpoint/heun by 1 + 1/4 + 1/32 = 41/32
    (small dyadic numbers: the float32 network output is exact)."""
    fm = FlowMatching(VelocityStub(lambda x, t: 0.5 * x))
    x0 = dyadic(2, 1, 2, 2, scale=1, span=16)
    out = fm.sample(2, (1, 2, 2), num_steps=2, solver=solver, x_0=x0)
    num, den = growth
    assert torch.equal(out, x0 * (num / den) ** 2), f"seed {seed}: {solver}"


@pytest.mark.parametrize("solver,fractions", [
    ("euler", [0.0]),
    ("midpoint", [0.0, 0.5]),
    ("heun", [0.0, 1.0]),
])
def test_fm_network_time_is_t_times_T_minus_1(solver: str, fractions: List[float]) -> None:
    stub = VelocityStub(lambda x, t: torch.zeros_like(x))
    fm = FlowMatching(stub, num_timesteps=1000)
    num_steps = 5
    fm.sample(3, (1, 2, 2), num_steps=num_steps, solver=solver, x_0=torch.randn(3, 1, 2, 2))
    expected = [(k + f) / num_steps * 999 for k in range(num_steps) for f in fractions]
    got = [t[0].item() for t in stub.times]
    assert all(t.shape == (3,) for t in stub.times)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4, err_msg=solver)


def test_fm_unknown_solver_is_an_error() -> None:
    fm = FlowMatching(VelocityStub(lambda x, t: x))
    with pytest.raises(ValueError, match="rk4"):
        fm.sample(1, (1, 2, 2), num_steps=2, solver="rk4", x_0=torch.zeros(1, 1, 2, 2))


# ================================================================================ Flow Map Matching
def tiny_fmm(**kwargs) -> FlowMapMatching:
    return FlowMapMatching(DualTimeUNet(UNet(**TINY), 1000), **kwargs)


def test_fmm_flow_map_is_identity_on_the_diagonal(seed: int) -> None:
    method = tiny_fmm()
    x = torch.randn(3, 2, 8, 8)
    s = torch.rand(3)
    with torch.no_grad():
        assert torch.equal(method.flow_map(s, s, x), x), f"seed {seed}: Φ_(s,s) ≠ id"
        assert not torch.allclose(method.flow_map(s, (s + 0.3).clamp(max=1), x), x)


def test_fmm_interpolant_and_its_time_derivative(seed: int) -> None:
    x0, x1 = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) * 0.98 + 0.01
    I = FlowMapMatching.interpolant_I_t
    assert torch.equal(I(torch.zeros(4, dtype=torch.float64), x0, x1), x0)
    assert torch.equal(I(torch.ones(4, dtype=torch.float64), x0, x1), x1)
    h = 1e-4
    central = (I(t + h, x0, x1) - I(t - h, x0, x1)) / (2 * h)
    torch.testing.assert_close(FlowMapMatching.interpolant_I_t_dot(t, x0, x1), central, rtol=1e-9, atol=1e-9,
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "none"])
def test_fmm_time_gap_closed_forms(schedule: str) -> None:
    g0, warmup = 0.1, 1000
    method = FlowMapMatching(MapStub(0.0, torch.zeros(1)), annealing_schedule=schedule, initial_gap=g0,
                             warmup_steps=warmup)
    for step in [0, warmup // 4, warmup // 2, warmup, 2 * warmup]:
        p = min(1.0, step / warmup)
        expected = {
            "linear": g0 + (1 - g0) * p,
            "cosine": g0 + (1 - g0) * (1 - math.cos(math.pi * p)) / 2,
            "none": 1.0,
        }[schedule]
        got = method.get_time_gap(step).item()
        assert got == pytest.approx(expected, abs=1e-6), f"{schedule} at step {step}: {got} vs {expected}"
    assert FlowMapMatching(MapStub(0.0, torch.zeros(1)), annealing_schedule=schedule, initial_gap=g0,
                           warmup_steps=0).get_time_gap(0).item() == pytest.approx(1.0)


def test_fmm_step_counter_advances_only_in_train_mode() -> None:
    method = FlowMapMatching(MapStub(0.0, torch.zeros(1)), warmup_steps=100)
    assert "_step" in method.state_dict()
    method.train()
    for expected in range(1, 4):
        method.sample_time_pairs(8)
        assert method._step.item() == expected
    method.eval()
    method.sample_time_pairs(8)
    assert method._step.item() == 3
    method.train()
    gap = method.current_time_gap()  # the gap of the step before the increment
    pair = method.sample_time_pairs(8)
    assert len(pair) == 2, "sample_time_pairs returns (s, t), as the course's does"
    assert gap.item() == pytest.approx(method.get_time_gap(3).item())
    assert method._step.item() == 4


def test_fmm_compute_loss_advances_the_step_once() -> None:
    method = FlowMapMatching(MapStub(0.3, torch.zeros(1, 2, 1, 1)), warmup_steps=100).train()
    method.compute_loss(torch.randn(4, 2, 3, 3))
    assert method._step.item() == 1
    method.eval()
    method.compute_loss(torch.randn(4, 2, 3, 3))
    assert method._step.item() == 1


@pytest.mark.parametrize("step", [0, 50, 1000])
def test_fmm_time_pair_bounds(step: int, seed: int) -> None:
    sigma = 1e-3
    method = FlowMapMatching(MapStub(0.0, torch.zeros(1)), sigma_min=sigma, initial_gap=0.1, warmup_steps=100).train()
    method._step.fill_(step)
    gap = method.current_time_gap().item()
    s, t = method.sample_time_pairs(20_000)
    assert gap == pytest.approx(min(method.get_time_gap(step).item(), 1 - sigma))
    delta = (t - s).double()
    slack = 2.0**-23  # t − s is rounded in float32
    assert s.min() >= sigma, f"seed {seed}: s < σ_min"
    assert t.max() <= 1.0, f"seed {seed}: t > 1"
    assert delta.min() >= sigma - slack and delta.max() <= gap + slack, (
        f"seed {seed}: t − s ∈ [{delta.min()}, {delta.max()}] not in [σ, gap={gap}]"
    )


def _ks_statistic(samples: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray]) -> Tuple[float, float]:
    """(D, p) of the one-sample KS test; scipy if present, else D with the asymptotic p-value."""
    if scipy_stats is not None:
        res = scipy_stats.kstest(samples, cdf)
        return float(res.statistic), float(res.pvalue)
    x = np.sort(samples)
    n = len(x)
    f = cdf(x)
    d = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(d), float(min(max(p, 0.0), 1.0))


@pytest.mark.parametrize("step", [0, 60, 1000])
def test_fmm_time_gap_density_is_triangular(step: int) -> None:
    """δ = t − s ~ p(δ) ∝ (gap − δ) on [σ, gap]: F(δ) = 1 − ((gap − δ)/(gap − σ))² (KS, fixed seed).

    And, given δ, s is uniform on [σ, 1 − δ] (so the pairs fill the triangle once gap = 1).
    """
    torch_seed = 1234 + step
    torch.manual_seed(torch_seed)
    sigma = 1e-3
    method = FlowMapMatching(MapStub(0.0, torch.zeros(1)), sigma_min=sigma, initial_gap=0.1, warmup_steps=100).train()
    method._step.fill_(step)
    n = 40_000
    gap = method.current_time_gap().item()
    s, t = method.sample_time_pairs(n)
    s, t = s.double().numpy(), t.double().numpy()
    delta = t - s
    d, p = _ks_statistic(delta, lambda x: 1 - np.clip((gap - x) / (gap - sigma), 0, 1) ** 2)
    assert p > 1e-3, f"torch seed {torch_seed}: δ not triangular on [σ, {gap}]: KS D={d:.4f}, p={p:.2e}"
    # the uniform density on [σ, gap] would be rejected: the test has power
    d_uni, p_uni = _ks_statistic(delta, lambda x: np.clip((x - sigma) / (gap - sigma), 0, 1))
    assert p_uni < 1e-6, f"KS cannot tell uniform from triangular (p={p_uni})"
    u = (s - sigma) / (1 - delta - sigma)
    d_s, p_s = _ks_statistic(u, lambda x: np.clip(x, 0, 1))
    assert p_s > 1e-3, f"torch seed {torch_seed}: s | δ not uniform on [σ, 1 − δ]: KS D={d_s:.4f}, p={p_s:.2e}"


def test_fmm_sample_composes_flow_maps_over_linspace(seed: int) -> None:
    """Constant velocity c: x_N = x_0 + Σ(t_{i+1} − t_i)·c = x_0 + (1 − 2σ_min)·c; pairs are consecutive."""
    sigma = 0.01
    c = torch.randn(1, 2, 3, 3)
    stub = ConstantMapStub(c)
    method = FlowMapMatching(stub, sigma_min=sigma)
    x0 = torch.randn(2, 2, 3, 3)
    num_steps = 5
    out = method.sample(2, (2, 3, 3), num_steps=num_steps, x_0=x0)
    torch.testing.assert_close(out, x0 + (1 - 2 * sigma) * c, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")
    grid = np.linspace(sigma, 1 - sigma, num_steps + 1)
    assert len(stub.calls) == num_steps
    for i, (s, t) in enumerate(stub.calls):
        assert s.shape == (2,) and t.shape == (2,)
        assert s[0].item() == pytest.approx(grid[i], abs=1e-6) and t[0].item() == pytest.approx(grid[i + 1], abs=1e-6)


@pytest.mark.parametrize("backend", ["dual", "jvp", "finite_difference"])
def test_fmm_lagrangian_loss_on_an_analytic_field(backend: str, seed: int) -> None:
    """v(x, s, t) = a·x + c·(1 + t) (Prop. 3.11 with every term in closed form).

    X = Φ_{t,s}(I_t) = I_t + (s − t)·v(X=I_t, time t) — note Φ_{t,s} calls the network as v(·, t, s);
    derivative term ∂_t Φ_{s,t}(X̄) = v(X̄, s, t) + (t − s)·c with X̄ = sg(X);
    reconstruction Φ_{s,t}(X) = X + (t − s)·v(X, s, t) compared with I_t.
    Gradients: the derivative term sees X̄ as a constant, the reconstruction term differentiates
    through X.
    """
    a, lam = 0.3, 0.5
    c = torch.randn(1, 2, 1, 1)
    stub = MapStub(a, c)
    method = FlowMapMatching(stub, reconstruction_weight=lam, derivative=backend, fd_step=1e-3)
    s = torch.rand(4) * 0.5
    t = s + torch.rand(4) * 0.5
    x0, x1 = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    I_t, I_dot = method.interpolant_I_t(t, x0, x1), method.interpolant_I_t_dot(t, x0, x1)
    loss, parts = method.lagrangian_loss(s, t, I_t, I_dot)
    loss.backward()
    grads = (stub.a.grad.clone(), stub.c.grad.clone())

    # the reference, written from the formulas, with its own parameters
    a_ref, c_ref = torch.tensor(a, requires_grad=True), c.clone().requires_grad_(True)
    sb, tb = s.reshape(-1, 1, 1, 1), t.reshape(-1, 1, 1, 1)
    X = I_t + (sb - tb) * (a_ref * I_t + c_ref * (1 + sb))
    X_bar = X.detach()
    d_ref = ((a_ref * X_bar + c_ref * (1 + tb) + (tb - sb) * c_ref - I_dot) ** 2).mean()
    r_ref = ((X + (tb - sb) * (a_ref * X + c_ref * (1 + tb)) - I_t) ** 2).mean()
    total = d_ref + lam * r_ref
    total.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if backend == "finite_difference" else dict(rtol=1e-5, atol=1e-6)
    msg = lambda m: f"seed {seed}, backend {backend}: {m}"  # noqa: E731
    torch.testing.assert_close(parts["derivative_loss"], d_ref.detach(), **tol, msg=msg)
    torch.testing.assert_close(parts["reconstruction_loss"], r_ref.detach(), **tol, msg=msg)
    torch.testing.assert_close(loss.detach(), total.detach(), **tol, msg=msg)
    torch.testing.assert_close(grads[0], a_ref.grad, **tol, msg=msg)
    torch.testing.assert_close(grads[1], c_ref.grad, **tol, msg=msg)


def test_fmm_compute_loss_metrics(seed: int) -> None:
    method = tiny_fmm(initial_gap=0.2, warmup_steps=10, reconstruction_weight=0.5, derivative="dual").train()
    x1 = torch.randn(3, 2, 8, 8)
    loss, metrics = method.compute_loss(x1)
    assert set(metrics) == {"loss", "s_mean", "t_mean", "delta_t_mean", "current_gap", "derivative_loss",
                            "reconstruction_loss"}
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
    assert loss.requires_grad and torch.isfinite(loss)
    assert metrics["loss"].item() == pytest.approx(
        metrics["derivative_loss"].item() + 0.5 * metrics["reconstruction_loss"].item(), rel=1e-6)
    mean_gap = metrics["t_mean"].item() - metrics["s_mean"].item()
    assert metrics["delta_t_mean"].item() == pytest.approx(mean_gap, abs=1e-6)
    assert metrics["current_gap"].item() == pytest.approx(0.2, abs=1e-7)  # gap of step 0
    assert 0 < metrics["delta_t_mean"].item() <= 0.2 + 1e-6, f"seed {seed}"


def test_fmm_finite_difference_refuses_dropout() -> None:
    """FD's doubled batch would draw two dropout masks and divide their difference by 2h: refused at
    construction (directly or from the config), for the blocks' dropout and for nn.Dropout."""
    with pytest.raises(ValueError, match=r"finite_difference.*dropout 0\.1"):
        FlowMapMatching(DualTimeUNet(UNet(**{**TINY, "dropout": 0.1}), 1000), derivative="finite_difference")
    stub = nn.Sequential(MapStub(0.0, torch.zeros(1)), nn.Dropout(0.25))
    with pytest.raises(ValueError, match=r"dropout 0\.25"):
        FlowMapMatching(stub, derivative="finite_difference")
    for derivative in ("dual", "jvp"):  # one shared mask: exact
        FlowMapMatching(DualTimeUNet(UNet(**{**TINY, "dropout": 0.1}), 1000), derivative=derivative)
    FlowMapMatching(DualTimeUNet(UNet(**TINY), 1000), derivative="finite_difference")

    from fastflow.config import load_config
    from fastflow.methods import create_method_from_config

    config_file = Path(__file__).resolve().parents[1] / "configs" / "fmm_digits.yaml"
    cfg = load_config(config_file, ["model.dropout=0.1", "flow_map_matching.derivative=finite_difference"])
    with pytest.raises(ValueError, match="model.dropout=0"):
        create_method_from_config(cfg)
