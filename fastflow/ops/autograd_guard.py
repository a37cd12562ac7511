"""A backward that refuses to be differentiated again, loudly and by name.

The fused ops' backward operators (C++ ``*_bwd``, Triton ``*_bwd`` kernels) have no derivatives of
their own. Without a guard, ``torch.autograd.grad(..., create_graph=True)`` through a fused op
returns gradients that are silently constants of the graph (the C++ ops only emit a UserWarning
from the autograd fallback), so a gradient penalty or any other gradient-of-a-gradient loss trains
on a wrong gradient. :func:`once_differentiable` runs the backward under ``no_grad`` and, when the
backward itself is being recorded, hands back gradients whose ``grad_fn`` raises a RuntimeError
naming the op and the fix if anyone backpropagates through them.

Unlike :func:`torch.autograd.function.once_differentiable`, which looks only at the incoming
gradients, it also counts the saved inputs: ``‖∂(Σy)/∂x‖²`` has a constant incoming gradient but
depends on x and the weights through the saved tensors.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

__all__ = ["once_differentiable", "double_backward_message"]


def double_backward_message(op: str) -> str:
    return (
        f"fastflow.ops.{op}: the fused kernel's backward is not differentiable (double backward: "
        "a gradient penalty, create_graph=True, or torch.func.grad of a gradient); "
        "use the PyTorch reference for this loss (model.fused_kernels: false, or fused=False)"
    )


def _requires_grad(value) -> bool:
    return isinstance(value, Tensor) and value.requires_grad


def once_differentiable(op: str) -> Callable:
    """Decorator for ``backward(ctx, *grads)`` of the fused op ``op`` (see the module docstring)."""
    message = double_backward_message(op).encode()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            if not (any(_requires_grad(g) for g in grads)
                    or any(_requires_grad(t) for t in ctx.saved_tensors)):
                return outputs
            as_tuple = outputs if isinstance(outputs, tuple) else (outputs,)
            # The error node takes the graph's tensors (incoming grads, saved inputs) as extra
            # inputs so that it lies on every path from a second-order loss to the parameters:
            # the engine then runs it (and raises) instead of skipping it and returning partial
            # or None gradients.
            anchors = [t for t in (*grads, *ctx.saved_tensors) if _requires_grad(t)]
            guarded = torch._C._functions.DelayedError(message, len(as_tuple) + len(anchors))(
                *as_tuple, *anchors
            )
            guarded = tuple(guarded[: len(as_tuple)])
            return guarded if isinstance(outputs, tuple) else guarded[0]

        return wrapper

    return decorate
