// The AVX-512 build of the conv3x3 tile transforms; conv3x3.cpp picks it at run time (see
// cfg_combine_avx2.cpp for how these per-capability files are compiled and linked).
#include "conv3x3_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX512
#if !defined(CPU_CAPABILITY_AVX512) || !defined(__AVX512F__)
#error "conv3x3_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -DCPU_CAPABILITY=AVX512"
#endif
#define FASTDIFF_CPU_ISA isa_avx512
#include "conv3x3_impl.inl"
#endif
