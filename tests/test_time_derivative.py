"""∂_t v_θ(s, t, x) backends (jvp | finite_difference | dual): agreement, precision, gradients, training.

Every test draws a fresh seed (replay one with FASTFLOW_TEST_SEED=<n>); it is in every failure
message. Times are multiples of 1/1024 (and central-difference steps powers of two) so that
t·num_timesteps is exact in float32: the float32 and float64 models then see the same times, and the
float64 central difference is not polluted by the float32 rounding of the time.

The finite-difference error bound used here is the model in docs/derivative.md:
    err(h) ≤ (ω·h)²/3 + ε₃₂·max(t)/h + δ_v·‖v‖/(‖∂_t v‖·h),   ω = num_timesteps,
i.e. truncation of the top sinusoidal frequency (doubled for the harmonics the network makes),
rounding of t ± h and of t·num_timesteps in float32, and the forward's own rounding δ_v.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
import warnings
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import ops
from fastflow.config import Config
from fastflow.methods import FlowMapMatching
from fastflow.methods.time_derivative import BACKENDS, velocity_and_time_derivative
from fastflow.models import DualTimeUNet, UNet

NUM_TIMESTEPS = 1000
EPS32 = 2.0**-24
FD_STEP = 5e-5  # docs/derivative.md: the float32 optimum of the error table
TINY = dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            num_heads=2, num_groups=8)
BATCH = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP barriers cost 10×."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(image_size: int = 16, dropout: float = 0.0) -> DualTimeUNet:
    return DualTimeUNet(UNet(**TINY, image_size=image_size, dropout=dropout), NUM_TIMESTEPS)


def dyadic_times(batch: int) -> Tuple[Tensor, Tensor]:
    """s < t in (0, 1), multiples of 1/1024 (t ≥ 1/4, t − s ≤ 1/4)."""
    t = torch.randint(256, 1020, (batch,))
    s = t - torch.randint(1, 256, (batch,))
    return s.float() / 1024, t.float() / 1024


def inputs(batch: int = BATCH, image_size: int = 16) -> Tuple[Tensor, Tensor, Tensor]:
    s, t = dyadic_times(batch)
    return torch.randn(batch, 3, image_size, image_size), s, t


def rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def central_difference_f64(model64: torch.nn.Module, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """∂_t v in float64: central differences at h = 2⁻¹⁴, 2⁻¹⁵, 2⁻¹⁶, Richardson-extrapolated twice (O(h⁶)).

    Truncation alone is ≈ (ω·h)²/6 ≈ 6e-4 at h = 2⁻¹⁴ (ω = 1000: the time embedding's top
    frequency), too large for a 1e-10 check; the extrapolation removes the h² and h⁴ terms.
    """
    x, s, t = x.double(), s.double(), t.double()

    def diff(h: float) -> Tensor:
        with torch.no_grad():
            return (model64(x, s, t + h) - model64(x, s, t - h)) / (2 * h)

    d1, d2, d3 = (diff(2.0**-k) for k in (14, 15, 16))
    r1, r2 = (4 * d2 - d1) / 3, (4 * d3 - d2) / 3
    return (16 * r2 - r1) / 15


def course_vmap_jvp(model: torch.nn.Module, x: Tensor, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """The course's per-sample form: vmap over samples of jvp in t (bench/course_baseline.py)."""

    def per_sample(s_i: Tensor, t_i: Tensor, x_i: Tensor) -> Tuple[Tensor, Tensor]:
        fn = lambda tv: model(x_i.unsqueeze(0), s_i.unsqueeze(0), tv.unsqueeze(0)).squeeze(0)  # noqa: E731
        return torch.func.jvp(fn, (t_i,), (torch.ones_like(t_i),))

    with ops.math_attention():
        return torch.func.vmap(per_sample)(s, t, x)


def fd_error_bound(h: float, t: Tensor, v: Tensor, dv: Tensor, v_rounding: float) -> float:
    """docs/derivative.md: truncation (doubled) + time rounding + forward rounding."""
    ratio = (v.norm() / dv.norm()).item()
    return (NUM_TIMESTEPS * h) ** 2 / 3 + EPS32 * t.max().item() / h + v_rounding * ratio / h


