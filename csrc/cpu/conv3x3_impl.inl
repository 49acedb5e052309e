// Body of the conv3x3 CPU tile transforms: Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast
// Algorithms for Convolutional Neural Networks"). Included by exactly one .cpp per CPU capability,
// which first defines FASTDIFF_CPU_ISA (and for a SIMD build the CPU_CAPABILITY_* macros).
//
// A 2x2 output tile Y of a 3x3 convolution with filter g over the 4x4 input patch d is
//   Y = A^T [(G g G^T) . (B^T d B)] A       (. is the element-wise product, summed over channels)
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] and
// A^T = [1 1 1 0; 0 1 -1 -1]. The channel sum of the 16 element-wise products is 16 GEMMs (BLAS, in
// the launcher; or, on the fused path for few channels, gemm_rows here), so the transforms only add
// and subtract: vectors run along the channels, which are contiguous in NHWC.
#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including conv3x3_impl.inl"
#endif

#include "conv3x3_kernel.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Whole vectors use Lanes, a GCC/Clang vector of kLanes floats (unaligned): GCC keeps arrays of
// these in registers, where arrays of at::vec::Vectorized went through the stack. A channel range's
// last, partial vector uses Vectorized's masked loads and stores.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));
// The portable build's Lanes is wider than its SSE registers, and GCC notes that passing it by value
// has another ABI under AVX: irrelevant to these functions, which are internal to this build.
#pragma GCC diagnostic ignored "-Wpsabi"

struct WholeLanes {
  using T = Lanes;
  static Lanes load(const float* p) {
    Lanes v;
    std::memcpy(&v, p, sizeof(Lanes));
    return v;
  }
  static void store(const Lanes& v, float* p) { std::memcpy(p, &v, sizeof(Lanes)); }
  static Lanes zero() { return Lanes{}; }
};

// n values at p (n <= kLanes); the loadu(p, n) form zero-fills the lanes past n.
inline Vec load_lanes(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store_lanes(const Vec& v, float* p, int64_t n) {
  if (n == kLanes) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

struct PartLanes {  // the first n lanes
  using T = Vec;
  int64_t n;
  Vec load(const float* p) const { return Vec::loadu(p, n); }
  void store(const Vec& v, float* p) const { v.store(p, n); }
  static Vec zero() { return Vec(0.0f); }
};

// B^T d B for one vector of channels at offset c of the patch's 16 pixels, into the 16 planes.
template <typename Io>
inline void input_vector(const Io& io, const float* const (&pixel)[4][4], int64_t c, float* vt, int64_t plane) {
  using T = typename Io::T;
  T d[4][4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      d[i][j] = io.load(pixel[i][j] + c);
    }
  }
  T bd[4][4];  // B^T d
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    bd[0][j] = d[0][j] - d[2][j];
    bd[1][j] = d[1][j] + d[2][j];
    bd[2][j] = d[2][j] - d[1][j];
    bd[3][j] = d[1][j] - d[3][j];
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // (B^T d) B
    io.store(bd[i][0] - bd[i][2], vt + (4 * i + 0) * plane + c);
    io.store(bd[i][1] + bd[i][2], vt + (4 * i + 1) * plane + c);
    io.store(bd[i][2] - bd[i][1], vt + (4 * i + 2) * plane + c);
    io.store(bd[i][1] - bd[i][3], vt + (4 * i + 3) * plane + c);
  }
}

// A^T M A + bias (+ residual) for one vector of channels at offset c: the tile's rows x cols pixels,
// pixel (i, j) at out + first + i * row + j * c_out.
template <typename Io>
inline void output_vector(const Io& io, const float* mt, int64_t plane, int64_t c, const float* bias,
                          const float* residual, float* out, int64_t first, int64_t row, int64_t c_out, int64_t rows,
                          int64_t cols) {
  using T = typename Io::T;
  T s[2][4];  // A^T M
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const T m0 = io.load(mt + (0 + j) * plane + c);
    const T m1 = io.load(mt + (4 + j) * plane + c);
    const T m2 = io.load(mt + (8 + j) * plane + c);
    const T m3 = io.load(mt + (12 + j) * plane + c);
    s[0][j] = m0 + m1 + m2;
    s[1][j] = m1 - m2 - m3;
  }
  const T b = bias != nullptr ? io.load(bias + c) : Io::zero();
  for (int64_t i = 0; i < rows; ++i) {
    const T y[2] = {s[i][0] + s[i][1] + s[i][2] + b, s[i][1] - s[i][2] - s[i][3] + b};  // (A^T M) A
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t at = first + i * row + j * c_out + c;
      io.store(residual != nullptr ? y[j] + io.load(residual + at) : y[j], out + at);
    }
  }
}

