// Fused GroupNorm → affine → FiLM → SiLU on the CPU: forward, backward, dual (primal + tangent)
// forward and the dual's backward.
//
// Specification: fastflow/ops/reference.py (gn_film_silu_reference, gn_film_silu_dual_reference).
// Notation, for one sample n and one group g of M = (C/G)·HW contiguous elements, channel c:
//
//   μ, r        mean and 1/sqrt(var + eps) of x over the group (biased variance, two-pass)
//   n̂ = (x − μ)·r,  u = n̂·γ + β,  s1 = 1 + s,  z = u·s1 + t,  y = silu(z) or z
//   mẋ = mean_g(ẋ),  K = mean_g(n̂·ẋ),  ṅ = r·(ẋ − mẋ) − r·K·n̂
//   ż = ṅ·γ·s1 + u·ṡ + ṫ,  ẏ = silu'(z)·ż
//
// with γ = weight, β = bias, s = scale, t = shift, ṡ = scale_dot, ṫ = shift_dot (missing γ = 1,
// missing β, s, t and tangents = 0). Every per-element expression above is affine in (x, ẋ) with
// per-channel coefficients once the group sums are known, so each kernel is: a pass for the group
// sums, then one fused pass that writes the outputs. A group (16 KiB at (8,128,32,32), G = 32)
// stays in L1/L2 between passes, so HBM/DRAM sees one read of each input and one write of each
// output.
//
// Statistics are float32 for float32/float16/bfloat16 inputs (half inputs are converted to float32
// up front) and float64 for float64 inputs (the tests use this for tight comparisons; the
// reference itself rounds float64 through float32). Group sums are accumulated in vector lanes
// over chunks of ≤ 1024 elements, then in double; so are the backwards' per-channel sums.
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
#include <tuple>

#include "simd.h"

namespace fastflow {
namespace {

using simd::Vec;
using simd::vec_loop;

constexpr int64_t kChunk = 1024;  // lanes accumulate ≤ 1024/W values before a double add

// ---------------------------------------------------------------------------------------------
// Group sums
// ---------------------------------------------------------------------------------------------

// body(c0, len) over [0, m) in chunks of ≤ kChunk elements: the body accumulates one chunk in
// vector lanes and folds the lane sums into doubles (the per-channel sums of the backwards).
template <typename F>
FASTFLOW_INLINE void for_chunks(int64_t m, F&& body) {
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) body(c0, std::min(kChunk, m - c0));
}

// Σ x over m contiguous elements.
template <typename T>
FASTFLOW_INLINE double group_sum(const T* x, int64_t m) {
  using VT = Vec<T>;
  double total = 0.0;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t len = std::min(kChunk, m - c0);
    typename VT::V acc = VT::splat(T(0));
    vec_loop<T>(len, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA { acc += VT::load(x + c0 + i, n); });
    total += VT::sum(acc);
  }
  return total;
}

// Σ (x − μ)² over m elements (tail lanes masked: their zero-padded x would add μ²).
template <typename T>
FASTFLOW_INLINE double group_sum_sq_dev(const T* x, int64_t m, T mean) {
  using VT = Vec<T>;
  double total = 0.0;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t len = std::min(kChunk, m - c0);
    typename VT::V acc = VT::splat(T(0));
    vec_loop<T>(len, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
      typename VT::V d = VT::load(x + c0 + i, n) - mean;
      if (n != VT::W) d *= VT::mask(n);
      acc += d * d;
    });
    total += VT::sum(acc);
  }
  return total;
}

// Σ (x − μ)², Σ ẋ, Σ (x − μ)·ẋ in one pass (dual forward).
template <typename T>
FASTFLOW_INLINE void group_dual_sums(const T* x, const T* xd, int64_t m, T mean, double* sq_dev,
                                     double* sum_xd, double* sum_dev_xd) {
  using VT = Vec<T>;
  double t_sq = 0.0, t_xd = 0.0, t_dev_xd = 0.0;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t len = std::min(kChunk, m - c0);
    typename VT::V a_sq = VT::splat(T(0)), a_xd = VT::splat(T(0)), a_dev_xd = VT::splat(T(0));
    vec_loop<T>(len, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
      typename VT::V d = VT::load(x + c0 + i, n) - mean;
      if (n != VT::W) d *= VT::mask(n);
      const typename VT::V v = VT::load(xd + c0 + i, n);
      a_sq += d * d;
      a_xd += v;
      a_dev_xd += d * v;
    });
    t_sq += VT::sum(a_sq);
    t_xd += VT::sum(a_xd);
    t_dev_xd += VT::sum(a_dev_xd);
  }
  *sq_dev = t_sq;
  *sum_xd = t_xd;
  *sum_dev_xd = t_dev_xd;
}

