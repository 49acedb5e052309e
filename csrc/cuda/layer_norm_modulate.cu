// CUDA implementation of layer_norm_modulate: kernels and their launcher.
//
// A row (b, n) is D contiguous features at any row strides. Threads read it in vectors of V elements
// (16 bytes where D, the row strides and the pointers allow, else V = 1), accumulating in float32
// (float64 for float64):
//  * rows of up to 32 * vecs_per_lane<V>() vectors (D <= 1536 in 16-byte vectors, every DiT width;
//    D <= 384 in scalars) take the warp kernel: one warp per row, the row held in registers, so x is read from memory
//    once. The row's shifted sum gives the mean (x0 + sum(x - x0) / D, exact for a constant row), then the squared
//    deviations from it give M2 (two passes over registers, each a warp shuffle reduction), then the epilogue writes
//    the row.
//  * longer rows take the block kernel: one block per row, each thread merging the moments of its
//    vectors (welford_combine), a block reduction, then a second read of the row (from L2) to apply.
// The arithmetic (folding the parts, the rstd, the epilogue) is csrc/common/layer_norm_modulate.h,
// shared with the CPU kernel.
#include "../common/layer_norm_modulate.h"
#include "../layer_norm_modulate.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
// c10/cuda only, not ATen/cuda/CUDAContext.h: that header pulls in cuBLAS/cuSPARSE/cuSOLVER headers,
// which a bare CUDA toolkit (nvcc + cudart, as on the CI machines) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastdiff {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;    // warp kernel: one row per warp
constexpr int kBlockThreads = 256;  // block kernel

// The warp kernel's register cache, vectors per lane: 48 elements in 16-byte vectors (12 float4,
// 6 vectors of 8 halves, 24 double2), 12 scalars on the unvectorized path.
template <int V>
constexpr int vecs_per_lane() {
  return V == 1 ? 12 : 48 / V;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Where the rows are.
struct RowShape {
  int64_t rows;      // B * N
  int64_t tokens;    // N
  int64_t features;  // D
  int64_t stride_b;  // x's stride of dim 0, in elements
  int64_t stride_n;  // x's stride of dim 1, in elements
};

template <typename acc_t>
__device__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;  // in every lane
}

template <typename acc_t>
__device__ WelfordStats<acc_t> warp_combine(WelfordStats<acc_t> s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const WelfordStats<acc_t> other{__shfl_down_sync(0xffffffffu, s.count, offset),
                                    __shfl_down_sync(0xffffffffu, s.mean, offset),
                                    __shfl_down_sync(0xffffffffu, s.m2, offset)};
    s = welford_combine(s, other);
  }
  return s;  // complete in lane 0
}

// The epilogue of one vector: features d0 .. d0 + V - 1 of sample b.
template <typename acc_t, typename scalar_t, typename param_t, int V>
__device__ Pack<scalar_t, V> pack_apply(const Pack<scalar_t, V>& pack, const ModulateParams<param_t>& params, int64_t b,
                                        int64_t d0, acc_t mean, acc_t rstd) {
  Pack<scalar_t, V> out;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const ModulateCoefficients<acc_t> k = params.template coefficients<acc_t>(b, d0 + l);
    out.v[l] = static_cast<scalar_t>(modulate_apply(static_cast<acc_t>(pack.v[l]), mean, rstd, k.gain, k.offset));
  }
  return out;
}

// One warp per row, the row in registers: x read once, out written once.
template <typename scalar_t, typename param_t, int V>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
    layer_norm_modulate_warp_kernel(scalar_t* __restrict__ out,            // (B, N, D) contiguous
                                    const scalar_t* __restrict__ x,        // (B, N, D), rows at any strides
                                    const ModulateParams<param_t> params,  // optional (D,), (B, D) parts
                                    const RowShape shape,                  // sizes and strides
                                    const at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  constexpr int kVecsPerLane = vecs_per_lane<V>();
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= shape.rows) {
    return;  // the whole warp: no shuffle below misses a lane
  }
  const int64_t b = row / shape.tokens, n = row - b * shape.tokens;
  const scalar_t* in = x + b * shape.stride_b + n * shape.stride_n;
  const int vectors = static_cast<int>(shape.features / V);
  // 1 / D now, while few registers are live: a division (a call into the slow path for double)
  // with the whole row cached in registers made ptxas spill around it.
  const acc_t count = static_cast<acc_t>(shape.features);
  const acc_t inv_count = acc_t(1) / count;

  P cache[kVecsPerLane];