// The tile after (n, ty, tx) in row-major order over (N, tiles_h, tiles_w).
inline void next_tile(int64_t& n, int64_t& ty, int64_t& tx, const Conv3x3Geometry& g) {
  if (++tx == g.tiles_w) {
    tx = 0;
    if (++ty == g.tiles_h) {
      ty = 0;
      ++n;
    }
  }
}

// The GEMM of the fused path, for kRows tiles of one Winograd position and kCols vectors of output
// channels: m[r][co] = sum over ci of v[r][ci] * u[ci][co]. The kRows x kCols sums stay in registers
// while ci runs; each step loads kCols vectors of u and broadcasts one value of v per tile.
template <int kRows, int kCols>
void gemm_rows(const float* v, int64_t ldv, const float* u, int64_t ldu, float* m, int64_t ldm, int64_t depth) {
  // depth >= 1: the first step sets the sums (no zeroed array for GCC to keep in memory).
  Lanes acc[kRows][kCols];
  Lanes w[kCols];
#pragma GCC unroll 4
  for (int j = 0; j < kCols; ++j) {
    w[j] = WholeLanes::load(u + j * kLanes);
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) {
      acc[r][j] = v[r * ldv] * w[j];
    }
  }
  for (int64_t ci = 1; ci < depth; ++ci) {
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) {
      w[j] = WholeLanes::load(u + ci * ldu + j * kLanes);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const float a = v[r * ldv + ci];
#pragma GCC unroll 4
      for (int j = 0; j < kCols; ++j) {
        acc[r][j] += a * w[j];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kCols; ++j) {
      WholeLanes::store(acc[r][j], m + r * ldm + j * kLanes);
    }
  }
}

// Tiles per group of the fused path: its GEMMs' register block (two vectors of output channels
// for this many tiles, plus the two vectors of u and a broadcast, fit the 32 AVX-512 registers; 16
// elsewhere).
constexpr int kGroupTiles = kLanes >= 16 ? 12 : 6;
using GemmRowsFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int... R>
constexpr std::array<std::array<GemmRowsFn, 2>, sizeof...(R)> gemm_table(std::integer_sequence<int, R...>) {
  return {{{&gemm_rows<R + 1, 1>, &gemm_rows<R + 1, 2>}...}};
}
constexpr auto kGemmRows = gemm_table(std::make_integer_sequence<int, kGroupTiles>{});

}  // namespace

// With g's rows r0..r2, G g = [r0; (r0 + r1 + r2) / 2; (r0 - r1 + r2) / 2; r2], and the same again on
// the columns; vectors run along C_out.
void conv3x3_weight(const float* w,  // (C_in, 9, C_out) filters, taps in row-major order
                    float* u,        // (16, C_in, ldu) transformed filters
                    int64_t c_in, int64_t c_out, int64_t ldu, int64_t begin, int64_t end) {
  const Vec half(0.5f);
  for (int64_t ci = begin; ci < end; ++ci) {
    const float* src = w + ci * 9 * c_out;
    float* dst = u + ci * ldu;
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
          store_lanes(row[j], dst + (4 * i + j) * c_in * ldu + c, lanes);
        }
      }
    }
  }
}

namespace {

// conv3x3_input_tiles; pixels outside the map (the convolution's zero padding) read from `zeros`,
// C_in zeros.
void input_tiles(const float* x, const float* zeros, float* v, const Conv3x3Layout& layout, const Conv3x3Geometry& g,
                 int64_t begin, int64_t end) {
  const int64_t c_in = g.c_in;
  const int64_t plane = layout.plane;
  const int64_t whole = c_in / kLanes * kLanes;  // channels in whole vectors
  // The tile's (n, ty, tx) advance with t: one division for the range, none per tile.
  const int64_t per_image = g.tiles_h * g.tiles_w;
  int64_t n = begin / per_image;
  int64_t ty = (begin % per_image) / g.tiles_w;
  int64_t tx = begin % g.tiles_w;
  for (int64_t t = begin; t < end; ++t, next_tile(n, ty, tx, g)) {
    const float* pixel[4][4];
    const int64_t y0 = 2 * ty - 1;
    const int64_t x0 = 2 * tx - 1;
    const int64_t corner = ((n * g.h + y0) * g.w + x0) * c_in;  // offset of pixel (y0, x0), maybe outside
    const bool interior = y0 >= 0 && y0 + 4 <= g.h && x0 >= 0 && x0 + 4 <= g.w;
    for (int64_t i = 0; i < 4; ++i) {
      for (int64_t j = 0; j < 4; ++j) {
        const bool inside = interior || (y0 + i >= 0 && y0 + i < g.h && x0 + j >= 0 && x0 + j < g.w);
        pixel[i][j] = inside ? x + (corner + (i * g.w + j) * c_in) : zeros;
      }
    }
    float* vt = v + (t - begin) * layout.tile;
    for (int64_t c = 0; c < whole; c += kLanes) {
      input_vector(WholeLanes{}, pixel, c, vt, plane);
    }
    if (whole < c_in) {
      input_vector(PartLanes{c_in - whole}, pixel, whole, vt, plane);
    }
  }
}

}  // namespace

