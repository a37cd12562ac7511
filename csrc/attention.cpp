// Attention softmax(Q·Kᵀ/√d)·V on the CPU: forward, backward, dual (primal + tangent) forward and
// the dual's backward.
//
// Specification: fastflow/ops/reference.py (attention_reference, attention_dual_reference).
// Per batch·head, with c = 1/√d and a block of query rows:
//
//   S = c·Q·Kᵀ,  P = softmax_rows(S),  O = P·V                              (forward)
//   Ṡ = c·(Q̇·Kᵀ + Q·K̇ᵀ),  μ = rowsum(P ⊙ Ṡ),  Ṗ = P ⊙ (Ṡ − μ),  Ȯ = Ṗ·V + P·V̇   (dual)
//
// Query rows are processed in blocks of `rows_per_block` (≤ 64): the block's scores live in an
// O(rows·Lk) buffer, the matrix products go to BLAS (sgemm_ from libtorch_cpu, single-threaded
// inside the parallel region) and the row-wise softmax work is vectorised here. The backward
// recomputes P from the saved row log-sum-exp (FlashAttention's recomputation, Dao et al. 2022),
// renormalising each row (the rounded lse scales it by 1 + ε; see softmax_bwd_rows),
// and μ from Ṡ, so only lse (B, H, Lq) is saved. Forward kernels run in parallel over
// (batch·head, row block); backward kernels over batch·head, because dK, dV accumulate over all
// query blocks of a head.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>

#include "blas.h"
#include "simd.h"

namespace fastflow {
namespace {

using simd::Vec;
using simd::vec_loop;

// ---------------------------------------------------------------------------------------------
// Row kernels (vectorised; one call handles `rows` rows of length `cols`, row stride `cols`)
// ---------------------------------------------------------------------------------------------

template <typename T>
FASTFLOW_INLINE T row_max(const T* s, int64_t n) {
  using VT = Vec<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  typename VT::V acc = VT::splat(ninf);
  vec_loop<T>(n, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
    typename VT::V v = VT::load(s + i, cnt);
    if (cnt != VT::W) v = VT::fill_tail(v, cnt, ninf);
    acc = VT::vmax(acc, v);
  });
  return VT::max(acc);
}

// s ← exp(s − max) in place; returns Σ exp(s − max), writes max + log(Σ) to *lse.
template <typename T>
FASTFLOW_INLINE T row_exp_sum(T* s, int64_t n, T* lse) {
  using VT = Vec<T>;
  const T mx = row_max(s, n);
  typename VT::V acc = VT::splat(T(0));
  vec_loop<T>(n, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
    typename VT::V e = VT::exp(VT::load(s + i, cnt) - mx);
    if (cnt != VT::W) e *= VT::mask(cnt);
    VT::store(s + i, e, cnt);
    acc += e;
  });
  const T sum = VT::sum(acc);
  *lse = mx + std::log(sum);
  return sum;
}

template <typename T>
FASTFLOW_INLINE void row_scale(T* p, int64_t n, T factor) {
  using VT = Vec<T>;
  vec_loop<T>(n, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
    VT::store(p + i, VT::load(p + i, cnt) * factor, cnt);
  });
}

// Forward: S → unnormalised exp(S − max) (in place), lse, and 1/Σ per row (applied to O by the
// caller, which is cheaper than rescaling the Lk-long rows of P).
template <typename T>
FASTFLOW_INLINE void softmax_fwd_rows(T* s, int64_t rows, int64_t cols, T* lse, T* inv_sum) {
  for (int64_t r = 0; r < rows; ++r) inv_sum[r] = T(1) / row_exp_sum(s + r * cols, cols, lse + r);
}