// ---------------------------------------------------------------------------------------------
// Kernels, one (sample, group) per call. Channel-parameter pointers point at the group's first
// channel: weight/bias (C,) + c0, scale/shift rows (N, C) + n·C + c0.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GroupArgs {
  int64_t channels;  // C/G
  int64_t hw;        // elements per channel
  const T* weight;
  const T* bias;
  const T* scale;
  const T* shift;
  const T* scale_dot;  // dual only
  const T* shift_dot;  // dual only
};

// Per-channel coefficients of the dual forward, shared by its backward (which recomputes z, ż):
//   z = a·x + b,   ż = p·ẋ + q·x + t,   with γ s1 = w·(1 + s) and the group's μ, r, mẋ, K.
// ż = γ s1·(r ẋ − r² K x + r² K μ − r mẋ) + ṡ·(γ r x + β − γ r μ) + ṫ
template <typename T>
struct DualChannel {
  double w, beta, s1, sd, gam;
  T a, b, p, q, t;
};

template <typename T>
FASTFLOW_INLINE DualChannel<T> dual_channel(const GroupArgs<T>& g, int64_t c, double mean, double r,
                                            double mxd, double kk) {
  DualChannel<T> d;
  d.w = g.weight[c];
  d.beta = g.bias[c];
  d.s1 = 1.0 + g.scale[c];
  d.sd = g.scale_dot[c];
  d.gam = d.w * d.s1;
  d.a = static_cast<T>(r * d.gam);
  d.b = static_cast<T>((d.beta - mean * r * d.w) * d.s1 + g.shift[c]);
  d.p = static_cast<T>(d.gam * r);
  d.q = static_cast<T>(-d.gam * r * r * kk + d.sd * d.w * r);
  d.t = static_cast<T>(d.gam * (r * r * kk * mean - r * mxd) + d.sd * (d.beta - d.w * r * mean) + g.shift_dot[c]);
  return d;
}

// Forward: y = act(a_c·x + b_c), a_c = r·γ·s1, b_c = (β − μ·r·γ)·s1 + t. Writes μ, r.
template <typename T, bool silu>
FASTFLOW_INLINE void gn_fwd_group(const GroupArgs<T>& g, const T* x, T* y, double eps,
                                  T* mean_out, T* rstd_out) {
  using VT = Vec<T>;
  using V = typename VT::V;
  const int64_t m = g.channels * g.hw;
  const double mean = group_sum(x, m) / m;
  const double var = group_sum_sq_dev(x, m, static_cast<T>(mean)) / m;
  const double rstd = 1.0 / std::sqrt(var + eps);
  *mean_out = static_cast<T>(mean);
  *rstd_out = static_cast<T>(rstd);
  for (int64_t c = 0; c < g.channels; ++c) {
    const double s1 = 1.0 + g.scale[c];
    const T a = static_cast<T>(rstd * g.weight[c] * s1);
    const T b = static_cast<T>((g.bias[c] - mean * rstd * g.weight[c]) * s1 + g.shift[c]);
    const T* xc = x + c * g.hw;
    T* yc = y + c * g.hw;
    if constexpr (silu) {
      vec_loop<T>(g.hw, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
        const V z = VT::load(xc + i, n) * a + b;
        VT::store(yc + i, z / (T(1) + VT::exp(-z)), n);
      });
    } else {
      vec_loop<T>(g.hw, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
        VT::store(yc + i, VT::load(xc + i, n) * a + b, n);
      });
    }
  }
}

