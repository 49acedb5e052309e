// CUDA implementation of group_norm_adagn: kernels and their launcher.
//
// A group (sample b, group g) is C/G channels x S spatial positions. Threads walk it in vectors of V
// elements (16 bytes where the layout and the pointers allow, else V = 1):
//  * NCHW: the group is one contiguous run; a vector lies within one channel (V divides S).
//  * channels_last: the group is C/G adjacent channels of every pixel; a vector lies within one
//    pixel's slice of the group (V divides C/G), and its lanes are consecutive channels.
// A group that fits in shared memory takes one kernel (one block per group: load once into shared
// memory while taking the statistics, then apply from there). A larger group takes a pair: a
// statistics kernel whose blocks each cover a slice of a group and write its moments, then an apply
// kernel whose blocks merge their group's moments and apply to the same slice.
// The arithmetic (Welford merge, coefficients, epilogue) is csrc/common/group_norm_adagn.h, shared with
// the CPU kernels.
#include "../common/group_norm_adagn.h"
#include "../group_norm_adagn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
// c10/cuda only, not ATen/cuda/CUDAContext.h: that header pulls in cuBLAS/cuSPARSE/cuSOLVER headers,
// which a bare CUDA toolkit (nvcc + cudart, as on the CI machines) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastdiff {
namespace {

constexpr int kWarp = 32;
constexpr int kFusedMaxThreads = 512;
constexpr int kPairThreads = 256;
// A group of at most this many bytes is cached in shared memory by the single-kernel path: under the
// 48 KB a block may use without opting in, and small enough for several blocks per SM.
constexpr int64_t kFusedMaxBytes = 32 * 1024;
// Pair path: aim for this many resident 256-thread blocks per SM, each thread taking >= 4 vectors.
constexpr int kPairBlocksPerSM = 8;
constexpr int kMinVectorsPerThread = 4;

// Moments in the math type of scalar_t (float; double for double).
template <typename scalar_t>
using AccStats = WelfordStats<at::opmath_type<scalar_t>>;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Where the vectors of one group live, and which channel each lane belongs to.
struct GroupShape {
  int64_t channels;    // C
  int64_t groups;      // G
  int64_t spatial;     // S
  int64_t per_group;   // C / G
  bool channels_last;  // layout of x and out
};

template <int V>
struct GroupWalker {
  int64_t base;           // offset of the group's first element (NCHW) or of its slice in pixel 0
  int64_t row_stride;     // channels_last: C, the distance between pixels
  uint32_t vecs_per_row;  // vectors per channel row (NCHW: S / V) or per pixel slice (channels_last: C/G / V)
  int64_t first_channel;  // g * C/G
  bool channels_last;

  __device__ GroupWalker(const GroupShape& s, int64_t b, int64_t g)
      : base(s.channels_last ? b * s.spatial * s.channels + g * s.per_group
                             : (b * s.channels + g * s.per_group) * s.spatial),
        row_stride(s.channels),
        vecs_per_row(static_cast<uint32_t>((s.channels_last ? s.per_group : s.spatial) / V)),
        first_channel(g * s.per_group),
        channels_last(s.channels_last) {}

  // Vector k of the group: its element offset, and the channel of its lane 0 (NCHW: of every lane;
  // channels_last: lane l is channel + l).
  __device__ void locate(uint32_t k, int64_t& offset, int64_t& channel) const {
    const uint32_t row = k / vecs_per_row;
    const uint32_t col = k - row * vecs_per_row;
    if (channels_last) {
      offset = base + static_cast<int64_t>(row) * row_stride + static_cast<int64_t>(col) * V;
      channel = first_channel + static_cast<int64_t>(col) * V;
    } else {
      offset = base + static_cast<int64_t>(k) * V;
      channel = first_channel + row;
    }
  }
};

// Moments of one vector's values u = x + pre_shift: its mean, then its centered squares (registers).
// The mean is shifted, u[0] + sum(u - u[0]) / V: a constant vector's mean is its value exactly (so a
// constant group's is too, welford_combine merging equal means exactly) and M2 is 0 exactly, where
// sum(u) / V is not exact and 1 / sqrt(eps) would amplify the difference.
template <typename acc_t, typename scalar_t, typename param_t, int V>
__device__ WelfordStats<acc_t> pack_moments(const Pack<scalar_t, V>& pack, const AdagnParams<param_t>& params,
                                            int64_t b, int64_t channel, bool channels_last) {
  acc_t u[V];
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const int64_t c = channels_last ? channel + l : channel;
    u[l] = static_cast<acc_t>(pack.v[l]) + params.template pre_shift_at<acc_t>(b, c);
  }
  acc_t sum = 0;
#pragma unroll
  for (int l = 1; l < V; ++l) {
    sum += u[l] - u[0];
  }
  const acc_t mean = u[0] + sum / acc_t(V);
  acc_t m2 = 0;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    const acc_t d = u[l] - mean;
    m2 += d * d;
  }
  return {acc_t(V), mean, m2};
}