// Backward: S → P = exp(S − lse) / Σ exp(S − lse), dP → dS = P ⊙ (dP − rowsum(P ⊙ dP)).
// The row is renormalised rather than trusting lse: lse = max + log Σ is rounded to ulp(|lse|),
// which scales the recomputed row by 1 + ε (ε ~ 2e-6 at |S| ~ 20 in float32), and at a peaked
// row dS's dominant entry is the small difference dP_j − rowsum(P ⊙ dP) of two numbers that carry
// that ε (dq error 1.3e-5 → 1.1e-6 of max |dq|, autograd's float32 level). The sum is taken in
// the pass that already reads the row; the second pass multiplies and stores P back.
template <typename T>
FASTFLOW_INLINE void softmax_bwd_rows(T* s, T* dp, int64_t rows, int64_t cols, const T* lse) {
  using VT = Vec<T>;
  using V = typename VT::V;
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * cols;
    T* dpr = dp + r * cols;
    const T l = lse[r];
    V acc = VT::splat(T(0)), acc_p = VT::splat(T(0));
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      V p = VT::exp(VT::load(sr + i, cnt) - l);
      if (cnt != VT::W) p *= VT::mask(cnt);
      VT::store(sr + i, p, cnt);
      acc_p += p;
      acc += p * VT::load(dpr + i, cnt);
    });
    const T inv = T(1) / VT::sum(acc_p);
    const T delta = VT::sum(acc) * inv;
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      const V p = VT::load(sr + i, cnt) * inv;
      VT::store(sr + i, p, cnt);
      VT::store(dpr + i, p * (VT::load(dpr + i, cnt) - delta), cnt);
    });
  }
}

// Dual forward: S → P (normalised), Ṡ → Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)); writes lse.
template <typename T>
FASTFLOW_INLINE void softmax_dual_rows(T* s, T* sd, int64_t rows, int64_t cols, T* lse) {
  using VT = Vec<T>;
  using V = typename VT::V;
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * cols;
    T* sdr = sd + r * cols;
    const T inv = T(1) / row_exp_sum(sr, cols, lse + r);
    V acc = VT::splat(T(0));
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      const V p = VT::load(sr + i, cnt) * inv;
      VT::store(sr + i, p, cnt);
      acc += p * VT::load(sdr + i, cnt);
    });
    const T mu = VT::sum(acc);
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      VT::store(sdr + i, VT::load(sr + i, cnt) * (VT::load(sdr + i, cnt) - mu), cnt);
    });
  }
}

// Dual backward, per row, given P (from S and lse, renormalised), Ṡ, gP = gO·Vᵀ + gȮ·V̇ᵀ and gṖ = gȮ·Vᵀ:
//   μ = Σ P Ṡ,  a = Σ gṖ P
//   gṠ = P ⊙ (gṖ − a)                                   (softmax Jacobian applied to gṖ)
//   gP ← gP + (gṖ − a) ⊙ (Ṡ − μ)                         (Ṗ's dependence on P)
//   gS = P ⊙ (gP − Σ gP P),  Ṗ = P ⊙ (Ṡ − μ)
// Ṗ's P-derivative gives gṖ ⊙ (Ṡ − μ) − a·Ṡ; that differs from the centred form above by the
// per-row constant a·μ, which the softmax Jacobian (− Σ gP P) removes. The centred form is the
// one to compute: both factors vanish at a dominant entry (P → 1), so a peaked row no longer
// subtracts two large numbers (float32 dq error 5.1e-4 → 6.5e-6 at such rows; 1.5e-6 with the
// row renormalised).
// In place: s: S → P, sd: Ṡ → Ṗ, gp: gP → gS, gpd: gṖ → gṠ.
template <typename T>
FASTFLOW_INLINE void softmax_dual_bwd_rows(T* s, T* sd, T* gp, T* gpd, int64_t rows, int64_t cols,
                                           const T* lse) {
  using VT = Vec<T>;
  using V = typename VT::V;
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * cols;
    T* sdr = sd + r * cols;
    T* gpr = gp + r * cols;
    T* gpdr = gpd + r * cols;
    const T l = lse[r];
    V acc_mu = VT::splat(T(0)), acc_a = VT::splat(T(0)), acc_p = VT::splat(T(0));
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      V p = VT::exp(VT::load(sr + i, cnt) - l);
      if (cnt != VT::W) p *= VT::mask(cnt);
      VT::store(sr + i, p, cnt);
      acc_p += p;
      acc_mu += p * VT::load(sdr + i, cnt);
      acc_a += p * VT::load(gpdr + i, cnt);
    });
    const T inv = T(1) / VT::sum(acc_p);  // renormalised, as in softmax_bwd_rows
    const T mu = VT::sum(acc_mu) * inv, a = VT::sum(acc_a) * inv;
    V acc_b = VT::splat(T(0));
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      const V p = VT::load(sr + i, cnt) * inv;
      VT::store(sr + i, p, cnt);
      const V sdv = VT::load(sdr + i, cnt);
      const V gpdv = VT::load(gpdr + i, cnt);
      const V gpv = VT::load(gpr + i, cnt) + (gpdv - a) * (sdv - mu);
      VT::store(gpr + i, gpv, cnt);
      VT::store(gpdr + i, p * (gpdv - a), cnt);
      VT::store(sdr + i, p * (sdv - mu), cnt);
      acc_b += gpv * p;
    });
    const T b = VT::sum(acc_b);
    vec_loop<T>(cols, [&](int64_t i, int64_t cnt) FASTFLOW_LAMBDA {
      VT::store(gpr + i, VT::load(sr + i, cnt) * (VT::load(gpr + i, cnt) - b), cnt);
    });
  }
}

