"""Triton attention kernels: forward, backward, dual (tangent) forward and dual backward.

Specification: :func:`fastflow.ops.reference.attention_reference` and
:func:`fastflow.ops.reference.attention_dual_reference`. Per batch and head, with c = 1/√D,

    S = Q·Kᵀ·c,   P = softmax(S) (row-wise),   O = P·V
    Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)·c,   μ = rowsum(P ⊙ Ṡ),   Ṗ = P ⊙ (Ṡ − μ)
    Ȯ = Ṗ·V + P·V̇ = (P ⊙ Ṡ)·V − μ·O + P·V̇

Every kernel follows FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", arXiv:2307.08691): tiles of keys stream past a tile of queries
with an online (running-max rescaled) softmax, only the row logsumexp (and, for the dual, μ) is
saved, and the backward recomputes P tile by tile. Nothing of size L×L is ever materialised.

All four parts are fused Triton kernels, none falls back to recomputation in PyTorch:

- ``_attention_fwd_kernel``: O and the row logsumexp, saved in base 2 (lse₂ = log₂ Σ_j 2^(S_ij·log₂e),
  the form the backward's exp2 consumes: no ln 2 / log₂e round trip in its rounding).
- ``_attention_bwd_preprocess_kernel`` + ``_attention_bwd_dkdv_kernel`` + ``_attention_bwd_dq_kernel``:
  the FA-2 backward (δ = rowsum(dO ⊙ O); dS = P ⊙ (dO·Vᵀ − δ); dQ = c·dS·K, dK = c·dSᵀ·Q,
  dV = Pᵀ·dO), one program per key tile for dK/dV and one per query tile for dQ (no atomics).
- ``_attention_dual_kernel``: O and Ȯ in one online pass (see its docstring), saves lse and μ.
- ``_attention_dual_bwd_dkdv_kernel`` + ``_attention_dual_bwd_dq_kernel``: gradients w.r.t. all
  six inputs (q, q̇, k, k̇, v, v̇) given G = ∂L/∂O and Ġ = ∂L/∂Ȯ. The gradient through the tangent
  output is kept (public JVP attention kernels drop it; Flow Map Matching's loss needs it).

Dual backward, derived (rows i, keys j; W = Ġ·Vᵀ − r, r = rowsum(Ġ ⊙ O), δ = rowsum(G ⊙ O + Ġ ⊙ Ȯ)):

    dV̇ = Pᵀ·Ġ                      dV = Pᵀ·G + Ṗᵀ·Ġ
    dṠ = P ⊙ W                     dS = P ⊙ (G·Vᵀ + Ġ·V̇ᵀ + W ⊙ (Ṡ − μ) − δ)
    dQ = c·(dS·K + dṠ·K̇)           dQ̇ = c·dṠ·K
    dK = c·(dSᵀ·Q + dṠᵀ·Q̇)         dK̇ = c·dṠᵀ·Q

(∂L/∂Ṗ = Ġ·Vᵀ gives dṠ = P ⊙ (Ġ·Vᵀ − rowsum(P ⊙ Ġ·Vᵀ)) and rowsum(P ⊙ Ġ·Vᵀ) = rowsum(Ġ ⊙ O) = r;
∂L/∂P = G·Vᵀ + Ġ·V̇ᵀ + Ġ·Vᵀ ⊙ (Ṡ − μ) − r·Ṡ, and the softmax backward subtracts its P-weighted row
sum, which collapses to G⊙O + Ġ⊙Ȯ − r·μ; the r·μ and r·Ṡ terms cancel into W ⊙ (Ṡ − μ).)

Layout and precision: q, k, v (and tangents/upstream grads) are (B, H, L, D); they are cast to
q's dtype and made contiguous (a copy only when they are not). Lq may differ from Lk, v's head
dim may differ from q's; L need not be a power of two (tiles are masked). Softmax statistics and
all accumulators are float32; P (and dS) tiles are cast to the input dtype before the
matmuls with V (and K, Q), as in FA-2. float32 inputs use exact-float32 dots ("ieee") unless
``torch.get_float32_matmul_precision()`` allows TF32. On the CPU the kernels run only under
``TRITON_INTERPRET=1`` (tests).

Autograd: ``fastflow_triton::attention_fwd`` and ``fastflow_triton::attention_dual_fwd`` are
``torch.library.custom_op``s with fake (meta) kernels and ``register_autograd`` backwards, so
``torch.compile`` traces them without graph breaks. In eager mode :func:`attention_triton` goes
through an ``autograd.Function`` whose ``jvp`` runs the dual kernel, so ``torch.func.jvp`` (and
``torch.autograd.forward_ad``) work and the tangent stays differentiable; it and the eager
:func:`attention_dual_triton` (another ``autograd.Function``) also work under
``torch.func.grad`` / ``vjp``, which custom ops with ``register_autograd`` do not. Dynamo refuses
``autograd.Function`` subclasses with a custom ``jvp`` (graph break), so under ``torch.compile``
the custom op is used instead, and custom ops have no forward-AD rule in torch: a
``torch.func.jvp`` traced by ``torch.compile`` through :func:`attention_triton` gets a silently
ZERO tangent from it (seen on torch 2.14.1). Compiled code that needs Ȯ must call :func:`attention_dual_triton`
explicitly. Not supported: double backward (it raises a RuntimeError naming the op, never a silent
constant gradient: fastflow/ops/autograd_guard.py) and ``vmap``.
"""

import contextlib
import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastflow.ops.autograd_guard import once_differentiable

__all__ = ["attention_triton", "attention_dual_triton"]

