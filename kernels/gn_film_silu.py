"""Fused GroupNorm → affine → FiLM → SiLU in Triton, with its backward, its dual (primal +
tangent) form, and the dual's backward.

Specification: :func:`fastflow.ops.reference.gn_film_silu_reference` and
:func:`fastflow.ops.reference.gn_film_silu_dual_reference`. Notation used in every docstring below,
for one sample n and one group g of ``M = (C/G)·HW`` elements (``c`` is the channel):

    μ, r      mean and 1/sqrt(var + eps) of x over the group (float32, biased variance)
    n̂ = (x − μ)·r,   a = n̂·γ_c + β_c,   A = γ_c·(1 + s_nc),   B = β_c·(1 + s_nc) + t_nc
    z = n̂·A + B = a·(1 + s) + t,        y = silu(z) (or y = z when ``silu=False``)
    ẋc = ẋ − mean_g(ẋ),   k = mean_g(n̂·ẋ),   ṅ = r·(ẋc − n̂·k)
    ż = ṅ·A + a·ṡ + ṫ,    ẏ = silu'(z)·ż

with γ = weight, β = bias, s = scale, t = shift, ṡ = scale_dot, ṫ = shift_dot; a missing γ is 1,
a missing β, s, t or tangent is 0.

What is a Triton kernel and what is not
---------------------------------------
Every pass over the (N, C, HW) data is a Triton kernel: the forward, the plain backward (dx and the
per-(n, c) sums that give dweight, dbias, dscale, dshift), the dual forward, and the dual backward
(gradients w.r.t. x, ẋ, γ, β, s, ṡ, t, ṫ from upstream grads of y and ẏ, either of which may be
absent). Only O(N·C) work runs in PyTorch: the sum over N of the per-sample dweight/dbias partials
(deterministic, no atomics) and dtype casts. One exception: a forward-mode tangent of the *plain*
op w.r.t. weight or bias (``torch.func.jvp`` with parameter tangents, which fastflow's models do not
use) adds silu'(z)·(n̂·γ̇ + β̇)·(1 + s) in PyTorch from the saved statistics.

Memory layout
-------------
x may be NCHW-contiguous or (4-D) channels_last: the kernels address element (n, c, hw) as
``n·C·HW + c·Stride_c + hw·Stride_hw`` and run either layout in place, and every output of x's
shape (y, ẏ, dx, dẋ) is allocated in x's layout; ẋ and upstream grads in another layout are
converted to x's. Other strides are copied to NCHW first. The fake kernels give the same strides
(torch.compile plans the code after an operator from them). channels_last runs its own kernels
(``_gn_film_silu_cl_*``): a group's channels are the only contiguous run at each position, so each
program takes several whole groups (≥ 32 contiguous channels) and reduces per group by a one-hot
sum; NCHW keeps one program per (sample, group). Whether channels_last wins on a GPU is for the
GPU suite's ``_cl`` rows to say, not assumed.

Autograd and compilation
------------------------
The launchers sit behind four ``torch.library.custom_op`` operators in the ``fastflow_triton``
namespace (``gn_film_silu_fwd``/``_bwd``, ``gn_film_silu_dual_fwd``/``_bwd``) with
``register_fake``, and ``register_autograd`` on the two forwards: under ``torch.compile`` the
public functions call these, so ``fullgraph=True`` traces them without graph breaks. Eagerly they
go through :class:`GNFilmSiLUFunction` and :class:`GNFilmSiLUDualFunction` (``setup_context``
style, so ``torch.func.grad``/``vjp`` work — ops with ``register_autograd`` do not support
torch.func, pytorch#168393); the plain one has a ``jvp`` that runs the dual Function, so
``torch.func.jvp`` and ``torch.autograd.forward_ad`` work and a backward through ẏ runs the dual
backward kernel. Dynamo refuses an ``autograd.Function`` with a custom ``jvp``, which is why the
compiled path uses the operators (and has no forward-mode AD). The backward operators are not
themselves differentiable: a double backward raises a RuntimeError naming the op
(fastflow/ops/autograd_guard.py) instead of treating the gradient as a constant; ``vmap`` has no rule.

Debugging: ``set_poison_outputs(True)`` (or ``FASTFLOW_TRITON_POISON=1``) fills every output
buffer with NaN before the kernels write it, so an element a kernel misses shows up in the tests.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastflow.ops.autograd_guard import once_differentiable
from fastflow.ops.reference import normalized_groups

__all__ = [
    "gn_film_silu_triton",
    "gn_film_silu_dual_triton",
    "GNFilmSiLUFunction",
    "GNFilmSiLUDualFunction",
    "set_poison_outputs",
]


# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_film_coefficients(
    Weight_ptr,
    Bias_ptr,
    Scale_ptr,
    ScaleDot_ptr,
    Shift_ptr,
    ShiftDot_ptr,
    n,
    g,
    CPG,
    channels,
    c_mask,
    Scale_stride_n,
    ScaleDot_stride_n,
    Shift_stride_n,
    ShiftDot_stride_n,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SCALE_DOT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SHIFT_DOT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Float32 (γ, β, s, ṡ, t, ṫ) for a block of one group's channels; absent ones are 1, 0, ... 0.

    One helper for all six so the interpreter (which re-patches triton.language on every device
    function call) pays once per channel block.
    """
    c_index = g * CPG + channels
    if HAS_WEIGHT:
        w = tl.load(Weight_ptr + c_index, mask=c_mask, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(Bias_ptr + c_index, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_SCALE:
        s = tl.load(Scale_ptr + n * Scale_stride_n + c_index, mask=c_mask, other=0.0).to(tl.float32)
    else:
        s = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_SCALE_DOT:
        sd = tl.load(ScaleDot_ptr + n * ScaleDot_stride_n + c_index, mask=c_mask, other=0.0).to(tl.float32)
    else:
        sd = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_SHIFT:
        t = tl.load(Shift_ptr + n * Shift_stride_n + c_index, mask=c_mask, other=0.0).to(tl.float32)
    else:
        t = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_SHIFT_DOT:
        td = tl.load(ShiftDot_ptr + n * ShiftDot_stride_n + c_index, mask=c_mask, other=0.0).to(tl.float32)
    else:
        td = tl.full([BLOCK_C], 0.0, tl.float32)
    return w, b, s, sd, t, td


@triton.jit
def _welford_step(X_ptr, XDot_ptr, offsets, mask, count, x_mean, x_m2, xd_mean, x_xd_c2, HAS_X_DOT: tl.constexpr):
    """One tile of Welford's update per lane (and its co-moment form for ẋ); returns the five
    running accumulators (count, mean(x), M2(x), mean(ẋ), C(x, ẋ))."""
    x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    count += tl.where(mask, 1.0, 0.0)
    inv_count = tl.where(mask, 1.0 / tl.maximum(count, 1.0), 0.0)
    delta = x - x_mean
    x_mean += delta * inv_count
    x_m2 += tl.where(mask, delta * (x - x_mean), 0.0)
    if HAS_X_DOT:
        xd = tl.load(XDot_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xd_mean += (xd - xd_mean) * inv_count
        x_xd_c2 += tl.where(mask, delta * (xd - xd_mean), 0.0)
    return count, x_mean, x_m2, xd_mean, x_xd_c2


@triton.jit
def _plain_upstream(X_ptr, DY_ptr, offsets, mask, mean, rstd, coef_a, coef_b, SILU: tl.constexpr):
    """(n̂, gz) of one tile for the plain backward: gz = dy·silu'(z) (dy without SiLU)."""
    x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gz = tl.load(DY_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    normed = (x - mean) * rstd
    if SILU:
        silu_z, dsilu, unused_d2 = _silu_derivatives(normed * coef_a + coef_b)
        gz = gz * dsilu
    return normed, gz


@triton.jit
def _dual_apply(X_ptr, XDot_ptr, Y_ptr, YDot_ptr, offsets, mask, mean, rstd, xd_mean, xd_proj,
                coef_a, coef_b, w, b, sd, td, HAS_X_DOT: tl.constexpr, SILU: tl.constexpr):
    """Write one tile of (y, ẏ): z = n̂·A + B, ż = ṅ·A + a·ṡ + ṫ, y = silu(z), ẏ = silu'(z)·ż."""
    x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    normed = (x - mean) * rstd
    z = normed * coef_a + coef_b
    z_dot = (normed * w + b) * sd + td
    if HAS_X_DOT:
        xd = tl.load(XDot_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z_dot += rstd * (xd - xd_mean - normed * xd_proj) * coef_a
    if SILU:
        y, dsilu, unused_d2 = _silu_derivatives(z)
        z = y
        z_dot = z_dot * dsilu
    tl.store(Y_ptr + offsets, z.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(YDot_ptr + offsets, z_dot.to(YDot_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_plain_param_grads(DShift_ptr, DScale_ptr, DWeightPartial_ptr, DBiasPartial_ptr, nc_offsets, c_mask,
                             s1, s2, w, b, s):
    """dshift = S1, dscale = γ·S2 + β·S1, dweight_n = (1 + s)·S2, dbias_n = (1 + s)·S1 per (n, c)."""
    tl.store(DShift_ptr + nc_offsets, s1, mask=c_mask)
    tl.store(DScale_ptr + nc_offsets, w * s2 + b * s1, mask=c_mask)
    tl.store(DWeightPartial_ptr + nc_offsets, (1.0 + s) * s2, mask=c_mask)
    tl.store(DBiasPartial_ptr + nc_offsets, (1.0 + s) * s1, mask=c_mask)


@triton.jit
def _store_dual_param_grads(DShift_ptr, DShiftDot_ptr, DScale_ptr, DScaleDot_ptr, DWeightPartial_ptr,
                            DBiasPartial_ptr, nc_offsets, c_mask, p1, p2, q1, q2, q3, w, b, s, sd):
    """The dual backward's per-(n, c) parameter grads (formulas in its kernel's docstring)."""
    tl.store(DShift_ptr + nc_offsets, p1, mask=c_mask)
    tl.store(DShiftDot_ptr + nc_offsets, q1, mask=c_mask)
    tl.store(DScale_ptr + nc_offsets, w * (p2 + q3) + b * p1, mask=c_mask)
    tl.store(DScaleDot_ptr + nc_offsets, w * q2 + b * q1, mask=c_mask)
    tl.store(DWeightPartial_ptr + nc_offsets, (1.0 + s) * (p2 + q3) + sd * q2, mask=c_mask)
    tl.store(DBiasPartial_ptr + nc_offsets, (1.0 + s) * p1 + sd * q1, mask=c_mask)


@triton.jit
def _dual_bwd_store_dx(DX_ptr, DXDot_ptr, offsets, mask, normed, xd_centered, gz, gzd, rstd, xd_proj, coef_a, w_sd,
                       mean_gn, mean_gn_n, mean_gnd, mean_gnd_n, normed_coef, NEEDS_GRAD_X_DOT: tl.constexpr):
    """Write one tile of dx (and dẋ) of the dual backward from the group means of its first pass."""
    grad_normed = gz * coef_a + gzd * w_sd
    grad_normed_dot = gzd * coef_a
    dx = rstd * (grad_normed - mean_gn - normed * mean_gn_n) - rstd * rstd * (
        normed * normed_coef + xd_centered * mean_gnd_n + xd_proj * (grad_normed_dot - mean_gnd)
    )
    tl.store(DX_ptr + offsets, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    if NEEDS_GRAD_X_DOT:
        dxd = rstd * (grad_normed_dot - mean_gnd - normed * mean_gnd_n)
        tl.store(DXDot_ptr + offsets, dxd.to(DXDot_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_moments(
    X_ptr,
    XDot_ptr,
    group_start,
    CPG,
    HW,
    Stride_c,
    Stride_hw,
    HAS_X_DOT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """(mean(x), var(x), mean(ẋ), cov(x, ẋ)) over one (CPG, HW) group, float32.

    Element (c, hw) of the group is at ``group_start + c·Stride_c + hw·Stride_hw``: (HW, 1) for
    NCHW, (1, C) for channels_last; Triton specialises the stride that is 1, so each layout compiles
    to its own kernel with the contiguous axis known.

    One read of the data: every lane of the (BLOCK_C, BLOCK_HW) tile runs Welford's update (and its
    co-moment form for ẋ), then the lanes are merged with Chan et al.'s pairwise formula
    M2 = Σ M2_k + Σ n_k·(μ_k − μ)², C = Σ C_k + Σ n_k·(μ_k − μ)·(ν_k − ν).
    """
    c_range = tl.arange(0, BLOCK_C)
    hw_range = tl.arange(0, BLOCK_HW)
    count = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    x_mean = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    x_m2 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    xd_mean = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    x_xd_c2 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = (channels < CPG)[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            count, x_mean, x_m2, xd_mean, x_xd_c2 = _welford_step(
                X_ptr, XDot_ptr, offsets, mask, count, x_mean, x_m2, xd_mean, x_xd_c2, HAS_X_DOT
            )
    group_size = CPG * HW
    mean = tl.sum(count * x_mean, axis=None) / group_size
    x_shift = x_mean - mean
    var = tl.sum(x_m2 + count * x_shift * x_shift, axis=None) / group_size
    if HAS_X_DOT:
        xd_total_mean = tl.sum(count * xd_mean, axis=None) / group_size
        cov = tl.sum(x_xd_c2 + count * x_shift * (xd_mean - xd_total_mean), axis=None) / group_size
    else:
        xd_total_mean = mean * 0.0
        cov = mean * 0.0
    return mean, var, xd_total_mean, cov


@triton.jit
def _silu_derivatives(z):
    """silu(z) = z·σ(z),  silu'(z) = σ·(1 + z·(1 − σ)),  silu''(z) = σ·(1 − σ)·(2 + z·(1 − 2σ))."""
    sig = 1.0 / (1.0 + tl.exp(-z))
    one_minus = 1.0 - sig
    return z * sig, sig * (1.0 + z * one_minus), sig * one_minus * (2.0 + z * (1.0 - 2.0 * sig))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gn_film_silu_fwd_kernel(
    X_ptr,
    Weight_ptr,
    Bias_ptr,
    Scale_ptr,
    Shift_ptr,
    Y_ptr,
    Mean_ptr,
    Rstd_ptr,
    C,
    HW,
    G,
    CPG,
    Stride_c,
    Stride_hw,
    Scale_stride_n,
    Shift_stride_n,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """y = silu(n̂·A + B), A = γ·(1 + s), B = β·(1 + s) + t; one program per (sample, group).

    GroupNorm (Wu & He 2018) with statistics in float32 (Welford, one read), then a second read
    applies affine + FiLM + SiLU. Saves μ and r = 1/sqrt(var + eps) per (n, g) for the backward.
    """
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    group_start = n.to(tl.int64) * C * HW + g * CPG * Stride_c
    mean, var, unused_xd_mean, unused_cov = _group_moments(
        X_ptr, X_ptr, group_start, CPG, HW, Stride_c, Stride_hw, False, BLOCK_C, BLOCK_HW
    )
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean_ptr + pid, mean)
    tl.store(Rstd_ptr + pid, rstd)

    c_range = tl.arange(0, BLOCK_C)
    hw_range = tl.arange(0, BLOCK_HW)
    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, unused_sd, t, unused_td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, Scale_ptr, Shift_ptr, Shift_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, 0, Shift_stride_n, 0,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, False, HAS_SHIFT, False, BLOCK_C,
        )
        coef_a = (w * (1.0 + s))[:, None]
        coef_b = (b * (1.0 + s) + t)[:, None]
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean) * rstd * coef_a + coef_b
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(Y_ptr + offsets, z.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_film_silu_bwd_kernel(
    X_ptr,
    Weight_ptr,
    Bias_ptr,
    Scale_ptr,
    Shift_ptr,
    DY_ptr,
    Mean_ptr,
    Rstd_ptr,
    DX_ptr,
    DScale_ptr,
    DShift_ptr,
    DWeightPartial_ptr,
    DBiasPartial_ptr,
    C,
    HW,
    G,
    CPG,
    Stride_c,
    Stride_hw,
    Scale_stride_n,
    Shift_stride_n,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Backward of the forward kernel; one program per (sample, group), two reads of (x, dy).

    gz = dy·silu'(z). Per channel, S1 = Σ_hw gz and S2 = Σ_hw gz·n̂ give
        dshift = S1,  dscale = γ·S2 + β·S1,  dweight_n = (1 + s)·S2,  dbias_n = (1 + s)·S1
    (dweight/dbias are summed over n by the host). With gn̂ = gz·A, the GroupNorm backward is
        dx = r·(gn̂ − mean_g(gn̂) − n̂·mean_g(gn̂·n̂)),
    mean_g(gn̂) = Σ_c A·S1 / M and mean_g(gn̂·n̂) = Σ_c A·S2 / M (exact with eps).
    """
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    group_start = n.to(tl.int64) * C * HW + g * CPG * Stride_c
    mean = tl.load(Mean_ptr + pid)
    rstd = tl.load(Rstd_ptr + pid)
    c_range = tl.arange(0, BLOCK_C)
    hw_range = tl.arange(0, BLOCK_HW)

    group_a_s1 = tl.full([BLOCK_C], 0.0, tl.float32)
    group_a_s2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, unused_sd, t, unused_td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, Scale_ptr, Shift_ptr, Shift_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, 0, Shift_stride_n, 0,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, False, HAS_SHIFT, False, BLOCK_C,
        )
        coef_a = w * (1.0 + s)
        coef_b = b * (1.0 + s) + t
        acc_gz = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        acc_gz_n = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            normed, gz = _plain_upstream(X_ptr, DY_ptr, offsets, mask, mean, rstd, coef_a[:, None], coef_b[:, None], SILU)
            acc_gz += gz
            acc_gz_n += gz * normed
        s1 = tl.sum(acc_gz, axis=1)
        s2 = tl.sum(acc_gz_n, axis=1)
        _store_plain_param_grads(DShift_ptr, DScale_ptr, DWeightPartial_ptr, DBiasPartial_ptr,
                                 n * C + g * CPG + channels, c_mask, s1, s2, w, b, s)
        group_a_s1 += tl.where(c_mask, coef_a * s1, 0.0)
        group_a_s2 += tl.where(c_mask, coef_a * s2, 0.0)
    group_size = CPG * HW
    mean_gn = tl.sum(group_a_s1, axis=0) / group_size
    mean_gn_n = tl.sum(group_a_s2, axis=0) / group_size

    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, unused_sd, t, unused_td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, Scale_ptr, Shift_ptr, Shift_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, 0, Shift_stride_n, 0,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, False, HAS_SHIFT, False, BLOCK_C,
        )
        coef_a = (w * (1.0 + s))[:, None]
        coef_b = (b * (1.0 + s) + t)[:, None]
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            normed, gz = _plain_upstream(X_ptr, DY_ptr, offsets, mask, mean, rstd, coef_a, coef_b, SILU)
            dx = rstd * (gz * coef_a - mean_gn - normed * mean_gn_n)
            tl.store(DX_ptr + offsets, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_film_silu_dual_kernel(
    X_ptr,
    XDot_ptr,
    Weight_ptr,
    Bias_ptr,
    Scale_ptr,
    ScaleDot_ptr,
    Shift_ptr,
    ShiftDot_ptr,
    Y_ptr,
    YDot_ptr,
    Mean_ptr,
    Rstd_ptr,
    XDotMean_ptr,
    XDotProj_ptr,
    C,
    HW,
    G,
    CPG,
    Stride_c,
    Stride_hw,
    Scale_stride_n,
    ScaleDot_stride_n,
    Shift_stride_n,
    ShiftDot_stride_n,
    eps,
    HAS_X_DOT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SCALE_DOT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SHIFT_DOT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """(y, ẏ) in one program per (sample, group), reading x and ẋ twice (stats, then apply).

        ṅ = r·(ẋ − mean_g(ẋ) − n̂·k),  k = mean_g(n̂·ẋ) = r·cov_g(x, ẋ)
        ż = ṅ·A + a·ṡ + ṫ,             ẏ = silu'(z)·ż
    (the reference docstring's formula). Saves μ, r, mean_g(ẋ) and k per (n, g).
    """
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    group_start = n.to(tl.int64) * C * HW + g * CPG * Stride_c
    mean, var, xd_mean, cov = _group_moments(
        X_ptr, XDot_ptr, group_start, CPG, HW, Stride_c, Stride_hw, HAS_X_DOT, BLOCK_C, BLOCK_HW
    )
    rstd = 1.0 / tl.sqrt(var + eps)
    xd_proj = rstd * cov
    tl.store(Mean_ptr + pid, mean)
    tl.store(Rstd_ptr + pid, rstd)
    tl.store(XDotMean_ptr + pid, xd_mean)
    tl.store(XDotProj_ptr + pid, xd_proj)

    c_range = tl.arange(0, BLOCK_C)
    hw_range = tl.arange(0, BLOCK_HW)
    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, sd, t, td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SCALE_DOT, HAS_SHIFT, HAS_SHIFT_DOT, BLOCK_C,
        )
        coef_a = (w * (1.0 + s))[:, None]
        coef_b = (b * (1.0 + s) + t)[:, None]
        w2 = w[:, None]
        b2 = b[:, None]
        sd2 = sd[:, None]
        td2 = td[:, None]
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            _dual_apply(X_ptr, XDot_ptr, Y_ptr, YDot_ptr, offsets, mask, mean, rstd, xd_mean, xd_proj,
                        coef_a, coef_b, w2, b2, sd2, td2, HAS_X_DOT, SILU)


@triton.jit
def _dual_upstream(
    X_ptr,
    XDot_ptr,
    DY_ptr,
    DYDot_ptr,
    offsets,
    mask,
    mean,
    rstd,
    xd_mean,
    xd_proj,
    coef_a,
    coef_b,
    w,
    b,
    sd,
    td,
    HAS_X_DOT: tl.constexpr,
    HAS_GRAD_Y: tl.constexpr,
    HAS_GRAD_Y_DOT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per element (n̂, ẋc, gz, gż) of the dual backward: the upstream grads at z and ż.

    gz = dy·silu'(z) + dẏ·ż·silu''(z),  gż = dẏ·silu'(z)   (gz = dy, gż = dẏ without SiLU).
    """
    x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    normed = (x - mean) * rstd
    z = normed * coef_a + coef_b
    if HAS_X_DOT:
        xd_centered = tl.load(XDot_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - xd_mean
        z_dot = rstd * (xd_centered - normed * xd_proj) * coef_a + (normed * w + b) * sd + td
    else:
        xd_centered = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        z_dot = (normed * w + b) * sd + td
    if HAS_GRAD_Y:
        gy = tl.load(DY_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        gy = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    if HAS_GRAD_Y_DOT:
        gyd = tl.load(DYDot_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        gyd = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
    if SILU:
        silu_z, d1, d2 = _silu_derivatives(z)
        gz = gy * d1 + gyd * z_dot * d2
        gzd = gyd * d1
    else:
        gz = gy
        gzd = gyd
    return normed, xd_centered, gz, gzd


@triton.jit
def _gn_film_silu_dual_bwd_kernel(
    X_ptr,
    XDot_ptr,
    Weight_ptr,
    Bias_ptr,
    Scale_ptr,
    ScaleDot_ptr,
    Shift_ptr,
    ShiftDot_ptr,
    DY_ptr,
    DYDot_ptr,
    Mean_ptr,
    Rstd_ptr,
    XDotMean_ptr,
    XDotProj_ptr,
    DX_ptr,
    DXDot_ptr,
    DWeightPartial_ptr,
    DBiasPartial_ptr,
    DScale_ptr,
    DScaleDot_ptr,
    DShift_ptr,
    DShiftDot_ptr,
    C,
    HW,
    G,
    CPG,
    Stride_c,
    Stride_hw,
    Scale_stride_n,
    ScaleDot_stride_n,
    Shift_stride_n,
    ShiftDot_stride_n,
    HAS_X_DOT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SCALE_DOT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SHIFT_DOT: tl.constexpr,
    HAS_GRAD_Y: tl.constexpr,
    HAS_GRAD_Y_DOT: tl.constexpr,
    NEEDS_GRAD_X_DOT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Backward of the dual kernel w.r.t. x, ẋ, γ, β, s, ṡ, t, ṫ; two reads of (x, ẋ, dy, dẏ).

    Derived by hand (checked against autograd through the reference in float64). With gz, gż from
    :func:`_dual_upstream` and per-channel sums P1 = Σgz, P2 = Σgz·n̂, Q1 = Σgż, Q2 = Σgż·n̂,
    Q4 = Σgż·ẋc, Q3 = Σgż·ṅ = r·(Q4 − k·Q2):
        dt = P1,  dṫ = Q1,  ds = γ·P2 + β·P1 + γ·Q3,  dṡ = γ·Q2 + β·Q1,
        dγ_n = (1 + s)·(P2 + Q3) + ṡ·Q2,  dβ_n = (1 + s)·P1 + ṡ·Q1.
    The grads at n̂ and ṅ are Gn = gz·A + gż·γ·ṡ and gṅ = gż·A. ṅ = r·P·ẋ with P the symmetric
    projection (I − 11ᵀ/M − n̂n̂ᵀ/M), so dẋ = r·(gṅ − E[gṅ] − n̂·E[gṅ·n̂]) (E = mean over the group),
    and, differentiating ṅ = r·ẋc − r³·(x − μ)·cov(x, ẋ) through μ, r and cov,
        dx = r·(Gn − E[Gn] − n̂·E[Gn·n̂])
             − r²·(n̂·(E[gṅ·ẋc] − 3k·E[gṅ·n̂]) + ẋc·E[gṅ·n̂] + k·(gṅ − E[gṅ])).
    The group means are Σ_c of per-channel sums: E[Gn] = Σ(A·P1 + γṡ·Q1)/M, E[Gn·n̂] =
    Σ(A·P2 + γṡ·Q2)/M, E[gṅ] = ΣA·Q1/M, E[gṅ·n̂] = ΣA·Q2/M, E[gṅ·ẋc] = ΣA·Q4/M.
    """
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    group_start = n.to(tl.int64) * C * HW + g * CPG * Stride_c
    mean = tl.load(Mean_ptr + pid)
    rstd = tl.load(Rstd_ptr + pid)
    xd_mean = tl.load(XDotMean_ptr + pid)
    xd_proj = tl.load(XDotProj_ptr + pid)
    c_range = tl.arange(0, BLOCK_C)
    hw_range = tl.arange(0, BLOCK_HW)

    sum_gn = tl.full([BLOCK_C], 0.0, tl.float32)
    sum_gn_n = tl.full([BLOCK_C], 0.0, tl.float32)
    sum_gnd = tl.full([BLOCK_C], 0.0, tl.float32)
    sum_gnd_n = tl.full([BLOCK_C], 0.0, tl.float32)
    sum_gnd_xc = tl.full([BLOCK_C], 0.0, tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, sd, t, td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SCALE_DOT, HAS_SHIFT, HAS_SHIFT_DOT, BLOCK_C,
        )
        coef_a = w * (1.0 + s)
        coef_b = b * (1.0 + s) + t
        acc_p1 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        acc_p2 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        acc_q1 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        acc_q2 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        acc_q4 = tl.full([BLOCK_C, BLOCK_HW], 0.0, tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            normed, xd_centered, gz, gzd = _dual_upstream(
                X_ptr, XDot_ptr, DY_ptr, DYDot_ptr, offsets, mask, mean, rstd, xd_mean, xd_proj,
                coef_a[:, None], coef_b[:, None], w[:, None], b[:, None], sd[:, None], td[:, None],
                HAS_X_DOT, HAS_GRAD_Y, HAS_GRAD_Y_DOT, SILU, BLOCK_C, BLOCK_HW,
            )
            acc_p1 += gz
            acc_p2 += gz * normed
            acc_q1 += gzd
            acc_q2 += gzd * normed
            acc_q4 += tl.where(mask, gzd * xd_centered, 0.0)
        p1 = tl.sum(acc_p1, axis=1)
        p2 = tl.sum(acc_p2, axis=1)
        q1 = tl.sum(acc_q1, axis=1)
        q2 = tl.sum(acc_q2, axis=1)
        q4 = tl.sum(acc_q4, axis=1)
        q3 = rstd * (q4 - xd_proj * q2)
        _store_dual_param_grads(DShift_ptr, DShiftDot_ptr, DScale_ptr, DScaleDot_ptr, DWeightPartial_ptr,
                                DBiasPartial_ptr, n * C + g * CPG + channels, c_mask, p1, p2, q1, q2, q3, w, b, s, sd)
        sum_gn += tl.where(c_mask, coef_a * p1 + w * sd * q1, 0.0)
        sum_gn_n += tl.where(c_mask, coef_a * p2 + w * sd * q2, 0.0)
        sum_gnd += tl.where(c_mask, coef_a * q1, 0.0)
        sum_gnd_n += tl.where(c_mask, coef_a * q2, 0.0)
        sum_gnd_xc += tl.where(c_mask, coef_a * q4, 0.0)
    group_size = CPG * HW
    mean_gn = tl.sum(sum_gn, axis=0) / group_size
    mean_gn_n = tl.sum(sum_gn_n, axis=0) / group_size
    mean_gnd = tl.sum(sum_gnd, axis=0) / group_size
    mean_gnd_n = tl.sum(sum_gnd_n, axis=0) / group_size
    mean_gnd_xc = tl.sum(sum_gnd_xc, axis=0) / group_size
    normed_coef = mean_gnd_xc - 3.0 * xd_proj * mean_gnd_n

    for c0 in range(0, CPG, BLOCK_C):
        channels = c0 + c_range
        c_mask = channels < CPG
        w, b, s, sd, t, td = _load_film_coefficients(
            Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr, n, g, CPG, channels, c_mask,
            Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SCALE_DOT, HAS_SHIFT, HAS_SHIFT_DOT, BLOCK_C,
        )
        coef_a = (w * (1.0 + s))[:, None]
        coef_b = (b * (1.0 + s) + t)[:, None]
        w_sd = (w * sd)[:, None]
        for hw0 in range(0, HW, BLOCK_HW):
            positions = hw0 + hw_range
            mask = c_mask[:, None] & (positions < HW)[None, :]
            offsets = group_start + channels[:, None] * Stride_c + positions[None, :] * Stride_hw
            normed, xd_centered, gz, gzd = _dual_upstream(
                X_ptr, XDot_ptr, DY_ptr, DYDot_ptr, offsets, mask, mean, rstd, xd_mean, xd_proj,
                coef_a, coef_b, w[:, None], b[:, None], sd[:, None], td[:, None],
                HAS_X_DOT, HAS_GRAD_Y, HAS_GRAD_Y_DOT, SILU, BLOCK_C, BLOCK_HW,
            )
            _dual_bwd_store_dx(DX_ptr, DXDot_ptr, offsets, mask, normed, xd_centered, gz, gzd, rstd, xd_proj,
                               coef_a, w_sd, mean_gn, mean_gn_n, mean_gnd, mean_gnd_n, normed_coef, NEEDS_GRAD_X_DOT)


# ----------------------------------------------------------------------------------------------
# channels_last kernels: one program per (sample, block of GPP whole groups)
# ----------------------------------------------------------------------------------------------
# In channels_last a group's CPG channels are the only contiguous run at each position (8 bytes
# at CPG = 4 in bf16: a quarter of a 32-byte sector), so a program per (n, g) wastes most of each
# sector it touches. These kernels give each program GPP consecutive groups (≥ _CL_CHANNELS
# contiguous channels) and a (BLOCK_HW, BLOCK_CH) tile with channels fastest; per-group sums come
# from a (BLOCK_CH, BLOCK_G) one-hot reduction of per-channel sums, and group values go back to
# channels the same way. Same math, same saved statistics, same outputs as the kernels above.


@triton.jit
def _cl_program(C, HW, G, CPG, GPP, BLOCK_CH: tl.constexpr, BLOCK_G: tl.constexpr):
    """(n, absolute channels, channel mask, one-hot (BLOCK_CH, BLOCK_G), group indices, group mask,
    element offset of sample n) for this program's block of groups."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(G, GPP)
    n = pid // num_blocks
    g0 = (pid % num_blocks) * GPP
    j = tl.arange(0, BLOCK_CH)
    q = tl.arange(0, BLOCK_G)
    channels = g0 * CPG + j
    c_mask = (j < GPP * CPG) & (channels < C)
    onehot = ((j // CPG)[:, None] == q[None, :]) & c_mask[:, None]
    groups = g0 + q
    g_mask = (q < GPP) & (groups < G)
    return n, channels, c_mask, onehot, groups, g_mask, n.to(tl.int64) * HW * C


@triton.jit
def _cl_tile(base, positions, channels, c_mask, C, HW):
    """(mask, element offsets) of the (positions, channels) tile of a channels_last sample."""
    mask = (positions < HW)[:, None] & c_mask[None, :]
    return mask, base + positions[:, None] * C + channels[None, :]


@triton.jit
def _to_groups(v, onehot):
    """Per-channel values (BLOCK_CH,) → their per-group sums (BLOCK_G,)."""
    return tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)


@triton.jit
def _to_channels(gv, onehot):
    """Per-group values (BLOCK_G,) → each channel's group value (BLOCK_CH,)."""
    return tl.sum(tl.where(onehot, gv[None, :], 0.0), axis=1)


@triton.jit
def _cl_group_moments(
    X_ptr, XDot_ptr, base, channels, c_mask, onehot, C, HW, CPG,
    HAS_X_DOT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CH: tl.constexpr,
):
    """Per-channel (μ, var, mean(ẋ), cov(x, ẋ)) of each channel's group, float32 (BLOCK_CH,) each.

    Welford per lane over the positions (one read), merged per channel and then per group with
    Chan et al.'s formula, as :func:`_group_moments` does for one group.
    """
    hw_range = tl.arange(0, BLOCK_HW)
    count = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    x_mean = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    x_m2 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    xd_mean = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    x_xd_c2 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        count, x_mean, x_m2, xd_mean, x_xd_c2 = _welford_step(
            X_ptr, XDot_ptr, offsets, mask, count, x_mean, x_m2, xd_mean, x_xd_c2, HAS_X_DOT
        )
    group_size = CPG * HW
    mean = _to_channels(_to_groups(tl.sum(count * x_mean, axis=0), onehot) / group_size, onehot)
    x_shift = x_mean - mean[None, :]
    var = _to_channels(_to_groups(tl.sum(x_m2 + count * x_shift * x_shift, axis=0), onehot) / group_size, onehot)
    if HAS_X_DOT:
        xd_total = _to_channels(_to_groups(tl.sum(count * xd_mean, axis=0), onehot) / group_size, onehot)
        cov_c = tl.sum(x_xd_c2 + count * x_shift * (xd_mean - xd_total[None, :]), axis=0)
        cov = _to_channels(_to_groups(cov_c, onehot) / group_size, onehot)
    else:
        xd_total = mean * 0.0
        cov = mean * 0.0
    return mean, var, xd_total, cov


@triton.jit
def _cl_store_group_stat(Stat_ptr, values, onehot, n, G, groups, g_mask):
    """Store a group statistic held by every channel of its group once per group: (N, G) float32."""
    group_values = tl.max(tl.where(onehot, values[:, None], float("-inf")), axis=0)
    tl.store(Stat_ptr + n * G + groups, group_values, mask=g_mask)


@triton.jit
def _gn_film_silu_cl_fwd_kernel(
    X_ptr, Weight_ptr, Bias_ptr, Scale_ptr, Shift_ptr, Y_ptr, Mean_ptr, Rstd_ptr,
    C, HW, G, CPG, GPP, Scale_stride_n, Shift_stride_n, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """:func:`_gn_film_silu_fwd_kernel` for channels_last x, GPP groups per program."""
    n, channels, c_mask, onehot, groups, g_mask, base = _cl_program(C, HW, G, CPG, GPP, BLOCK_CH, BLOCK_G)
    mean, var, unused_xd_mean, unused_cov = _cl_group_moments(
        X_ptr, X_ptr, base, channels, c_mask, onehot, C, HW, CPG, False, BLOCK_HW, BLOCK_CH
    )
    rstd = 1.0 / tl.sqrt(var + eps)
    _cl_store_group_stat(Mean_ptr, mean, onehot, n, G, groups, g_mask)
    _cl_store_group_stat(Rstd_ptr, rstd, onehot, n, G, groups, g_mask)
    w, b, s, unused_sd, t, unused_td = _load_film_coefficients(
        Weight_ptr, Bias_ptr, Scale_ptr, Scale_ptr, Shift_ptr, Shift_ptr, n, 0, 0, channels, c_mask,
        Scale_stride_n, 0, Shift_stride_n, 0,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE, False, HAS_SHIFT, False, BLOCK_CH,
    )
    coef_a = (w * (1.0 + s) * rstd)[None, :]
    coef_b = (b * (1.0 + s) + t)[None, :]
    mean2 = mean[None, :]
    hw_range = tl.arange(0, BLOCK_HW)
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        x = tl.load(X_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean2) * coef_a + coef_b
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y_ptr + offsets, z.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_film_silu_cl_bwd_kernel(
    X_ptr, Weight_ptr, Bias_ptr, Scale_ptr, Shift_ptr, DY_ptr, Mean_ptr, Rstd_ptr,
    DX_ptr, DScale_ptr, DShift_ptr, DWeightPartial_ptr, DBiasPartial_ptr,
    C, HW, G, CPG, GPP, Scale_stride_n, Shift_stride_n,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """:func:`_gn_film_silu_bwd_kernel` (same formulas) for channels_last x, GPP groups per program."""
    n, channels, c_mask, onehot, groups, g_mask, base = _cl_program(C, HW, G, CPG, GPP, BLOCK_CH, BLOCK_G)
    mean = _to_channels(tl.load(Mean_ptr + n * G + groups, mask=g_mask, other=0.0), onehot)[None, :]
    rstd = _to_channels(tl.load(Rstd_ptr + n * G + groups, mask=g_mask, other=0.0), onehot)[None, :]
    w, b, s, unused_sd, t, unused_td = _load_film_coefficients(
        Weight_ptr, Bias_ptr, Scale_ptr, Scale_ptr, Shift_ptr, Shift_ptr, n, 0, 0, channels, c_mask,
        Scale_stride_n, 0, Shift_stride_n, 0,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE, False, HAS_SHIFT, False, BLOCK_CH,
    )
    coef_a = w * (1.0 + s)
    coef_b = b * (1.0 + s) + t
    hw_range = tl.arange(0, BLOCK_HW)
    acc_gz = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    acc_gz_n = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        normed, gz = _plain_upstream(X_ptr, DY_ptr, offsets, mask, mean, rstd, coef_a[None, :], coef_b[None, :], SILU)
        acc_gz += gz
        acc_gz_n += tl.where(mask, gz * normed, 0.0)
    s1 = tl.sum(acc_gz, axis=0)
    s2 = tl.sum(acc_gz_n, axis=0)
    _store_plain_param_grads(DShift_ptr, DScale_ptr, DWeightPartial_ptr, DBiasPartial_ptr,
                             n * C + channels, c_mask, s1, s2, w, b, s)
    group_size = CPG * HW
    mean_gn = _to_channels(_to_groups(coef_a * s1, onehot) / group_size, onehot)[None, :]
    mean_gn_n = _to_channels(_to_groups(coef_a * s2, onehot) / group_size, onehot)[None, :]
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        normed, gz = _plain_upstream(X_ptr, DY_ptr, offsets, mask, mean, rstd, coef_a[None, :], coef_b[None, :], SILU)
        dx = rstd * (gz * coef_a[None, :] - mean_gn - normed * mean_gn_n)
        tl.store(DX_ptr + offsets, dx.to(DX_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_film_silu_cl_dual_kernel(
    X_ptr, XDot_ptr, Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr,
    Y_ptr, YDot_ptr, Mean_ptr, Rstd_ptr, XDotMean_ptr, XDotProj_ptr,
    C, HW, G, CPG, GPP, Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n, eps,
    HAS_X_DOT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SCALE_DOT: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SHIFT_DOT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """:func:`_gn_film_silu_dual_kernel` for channels_last x, GPP groups per program."""
    n, channels, c_mask, onehot, groups, g_mask, base = _cl_program(C, HW, G, CPG, GPP, BLOCK_CH, BLOCK_G)
    mean, var, xd_mean, cov = _cl_group_moments(
        X_ptr, XDot_ptr, base, channels, c_mask, onehot, C, HW, CPG, HAS_X_DOT, BLOCK_HW, BLOCK_CH
    )
    rstd = 1.0 / tl.sqrt(var + eps)
    xd_proj = rstd * cov
    _cl_store_group_stat(Mean_ptr, mean, onehot, n, G, groups, g_mask)
    _cl_store_group_stat(Rstd_ptr, rstd, onehot, n, G, groups, g_mask)
    _cl_store_group_stat(XDotMean_ptr, xd_mean, onehot, n, G, groups, g_mask)
    _cl_store_group_stat(XDotProj_ptr, xd_proj, onehot, n, G, groups, g_mask)
    w, b, s, sd, t, td = _load_film_coefficients(
        Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr, n, 0, 0, channels, c_mask,
        Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SCALE_DOT, HAS_SHIFT, HAS_SHIFT_DOT, BLOCK_CH,
    )
    coef_a = (w * (1.0 + s))[None, :]
    coef_b = (b * (1.0 + s) + t)[None, :]
    mean2, rstd2, xd_mean2, xd_proj2 = mean[None, :], rstd[None, :], xd_mean[None, :], xd_proj[None, :]
    hw_range = tl.arange(0, BLOCK_HW)
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        _dual_apply(X_ptr, XDot_ptr, Y_ptr, YDot_ptr, offsets, mask, mean2, rstd2, xd_mean2, xd_proj2,
                    coef_a, coef_b, w[None, :], b[None, :], sd[None, :], td[None, :], HAS_X_DOT, SILU)


@triton.jit
def _gn_film_silu_cl_dual_bwd_kernel(
    X_ptr, XDot_ptr, Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr,
    DY_ptr, DYDot_ptr, Mean_ptr, Rstd_ptr, XDotMean_ptr, XDotProj_ptr,
    DX_ptr, DXDot_ptr, DWeightPartial_ptr, DBiasPartial_ptr, DScale_ptr, DScaleDot_ptr, DShift_ptr, DShiftDot_ptr,
    C, HW, G, CPG, GPP, Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
    HAS_X_DOT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SCALE_DOT: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SHIFT_DOT: tl.constexpr, HAS_GRAD_Y: tl.constexpr, HAS_GRAD_Y_DOT: tl.constexpr,
    NEEDS_GRAD_X_DOT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """:func:`_gn_film_silu_dual_bwd_kernel` (same formulas) for channels_last x, GPP groups per program."""
    n, channels, c_mask, onehot, groups, g_mask, base = _cl_program(C, HW, G, CPG, GPP, BLOCK_CH, BLOCK_G)
    stat_offsets = n * G + groups
    mean = _to_channels(tl.load(Mean_ptr + stat_offsets, mask=g_mask, other=0.0), onehot)
    rstd = _to_channels(tl.load(Rstd_ptr + stat_offsets, mask=g_mask, other=0.0), onehot)
    xd_mean = _to_channels(tl.load(XDotMean_ptr + stat_offsets, mask=g_mask, other=0.0), onehot)
    xd_proj = _to_channels(tl.load(XDotProj_ptr + stat_offsets, mask=g_mask, other=0.0), onehot)
    w, b, s, sd, t, td = _load_film_coefficients(
        Weight_ptr, Bias_ptr, Scale_ptr, ScaleDot_ptr, Shift_ptr, ShiftDot_ptr, n, 0, 0, channels, c_mask,
        Scale_stride_n, ScaleDot_stride_n, Shift_stride_n, ShiftDot_stride_n,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SCALE_DOT, HAS_SHIFT, HAS_SHIFT_DOT, BLOCK_CH,
    )
    coef_a = w * (1.0 + s)
    coef_b = b * (1.0 + s) + t
    hw_range = tl.arange(0, BLOCK_HW)
    acc_p1 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    acc_p2 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    acc_q1 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    acc_q2 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    acc_q4 = tl.full([BLOCK_HW, BLOCK_CH], 0.0, tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        normed, xd_centered, gz, gzd = _dual_upstream(
            X_ptr, XDot_ptr, DY_ptr, DYDot_ptr, offsets, mask, mean[None, :], rstd[None, :],
            xd_mean[None, :], xd_proj[None, :], coef_a[None, :], coef_b[None, :], w[None, :], b[None, :],
            sd[None, :], td[None, :], HAS_X_DOT, HAS_GRAD_Y, HAS_GRAD_Y_DOT, SILU, BLOCK_HW, BLOCK_CH,
        )
        acc_p1 += gz
        acc_p2 += tl.where(mask, gz * normed, 0.0)
        acc_q1 += gzd
        acc_q2 += tl.where(mask, gzd * normed, 0.0)
        acc_q4 += tl.where(mask, gzd * xd_centered, 0.0)
    p1 = tl.sum(acc_p1, axis=0)
    p2 = tl.sum(acc_p2, axis=0)
    q1 = tl.sum(acc_q1, axis=0)
    q2 = tl.sum(acc_q2, axis=0)
    q4 = tl.sum(acc_q4, axis=0)
    q3 = rstd * (q4 - xd_proj * q2)
    _store_dual_param_grads(DShift_ptr, DShiftDot_ptr, DScale_ptr, DScaleDot_ptr, DWeightPartial_ptr,
                            DBiasPartial_ptr, n * C + channels, c_mask, p1, p2, q1, q2, q3, w, b, s, sd)
    group_size = CPG * HW
    mean_gn = _to_channels(_to_groups(coef_a * p1 + w * sd * q1, onehot) / group_size, onehot)[None, :]
    mean_gn_n = _to_channels(_to_groups(coef_a * p2 + w * sd * q2, onehot) / group_size, onehot)[None, :]
    mean_gnd = _to_channels(_to_groups(coef_a * q1, onehot) / group_size, onehot)[None, :]
    mean_gnd_n = _to_channels(_to_groups(coef_a * q2, onehot) / group_size, onehot)[None, :]
    mean_gnd_xc = _to_channels(_to_groups(coef_a * q4, onehot) / group_size, onehot)[None, :]
    normed_coef = mean_gnd_xc - 3.0 * xd_proj[None, :] * mean_gnd_n
    rstd2, xd_proj2 = rstd[None, :], xd_proj[None, :]
    coef_a2, w_sd = coef_a[None, :], (w * sd)[None, :]
    for hw0 in range(0, HW, BLOCK_HW):
        mask, offsets = _cl_tile(base, hw0 + hw_range, channels, c_mask, C, HW)
        normed, xd_centered, gz, gzd = _dual_upstream(
            X_ptr, XDot_ptr, DY_ptr, DYDot_ptr, offsets, mask, mean[None, :], rstd2,
            xd_mean[None, :], xd_proj2, coef_a2, coef_b[None, :], w[None, :], b[None, :],
            sd[None, :], td[None, :], HAS_X_DOT, HAS_GRAD_Y, HAS_GRAD_Y_DOT, SILU, BLOCK_HW, BLOCK_CH,
        )
        _dual_bwd_store_dx(DX_ptr, DXDot_ptr, offsets, mask, normed, xd_centered, gz, gzd, rstd2, xd_proj2,
                           coef_a2, w_sd, mean_gn, mean_gn_n, mean_gnd, mean_gnd_n, normed_coef, NEEDS_GRAD_X_DOT)


_KERNELS = {
    "fwd": _gn_film_silu_fwd_kernel, "bwd": _gn_film_silu_bwd_kernel,
    "dual": _gn_film_silu_dual_kernel, "dual_bwd": _gn_film_silu_dual_bwd_kernel,
}
_CL_KERNELS = {
    "fwd": _gn_film_silu_cl_fwd_kernel, "bwd": _gn_film_silu_cl_bwd_kernel,
    "dual": _gn_film_silu_cl_dual_kernel, "dual_bwd": _gn_film_silu_cl_dual_bwd_kernel,
}


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

# Elements per (BLOCK_C, BLOCK_HW) tile. Sized from ptxas register counts for sm_90 (triton 3.8,
# 8 warps): 2-D tiles keep the per-channel vectors replicated, so the backward and dual kernels
# (more live values per element) use 1024 to stay at <= ~128 registers without spills.
_TILE_ELEMENTS = {"fwd": 2048, "bwd": 1024, "dual": 1024, "dual_bwd": 1024}
_POISON_OUTPUTS = os.environ.get("FASTFLOW_TRITON_POISON", "0") == "1"


def set_poison_outputs(enabled: bool) -> bool:
    """Debug mode: NaN-fill output buffers before the kernels write them. Returns the old value."""
    global _POISON_OUTPUTS
    previous, _POISON_OUTPUTS = _POISON_OUTPUTS, bool(enabled)
    return previous


def _launch_config(channels_per_group: int, hw: int, kind: str, channels_last: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps): a ≤ _TILE_ELEMENTS[kind] tile over one group's (CPG, HW).

    The tile spans the contiguous axis first: positions for NCHW, the group's channels for
    channels_last. channels_last normally runs the grouped kernels (:func:`_cl_launch_config`);
    this per-group tile serves it only when a group is wider than one tile.
    """
    tile = _TILE_ELEMENTS[kind]
    if channels_last:
        block_c = min(triton.next_power_of_2(max(channels_per_group, 1)), tile)
        block_hw = min(triton.next_power_of_2(max(hw, 1)), max(1, tile // block_c))
    else:
        block_hw = min(triton.next_power_of_2(max(hw, 1)), tile)
        block_c = min(triton.next_power_of_2(max(channels_per_group, 1)), max(1, tile // block_hw))
    num_warps = max(1, min(8, (block_c * block_hw) // 128))
    return block_c, block_hw, num_warps


# channels_last: a program covers whole groups adding up to at least this many contiguous channels
# (64 bytes in bf16: two full 32-byte sectors per position, where one group of 4 fills a quarter).
_CL_CHANNELS = 32


def _cl_launch_config(channels_per_group: int, groups: int, hw: int, kind: str) -> Optional[Tuple[int, ...]]:
    """(GPP, BLOCK_HW, BLOCK_CH, BLOCK_G, num_warps) for the channels_last grouped kernels, or None
    when one group's channels exceed a tile (the per-group strided kernels take those)."""
    tile = _TILE_ELEMENTS[kind]
    if channels_per_group > tile:
        return None
    per_program = max(1, min(groups, _CL_CHANNELS // channels_per_group))
    block_ch = triton.next_power_of_2(per_program * channels_per_group)  # <= tile: tiles are powers of 2
    block_hw = min(triton.next_power_of_2(max(hw, 1)), max(1, tile // block_ch))
    num_warps = max(1, min(8, (block_ch * block_hw) // 128))
    return per_program, block_hw, block_ch, triton.next_power_of_2(per_program), num_warps


def _data_layout(x: Tensor) -> Tuple[torch.memory_format, int, int]:
    """(memory format, Stride_c, Stride_hw) the kernels run ``x``'s layout in, without a copy.

    NCHW-contiguous x and 4-D channels_last x run as they are (outputs in the same format, so a
    channels_last UNet stays channels_last through its norms); any other strides are copied to
    NCHW. A tensor that is both (C = 1 or H·W = 1) counts as NCHW: the addresses are the same.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last, 1, x.shape[1]
    hw = 1
    for size in x.shape[2:]:
        hw *= size
    return torch.contiguous_format, hw, 1


def _in_layout(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``t`` in ``memory_format`` (no copy when it already is)."""
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


def _new_output(shape, dtype: torch.dtype, device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if _POISON_OUTPUTS else out


def _new_like(x: Tensor, memory_format: torch.memory_format, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An output of x's shape in the layout the kernels run (also the fake kernels' answer)."""
    return _new_output(x.shape, x.dtype if dtype is None else dtype, x.device, memory_format)


def _check_inputs(x: Tensor, groups: int) -> Tuple[int, int, int]:
    if x.dim() < 2:
        raise ValueError(f"gn_film_silu: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # float64 would be loaded and computed as float32 and stored back as float64 without a word.
        raise TypeError(f"gn_film_silu: unsupported dtype {x.dtype} (float32, float16, bfloat16)")
    n_batch, channels = x.shape[0], x.shape[1]
    if groups <= 0 or channels % groups != 0:
        raise ValueError(f"gn_film_silu: channels={channels} not divisible by groups={groups}")
    hw = 1
    for size in x.shape[2:]:
        hw *= size
    return n_batch, channels, hw


def _channel_arg(p: Optional[Tensor], channels: int, like: Tensor) -> Tensor:
    """A (C,) parameter as a contiguous pointer argument (``like`` stands in for None)."""
    if p is None:
        return like
    if p.numel() != channels:
        raise ValueError(f"gn_film_silu: weight/bias must have C={channels} elements, got {tuple(p.shape)}")
    return p.reshape(channels).contiguous()


def _film_arg(p: Optional[Tensor], n_batch: int, channels: int, like: Tensor) -> Tuple[Tensor, int]:
    """A FiLM parameter of shape (N|1, C, 1, ...) or (C,) as (pointer argument, row stride)."""
    if p is None:
        return like, 0
    rows = 1 if p.dim() == 1 else p.shape[0]
    if rows not in (1, n_batch) or p.numel() != rows * channels:
        raise ValueError(
            f"gn_film_silu: scale/shift must be (N, C) or (C,) with N={n_batch}, C={channels}; "
            f"got {tuple(p.shape)}"
        )
    p2 = p.reshape(rows, channels)
    if p2.stride(1) != 1:
        p2 = p2.contiguous()
    return p2, (p2.stride(0) if rows == n_batch and n_batch > 1 else 0)


def _launch(kind: str, n_batch: int, channels: int, hw: int, groups: int, stride_c: int, stride_hw: int,
            pointers: tuple, film_strides: tuple, tail: tuple, flags: dict) -> None:
    """Launch ``kind``'s kernel: the grouped channels_last one when channels are the contiguous
    axis (channels_last, or H·W = 1), else the per-group one with x's strides."""
    cpg = channels // groups
    grouped = _cl_launch_config(cpg, groups, hw, kind) if stride_c == 1 else None
    if grouped is not None:
        per_program, block_hw, block_ch, block_g, num_warps = grouped
        _CL_KERNELS[kind][(n_batch * triton.cdiv(groups, per_program),)](
            *pointers, channels, hw, groups, cpg, per_program, *film_strides, *tail, **flags,
            BLOCK_HW=block_hw, BLOCK_CH=block_ch, BLOCK_G=block_g, num_warps=num_warps,
        )
        return
    block_c, block_hw, num_warps = _launch_config(cpg, hw, kind, stride_c == 1)
    _KERNELS[kind][(n_batch * groups,)](
        *pointers, channels, hw, groups, cpg, stride_c, stride_hw, *film_strides, *tail, **flags,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )


def _gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, silu):
    """Launch the forward kernel: (y, mean, rstd) with mean/rstd (N, G) float32."""
    n_batch, channels, hw = _check_inputs(x, groups)
    layout, stride_c, stride_hw = _data_layout(x)
    x_c = _in_layout(x, layout)
    y = _new_like(x, layout)
    mean = _new_output((n_batch, groups), torch.float32, x.device)
    rstd = _new_output((n_batch, groups), torch.float32, x.device)
    if x.numel() == 0:
        return y, mean, rstd
    scale_arg, scale_stride = _film_arg(scale, n_batch, channels, x_c)
    shift_arg, shift_stride = _film_arg(shift, n_batch, channels, x_c)
    _launch(
        "fwd", n_batch, channels, hw, groups, stride_c, stride_hw,
        (x_c, _channel_arg(weight, channels, x_c), _channel_arg(bias, channels, x_c), scale_arg, shift_arg,
         y, mean, rstd),
        (scale_stride, shift_stride), (float(eps),),
        dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
             HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu)),
    )
    return y, mean, rstd


def _gn_film_silu_bwd(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, silu):
    """Launch the backward kernel: (dx, dweight (C,), dbias (C,), dscale (N, C), dshift (N, C)).

    Parameter grads are float32 and unreduced over a broadcast FiLM batch dim; callers reduce/cast.
    """
    n_batch, channels, hw = _check_inputs(x, groups)
    layout, stride_c, stride_hw = _data_layout(x)
    x_c = _in_layout(x, layout)
    dx = _new_like(x, layout)
    nc = (n_batch, channels)
    dscale = _new_output(nc, torch.float32, x.device)
    dshift = _new_output(nc, torch.float32, x.device)
    dweight_partial = _new_output(nc, torch.float32, x.device)
    dbias_partial = _new_output(nc, torch.float32, x.device)
    if x.numel() > 0:
        scale_arg, scale_stride = _film_arg(scale, n_batch, channels, x_c)
        shift_arg, shift_stride = _film_arg(shift, n_batch, channels, x_c)
        _launch(
            "bwd", n_batch, channels, hw, groups, stride_c, stride_hw,
            (x_c, _channel_arg(weight, channels, x_c), _channel_arg(bias, channels, x_c), scale_arg, shift_arg,
             _in_layout(grad_y, layout), mean, rstd, dx, dscale, dshift, dweight_partial, dbias_partial),
            (scale_stride, shift_stride), (),
            dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu)),
        )
    return dx, dweight_partial.sum(0), dbias_partial.sum(0), dscale, dshift


def _gn_film_silu_dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu):
    """Launch the dual kernel: (y, ẏ, mean, rstd, mean_g(ẋ), k), the last four (N, G) float32."""
    n_batch, channels, hw = _check_inputs(x, groups)
    layout, stride_c, stride_hw = _data_layout(x)
    x_c = _in_layout(x, layout)
    if x_dot is not None and x_dot.shape != x.shape:
        raise ValueError(f"gn_film_silu_dual: x_dot shape {tuple(x_dot.shape)} != x shape {tuple(x.shape)}")
    x_dot_c = x_c if x_dot is None else _in_layout(x_dot, layout)
    y = _new_like(x, layout)
    y_dot = _new_like(x, layout)
    stats = [_new_output((n_batch, groups), torch.float32, x.device) for _ in range(4)]
    if x.numel() == 0:
        return (y, y_dot, *stats)
    scale_arg, scale_stride = _film_arg(scale, n_batch, channels, x_c)
    scale_dot_arg, scale_dot_stride = _film_arg(scale_dot, n_batch, channels, x_c)
    shift_arg, shift_stride = _film_arg(shift, n_batch, channels, x_c)
    shift_dot_arg, shift_dot_stride = _film_arg(shift_dot, n_batch, channels, x_c)
    _launch(
        "dual", n_batch, channels, hw, groups, stride_c, stride_hw,
        (x_c, x_dot_c, _channel_arg(weight, channels, x_c), _channel_arg(bias, channels, x_c),
         scale_arg, scale_dot_arg, shift_arg, shift_dot_arg, y, y_dot, *stats),
        (scale_stride, scale_dot_stride, shift_stride, shift_dot_stride), (float(eps),),
        dict(HAS_X_DOT=x_dot is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
             HAS_SCALE=scale is not None, HAS_SCALE_DOT=scale_dot is not None,
             HAS_SHIFT=shift is not None, HAS_SHIFT_DOT=shift_dot is not None, SILU=bool(silu)),
    )
    return (y, y_dot, *stats)


def _dual_grad_x_dot_output(x: Tensor, x_dot: Optional[Tensor], needs_grad_x_dot: bool) -> Tensor:
    """dẋ's buffer: x's shape and layout in ẋ's dtype, or an empty placeholder when not needed."""
    if not needs_grad_x_dot:
        return _new_output((0,), x.dtype, x.device)
    return _new_like(x, _data_layout(x)[0], dtype=x.dtype if x_dot is None else x_dot.dtype)


def _gn_film_silu_dual_bwd(
    grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot,
    mean, rstd, x_dot_mean, x_dot_proj, groups, silu, needs_grad_x_dot,
):
    """Launch the dual backward kernel.

    Returns (dx, dẋ, dweight (C,), dbias (C,), dscale, dscale_dot, dshift, dshift_dot (N, C));
    dẋ is an empty tensor unless ``needs_grad_x_dot``. Parameter grads are float32.
    """
    n_batch, channels, hw = _check_inputs(x, groups)
    layout, stride_c, stride_hw = _data_layout(x)
    x_c = _in_layout(x, layout)
    x_dot_c = x_c if x_dot is None else _in_layout(x_dot, layout)
    dx = _new_like(x, layout)
    dx_dot = _dual_grad_x_dot_output(x, x_dot, needs_grad_x_dot)
    nc = (n_batch, channels)
    dweight_partial, dbias_partial, dscale, dscale_dot, dshift, dshift_dot = (
        _new_output(nc, torch.float32, x.device) for _ in range(6)
    )
    if x.numel() > 0:
        scale_arg, scale_stride = _film_arg(scale, n_batch, channels, x_c)
        scale_dot_arg, scale_dot_stride = _film_arg(scale_dot, n_batch, channels, x_c)
        shift_arg, shift_stride = _film_arg(shift, n_batch, channels, x_c)
        shift_dot_arg, shift_dot_stride = _film_arg(shift_dot, n_batch, channels, x_c)
        _launch(
            "dual_bwd", n_batch, channels, hw, groups, stride_c, stride_hw,
            (x_c, x_dot_c, _channel_arg(weight, channels, x_c), _channel_arg(bias, channels, x_c),
             scale_arg, scale_dot_arg, shift_arg, shift_dot_arg,
             x_c if grad_y is None else _in_layout(grad_y, layout),
             x_c if grad_y_dot is None else _in_layout(grad_y_dot, layout),
             mean, rstd, x_dot_mean, x_dot_proj,
             dx, dx if not needs_grad_x_dot else dx_dot,
             dweight_partial, dbias_partial, dscale, dscale_dot, dshift, dshift_dot),
            (scale_stride, scale_dot_stride, shift_stride, shift_dot_stride), (),
            dict(HAS_X_DOT=x_dot is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SCALE_DOT=scale_dot is not None,
                 HAS_SHIFT=shift is not None, HAS_SHIFT_DOT=shift_dot is not None,
                 HAS_GRAD_Y=grad_y is not None, HAS_GRAD_Y_DOT=grad_y_dot is not None,
                 NEEDS_GRAD_X_DOT=bool(needs_grad_x_dot), SILU=bool(silu)),
        )
    return (
        dx, dx_dot, dweight_partial.sum(0), dbias_partial.sum(0), dscale, dscale_dot, dshift, dshift_dot,
    )


# ----------------------------------------------------------------------------------------------
# Custom operators (torch.compile) and the autograd.Function (eager, forward-mode AD)
# ----------------------------------------------------------------------------------------------

_NAMESPACE = "fastflow_triton"


@torch.library.custom_op(f"{_NAMESPACE}::gn_film_silu_fwd", mutates_args=())
def _fwd_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    groups: int,
    eps: float,
    silu: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, silu)


@_fwd_op.register_fake
def _(x, weight, bias, scale, shift, groups, eps, silu):
    stats = (x.shape[0], groups)
    y = _new_like(x, _data_layout(x)[0])
    return y, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::gn_film_silu_bwd", mutates_args=())
def _bwd_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    groups: int,
    silu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _gn_film_silu_bwd(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, silu)


@_bwd_op.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, silu):
    n_batch, channels = x.shape[0], x.shape[1]
    f32 = torch.float32
    return (
        _new_like(x, _data_layout(x)[0]),
        x.new_empty((channels,), dtype=f32),
        x.new_empty((channels,), dtype=f32),
        x.new_empty((n_batch, channels), dtype=f32),
        x.new_empty((n_batch, channels), dtype=f32),
    )


@torch.library.custom_op(f"{_NAMESPACE}::gn_film_silu_dual_fwd", mutates_args=())
def _dual_op(
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _gn_film_silu_dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu)


@_dual_op.register_fake
def _(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu):
    stats = [x.new_empty((x.shape[0], groups), dtype=torch.float32) for _ in range(4)]
    layout = _data_layout(x)[0]
    return (_new_like(x, layout), _new_like(x, layout), *stats)


@torch.library.custom_op(f"{_NAMESPACE}::gn_film_silu_dual_bwd", mutates_args=())
def _dual_bwd_op(
    grad_y: Optional[Tensor],
    grad_y_dot: Optional[Tensor],
    x: Tensor,
    x_dot: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    scale_dot: Optional[Tensor],
    shift: Optional[Tensor],
    shift_dot: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    x_dot_mean: Tensor,
    x_dot_proj: Tensor,
    groups: int,
    silu: bool,
    needs_grad_x_dot: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _gn_film_silu_dual_bwd(
        grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot,
        mean, rstd, x_dot_mean, x_dot_proj, groups, silu, needs_grad_x_dot,
    )


@_dual_bwd_op.register_fake
def _(grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot,
      mean, rstd, x_dot_mean, x_dot_proj, groups, silu, needs_grad_x_dot):
    n_batch, channels = x.shape[0], x.shape[1]
    f32 = torch.float32
    nc = [x.new_empty((n_batch, channels), dtype=f32) for _ in range(4)]
    return (
        _new_like(x, _data_layout(x)[0]),
        _dual_grad_x_dot_output(x, x_dot, needs_grad_x_dot),
        x.new_empty((channels,), dtype=f32),
        x.new_empty((channels,), dtype=f32),
        *nc,
    )


def _grad_like(grad: Tensor, p: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    """Reduce a float32 (N, C) / (C,) grad to parameter ``p``'s shape and dtype (None if unused)."""
    if p is None or not needed:
        return None
    if grad.dim() == 2 and (p.dim() == 1 or p.shape[0] == 1):
        grad = grad.sum(0)
    return grad.reshape(p.shape).to(p.dtype)


# Both autograd paths below (custom-op registration for torch.compile, autograd.Function eagerly)
# share these setup/backward bodies. Eagerly the backward operators run under no_grad
# (once_differentiable): a custom op reached with grad enabled enters its generated
# autograd.Function, which lacks setup_context and so breaks torch.func.grad (pytorch#168393).


def _plain_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scale, shift, groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.groups, ctx.eps, ctx.silu = groups, eps, silu


def _plain_backward(ctx, grad_y: Optional[Tensor]) -> tuple:
    """Grads for (x, weight, bias, scale, shift, groups, eps, silu) from the upstream grad of y."""
    if grad_y is None:
        return (None,) * 8
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dweight, dbias, dscale, dshift = _bwd_op(
        grad_y, x, weight, bias, scale, shift, mean, rstd, ctx.groups, ctx.silu
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


def _dual_setup_context(ctx, inputs, output) -> None:
    x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu = inputs
    _, _, mean, rstd, x_dot_mean, x_dot_proj = output
    ctx.mark_non_differentiable(mean, rstd, x_dot_mean, x_dot_proj)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, mean, rstd, x_dot_mean, x_dot_proj
    )
    ctx.groups, ctx.silu = groups, silu


def _dual_backward(ctx, grad_y: Optional[Tensor], grad_y_dot: Optional[Tensor]) -> tuple:
    """Grads for (x, ẋ, weight, bias, scale, ṡ, shift, ṫ, groups, eps, silu) from grads of y, ẏ."""
    if grad_y is None and grad_y_dot is None:
        return (None,) * 11
    x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, mean, rstd, x_dot_mean, x_dot_proj = (
        ctx.saved_tensors
    )
    needs = ctx.needs_input_grad
    needs_grad_x_dot = x_dot is not None and needs[1]
    dx, dx_dot, dweight, dbias, dscale, dscale_dot, dshift, dshift_dot = _dual_bwd_op(
        grad_y, grad_y_dot, x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot,
        mean, rstd, x_dot_mean, x_dot_proj, ctx.groups, ctx.silu, needs_grad_x_dot,
    )
    return (
        dx if needs[0] else None,
        dx_dot if needs_grad_x_dot else None,
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


_fwd_op.register_autograd(
    lambda ctx, grad_y, *_grad_stats: _plain_backward(ctx, grad_y),
    setup_context=_plain_setup_context,
)
_dual_op.register_autograd(
    lambda ctx, grad_y, grad_y_dot, *_grad_stats: _dual_backward(ctx, grad_y, grad_y_dot),
    setup_context=_dual_setup_context,
)


def _param_tangent_term(x, weight, bias, weight_dot, bias_dot, scale, shift, groups, eps, silu):
    """silu'(z)·(n̂·γ̇ + β̇)·(1 + s): the part of ẏ from weight/bias tangents, in PyTorch (float32).

    Only ``torch.func.jvp`` with tangents on the GroupNorm parameters reaches this. n̂ is
    recomputed from x, not from the kernel's saved (non-differentiable) mean and rstd, so that a
    backward through ẏ also sees how n̂ depends on x.
    """
    channels = x.shape[1]
    view = (1, channels) + (1,) * (x.dim() - 2)
    film_view = (-1, channels) + (1,) * (x.dim() - 2)
    normed = normalized_groups(x.float(), groups, eps)
    affine = normed if weight is None else normed * weight.float().reshape(view)
    if bias is not None:
        affine = affine + bias.float().reshape(view)
    term = torch.zeros_like(normed)
    if weight_dot is not None:
        term = term + normed * weight_dot.float().reshape(view)
    if bias_dot is not None:
        term = term + bias_dot.float().reshape(view)
    z = affine
    if scale is not None:
        film = 1 + scale.float().reshape(film_view)
        term, z = term * film, z * film
    if shift is not None:
        z = z + shift.float().reshape(film_view)
    if silu:
        sig = torch.sigmoid(z)
        term = term * (sig * (1 + z * (1 - sig)))
    return term


class GNFilmSiLUDualFunction(torch.autograd.Function):
    """Eager autograd for the dual op (works under ``torch.func.grad``/``vjp``).

    ``apply(x, ẋ, weight, bias, scale, ṡ, shift, ṫ, groups, eps, silu)``
    -> (y, ẏ, mean, rstd, mean_g(ẋ), k); the last four are non-differentiable statistics.
    """

    @staticmethod
    def forward(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu):
        return _gn_film_silu_dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dual_setup_context(ctx, inputs, output)

    @staticmethod
    @once_differentiable("gn_film_silu_dual")
    def backward(ctx, grad_y, grad_y_dot, *_grad_stats):
        return _dual_backward(ctx, grad_y, grad_y_dot)


class GNFilmSiLUFunction(torch.autograd.Function):
    """Eager autograd for the plain op: kernel backward and a kernel-backed ``jvp``.

    ``apply(x, weight, bias, scale, shift, groups, eps, silu) -> (y, mean, rstd)``; mean and rstd
    are non-differentiable statistics. ``jvp`` runs :class:`GNFilmSiLUDualFunction`, so a
    backward through ẏ (jvp-then-backward training losses) also runs kernels.
    """

    @staticmethod
    def forward(x, weight, bias, scale, shift, groups, eps, silu):
        return _gn_film_silu_fwd(x, weight, bias, scale, shift, groups, eps, silu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _plain_setup_context(ctx, inputs, output)
        x, weight, bias, scale, shift = inputs[:5]
        _, mean, rstd = output
        ctx.save_for_forward(x, weight, bias, scale, shift, mean, rstd)

    @staticmethod
    @once_differentiable("gn_film_silu")
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        return _plain_backward(ctx, grad_y)

    @staticmethod
    def jvp(ctx, x_dot, weight_dot, bias_dot, scale_dot, shift_dot, *_):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        groups, eps, silu = ctx.groups, ctx.eps, ctx.silu
        y_dot = None
        if x_dot is not None or scale_dot is not None or shift_dot is not None:
            y_dot = GNFilmSiLUDualFunction.apply(
                x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu
            )[1]
        if weight_dot is not None or bias_dot is not None:
            extra = _param_tangent_term(
                x, weight, bias, weight_dot, bias_dot, scale, shift, groups, eps, silu
            ).to(x.dtype)
            y_dot = extra if y_dot is None else y_dot + extra
        if y_dot is None:
            y_dot = torch.zeros_like(x)
        return y_dot, None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def gn_film_silu_triton(
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
    if torch.compiler.is_compiling():  # Dynamo cannot trace an autograd.Function with a custom jvp
        return _fwd_op(x, weight, bias, scale, shift, groups, eps, silu)[0]
    return GNFilmSiLUFunction.apply(x, weight, bias, scale, shift, groups, eps, silu)[0]


def gn_film_silu_dual_triton(
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
    """(y, ẏ) of :func:`gn_film_silu_triton`; ẏ is None when every tangent is None.

    Same contract as ``gn_film_silu_dual_reference``; differentiable in every input, tangents too.
    """
    if x_dot is None and scale_dot is None and shift_dot is None:
        return gn_film_silu_triton(x, weight, bias, scale, shift, groups, eps, silu), None
    dual = _dual_op if torch.compiler.is_compiling() else GNFilmSiLUDualFunction.apply
    y, y_dot, *_stats = dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu)
    return y, y_dot
