// Philox4x32-10 normals for the CPU kernels, many blocks at a time: the numbers of
// csrc/common/philox.h's philox_block (the contract shared with the CUDA kernel and
// fastdiff/reference/philox.py), drawn for groups of kPhiloxGroupElements consecutive elements of one
// image. Included inside one CPU capability's build (FASTDIFF_CPU_ISA defined; for a SIMD build the
// CPU_CAPABILITY_* macros).
//
// Portable build: philox_block, one block at a time (glibc's logf/cosf/sinf).
//
// AVX2 build: the Philox words of 8 blocks per register, one block per 32-bit lane, two registers
// interleaved (the rounds are a chain of multiplies: one register alone waits on their latency).
// _mm256_mul_epu32 gives the high halves of the 32x32->64 products (even and odd lanes apart),
// _mm256_mullo_epi32 the low ones: the words are bit-identical to philox4x32_10's. Then Box-Muller as
// philox_normal4, the same float32 arithmetic in the same order (uniform (bits >> 8) + 0.5 times
// 2^-24; r = sqrt(-2 log u) from words 0 and 2, theta = 2 pi u from words 1 and 3; cos to the even
// element of a pair, sin to the odd one), with the vector log and sincos below in place of glibc's
// logf/sinf/cosf: within 0.82 and 0.81 ulp of the exact values for every input they can get here (all
// 2^24 uniforms u and the float32 2 pi u of each; checked exhaustively against float64, where glibc's
// are within 0.79 and 0.56 ulp), so the normals stay within an ulp or two of the scalar ones (92% of
// the logs and 98.5% of the sines and cosines are glibc's bit for bit), as the scalar ones are of the
// GPU's.
//
// Every element's normal comes from the same group computation whatever part of the image a caller
// asks for, so the result does not depend on how the parallel loop splits the work.
#pragma once

#ifndef FASTDIFF_CPU_ISA
#error "define FASTDIFF_CPU_ISA before including philox_vec.h"
#endif

#include "../common/philox.h"

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
#define FASTDIFF_PHILOX_AVX2 1
#include <immintrin.h>
#else
#define FASTDIFF_PHILOX_AVX2 0
#endif

namespace fastdiff::cpu::FASTDIFF_CPU_ISA {
namespace {

#if FASTDIFF_PHILOX_AVX2

namespace philox_avx2 {

// Philox blocks per register, and registers drawn together.
constexpr int kLanes = 8;
constexpr int kChains = 2;

FASTDIFF_INLINE __m256i bcast(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// v, opaque to the optimizer: g++ contracts a * b + c into one FMA even across intrinsics
// (-ffp-contract=fast), which would break an algorithm that needs the rounded product (TwoSum below).
FASTDIFF_INLINE __m256 rounded(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// The high and low halves of a * m for each uint32 lane of a (m: the multiplier in every lane).
FASTDIFF_INLINE void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6: 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

FASTDIFF_INLINE void mulhilo_scalar(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// philox_uniform per lane is u = v 2^-24 with v = (bits >> 8) + 0.5, rounded to float (exactly the
// scalar code's rounding). The functions below take v: log(u) is log(v) - 24 ln 2 with the exponent
// shifted by 24 before any rounding, and theta = 2 pi u is (2 pi 2^-24) v, so both are bit-identical to
// computing from u, one multiply cheaper.
FASTDIFF_INLINE __m256 uniform_scaled(__m256i bits) {
  return _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8)),
                       _mm256_set1_ps(0.5f));  // rounds as philox_uniform
}

// The math below works on K registers side by side, each step for all K before the next: a single
// register's polynomial is one long chain of dependent FMAs, and the core would wait on it.

// -2 log(u), u = v 2^-24 the uniform of each lane of bits. v = m 2^e with m in [sqrt(1/2), sqrt(2))
// from the bits; log(m) = f - f^2 / 2 + f^3 P(f) with f = m - 1 (exact), (e - 24) ln 2 in two parts
// (Cephes logf's polynomial and split). log(u) is within 0.82 ulp on every uniform; times -2 (exact).
template <int K>
FASTDIFF_INLINE void minus_two_log_uniform(const __m256i* bits, __m256* out) {
  __m256 f[K], ef[K], z[K], p[K];
  for (int k = 0; k < K; ++k) {
    const __m256i iv = _mm256_castps_si256(uniform_scaled(bits[k]));
    const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(iv, _mm256_set1_epi32(0x3f3504f3)), 23);  // sqrt(1/2)
    f[k] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_sub_epi32(iv, _mm256_slli_epi32(e, 23))), _mm256_set1_ps(1.0f));
    ef[k] = _mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(24)));
    z[k] = _mm256_mul_ps(f[k], f[k]);
    p[k] = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292E-2f), f[k], _mm256_set1_ps(-1.1514610310E-1f));
  }
  constexpr float kP[] = {1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                          2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f};
  for (float c : kP) {
    for (int k = 0; k < K; ++k) {
      p[k] = _mm256_fmadd_ps(p[k], f[k], _mm256_set1_ps(c));
    }
  }
  for (int k = 0; k < K; ++k) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p[k], f[k]), z[k]);
    y = _mm256_fmadd_ps(ef[k], _mm256_set1_ps(-2.12194440E-4f), y);  // ln 2 - 0.693359375
    y = _mm256_fmadd_ps(z[k], _mm256_set1_ps(-0.5f), y);
    const __m256 log_u = _mm256_fmadd_ps(ef[k], _mm256_set1_ps(0.693359375f), _mm256_add_ps(f[k], y));
    out[k] = _mm256_mul_ps(_mm256_set1_ps(-2.0f), log_u);
  }
}

