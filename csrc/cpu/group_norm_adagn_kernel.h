// The group_norm_adagn CPU kernel, compiled once per CPU capability (see group_norm_adagn_impl.inl).
#pragma once

#include "isa.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastdiff::cpu {

// What the kernel needs; the launcher (group_norm_adagn.cpp) has checked and prepared all of it.
struct GroupNormAdagnArgs {
  c10::ScalarType dtype;  // of x and out: Float, Double, Half or BFloat16
  const void* x;          // (B, C, S) contiguous, or (B, S, C) contiguous when channels_last
  void* out;              // same shape and layout as x
  // Optional per-channel parts, contiguous, in x's math type (float; double for double x); nullptr = absent.
  const void* weight;     // (C,)
  const void* bias;       // (C,)
  const void* scale;      // (B, C)
  const void* shift;      // (B, C)
  const void* pre_shift;  // (B, C)
  int64_t batch;          // B >= 1
  int64_t channels;       // C >= 1, a multiple of groups
  int64_t groups;         // G >= 1
  int64_t spatial;        // S = prod(spatial sizes) >= 1
  bool channels_last;     // layout of x and out
  double eps;
  bool silu;
};

using GroupNormAdagnFn = void (*)(const GroupNormAdagnArgs& args);

namespace isa_default {
void group_norm_adagn_kernel(const GroupNormAdagnArgs& args);
}  // namespace isa_default

#if FASTDIFF_CPU_HAVE_AVX2
namespace isa_avx2 {
void group_norm_adagn_kernel(const GroupNormAdagnArgs& args);
}  // namespace isa_avx2
#endif

#if FASTDIFF_CPU_HAVE_AVX512
namespace isa_avx512 {
void group_norm_adagn_kernel(const GroupNormAdagnArgs& args);
}  // namespace isa_avx512
#endif

}  // namespace fastdiff::cpu