def load_course_baseline():
    path = Path(__file__).resolve().parents[1] / "bench" / "course_baseline.py"
    spec = importlib.util.spec_from_file_location("course_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ ∂_t v itself
def test_dual_matches_jvp_and_float64_central_difference(seed: int) -> None:
    model = tiny_model()
    x, s, t = inputs()
    v_dual, dv_dual = velocity_and_time_derivative(model, x, s, t, "dual")
    v_jvp, dv_jvp = velocity_and_time_derivative(model, x, s, t, "jvp")
    assert v_dual.dtype == dv_dual.dtype == torch.float32
    assert rel(v_dual, v_jvp) < 1e-5, f"seed={seed}: v dual vs jvp {rel(v_dual, v_jvp):.2e}"
    assert rel(dv_dual, dv_jvp) < 1e-5, f"seed={seed}: ∂_t v dual vs jvp {rel(dv_dual, dv_jvp):.2e}"

    model64 = copy.deepcopy(model).double()
    x64, s64, t64 = x.double(), s.double(), t.double()
    v_dual64, dv_dual64 = velocity_and_time_derivative(model64, x64, s64, t64, "dual")
    v_jvp64, dv_jvp64 = velocity_and_time_derivative(model64, x64, s64, t64, "jvp")
    assert dv_dual64.dtype == dv_jvp64.dtype == torch.float64, f"seed={seed}: a backend dropped float64"
    assert rel(v_dual64, v_jvp64) < 1e-10, f"seed={seed}: float64 v dual vs jvp {rel(v_dual64, v_jvp64):.2e}"
    assert rel(dv_dual64, dv_jvp64) < 1e-10, f"seed={seed}: float64 ∂_t v dual vs jvp {rel(dv_dual64, dv_jvp64):.2e}"

    reference = central_difference_f64(model64, x, s, t)
    assert rel(dv_dual64, reference) < 1e-8, f"seed={seed}: float64 dual vs central difference {rel(dv_dual64, reference):.2e}"
    assert rel(dv_jvp64, reference) < 1e-8, f"seed={seed}: float64 jvp vs central difference {rel(dv_jvp64, reference):.2e}"
    # float32 against the float64 truth: rounding only.
    assert rel(dv_dual, reference) < 3e-5, f"seed={seed}: float32 dual vs float64 {rel(dv_dual, reference):.2e}"
    assert rel(dv_jvp, reference) < 3e-5, f"seed={seed}: float32 jvp vs float64 {rel(dv_jvp, reference):.2e}"


def test_batched_jvp_matches_per_sample_vmap_jvp(seed: int) -> None:
    model = tiny_model()
    x, s, t = inputs()
    v_batched, dv_batched = velocity_and_time_derivative(model, x, s, t, "jvp")
    v_vmap, dv_vmap = course_vmap_jvp(model, x, s, t)
    assert rel(v_batched, v_vmap) < 1e-5, f"seed={seed}: v batched vs vmap {rel(v_batched, v_vmap):.2e}"
    assert rel(dv_batched, dv_vmap) < 1e-5, f"seed={seed}: ∂_t v batched vs vmap {rel(dv_batched, dv_vmap):.2e}"
    reference = central_difference_f64(copy.deepcopy(model).double(), x, s, t)
    assert rel(dv_vmap, reference) < 3e-5, f"seed={seed}: vmap jvp vs float64 {rel(dv_vmap, reference):.2e}"
    assert rel(dv_batched, reference) < 3e-5, f"seed={seed}: batched jvp vs float64 {rel(dv_batched, reference):.2e}"


def test_finite_difference_within_error_model(seed: int) -> None:
    model = tiny_model()
    x, s, t = inputs()
    model64 = copy.deepcopy(model).double()
    v64, dv64 = velocity_and_time_derivative(model64, x.double(), s.double(), t.double(), "dual")
    v32, _ = velocity_and_time_derivative(model, x, s, t, "dual")
    v_rounding = max(rel(v32, v64), EPS32)
    errors = {}
    for h in (1e-3, 1e-4, FD_STEP):
        v_fd, dv_fd = velocity_and_time_derivative(model, x, s, t, "finite_difference", fd_step=h)
        errors[h] = rel(dv_fd, dv64)
        bound = fd_error_bound(h, t, v64, dv64, v_rounding)
        assert errors[h] < bound, f"seed={seed}: FD h={h:g}: error {errors[h]:.2e} > model bound {bound:.2e}"
        # v = (v₊ + v₋)/2 is off by ≈ h²·|∂²_t v|/2 ≤ (ω·h)·h·|∂_t v|/2.
        v_bound = NUM_TIMESTEPS * h * h * dv64.norm().item() / v64.norm().item() + 2 * v_rounding
        assert rel(v_fd, v64) < v_bound, f"seed={seed}: FD h={h:g}: v error {rel(v_fd, v64):.2e} > {v_bound:.2e}"
    assert errors[FD_STEP] < 1e-2, f"seed={seed}: FD at the chosen h={FD_STEP:g}: {errors[FD_STEP]:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_times_are_one_time_for_the_batch(seed: int, backend: str) -> None:
    """0-d s and t (one time pair for the whole batch) give what the (B,) times give; dual and
    finite_difference used to fail on them (IndexError / cat of a 0-d tensor)."""
    model = tiny_model()
    x = torch.randn(3, 3, 16, 16)
    s, t = torch.rand(()) * 0.5, 0.5 + torch.rand(()) * 0.5
    v, dv = velocity_and_time_derivative(model, x, s, t, backend, fd_step=FD_STEP)
    v_b, dv_b = velocity_and_time_derivative(model, x, s.expand(3).clone(), t.expand(3).clone(), backend,
                                             fd_step=FD_STEP)
    assert torch.equal(v, v_b) and torch.equal(dv, dv_b), f"seed={seed}: {backend} scalar vs batched times differ"
    with pytest.raises(ValueError, match=r"time t has shape \(2,\); expected \(3,\)"):
        velocity_and_time_derivative(model, x, s, torch.zeros(2), backend)


# ------------------------------------------------------------------------------ plain path
def test_dual_primal_is_bitwise_the_plain_forward(seed: int) -> None:
    model = tiny_model()
    x, s, t = inputs()
    with torch.no_grad(), ops.math_attention():
        plain = model(x, s, t)
        v, _ = model(x, s, t, t_dot=torch.ones_like(t))
    assert torch.equal(v, plain), f"seed={seed}: max |Δ| {(v - plain).abs().max().item():.2e}"


def test_dual_primal_matches_the_sdpa_forward(seed: int) -> None:
    model = tiny_model()
    x, s, t = inputs()
    with torch.no_grad():
        plain = model(x, s, t)  # scaled_dot_product_attention
        v, _ = velocity_and_time_derivative(model, x, s, t, "dual")
    assert rel(v, plain) < 1e-5, f"seed={seed}: dual primal vs SDPA forward {rel(v, plain):.2e}"


# ------------------------------------------------------------------------------ the FMM loss
def _fmm_batch(batch: int = BATCH, image_size: int = 16):
    s, t = dyadic_times(batch)
    x0, x1 = torch.randn(batch, 3, image_size, image_size), torch.randn(batch, 3, image_size, image_size)
    return s, t, FlowMapMatching.interpolant_I_t(t, x0, x1), FlowMapMatching.interpolant_I_t_dot(t, x0, x1)


def _loss_and_grads(fmm: FlowMapMatching, batch, backend: str, **settings) -> Tuple[Tensor, Dict, Tensor]:
    fmm.derivative = backend
    for key, value in settings.items():
        setattr(fmm, key, value)
    fmm.zero_grad(set_to_none=True)
    loss, parts = fmm.lagrangian_loss(*batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in fmm.parameters()])
    return loss.detach(), parts, grads