// Clone entry points (float: AVX2+FMA / baseline picked at load time; double: plain).
#define FASTFLOW_ATTN_ENTRY(T, ATTR)                                                                \
  ATTR void softmax_fwd_entry(T* s, int64_t rows, int64_t cols, T* lse, T* inv_sum) {              \
    softmax_fwd_rows<T>(s, rows, cols, lse, inv_sum);                                              \
  }                                                                                                \
  ATTR void softmax_bwd_entry(T* s, T* dp, int64_t rows, int64_t cols, const T* lse) {             \
    softmax_bwd_rows<T>(s, dp, rows, cols, lse);                                                   \
  }                                                                                                \
  ATTR void softmax_dual_entry(T* s, T* sd, int64_t rows, int64_t cols, T* lse) {                  \
    softmax_dual_rows<T>(s, sd, rows, cols, lse);                                                  \
  }                                                                                                \
  ATTR void softmax_dual_bwd_entry(T* s, T* sd, T* gp, T* gpd, int64_t rows, int64_t cols,         \
                                   const T* lse) {                                                 \
    softmax_dual_bwd_rows<T>(s, sd, gp, gpd, rows, cols, lse);                                     \
  }                                                                                                \
  ATTR void scale_rows_entry(T* o, int64_t rows, int64_t cols, const T* factor) {                  \
    for (int64_t r = 0; r < rows; ++r) row_scale<T>(o + r * cols, cols, factor[r]);                \
  }

FASTFLOW_ATTN_ENTRY(float, FASTFLOW_TARGET_CLONES)
FASTFLOW_ATTN_ENTRY(double, )
#undef FASTFLOW_ATTN_ENTRY

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

struct Dims {
  int64_t bh, lq, lk, d, dv;
};

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "fastflow_cpp::attention: expected CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) &&
                  k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.size(0) == k.size(0) &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "attention: expected q, k, v of shape (B, H, L, D); got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  return {q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;  // no dispatcher call
  return t.to(ct).contiguous();
}

at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor tangent_or_zeros(const std::optional<at::Tensor>& t, const at::Tensor& like,
                            at::ScalarType ct, const char* name) {
  if (!t.has_value() || !t->defined()) return at::zeros(like.sizes(), like.options().dtype(ct));
  TORCH_CHECK(t->sizes() == like.sizes(), "attention: ", name, " shape ", t->sizes(), " != ",
              like.sizes());
  return as_compute(*t, ct);
}

// Q, K, V and their tangents (zeros where absent) in the compute type: the dual forward's and the
// dual backward's inputs.
struct DualQKV {
  at::Tensor q, k, v, qd, kd, vd;
};