// sin and cos of theta = 2 pi u (float32, as the scalar code rounds it), u = v 2^-24 the uniform of each
// lane of bits. theta = q pi/2 + hi + lo: q = round(4 u) (from the integer bits), theta - q A exact by
// FMA (A = pi/2 rounded to float; |theta - q A| < 1 is a multiple of 2^-23), then minus q (pi/2 - A) as
// a float pair (TwoSum: the remainder can be as small as that term); Cephes sinf/cosf polynomials on
// |hi| <= pi/4 + 3e-7, cos with 1 - hi^2/2 carried exactly; the quadrant picks and signs. Within 0.81
// ulp of sin and cos of the float32 theta for every u.
template <int K>
FASTDIFF_INLINE void sincos_uniform(const __m256i* bits, __m256* sin_out, __m256* cos_out) {
  __m256i qi[K];
  __m256 hi[K], lo[K], z[K], sp[K], cp[K], c[K];
  for (int k = 0; k < K; ++k) {
    const __m256i top = _mm256_srli_epi32(bits[k], 8);
    qi[k] = _mm256_srli_epi32(_mm256_add_epi32(top, _mm256_set1_epi32(1 << 21)), 22);  // round((top + 0.5) / 2^22)
    const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(6.2831853071795864769f / 16777216.0f),
                                       _mm256_add_ps(_mm256_cvtepi32_ps(top), _mm256_set1_ps(0.5f)));
    const __m256 q = _mm256_cvtepi32_ps(qi[k]);
    const __m256 x = _mm256_fnmadd_ps(q, _mm256_set1_ps(1.5707963705062866f), theta);  // exact
    const __m256 b = _mm256_set1_ps(-4.3711388286737929e-08f);                         // pi/2 - A, rounded
    const __m256 qb = rounded(_mm256_mul_ps(q, b));
    const __m256 qb_lo = _mm256_fmsub_ps(q, b, qb);
    hi[k] = _mm256_sub_ps(x, qb);
    const __m256 bb = _mm256_sub_ps(hi[k], x);
    const __m256 err = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_sub_ps(hi[k], bb)), _mm256_add_ps(qb, bb));
    lo[k] = _mm256_fnmadd_ps(q, _mm256_set1_ps(-1.7151245100059532e-15f), _mm256_sub_ps(err, qb_lo));
  }
  for (int k = 0; k < K; ++k) {
    z[k] = _mm256_mul_ps(hi[k], hi[k]);
    sp[k] = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891E-4f), z[k], _mm256_set1_ps(8.3321608736E-3f));
    cp[k] = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948E-5f), z[k], _mm256_set1_ps(-1.388731625493765E-3f));
  }
  for (int k = 0; k < K; ++k) {
    sp[k] = _mm256_fmadd_ps(sp[k], z[k], _mm256_set1_ps(-1.6666654611E-1f));
    cp[k] = _mm256_fmadd_ps(cp[k], z[k], _mm256_set1_ps(4.166664568298827E-2f));
  }
  for (int k = 0; k < K; ++k) {
    // cos(hi + lo) = w + (((1 - w) - z/2) - z_lo/2 - hi lo + z^2 cp), w = 1 - z/2, z + z_lo = hi^2
    const __m256 z_lo = _mm256_fmsub_ps(hi[k], hi[k], z[k]);
    const __m256 hz = _mm256_mul_ps(z[k], _mm256_set1_ps(0.5f));
    const __m256 w = _mm256_sub_ps(_mm256_set1_ps(1.0f), hz);
    __m256 corr = _mm256_sub_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), w), hz);
    corr = _mm256_fnmadd_ps(z_lo, _mm256_set1_ps(0.5f), _mm256_fnmadd_ps(lo[k], hi[k], corr));
    c[k] = _mm256_add_ps(w, _mm256_fmadd_ps(_mm256_mul_ps(cp[k], z[k]), z[k], corr));
  }
  for (int k = 0; k < K; ++k) {
    // sin(hi + lo) = hi + (hi z sp + lo cos)
    const __m256 s =
        _mm256_add_ps(hi[k], _mm256_fmadd_ps(_mm256_mul_ps(sp[k], z[k]), hi[k], _mm256_mul_ps(lo[k], c[k])));
    // Quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s).
    const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(qi[k], 31));  // sign bit: q odd (blendv's mask)
    const __m256 sv = _mm256_blendv_ps(s, c[k], odd), cv = _mm256_blendv_ps(c[k], s, odd);
    const __m256i sin_sign = _mm256_slli_epi32(_mm256_srli_epi32(qi[k], 1), 31);
    const __m256i cos_sign = _mm256_slli_epi32(_mm256_srli_epi32(_mm256_add_epi32(qi[k], _mm256_set1_epi32(1)), 1), 31);
    sin_out[k] = _mm256_xor_ps(sv, _mm256_castsi256_ps(sin_sign));
    cos_out[k] = _mm256_xor_ps(cv, _mm256_castsi256_ps(cos_sign));
  }
}

