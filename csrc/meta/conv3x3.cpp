// Meta (shape-only) implementation of conv3x3, for FakeTensor tracing (torch.compile, opcheck).
#include "../conv3x3.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace fastdiff {

at::Tensor conv3x3_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, int64_t path) {
  check_conv3x3(x, weight, bias, residual, path);
  return at::empty_symint({x.sym_size(0), weight.sym_size(0), x.sym_size(2), x.sym_size(3)},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("conv3x3", &fastdiff::conv3x3_meta); }
