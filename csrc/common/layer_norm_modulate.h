// LayerNorm + adaLN modulation arithmetic, shared by the CPU and CUDA kernels.
//
// The op is y = (LN(x) * w + bias) * (1 + s) + t over the last dimension D of x (B, N, D), with
// w/bias (D,) and s/t (B, D): DiT's modulate(norm(x), shift, scale) (Peebles & Xie 2023, sec. 3.2).
// Statistics are per row in float32 (float64 for float64 input): the row's mean, then the sum of
// squared deviations from it (two passes, never E[x^2] - E[x]^2). Per feature d of sample b the
// parts fold into a gain and an offset (modulate_coefficients), so each element costs one centering,
// one multiply by the row's rstd and one multiply-add. T is float or double on both compilers; on
// the CPU also at::vec::Vectorized<float|double> (modulate_apply runs lane-wise).
#pragma once

#include "macros.h"
#include "welford.h"

#include <stdint.h>

namespace fastdiff {

// Feature d of sample b: y = (x - mean) * rstd * gain + offset.
template <typename T>
struct ModulateCoefficients {
  T gain;
  T offset;
};

// Folds the affine and the modulation:
//   ((x - mean) * rstd * w + bias) * (1 + s) + t = ((x - mean) * rstd) * [w * (1 + s)] + [bias * (1 + s) + t].
// The row's rstd stays a separate factor (it changes per row, the gain only per sample), and x is
// centered before any multiply: a near-constant row has rstd ~ 1/sqrt(eps), and x * a - mean * a
// would cancel two large, separately rounded products. An absent part takes its neutral value
// (w = 1, bias = s = t = 0), which leaves the result bit-identical to skipping it.
//
// An infinite 1 + s with no bias would give 0 * Inf = NaN in the offset, where the reference gives
// (x - mean) * rstd * w * (1 + s) = +-Inf: a zero bias is left out of the offset instead (once per
// feature, never per element). With a bias and an infinite 1 + s the fold's two infinities can still
// cancel where the reference's h = n * w + bias does not: only the row's rstd could fold the bias into
// the center, and it changes per row.
template <typename T>
FASTDIFF_INLINE ModulateCoefficients<T> modulate_coefficients(T weight, T bias, T scale, T shift) {
  const T one_plus_scale = T(1) + scale;
  return {weight * one_plus_scale, (bias == T(0) ? T(0) : bias * one_plus_scale) + shift};
}

// The optional parts as the kernels see them; nullptr = absent (neutral value).
// scale and shift are read at a row stride: DiT's six modulation vectors are chunks of one
// (B, 6D) projection, (B, D) views with stride 6D that the kernels read in place.
template <typename param_t>
struct ModulateParams {
  const param_t* weight;  // (D,) contiguous
  const param_t* bias;    // (D,) contiguous
  const param_t* scale;   // (B, D), sample b at b * scale_stride, features contiguous
  const param_t* shift;   // (B, D), sample b at b * shift_stride, features contiguous
  int64_t scale_stride;   // elements between samples of scale
  int64_t shift_stride;   // elements between samples of shift

  // Feature d of sample b.
  template <typename T>
  FASTDIFF_INLINE ModulateCoefficients<T> coefficients(int64_t b, int64_t d) const {
    return modulate_coefficients<T>(weight != nullptr ? T(weight[d]) : T(1), bias != nullptr ? T(bias[d]) : T(0),
                                    scale != nullptr ? T(scale[b * scale_stride + d]) : T(0),
                                    shift != nullptr ? T(shift[b * shift_stride + d]) : T(0));
  }
};

// The per-element epilogue.
template <typename T>
FASTDIFF_INLINE T modulate_apply(const T& x, const T& mean, const T& rstd, const T& gain, const T& offset) {
  return (x - mean) * rstd * gain + offset;
}

}  // namespace fastdiff
