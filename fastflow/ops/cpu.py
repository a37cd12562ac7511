"""C++ CPU implementations of fastflow's fused ops (``csrc/``), wrapped for autograd,
``torch.compile`` and ``torch.func.jvp``.

Specification: :mod:`fastflow.ops.reference`. The compiled extension ``fastflow._C`` registers eight
operators in the ``fastflow_cpp`` namespace (schemas in ``csrc/ops.cpp``):

- ``gn_film_silu_fwd / _bwd / _dual_fwd / _dual_bwd``  (``csrc/gn_film_silu.cpp``)
- ``attention_fwd / _bwd / _dual_fwd / _dual_bwd``    (``csrc/attention.cpp``)

This module gives them fake (meta) kernels and registers autograd formulas on the four forwards
with :mod:`torch.library`, so ``torch.compile(fullgraph=True)`` traces them without graph breaks
and ``backward`` works through both the primal and the tangent outputs of the dual forms (FMM's
loss flows through the tangent). Eagerly, the plain ops go through ``autograd.Function`` classes
whose ``jvp`` calls the differentiable dual operator, so ``torch.func.jvp`` and
``torch.autograd.forward_ad`` work through them and jvp-then-backward differentiates through the
tangent. Those Functions are used only where forward-mode AD or a ``torch.func`` transform is active
(checked per call); plain eager calls and ``torch.compile`` call the operators directly (Dynamo
refuses an ``autograd.Function`` with a custom ``jvp``, so there is no forward-mode AD under
compile). The backward operators are not differentiable themselves: a double backward raises a
RuntimeError naming the op (:mod:`fastflow.ops.autograd_guard`) instead of returning wrong gradients.

``is_available()`` is False, without raising, when the extension is not built or cannot load.
float16/bfloat16 inputs are computed in float32 inside the kernels; float64 stays float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from fastflow.ops.autograd_guard import once_differentiable
from fastflow.ops.reference import is_channels_last, normalized_groups

__all__ = [
    "is_available",
    "unavailable_reason",
    "build_info",
    "gn_film_silu_cpp",
    "gn_film_silu_dual_cpp",
    "attention_cpp",
    "attention_dual_cpp",
    "GNFilmSiLUFunction",
    "GNFilmSiLUDualFunction",
    "AttentionFunction",
    "AttentionDualFunction",
]

_NAMESPACE = "fastflow_cpp"

try:
    from fastflow import _C  # noqa: F401  (loading the library registers the fastflow_cpp ops)

    _LOAD_ERROR: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def is_available() -> bool:
    """True when the compiled extension loaded and its operators are registered."""
    return _C is not None and _LOAD_ERROR is None


def unavailable_reason() -> Optional[str]:
    """Why :func:`is_available` is False (None when it is True)."""
    return _LOAD_ERROR


def build_info() -> str:
    """ISA clone and GEMM backend the kernels use on this machine, e.g. for benchmark records."""
    if not is_available():
        return f"unavailable ({_LOAD_ERROR})"
    return torch.ops.fastflow_cpp.build_info()


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


_peek_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _use_function() -> bool:
    """Whether an eager call must go through the ``autograd.Function`` wrappers.

    They are needed inside ``torch.func`` transforms (jvp rule; functorch-compatible backward) and
    inside a ``torch.autograd.forward_ad.dual_level``. Elsewhere the operator is called directly: its
    ``register_autograd`` formula gives the same backward with ~0.1 ms less Python per call.
    """
    if _peek_functorch is None:  # unknown torch internals: always take the general path
        return True
    return _fwad._current_level >= 0 or _peek_functorch() is not None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and keep statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Input checks (ValueError, like the reference; also run on fake tensors under torch.compile)
# ----------------------------------------------------------------------------------------------


def _check_gn(x: Tensor, groups: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"gn_film_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if groups <= 0 or x.shape[1] % groups != 0:
        raise ValueError(f"gn_film_silu: channels={x.shape[1]} not divisible by groups={groups}")


def _check_attention(q: Tensor, k: Tensor, v: Tensor) -> None:
    if (
        q.dim() != 4
        or k.dim() != 4
        or v.dim() != 4
        or k.shape[:2] != q.shape[:2]
        or k.shape[3] != q.shape[3]
        or v.shape[:3] != k.shape[:3]
    ):
        raise ValueError(
            f"attention: expected q, k, v of shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )


def _grad_like(grad: Tensor, p: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    """Reduce an (N, C) / (C,) kernel gradient to parameter ``p``'s shape and dtype; (N, C, 1, 1)
    FiLM parameters keep their batch dimension."""
    if p is None or not needed:
        return None
    if grad.dim() == 2 and (p.dim() == 1 or p.shape[0] == 1):  # (C,), (1, C) or (1, C, 1, 1): shared
        grad = grad.sum(0)
    return grad.reshape(p.shape).to(p.dtype)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd formulas for the fastflow_cpp operators
# ----------------------------------------------------------------------------------------------

if is_available():
    _ops = torch.ops.fastflow_cpp

    def _nc(x: Tensor) -> Tensor:
        return x.new_empty((x.shape[0], x.shape[1]), dtype=_accumulation_dtype(x.dtype))

    def _c(x: Tensor) -> Tensor:
        return x.new_empty((x.shape[1],), dtype=_accumulation_dtype(x.dtype))

    def _like(x: Tensor) -> Tensor:
        """x's shape, dtype and layout class: channels_last for a 4-D channels_last x (the C++
        ops return that, csrc/gn_film_silu.cpp ``in_layout_of``), else contiguous."""
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    def _gn_fwd_fake(x, weight, bias, scale, shift, groups, eps, silu):
        stats = x.new_empty((x.shape[0], groups), dtype=_accumulation_dtype(x.dtype))
        return _like(x), stats, stats.new_empty(stats.shape)

    def _gn_bwd_fake(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, silu):
        return _like(x), _c(x), _c(x), _nc(x), _nc(x)

    def _gn_dual_fwd_fake(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu):
        stats = x.new_empty((x.shape[0], groups, 4), dtype=_accumulation_dtype(x.dtype))
        return _like(x), _like(x), stats

    def _gn_dual_bwd_fake(grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift,
                          shift_dot, stats, groups, silu):
        return (_like(x), _like(x), _c(x), _c(x), _nc(x), _nc(x), _nc(x), _nc(x))

    def _attention_fwd_fake(q, k, v):
        b, h, lq, _ = q.shape
        lse = q.new_empty((b, h, lq), dtype=_accumulation_dtype(q.dtype))
        return q.new_empty((b, h, lq, v.shape[-1])), lse

    def _attention_bwd_fake(grad_o, q, k, v, lse):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attention_dual_fwd_fake(q, q_dot, k, k_dot, v, v_dot):
        o, lse = _attention_fwd_fake(q, k, v)
        return o, o.new_empty(o.shape), lse

    def _attention_dual_bwd_fake(grad_o, grad_o_dot, q, q_dot, k, k_dot, v, v_dot, lse):
        return (q.new_empty(q.shape), q.new_empty(q.shape), k.new_empty(k.shape),
                k.new_empty(k.shape), v.new_empty(v.shape), v.new_empty(v.shape))

    # -- GroupNorm+FiLM+SiLU ------------------------------------------------------------------

    def _gn_plain_backward(saved, grad_y: Optional[Tensor], needs, groups: int, silu: bool):
        """Gradients for (x, weight, bias, scale, shift, groups, eps, silu)."""
        if grad_y is None:
            return (None,) * 8
        x, weight, bias, scale, shift, mean, rstd = saved
        dx, dweight, dbias, dscale, dshift = _ops.gn_film_silu_bwd(
            grad_y, x, weight, bias, scale, shift, mean, rstd, groups, silu
        )
        return (
            dx if needs[0] else None,
            _grad_like(dweight, weight, needs[1]),
            _grad_like(dbias, bias, needs[2]),
            _grad_like(dscale, scale, needs[3]),
            _grad_like(dshift, shift, needs[4]),
            None,
            None,
            None,
        )

    def _gn_fwd_setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.silu = groups, silu

    @once_differentiable("gn_film_silu")
    def _gn_fwd_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        return _gn_plain_backward(ctx.saved_tensors, grad_y, ctx.needs_input_grad, ctx.groups, ctx.silu)

    def _gn_dual_setup_context(ctx, inputs, output):
        x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, output[2])
        ctx.groups, ctx.silu = groups, silu

    @once_differentiable("gn_film_silu_dual")
    def _gn_dual_backward(ctx, grad_y, grad_y_dot, _grad_stats):
        if grad_y is None and grad_y_dot is None:
            return (None,) * 11
        x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dx_dot, dweight, dbias, dscale, dscale_dot, dshift, dshift_dot = _ops.gn_film_silu_dual_bwd(
            grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, stats,
            ctx.groups, ctx.silu,
        )
        return (
            dx if needs[0] else None,
            dx_dot if (x_dot is not None and needs[1]) else None,
            _grad_like(dweight, weight, needs[2]),
            _grad_like(dbias, bias, needs[3]),
            _grad_like(dscale, scale, needs[4]),
            _grad_like(dscale_dot, scale_dot, needs[5]),
            _grad_like(dshift, shift, needs[6]),
            _grad_like(dshift_dot, shift_dot, needs[7]),
            None,
            None,
            None,
        )

    # -- Attention ----------------------------------------------------------------------------

    def _attention_fwd_setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, output[1])

    @once_differentiable("attention")
    def _attention_fwd_backward(ctx, grad_o, _grad_lse):
        if grad_o is None:
            return None, None, None
        q, k, v, lse = ctx.saved_tensors
        dq, dk, dv = _ops.attention_bwd(grad_o, q, k, v, lse)
        needs = ctx.needs_input_grad
        return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None

    def _attention_dual_setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, output[2])

    @once_differentiable("attention_dual")
    def _attention_dual_backward(ctx, grad_o, grad_o_dot, _grad_lse):
        if grad_o is None and grad_o_dot is None:
            return (None,) * 6
        q, q_dot, k, k_dot, v, v_dot, lse = ctx.saved_tensors
        grads = _ops.attention_dual_bwd(grad_o, grad_o_dot, q, q_dot, k, k_dot, v, v_dot, lse)
        inputs = (q, q_dot, k, k_dot, v, v_dot)
        return tuple(
            g if (t is not None and need) else None
            for g, t, need in zip(grads, inputs, ctx.needs_input_grad)
        )

    def _register() -> Optional[str]:
        """Fake kernels + autograd on the operators; returns an error string if torch lacks the API."""
        register_fake = getattr(torch.library, "register_fake", None)
        register_autograd = getattr(torch.library, "register_autograd", None)
        if register_fake is None or register_autograd is None:
            return "torch.library.register_fake/register_autograd missing (torch < 2.4)"
        fakes = {
            "gn_film_silu_fwd": _gn_fwd_fake,
            "gn_film_silu_bwd": _gn_bwd_fake,
            "gn_film_silu_dual_fwd": _gn_dual_fwd_fake,
            "gn_film_silu_dual_bwd": _gn_dual_bwd_fake,
            "attention_fwd": _attention_fwd_fake,
            "attention_bwd": _attention_bwd_fake,
            "attention_dual_fwd": _attention_dual_fwd_fake,
            "attention_dual_bwd": _attention_dual_bwd_fake,
        }
        for name, fake in fakes.items():
            register_fake(f"{_NAMESPACE}::{name}", fake)
        autograd = {
            "gn_film_silu_fwd": (_gn_fwd_backward, _gn_fwd_setup_context),
            "gn_film_silu_dual_fwd": (_gn_dual_backward, _gn_dual_setup_context),
            "attention_fwd": (_attention_fwd_backward, _attention_fwd_setup_context),
            "attention_dual_fwd": (_attention_dual_backward, _attention_dual_setup_context),
        }
        for name, (backward, setup_context) in autograd.items():
            register_autograd(f"{_NAMESPACE}::{name}", backward, setup_context=setup_context)
        return None

    try:
        _REGISTRATION_ERROR = _register()
    except RuntimeError as exc:  # e.g. registered twice (module imported under two names)
        _REGISTRATION_ERROR = f"registering fake/autograd kernels failed: {exc}"
    if _REGISTRATION_ERROR is not None:
        _C, _LOAD_ERROR = None, _REGISTRATION_ERROR


# ----------------------------------------------------------------------------------------------
# autograd.Function wrappers of the plain ops (eager: backward + forward-mode jvp)
# ----------------------------------------------------------------------------------------------


def _param_tangent_term(x, weight_dot, bias_dot, scale, groups, eps):
    """(n̂·γ̇ + β̇)·(1 + s): the part of ż from weight/bias tangents (PyTorch, O(N·C·HW)). n̂ is
    recomputed from x (not from the op's non-differentiable saved statistics), so a backward
    through ẏ sees its dependence on x."""
    channels = x.shape[1]
    acc = _accumulation_dtype(x.dtype)
    view = (1, channels) + (1,) * (x.dim() - 2)
    film_view = (-1, channels) + (1,) * (x.dim() - 2)
    normed = normalized_groups(x.to(acc), groups, eps)
    term = torch.zeros((), dtype=acc)
    if weight_dot is not None:
        term = term + normed * weight_dot.to(acc).reshape(view)
    if bias_dot is not None:
        term = term + bias_dot.to(acc).reshape(view)
    if scale is not None:
        term = term * (1 + scale.to(acc).reshape(film_view))
    return term.expand(x.shape)


class GNFilmSiLUFunction(torch.autograd.Function):
    """The plain op with the C++ backward and a C++-backed ``jvp`` (eager mode).

    ``apply(x, weight, bias, scale, shift, groups, eps, silu) -> (y, mean, rstd)``; mean and rstd
    are non-differentiable statistics.
    """

    @staticmethod
    def forward(x, weight, bias, scale, shift, groups, eps, silu):
        return torch.ops.fastflow_cpp.gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, silu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.save_for_forward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.eps, ctx.silu = groups, eps, silu

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        return _gn_plain_backward(ctx.saved_tensors, grad_y, ctx.needs_input_grad, ctx.groups, ctx.silu)

    @staticmethod
    def jvp(ctx, x_dot, weight_dot, bias_dot, scale_dot, shift_dot, *_):
        """ẏ from the differentiable dual operator (so backward through ẏ works)."""
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        groups, eps, silu = ctx.groups, ctx.eps, ctx.silu
        y_dot = None
        if x_dot is not None or scale_dot is not None or shift_dot is not None:
            _, y_dot, _ = torch.ops.fastflow_cpp.gn_film_silu_dual_fwd(
                x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu
            )
        if weight_dot is not None or bias_dot is not None:
            extra = _param_tangent_term(x, weight_dot, bias_dot, scale, groups, eps)
            if silu:
                z = torch.ops.fastflow_cpp.gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, False)[0]
                z = z.to(extra.dtype)
                sig = torch.sigmoid(z)
                extra = extra * (sig * (1 + z * (1 - sig)))
            y_dot = extra.to(x.dtype) if y_dot is None else y_dot + extra.to(x.dtype)
        if y_dot is None:
            y_dot = torch.zeros_like(x)
        return y_dot, None, None


class GNFilmSiLUDualFunction(torch.autograd.Function):
    """The dual op as an ``autograd.Function`` (eager), so ``torch.func.grad``/``vjp`` work through it.

    torch.library's ``register_autograd`` wrapper lacks ``setup_context`` support for functorch
    transforms; plain ``backward`` works either way. ``apply(...) -> (y, ẏ, stats)``.
    """

    @staticmethod
    def forward(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu):
        return torch.ops.fastflow_cpp.gn_film_silu_dual_fwd(
            x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _gn_dual_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y, grad_y_dot, _grad_stats):
        return _gn_dual_backward(ctx, grad_y, grad_y_dot, _grad_stats)


class AttentionFunction(torch.autograd.Function):
    """Plain attention with the C++ backward and a C++-backed ``jvp`` (eager mode).

    ``apply(q, k, v) -> (o, lse)``; lse (row log-sum-exp) is non-differentiable.
    """

    @staticmethod
    def forward(q, k, v):
        return torch.ops.fastflow_cpp.attention_fwd(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, output[1])
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        return _attention_fwd_backward(ctx, grad_o, _grad_lse)

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot):
        q, k, v = ctx.saved_tensors
        if q_dot is None and k_dot is None and v_dot is None:
            return torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype), None
        _, o_dot, _ = torch.ops.fastflow_cpp.attention_dual_fwd(q, q_dot, k, k_dot, v, v_dot)
        return o_dot, None


class AttentionDualFunction(torch.autograd.Function):
    """The attention dual op as an ``autograd.Function`` (eager; see GNFilmSiLUDualFunction)."""

    @staticmethod
    def forward(q, q_dot, k, k_dot, v, v_dot):
        return torch.ops.fastflow_cpp.attention_dual_fwd(q, q_dot, k, k_dot, v, v_dot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _attention_dual_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_o, grad_o_dot, _grad_lse):
        return _attention_dual_backward(ctx, grad_o, grad_o_dot, _grad_lse)


# ----------------------------------------------------------------------------------------------
# Public functions (the dispatcher in fastflow.ops calls these positionally)
# ----------------------------------------------------------------------------------------------


def gn_film_silu_cpp(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    groups: int,
    eps: float,
    silu: bool,
) -> Tensor:
    """y = act((GN(x)·γ + β)·(1 + scale) + shift); same contract as ``gn_film_silu_reference``."""
    _check_gn(x, groups)
    if _is_compiling() or not _use_function():
        return torch.ops.fastflow_cpp.gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, silu)[0]
    return GNFilmSiLUFunction.apply(x, weight, bias, scale, shift, groups, eps, silu)[0]


def gn_film_silu_dual_cpp(
    x: Tensor,
    x_dot: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    scale_dot: Optional[Tensor],
    shift: Optional[Tensor],
    shift_dot: Optional[Tensor],
    groups: int,
    eps: float,
    silu: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(y, ẏ) in one pass; ẏ is None when every tangent is None. Differentiable in every input."""
    if x_dot is None and scale_dot is None and shift_dot is None:
        return gn_film_silu_cpp(x, weight, bias, scale, shift, groups, eps, silu), None
    _check_gn(x, groups)
    args = (x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu)
    if _is_compiling() or not _use_function():
        y, y_dot, _ = torch.ops.fastflow_cpp.gn_film_silu_dual_fwd(*args)
    else:
        y, y_dot, _ = GNFilmSiLUDualFunction.apply(*args)
    return y, y_dot


def attention_cpp(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q·Kᵀ/√d)·V over (B, H, L, D); same contract as ``attention_reference``."""
    _check_attention(q, k, v)
    if _is_compiling() or not _use_function():
        return torch.ops.fastflow_cpp.attention_fwd(q, k, v)[0]
    return AttentionFunction.apply(q, k, v)[0]


def attention_dual_cpp(
    q: Tensor,
    q_dot: Optional[Tensor],
    k: Tensor,
    k_dot: Optional[Tensor],
    v: Tensor,
    v_dot: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor]]:
    """(O, Ȯ) of attention; Ȯ is None when every tangent is None. Differentiable in every input."""
    if q_dot is None and k_dot is None and v_dot is None:
        return attention_cpp(q, k, v), None
    _check_attention(q, k, v)
    if _is_compiling() or not _use_function():
        o, o_dot, _ = torch.ops.fastflow_cpp.attention_dual_fwd(q, q_dot, k, k_dot, v, v_dot)
    else:
        o, o_dot, _ = AttentionDualFunction.apply(q, q_dot, k, k_dot, v, v_dot)
    return o, o_dot
