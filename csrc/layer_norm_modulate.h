// layer_norm_modulate's CPU, Meta and CUDA implementations and the checks they share. Its schema
// and registrations live beside the implementations: csrc/cpu/layer_norm_modulate.cpp (schema, CPU,
// Autograd), csrc/meta/layer_norm_modulate.cpp, csrc/cuda/layer_norm_modulate.cu. The arithmetic
// the CPU and CUDA kernels share is csrc/common/layer_norm_modulate.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

namespace fastdiff {

// (LayerNorm(x) * weight + bias) * (1 + scale) + shift over the last dim: x (B, N, D), any strides;
// weight/bias (D,); scale/shift (B, D); each part optional. Returns a contiguous (B, N, D) tensor of
// x's dtype.
at::Tensor layer_norm_modulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, double eps);
at::Tensor layer_norm_modulate_meta(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor layer_norm_modulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps);
#endif

// One optional part: x's device, x's dtype or float32, shape (D,) or (B, D) (compared as SymInts, so
// the Meta implementation checks symbolic shapes with the same code).
inline void check_layer_norm_modulate_part(const char* name, const std::optional<at::Tensor>& part, const at::Tensor& x,
                                           bool per_sample) {
  if (!part.has_value()) {
    return;
  }
  const at::Tensor& t = *part;
  TORCH_CHECK(t.device() == x.device(), "layer_norm_modulate: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "layer_norm_modulate: ", name,
              " dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  const char* expected = per_sample ? "(B, D)" : "(D,)";
  const c10::SymInt& B = x.sym_size(0);
  const c10::SymInt& D = x.sym_size(2);
  // A vector, not an ArrayRef of a braced list: that would dangle past this statement.
  const std::vector<c10::SymInt> want = per_sample ? std::vector<c10::SymInt>{B, D} : std::vector<c10::SymInt>{D};
  TORCH_CHECK(t.dim() == (per_sample ? 2 : 1), "layer_norm_modulate: ", name, " must have shape ", expected, " = ",
              c10::SymIntArrayRef(want), ", got ", t.sym_sizes());
  const c10::SymBool same =
      per_sample ? t.sym_size(0).sym_eq(B).sym_and(t.sym_size(1).sym_eq(D)) : t.sym_size(0).sym_eq(D);
  TORCH_SYM_CHECK(same, "layer_norm_modulate: ", name, " must have shape ", expected, " = ", c10::SymIntArrayRef(want),
                  ", got ", t.sym_sizes());
}

// The checks every implementation (CPU, CUDA, Meta) runs first; they guard direct torch.ops calls.
inline void check_layer_norm_modulate(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift, double eps) {
  TORCH_CHECK(x.dim() == 3, "layer_norm_modulate: x must have shape (B, N, D), got ", x.dim(), " dimension(s) ",
              x.sym_sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "layer_norm_modulate: x dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm_modulate: eps must be finite and >= 0, got ", eps);
  check_layer_norm_modulate_part("weight", weight, x, /*per_sample=*/false);
  check_layer_norm_modulate_part("bias", bias, x, /*per_sample=*/false);
  check_layer_norm_modulate_part("scale", scale, x, /*per_sample=*/true);
  check_layer_norm_modulate_part("shift", shift, x, /*per_sample=*/true);
}

// The input as the kernels read it: rows (b, n) at any strides, features contiguous (stride 1);
// anything else is copied once. The output is always a new contiguous (B, N, D) tensor.
inline at::Tensor layer_norm_modulate_input(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

}  // namespace fastdiff