// Backward of the forward. dz = gy·silu'(z); per channel A = Σ dz, B = Σ dz·n̂ give
//   dt = A, ds = γ·B + β·A, dγ_n = s1·B, dβ_n = s1·A (summed over n by the caller),
//   dx = r·(γ s1·dz − mean_g(dn̂) − n̂·mean_g(dn̂·n̂)),  dn̂ = γ s1·dz
//   (the batch-norm backward of Ioffe & Szegedy 2015, applied per group).
// Pass 1 writes dz into dx (silu) and the channel sums; pass 2 turns dz into dx in place.
template <typename T, bool silu>
FASTFLOW_INLINE void gn_bwd_group(const GroupArgs<T>& g, const T* x, const T* gy, T mean, T rstd,
                                  T* dx, T* dweight_n, T* dbias_n, T* dscale, T* dshift) {
  using VT = Vec<T>;
  using V = typename VT::V;
  const int64_t m = g.channels * g.hw;
  const T neg_mean_r = -mean * rstd;
  double sum_dn = 0.0, sum_dn_n = 0.0;  // Σ dn̂, Σ dn̂·n̂ over the group
  for (int64_t c = 0; c < g.channels; ++c) {
    const T w = g.weight[c], s1 = T(1) + g.scale[c];
    const T a = rstd * w * s1;
    const T b = (g.bias[c] + neg_mean_r * w) * s1 + g.shift[c];
    const T* xc = x + c * g.hw;
    const T* gyc = gy + c * g.hw;
    T* dzc = dx + c * g.hw;
    double sum_a = 0.0, sum_b = 0.0;
    for_chunks(g.hw, [&](int64_t c0, int64_t len) FASTFLOW_LAMBDA {
      V acc_a = VT::splat(T(0)), acc_b = VT::splat(T(0));
      vec_loop<T>(len, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
        const V xv = VT::load(xc + c0 + i, n);
        V dz = VT::load(gyc + c0 + i, n);
        if constexpr (silu) {
          const V z = xv * a + b;
          const V sig = simd::sigmoid<T>(z);
          dz = dz * (sig * (T(1) + z * (T(1) - sig)));
          VT::store(dzc + c0 + i, dz, n);
        }
        acc_a += dz;
        acc_b += dz * (xv * rstd + neg_mean_r);
      });
      sum_a += VT::sum(acc_a);
      sum_b += VT::sum(acc_b);
    });
    const double wd = w, s1d = s1;
    dshift[c] = static_cast<T>(sum_a);
    dscale[c] = static_cast<T>(wd * sum_b + static_cast<double>(g.bias[c]) * sum_a);
    dweight_n[c] = static_cast<T>(s1d * sum_b);
    dbias_n[c] = static_cast<T>(s1d * sum_a);
    sum_dn += wd * s1d * sum_a;
    sum_dn_n += wd * s1d * sum_b;
  }
  // dx = k1_c·dz + k2·x + k3 with n̂ = r·(x − μ).
  const double r = rstd, mu = mean;
  const T k2 = static_cast<T>(-r * r * sum_dn_n / m);
  const T k3 = static_cast<T>(-r * sum_dn / m + r * r * mu * sum_dn_n / m);
  for (int64_t c = 0; c < g.channels; ++c) {
    const T k1 = rstd * g.weight[c] * (T(1) + g.scale[c]);
    const T* xc = x + c * g.hw;
    const T* dzc = (silu ? dx : gy) + c * g.hw;
    T* dxc = dx + c * g.hw;
    vec_loop<T>(g.hw, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
      VT::store(dxc + i, VT::load(dzc + i, n) * k1 + (VT::load(xc + i, n) * k2 + k3), n);
    });
  }
}

// Dual forward: y and ẏ in one read of x and ẋ. With the group sums, per channel
//   z = a·x + b,  ż = p·ẋ + q·x + t  (a, b, p, q, t below). stats = (μ, r, mẋ, K).
template <typename T, bool silu>
FASTFLOW_INLINE void gn_dual_fwd_group(const GroupArgs<T>& g, const T* x, const T* xd, T* y,
                                       T* yd, double eps, T* stats) {
  using VT = Vec<T>;
  using V = typename VT::V;
  const int64_t m = g.channels * g.hw;
  const double mean = group_sum(x, m) / m;
  double sq_dev, sum_xd, sum_dev_xd;
  group_dual_sums(x, xd, m, static_cast<T>(mean), &sq_dev, &sum_xd, &sum_dev_xd);
  const double r = 1.0 / std::sqrt(sq_dev / m + eps);
  const double mxd = sum_xd / m;
  const double kk = r * sum_dev_xd / m;  // K = mean(n̂·ẋ)
  stats[0] = static_cast<T>(mean);
  stats[1] = static_cast<T>(r);
  stats[2] = static_cast<T>(mxd);
  stats[3] = static_cast<T>(kk);
  for (int64_t c = 0; c < g.channels; ++c) {
    const DualChannel<T> d = dual_channel(g, c, mean, r, mxd, kk);
    const T a = d.a, b = d.b, p = d.p, q = d.q, t = d.t;
    const T* xc = x + c * g.hw;
    const T* xdc = xd + c * g.hw;
    T* yc = y + c * g.hw;
    T* ydc = yd + c * g.hw;
    vec_loop<T>(g.hw, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
      const V xv = VT::load(xc + i, n);
      const V z = xv * a + b;
      const V zd = VT::load(xdc + i, n) * p + (xv * q + t);
      if constexpr (silu) {
        const V sig = simd::sigmoid<T>(z);
        VT::store(yc + i, z * sig, n);
        VT::store(ydc + i, zd * (sig * (T(1) + z * (T(1) - sig))), n);
      } else {
        VT::store(yc + i, z, n);
        VT::store(ydc + i, zd, n);
      }
    });
  }
}

