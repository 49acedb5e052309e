// cfg_combine's CPU, Meta and CUDA implementations and the checks they share. Its schema and
// registrations live beside the implementations: csrc/cpu/cfg_combine.cpp (schema, CPU, Autograd),
// csrc/meta/cfg_combine.cpp, csrc/cuda/cfg_combine.cu. The arithmetic the CPU and CUDA kernels
// share is csrc/common/cfg_combine.h, which stays free of ATen (device code and ISA builds include it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fastdiff {

// cfg_combine: model_out (2B, *rest) holds [uncond; cond] on dim 0; returns (B, *rest).
at::Tensor cfg_combine_cpu(const at::Tensor& model_out, double scale);
at::Tensor cfg_combine_meta(const at::Tensor& model_out, double scale);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor cfg_combine_cuda(const at::Tensor& model_out, double scale);
#endif

// Checks that do not depend on concrete sizes, shared by the CPU, CUDA and Meta implementations.
inline void check_cfg_combine_dtype_and_scale(const at::Tensor& model_out, double scale) {
  TORCH_CHECK(model_out.dim() >= 1,
              "cfg_combine: model_out must have at least 1 dimension (rows [uncond; cond] on dim 0), "
              "got a 0-dim tensor");
  const auto dtype = model_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "cfg_combine: model_out dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(std::isfinite(scale), "cfg_combine: scale must be finite, got ", scale);
}

// Row-count check for concrete sizes (the Meta implementation repeats it on symbolic sizes).
inline void check_cfg_combine_rows(int64_t rows) {
  TORCH_CHECK(rows >= 2 && rows % 2 == 0,
              "cfg_combine: model_out must have an even number of rows [uncond; cond] on dim 0 "
              "(at least 2), got ",
              rows);
}

}  // namespace fastdiff
