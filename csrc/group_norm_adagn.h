// group_norm_adagn's CPU, Meta and CUDA implementations and the checks they share. Its schema and
// registrations live beside the implementations: csrc/cpu/group_norm_adagn.cpp (schema, CPU,
// Autograd), csrc/meta/group_norm_adagn.cpp, csrc/cuda/group_norm_adagn.cu. The arithmetic the CPU
// and CUDA kernels share is csrc/common/group_norm_adagn.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace fastdiff {

// act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift), act = SiLU or identity.
// x (B, C, *spatial); weight/bias (C,); scale/shift/pre_shift (B, C); each part optional. Returns
// x's shape and dtype in x's suggested memory format (NCHW, channels_last or channels_last_3d).
at::Tensor group_norm_adagn_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                double eps, bool silu);
at::Tensor group_norm_adagn_meta(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu);
#ifdef FASTDIFF_WITH_CUDA
at::Tensor group_norm_adagn_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu);
#endif

// One optional per-channel part: x's device, x's dtype or float32, and the given shape. Sizes are
// compared as SymInts so that the Meta implementation checks symbolic shapes with the same code.
inline void check_group_norm_adagn_part(const char* name, const std::optional<at::Tensor>& part, const at::Tensor& x,
                                        bool per_sample) {
  if (!part.has_value()) {
    return;
  }
  const at::Tensor& t = *part;
  TORCH_CHECK(t.device() == x.device(), "group_norm_adagn: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, "group_norm_adagn: ", name,
              " dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type());
  const char* expected = per_sample ? "(B, C)" : "(C,)";
  const c10::SymInt& B = x.sym_size(0);
  const c10::SymInt& C = x.sym_size(1);
  TORCH_CHECK(t.dim() == (per_sample ? 2 : 1), "group_norm_adagn: ", name, " must have shape ", expected, " = ",
              per_sample ? c10::SymIntArrayRef({B, C}) : c10::SymIntArrayRef({C}), ", got ", t.sym_sizes());
  const c10::SymBool same =
      per_sample ? t.sym_size(0).sym_eq(B).sym_and(t.sym_size(1).sym_eq(C)) : t.sym_size(0).sym_eq(C);
  TORCH_SYM_CHECK(same, "group_norm_adagn: ", name, " must have shape ", expected, " = ",
                  per_sample ? c10::SymIntArrayRef({B, C}) : c10::SymIntArrayRef({C}), ", got ", t.sym_sizes());
}

// The checks every implementation (CPU, CUDA, Meta) runs first; they guard direct torch.ops calls.
inline void check_group_norm_adagn(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                   double eps) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_adagn: x must have shape (B, C, *spatial) with at least 2 dimensions, got ",
              x.dim(), " dimension(s) ", x.sym_sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm_adagn: x dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(num_groups >= 1, "group_norm_adagn: num_groups must be >= 1, got ", num_groups);
  TORCH_SYM_CHECK((x.sym_size(1) % num_groups).sym_eq(0), "group_norm_adagn: channels (", x.sym_size(1),
                  ") must be divisible by num_groups (", num_groups, ")");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "group_norm_adagn: eps must be finite and >= 0, got ", eps);
  check_group_norm_adagn_part("weight", weight, x, /*per_sample=*/false);
  check_group_norm_adagn_part("bias", bias, x, /*per_sample=*/false);
  check_group_norm_adagn_part("scale", scale, x, /*per_sample=*/true);
  check_group_norm_adagn_part("shift", shift, x, /*per_sample=*/true);
  check_group_norm_adagn_part("pre_shift", pre_shift, x, /*per_sample=*/true);
}

// The output's memory format: x's own (what F.group_norm returns too). The kernels run on
// x.contiguous(format), a copy only for inputs that are dense in neither layout.
inline at::MemoryFormat group_norm_adagn_format(const at::Tensor& x) { return x.suggest_memory_format(); }

}  // namespace fastdiff