// Dual backward: gradients w.r.t. x, ẋ, γ, β, s, ṡ, t, ṫ from gy = ∂L/∂y and gẏ = ∂L/∂ẏ.
//   gz = gy·silu'(z) + gẏ·ż·silu''(z),  gż = gẏ·silu'(z),  silu'' = σ(1−σ)(2 + z(1 − 2σ))
// Per channel: A = Σgz, B = Σgz·n̂, Cs = Σgż, D = Σgż·n̂, E = Σgż·ṅ, then
//   gt = A, gṫ = Cs, gs = γB + βA + γE, gṡ = γD + βCs, gβ_n = s1·A + ṡ·Cs,
//   gγ_n = s1·B + ṡ·D + s1·E.
// Through ṅ (linear in ẋ; depends on x through n̂ and r), with gṅ = γ s1·gż:
//   gẋ = r·(gṅ − mean(gṅ) − n̂·mean(gṅ·n̂))
//   gn̂ = γ(s1·gz + ṡ·gż) − r K·gṅ − r·mean(gṅ·n̂)·ẋ
//   gx = r·(gn̂ − mean(gn̂) − n̂·mean(gn̂·n̂)) − r·n̂·mean(gṅ·ṅ)   (last term: ∂ṅ/∂r · ∂r/∂x)
// Pass 1 stores gz, gż into dx, dxd; pass 2 applies the per-channel affine maps in place.
template <typename T, bool silu>
FASTFLOW_INLINE void gn_dual_bwd_group(const GroupArgs<T>& g, const T* x, const T* xd, const T* gy,
                                       const T* gyd, const T* stats, T* dx, T* dxd,
                                       T* dweight_n, T* dbias_n, T* dscale, T* dscale_dot,
                                       T* dshift, T* dshift_dot) {
  using VT = Vec<T>;
  using V = typename VT::V;
  const int64_t m = g.channels * g.hw;
  const double mean = stats[0], r = stats[1], mxd = stats[2], kk = stats[3];
  const T n_a = static_cast<T>(r), n_b = static_cast<T>(-r * mean);              // n̂ = n_a x + n_b
  const T nd_x = static_cast<T>(-r * r * kk), nd_c = static_cast<T>(r * r * kk * mean - r * mxd);
  double p1 = 0, p2 = 0, p3 = 0, q1 = 0, q2 = 0;  // Σgṅ, Σgṅ n̂, Σgṅ ṅ, Σgn̂, Σgn̂ n̂
  for (int64_t c = 0; c < g.channels; ++c) {
    const DualChannel<T> d = dual_channel(g, c, mean, r, mxd, kk);
    const double w = d.w, beta = d.beta, s1 = d.s1, sd = d.sd, gam = d.gam;
    const T a = d.a, b = d.b, p = d.p, q = d.q, t = d.t;
    const int64_t off = c * g.hw;
    double sa = 0.0, sb = 0.0, sc = 0.0, sdd = 0.0, se = 0.0;
    for_chunks(g.hw, [&](int64_t c0, int64_t len) FASTFLOW_LAMBDA {
      const int64_t o = off + c0;
      V acc_a = VT::splat(T(0)), acc_b = VT::splat(T(0)), acc_c = VT::splat(T(0));
      V acc_d = VT::splat(T(0)), acc_e = VT::splat(T(0));
      vec_loop<T>(len, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
        const V xv = VT::load(x + o + i, n);
        const V xdv = VT::load(xd + o + i, n);
        V gz = VT::load(gy + o + i, n);
        V gzd = VT::load(gyd + o + i, n);
        if constexpr (silu) {
          const V z = xv * a + b;
          const V zd = xdv * p + (xv * q + t);
          const V sig = simd::sigmoid<T>(z);
          const V one_m = T(1) - sig;
          const V d1 = sig * (T(1) + z * one_m);
          const V d2 = sig * one_m * (T(2) + z * (one_m - sig));
          gz = gz * d1 + gzd * zd * d2;
          gzd = gzd * d1;
          VT::store(dx + o + i, gz, n);
          VT::store(dxd + o + i, gzd, n);
        }
        const V nh = xv * n_a + n_b;
        const V nd = xdv * n_a + (xv * nd_x + nd_c);
        acc_a += gz;
        acc_b += gz * nh;
        acc_c += gzd;
        acc_d += gzd * nh;
        acc_e += gzd * nd;
      });
      sa += VT::sum(acc_a);
      sb += VT::sum(acc_b);
      sc += VT::sum(acc_c);
      sdd += VT::sum(acc_d);
      se += VT::sum(acc_e);
    });
    dshift[c] = static_cast<T>(sa);
    dshift_dot[c] = static_cast<T>(sc);
    dscale[c] = static_cast<T>(w * sb + beta * sa + w * se);
    dscale_dot[c] = static_cast<T>(w * sdd + beta * sc);
    dbias_n[c] = static_cast<T>(s1 * sa + sd * sc);
    dweight_n[c] = static_cast<T>(s1 * sb + sd * sdd + s1 * se);
    p1 += gam * sc;
    p2 += gam * sdd;
    p3 += gam * se;
    q1 += w * s1 * sa + w * sd * sc - r * kk * gam * sc;
    q2 += w * s1 * sb + w * sd * sdd - r * kk * gam * sdd;
  }
  q1 -= r * p2 * mxd;  // − r·mean(gṅ n̂)·Σẋ,    Σẋ = M·mẋ
  q2 -= r * p2 * kk;   // − r·mean(gṅ n̂)·Σẋn̂,  Σẋn̂ = M·K
  // gx  = α_c·gz + β_c·gż + γ0·ẋ + δ·x + ε;   gẋ = ρ_c·gż + δd·x + εd
  const T g0 = static_cast<T>(-r * r * p2 / m);
  const T delta = static_cast<T>(-r * r * (q2 + p3) / m);
  const T eps_x = static_cast<T>(-r * q1 / m + r * r * mean * (q2 + p3) / m);
  const T delta_d = static_cast<T>(-r * r * p2 / m);
  const T eps_d = static_cast<T>(-r * p1 / m + r * r * mean * p2 / m);
  for (int64_t c = 0; c < g.channels; ++c) {
    const double w = g.weight[c], s1 = 1.0 + g.scale[c], sd = g.scale_dot[c];
    const double gam = w * s1;
    const T alpha = static_cast<T>(r * w * s1);
    const T beta_c = static_cast<T>(r * (w * sd - r * kk * gam));
    const T rho = static_cast<T>(r * gam);
    const int64_t off = c * g.hw;
    const T* gz_src = (silu ? dx : gy) + off;
    const T* gzd_src = (silu ? dxd : gyd) + off;
    vec_loop<T>(g.hw, [&](int64_t i, int64_t n) FASTFLOW_LAMBDA {
      const V xv = VT::load(x + off + i, n);
      const V gz = VT::load(gz_src + i, n);
      const V gzd = VT::load(gzd_src + i, n);
      const V xdv = VT::load(xd + off + i, n);
      VT::store(dx + off + i, gz * alpha + gzd * beta_c + xdv * g0 + (xv * delta + eps_x), n);
      VT::store(dxd + off + i, gzd * rho + (xv * delta_d + eps_d), n);
    });
  }
}