DualQKV dual_inputs(const at::Tensor& q_in, const std::optional<at::Tensor>& q_dot, const at::Tensor& k_in,
                    const std::optional<at::Tensor>& k_dot, const at::Tensor& v_in,
                    const std::optional<at::Tensor>& v_dot, at::ScalarType ct) {
  return {as_compute(q_in, ct), as_compute(k_in, ct), as_compute(v_in, ct),
          tangent_or_zeros(q_dot, q_in, ct, "q_dot"), tangent_or_zeros(k_dot, k_in, ct, "k_dot"),
          tangent_or_zeros(v_dot, v_in, ct, "v_dot")};
}

// Query rows per block: ≤ 64, fewer for long keys so a block's score buffers stay ~L2-sized.
int64_t rows_per_block(int64_t lk, int64_t buffers) {
  const int64_t budget = (256 * 1024) / (4 * buffers);  // elements per buffer
  return std::max<int64_t>(8, std::min<int64_t>(64, budget / std::max<int64_t>(lk, 1)));
}

// Parallel grain: enough tasks per chunk that a chunk does ≥ ~1M multiply-adds, so small problems
// (tests, tiny heads) stay on one thread instead of paying for a parallel region.
int64_t grain_for(int64_t macs_per_task) {
  return std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(macs_per_task, 1));
}

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in) {
  const Dims dm = check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in);
  const at::Tensor q = as_compute(q_in, ct), k = as_compute(k_in, ct), v = as_compute(v_in, ct);
  at::Tensor o = at::empty({q.size(0), q.size(1), dm.lq, dm.dv}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), dm.lq}, q.options());
  if (dm.bh * dm.lq == 0) return {to_dtype(o, q_in.scalar_type()), lse};
  if (dm.lk == 0) {
    o.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {to_dtype(o, q_in.scalar_type()), lse};
  }
  const int64_t br = rows_per_block(dm.lk, 1);
  const int64_t nblk = (dm.lq + br - 1) / br;
  AT_DISPATCH_FLOATING_TYPES(ct, "attention_fwd", [&] {
    const scalar_t c = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(dm.d)));
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t *op = o.data_ptr<scalar_t>(), *lp = lse.data_ptr<scalar_t>();
    at::parallel_for(0, dm.bh * nblk, grain_for(br * dm.lk * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
      auto s = scratch<scalar_t>(br * dm.lk);
      auto inv_sum = scratch<scalar_t>(br);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t h = task / nblk, r0 = (task % nblk) * br, rows = std::min(br, dm.lq - r0);
        const scalar_t* qb = qp + (h * dm.lq + r0) * dm.d;
        const scalar_t* kh = kp + h * dm.lk * dm.d;
        const scalar_t* vh = vp + h * dm.lk * dm.dv;
        scalar_t* ob = op + (h * dm.lq + r0) * dm.dv;
        blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.d, c, qb, dm.d, kh, dm.d, 0, s.get(), dm.lk);
        softmax_fwd_entry(s.get(), rows, dm.lk, lp + h * dm.lq + r0, inv_sum.get());
        blas::gemm<scalar_t>(false, false, rows, dm.dv, dm.lk, 1, s.get(), dm.lk, vh, dm.dv, 0, ob, dm.dv);
        scale_rows_entry(ob, rows, dm.dv, inv_sum.get());
      }
    });
  });
  return {to_dtype(o, q_in.scalar_type()), lse};
}

// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = c·dS·K, dK = c·dSᵀ·Q, dV = Pᵀ·dO.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_o,
                                                             const at::Tensor& q_in,
                                                             const at::Tensor& k_in,
                                                             const at::Tensor& v_in,
                                                             const at::Tensor& lse_in) {
  const Dims dm = check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in);
  const at::Tensor q = as_compute(q_in, ct), k = as_compute(k_in, ct), v = as_compute(v_in, ct);
  const at::Tensor go = as_compute(grad_o, ct), lse = as_compute(lse_in, ct);
  TORCH_CHECK(go.numel() == dm.bh * dm.lq * dm.dv, "attention_bwd: grad_o has the wrong shape ", grad_o.sizes());
  at::Tensor dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  if (dm.bh * dm.lq * dm.lk > 0) {
    const int64_t br = rows_per_block(dm.lk, 2);
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_bwd", [&] {
      const scalar_t c = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(dm.d)));
      const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
      const scalar_t *gop = go.data_ptr<scalar_t>(), *lp = lse.data_ptr<scalar_t>();
      scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
      at::parallel_for(0, dm.bh, grain_for(3 * dm.lq * dm.lk * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
        auto s = scratch<scalar_t>(br * dm.lk);
        auto dp = scratch<scalar_t>(br * dm.lk);
        for (int64_t h = begin; h < end; ++h) {
          const scalar_t* kh = kp + h * dm.lk * dm.d;
          const scalar_t* vh = vp + h * dm.lk * dm.dv;
          scalar_t* dkh = dkp + h * dm.lk * dm.d;
          scalar_t* dvh = dvp + h * dm.lk * dm.dv;
          for (int64_t r0 = 0; r0 < dm.lq; r0 += br) {
            const int64_t rows = std::min(br, dm.lq - r0);
            const scalar_t* qb = qp + (h * dm.lq + r0) * dm.d;
            const scalar_t* gob = gop + (h * dm.lq + r0) * dm.dv;
            blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.d, c, qb, dm.d, kh, dm.d, 0, s.get(), dm.lk);
            blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.dv, 1, gob, dm.dv, vh, dm.dv, 0, dp.get(), dm.lk);
            softmax_bwd_entry(s.get(), dp.get(), rows, dm.lk, lp + h * dm.lq + r0);
            blas::gemm<scalar_t>(true, false, dm.lk, dm.dv, rows, 1, s.get(), dm.lk, gob, dm.dv, 1, dvh, dm.dv);
            blas::gemm<scalar_t>(false, false, rows, dm.d, dm.lk, c, dp.get(), dm.lk, kh, dm.d, 0,
                                 dqp + (h * dm.lq + r0) * dm.d, dm.d);
            blas::gemm<scalar_t>(true, false, dm.lk, dm.d, rows, c, dp.get(), dm.lk, qb, dm.d, 1, dkh, dm.d);
          }
        }
      });
    });
  } else {
    dq.zero_();
  }
  return {to_dtype(dq, q_in.scalar_type()), to_dtype(dk, k_in.scalar_type()), to_dtype(dv, v_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_dual_fwd(
    const at::Tensor& q_in, const std::optional<at::Tensor>& q_dot, const at::Tensor& k_in,
    const std::optional<at::Tensor>& k_dot, const at::Tensor& v_in,
    const std::optional<at::Tensor>& v_dot) {
  const Dims dm = check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in);
  const DualQKV in = dual_inputs(q_in, q_dot, k_in, k_dot, v_in, v_dot, ct);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &qd = in.qd, &kd = in.kd, &vd = in.vd;
  at::Tensor o = at::zeros({q.size(0), q.size(1), dm.lq, dm.dv}, q.options());
  at::Tensor od = at::zeros_like(o);
  at::Tensor lse = at::full({q.size(0), q.size(1), dm.lq}, -std::numeric_limits<double>::infinity(), q.options());
  if (dm.bh * dm.lq * dm.lk > 0) {
    const int64_t br = rows_per_block(dm.lk, 2);
    const int64_t nblk = (dm.lq + br - 1) / br;
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_dual_fwd", [&] {
      const scalar_t c = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(dm.d)));
      const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
      const scalar_t *qdp = qd.data_ptr<scalar_t>(), *kdp = kd.data_ptr<scalar_t>(), *vdp = vd.data_ptr<scalar_t>();
      scalar_t *op = o.data_ptr<scalar_t>(), *odp = od.data_ptr<scalar_t>(), *lp = lse.data_ptr<scalar_t>();
      at::parallel_for(0, dm.bh * nblk, grain_for(3 * br * dm.lk * (dm.d + dm.dv)), [&](int64_t begin, int64_t end) {
        auto s = scratch<scalar_t>(br * dm.lk);
        auto sd = scratch<scalar_t>(br * dm.lk);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t h = task / nblk, r0 = (task % nblk) * br, rows = std::min(br, dm.lq - r0);
          const int64_t qoff = (h * dm.lq + r0) * dm.d, ooff = (h * dm.lq + r0) * dm.dv;
          const scalar_t *kh = kp + h * dm.lk * dm.d, *kdh = kdp + h * dm.lk * dm.d;
          const scalar_t *vh = vp + h * dm.lk * dm.dv, *vdh = vdp + h * dm.lk * dm.dv;
          blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.d, c, qp + qoff, dm.d, kh, dm.d, 0, s.get(), dm.lk);
          blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.d, c, qdp + qoff, dm.d, kh, dm.d, 0, sd.get(), dm.lk);
          blas::gemm<scalar_t>(false, true, rows, dm.lk, dm.d, c, qp + qoff, dm.d, kdh, dm.d, 1, sd.get(), dm.lk);
          softmax_dual_entry(s.get(), sd.get(), rows, dm.lk, lp + h * dm.lq + r0);
          blas::gemm<scalar_t>(false, false, rows, dm.dv, dm.lk, 1, s.get(), dm.lk, vh, dm.dv, 0, op + ooff, dm.dv);
          blas::gemm<scalar_t>(false, false, rows, dm.dv, dm.lk, 1, sd.get(), dm.lk, vh, dm.dv, 0, odp + ooff, dm.dv);
          blas::gemm<scalar_t>(false, false, rows, dm.dv, dm.lk, 1, s.get(), dm.lk, vdh, dm.dv, 1, odp + ooff, dm.dv);
        }
      });
    });
  }
  const auto dt = q_in.scalar_type();
  return {to_dtype(o, dt), to_dtype(od, dt), lse};
}

