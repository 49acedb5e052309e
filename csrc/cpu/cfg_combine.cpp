// CPU implementation of cfg_combine: checks and allocation here, the loop in cfg_combine_chunk.inl
// (vectorized with at::vec), split across threads with at::parallel_for. The op's schema and its CPU
// and Autograd registrations are at the end.
#include "../cfg_combine.h"
#include "../dispatch.h"
#include "cfg_combine_kernel.h"
#include "launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

// The portable build of the loop (Vectorized's generic implementation, which the compiler
// vectorizes for the baseline ISA).
#define FASTDIFF_CPU_ISA isa_default
#include "cfg_combine_chunk.inl"
#undef FASTDIFF_CPU_ISA

namespace fastdiff {
namespace {

// Elements per parallel chunk (ATen's own elementwise grain): below it, waking threads costs more
// than the loop, so small tensors stay on one thread.
constexpr int64_t kGrainSize = 32768;

}  // namespace

at::Tensor cfg_combine_cpu(const at::Tensor& model_out, double scale) {
  check_cfg_combine_dtype_and_scale(model_out, scale);
  TORCH_CHECK(model_out.device().is_cpu(), "cfg_combine (cpu): model_out must be a CPU tensor, got device ",
              model_out.device());
  check_cfg_combine_rows(model_out.size(0));

  // The loop reads each half as one flat run of memory, so strided views are copied once here.
  const at::Tensor in = model_out.contiguous();
  std::vector<int64_t> out_sizes = in.sizes().vec();
  out_sizes[0] /= 2;
  at::Tensor out = at::empty(out_sizes, in.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  static const cpu::CfgCombineChunkFn chunk_fn = cpu::pick_isa<cpu::CfgCombineChunkFn>(
      &cpu::isa_default::cfg_combine_chunk, FASTDIFF_CPU_IF_AVX2(&cpu::isa_avx2::cfg_combine_chunk), nullptr);
  const c10::ScalarType dtype = in.scalar_type();
  void* out_ptr = out.mutable_data_ptr();
  const void* in_ptr = in.const_data_ptr();
  at::parallel_for(0, n, kGrainSize,
                   [&](int64_t begin, int64_t end) { chunk_fn(dtype, out_ptr, in_ptr, n, scale, begin, end); });
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // model_out (2B, *rest) = [uncond; cond] on dim 0 -> uncond + scale * (cond - uncond), (B, *rest).
  m.def("cfg_combine(Tensor model_out, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("cfg_combine", &fastdiff::cfg_combine_cpu); }

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) { fastdiff::register_autograd(m, "cfg_combine"); }
