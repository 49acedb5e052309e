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
  int64_t n, h, w;           // batch, height, width of input and output
  int64_t c_in, c_out;       // channels
  int64_t tiles_h, tiles_w;  // ceil(h / 2), ceil(w / 2)
  int64_t tiles;             // n * tiles_h * tiles_w
};

// A row of `channels` floats rounded up to whole 64-byte lines (16 floats, a multiple of every
// build's vector width): the row stride of U, and of the fused path's V and M.
inline int64_t conv3x3_padded_row(int64_t channels) { return (channels + 15) / 16 * 16; }

// Where the transformed values of tile t (counted from the range's first) and Winograd position k
// (0..15) start in V or M: at (t - begin) * tile + k * plane floats, channels contiguous from there.
struct Conv3x3Layout {
  int64_t tile;
  int64_t plane;
};

// V[k][t - begin][ci] = (B^T d_t B)[k] for tiles t in [begin, end), placed by `layout`: x is (N, H,
// W, C_in) (NHWC, dense); pixels outside the map read as zero (the convolution's padding of 1).
using Conv3x3InputFn = void (*)(const float* x, float* v, const Conv3x3Layout& layout, const Conv3x3Geometry& g,
                                int64_t begin, int64_t end);
// out[t's pixels][co] = (A^T M_t A) + bias[co] (+ residual) for tiles t in [begin, end), M placed by
// `layout`; out and residual are (N, H, W, C_out) (NHWC, dense); bias and residual may be null.
using Conv3x3OutputFn = void (*)(const float* m, const Conv3x3Layout& layout, const float* bias, const float* residual,
                                 float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end);
// U[k][ci][co] = (G g G^T)[k] for the filters g = w[ci][:][co] of input channels ci in [begin, end):
// w is the weight as (C_in, 9, C_out) (3x3 taps in the middle), U is (16, C_in, ldu), ldu >= C_out.
using Conv3x3WeightFn = void (*)(const float* w, float* u, int64_t c_in, int64_t c_out, int64_t ldu, int64_t begin,
                                 int64_t end);

// The whole convolution for tiles [begin, end), in groups small enough that their V and M stay in
// L1, with the GEMMs in registers (no BLAS): for few channels, where the BLAS path's V and M of a
// block of 256 tiles travel through L2 and the transforms cost more than the GEMMs. u is (16, C_in,
// ldu) with ldu a multiple of 16 and its columns past C_out zero.
using Conv3x3FusedFn = void (*)(const float* x, const float* u, int64_t ldu, const float* bias, const float* residual,
                                float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end);

#define FASTDIFF_CONV3X3_DECLARE                                                                                       \
  void conv3x3_weight(const float* w, float* u, int64_t c_in, int64_t c_out, int64_t ldu, int64_t begin, int64_t end); \
  void conv3x3_input_tiles(const float* x, float* v, const Conv3x3Layout& layout, const Conv3x3Geometry& g,            \
                           int64_t begin, int64_t end);                                                                \
  void conv3x3_output_tiles(const float* m, const Conv3x3Layout& layout, const float* bias, const float* residual,     \
                            float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end);                         \
  void conv3x3_fused_tiles(const float* x, const float* u, int64_t ldu, const float* bias, const float* residual,      \
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
