"""Tangent-carrying versions of the UNet's elementary ops (explicit forward-mode AD).

Each function takes a primal and its tangent (directional derivative) and returns both. A
tangent of None stands for an identically zero tangent and is propagated as None, so the same
block code runs a plain forward (all tangents None) at no extra cost. Everything here is ordinary
differentiable PyTorch: gradients flow through primal and tangent alike, and it traces under
torch.compile and FSDP2 like any forward.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Dual = Tuple[Tensor, Optional[Tensor]]


def add(a: Tensor, a_dot: Optional[Tensor], b: Tensor, b_dot: Optional[Tensor]) -> Dual:
    """a + b with broadcasting; a lone tangent is broadcast to the output's shape."""
    out = a + b
    if a_dot is None and b_dot is None:
        return out, None
    if a_dot is None or b_dot is None:
        out_dot = a_dot if b_dot is None else b_dot
        if out_dot.shape != out.shape:  # materialised in out's layout (NCHW or channels_last)
            out_dot = torch.empty_like(out).copy_(out_dot.expand(out.shape))
        return out, out_dot
    return out, a_dot + b_dot


def silu(x: Tensor, x_dot: Optional[Tensor]) -> Dual:
    """silu(x) = x·σ(x);  d/dx = σ(x)·(1 + x·(1 − σ(x)))."""
    if x_dot is None:
        return F.silu(x), None
    sig = torch.sigmoid(x)
    # Primal through F.silu in both branches: the dual pass's v is bitwise the plain forward's.
    return F.silu(x), x_dot * (sig * (1 + x * (1 - sig)))


def linear(layer: nn.Linear, x: Tensor, x_dot: Optional[Tensor]) -> Dual:
    """y = xWᵀ + b;  ẏ = ẋWᵀ (the bias has no tangent)."""
    y = layer(x)
    return y, (None if x_dot is None else F.linear(x_dot, layer.weight))


def conv2d(layer: nn.Conv2d, x: Tensor, x_dot: Optional[Tensor]) -> Dual:
    """Convolution is linear in x: the tangent is the bias-free convolution of ẋ."""
    y = layer(x)
    if x_dot is None:
        return y, None
    return y, F.conv2d(x_dot, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def cat(parts: Sequence[Dual], dim: int = 1) -> Dual:
    """Concatenate primals; a None tangent among non-None ones becomes zeros of its shape."""
    primal = torch.cat([p for p, _ in parts], dim=dim)
    if all(t is None for _, t in parts):
        return primal, None
    tangent = torch.cat([torch.zeros_like(p) if t is None else t for p, t in parts], dim=dim)
    return primal, tangent


def upsample_nearest2x(x: Tensor, x_dot: Optional[Tensor]) -> Dual:
    y = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return y, (None if x_dot is None else F.interpolate(x_dot, scale_factor=2.0, mode="nearest"))


def dropout(x: Tensor, x_dot: Optional[Tensor], p: float, training: bool) -> Dual:
    """Dropout with one mask shared by primal and tangent (as forward-mode AD would)."""
    if not training or p == 0.0:
        return x, x_dot
    mask = torch.empty_like(x).bernoulli_(1.0 - p) / (1.0 - p)
    return x * mask, (None if x_dot is None else x_dot * mask)