def test_lagrangian_loss_and_gradients_agree_across_backends(seed: int) -> None:
    fmm = FlowMapMatching(tiny_model())
    batch = _fmm_batch()
    results = {b: _loss_and_grads(fmm, batch, b, fd_step=FD_STEP) for b in BACKENDS}
    loss_jvp, parts_jvp, grad_jvp = results["jvp"]
    loss_dual, parts_dual, grad_dual = results["dual"]
    assert rel(loss_dual, loss_jvp) < 1e-5, f"seed={seed}: loss dual vs jvp {rel(loss_dual, loss_jvp):.2e}"
    assert rel(grad_dual, grad_jvp) < 1e-5, f"seed={seed}: gradients dual vs jvp {rel(grad_dual, grad_jvp):.2e}"
    for backend in BACKENDS:  # the reconstruction term does not involve ∂_t v
        assert torch.equal(results[backend][1]["reconstruction_loss"], parts_jvp["reconstruction_loss"]), (
            f"seed={seed}: reconstruction loss of {backend} differs")

    # FD: its ∂_t v error enters only through (t − s)·∂_t v; bound the loss and gradient change by it.
    loss_fd, parts_fd, grad_fd = results["finite_difference"]
    s, t, I_t, _ = batch
    with torch.no_grad():
        X = fmm.flow_map(t, s, I_t)
        v64, dv64 = velocity_and_time_derivative(copy.deepcopy(fmm.model).double(), X.double(), s.double(), t.double(), "dual")
        v32, _ = velocity_and_time_derivative(fmm.model, X, s, t, "dual")
    e_dv = fd_error_bound(FD_STEP, t, v64, dv64, max(rel(v32, v64), EPS32))
    # |Δ mse| ≤ (2‖r‖·a + a²)/N with a = ‖(t − s)·Δ∂_t v‖ ≤ max(t − s)·e·‖∂_t v‖ (+ the v error, smaller).
    a = (t - s).max().item() * e_dv * dv64.norm().item() * 2
    residual = math.sqrt(parts_jvp["derivative_loss"].item() * I_t.numel())
    loss_bound = (2 * residual * a + a * a) / I_t.numel()
    assert abs(loss_fd - loss_jvp).item() < loss_bound, (
        f"seed={seed}: FD loss off by {abs(loss_fd - loss_jvp).item():.2e} > bound {loss_bound:.2e}")
    assert rel(grad_fd, grad_jvp) < 10 * e_dv, (
        f"seed={seed}: FD gradients off by {rel(grad_fd, grad_jvp):.2e} > 10× ∂_t v bound {e_dv:.2e}")