// Four normals per lane (lane b: block b) to out[4 b + l], l = 0..3.
FASTDIFF_INLINE void store_blocks(__m256 z0, __m256 z1, __m256 z2, __m256 z3, float* out) {
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1);  // z0_0 z1_0 z0_1 z1_1 | z0_4 z1_4 z0_5 z1_5
  const __m256 t1 = _mm256_unpackhi_ps(z0, z1);  // z0_2 z1_2 z0_3 z1_3 | z0_6 z1_6 z0_7 z1_7
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3);
  const __m256 t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 b04 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));  // block 0 | block 4
  const __m256 b15 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));  // block 1 | block 5
  const __m256 b26 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));  // block 2 | block 6
  const __m256 b37 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));  // block 3 | block 7
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(b04, b15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(b26, b37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(b04, b15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(b26, b37, 0x31));
}

}  // namespace philox_avx2

constexpr int64_t kPhiloxGroupElements = 4 * philox_avx2::kLanes * philox_avx2::kChains;

#else

constexpr int64_t kPhiloxGroupElements = 64;

#endif

// The Philox normals of one image at one sampler step.
class PhiloxNormals {
 public:
  PhiloxNormals(uint64_t seed, int64_t step, int64_t image) : seed_(seed), step_(step), image_(image) {
#if FASTDIFF_PHILOX_AVX2
    // The counter's words 1-3 (image, step, 0) are the same in every lane, and so is much of the
    // first two rounds: word 2's product in round 0, then word 0's in round 1.
    constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    uint32_t hi1, lo1;
    philox_avx2::mulhilo_scalar(kM1, static_cast<uint32_t>(step), hi1, lo1);
    const uint32_t c0 = hi1 ^ static_cast<uint32_t>(image) ^ k0, c1 = lo1;  // after round 0
    uint32_t hi0, lo0;
    philox_avx2::mulhilo_scalar(kM0, c0, hi0, lo0);  // round 1's word-0 product
    r0_c2_ = k1;                                     // round 0: c2 = hi0(lane) ^ 0 ^ k1
    r1_c0_ = c1 ^ (k0 + kW0);                        // round 1: c0 = hi1(lane) ^ c1 ^ k0
    r1_c2_ = hi0 ^ (k1 + kW1);                       // round 1: c2 = hi0 ^ c3(lane) ^ k1
    r1_c3_ = lo0;                                    // round 1: c3 = lo0
#endif
  }

