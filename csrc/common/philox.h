// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") and the
// Box-Muller transform, shared by the CPU and CUDA kernels: a counter-based generator, so any
// element's noise is a pure function of (key, counter) and a kernel needs no state, a fixed seed
// reproduces on every device, and a CUDA graph replay with a new counter draws fresh noise.
// "Reproduces" means: the Philox words are bit-identical everywhere (integer arithmetic); the
// normals are Box-Muller in float32, whose logf/cosf/sinf are the platform's (glibc on the CPU,
// libdevice on the GPU, 1-2 ulp apart), so CPU and GPU normals agree to a few float32 ulp, not
// bitwise. Nothing here is contracted into FMAs (no a * b + c), so -fmad does not change them.
// fastdiff/reference/philox.py is the independent Python version the tests compare against.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastdiff {

struct Philox4 {
  uint32_t v[4];
};

FASTDIFF_INLINE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Ten rounds of the Philox S-box: two 32x32->64 multiplies per round, the key bumped by the Weyl
// constants between rounds.
FASTDIFF_INLINE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3)-1)
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, ctr.v[0], hi0, lo0);
    philox_mulhilo(kM1, ctr.v[2], hi1, lo1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// A uint32 to a float uniform in (0, 1]: the top 24 bits k, as (k + 0.5) 2^-24 rounded to float. Below
// bits = 2^31 that is exact, the centre of k's bucket; above, k + 0.5 needs 25 bits and ties to even, so
// the values there lie on a 2^-23 grid and bits >= 0xffffff00 give exactly 1 (that pair's Box-Muller
// radius sqrt(-2 ln 1) is then 0, a finite normal). 0 is never produced, so log() below stays finite.
// Kept as it is, in every backend, because any other rounding would change every seed's noise.
FASTDIFF_INLINE float philox_uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Four standard normals from one Philox block: Box-Muller on (v0, v1) and (v2, v3),
// z = sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2).
FASTDIFF_INLINE void philox_normal4(Philox4 bits, float out[4]) {
  constexpr float kTwoPi = 6.2831853071795864769f;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float r = sqrtf(-2.0f * logf(philox_uniform(bits.v[2 * pair])));
    const float theta = kTwoPi * philox_uniform(bits.v[2 * pair + 1]);
    out[2 * pair] = r * cosf(theta);
    out[2 * pair + 1] = r * sinf(theta);
  }
}

// The noise of element `index` (flat, within one image) of image `image` at sampler step `step`:
// counter (index / 4, image, step, 0), key = the 64-bit seed. Image i's noise never depends on
// the batch size, and step s's on any other step.
FASTDIFF_INLINE void philox_block(uint64_t seed, int64_t step, int64_t image, int64_t index, float out[4]) {
  const Philox4 ctr{{static_cast<uint32_t>(index >> 2), static_cast<uint32_t>(image), static_cast<uint32_t>(step), 0u}};
  philox_normal4(philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)), out);
}

}  // namespace fastdiff
