// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

// Math in csrc/common/ is compiled by both compilers: the CPU tests then execute the same formulas,
// in the same order, that the GPU runs, but not always to the last bit: nvcc contracts a * b + c into
// one FMA (--fmad=true, its default) and the GPU's logf/sinf/cosf/expf differ from glibc's by 1-2 ulp,
// so CPU-vs-CUDA comparisons keep dtype tolerances. Plain g++ does not know __host__/__device__, so
// they vanish there.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__
#else
#define FASTDIFF_HOST_DEVICE
#endif

#define FASTDIFF_INLINE FASTDIFF_HOST_DEVICE inline