#pragma unroll
  for (int i = 0; i < kVecsPerLane; ++i) {
    const int k = lane + i * kWarp;
    if (k < vectors) {
      cache[i] = *reinterpret_cast<const P*>(in + static_cast<int64_t>(k) * V);
    }
  }
  // The shifted mean, x0 + sum(x - x0) / D with x0 the row's first value (lane 0's first vector): a
  // constant row's mean is its value exactly and M2 is 0 exactly (sum(x) / D is not exact, and
  // 1 / sqrt(eps) would amplify x - mean).
  const acc_t shift = __shfl_sync(0xffffffffu, lane == 0 ? static_cast<acc_t>(cache[0].v[0]) : acc_t(0), 0);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < kVecsPerLane; ++i) {
    if (lane + i * kWarp < vectors) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sum += static_cast<acc_t>(cache[i].v[l]) - shift;
      }
    }
  }
  const acc_t mean = shift + warp_sum(sum) * inv_count;
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < kVecsPerLane; ++i) {
    if (lane + i * kWarp < vectors) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        const acc_t d = static_cast<acc_t>(cache[i].v[l]) - mean;
        m2 += d * d;
      }
    }
  }
  const acc_t rstd = population_rstd(WelfordStats<acc_t>{count, mean, warp_sum(m2)}, eps);
  scalar_t* y = out + row * shape.features;
#pragma unroll
  for (int i = 0; i < kVecsPerLane; ++i) {
    const int k = lane + i * kWarp;
    if (k < vectors) {
      const int64_t d0 = static_cast<int64_t>(k) * V;
      *reinterpret_cast<P*>(y + d0) = pack_apply(cache[i], params, b, d0, mean, rstd);
    }
  }
}