// Gradients of (O, Ȯ) w.r.t. (Q, Q̇, K, K̇, V, V̇); see softmax_dual_bwd_rows for the row algebra.
//   gQ = c(gS·K + gṠ·K̇), gQ̇ = c·gṠ·K, gK = c(gSᵀ·Q + gṠᵀ·Q̇), gK̇ = c·gṠᵀ·Q,
//   gV = Pᵀ·gO + Ṗᵀ·gȮ, gV̇ = Pᵀ·gȮ.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_dual_bwd(
    const std::optional<at::Tensor>& grad_o, const std::optional<at::Tensor>& grad_o_dot,
    const at::Tensor& q_in, const std::optional<at::Tensor>& q_dot, const at::Tensor& k_in,
    const std::optional<at::Tensor>& k_dot, const at::Tensor& v_in,
    const std::optional<at::Tensor>& v_dot, const at::Tensor& lse_in) {
  const Dims dm = check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in);
  const DualQKV in = dual_inputs(q_in, q_dot, k_in, k_dot, v_in, v_dot, ct);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &qd = in.qd, &kd = in.kd, &vd = in.vd;
  const at::Tensor o_like = at::empty({q.size(0), q.size(1), dm.lq, dm.dv}, q.options());
  const at::Tensor go = tangent_or_zeros(grad_o, o_like, ct, "grad_o");
  const at::Tensor god = tangent_or_zeros(grad_o_dot, o_like, ct, "grad_o_dot");
  const at::Tensor lse = as_compute(lse_in, ct);
  at::Tensor gq = at::zeros_like(q), gqd = at::zeros_like(q);
  at::Tensor gk = at::zeros_like(k), gkd = at::zeros_like(k);
  at::Tensor gv = at::zeros_like(v), gvd = at::zeros_like(v);
  if (dm.bh * dm.lq * dm.lk > 0) {
    const int64_t br = rows_per_block(dm.lk, 4);
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_dual_bwd", [&] {
      using T = scalar_t;
      const T c = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dm.d)));
      const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
      const T *qdp = qd.data_ptr<T>(), *kdp = kd.data_ptr<T>(), *vdp = vd.data_ptr<T>();
      const T *gop = go.data_ptr<T>(), *godp = god.data_ptr<T>(), *lp = lse.data_ptr<T>();
      T *gqp = gq.data_ptr<T>(), *gqdp = gqd.data_ptr<T>(), *gkp = gk.data_ptr<T>();
      T *gkdp = gkd.data_ptr<T>(), *gvp = gv.data_ptr<T>(), *gvdp = gvd.data_ptr<T>();
      const int64_t lk = dm.lk, d = dm.d, dv = dm.dv;
      at::parallel_for(0, dm.bh, grain_for(8 * dm.lq * lk * (d + dv)), [&](int64_t begin, int64_t end) {
        auto s = scratch<T>(br * lk), sd = scratch<T>(br * lk);
        auto gp = scratch<T>(br * lk), gpd = scratch<T>(br * lk);
        for (int64_t h = begin; h < end; ++h) {
          const T *kh = kp + h * lk * d, *kdh = kdp + h * lk * d;
          const T *vh = vp + h * lk * dv, *vdh = vdp + h * lk * dv;
          T *gkh = gkp + h * lk * d, *gkdh = gkdp + h * lk * d;
          T *gvh = gvp + h * lk * dv, *gvdh = gvdp + h * lk * dv;
          for (int64_t r0 = 0; r0 < dm.lq; r0 += br) {
            const int64_t rows = std::min(br, dm.lq - r0);
            const int64_t qoff = (h * dm.lq + r0) * d, ooff = (h * dm.lq + r0) * dv;
            const T *qb = qp + qoff, *qdb = qdp + qoff, *gob = gop + ooff, *godb = godp + ooff;
            blas::gemm<T>(false, true, rows, lk, d, c, qb, d, kh, d, 0, s.get(), lk);
            blas::gemm<T>(false, true, rows, lk, d, c, qdb, d, kh, d, 0, sd.get(), lk);
            blas::gemm<T>(false, true, rows, lk, d, c, qb, d, kdh, d, 1, sd.get(), lk);
            blas::gemm<T>(false, true, rows, lk, dv, 1, gob, dv, vh, dv, 0, gp.get(), lk);
            blas::gemm<T>(false, true, rows, lk, dv, 1, godb, dv, vdh, dv, 1, gp.get(), lk);
            blas::gemm<T>(false, true, rows, lk, dv, 1, godb, dv, vh, dv, 0, gpd.get(), lk);
            softmax_dual_bwd_entry(s.get(), sd.get(), gp.get(), gpd.get(), rows, lk, lp + h * dm.lq + r0);
            // s = P, sd = Ṗ, gp = gS, gpd = gṠ
            blas::gemm<T>(false, false, rows, d, lk, c, gp.get(), lk, kh, d, 0, gqp + qoff, d);
            blas::gemm<T>(false, false, rows, d, lk, c, gpd.get(), lk, kdh, d, 1, gqp + qoff, d);
            blas::gemm<T>(false, false, rows, d, lk, c, gpd.get(), lk, kh, d, 0, gqdp + qoff, d);
            blas::gemm<T>(true, false, lk, d, rows, c, gp.get(), lk, qb, d, 1, gkh, d);
            blas::gemm<T>(true, false, lk, d, rows, c, gpd.get(), lk, qdb, d, 1, gkh, d);
            blas::gemm<T>(true, false, lk, d, rows, c, gpd.get(), lk, qb, d, 1, gkdh, d);
            blas::gemm<T>(true, false, lk, dv, rows, 1, s.get(), lk, gob, dv, 1, gvh, dv);
            blas::gemm<T>(true, false, lk, dv, rows, 1, sd.get(), lk, godb, dv, 1, gvh, dv);
            blas::gemm<T>(true, false, lk, dv, rows, 1, s.get(), lk, godb, dv, 1, gvdh, dv);
          }
        }
      });
    });
  }
  const auto qt = q_in.scalar_type(), kt = k_in.scalar_type(), vt = v_in.scalar_type();
  return {to_dtype(gq, qt), to_dtype(gqd, qt), to_dtype(gk, kt), to_dtype(gkd, kt), to_dtype(gv, vt), to_dtype(gvd, vt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow_cpp, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_dual_fwd", &attention_dual_fwd);
  m.impl("attention_dual_bwd", &attention_dual_bwd);
}

}  // namespace fastflow