// Instantiations: float clones (AVX2+FMA / baseline, picked at load time) and plain double.
#define FASTFLOW_GN_ENTRY(T, ATTR)                                                                 \
  ATTR void gn_fwd_entry(const GroupArgs<T>& g, const T* x, T* y, double eps, bool silu, T* mean,  \
                         T* rstd) {                                                                \
    silu ? gn_fwd_group<T, true>(g, x, y, eps, mean, rstd)                                         \
         : gn_fwd_group<T, false>(g, x, y, eps, mean, rstd);                                               \
  }                                                                                                \
  ATTR void gn_bwd_entry(const GroupArgs<T>& g, const T* x, const T* gy, T mean, T rstd, bool silu, \
                         T* dx, T* dw, T* db, T* ds, T* dt) {                                      \
    silu ? gn_bwd_group<T, true>(g, x, gy, mean, rstd, dx, dw, db, ds, dt)                         \
         : gn_bwd_group<T, false>(g, x, gy, mean, rstd, dx, dw, db, ds, dt);                               \
  }                                                                                                \
  ATTR void gn_dual_fwd_entry(const GroupArgs<T>& g, const T* x, const T* xd, T* y, T* yd,          \
                              double eps, bool silu, T* stats) {                                   \
    silu ? gn_dual_fwd_group<T, true>(g, x, xd, y, yd, eps, stats)                                 \
         : gn_dual_fwd_group<T, false>(g, x, xd, y, yd, eps, stats);                                       \
  }                                                                                                \
  ATTR void gn_dual_bwd_entry(const GroupArgs<T>& g, const T* x, const T* xd, const T* gy,          \
                              const T* gyd, const T* stats, bool silu, T* dx, T* dxd, T* dw,       \
                              T* db, T* ds, T* dsd, T* dt, T* dtd) {                               \
    silu ? gn_dual_bwd_group<T, true>(g, x, xd, gy, gyd, stats, dx, dxd, dw, db, ds, dsd, dt, dtd) \
         : gn_dual_bwd_group<T, false>(g, x, xd, gy, gyd, stats, dx, dxd, dw, db, ds, dsd, dt, dtd);       \
  }

