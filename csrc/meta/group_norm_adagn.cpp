// Meta (shape-only) implementation of group_norm_adagn, for FakeTensor tracing (torch.compile,
// opcheck): the same checks as the kernels, on symbolic sizes, and the same output layout.
#include "../group_norm_adagn.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace fastdiff {

at::Tensor group_norm_adagn_meta(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu) {
  check_group_norm_adagn(x, num_groups, weight, bias, scale, shift, pre_shift, eps);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(group_norm_adagn_format(x)));
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_meta); }
