// The CUDA sampler_step kernel's by-value arguments and their packing on the host. Plain C++ (no
// CUDA headers), so a CPU-only test compiles it with g++ and checks what the launcher packs
// (tests/test_regressions_sampler_step.py).
#pragma once

#include <cstdint>

namespace fastdiff {

struct StepKernelArgs {
  int64_t batch;      // B
  int64_t n;          // elements per image
  int64_t mn;         // model-output elements per row (n, or 2n with learned variance)
  int64_t quads;      // ceil(n / 4): each thread step handles 4 consecutive elements of one image
  int64_t steps;      // rows of the coefficient table
  bool guided;        // model output rows are [uncond; cond]
  bool learned;       // sigma from the variance channels
  bool philox;        // z from Philox4x32-10
  bool philox_first;  // the seed tensor's second word is the batch's first image index (counter word 1 adds it)
  bool vec4;          // float32 with n % 4 == 0 and 16-byte aligned rows: float4 loads and stores
  double cfg_scale;   // double, as the CPU kernel and cfg_combine.cu keep it: the float64 path is exact;
                      // the float32 kernels round it to float once, as the CPU kernel does
  double clip;        // clamp x0 to [-clip, clip] (inf: no clipping)
  // sampler_loop_step reads cfg_scale on the device (the kernel's cfg_dev pointer, set instead of
  // the field above): whether that one-element tensor is float64 (else float32). Read as its own
  // type and cast once to the op-math type, as cfg_scale is: the same value gives the same bits.
  bool cfg_dev_double;
};

inline StepKernelArgs pack_step_kernel_args(int64_t batch, int64_t n, int64_t mn, int64_t steps, bool guided,
                                            bool learned, bool philox, bool vec4, double cfg_scale, double clip) {
  StepKernelArgs a{};
  a.batch = batch;
  a.n = n;
  a.mn = mn;
  a.quads = (n + 3) / 4;
  a.steps = steps;
  a.guided = guided;
  a.learned = learned;
  a.philox = philox;
  a.vec4 = vec4;
  a.cfg_scale = cfg_scale;
  a.clip = clip;
  return a;
}

}  // namespace fastdiff
