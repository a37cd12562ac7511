// Portable SIMD helpers for fastflow's CPU kernels: GCC vector extensions, an exp for float
// lanes, and the runtime ISA dispatch macro.
//
// Kernels are written once, as always-inline templates over Vec<T>, and instantiated inside
// functions marked FASTFLOW_TARGET_CLONES: GCC emits an x86-64-v3 (AVX2 + FMA) clone and a
// baseline clone of each and picks one at load time (ifunc, cpuid), so the extension keeps the
// x86-64-v2 baseline of setup.py yet runs 256-bit FMA code where the CPU has it. Vector types are
// 32 bytes wide; on the baseline clone GCC splits them into two SSE halves.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTFLOW_NO_CLONES)
#define FASTFLOW_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTFLOW_TARGET_CLONES
#endif
#define FASTFLOW_INLINE inline __attribute__((always_inline))
// For lambdas passed to vec_loop: `[&](int64_t i, int64_t n) FASTFLOW_LAMBDA { ... }`.
#define FASTFLOW_LAMBDA __attribute__((always_inline))

namespace fastflow {
namespace simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

// exp on 8 float lanes, Cephes expf (range reduction x = n·ln2 + r, |r| ≤ ln2/2, degree-6
// polynomial, 2^n by exponent bits); relative error ≈ 2 ulp. Inputs are clamped to
// [-87, 88] so the result stays finite and normal (exp(-87) ≈ 1.6e-38).
static FASTFLOW_INLINE f32x8 exp_f32x8(f32x8 x) {
  const f32x8 lo = f32x8{} - 87.0f, hi = f32x8{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  f32x8 fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest (no -ffast-math in this build)
  f32x8 r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  f32x8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x8 n = __builtin_convertvector(fx, i32x8);
  const i32x8 bits = (n + 127) << 23;
  return p * (f32x8)bits;  // same-size vector cast: bit reinterpretation
}

// Vec<T>: W lanes of T in one 32-byte vector. load/store take a lane count so a tail shorter
// than W reuses the same vector code (zero-padded load, partial store); `count == W` is a
// compile-time constant in the main loop, so the branch folds away there.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using V = f32x8;
  static constexpr int W = 8;
  static FASTFLOW_INLINE V splat(float a) { return V{} + a; }
  static FASTFLOW_INLINE V load(const float* p, int64_t count) {
    V v = V{};
    std::memcpy(&v, p, sizeof(float) * (count == W ? W : count));
    return v;
  }
  static FASTFLOW_INLINE void store(float* p, V v, int64_t count) {
    std::memcpy(p, &v, sizeof(float) * (count == W ? W : count));
  }
  static FASTFLOW_INLINE V exp(V x) { return exp_f32x8(x); }
  // 1.0 in the first `count` lanes, 0.0 after.
  static FASTFLOW_INLINE V mask(int64_t count) {
    const V iota = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
    const V c = splat(static_cast<float>(count));
    return iota < c ? splat(1.0f) : V{};
  }
  // v in the first `count` lanes, `fill` after.
  static FASTFLOW_INLINE V fill_tail(V v, int64_t count, float fill) {
    const V iota = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
    return iota < splat(static_cast<float>(count)) ? v : splat(fill);
  }
  static FASTFLOW_INLINE float sum(V v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  }
  static FASTFLOW_INLINE float max(V v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static FASTFLOW_INLINE V vmax(V a, V b) { return a > b ? a : b; }
};

// float64 path: used by the tests (tight comparisons) rather than for speed; exp per lane.
template <>
struct Vec<double> {
  using V = f64x4;
  static constexpr int W = 4;
  static FASTFLOW_INLINE V splat(double a) { return V{} + a; }
  static FASTFLOW_INLINE V load(const double* p, int64_t count) {
    V v = V{};
    std::memcpy(&v, p, sizeof(double) * (count == W ? W : count));
    return v;
  }
  static FASTFLOW_INLINE void store(double* p, V v, int64_t count) {
    std::memcpy(p, &v, sizeof(double) * (count == W ? W : count));
  }
  static FASTFLOW_INLINE V exp(V x) {
    for (int i = 0; i < W; ++i) x[i] = std::exp(x[i]);
    return x;
  }
  static FASTFLOW_INLINE V mask(int64_t count) {
    const V iota = {0., 1., 2., 3.};
    const V c = splat(static_cast<double>(count));
    return iota < c ? splat(1.0) : V{};
  }
  static FASTFLOW_INLINE V fill_tail(V v, int64_t count, double fill) {
    const V iota = {0., 1., 2., 3.};
    return iota < splat(static_cast<double>(count)) ? v : splat(fill);
  }
  static FASTFLOW_INLINE double sum(V v) { return (v[0] + v[2]) + (v[1] + v[3]); }
  static FASTFLOW_INLINE double max(V v) {
    double m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static FASTFLOW_INLINE V vmax(V a, V b) { return a > b ? a : b; }
};

// Calls body(i, count) for i = 0, W, 2W, ... with count = W, then once for the tail (count < W).
template <typename T, typename Body>
FASTFLOW_INLINE void vec_loop(int64_t n, Body&& body) {
  constexpr int64_t W = Vec<T>::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, n - i);
}

// σ(z) = 1 / (1 + e^{−z}).
template <typename T>
FASTFLOW_INLINE typename Vec<T>::V sigmoid(typename Vec<T>::V z) {
  return T(1) / (T(1) + Vec<T>::exp(-z));
}

// Name of the clone that FASTFLOW_TARGET_CLONES functions run on this CPU.
inline const char* active_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (avx2+fma)";
  return "x86-64-v2 baseline";
#else
  return "generic";
#endif
}

}  // namespace simd
}  // namespace fastflow