# Tests set this: every output buffer is NaN-filled before launch so unwritten elements show.
DEBUG_POISON_OUTPUTS = False
# Tests may set {"fwd": (BLOCK_M, BLOCK_N), ...} to force tile sizes (multi-tile / ragged cases).
DEBUG_BLOCK_OVERRIDE: Dict[str, Tuple[int, int]] = {}

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    seqlen_q, seqlen_k, num_m_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O = softmax(c·Q·Kᵀ)·V and lse₂ = log₂ Σ_j 2^(s_ij) for one (batch·head, query tile).

    Online softmax (FA-2, Alg. 1), in base 2: s = S·log2(e), m = running row max,
    l ← l·2^(m_old − m) + Σ_j 2^(s_j − m), acc ← acc·2^(m_old − m) + 2^(s − m)·V; O = acc / l.
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V

    q_ptrs = Q_ptr + bh * seqlen_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K_ptr + bh * seqlen_k * HEAD_DIM
    v_base = V_ptr + bh * seqlen_k * HEAD_DIM_V
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM_V + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    o_ptrs = O_ptr + bh * seqlen_q * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE_ptr + bh * seqlen_q + offs_m, lse2, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    O_ptr, dO_ptr, O_dot_ptr, dO_dot_ptr, Delta_ptr, R_ptr,
    seqlen_q, num_m_blocks,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DUAL: tl.constexpr,
):
    """Row statistics for the backward (FA-2, Alg. 2 line 4), float32:

    plain: δ = rowsum(dO ⊙ O).
    DUAL:  δ = rowsum(G ⊙ O + Ġ ⊙ Ȯ) and r = rowsum(Ġ ⊙ O), with G = dO, Ġ = dȮ.
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask = mask_m[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    offs = bh * seqlen_q * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :]
    o = tl.load(O_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dO_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(g * o, 1)
    if DUAL:
        o_dot = tl.load(O_dot_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_dot = tl.load(dO_dot_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta += tl.sum(g_dot * o_dot, 1)
        tl.store(R_ptr + bh * seqlen_q + offs_m, tl.sum(g_dot * o, 1), mask=mask_m)
    tl.store(Delta_ptr + bh * seqlen_q + offs_m, delta, mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, LSE_ptr, Delta_ptr, dK_ptr, dV_ptr,
    seqlen_q, seqlen_k, num_n_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK = c·dSᵀ·Q and dV = Pᵀ·dO for one key tile, streaming query tiles (FA-2, Alg. 2).

    Works on transposed tiles: Pᵀ = 2^(sᵀ − lse₂), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − δ).
    """
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = (pid // num_n_blocks).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V
    mask_nd = mask_n[:, None] & mask_d[None, :]
    mask_ndv = mask_n[:, None] & mask_dv[None, :]

    k_offs = bh * seqlen_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_offs = bh * seqlen_k * HEAD_DIM_V + offs_n[:, None] * HEAD_DIM_V + offs_dv[None, :]
    k = tl.load(K_ptr + k_offs, mask=mask_nd, other=0.0)
    v = tl.load(V_ptr + v_offs, mask=mask_ndv, other=0.0)
    q_base = Q_ptr + bh * seqlen_q * HEAD_DIM
    do_base = dO_ptr + bh * seqlen_q * HEAD_DIM_V
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < seqlen_q
        q = tl.load(q_base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * HEAD_DIM_V + offs_dv[None, :],
                     mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        lse2 = tl.load(LSE_ptr + bh * seqlen_q + rows, mask=mask_m, other=0.0)
        delta = tl.load(Delta_ptr + bh * seqlen_q + rows, mask=mask_m, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(dK_ptr + k_offs, dk.to(dK_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dV_ptr + v_offs, dv.to(dV_ptr.dtype.element_ty), mask=mask_ndv)


@triton.jit
def _attention_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, dO_ptr, LSE_ptr, Delta_ptr, dQ_ptr,
    seqlen_q, seqlen_k, num_m_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ = c·dS·K, dS = P ⊙ (dO·Vᵀ − δ), for one query tile streaming key tiles (FA-2, Alg. 2)."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V
    mask_md = mask_m[:, None] & mask_d[None, :]

    q_offs = bh * seqlen_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q_ptr + q_offs, mask=mask_md, other=0.0)
    do = tl.load(dO_ptr + bh * seqlen_q * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :],
                 mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    lse2 = tl.load(LSE_ptr + bh * seqlen_q + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta_ptr + bh * seqlen_q + offs_m, mask=mask_m, other=0.0)
    k_base = K_ptr + bh * seqlen_k * HEAD_DIM
    v_base = V_ptr + bh * seqlen_k * HEAD_DIM_V
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM_V + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(dQ_ptr + q_offs, dq.to(dQ_ptr.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Dual (tangent) forward and its backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_dual_kernel(
    Q_ptr, Q_dot_ptr, K_ptr, K_dot_ptr, V_ptr, V_dot_ptr,
    O_ptr, O_dot_ptr, LSE_ptr, MU_ptr,
    seqlen_q, seqlen_k, num_m_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_Q_DOT: tl.constexpr, HAS_K_DOT: tl.constexpr, HAS_V_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O, Ȯ = (P ⊙ Ṡ)·V − μ·O + P·V̇, lse₂ and μ = rowsum(P ⊙ Ṡ) in one online-softmax pass.

    Besides FA-2's (m, l, acc_O) each row keeps, in the same exp(−m) units and rescaled by the
    same factor α = 2^(m_old − m_new):
        a  = Σ_j p_j·ṡ_j                        (μ = a / l)
        acc_T = Σ_j p_j·(ṡ_j − σ)·v_j + Σ_j p_j·v̇_j
    where the shift σ is the running estimate a / l. Ȯ does not change when a row constant is
    added to Ṡ, so centring keeps the p·ṡ tile (cast to the input dtype for the matmul) small when
    Ṡ has a large row offset; moving σ to σ' is exact via acc_T ← acc_T − (σ' − σ)·acc_O. At the
    end σ = μ, so Ȯ = acc_T / l with no cancellation against μ·O.
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V
    mask_md = mask_m[:, None] & mask_d[None, :]

    q_offs = bh * seqlen_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q_ptr + q_offs, mask=mask_md, other=0.0)
    if HAS_Q_DOT:
        q_dot = tl.load(Q_dot_ptr + q_offs, mask=mask_md, other=0.0)
    k_base = bh * seqlen_k * HEAD_DIM
    v_base = bh * seqlen_k * HEAD_DIM_V
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    shift = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        mask_nd = mask_n[:, None] & mask_d[None, :]
        mask_ndv = mask_n[:, None] & mask_dv[None, :]
        k_offs = k_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        v_offs = v_base + cols[:, None] * HEAD_DIM_V + offs_dv[None, :]
        k = tl.load(K_ptr + k_offs, mask=mask_nd, other=0.0)
        v = tl.load(V_ptr + v_offs, mask=mask_ndv, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        s_dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_Q_DOT:
            s_dot = tl.dot(q_dot, tl.trans(k), s_dot, input_precision=DOT_PRECISION)
        if HAS_K_DOT:
            k_dot = tl.load(K_dot_ptr + k_offs, mask=mask_nd, other=0.0)
            s_dot = tl.dot(q, tl.trans(k_dot), s_dot, input_precision=DOT_PRECISION)
        s_dot = s_dot * sm_scale

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        a_i = a_i * alpha + tl.sum(p * s_dot, 1)
        shift_new = a_i / l_i
        acc_o = acc_o * alpha[:, None]
        acc_t = acc_t * alpha[:, None] - (shift_new - shift)[:, None] * acc_o
        acc_o = tl.dot(p.to(v.dtype), v, acc_o, input_precision=DOT_PRECISION)
        p_s_dot = p * (s_dot - shift_new[:, None])
        acc_t = tl.dot(p_s_dot.to(v.dtype), v, acc_t, input_precision=DOT_PRECISION)
        if HAS_V_DOT:
            v_dot = tl.load(V_dot_ptr + v_offs, mask=mask_ndv, other=0.0)
            acc_t = tl.dot(p.to(v_dot.dtype), v_dot, acc_t, input_precision=DOT_PRECISION)
        m_i = m_new
        shift = shift_new

    o_offs = bh * seqlen_q * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :]
    mask_mdv = mask_m[:, None] & mask_dv[None, :]
    tl.store(O_ptr + o_offs, (acc_o / l_i[:, None]).to(O_ptr.dtype.element_ty), mask=mask_mdv)
    tl.store(O_dot_ptr + o_offs, (acc_t / l_i[:, None]).to(O_dot_ptr.dtype.element_ty), mask=mask_mdv)
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE_ptr + bh * seqlen_q + offs_m, lse2, mask=mask_m)
    tl.store(MU_ptr + bh * seqlen_q + offs_m, shift, mask=mask_m)


@triton.jit
def _attention_dual_bwd_dkdv_kernel(
    Q_ptr, Q_dot_ptr, K_ptr, K_dot_ptr, V_ptr, V_dot_ptr,
    dO_ptr, dO_dot_ptr, LSE_ptr, MU_ptr, Delta_ptr, R_ptr,
    dK_ptr, dK_dot_ptr, dV_ptr, dV_dot_ptr,
    seqlen_q, seqlen_k, num_n_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK, dK̇, dV, dV̇ of the dual attention for one key tile, streaming query tiles.

    On transposed tiles (keys × queries), with G = dO, Ġ = dȮ and the row stats lse, μ, δ, r:
        Pᵀ, Ṡᵀ recomputed;  Ṗᵀ = Pᵀ ⊙ (Ṡᵀ − μ);  Wᵀ = V·Ġᵀ − r
        dV += Pᵀ·G + Ṗᵀ·Ġ;   dV̇ += Pᵀ·Ġ
        dSᵀ = Pᵀ ⊙ (V·Gᵀ + V̇·Ġᵀ + Wᵀ ⊙ (Ṡᵀ − μ) − δ);   dṠᵀ = Pᵀ ⊙ Wᵀ
        dK += c·(dSᵀ·Q + dṠᵀ·Q̇);   dK̇ += c·dṠᵀ·Q
    """
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = (pid // num_n_blocks).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < seqlen_k
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V
    mask_nd = mask_n[:, None] & mask_d[None, :]
    mask_ndv = mask_n[:, None] & mask_dv[None, :]

    k_offs = bh * seqlen_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_offs = bh * seqlen_k * HEAD_DIM_V + offs_n[:, None] * HEAD_DIM_V + offs_dv[None, :]
    k = tl.load(K_ptr + k_offs, mask=mask_nd, other=0.0)
    k_dot = tl.load(K_dot_ptr + k_offs, mask=mask_nd, other=0.0)
    v = tl.load(V_ptr + v_offs, mask=mask_ndv, other=0.0)
    v_dot = tl.load(V_dot_ptr + v_offs, mask=mask_ndv, other=0.0)
    q_base = bh * seqlen_q * HEAD_DIM
    do_base = bh * seqlen_q * HEAD_DIM_V
    row_base = bh * seqlen_q
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_dot = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dv_dot = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start_m in range(0, seqlen_q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < seqlen_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        mask_mdv = mask_m[:, None] & mask_dv[None, :]
        q_offs = q_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
        do_offs = do_base + rows[:, None] * HEAD_DIM_V + offs_dv[None, :]
        q = tl.load(Q_ptr + q_offs, mask=mask_md, other=0.0)
        q_dot = tl.load(Q_dot_ptr + q_offs, mask=mask_md, other=0.0)
        do = tl.load(dO_ptr + do_offs, mask=mask_mdv, other=0.0)
        do_dot = tl.load(dO_dot_ptr + do_offs, mask=mask_mdv, other=0.0)
        lse2 = tl.load(LSE_ptr + row_base + rows, mask=mask_m, other=0.0)
        mu = tl.load(MU_ptr + row_base + rows, mask=mask_m, other=0.0)
        delta = tl.load(Delta_ptr + row_base + rows, mask=mask_m, other=0.0)
        r = tl.load(R_ptr + row_base + rows, mask=mask_m, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse2[None, :])
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        s_dot_t = tl.dot(k, tl.trans(q_dot), input_precision=DOT_PRECISION)
        s_dot_t = tl.dot(k_dot, tl.trans(q), s_dot_t, input_precision=DOT_PRECISION)
        centred_t = s_dot_t * sm_scale - mu[None, :]
        p_dot_t = p_t * centred_t

        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dv = tl.dot(p_dot_t.to(do.dtype), do_dot, dv, input_precision=DOT_PRECISION)
        dv_dot = tl.dot(p_t.to(do.dtype), do_dot, dv_dot, input_precision=DOT_PRECISION)

        w_t = tl.dot(v, tl.trans(do_dot), input_precision=DOT_PRECISION) - r[None, :]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dp_t = tl.dot(v_dot, tl.trans(do_dot), dp_t, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t + w_t * centred_t - delta[None, :])
        ds_dot_t = p_t * w_t

        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_dot_t.to(q.dtype), q_dot, dk, input_precision=DOT_PRECISION)
        dk_dot = tl.dot(ds_dot_t.to(q.dtype), q, dk_dot, input_precision=DOT_PRECISION)

    tl.store(dK_ptr + k_offs, (dk * sm_scale).to(dK_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dK_dot_ptr + k_offs, (dk_dot * sm_scale).to(dK_dot_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dV_ptr + v_offs, dv.to(dV_ptr.dtype.element_ty), mask=mask_ndv)
    tl.store(dV_dot_ptr + v_offs, dv_dot.to(dV_dot_ptr.dtype.element_ty), mask=mask_ndv)


@triton.jit
def _attention_dual_bwd_dq_kernel(
    Q_ptr, Q_dot_ptr, K_ptr, K_dot_ptr, V_ptr, V_dot_ptr,
    dO_ptr, dO_dot_ptr, LSE_ptr, MU_ptr, Delta_ptr, R_ptr,
    dQ_ptr, dQ_dot_ptr,
    seqlen_q, seqlen_k, num_m_blocks, sm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ = c·(dS·K + dṠ·K̇) and dQ̇ = c·dṠ·K for one query tile, streaming key tiles.

    dS = P ⊙ (G·Vᵀ + Ġ·V̇ᵀ + W ⊙ (Ṡ − μ) − δ),  dṠ = P ⊙ W,  W = Ġ·Vᵀ − r (see module docstring).
    """
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = (pid // num_m_blocks).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < seqlen_q
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < HEAD_DIM_V
    mask_md = mask_m[:, None] & mask_d[None, :]
    mask_mdv = mask_m[:, None] & mask_dv[None, :]

    q_offs = bh * seqlen_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    do_offs = bh * seqlen_q * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :]
    q = tl.load(Q_ptr + q_offs, mask=mask_md, other=0.0)
    q_dot = tl.load(Q_dot_ptr + q_offs, mask=mask_md, other=0.0)
    do = tl.load(dO_ptr + do_offs, mask=mask_mdv, other=0.0)
    do_dot = tl.load(dO_dot_ptr + do_offs, mask=mask_mdv, other=0.0)
    row_offs = bh * seqlen_q + offs_m
    lse2 = tl.load(LSE_ptr + row_offs, mask=mask_m, other=0.0)
    mu = tl.load(MU_ptr + row_offs, mask=mask_m, other=0.0)
    delta = tl.load(Delta_ptr + row_offs, mask=mask_m, other=0.0)
    r = tl.load(R_ptr + row_offs, mask=mask_m, other=0.0)
    k_base = bh * seqlen_k * HEAD_DIM
    v_base = bh * seqlen_k * HEAD_DIM_V
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq_dot = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen_k
        mask_nd = mask_n[:, None] & mask_d[None, :]
        mask_ndv = mask_n[:, None] & mask_dv[None, :]
        k_offs = k_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        v_offs = v_base + cols[:, None] * HEAD_DIM_V + offs_dv[None, :]
        k = tl.load(K_ptr + k_offs, mask=mask_nd, other=0.0)
        k_dot = tl.load(K_dot_ptr + k_offs, mask=mask_nd, other=0.0)
        v = tl.load(V_ptr + v_offs, mask=mask_ndv, other=0.0)
        v_dot = tl.load(V_dot_ptr + v_offs, mask=mask_ndv, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        s_dot = tl.dot(q_dot, tl.trans(k), input_precision=DOT_PRECISION)
        s_dot = tl.dot(q, tl.trans(k_dot), s_dot, input_precision=DOT_PRECISION)
        centred = s_dot * sm_scale - mu[:, None]

        w = tl.dot(do_dot, tl.trans(v), input_precision=DOT_PRECISION) - r[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dp = tl.dot(do_dot, tl.trans(v_dot), dp, input_precision=DOT_PRECISION)
        ds = p * (dp + w * centred - delta[:, None])
        ds_dot = p * w

        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        dq = tl.dot(ds_dot.to(k.dtype), k_dot, dq, input_precision=DOT_PRECISION)
        dq_dot = tl.dot(ds_dot.to(k.dtype), k, dq_dot, input_precision=DOT_PRECISION)

    tl.store(dQ_ptr + q_offs, (dq * sm_scale).to(dQ_ptr.dtype.element_ty), mask=mask_md)
    tl.store(dQ_dot_ptr + q_offs, (dq_dot * sm_scale).to(dQ_dot_ptr.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
# GPU launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and input class:
# 16-bit inputs or float32 (TF32 / 3xTF32 dots), head dim <= 64 ("narrow") or up to 128 ("wide").
# Chosen on sm_90 by bench/kernel_resources.py (compile-only, Triton 3.6 = the lent H200's, and
# checked on 3.8) from FA-2's shapes (128x64 forward tiles, 32x128 key tiles for dK/dV): the FA-2
# shape where it compiles without register spills, else the same tile with 8 warps (half the
# registers per thread), else a smaller tile. Not yet tuned by timing on a GPU.
_GPU_CONFIGS: Dict[str, Dict[Tuple[str, str], Tuple[int, int, int, int]]] = {
    "fwd": {("16", "narrow"): (128, 64, 4, 3), ("16", "wide"): (128, 32, 8, 2),
            ("32", "narrow"): (128, 32, 8, 2), ("32", "wide"): (128, 32, 8, 2)},
    "bwd_dkdv": {("16", "narrow"): (32, 128, 8, 3), ("16", "wide"): (32, 64, 4, 2),
                 ("32", "narrow"): (32, 64, 4, 2), ("32", "wide"): (32, 64, 8, 2)},
    "bwd_dq": {("16", "narrow"): (128, 32, 4, 3), ("16", "wide"): (64, 32, 4, 2),
               ("32", "narrow"): (64, 32, 4, 2), ("32", "wide"): (64, 32, 4, 2)},
    "dual": {("16", "narrow"): (64, 64, 4, 3), ("16", "wide"): (64, 32, 4, 2),
             ("32", "narrow"): (64, 32, 4, 2), ("32", "wide"): (32, 32, 8, 2)},
    "dual_bwd_dkdv": {("16", "narrow"): (32, 64, 8, 2), ("16", "wide"): (32, 32, 8, 1),
                      ("32", "narrow"): (32, 16, 4, 1), ("32", "wide"): (32, 32, 8, 1)},
    "dual_bwd_dq": {("16", "narrow"): (64, 32, 4, 2), ("16", "wide"): (32, 32, 4, 1),
                    ("32", "narrow"): (16, 32, 4, 1), ("32", "wide"): (32, 32, 8, 1)},
    "bwd_preprocess": {(bits, width): (64, 16, 4, 1) for bits in ("16", "32") for width in ("narrow", "wide")},
}


def _attention_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                      device: torch.device) -> Dict[str, int]:
    """Tile sizes and launch parameters for one kernel ("fwd", "bwd_preprocess", "bwd_dkdv",
    "bwd_dq", "dual", "dual_bwd_dkdv", "dual_bwd_dq") — the one place with block-size heuristics.

    On CUDA: :data:`_GPU_CONFIGS`. Known to spill on sm_90 (kernel_resources.py): float32 at head
    dim 128 under 3xTF32 dots (``float32_matmul_precision="highest"``) in the dual kernels, at
    every tile size; training runs TF32 (``train_from_config``), where these configs do not spill.
    A launch that runs out of shared memory retries with halved tiles (see :func:`_launch`).
    Under the interpreter 32×32 tiles keep tests multi-tile.
    """
    head = max(head_dim, head_dim_v)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages = 32, 32, 4, 1
    else:
        input_class = ("32" if dtype == torch.float32 else "16", "wide" if head > 64 else "narrow")
        block_m, block_n, num_warps, num_stages = _GPU_CONFIGS[kernel][input_class]
    if kernel in DEBUG_BLOCK_OVERRIDE:
        block_m, block_n = DEBUG_BLOCK_OVERRIDE[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                num_warps=num_warps, num_stages=num_stages)


# (kernel name, head dims, dtype, device index) -> config that compiled after an out-of-resources retry.
_FALLBACK_CONFIGS: Dict[tuple, Dict[str, int]] = {}


def _launch(kernel_fn, name: str, tiles_along: str, rows: int, bh: int, args: tuple,
            head_dim: int, head_dim_v: int, dtype: torch.dtype, device: torch.device,
            **constexprs) -> None:
    """Launch ``kernel_fn`` on a 1-D grid of (row tiles × batch·heads) programs.

    ``tiles_along`` names the tile ("BLOCK_M" or "BLOCK_N") that partitions ``rows``; the kernel
    gets the tile count as its argument after the sequence lengths. If Triton reports that a
    config needs more shared memory / registers than the device has, the tiles are halved
    (down to 16) and the working config is remembered.
    """
    key = (name, head_dim, head_dim_v, dtype, device.type, device.index)
    config = dict(_FALLBACK_CONFIGS.get(key) or _attention_config(name, head_dim, head_dim_v, dtype, device))
    while True:
        num_tiles = triton.cdiv(rows, config[tiles_along])
        try:
            kernel_fn[(num_tiles * bh,)](*args[:-1], num_tiles, args[-1], **config, **constexprs)
            return
        except triton.runtime.errors.OutOfResources:
            if config["BLOCK_M"] <= 16 and config["BLOCK_N"] <= 16:
                raise
            big = "BLOCK_M" if config["BLOCK_M"] >= config["BLOCK_N"] else "BLOCK_N"
            config[big] //= 2
            config["num_stages"] = 1
            _FALLBACK_CONFIGS[key] = dict(config)


# How float32 dots run when torch's matmul precision is "highest" (the default): "tf32x3" splits
# each operand into a TF32 high part and a TF32 residual and sums three tensor-core products
# (error ~1e-6 relative, vs 6e-8 for true float32 and ~1e-3 for one TF32 product); "ieee" is true
# float32 on the FMA units, which needs the whole operand tiles in registers: at the UNet's head
# dims it spills tens of KiB per thread on sm_90 (bench/kernel_resources.py), so it is not the default.
FP32_HIGHEST_DOT = os.environ.get("FASTFLOW_FP32_DOT", "tf32x3")


def _dot_precision(dtype: torch.dtype) -> str:
    """float32: FP32_HIGHEST_DOT unless torch itself allows TF32; irrelevant for 16-bit inputs."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return FP32_HIGHEST_DOT
    return "tf32"


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: expected 4-D (B, H, L, D) q, k, v; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"attention: unsupported dtype {q.dtype} (float32, float16, bfloat16)")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("attention_triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")


def _prep(x: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Cast to the primal's dtype and make contiguous (no copy when already so)."""
    if x is None:
        return None
    return x.to(dtype=like.dtype).contiguous()


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _attention_fwd_launch(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(O, lse): O (B, H, Lq, Dv) in q.dtype, lse (B, H, Lq) float32 logsumexp of S in base 2
    (log₂ Σ_j 2^(S_ij·log₂e) = logsumexp(S)·log₂e): what the backward kernels read."""
    _check_inputs(q, k, v)
    q, k, v = _prep(q, q), _prep(k, q), _prep(v, q)
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    o = _new_output((batch, heads, seqlen_q, head_dim_v), q.dtype, q.device)
    lse = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    with _device_guard(q.device):
        _launch(_attention_fwd_kernel, "fwd", "BLOCK_M", seqlen_q, batch * heads,
                (q, k, v, o, lse, seqlen_q, seqlen_k, 1.0 / math.sqrt(head_dim)),
                head_dim, head_dim_v, q.dtype, q.device,
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DOT_PRECISION=_dot_precision(q.dtype))
    return o, lse


def _attention_bwd_launch(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                          lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) of the plain attention: δ preprocess, then the dK/dV and dQ kernels."""
    q, k, v, o, grad_o = (_prep(t, q) for t in (q, k, v, o, grad_o))
    lse = lse.contiguous()
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    bh, sm_scale = batch * heads, 1.0 / math.sqrt(head_dim)
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, q.dtype, q.device)
    dv = _new_output(v.shape, q.dtype, q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    precision = _dot_precision(q.dtype)
    common = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=q.dtype, device=q.device)
    with _device_guard(q.device):
        block_m = _attention_config("bwd_preprocess", head_dim, head_dim_v, q.dtype, q.device)["BLOCK_M"]
        num_m = triton.cdiv(seqlen_q, block_m)
        _attention_bwd_preprocess_kernel[(num_m * bh,)](
            o, grad_o, o, grad_o, delta, delta, seqlen_q, num_m,
            HEAD_DIM_V=head_dim_v, BLOCK_M=block_m,
            BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), DUAL=False)
        _launch(_attention_bwd_dkdv_kernel, "bwd_dkdv", "BLOCK_N", seqlen_k, bh,
                (q, k, v, grad_o, lse, delta, dk, dv, seqlen_q, seqlen_k, sm_scale),
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DOT_PRECISION=precision, **common)
        _launch(_attention_bwd_dq_kernel, "bwd_dq", "BLOCK_M", seqlen_q, bh,
                (q, k, v, grad_o, lse, delta, dq, seqlen_q, seqlen_k, sm_scale),
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DOT_PRECISION=precision, **common)
    return dq, dk, dv


def _attention_dual_fwd_launch(q: Tensor, q_dot: Optional[Tensor], k: Tensor,
                               k_dot: Optional[Tensor], v: Tensor, v_dot: Optional[Tensor]
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(O, Ȯ, lse, μ); None tangents are skipped in the kernel (treated as zero)."""
    _check_inputs(q, k, v)
    q_dot, k_dot, v_dot = _prep(q_dot, q), _prep(k_dot, q), _prep(v_dot, q)
    q, k, v = _prep(q, q), _prep(k, q), _prep(v, q)
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    o = _new_output((batch, heads, seqlen_q, head_dim_v), q.dtype, q.device)
    o_dot = _new_output((batch, heads, seqlen_q, head_dim_v), q.dtype, q.device)
    lse = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    mu = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    if o.numel() == 0:
        return o, o_dot, lse, mu
    with _device_guard(q.device):
        _launch(_attention_dual_kernel, "dual", "BLOCK_M", seqlen_q, batch * heads,
                (q, q if q_dot is None else q_dot, k, k if k_dot is None else k_dot,
                 v, v if v_dot is None else v_dot, o, o_dot, lse, mu,
                 seqlen_q, seqlen_k, 1.0 / math.sqrt(head_dim)),
                head_dim, head_dim_v, q.dtype, q.device,
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
                HAS_Q_DOT=q_dot is not None, HAS_K_DOT=k_dot is not None,
                HAS_V_DOT=v_dot is not None, DOT_PRECISION=_dot_precision(q.dtype))
    return o, o_dot, lse, mu


def _attention_dual_bwd_launch(grad_o: Optional[Tensor], grad_o_dot: Optional[Tensor],
                               q: Tensor, q_dot: Optional[Tensor], k: Tensor,
                               k_dot: Optional[Tensor], v: Tensor, v_dot: Optional[Tensor],
                               o: Tensor, o_dot: Tensor, lse: Tensor, mu: Tensor
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dQ, dQ̇, dK, dK̇, dV, dV̇) of the dual attention. None tangents / grads are zeros.

    Without an upstream gradient for Ȯ the tangent inputs get zero gradients and the primal
    ones are the plain backward's, so that case runs the cheaper plain kernels.
    """
    if grad_o_dot is None:
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        dq, dk, dv = _attention_bwd_launch(grad_o, q, k, v, o, lse)
        return dq, torch.zeros_like(dq), dk, torch.zeros_like(dk), dv, torch.zeros_like(dv)
    q, k, v, o, o_dot, grad_o_dot = (_prep(t, q) for t in (q, k, v, o, o_dot, grad_o_dot))
    q_dot = torch.zeros_like(q) if q_dot is None else _prep(q_dot, q)
    k_dot = torch.zeros_like(k) if k_dot is None else _prep(k_dot, q)
    v_dot = torch.zeros_like(v) if v_dot is None else _prep(v_dot, q)
    grad_o = torch.zeros_like(o) if grad_o is None else _prep(grad_o, q)
    lse, mu = lse.contiguous(), mu.contiguous()
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k, head_dim_v = k.shape[2], v.shape[3]
    bh, sm_scale = batch * heads, 1.0 / math.sqrt(head_dim)
    grads = [_new_output(t.shape, q.dtype, q.device) for t in (q, q, k, k, v, v)]
    dq, dq_dot, dk, dk_dot, dv, dv_dot = grads
    if q.numel() == 0 or k.numel() == 0:
        return tuple(g.zero_() for g in grads)
    delta = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    r = _new_output((batch, heads, seqlen_q), torch.float32, q.device)
    precision = _dot_precision(q.dtype)
    common = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=q.dtype, device=q.device)
    inputs = (q, q_dot, k, k_dot, v, v_dot, grad_o, grad_o_dot, lse, mu, delta, r)
    with _device_guard(q.device):
        block_m = _attention_config("bwd_preprocess", head_dim, head_dim_v, q.dtype, q.device)["BLOCK_M"]
        num_m = triton.cdiv(seqlen_q, block_m)
        _attention_bwd_preprocess_kernel[(num_m * bh,)](
            o, grad_o, o_dot, grad_o_dot, delta, r, seqlen_q, num_m,
            HEAD_DIM_V=head_dim_v, BLOCK_M=block_m,
            BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)), DUAL=True)
        _launch(_attention_dual_bwd_dkdv_kernel, "dual_bwd_dkdv", "BLOCK_N", seqlen_k, bh,
                (*inputs, dk, dk_dot, dv, dv_dot, seqlen_q, seqlen_k, sm_scale),
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DOT_PRECISION=precision, **common)
        _launch(_attention_dual_bwd_dq_kernel, "dual_bwd_dq", "BLOCK_M", seqlen_q, bh,
                (*inputs, dq, dq_dot, seqlen_q, seqlen_k, sm_scale),
                HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, DOT_PRECISION=precision, **common)
    return dq, dq_dot, dk, dk_dot, dv, dv_dot


# ----------------------------------------------------------------------------------------------
# Op registration (torch.compile) and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastflow_triton::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    return _attention_fwd_launch(q, k, v)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    batch, heads, seqlen_q, _ = q.shape
    return (q.new_empty((batch, heads, seqlen_q, v.shape[-1])),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


@torch.library.custom_op("fastflow_triton::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor,
                      lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _attention_bwd_launch(grad_o, q, k, v, o, lse)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(grad_o, q, k, v, o, lse):
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape))


@torch.library.custom_op("fastflow_triton::attention_dual_fwd", mutates_args=())
def _attention_dual_fwd_op(q: Tensor, q_dot: Optional[Tensor], k: Tensor, k_dot: Optional[Tensor],
                           v: Tensor, v_dot: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _attention_dual_fwd_launch(q, q_dot, k, k_dot, v, v_dot)


@_attention_dual_fwd_op.register_fake
def _attention_dual_fwd_fake(q, q_dot, k, k_dot, v, v_dot):
    batch, heads, seqlen_q, _ = q.shape
    out_shape = (batch, heads, seqlen_q, v.shape[-1])
    return (q.new_empty(out_shape), q.new_empty(out_shape),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


@torch.library.custom_op("fastflow_triton::attention_dual_bwd", mutates_args=())
def _attention_dual_bwd_op(grad_o: Optional[Tensor], grad_o_dot: Optional[Tensor], q: Tensor,
                           q_dot: Optional[Tensor], k: Tensor, k_dot: Optional[Tensor], v: Tensor,
                           v_dot: Optional[Tensor], o: Tensor, o_dot: Tensor, lse: Tensor,
                           mu: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _attention_dual_bwd_launch(grad_o, grad_o_dot, q, q_dot, k, k_dot, v, v_dot,
                                      o, o_dot, lse, mu)


@_attention_dual_bwd_op.register_fake
def _attention_dual_bwd_fake(grad_o, grad_o_dot, q, q_dot, k, k_dot, v, v_dot, o, o_dot, lse, mu):
    return tuple(q.new_empty(t.shape) for t in (q, q, k, k, v, v))


def _attention_fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.set_materialize_grads(False)


def _attention_fwd_backward(ctx, grad_o: Optional[Tensor], grad_lse: Optional[Tensor]):
    # lse is an internal output (never exposed by the public functions): its gradient is ignored.
    q, k, v, o, lse = ctx.saved_tensors
    if grad_o is None:
        return None, None, None
    return _attention_bwd_op(grad_o, q, k, v, o, lse)


_attention_fwd_op.register_autograd(_attention_fwd_backward, setup_context=_attention_fwd_setup_context)


def _attention_dual_fwd_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)
    # An unused O or Ȯ then arrives as None (not zeros): without Ġ the cheaper plain backward runs.
    ctx.set_materialize_grads(False)


def _attention_dual_fwd_backward(ctx, grad_o, grad_o_dot, grad_lse, grad_mu):
    # lse and μ are internal outputs: their gradients are ignored.
    q, q_dot, k, k_dot, v, v_dot, o, o_dot, lse, mu = ctx.saved_tensors
    if grad_o is None and grad_o_dot is None:
        return (None,) * 6
    grads = _attention_dual_bwd_op(grad_o, grad_o_dot, q, q_dot, k, k_dot, v, v_dot,
                                   o, o_dot, lse, mu)
    present = (True, q_dot is not None, True, k_dot is not None, True, v_dot is not None)
    return tuple(g if keep else None for g, keep in zip(grads, present))


_attention_dual_fwd_op.register_autograd(_attention_dual_fwd_backward,
                                         setup_context=_attention_dual_fwd_setup_context)


class _AttentionDualFunction(torch.autograd.Function):
    """Eager-mode dual attention: ``apply(q, q̇, k, k̇, v, v̇) -> (O, Ȯ, lse, μ)``, lse and μ
    non-differentiable. An ``autograd.Function`` with ``setup_context`` rather than the custom
    op, so that ``torch.func.grad`` / ``vjp`` can transform it (a custom op with
    ``register_autograd`` cannot be, pytorch#168393); the forward calls the launcher, the
    backward the backward op (a launcher cannot read functorch's wrapped tensors)."""

    @staticmethod
    def forward(q, q_dot, k, k_dot, v, v_dot):
        return _attention_dual_fwd_launch(q, q_dot, k, k_dot, v, v_dot)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _attention_dual_fwd_setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])

    @staticmethod
    @once_differentiable("attention_dual")
    def backward(ctx, grad_o, grad_o_dot, grad_lse, grad_mu):
        return _attention_dual_fwd_backward(ctx, grad_o, grad_o_dot, grad_lse, grad_mu)


class _AttentionFunction(torch.autograd.Function):
    """Eager-mode plain attention with a ``jvp`` rule (the dual kernel) for forward-mode AD.

    The tangent returned by ``jvp`` comes from :class:`_AttentionDualFunction`, whose backward
    is the dual backward, so ``torch.func.jvp`` followed by ``.backward()`` differentiates
    through Ȯ too. ``jvp`` recomputes O inside the dual kernel (the forward's O is already
    computed); callers that want one pass use :func:`attention_dual_triton`. Like the dual, the
    forward calls the launcher so that ``torch.func.grad`` works.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        return _attention_fwd_launch(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable("attention")
    def backward(ctx, grad_o: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, o, lse = ctx.saved_tensors
        return _attention_bwd_op(grad_o, q, k, v, o, lse)

    @staticmethod
    def jvp(ctx, q_dot: Optional[Tensor], k_dot: Optional[Tensor], v_dot: Optional[Tensor]):
        q, k, v = ctx.saved_tensors
        _, o_dot, _, _ = _AttentionDualFunction.apply(q, q_dot, k, k_dot, v, v_dot)
        return o_dot, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def attention_triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(Q·Kᵀ/√D)·V for (B, H, L, D) tensors (FA-2 Triton kernels), differentiable.

    Supports backward, ``torch.func.jvp`` / forward-mode AD in eager mode (via the dual kernel),
    and ``torch.compile`` (custom op; no forward-mode AD inside compiled regions).
    """
    if torch.compiler.is_compiling():
        return _attention_fwd_op(q, k, v)[0]
    return _AttentionFunction.apply(q, k, v)[0]


def attention_dual_triton(q: Tensor, q_dot: Optional[Tensor], k: Tensor, k_dot: Optional[Tensor],
                          v: Tensor, v_dot: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """(O, Ȯ) of attention for tangents (q̇, k̇, v̇) (None = zero), differentiable in all six.

    Ȯ = (P ⊙ Ṡ)·V − rowsum(P ⊙ Ṡ)·O + P·V̇ with Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)/√D. Returns (O, None) when
    every tangent is None, like the reference.
    """
    if q_dot is None and k_dot is None and v_dot is None:
        return attention_triton(q, k, v), None
    if torch.compiler.is_compiling():
        o, o_dot, _, _ = _attention_dual_fwd_op(q, q_dot, k, k_dot, v, v_dot)
    else:
        o, o_dot, _, _ = _AttentionDualFunction.apply(q, q_dot, k, k_dot, v, v_dot)
    return o, o_dot
