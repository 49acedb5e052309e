// Body of the conv3x3 CPU tile transforms: Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast
// Algorithms for Convolutional Neural Networks"). Included by exactly one .cpp per CPU capability,
// which first defines FASTDIFF_CPU_ISA (and for a SIMD build the CPU_CAPABILITY_* macros).
//
// A 2x2 output tile Y of a 3x3 convolution with filter g over the 4x4 input patch d is
//   Y = A^T [(G g G^T) . (B^T d B)] A       (. is the element-wise product, summed over channels)
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] and
// A^T = [1 1 1 0; 0 1 -1 -1]. The channel sum of the 16 element-wise products is 16 GEMMs (done by
// the launcher), so these transforms only add and subtract: vectors run along the channels, which
// are contiguous in NHWC.
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including conv3x3_impl.inl"
#endif

#include "conv3x3_kernel.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// n values at p (n <= kLanes); the loadu(p, n) form zero-fills the lanes past n.
inline Vec load_lanes(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store_lanes(const Vec& v, float* p, int64_t n) {
  if (n == kLanes) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

}  // namespace

// With g's rows r0..r2, G g = [r0; (r0 + r1 + r2) / 2; (r0 - r1 + r2) / 2; r2], and the same again on
// the columns; vectors run along C_out.
void conv3x3_weight(const float* w,  // (C_in, 9, C_out) filters, taps in row-major order
                    float* u,        // (16, C_in, C_out) transformed filters
                    int64_t c_in, int64_t c_out, int64_t begin, int64_t end) {
  const Vec half(0.5f);
  for (int64_t ci = begin; ci < end; ++ci) {
    const float* src = w + ci * 9 * c_out;
    float* dst = u + ci * c_out;
    for (int64_t c = 0; c < c_out; c += kLanes) {
      const int64_t lanes = std::min(kLanes, c_out - c);
      Vec gg[4][3];  // G g
      for (int64_t j = 0; j < 3; ++j) {
        const Vec r0 = load_lanes(src + (0 + j) * c_out + c, lanes);
        const Vec r1 = load_lanes(src + (3 + j) * c_out + c, lanes);
        const Vec r2 = load_lanes(src + (6 + j) * c_out + c, lanes);
        gg[0][j] = r0;
        gg[1][j] = half * (r0 + r1 + r2);
        gg[2][j] = half * (r0 - r1 + r2);
        gg[3][j] = r2;
      }
      for (int64_t i = 0; i < 4; ++i) {  // (G g) G^T
        const Vec row[4] = {gg[i][0], half * (gg[i][0] + gg[i][1] + gg[i][2]), half * (gg[i][0] - gg[i][1] + gg[i][2]),
                            gg[i][2]};
        for (int64_t j = 0; j < 4; ++j) {
          store_lanes(row[j], dst + (4 * i + j) * c_in * c_out + c, lanes);
        }
      }
    }
  }
}

void conv3x3_input_tiles(const float* x,  // (N, H, W, C_in) NHWC input
                         float* v,        // (16, plane_tiles, C_in) transformed patches
                         int64_t plane_tiles, const Conv3x3Geometry& g, int64_t begin, int64_t end) {
  const int64_t c_in = g.c_in;
  const int64_t plane = plane_tiles * c_in;
  const int64_t per_image = g.tiles_h * g.tiles_w;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / per_image;
    const int64_t ty = (t % per_image) / g.tiles_w;
    const int64_t tx = t % g.tiles_w;
    // The patch's 16 pixels; nullptr where the patch hangs over the map (zero padding).
    const float* pixel[4][4];
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t y = 2 * ty - 1 + i;
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t xx = 2 * tx - 1 + j;
        const bool inside = y >= 0 && y < g.h && xx >= 0 && xx < g.w;
        pixel[i][j] = inside ? x + ((n * g.h + y) * g.w + xx) * c_in : nullptr;
      }
    }
    float* vt = v + (t - begin) * c_in;
    for (int64_t c = 0; c < c_in; c += kLanes) {
      const int64_t lanes = std::min(kLanes, c_in - c);
      Vec d[4][4];
      for (int64_t i = 0; i < 4; ++i) {
        for (int64_t j = 0; j < 4; ++j) {
          d[i][j] = pixel[i][j] != nullptr ? load_lanes(pixel[i][j] + c, lanes) : Vec(0.0f);
        }
      }
      Vec bd[4][4];  // B^T d
      for (int64_t j = 0; j < 4; ++j) {
        bd[0][j] = d[0][j] - d[2][j];
        bd[1][j] = d[1][j] + d[2][j];
        bd[2][j] = d[2][j] - d[1][j];
        bd[3][j] = d[1][j] - d[3][j];
      }
      for (int64_t i = 0; i < 4; ++i) {  // (B^T d) B
        store_lanes(bd[i][0] - bd[i][2], vt + (4 * i + 0) * plane + c, lanes);
        store_lanes(bd[i][1] + bd[i][2], vt + (4 * i + 1) * plane + c, lanes);
        store_lanes(bd[i][2] - bd[i][1], vt + (4 * i + 2) * plane + c, lanes);
        store_lanes(bd[i][1] - bd[i][3], vt + (4 * i + 3) * plane + c, lanes);
      }
    }
  }
}

void conv3x3_output_tiles(const float* m,         // (16, plane_tiles, C_out) GEMM results
                          int64_t plane_tiles,    // rows per plane of m
                          const float* bias,      // (C_out,) or nullptr
                          const float* residual,  // (N, H, W, C_out) NHWC, or nullptr
                          float* out,             // (N, H, W, C_out) NHWC
                          const Conv3x3Geometry& g, int64_t begin, int64_t end) {
  const int64_t c_out = g.c_out;
  const int64_t plane = plane_tiles * c_out;
  const int64_t per_image = g.tiles_h * g.tiles_w;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t n = t / per_image;
    const int64_t oy = 2 * ((t % per_image) / g.tiles_w);
    const int64_t ox = 2 * (t % g.tiles_w);
    const int64_t rows = std::min<int64_t>(2, g.h - oy);  // a map with an odd size ends in half tiles
    const int64_t cols = std::min<int64_t>(2, g.w - ox);
    const int64_t first = ((n * g.h + oy) * g.w + ox) * c_out;  // offset of the tile's top-left pixel
    const float* mt = m + (t - begin) * c_out;
    for (int64_t c = 0; c < c_out; c += kLanes) {
      const int64_t lanes = std::min(kLanes, c_out - c);
      Vec s[2][4];  // A^T M
      for (int64_t j = 0; j < 4; ++j) {
        const Vec m0 = load_lanes(mt + (0 + j) * plane + c, lanes);
        const Vec m1 = load_lanes(mt + (4 + j) * plane + c, lanes);
        const Vec m2 = load_lanes(mt + (8 + j) * plane + c, lanes);
        const Vec m3 = load_lanes(mt + (12 + j) * plane + c, lanes);
        s[0][j] = m0 + m1 + m2;
        s[1][j] = m1 - m2 - m3;
      }
      const Vec b = bias != nullptr ? load_lanes(bias + c, lanes) : Vec(0.0f);
      for (int64_t i = 0; i < rows; ++i) {
        const Vec y[2] = {s[i][0] + s[i][1] + s[i][2] + b, s[i][1] - s[i][2] - s[i][3] + b};  // (A^T M) A
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t at = first + (i * g.w + j) * c_out + c;
          const Vec value = residual != nullptr ? y[j] + load_lanes(residual + at, lanes) : y[j];
          store_lanes(value, out + at, lanes);
        }
      }
    }
  }
}

}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