FASTFLOW_GN_ENTRY(float, FASTFLOW_TARGET_CLONES)
FASTFLOW_GN_ENTRY(double, )
#undef FASTFLOW_GN_ENTRY

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, dtype handling, parallel loop over (sample, group)
// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t n, c, groups, cg, hw;
};

Shape check_x(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), "fastflow_cpp::gn_film_silu: expected a CPU tensor");
  TORCH_CHECK(x.dim() >= 2, "gn_film_silu: x must be (N, C, ...), got ", x.sizes());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "gn_film_silu: channels=", x.size(1),
              " not divisible by groups=", groups);
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, groups, c / groups, c == 0 ? 0 : x.numel() / std::max<int64_t>(n * c, 1)};
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Contiguous tensor in the compute dtype (no dispatcher call when it already is one: these ops
// run ~20 times per UNet forward, so per-call overhead matters at small shapes).
at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;
  return t.to(ct).contiguous();
}

at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The kernels compute NCHW-contiguous; a 4-D channels_last x gets its outputs back in channels_last
// (as ATen's own ops do), so a channels_last UNet keeps one layout through the fused norms. The
// fake kernels in fastflow/ops/cpu.py give the same strides.
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor in_layout_of(const at::Tensor& out, const at::Tensor& x) {
  return is_channels_last(x) ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

// weight/bias: (C,) → contiguous compute dtype, or a constant when None.
at::Tensor channel_param(const std::optional<at::Tensor>& p, const Shape& s, at::ScalarType ct,
                         double fill, const char* name) {
  if (!p.has_value() || !p->defined()) return at::full({s.c}, fill, at::TensorOptions().dtype(ct));
  TORCH_CHECK(p->numel() == s.c, "gn_film_silu: ", name, " must have C=", s.c, " elements, got ",
              p->sizes());
  return as_compute(*p, ct);  // any contiguous layout of C elements is the same buffer
}

// scale/shift and their tangents: (N, C) or (C,) → (N, C) contiguous, or zeros when None.
at::Tensor film_param(const std::optional<at::Tensor>& p, const Shape& s, at::ScalarType ct,
                      const char* name) {
  if (!p.has_value() || !p->defined()) return at::zeros({s.n, s.c}, at::TensorOptions().dtype(ct));
  const at::Tensor& t = *p;
  TORCH_CHECK(t.numel() == s.c || t.numel() == s.n * s.c, "gn_film_silu: ", name,
              " must be (N, C) or (C,), got ", t.sizes());
  if (t.numel() == s.n * s.c) return as_compute(t, ct);
  return as_compute(t.reshape({1, s.c}).expand({s.n, s.c}), ct);
}

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(elems_per_item, 1));
}

template <typename T>
GroupArgs<T> group_args(const Shape& s, int64_t item, const T* w, const T* b, const T* sc,
                        const T* sh, const T* scd, const T* shd) {
  const int64_t n = item / s.groups, c0 = (item % s.groups) * s.cg;
  const int64_t row = n * s.c + c0;
  return {s.cg, s.hw, w + c0, b + c0, sc + row, sh + row, scd ? scd + row : nullptr, shd ? shd + row : nullptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_film_silu_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  const Shape s = check_x(x_in, groups);
  const auto ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct);
  const at::Tensor w = channel_param(weight, s, ct, 1.0, "weight");
  const at::Tensor b = channel_param(bias, s, ct, 0.0, "bias");
  const at::Tensor sc = film_param(scale, s, ct, "scale");
  const at::Tensor sh = film_param(shift, s, ct, "shift");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.n, s.groups}, x.options());
  at::Tensor rstd = at::empty({s.n, s.groups}, x.options());
  const int64_t m = s.cg * s.hw;
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "gn_film_silu_fwd", [&] {
      const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
      const scalar_t *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
      scalar_t *yp = y.data_ptr<scalar_t>(), *mp = mean.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
      at::parallel_for(0, s.n * s.groups, grain_for(m), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const auto g = group_args<scalar_t>(s, item, wp, bp, scp, shp, nullptr, nullptr);
          gn_fwd_entry(g, xp + item * m, yp + item * m, eps, silu, mp + item, rp + item);
        }
      });
    });
  }
  return {in_layout_of(to_dtype(y, x_in.scalar_type()), x_in), mean, rstd};
}

