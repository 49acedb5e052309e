// CPU implementation of layer_norm_modulate: checks, allocation and the parts in the math type here;
// the loops in layer_norm_modulate_impl.inl (at::vec, at::parallel_for), compiled once portable
// (below) and once each for AVX2 and AVX-512 (layer_norm_modulate_avx2.cpp, _avx512.cpp), picked at
// run time. The op's schema and its CPU and Autograd registrations are at the end.
#include "../dispatch.h"
#include "../layer_norm_modulate.h"
#include "layer_norm_modulate_kernel.h"
#include "launch.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#define FASTDIFF_CPU_ISA isa_default
#include "layer_norm_modulate_impl.inl"
#undef FASTDIFF_CPU_ISA

namespace fastdiff {
namespace {

// A part as the kernel reads it: in the math type, features contiguous but samples at any stride,
// unlike cpu::prepare_part (a copy of B*D values at most, negligible next to x; none for float32
// chunks of a (B, 6D) projection). Returns an undefined tensor for an absent part.
at::Tensor prepare_strided_part(const std::optional<at::Tensor>& part, at::ScalarType math_type) {
  if (!part.has_value()) {
    return at::Tensor();
  }
  at::Tensor t = part->to(math_type);
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

int64_t sample_stride(const at::Tensor& t) { return t.defined() ? t.stride(0) : 0; }

}  // namespace

at::Tensor layer_norm_modulate_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& shift, double eps) {
  check_layer_norm_modulate(x, weight, bias, scale, shift, eps);
  TORCH_CHECK(x.device().is_cpu(), "layer_norm_modulate (cpu): x must be a CPU tensor, got device ", x.device());

  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor in = layer_norm_modulate_input(x);  // rows at any strides, features contiguous
  const at::ScalarType math_type = at::toOpMathType(x.scalar_type());
  const at::Tensor w = prepare_strided_part(weight, math_type), b = prepare_strided_part(bias, math_type);
  const at::Tensor s = prepare_strided_part(scale, math_type), t = prepare_strided_part(shift, math_type);

  cpu::LayerNormModulateArgs args{};
  args.dtype = x.scalar_type();
  args.x = in.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.weight = cpu::ptr_or_null(w);
  args.bias = cpu::ptr_or_null(b);
  args.scale = cpu::ptr_or_null(s);
  args.shift = cpu::ptr_or_null(t);
  args.scale_stride = sample_stride(s);
  args.shift_stride = sample_stride(t);
  args.batch = x.size(0);
  args.tokens = x.size(1);
  args.features = x.size(2);
  args.stride_b = in.stride(0);
  args.stride_n = in.stride(1);
  args.eps = eps;

  static const cpu::LayerNormModulateFn kernel =
      FASTDIFF_CPU_PICK(cpu::LayerNormModulateFn, layer_norm_modulate_kernel);
  kernel(args);
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // (LayerNorm(x) * weight + bias) * (1 + scale) + shift over the last dim (DiT's adaLN modulate).
  // x (B, N, D), any strides; weight/bias (D,); scale/shift (B, D). Returns contiguous (B, N, D).
  m.def(
      "layer_norm_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, float eps) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_cpu); }

TORCH_LIBRARY_IMPL(fastdiff, Autograd, m) { fastdiff::register_autograd(m, "layer_norm_modulate"); }
