// GroupNorm + AdaGN (+ SiLU) arithmetic, shared by the CPU and CUDA kernels.
//
// The op is y = act((GN(x + p) * w + b) * (1 + s) + t) with GN's statistics taken per (sample,
// group) in float32 (float64 for float64 input). Per element it folds into centering and one
// multiply-add with per-channel coefficients (adagn_coefficients), so the kernels only gather
// statistics, fold, and apply. T is float or double on both compilers; on the CPU it is
// also at::vec::Vectorized<float|double> where a function runs lane-wise (welford_combine over
// channels, adagn_apply), with the count a scalar: every lane holds the same number of values.
#pragma once

#include "macros.h"
#include "welford.h"

#include <math.h>
#include <stdint.h>

namespace fastdiff {

FASTDIFF_INLINE float exp_of(float v) { return ::expf(v); }
FASTDIFF_INLINE double exp_of(double v) { return ::exp(v); }

// exp for the SiLU; the CPU kernels specialize it for at::vec::Vectorized (a struct, not an overload,
// so that a specialization declared after this template is still the one picked at instantiation).
template <typename T>
struct ExpOf {
  static FASTDIFF_INLINE T apply(const T& v) { return exp_of(v); }
};

// 1 / sqrt(var + eps) of a group, with the biased (population) variance (welford.h).
template <typename T>
FASTDIFF_INLINE T group_norm_rstd(const WelfordStats<T>& s, T eps) {
  return population_rstd(s, eps);
}

// One channel's output before the activation: y = ((x + pre_shift) - mean) * a + b.
template <typename T>
struct AdagnCoefficients {
  T pre_shift;
  T mean;
  T a;
  T b;
};

// Folds the affine and AdaGN's (1 + scale) and shift into one multiply-add per element:
//   ((x + p - mean) * rstd * w + bias) * (1 + s) + t
//     = ((x + p) - mean) * [rstd * w * (1 + s)] + [bias * (1 + s) + t].
// mean/rstd are the group's statistics of x + p. The input is centered before the multiply, in the
// reference's order, rather than folding -mean * a into b: a small variance makes rstd large
// (1/sqrt(eps) for a constant group), and x * a - mean * a would cancel two large, separately
// rounded products. An absent part takes its neutral value (w = 1, bias = s = t = p = 0), which
// leaves the result bit-identical to skipping it.
//
// An infinite 1 + s (once per channel, never per element) would put Inf - Inf or 0 * Inf into b,
// where the reference computes h = n * w + bias first and gives h * (1 + s) = +-Inf: so there the
// bias moves into the center instead, ((x + p) - (mean - bias / (rstd * w))) * [rstd * w * (1 + s)] + t,
// which is NaN only where h = 0, as the reference's 0 * Inf is (w = 0: y = bias * (1 + s) + t).
template <typename T>
FASTDIFF_INLINE AdagnCoefficients<T> adagn_coefficients(T mean, T rstd, T weight, T bias, T scale, T shift,
                                                        T pre_shift) {
  const T one_plus_scale = T(1) + scale;
  if (one_plus_scale - one_plus_scale == T(0)) {  // finite (v - v is NaN for +-Inf and NaN)
    return {pre_shift, mean, rstd * weight * one_plus_scale, bias * one_plus_scale + shift};
  }
  const T gain = rstd * weight;
  if (bias == T(0)) {
    return {pre_shift, mean, gain * one_plus_scale, shift};
  }
  if (gain == T(0)) {
    return {pre_shift, mean, T(0), bias * one_plus_scale + shift};
  }
  return {pre_shift, mean - bias / gain, gain * one_plus_scale, shift};
}

// The optional per-channel parts as the kernels see them; nullptr = absent (neutral value).
template <typename param_t>
struct AdagnParams {
  const param_t* weight;     // (C,)
  const param_t* bias;       // (C,)
  const param_t* scale;      // (B, C)
  const param_t* shift;      // (B, C)
  const param_t* pre_shift;  // (B, C)
  int64_t channels;          // C

  template <typename T>
  FASTDIFF_INLINE T pre_shift_at(int64_t b, int64_t c) const {
    return pre_shift != nullptr ? T(pre_shift[b * channels + c]) : T(0);
  }

  // Channel c of sample b, given its group's statistics of x + pre_shift.
  template <typename T>
  FASTDIFF_INLINE AdagnCoefficients<T> coefficients(int64_t b, int64_t c, T mean, T rstd) const {
    const int64_t bc = b * channels + c;
    return adagn_coefficients<T>(mean, rstd, weight != nullptr ? T(weight[c]) : T(1),
                                 bias != nullptr ? T(bias[c]) : T(0), scale != nullptr ? T(scale[bc]) : T(0),
                                 shift != nullptr ? T(shift[bc]) : T(0), pre_shift_at<T>(b, c));
  }
};

// silu(y) = y * sigmoid(y) = y / (1 + exp(-y)); exp(-y) = inf for very negative y gives -0, not NaN.
template <typename T>
FASTDIFF_INLINE T silu_value(const T& y) {
  return y / (T(1) + ExpOf<T>::apply(-y));
}

// The per-element epilogue: act(((x + pre_shift) - mean) * a + b).
template <typename T>
FASTDIFF_INLINE T adagn_apply(const T& x, const T& pre_shift, const T& mean, const T& a, const T& b, bool silu) {
  const T y = ((x + pre_shift) - mean) * a + b;
  return silu ? silu_value(y) : y;
}

}  // namespace fastdiff