// Returns (dx, dweight (C,), dbias (C,), dscale (N, C), dshift (N, C)); the caller drops the
// gradients of parameters that were None and sums dscale/dshift for (C,)-shaped FiLM params.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_film_silu_bwd(
    const at::Tensor& grad_y, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    int64_t groups, bool silu) {
  const Shape s = check_x(x_in, groups);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "gn_film_silu_bwd: grad_y shape ", grad_y.sizes(),
              " != x shape ", x_in.sizes());
  const auto ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct);
  const at::Tensor gy = as_compute(grad_y, ct);
  const at::Tensor mean = as_compute(mean_in, ct), rstd = as_compute(rstd_in, ct);
  const at::Tensor w = channel_param(weight, s, ct, 1.0, "weight");
  const at::Tensor b = channel_param(bias, s, ct, 0.0, "bias");
  const at::Tensor sc = film_param(scale, s, ct, "scale");
  const at::Tensor sh = film_param(shift, s, ct, "shift");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight_n = at::zeros({s.n, s.c}, x.options());
  at::Tensor dbias_n = at::zeros({s.n, s.c}, x.options());
  at::Tensor dscale = at::zeros({s.n, s.c}, x.options());
  at::Tensor dshift = at::zeros({s.n, s.c}, x.options());
  const int64_t m = s.cg * s.hw;
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "gn_film_silu_bwd", [&] {
      const scalar_t *xp = x.data_ptr<scalar_t>(), *gyp = gy.data_ptr<scalar_t>();
      const scalar_t *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
      const scalar_t *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
      const scalar_t *mp = mean.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      scalar_t *dwp = dweight_n.data_ptr<scalar_t>(), *dbp = dbias_n.data_ptr<scalar_t>();
      scalar_t *dsp = dscale.data_ptr<scalar_t>(), *dtp = dshift.data_ptr<scalar_t>();
      at::parallel_for(0, s.n * s.groups, grain_for(2 * m), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const auto g = group_args<scalar_t>(s, item, wp, bp, scp, shp, nullptr, nullptr);
          const int64_t row = (item / s.groups) * s.c + (item % s.groups) * s.cg;
          gn_bwd_entry(g, xp + item * m, gyp + item * m, mp[item], rp[item], silu, dxp + item * m,
                       dwp + row, dbp + row, dsp + row, dtp + row);
        }
      });
    });
  }
  return {in_layout_of(to_dtype(dx, x_in.scalar_type()), x_in), dweight_n.sum(0), dbias_n.sum(0), dscale, dshift};
}

// Returns (y, ẏ, stats (N, G, 4) = (μ, r, mean(ẋ), mean(n̂·ẋ))).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_film_silu_dual_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x_dot,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& scale_dot,
    const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& shift_dot,
    int64_t groups, double eps, bool silu) {
  const Shape s = check_x(x_in, groups);
  const auto ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct);
  at::Tensor xd;
  if (x_dot.has_value() && x_dot->defined()) {
    TORCH_CHECK(x_dot->sizes() == x_in.sizes(), "gn_film_silu_dual: x_dot shape ", x_dot->sizes(),
                " != x shape ", x_in.sizes());
    xd = as_compute(*x_dot, ct);
  } else {
    xd = at::zeros_like(x);
  }
  const at::Tensor w = channel_param(weight, s, ct, 1.0, "weight");
  const at::Tensor b = channel_param(bias, s, ct, 0.0, "bias");
  const at::Tensor sc = film_param(scale, s, ct, "scale");
  const at::Tensor sh = film_param(shift, s, ct, "shift");
  const at::Tensor scd = film_param(scale_dot, s, ct, "scale_dot");
  const at::Tensor shd = film_param(shift_dot, s, ct, "shift_dot");
  at::Tensor y = at::empty_like(x), yd = at::empty_like(x);
  at::Tensor stats = at::zeros({s.n, s.groups, 4}, x.options());
  const int64_t m = s.cg * s.hw;
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "gn_film_silu_dual_fwd", [&] {
      const scalar_t *xp = x.data_ptr<scalar_t>(), *xdp = xd.data_ptr<scalar_t>();
      const scalar_t *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
      const scalar_t *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
      const scalar_t *scdp = scd.data_ptr<scalar_t>(), *shdp = shd.data_ptr<scalar_t>();
      scalar_t *yp = y.data_ptr<scalar_t>(), *ydp = yd.data_ptr<scalar_t>(), *stp = stats.data_ptr<scalar_t>();
      at::parallel_for(0, s.n * s.groups, grain_for(2 * m), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const auto g = group_args<scalar_t>(s, item, wp, bp, scp, shp, scdp, shdp);
          gn_dual_fwd_entry(g, xp + item * m, xdp + item * m, yp + item * m, ydp + item * m, eps,
                            silu, stp + 4 * item);
        }
      });
    });
  }
  const auto dt = x_in.scalar_type();
  return {in_layout_of(to_dtype(y, dt), x_in), in_layout_of(to_dtype(yd, dt), x_in), stats};
}