// One block per row, for rows too long for the warp kernel's registers: each thread merges the
// moments of its vectors (a vector's mean, then its centered squares), the block merges the threads',
// and the row is read a second time (from L2) for the epilogue.
template <typename scalar_t, typename param_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
    layer_norm_modulate_block_kernel(scalar_t* __restrict__ out,            // (B, N, D) contiguous
                                     const scalar_t* __restrict__ x,        // (B, N, D), rows at any strides
                                     const ModulateParams<param_t> params,  // optional (D,), (B, D) parts
                                     const RowShape shape,                  // sizes and strides
                                     const at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ WelfordStats<acc_t> per_warp[kBlockThreads / kWarp];
  __shared__ acc_t row_mean, row_rstd;
  const int64_t row = blockIdx.x;
  const int64_t b = row / shape.tokens, n = row - b * shape.tokens;
  const scalar_t* in = x + b * shape.stride_b + n * shape.stride_n;
  const int64_t vectors = shape.features / V;

  WelfordStats<acc_t> stats{0, 0, 0};
  for (int64_t k = threadIdx.x; k < vectors; k += kBlockThreads) {
    const P pack = *reinterpret_cast<const P*>(in + k * V);
    const acc_t first = static_cast<acc_t>(pack.v[0]);
    acc_t sum = 0;
#pragma unroll
    for (int l = 1; l < V; ++l) {
      sum += static_cast<acc_t>(pack.v[l]) - first;
    }
    const acc_t mean = first + sum / acc_t(V);  // shifted: exact for a constant vector
    acc_t m2 = 0;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const acc_t d = static_cast<acc_t>(pack.v[l]) - mean;
      m2 += d * d;
    }
    stats = welford_combine(stats, WelfordStats<acc_t>{acc_t(V), mean, m2});
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  stats = warp_combine(stats);
  if (lane == 0) {
    per_warp[warp] = stats;
  }
  __syncthreads();
  if (warp == 0) {
    stats = lane < kBlockThreads / kWarp ? per_warp[lane] : WelfordStats<acc_t>{0, 0, 0};
    stats = warp_combine(stats);
    if (lane == 0) {
      row_mean = stats.mean;
      row_rstd = population_rstd(stats, eps);
    }
  }
  __syncthreads();
  const acc_t mean = row_mean, rstd = row_rstd;
  scalar_t* y = out + row * shape.features;
  for (int64_t k = threadIdx.x; k < vectors; k += kBlockThreads) {
    const P pack = *reinterpret_cast<const P*>(in + k * V);
    *reinterpret_cast<P*>(y + k * V) = pack_apply(pack, params, b, k * V, mean, rstd);
  }
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, typename param_t, int V>
void launch(const scalar_t* x, scalar_t* y, const ModulateParams<param_t>& params, const RowShape& shape, double eps,
            cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (shape.features / V <= static_cast<int64_t>(kWarp) * vecs_per_lane<V>()) {
    const int64_t blocks = (shape.rows + kRowsPerBlock - 1) / kRowsPerBlock;
    layer_norm_modulate_warp_kernel<scalar_t, param_t, V>
        <<<static_cast<unsigned>(blocks), kWarp * kRowsPerBlock, 0, stream>>>(y, x, params, shape,
                                                                              static_cast<acc_t>(eps));
  } else {
    layer_norm_modulate_block_kernel<scalar_t, param_t, V>
        <<<static_cast<unsigned>(shape.rows), kBlockThreads, 0, stream>>>(y, x, params, shape, static_cast<acc_t>(eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor layer_norm_modulate_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, double eps) {
  check_layer_norm_modulate(x, weight, bias, scale, shift, eps);
  TORCH_CHECK(x.is_cuda(), "layer_norm_modulate (cuda): x must be a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());

  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor in = layer_norm_modulate_input(x);  // rows at any strides, features contiguous
  RowShape shape{};
  shape.tokens = x.size(1);
  shape.features = x.size(2);
  shape.rows = x.size(0) * shape.tokens;
  // Strides of size-1 dims are never used to step; 0 keeps them out of the alignment test below.
  shape.stride_b = x.size(0) > 1 ? in.stride(0) : 0;
  shape.stride_n = shape.tokens > 1 ? in.stride(1) : 0;
  TORCH_CHECK(shape.rows <= std::numeric_limits<int32_t>::max(), "layer_norm_modulate (cuda): B * N = ", shape.rows,
              " rows exceed 2^31 - 1 (one block or warp per row)");

  // The parts are read in x's dtype when they all have it, else all in the math type (float32 parts
  // with a 16-bit x are the common mixed case, and need no copy then). Features must be contiguous;
  // scale/shift keep their row stride (chunks of DiT's (B, 6D) projection are read in place).
  const at::ScalarType math_type = at::toOpMathType(x.scalar_type());
  bool parts_in_x_dtype = true;
  for (const auto* part : {&weight, &bias, &scale, &shift}) {
    parts_in_x_dtype = parts_in_x_dtype && (!part->has_value() || (*part)->scalar_type() == x.scalar_type());
  }
  const at::ScalarType part_type = parts_in_x_dtype ? x.scalar_type() : math_type;
  auto prepare = [&](const std::optional<at::Tensor>& part) {
    if (!part.has_value()) {
      return at::Tensor();
    }
    at::Tensor t = part->to(part_type);
    return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
  };
  const at::Tensor w = prepare(weight), bi = prepare(bias), s = prepare(scale), t = prepare(shift);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_modulate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
    const bool vectorized = shape.features % kVec == 0 && shape.stride_b % kVec == 0 && shape.stride_n % kVec == 0 &&
                            aligned_16(in.const_data_ptr()) && aligned_16(out.const_data_ptr());
    auto run = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      auto ptr = [](const at::Tensor& v) { return v.defined() ? v.const_data_ptr<param_t>() : nullptr; };
      const ModulateParams<param_t> params{
          ptr(w), ptr(bi), ptr(s), ptr(t), s.defined() ? s.stride(0) : 0, t.defined() ? t.stride(0) : 0};
      const scalar_t* xp = in.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      if (vectorized) {
        launch<scalar_t, param_t, kVec>(xp, yp, params, shape, eps, stream);
      } else {
        launch<scalar_t, param_t, 1>(xp, yp, params, shape, eps, stream);
      }
    };
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      run(scalar_t{});  // float/double x: the parts are (converted to) x's dtype
    } else if (part_type == x.scalar_type()) {
      run(scalar_t{});
    } else {
      run(acc_t{});
    }
  });
  return out;
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("layer_norm_modulate", &fastdiff::layer_norm_modulate_cuda); }
