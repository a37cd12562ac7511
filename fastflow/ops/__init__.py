"""fastflow's fused ops: one public function per op, one place that picks the implementation.

Public functions
----------------
- ``gn_film_silu(x, weight, bias, scale=None, shift=None, *, groups, eps, silu=True, fused=False)``
- ``gn_film_silu_dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, *, ...)`` -> (y, ẏ)
- ``attention(q, k, v, *, fused=False)``
- ``attention_dual(q, q_dot, k, k_dot, v, v_dot, *, fused=False)`` -> (o, ȯ)

``fused=False`` runs the PyTorch reference (:mod:`fastflow.ops.reference`, the specification).
``fused=True`` picks, per call, by the tensor's device:

- CUDA tensor  -> Triton kernels (``kernels/``)
- CPU tensor   -> the C++ extension (``csrc/``) when it is built, else the reference with a
  one-line warning.

``FASTFLOW_OPS_BACKEND=reference|triton|cpp`` forces one implementation for fused calls (tests
use ``triton`` on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .reference import (
    attention_dual_reference,
    attention_reference,
    gn_film_silu_dual_reference,
    gn_film_silu_reference,
)

__all__ = [
    "gn_film_silu",
    "gn_film_silu_dual",
    "attention",
    "attention_dual",
    "fused_backend_for",
    "math_attention",
    "reference_only",
    "available_backends",
]

_REFERENCE: Dict[str, Callable] = {
    "gn_film_silu": gn_film_silu_reference,
    "gn_film_silu_dual": gn_film_silu_dual_reference,
    "attention": attention_reference,
    "attention_dual": attention_dual_reference,
}

_BACKEND_CACHE: Dict[str, Optional[Dict[str, Callable]]] = {}
_WARNED: set = set()
_FORCE_MATH_ATTENTION = False
_FORCE_REFERENCE = False


def _load_backend(name: str) -> Optional[Dict[str, Callable]]:
    """Import an implementation lazily; None (with the reason remembered) if unavailable."""
    if name in _BACKEND_CACHE:
        return _BACKEND_CACHE[name]
    table: Optional[Dict[str, Callable]] = None
    try:
        if name == "triton":
            from kernels import attention as _attn  # noqa: WPS433 (lazy: triton import is slow)
            from kernels import gn_film_silu as _gn

            table = {
                "gn_film_silu": _gn.gn_film_silu_triton,
                "gn_film_silu_dual": _gn.gn_film_silu_dual_triton,
                "attention": _attn.attention_triton,
                "attention_dual": _attn.attention_dual_triton,
            }
        elif name == "cpp":
            from . import cpu as _cpu

            if _cpu.is_available():
                table = {
                    "gn_film_silu": _cpu.gn_film_silu_cpp,
                    "gn_film_silu_dual": _cpu.gn_film_silu_dual_cpp,
                    "attention": _cpu.attention_cpp,
                    "attention_dual": _cpu.attention_dual_cpp,
                }
        elif name == "reference":
            table = dict(_REFERENCE)
        else:
            raise ValueError(
                f"unknown fused-ops backend {name!r} (FASTFLOW_OPS_BACKEND); "
                "expected one of: reference, triton, cpp"
            )
    except ImportError as exc:  # triton missing, extension not built, ...
        _BACKEND_CACHE[name + ":error"] = None
        _warn_once(name, f"fastflow.ops: {name} kernels unavailable ({exc}); using the PyTorch reference")
        table = None
    _BACKEND_CACHE[name] = table
    return table


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def available_backends() -> Dict[str, bool]:
    """Which fused implementations can be loaded in this process."""
    return {name: _load_backend(name) is not None for name in ("reference", "triton", "cpp")}


def fused_backend_for(device: torch.device) -> str:
    """The implementation a ``fused=True`` call on ``device`` uses."""
    forced = os.environ.get("FASTFLOW_OPS_BACKEND", "").strip().lower()
    if forced:
        return forced if _load_backend(forced) is not None else "reference"
    if device.type == "cuda":
        return "triton" if _load_backend("triton") is not None else "reference"
    if device.type == "cpu":
        if _load_backend("cpp") is not None:
            return "cpp"
        _warn_once(
            "cpp-missing",
            "fastflow.ops: C++ CPU extension not built (pip install --no-build-isolation -e .); "
            "fused ops fall back to the PyTorch reference",
        )
    return "reference"


def _impl(op: str, fused: bool, device: torch.device, dtype: torch.dtype) -> Callable:
    if not fused or _FORCE_REFERENCE:
        return _REFERENCE[op]
    backend = fused_backend_for(device)
    if backend == "triton" and dtype == torch.float64:  # the Triton kernels compute in float32 at most
        return _REFERENCE[op]
    table = _load_backend(backend)
    return (table or _REFERENCE)[op]


@contextlib.contextmanager
def math_attention(enabled: bool = True):
    """Force the unfused plain-forward attention onto the explicit-softmax math path.

    The unfused plain forward uses ``scaled_dot_product_attention`` (fast, but without
    forward-mode AD); ``torch.func.jvp`` callers enter this context.
    """
    global _FORCE_MATH_ATTENTION
    previous = _FORCE_MATH_ATTENTION
    _FORCE_MATH_ATTENTION = enabled
    try:
        yield
    finally:
        _FORCE_MATH_ATTENTION = previous


@contextlib.contextmanager
def reference_only(enabled: bool = True):
    """Run every op on the PyTorch reference inside this context, whatever ``fused`` says.

    ``torch.func.jvp`` callers use it: the reference has forward-mode AD everywhere. The unfused
    plain attention forward stays on ``scaled_dot_product_attention`` (also a PyTorch op, but
    without forward-mode AD on its fused backends); enter :func:`math_attention` as well for the
    explicit softmax.
    """
    global _FORCE_REFERENCE
    previous = _FORCE_REFERENCE
    _FORCE_REFERENCE = enabled
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


def gn_film_silu(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    *,
    groups: int,
    eps: float = 1e-5,
    silu: bool = True,
    fused: bool = False,
) -> Tensor:
    """GroupNorm (float32 statistics) → affine → optional FiLM ·(1+scale)+shift → optional SiLU."""
    return _impl("gn_film_silu", fused, x.device, x.dtype)(x, weight, bias, scale, shift, groups, eps, silu)


def gn_film_silu_dual(
    x: Tensor,
    x_dot: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor] = None,
    scale_dot: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    shift_dot: Optional[Tensor] = None,
    *,
    groups: int,
    eps: float = 1e-5,
    silu: bool = True,
    fused: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(y, ẏ) of :func:`gn_film_silu`; None tangents are zero. Differentiable in every input."""
    if x_dot is None and scale_dot is None and shift_dot is None:
        return gn_film_silu(x, weight, bias, scale, shift, groups=groups, eps=eps, silu=silu, fused=fused), None
    return _impl("gn_film_silu_dual", fused, x.device, x.dtype)(
        x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu
    )


def attention(q: Tensor, k: Tensor, v: Tensor, *, fused: bool = False) -> Tensor:
    """softmax(Q·Kᵀ/√d)·V over (B, heads, L, D) tensors."""
    if not fused and not _FORCE_MATH_ATTENTION:
        # Unfused plain forward: SDPA picks flash / memory-efficient kernels where it can.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return _impl("attention", fused, q.device, q.dtype)(q, k, v)


def attention_dual(
    q: Tensor,
    q_dot: Optional[Tensor],
    k: Tensor,
    k_dot: Optional[Tensor],
    v: Tensor,
    v_dot: Optional[Tensor],
    *,
    fused: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(O, Ȯ) of :func:`attention`; None tangents are zero. Differentiable in every input."""
    if q_dot is None and k_dot is None and v_dot is None:
        return attention(q, k, v, fused=fused), None
    return _impl("attention_dual", fused, q.device, q.dtype)(q, q_dot, k, k_dot, v, v_dot)