// Returns (dx, dẋ, dweight (C,), dbias (C,), dscale, dscale_dot, dshift, dshift_dot (N, C)).
// A None upstream gradient or tangent is zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gn_film_silu_dual_bwd(const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_y_dot,
                      const at::Tensor& x_in, const std::optional<at::Tensor>& x_dot,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& scale_dot,
                      const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& shift_dot,
                      const at::Tensor& stats_in, int64_t groups, bool silu) {
  const Shape s = check_x(x_in, groups);
  const auto ct = compute_type(x_in);
  const at::Tensor x = as_compute(x_in, ct);
  auto data_or_zeros = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return at::zeros_like(x);
    TORCH_CHECK(t->sizes() == x_in.sizes(), "gn_film_silu_dual_bwd: ", name, " shape ", t->sizes(),
                " != x shape ", x_in.sizes());
    return as_compute(*t, ct);
  };
  const at::Tensor xd = data_or_zeros(x_dot, "x_dot");
  const at::Tensor gy = data_or_zeros(grad_y, "grad_y");
  const at::Tensor gyd = data_or_zeros(grad_y_dot, "grad_y_dot");
  const at::Tensor stats = as_compute(stats_in, ct);
  TORCH_CHECK(stats.numel() == s.n * s.groups * 4, "gn_film_silu_dual_bwd: stats must be (N, G, 4)");
  const at::Tensor w = channel_param(weight, s, ct, 1.0, "weight");
  const at::Tensor b = channel_param(bias, s, ct, 0.0, "bias");
  const at::Tensor sc = film_param(scale, s, ct, "scale");
  const at::Tensor sh = film_param(shift, s, ct, "shift");
  const at::Tensor scd = film_param(scale_dot, s, ct, "scale_dot");
  const at::Tensor shd = film_param(shift_dot, s, ct, "shift_dot");
  at::Tensor dx = at::empty_like(x), dxd = at::empty_like(x);
  auto nc = [&] { return at::zeros({s.n, s.c}, x.options()); };
  at::Tensor dw_n = nc(), db_n = nc(), ds = nc(), dsd = nc(), dt = nc(), dtd = nc();
  const int64_t m = s.cg * s.hw;
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "gn_film_silu_dual_bwd", [&] {
      const scalar_t *xp = x.data_ptr<scalar_t>(), *xdp = xd.data_ptr<scalar_t>();
      const scalar_t *gyp = gy.data_ptr<scalar_t>(), *gydp = gyd.data_ptr<scalar_t>();
      const scalar_t *wp = w.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
      const scalar_t *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
      const scalar_t *scdp = scd.data_ptr<scalar_t>(), *shdp = shd.data_ptr<scalar_t>();
      const scalar_t* stp = stats.data_ptr<scalar_t>();
      scalar_t *dxp = dx.data_ptr<scalar_t>(), *dxdp = dxd.data_ptr<scalar_t>();
      scalar_t *dwp = dw_n.data_ptr<scalar_t>(), *dbp = db_n.data_ptr<scalar_t>();
      scalar_t *dsp = ds.data_ptr<scalar_t>(), *dsdp = dsd.data_ptr<scalar_t>();
      scalar_t *dtp = dt.data_ptr<scalar_t>(), *dtdp = dtd.data_ptr<scalar_t>();
      at::parallel_for(0, s.n * s.groups, grain_for(4 * m), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const auto g = group_args<scalar_t>(s, item, wp, bp, scp, shp, scdp, shdp);
          const int64_t row = (item / s.groups) * s.c + (item % s.groups) * s.cg;
          const int64_t off = item * m;
          gn_dual_bwd_entry(g, xp + off, xdp + off, gyp + off, gydp + off, stp + 4 * item, silu,
                            dxp + off, dxdp + off, dwp + row, dbp + row, dsp + row, dsdp + row,
                            dtp + row, dtdp + row);
        }
      });
    });
  }
  const auto dtype = x_in.scalar_type();
  return {in_layout_of(to_dtype(dx, dtype), x_in), in_layout_of(to_dtype(dxd, dtype), x_in), dw_n.sum(0), db_n.sum(0),
          ds, dsd, dt, dtd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow_cpp, CPU, m) {
  m.impl("gn_film_silu_fwd", &gn_film_silu_fwd);
  m.impl("gn_film_silu_bwd", &gn_film_silu_bwd);
  m.impl("gn_film_silu_dual_fwd", &gn_film_silu_dual_fwd);
  m.impl("gn_film_silu_dual_bwd", &gn_film_silu_dual_bwd);
}

}  // namespace fastflow
