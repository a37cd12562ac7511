"""PyTorch reference implementations of fastflow's fused ops: the specification.

Every fused implementation (Triton in ``kernels/``, C++ in ``csrc/``) is tested against these
functions. They are plain differentiable PyTorch, so autograd gives every gradient, including
gradients through the tangent outputs of the ``*_dual`` forms, and ``torch.func.jvp`` works
through them (no SDPA, no in-place ops).

Conventions
-----------
- ``gn_film_silu``: ``x`` is (N, C, *spatial); ``weight``/``bias`` are (C,); ``scale``/``shift``
  are (N, C) or None. Statistics are computed in float32 (float64 inputs stay float64); the output has ``x.dtype``.
- ``attention``: ``q, k, v`` are (B, heads, L, D); output (B, heads, L, D).
- A tangent argument that is None means "identically zero".
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "gn_film_silu_reference",
    "gn_film_silu_dual_reference",
    "attention_reference",
    "attention_dual_reference",
]


def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also NCHW-contiguous): the layout class every
    op's output follows (kernels/gn_film_silu.py ``_data_layout`` applies the same test)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _acc(x: Tensor) -> Tensor:
    """Accumulation dtype: float32 for half types and float32, float64 kept (for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _grouped(x: Tensor, groups: int) -> Tuple[Tensor, Tuple[int, ...]]:
    """(N, C, *spatial) → the (N, G, C/G, *spatial) view (no copy in any layout) and its group dims."""
    xg = _acc(x).unflatten(1, (groups, x.shape[1] // groups))
    return xg, tuple(range(2, xg.dim()))


def _group_stats(xg: Tensor, dims: Tuple[int, ...], eps: float) -> Tuple[Tensor, Tensor]:
    """Mean and reciprocal std of a grouped float32 tensor over its group dims."""
    mean = xg.mean(dim=dims, keepdim=True)
    var = (xg - mean).square().mean(dim=dims, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def normalized_groups(x: Tensor, groups: int, eps: float) -> Tensor:
    """GN(x) = (x − μ_g)·rsqrt(σ²_g + eps) before the affine, in x's shape (float32, or float64
    for float64 x), differentiable in x: for the fused ops' jvp rules, whose saved statistics
    are not."""
    xg, dims = _grouped(x, groups)
    mean, rstd = _group_stats(xg, dims, eps)
    return ((xg - mean) * rstd).flatten(1, 2)


def _channel_param(p: Optional[Tensor], n: int, c: int, ndim: int) -> Optional[Tensor]:
    """(C,) or (N, C) parameter -> broadcastable (1|N, C, 1, ...) float32."""
    if p is None:
        return None
    p = _acc(p)
    if p.dim() == 1:
        p = p.view(1, c)
    return p.reshape(p.shape[0], c, *([1] * (ndim - 2)))


def _silu_and_grad(z: Tensor) -> Tuple[Tensor, Tensor]:
    sig = torch.sigmoid(z)
    return z * sig, sig * (1 + z * (1 - sig))


def gn_film_silu_reference(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = True,
) -> Tensor:
    """y = act((GN(x)·γ + β)·(1 + scale) + shift), act = SiLU or identity.

    GN(x) = (x − μ_g) / sqrt(σ²_g + eps) over each sample's group g of C/groups channels and all
    spatial positions (Wu & He 2018), statistics in float32.
    """
    y, _ = gn_film_silu_dual_reference(
        x, None, weight, bias, scale, None, shift, None, groups=groups, eps=eps, silu=silu
    )
    return y


def gn_film_silu_dual_reference(
    x: Tensor,
    x_dot: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor] = None,
    scale_dot: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    shift_dot: Optional[Tensor] = None,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Primal and tangent of :func:`gn_film_silu_reference` in one pass.

    With n = (x − μ)·r (r = 1/σ) the tangent is
        ṅ = r·(ẋ − mean_g(ẋ)) − n·mean_g(n·ẋ)·r            (normalisation)
        ż = ṅ·γ·(1 + scale) + (n·γ + β)·scale_dot + shift_dot   (affine + FiLM)
        ẏ = silu'(z)·ż,  silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
    Returns (y, ẏ); ẏ is None when every tangent is None. Differentiable in all inputs, the
    tangents included (plain autograd).
    """
    if x.dim() < 2:
        raise ValueError(f"gn_film_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    n_batch, channels = x.shape[0], x.shape[1]
    if channels % groups != 0:
        raise ValueError(f"gn_film_silu: channels={channels} not divisible by groups={groups}")
    ndim = x.dim()
    # Grouped views and elementwise ops only, so the output keeps x's memory layout (a
    # channels_last UNet stays channels_last through its norms).
    xg, dims = _grouped(x, groups)
    mean, rstd = _group_stats(xg, dims, eps)
    normed_g = (xg - mean) * rstd
    normed = normed_g.flatten(1, 2)

    w = _channel_param(weight, n_batch, channels, ndim)
    b = _channel_param(bias, n_batch, channels, ndim)
    sc = _channel_param(scale, n_batch, channels, ndim)
    sh = _channel_param(shift, n_batch, channels, ndim)
    sc_dot = _channel_param(scale_dot, n_batch, channels, ndim)
    sh_dot = _channel_param(shift_dot, n_batch, channels, ndim)

    affine = normed if w is None else normed * w
    if b is not None:
        affine = affine + b
    z = affine if sc is None else affine * (1 + sc)
    if sh is not None:
        z = z + sh

    z_dot = None
    if x_dot is not None:
        xdg, _ = _grouped(x_dot, groups)
        n_dot_g = rstd * (xdg - xdg.mean(dim=dims, keepdim=True)) - normed_g * (
            (normed_g * xdg).mean(dim=dims, keepdim=True) * rstd
        )
        n_dot = n_dot_g.flatten(1, 2)
        if w is not None:
            n_dot = n_dot * w
        z_dot = n_dot if sc is None else n_dot * (1 + sc)
    if sc_dot is not None:
        term = affine * sc_dot
        z_dot = term if z_dot is None else z_dot + term
    if sh_dot is not None:
        term = sh_dot.expand_as(z)
        z_dot = term if z_dot is None else z_dot + term

    if silu:
        y, dsilu = _silu_and_grad(z)
        y_dot = None if z_dot is None else dsilu * z_dot
    else:
        y, y_dot = z, z_dot
    return y.to(x.dtype), (None if y_dot is None else y_dot.to(x.dtype))


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """O = softmax(Q·Kᵀ/√d)·V per batch and head; q, k, v: (B, H, L, D). Softmax in float32."""
    o, _ = attention_dual_reference(q, None, k, None, v, None)
    return o


def attention_dual_reference(
    q: Tensor,
    q_dot: Optional[Tensor],
    k: Tensor,
    k_dot: Optional[Tensor],
    v: Tensor,
    v_dot: Optional[Tensor],
) -> Tuple[Tensor, Optional[Tensor]]:
    """Primal and tangent of attention.

        S = Q·Kᵀ·c,  Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)·c,  c = 1/√d
        P = softmax(S),  Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))
        O = P·V,  Ȯ = Ṗ·V + P·V̇
    The softmax is written out (max-subtracted exp / sum) rather than ``torch.softmax`` so that
    forward-mode AD through it composes with backward (see ../shared/ENVIRONMENT.md).
    """
    if q.dim() != 4 or k.shape != q.shape[:2] + k.shape[2:] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"attention: expected q, k, v of shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    c = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = _acc(q), _acc(k), _acc(v)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * c
    s_max = s.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(s - s_max)
    p = e / e.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, vf)

    o_dot = None
    s_dot = None
    if q_dot is not None:
        s_dot = torch.matmul(_acc(q_dot), kf.transpose(-1, -2)) * c
    if k_dot is not None:
        term = torch.matmul(qf, _acc(k_dot).transpose(-1, -2)) * c
        s_dot = term if s_dot is None else s_dot + term
    if s_dot is not None:
        ps = p * s_dot
        p_dot = ps - p * ps.sum(dim=-1, keepdim=True)
        o_dot = torch.matmul(p_dot, vf)
    if v_dot is not None:
        term = torch.matmul(p, _acc(v_dot))
        o_dot = term if o_dot is None else o_dot + term
    return o.to(q.dtype), (None if o_dot is None else o_dot.to(q.dtype))
