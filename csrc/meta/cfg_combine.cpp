// Meta (shape-only) implementation of cfg_combine. FakeTensor tracing (torch.compile, opcheck)
// uses it, so it works on symbolic sizes and never touches data.
#include "../cfg_combine.h"

#include <ATen/ops/empty.h>
#include <c10/core/SymBool.h>
#include <torch/library.h>

namespace fastdiff {

at::Tensor cfg_combine_meta(const at::Tensor& model_out, double scale) {
  check_cfg_combine_dtype_and_scale(model_out, scale);
  std::vector<c10::SymInt> sizes = model_out.sym_sizes().vec();
  const c10::SymInt& rows = sizes[0];
  // expect_true records the condition as a runtime assertion instead of specializing on the size.
  TORCH_SYM_CHECK(rows.sym_ge(2), "cfg_combine: model_out must have at least 2 rows [uncond; cond], got ", rows);
  TORCH_SYM_CHECK((rows % 2).sym_eq(0), "cfg_combine: model_out must have an even number of rows [uncond; cond], got ",
                  rows);
  sizes[0] = rows / 2;
  return at::empty_symint(sizes, model_out.options());
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("cfg_combine", &fastdiff::cfg_combine_meta); }
