// The layer_norm_modulate CPU kernel, compiled once per CPU capability (see layer_norm_modulate_impl.inl).
#pragma once

#include "isa.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastdiff::cpu {

// What the kernel needs; the launcher (layer_norm_modulate.cpp) has checked and prepared all of it.
struct LayerNormModulateArgs {
  c10::ScalarType dtype;  // of x and out: Float, Double, Half or BFloat16
  const void* x;          // (B, N, D): row (b, n) at b * stride_b + n * stride_n, features contiguous
  void* out;              // (B, N, D) contiguous
  // Optional parts in x's math type (float; double for double x), features contiguous; nullptr = absent.
  const void* weight;    // (D,)
  const void* bias;      // (D,)
  const void* scale;     // (B, D), sample b at b * scale_stride
  const void* shift;     // (B, D), sample b at b * shift_stride
  int64_t scale_stride;  // in elements
  int64_t shift_stride;  // in elements
  int64_t batch;         // B >= 1
  int64_t tokens;        // N >= 1
  int64_t features;      // D >= 1
  int64_t stride_b;      // x's stride of dim 0, in elements
  int64_t stride_n;      // x's stride of dim 1, in elements
  double eps;
};

using LayerNormModulateFn = void (*)(const LayerNormModulateArgs& args);

namespace isa_default {
void layer_norm_modulate_kernel(const LayerNormModulateArgs& args);
}  // namespace isa_default

#if FASTDIFF_CPU_HAVE_AVX2
namespace isa_avx2 {
void layer_norm_modulate_kernel(const LayerNormModulateArgs& args);
}  // namespace isa_avx2
#endif

#if FASTDIFF_CPU_HAVE_AVX512
namespace isa_avx512 {
void layer_norm_modulate_kernel(const LayerNormModulateArgs& args);
}  // namespace isa_avx512
#endif

}  // namespace fastdiff::cpu