  // out[j] = the normal of element first + j for j in [0, kPhiloxGroupElements); first is a multiple
  // of kPhiloxGroupElements. Only out[from, to) is needed: whole blocks (AVX2: whole registers) that
  // do not reach into it may be skipped and left unwritten.
  void group(int64_t first, int64_t from, int64_t to, float* out) const {
#if FASTDIFF_PHILOX_AVX2
    constexpr int64_t kPerChain = 4 * philox_avx2::kLanes;
    const int64_t lo = from / kPerChain, hi = (to + kPerChain - 1) / kPerChain;  // registers [lo, hi)
    if (hi - lo == philox_avx2::kChains) {
      draw<philox_avx2::kChains>(first, out);
      return;
    }
    for (int64_t c = lo; c < hi;) {  // the group's ends (ragged images, split chunks): fewer registers
      if (hi - c >= 2) {
        draw<2>(first + c * kPerChain, out + c * kPerChain);
        c += 2;
      } else {
        draw<1>(first + c * kPerChain, out + c * kPerChain);
        c += 1;
      }
    }
#else
    for (int64_t j = from & ~int64_t(3); j < to; j += 4) {
      philox_block(seed_, step_, image_, first + j, out + j);
    }
#endif
  }

 private:
#if FASTDIFF_PHILOX_AVX2
  // The normals of elements [first, first + 32 N): N registers of 8 blocks, drawn side by side.
  template <int N>
  void draw(int64_t first, float* out) const {
    using namespace philox_avx2;
    constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
    const __m256i m0 = bcast(0xD2511F53u), m1 = bcast(0xCD9E8D57u);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const uint32_t block = static_cast<uint32_t>(first >> 2);  // as philox_block's counter word 0
    __m256i c0[N], c1[N], c2[N], c3[N];
    for (int n = 0; n < N; ++n) {
      // Rounds 0 and 1 with the lane-invariant parts precomputed (see the constructor).
      __m256i hi, lo;
      mulhilo(_mm256_add_epi32(bcast(block + 8u * n), lane), m0, hi, lo);
      const __m256i r0_c2 = _mm256_xor_si256(hi, bcast(r0_c2_)), r0_c3 = lo;
      mulhilo(r0_c2, m1, hi, lo);
      c0[n] = _mm256_xor_si256(hi, bcast(r1_c0_));
      c1[n] = lo;
      c2[n] = _mm256_xor_si256(r0_c3, bcast(r1_c2_));
      c3[n] = bcast(r1_c3_);
    }
    uint32_t k0 = static_cast<uint32_t>(seed_) + 2 * kW0, k1 = static_cast<uint32_t>(seed_ >> 32) + 2 * kW1;
    for (int round = 2; round < 10; ++round) {
      const __m256i key0 = bcast(k0), key1 = bcast(k1);
      for (int n = 0; n < N; ++n) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo(c0[n], m0, hi0, lo0);
        mulhilo(c2[n], m1, hi1, lo1);
        c0[n] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[n]), key0);
        c1[n] = lo1;
        c2[n] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[n]), key1);
        c3[n] = lo0;
      }
      k0 += kW0;
      k1 += kW1;
    }
    // Box-Muller as philox_normal4: words 0 and 2 give r, words 1 and 3 theta; per block
    // (r01 cos, r01 sin, r23 cos, r23 sin).
    __m256i rbits[2 * N], tbits[2 * N];
    for (int n = 0; n < N; ++n) {
      rbits[2 * n] = c0[n];
      rbits[2 * n + 1] = c2[n];
      tbits[2 * n] = c1[n];
      tbits[2 * n + 1] = c3[n];
    }
    __m256 r2[2 * N], sn[2 * N], cs[2 * N];
    minus_two_log_uniform<2 * N>(rbits, r2);
    sincos_uniform<2 * N>(tbits, sn, cs);
    for (int n = 0; n < N; ++n) {
      const __m256 r01 = _mm256_sqrt_ps(r2[2 * n]), r23 = _mm256_sqrt_ps(r2[2 * n + 1]);
      store_blocks(_mm256_mul_ps(r01, cs[2 * n]), _mm256_mul_ps(r01, sn[2 * n]), _mm256_mul_ps(r23, cs[2 * n + 1]),
                   _mm256_mul_ps(r23, sn[2 * n + 1]), out + 4 * kLanes * n);
    }
  }

  uint32_t r0_c2_, r1_c0_, r1_c2_, r1_c3_;
#endif
  uint64_t seed_;
  int64_t step_;
  int64_t image_;
};

}  // namespace
}  // namespace fastdiff::cpu::FASTDIFF_CPU_ISA