@pytest.mark.parametrize("backend", [
    pytest.param("cpp", id="cpp-float64"),
    pytest.param("triton", id="triton-float32", marks=[pytest.mark.slow, pytest.mark.skipif(  # ~90 s interpreted
        not ops.available_backends()["triton"], reason="triton not importable")]),
])
def test_jvp_runs_the_fused_kernels_forward_mode_rules(seed: int, backend: str, monkeypatch) -> None:
    """derivative=jvp with fused_kernels: torch.func.jvp runs the fused ops (their jvp rules call the
    dual kernels) and FMM's loss and gradients equal those of the reference dual backend."""
    monkeypatch.setenv("FASTFLOW_OPS_BACKEND", backend)
    table = ops._load_backend(backend)
    if table is None:
        pytest.skip(f"{backend} ops unavailable")
    calls = {name: 0 for name in table}
    for name, fn in list(table.items()):
        def counted(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(table, name, counted)
    dtype, tol = (torch.float64, 1e-10) if backend == "cpp" else (torch.float32, 1e-4)
    image_size = 16 if backend == "cpp" else 8  # the Triton interpreter is slow
    fmm = FlowMapMatching(tiny_model(image_size)).to(dtype)
    batch = tuple(b.to(dtype) for b in _fmm_batch(image_size=image_size))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fmm.model.unet.set_fused_kernels(True)
        loss_fused, _, grad_fused = _loss_and_grads(fmm, batch, "jvp")
    assert not [w for w in record if "reference" in str(w.message)], [str(w.message) for w in record]
    assert calls["attention"] > 0 and calls["gn_film_silu"] > 0, calls  # the jvp rules call the *_dual ops' kernels
    fmm.model.unet.set_fused_kernels(False)
    loss_ref, _, grad_ref = _loss_and_grads(fmm, batch, "dual")
    assert rel(loss_fused, loss_ref) < tol, f"seed={seed}: {backend} jvp loss vs reference dual {rel(loss_fused, loss_ref):.2e}"
    assert rel(grad_fused, grad_ref) < tol, f"seed={seed}: {backend} jvp gradients vs reference dual {rel(grad_fused, grad_ref):.2e}"


def test_jvp_says_when_fused_ops_fall_back_to_the_reference(seed: int, monkeypatch) -> None:
    from fastflow.methods import time_derivative

    monkeypatch.setenv("FASTFLOW_OPS_BACKEND", "reference")
    monkeypatch.setattr(time_derivative, "_WARNED", set())
    model = tiny_model(8)
    model.unet.set_fused_kernels(True)
    x, s, t = inputs(image_size=8)
    with pytest.warns(RuntimeWarning, match="resolve to the PyTorch reference"):
        v, dv = velocity_and_time_derivative(model, x, s, t, "jvp")
    model.unet.set_fused_kernels(False)
    v_ref, dv_ref = velocity_and_time_derivative(model, x, s, t, "dual")
    assert rel(dv, dv_ref) < 1e-5, f"seed={seed}: {rel(dv, dv_ref):.2e}"


def test_course_baseline_matches_package_loss(seed: int) -> None:
    baseline_module = load_course_baseline()
    fmm = FlowMapMatching(tiny_model())
    baseline = baseline_module.CourseFlowMapMatching(fmm.model, reconstruction_weight=fmm.reconstruction_weight)
    batch = _fmm_batch()
    loss, _, grads = _loss_and_grads(fmm, batch, "jvp")
    fmm.zero_grad(set_to_none=True)
    loss_course, _ = baseline.lagrangian_loss(*batch)
    loss_course.backward()
    grads_course = torch.cat([p.grad.flatten() for p in fmm.parameters()])
    assert rel(loss, loss_course) < 1e-5, f"seed={seed}: loss vs course {rel(loss, loss_course):.2e}"
    assert rel(grads, grads_course) < 1e-5, f"seed={seed}: gradients vs course {rel(grads, grads_course):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_derivative_grad_false_detaches_only_the_time_derivative(seed: int, backend: str) -> None:
    fmm = FlowMapMatching(tiny_model(), derivative=backend, fd_step=FD_STEP)
    batch = _fmm_batch()
    _, _, grad_true = _loss_and_grads(fmm, batch, backend, derivative_grad=True)
    loss_false, _, grad_false = _loss_and_grads(fmm, batch, backend, derivative_grad=False)
    assert rel(grad_false, grad_true) > 1e-3, f"seed={seed}: derivative_grad=False did not change the gradients"

    # The same loss written out with ∂_t v detached by hand.
    s, t, I_t, I_t_dot = batch
    fmm.zero_grad(set_to_none=True)
    delta = (t - s).view(-1, 1, 1, 1)
    X = fmm.flow_map(t, s, I_t)
    v, dv = velocity_and_time_derivative(fmm.model, X.detach(), s, t, backend, fd_step=FD_STEP)
    derivative_loss = F.mse_loss(v + delta * dv.detach(), I_t_dot)
    reconstruction_loss = F.mse_loss(X + delta * fmm.model(X, s, t), I_t)
    loss = derivative_loss + fmm.reconstruction_weight * reconstruction_loss
    loss.backward()
    grad_manual = torch.cat([p.grad.flatten() for p in fmm.parameters()])
    assert rel(loss.detach(), loss_false) < 1e-6, f"seed={seed}: loss {rel(loss.detach(), loss_false):.2e}"
    assert rel(grad_false, grad_manual) < 1e-6, f"seed={seed}: gradients {rel(grad_false, grad_manual):.2e}"


# ------------------------------------------------------------------------------ training
def _train_curve(backend: str, state: Dict, data: Tensor, seed: int, steps: int) -> Tensor:
    model = tiny_model(image_size=data.shape[-1])
    model.load_state_dict(state)
    fmm = FlowMapMatching(model, derivative=backend, fd_step=FD_STEP, annealing_schedule="none")
    fmm.train()
    optimizer = torch.optim.AdamW(fmm.parameters(), lr=1e-3)
    torch.manual_seed(seed + 1)  # the same noise and (s, t) for every backend
    losses = []
    for _ in range(steps):
        loss, _ = fmm.compute_loss(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fmm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.slow
def test_backends_train_to_the_same_loss_curve(seed: int) -> None:
    steps = 30
    state = copy.deepcopy(tiny_model(image_size=8).state_dict())
    data = torch.rand(4, 3, 8, 8) * 2 - 1
    curves = {b: _train_curve(b, state, data, seed, steps) for b in BACKENDS}
    jvp = curves["jvp"]
    assert jvp[-10:].mean() < 0.8 * jvp[:5].mean(), f"seed={seed}: loss did not fall: {jvp.tolist()}"
    dual_gap = ((curves["dual"] - jvp).abs() / jvp).max().item()
    fd_gap = ((curves["finite_difference"] - jvp).abs() / jvp).max().item()
    assert dual_gap < 1e-3, f"seed={seed}: dual vs jvp loss curves differ by {dual_gap:.2e}"
    assert fd_gap < 2e-2, f"seed={seed}: finite_difference vs jvp loss curves differ by {fd_gap:.2e}"


# ------------------------------------------------------------------------------ dropout
def test_jvp_and_dual_share_the_dropout_mask_in_train_mode(seed: int) -> None:
    model = tiny_model(dropout=0.3).train()
    x, s, t = inputs()
    torch.manual_seed(seed + 1)
    with ops.math_attention():
        plain = model(x, s, t)
    torch.manual_seed(seed + 1)
    v_jvp, dv_jvp = velocity_and_time_derivative(model, x, s, t, "jvp")
    torch.manual_seed(seed + 1)
    v_dual, dv_dual = velocity_and_time_derivative(model, x, s, t, "dual")
    torch.manual_seed(seed + 2)
    v_other = model(x, s, t)
    assert rel(v_other, plain) > 1e-3, f"seed={seed}: dropout had no effect"
    assert rel(v_jvp, plain) < 1e-5, f"seed={seed}: jvp primal drew another mask ({rel(v_jvp, plain):.2e})"
    assert rel(v_dual, v_jvp) < 1e-5 and rel(dv_dual, dv_jvp) < 1e-5, f"seed={seed}: dual vs jvp under dropout"

    # The tangent uses the primal's mask: compare with a float64 central difference whose every
    # evaluation re-draws the same masks.
    model64 = copy.deepcopy(model).double()

    class SameMask(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model64

        def forward(self, *args, **kwargs):
            torch.manual_seed(seed + 3)
            return self.inner(*args, **kwargs)

    reference = central_difference_f64(SameMask(), x, s, t)
    torch.manual_seed(seed + 3)
    _, dv64 = velocity_and_time_derivative(model64, x.double(), s.double(), t.double(), "jvp")
    assert rel(dv64, reference) < 1e-8, f"seed={seed}: float64 jvp under dropout vs central difference {rel(dv64, reference):.2e}"


def test_from_config_refuses_finite_difference_with_dropout() -> None:
    config = Config()
    config.model.dropout = 0.1
    config.flow_map_matching.derivative = "finite_difference"
    with pytest.raises(ValueError, match=r"flow_map_matching\.derivative.*model\.dropout"):
        FlowMapMatching.from_config(tiny_model(), config)
    for backend in ("jvp", "dual"):
        config.flow_map_matching.derivative = backend
        assert FlowMapMatching.from_config(tiny_model(), config).derivative == backend
    config.model.dropout = 0.0
    config.flow_map_matching.derivative = "finite_difference"
    assert FlowMapMatching.from_config(tiny_model(), config).derivative == "finite_difference"


def test_from_config_warns_about_half_precision_finite_differences() -> None:
    """finite_difference under bf16/fp16 autocast is >= 13% off at every h: said at config time."""
    config = Config()
    config.model.dropout = 0.0
    config.flow_map_matching.derivative = "finite_difference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        FlowMapMatching.from_config(tiny_model(), config)  # derivative_precision=float32: quiet
        config.flow_map_matching.derivative_precision = "autocast"
        config.infrastructure.precision = "fp32"
        FlowMapMatching.from_config(tiny_model(), config)  # no half precision: quiet
    for precision in ("bf16", "fp16"):
        config.infrastructure.precision = precision
        with pytest.warns(RuntimeWarning, match=rf"finite_difference with derivative_precision=autocast.*{precision}"):
            FlowMapMatching.from_config(tiny_model(), config)


# ------------------------------------------------------------------------------ compile
@pytest.mark.slow
@pytest.mark.compile
def test_dual_lagrangian_loss_compiles_fullgraph(seed: int) -> None:
    torch._dynamo.reset()
    fmm = FlowMapMatching(tiny_model(image_size=8), derivative="dual")
    batch = _fmm_batch(image_size=8)
    loss_eager, _, grad_eager = _loss_and_grads(fmm, batch, "dual")
    compiled = torch.compile(lambda *b: fmm.lagrangian_loss(*b)[0], fullgraph=True)
    fmm.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = compiled(*batch)
    loss.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in fmm.parameters()])
    assert rel(loss.detach(), loss_eager) < 1e-5, f"seed={seed}: compiled loss {rel(loss.detach(), loss_eager):.2e}"
    assert rel(grad, grad_eager) < 1e-4, f"seed={seed}: compiled gradients {rel(grad, grad_eager):.2e} ({seconds:.0f} s)"
