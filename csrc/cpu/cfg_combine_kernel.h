// The cfg_combine CPU inner loop, compiled once per CPU capability (see cfg_combine_chunk.inl).
#pragma once

#include "isa.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastdiff::cpu {

// out[i] = uncond[i] + scale * (cond[i] - uncond[i]) for i in [begin, end); uncond = in[0, n),
// cond = in[n, 2n). dtype is float, double, Half or BFloat16.
using CfgCombineChunkFn = void (*)(c10::ScalarType dtype, void* out, const void* in, int64_t n, double scale,
                                   int64_t begin, int64_t end);

namespace isa_default {
void cfg_combine_chunk(c10::ScalarType dtype, void* out, const void* in, int64_t n, double scale, int64_t begin,
                       int64_t end);
}  // namespace isa_default

#if FASTDIFF_CPU_HAVE_AVX2
namespace isa_avx2 {
void cfg_combine_chunk(c10::ScalarType dtype, void* out, const void* in, int64_t n, double scale, int64_t begin,
                       int64_t end);
}  // namespace isa_avx2
#endif

}  // namespace fastdiff::cpu
