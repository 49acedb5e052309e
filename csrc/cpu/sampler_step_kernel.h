// The sampler_step CPU inner loop, compiled once per CPU capability (see sampler_step_chunk.inl).
#pragma once

#include "isa.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastdiff::cpu {

// Everything one step needs, resolved by the launcher. x, out, out2, x0_out and noise are B rows of
// N elements in one shared memory order; the model output is B (or 2B, [uncond; cond]) rows of MN
// elements (N, or 2N with the learned-variance channels after the first N). coef and threshold
// are in the op-math type (double for float64 input, float otherwise). out may be x itself
// (sampler_loop_step works in place), and x0_out may be hist (the loop step's history buffer): each
// element of x and hist is read before its outputs are written.
struct SamplerStepArgs {
  c10::ScalarType dtype;
  void* out;              // (B, N) x_{t-1}
  void* out2;             // (B, N) a second copy of x_{t-1} (sampler_loop_step's x_in[B:]), or nullptr
  void* x0_out;           // (B, N) predicted x0, or nullptr
  const void* x;          // (B, N) x_t
  const void* m;          // (B or 2B, MN) model output
  const void* noise;      // (B, N) standard normals, or nullptr (Philox or no noise)
  const void* hist;       // (B, N) the previous step's x0 (multistep), or nullptr; may be x0_out itself
  const void* coef;       // (kNumStepCoefs,) this step's row of the coefficient table
  const void* threshold;  // (B,) dynamic-threshold s per image, or nullptr
  int64_t batch;          // B
  int64_t n;              // N, elements per image
  int64_t mn;             // MN, model-output elements per row
  bool guided;            // the model output has 2B rows: combine with cfg_scale
  double cfg_scale;
  bool learned;          // sigma from the learned-variance channels
  double clip;           // clamp x0 to [-clip, clip] (inf: no clipping)
  bool philox;           // draw z in the kernel from Philox4x32-10
  uint64_t seed;         // Philox key
  uint32_t first_image;  // Philox counter word 1 is first_image + b (mod 2**32) for image b of the batch
  int64_t step;          // Philox counter word (the sampler step index)
};

using SamplerStepChunkFn = void (*)(const SamplerStepArgs& args, int64_t begin, int64_t end);

namespace isa_default {
void sampler_step_chunk(const SamplerStepArgs& args, int64_t begin, int64_t end);
}  // namespace isa_default

#if FASTDIFF_CPU_HAVE_AVX2
namespace isa_avx2 {
void sampler_step_chunk(const SamplerStepArgs& args, int64_t begin, int64_t end);
}  // namespace isa_avx2
#endif

}  // namespace fastdiff::cpu
