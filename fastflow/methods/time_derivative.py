"""∂_t v_θ(s, t, x): three interchangeable backends behind one function.

- ``jvp``: ``torch.func.jvp`` over the whole batch with tangent 1 for every t. Exact: samples are
  independent (GroupNorm and attention act per sample), so this equals the course's per-sample
  ``vmap(jvp)``. Runs in float32 outside autocast by default (``precision='float32'``), with the
  attention on its explicit-softmax path (SDPA has no forward-mode AD).
- ``finite_difference``: central difference (v(t + h) − v(t − h)) / 2h with both evaluations in
  ONE forward of the doubled batch — an ordinary forward, so it compiles, shards and uses every
  fused kernel. v itself is the mean of the two (error O(h²)). See docs/derivative.md for the
  error table that sets the default h. Like jvp it runs in float32 outside autocast by default
  (``precision='float32'``): in bf16 its error is ≥ 13% for every h (docs/derivative.md).
- ``dual``: explicit forward mode — every block propagates (primal, tangent) through the same
  code as the plain forward (fastflow.models.dual); plain autograd, so it compiles (fullgraph)
  and works under FSDP2, and fused kernels compute primal and tangent in one pass. It follows
  the surrounding autocast whatever ``precision`` says (its bf16 ∂_t v is off by ~3%, like bf16's v).

All backends return (v, ∂_t v) with gradients flowing through both (unless ``derivative_grad``
is False, which detaches ∂_t v — MeanFlow-style).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from fastflow import ops

BACKENDS = ("jvp", "finite_difference", "dual")
_WARNED = set()


def _autocast_off(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half types to float32; float32 and float64 are kept (float64 models are tested)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _uses_fused_kernels(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)
    unet = getattr(inner, "unet", inner)
    return bool(getattr(unet, "fused_kernels", False))


def _jvp_uses_reference(model: nn.Module, device: torch.device) -> bool:
    """Whether ``torch.func.jvp`` must run the reference ops instead of the model's fused kernels.

    The fused ops' eager ``autograd.Function`` forms carry forward-mode rules (their ``jvp`` runs the
    differentiable dual kernel, so a backward through ∂_t v runs the dual backward kernel). Two cases
    have none: under ``torch.compile`` (Dynamo refuses an ``autograd.Function`` with a custom ``jvp``;
    the traced operators have no forward-mode formula) and when the fused call resolves to the
    reference anyway. The fallback is announced once, in eager mode.
    """
    if not _uses_fused_kernels(model):
        return False
    if torch.compiler.is_compiling():
        return True
    if ops.fused_backend_for(device) != "reference":
        return False
    if "jvp-fused" not in _WARNED:
        _WARNED.add("jvp-fused")
        warnings.warn(
            "derivative=jvp: the fused ops resolve to the PyTorch reference on this device; torch.func.jvp "
            "runs the reference ops", RuntimeWarning, stacklevel=4,
        )
    return True


def jvp_derivative(model: Callable, x: Tensor, s: Tensor, t: Tensor, precision: str = "float32") -> Tuple[Tensor, Tensor]:
    """(v, ∂_t v) by ``torch.func.jvp`` of t ↦ model(x, s, t) with tangent ones.

    With ``fused_kernels`` the fused ops run (eagerly) with their forward-mode rules; under
    ``torch.compile`` they fall back to the reference, which has forward-mode AD everywhere.
    """
    reference = _jvp_uses_reference(model, x.device)
    ctx = _autocast_off(x.device.type) if precision == "float32" else contextlib.nullcontext()
    # reference_only(False) would switch an outer reference_only() off (the FLOP counter's): enter it only to force.
    force = ops.reference_only() if reference else contextlib.nullcontext()
    with ctx, ops.math_attention(), force:
        if precision == "float32":
            x, s, t = _at_least_float32(x), _at_least_float32(s), _at_least_float32(t)
        v, dv = torch.func.jvp(lambda tt: model(x, s, tt), (t,), (torch.ones_like(t),))
    return v, dv


def finite_difference_derivative(
    model: Callable, x: Tensor, s: Tensor, t: Tensor, h: float = 5e-5, precision: str = "float32"
) -> Tuple[Tensor, Tensor]:
    """(v, ∂_t v) ≈ ((v₊ + v₋)/2, (v₊ − v₋)/2h), v± = model(x, s, t ± h) in one doubled-batch forward.

    Error ≈ (ω·h)²/6 + ε·t/h + δ_v·‖v‖/(‖∂_t v‖·h), ω = num_timesteps (docs/derivative.md). With
    ``precision='float32'`` the forward runs outside autocast: under bf16 (δ_v ≈ 1e-2) no h gets
    ∂_t v closer than ~13%, in float32 h ≈ 5e-5 gives ~1e-3.
    """
    ctx = _autocast_off(x.device.type) if precision == "float32" else contextlib.nullcontext()
    with ctx:
        if precision == "float32":
            x, s, t = _at_least_float32(x), _at_least_float32(s), _at_least_float32(t)
        out = _at_least_float32(model(torch.cat([x, x]), torch.cat([s, s]), torch.cat([t + h, t - h])))
    v_plus, v_minus = out.chunk(2)
    return 0.5 * (v_plus + v_minus), (v_plus - v_minus) / (2.0 * h)


def dual_derivative(model: Callable, x: Tensor, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """(v, ∂_t v) from the model's explicit forward-mode pass with ṫ = 1."""
    v, dv = model(x, s, t, t_dot=torch.ones_like(t))
    return _at_least_float32(v), _at_least_float32(dv)


def _batch_times(time: Tensor, x: Tensor, name: str) -> Tensor:
    """A 0-d time expanded to (B,) (every backend needs one tangent entry per sample)."""
    if time.dim() == 0:
        return time.expand(x.shape[0]).clone()  # materialised: make_dual refuses overlapping memory
    if time.shape != (x.shape[0],):
        raise ValueError(f"time {name} has shape {tuple(time.shape)}; expected ({x.shape[0]},) for x of shape "
                         f"{tuple(x.shape)}, or a scalar")
    return time


def velocity_and_time_derivative(
    model: Callable,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    backend: str = "dual",
    *,
    fd_step: float = 5e-5,
    precision: str = "float32",
    derivative_grad: bool = True,
) -> Tuple[Tensor, Tensor]:
    """v_θ(s, t, x) and ∂_t v_θ(s, t, x) for a batch; x (B, C, H, W), s and t (B,) or scalars
    (one time for the whole batch)."""
    s, t = _batch_times(s, x, "s"), _batch_times(t, x, "t")
    if backend == "jvp":
        v, dv = jvp_derivative(model, x, s, t, precision)
    elif backend == "finite_difference":
        v, dv = finite_difference_derivative(model, x, s, t, fd_step, precision)
    elif backend == "dual":
        v, dv = dual_derivative(model, x, s, t)
    else:
        raise ValueError(f"unknown time-derivative backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not derivative_grad:
        dv = dv.detach()
    return v, dv