void conv3x3_input_tiles(const float* x,  // (N, H, W, C_in) NHWC input
                         float* v,        // transformed patches, C_in contiguous (see Conv3x3Layout)
                         const Conv3x3Layout& layout, const Conv3x3Geometry& g, int64_t begin, int64_t end) {
  const std::vector<float> zeros(static_cast<size_t>(g.c_in));
  input_tiles(x, zeros.data(), v, layout, g, begin, end);
}

void conv3x3_output_tiles(const float* m,  // GEMM results, C_out contiguous (see Conv3x3Layout)
                          const Conv3x3Layout& layout,
                          const float* bias,      // (C_out,) or nullptr
                          const float* residual,  // (N, H, W, C_out) NHWC, or nullptr
                          float* out,             // (N, H, W, C_out) NHWC
                          const Conv3x3Geometry& g, int64_t begin, int64_t end) {
  const int64_t c_out = g.c_out;
  const int64_t whole = c_out / kLanes * kLanes;
  const int64_t row = g.w * c_out;
  const int64_t per_image = g.tiles_h * g.tiles_w;
  int64_t n = begin / per_image;
  int64_t ty = (begin % per_image) / g.tiles_w;
  int64_t tx = begin % g.tiles_w;
  for (int64_t t = begin; t < end; ++t, next_tile(n, ty, tx, g)) {
    const int64_t oy = 2 * ty;
    const int64_t ox = 2 * tx;
    const int64_t rows = std::min<int64_t>(2, g.h - oy);  // a map with an odd size ends in half tiles
    const int64_t cols = std::min<int64_t>(2, g.w - ox);
    const int64_t first = ((n * g.h + oy) * g.w + ox) * c_out;  // offset of the tile's top-left pixel
    const float* mt = m + (t - begin) * layout.tile;
    for (int64_t c = 0; c < whole; c += kLanes) {
      output_vector(WholeLanes{}, mt, layout.plane, c, bias, residual, out, first, row, c_out, rows, cols);
    }
    if (whole < c_out) {
      output_vector(PartLanes{c_out - whole}, mt, layout.plane, whole, bias, residual, out, first, row, c_out, rows,
                    cols);
    }
  }
}

void conv3x3_fused_tiles(const float* x, const float* u, int64_t ldu, const float* bias, const float* residual,
                         float* out, const Conv3x3Geometry& g, int64_t begin, int64_t end) {
  // V and M of one group of tiles, rows padded to whole vectors (ldu, a multiple of kLanes, for M)
  // and to 64-byte lines: the group's 16 planes stay in L1 between the three stages.
  const int64_t ldv = conv3x3_padded_row(g.c_in);
  const int64_t ldm = ldu;
  const Conv3x3Layout vl{ldv, kGroupTiles * ldv};
  const Conv3x3Layout ml{ldm, kGroupTiles * ldm};
  std::vector<float> scratch(static_cast<size_t>(16 * kGroupTiles * (ldv + ldm) + 16));
  const std::vector<float> zeros(static_cast<size_t>(g.c_in));
  float* v = scratch.data() + (16 - reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) % 16) % 16;
  float* m = v + 16 * kGroupTiles * ldv;
  for (int64_t first = begin; first < end; first += kGroupTiles) {
    const int64_t last = std::min(end, first + kGroupTiles);
    const int64_t rows = last - first;
    input_tiles(x, zeros.data(), v, vl, g, first, last);
    for (int64_t k = 0; k < 16; ++k) {
      const float* vk = v + k * vl.plane;
      const float* uk = u + k * g.c_in * ldu;
      float* mk = m + k * ml.plane;
      for (int64_t co = 0; co < ldu; co += 2 * kLanes) {
        const int cols = ldu - co >= 2 * kLanes ? 2 : 1;
        kGemmRows[rows - 1][cols - 1](vk, ldv, uk + co, ldu, mk + co, ldm, g.c_in);
      }
    }
    conv3x3_output_tiles(m, ml, bias, residual, out, g, first, last);
  }
}

}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