template <typename acc_t, typename scalar_t, typename param_t, int V>
__device__ Pack<scalar_t, V> pack_apply(const Pack<scalar_t, V>& pack, const AdagnParams<param_t>& params, int64_t b,
                                        int64_t channel, bool channels_last, acc_t mean, acc_t rstd, bool silu) {
  Pack<scalar_t, V> out;
  if (channels_last) {
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const AdagnCoefficients<acc_t> k = params.template coefficients<acc_t>(b, channel + l, mean, rstd);
      out.v[l] = static_cast<scalar_t>(adagn_apply(static_cast<acc_t>(pack.v[l]), k.pre_shift, k.mean, k.a, k.b, silu));
    }
  } else {
    const AdagnCoefficients<acc_t> k = params.template coefficients<acc_t>(b, channel, mean, rstd);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      out.v[l] = static_cast<scalar_t>(adagn_apply(static_cast<acc_t>(pack.v[l]), k.pre_shift, k.mean, k.a, k.b, silu));
    }
  }
  return out;
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

// Merges every thread's moments; all threads get the result. blockDim.x must be a multiple of 32.
template <typename acc_t>
__device__ WelfordStats<acc_t> block_combine(WelfordStats<acc_t> s) {
  __shared__ WelfordStats<acc_t> per_warp[kFusedMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  s = warp_combine(s);
  if (lane == 0) {
    per_warp[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x / kWarp) ? per_warp[lane] : WelfordStats<acc_t>{0, 0, 0};
    s = warp_combine(s);
    if (lane == 0) {
      per_warp[0] = s;
    }
  }
  __syncthreads();
  return per_warp[0];
}

// One block per group: load the group into shared memory while taking its moments, then apply.
template <typename scalar_t, typename param_t, int V>
__global__ void __launch_bounds__(kFusedMaxThreads)
    group_norm_adagn_fused_kernel(scalar_t* __restrict__ out,         // x's shape and layout
                                  const scalar_t* __restrict__ x,     // (B, C, S) or (B, S, C)
                                  const AdagnParams<param_t> params,  // optional (C,) and (B, C) parts
                                  const GroupShape shape,             // sizes and layout
                                  const at::opmath_type<scalar_t> eps, const bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  extern __shared__ __align__(16) unsigned char fused_cache[];  // (C/G * S,) the group, as loaded
  P* cache = reinterpret_cast<P*>(fused_cache);
  const int64_t b = blockIdx.x / shape.groups, g = blockIdx.x % shape.groups;
  const GroupWalker<V> walker(shape, b, g);
  const uint32_t vectors = static_cast<uint32_t>(shape.per_group * shape.spatial / V);

  WelfordStats<acc_t> stats{0, 0, 0};
  for (uint32_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    int64_t offset, channel;
    walker.locate(k, offset, channel);
    const P pack = *reinterpret_cast<const P*>(x + offset);
    cache[k] = pack;
    stats = welford_combine(stats, pack_moments<acc_t>(pack, params, b, channel, shape.channels_last));
  }
  stats = block_combine(stats);  // also orders the cache writes before the reads below
  const acc_t rstd = group_norm_rstd(stats, eps);
  for (uint32_t k = threadIdx.x; k < vectors; k += blockDim.x) {
    int64_t offset, channel;
    walker.locate(k, offset, channel);
    const P pack = cache[k];  // one 16-byte shared-memory load, not V scalar ones
    *reinterpret_cast<P*>(out + offset) =
        pack_apply(pack, params, b, channel, shape.channels_last, stats.mean, rstd, silu);
  }
}

// Pair, first half: block (bg, split) writes the moments of its slice of group bg.
template <typename scalar_t, typename param_t, int V>
__global__ void __launch_bounds__(kPairThreads)
    group_norm_adagn_stats_kernel(AccStats<scalar_t>* __restrict__ partials,  // (B*G, splits) moments out
                                  const scalar_t* __restrict__ x,             // (B, C, S) or (B, S, C)
                                  const AdagnParams<param_t> params,          // optional (C,), (B, C) parts
                                  const GroupShape shape) {                   // sizes and layout
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / shape.groups, g = bg % shape.groups;
  const GroupWalker<V> walker(shape, b, g);
  const uint32_t vectors = static_cast<uint32_t>(shape.per_group * shape.spatial / V);
  const uint32_t stride = gridDim.y * blockDim.x;

  WelfordStats<acc_t> stats{0, 0, 0};
  for (uint32_t k = blockIdx.y * blockDim.x + threadIdx.x; k < vectors; k += stride) {
    int64_t offset, channel;
    walker.locate(k, offset, channel);
    const P pack = *reinterpret_cast<const P*>(x + offset);
    stats = welford_combine(stats, pack_moments<acc_t>(pack, params, b, channel, shape.channels_last));
  }
  stats = block_combine(stats);
  if (threadIdx.x == 0) {
    partials[bg * gridDim.y + blockIdx.y] = stats;
  }
}

// Pair, second half: block (bg, split) merges group bg's partial moments, then applies to its slice.
template <typename scalar_t, typename param_t, int V>
__global__ void __launch_bounds__(kPairThreads)
    group_norm_adagn_apply_kernel(scalar_t* __restrict__ out,                       // x's shape and layout
                                  const scalar_t* __restrict__ x,                   // (B, C, S) or (B, S, C)
                                  const AccStats<scalar_t>* __restrict__ partials,  // (B*G, splits) moments
                                  const AdagnParams<param_t> params,                // optional (C,), (B, C) parts
                                  const GroupShape shape,                           // sizes and layout
                                  const at::opmath_type<scalar_t> eps, const bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ acc_t group_mean, group_rstd;
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / shape.groups, g = bg % shape.groups;
  if (threadIdx.x < kWarp) {
    WelfordStats<acc_t> stats{0, 0, 0};
    for (uint32_t i = threadIdx.x; i < gridDim.y; i += kWarp) {
      stats = welford_combine(stats, partials[bg * gridDim.y + i]);
    }
    stats = warp_combine(stats);
    if (threadIdx.x == 0) {
      group_mean = stats.mean;
      group_rstd = group_norm_rstd(stats, eps);
    }
  }
  __syncthreads();
  const acc_t mean = group_mean, rstd = group_rstd;

  const GroupWalker<V> walker(shape, b, g);
  const uint32_t vectors = static_cast<uint32_t>(shape.per_group * shape.spatial / V);
  const uint32_t stride = gridDim.y * blockDim.x;
  for (uint32_t k = blockIdx.y * blockDim.x + threadIdx.x; k < vectors; k += stride) {
    int64_t offset, channel;
    walker.locate(k, offset, channel);
    const P pack = *reinterpret_cast<const P*>(x + offset);
    *reinterpret_cast<P*>(out + offset) = pack_apply(pack, params, b, channel, shape.channels_last, mean, rstd, silu);
  }
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int round_up(int64_t n, int64_t multiple) { return static_cast<int>((n + multiple - 1) / multiple * multiple); }

template <typename scalar_t, typename param_t, int V>
void launch(const at::Tensor& in, at::Tensor& out, const AdagnParams<param_t>& params, const GroupShape& shape,
            double eps, bool silu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups_total = in.size(0) * shape.groups;
  const int64_t vectors = shape.per_group * shape.spatial / V;
  const int64_t group_bytes = shape.per_group * shape.spatial * static_cast<int64_t>(sizeof(scalar_t));
  const scalar_t* x = in.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (group_bytes <= kFusedMaxBytes) {
    const int threads = std::min(kFusedMaxThreads, std::max(kWarp, round_up(vectors, kWarp)));
    group_norm_adagn_fused_kernel<scalar_t, param_t, V>
        <<<static_cast<unsigned>(groups_total), threads, static_cast<size_t>(group_bytes), stream>>>(
            y, x, params, shape, static_cast<acc_t>(eps), silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, in.get_device()));
  const int64_t wanted = (static_cast<int64_t>(sms) * kPairBlocksPerSM + groups_total - 1) / groups_total;
  const int64_t useful = (vectors + kPairThreads * kMinVectorsPerThread - 1) / (kPairThreads * kMinVectorsPerThread);
  const int64_t splits = std::clamp<int64_t>(std::min(wanted, useful), 1, 65535);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor partials = at::empty({groups_total * splits * 3}, in.options().dtype(acc_dtype));
  auto* stats = reinterpret_cast<WelfordStats<acc_t>*>(partials.mutable_data_ptr<acc_t>());
  const dim3 grid(static_cast<unsigned>(groups_total), static_cast<unsigned>(splits));
  group_norm_adagn_stats_kernel<scalar_t, param_t, V><<<grid, kPairThreads, 0, stream>>>(stats, x, params, shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_norm_adagn_apply_kernel<scalar_t, param_t, V>
      <<<grid, kPairThreads, 0, stream>>>(y, x, stats, params, shape, static_cast<acc_t>(eps), silu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename param_t>
AdagnParams<param_t> params_of(const at::Tensor& w, const at::Tensor& b, const at::Tensor& s, const at::Tensor& t,
                               const at::Tensor& p, int64_t channels) {
  auto ptr = [](const at::Tensor& v) { return v.defined() ? v.const_data_ptr<param_t>() : nullptr; };
  return {ptr(w), ptr(b), ptr(s), ptr(t), ptr(p), channels};
}

}  // namespace

at::Tensor group_norm_adagn_cuda(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                 const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& pre_shift,
                                 double eps, bool silu) {
  check_group_norm_adagn(x, num_groups, weight, bias, scale, shift, pre_shift, eps);
  TORCH_CHECK(x.is_cuda(), "group_norm_adagn (cuda): x must be a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::MemoryFormat format = group_norm_adagn_format(x);
  const at::Tensor in = x.contiguous(format);  // a no-op for NCHW and channels_last inputs
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) {
    return out;
  }
  GroupShape shape{};
  shape.channels = x.size(1);
  shape.groups = num_groups;
  shape.spatial = x.numel() / (x.size(0) * x.size(1));
  shape.per_group = shape.channels / num_groups;
  // NCHW-contiguous wins when x is both (a size-1 spatial or channel dim): the memory is the same.
  shape.channels_last = format != at::MemoryFormat::Contiguous && !in.is_contiguous();
  TORCH_CHECK(shape.per_group * shape.spatial <= std::numeric_limits<int32_t>::max(),
              "group_norm_adagn (cuda): a group holds C/G * spatial = ", shape.per_group * shape.spatial,
              " elements; at most 2^31 - 1 are supported (the kernels index within a group in 32 bits)");
  TORCH_CHECK(x.size(0) * num_groups <= std::numeric_limits<int32_t>::max(),
              "group_norm_adagn (cuda): B * num_groups = ", x.size(0) * num_groups, " exceeds 2^31 - 1 blocks");

  // The parts are read in x's dtype when they all have it, else all in the math type (float32 parts
  // with a 16-bit x are the common mixed case, and need no copy then).
  const at::ScalarType math_type = at::toOpMathType(x.scalar_type());
  bool parts_in_x_dtype = true;
  for (const auto* part : {&weight, &bias, &scale, &shift, &pre_shift}) {
    parts_in_x_dtype = parts_in_x_dtype && (!part->has_value() || (*part)->scalar_type() == x.scalar_type());
  }
  const at::ScalarType part_type = parts_in_x_dtype ? x.scalar_type() : math_type;
  auto prepare = [&](const std::optional<at::Tensor>& part) {
    return part.has_value() ? part->to(part_type).contiguous() : at::Tensor();
  };
  const at::Tensor w = prepare(weight), b = prepare(bias), s = prepare(scale), t = prepare(shift);
  const at::Tensor p = prepare(pre_shift);

  const int64_t vector_bytes = 16;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_adagn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = static_cast<int>(vector_bytes / sizeof(scalar_t));
    const int64_t row = shape.channels_last ? shape.per_group : shape.spatial;
    const bool vectorized = row % kVec == 0 && aligned_16(in.const_data_ptr()) && aligned_16(out.const_data_ptr());
    auto run = [&](auto param_tag) {
      using param_t = decltype(param_tag);
      const AdagnParams<param_t> params = params_of<param_t>(w, b, s, t, p, shape.channels);
      if (vectorized) {
        launch<scalar_t, param_t, kVec>(in, out, params, shape, eps, silu);
      } else {
        launch<scalar_t, param_t, 1>(in, out, params, shape, eps, silu);
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

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("group_norm_adagn", &fastdiff::group_norm_adagn_cuda); }
