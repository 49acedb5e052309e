// CPU implementation of group_norm_adagn: checks, layout, allocation and the per-channel parts in the
// math type here; the loops in group_norm_adagn_impl.inl (at::vec, at::parallel_for), compiled once
// portable (below) and once each for AVX2 and AVX-512 (group_norm_adagn_avx2.cpp, _avx512.cpp),
// picked at run time. The op's schema and its CPU and Autograd registrations are at the end.
#include "../dispatch.h"
#include "../group_norm_adagn.h"
#include "group_norm_adagn_kernel.h"
#include "launch.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#define FASTDIFF_CPU_ISA isa_default
#include "group_norm_adagn_impl.inl"
#undef FASTDIFF_CPU_ISA

namespace fastdiff {

at::Tensor group_norm_adagn_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                double eps, bool silu) {
  check_group_norm_adagn(x, num_groups, weight, bias, scale, shift, pre_shift, eps);
  TORCH_CHECK(x.device().is_cpu(), "group_norm_adagn (cpu): x must be a CPU tensor, got device ", x.device());

  const at::MemoryFormat format = group_norm_adagn_format(x);
  const at::Tensor in = x.contiguous(format);  // a no-op for NCHW and channels_last inputs
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) {
    return out;
  }
  const at::ScalarType math_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = cpu::prepare_part(weight, math_type), b = cpu::prepare_part(bias, math_type);
  const at::Tensor s = cpu::prepare_part(scale, math_type), t = cpu::prepare_part(shift, math_type);
  const at::Tensor p = cpu::prepare_part(pre_shift, math_type);

  cpu::GroupNormAdagnArgs args{};
  args.dtype = x.scalar_type();
  args.x = in.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.weight = cpu::ptr_or_null(w);
  args.bias = cpu::ptr_or_null(b);
  args.scale = cpu::ptr_or_null(s);
  args.shift = cpu::ptr_or_null(t);
  args.pre_shift = cpu::ptr_or_null(p);
  args.batch = x.size(0);
  args.channels = x.size(1);
  args.groups = num_groups;
  args.spatial = x.numel() / (args.batch * args.channels);
  // NCHW-contiguous wins when x is both (a size-1 spatial or channel dim): the memory is the same.
  args.channels_last = format != at::MemoryFormat::Contiguous && !in.is_contiguous();
  args.eps = eps;
  args.silu = silu;

  static const cpu::GroupNormAdagnFn kernel = FASTDIFF_CPU_PICK(cpu::GroupNormAdagnFn, group_norm_adagn_kernel);
  kernel(args);
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // act((GroupNorm(x + pre_shift) * weight + bias) * (1 + scale) + shift), act = SiLU if silu.
  // x (B, C, *spatial), NCHW or channels_last; weight/bias (C,); scale/shift/pre_shift (B, C).
  m.def(
      "group_norm_adagn(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "Tensor? pre_shift, float eps, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_cpu); }

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) { fastdiff::register_autograd(m, "group_norm_adagn"); }
