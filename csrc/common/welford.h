// Moments of a set of values (count, mean, M2) for the normalization kernels, shared by the CPU
// and CUDA builds: a two-pass block's moments, merges of disjoint sets, and 1 / sqrt(var + eps).
// T is float or double on both compilers; on the CPU also at::vec::Vectorized<float|double> where
// a function runs lane-wise (welford_combine), with the count N a scalar shared by every lane.
#pragma once

#include "macros.h"

#include <math.h>

namespace fastdiff {

FASTDIFF_INLINE float sqrt_of(float v) { return ::sqrtf(v); }
FASTDIFF_INLINE double sqrt_of(double v) { return ::sqrt(v); }

// Moments of a set of values: how many, their mean, and M2 = sum of squared deviations from the mean.
// Never sum(v^2) - n * mean^2: that cancels catastrophically when |mean| >> std.
template <typename T, typename N = T>
struct WelfordStats {
  N count;
  T mean;
  T m2;
};

// Adds one value (Welford 1962): the update that keeps M2 without ever forming sum(v^2).
template <typename T>
FASTDIFF_INLINE WelfordStats<T> welford_update(WelfordStats<T> s, T v) {
  s.count += T(1);
  const T delta = v - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (v - s.mean);
  return s;
}

// Merges the moments of two disjoint sets (Chan, Golub & LeVeque 1979):
//   n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n.
// Either side may be empty: its d^2 term is left out, never weighted by 0 (d^2 * 0 is NaN for a mean
// whose square overflows: a group at 1e30 in float32), and an empty a gives mean_b * 1 exactly. Equal means merge
// exactly (d = 0), so sets whose own means are exact (the shifted moments of the kernels: a constant set's mean is its
// value) stay exact through any tree of merges.
template <typename T, typename N>
FASTDIFF_INLINE WelfordStats<T, N> welford_combine(const WelfordStats<T, N>& a, const WelfordStats<T, N>& b) {
  const N n = a.count + b.count;
  if (n == N(0)) {
    return a;
  }
  const N fb = b.count / n;
  const N weight = a.count * fb;  // 0 when either side is empty
  const T delta = b.mean - a.mean;
  const T cross = delta * delta * T(weight);
  // A select, not an early return per empty side: the branches made ptxas spill in a CUDA kernel.
  return {n, a.mean + delta * T(fb), a.m2 + b.m2 + (weight == N(0) ? T(0) : cross)};
}

// 1 / sqrt(var + eps) with the biased (population) variance M2 / n. M2 >= 0 in exact
// arithmetic; the clamp only removes a rounding-level negative. The count must be positive.
// A constant set has M2 = 0 exactly (shifted moments), so its rstd is 1 / sqrt(eps): Inf for
// eps = 0, and its centered values 0 * Inf = NaN, as the reference's 0 / 0. An M2 that overflows
// the type (values that differ by more than about 2^63 / sqrt(n) in float32) has no variance to
// normalise by: rstd is NaN there, so the row or group comes out NaN, visibly, rather than the
// offset alone that var = Inf, rstd = 0 would give (silently wrong; eager PyTorch gives 0 or NaN).
template <typename T>
FASTDIFF_INLINE T population_rstd(const WelfordStats<T>& s, T eps) {
  T var = s.m2 / s.count;
  if (var < T(0)) {
    var = T(0);
  }
  const T overflow = var - var;  // 0 for a finite variance, NaN for +Inf (and NaN)
  return overflow == T(0) ? T(1) / sqrt_of(var + eps) : overflow;
}

}  // namespace fastdiff
