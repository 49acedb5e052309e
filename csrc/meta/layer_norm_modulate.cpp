// Meta (shape-only) implementation of layer_norm_modulate, for FakeTensor tracing (torch.compile,
// opcheck): the same checks as the kernels, on symbolic sizes, and the same contiguous output.
#include "../layer_norm_modulate.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace fastdiff {

at::Tensor layer_norm_modulate_meta(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps) {
  check_layer_norm_modulate(x, weight, bias, scale, shift, eps);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_meta); }
