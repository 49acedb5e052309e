// The conv3x3 CPU tile transforms (Winograd F(2x2, 3x3)), compiled once per CPU capability (see
// conv3x3_impl.inl). The launcher, conv3x3.cpp, runs input transform -> 16 GEMMs -> output
// transform.
#pragma once

#include "isa.h"

#include <cstdint>

namespace fastdiff::cpu {

// Sizes shared by both transforms. Tiles are 2x2 output pixels; tile t is (n, ty, tx) in row-major
// order over (N, tiles_h, tiles_w), and its 4x4 input patch starts at pixel (2*ty - 1, 2*tx - 1).
struct Conv3x3Geometry {
  int64_t n, h, w;            // batch, height, width of input and output
  int64_t c_in, c_out;        // channels
  int64_t tiles_h, tiles_w;   // ceil(h / 2), ceil(w / 2)
  int64_t tiles;              // n * tiles_h * tiles_w
};

// V[k][t - begin][ci] = (B^T d_t B)[k] for tiles t in [begin, end): x is (N, H, W, C_in) (NHWC,
// dense), V is (16, plane_tiles, C_in) with plane_tiles >= end - begin; pixels outside the map read
// as zero (the convolution's padding of 1).
using Conv3x3InputFn = void (*)(const float* x, float* v, int64_t plane_tiles, const Conv3x3Geometry& g,
                                int64_t begin, int64_t end);
// out[t's pixels][co] = (A^T M_t A) + bias[co] (+ residual) for tiles t in [begin, end): M is
// (16, plane_tiles, C_out), tile t at row t - begin; out and residual are (N, H, W, C_out) (NHWC,
// dense); bias and residual may be null.
using Conv3x3OutputFn = void (*)(const float* m, int64_t plane_tiles, const float* bias, const float* residual,
                                 float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end);
// U[k][ci][co] = (G g G^T)[k] for the filters g = w[ci][:][co] of input channels ci in [begin, end):
// w is the weight as (C_in, 9, C_out) (3x3 taps in the middle), U is (16, C_in, C_out).
using Conv3x3WeightFn = void (*)(const float* w, float* u, int64_t c_in, int64_t c_out, int64_t begin, int64_t end);

#define FASTDIFF_CONV3X3_DECLARE                                                                      \
  void conv3x3_weight(const float* w, float* u, int64_t c_in, int64_t c_out, int64_t begin, int64_t end); \
  void conv3x3_input_tiles(const float* x, float* v, int64_t plane_tiles, const Conv3x3Geometry& g,   \
                           int64_t begin, int64_t end);                                               \
  void conv3x3_output_tiles(const float* m, int64_t plane_tiles, const float* bias, const float* residual, \
                            float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end);

namespace isa_default {
FASTDIFF_CONV3X3_DECLARE
}  // namespace isa_default
#if FASTDIFF_CPU_HAVE_AVX2
namespace isa_avx2 {
FASTDIFF_CONV3X3_DECLARE
}  // namespace isa_avx2
#endif
#if FASTDIFF_CPU_HAVE_AVX512
namespace isa_avx512 {
FASTDIFF_CONV3X3_DECLARE
}  // namespace isa_avx512
#endif
#undef FASTDIFF_CONV3X3_DECLARE

}  // namespace fastdiff::cpu
