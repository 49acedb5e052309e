// The AVX2 build of the conv3x3 tile transforms; conv3x3.cpp picks it at run time (see
// cfg_combine_avx2.cpp for how these per-capability files are compiled and linked).
#include "conv3x3_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX2
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__)
#error "conv3x3_avx2.cpp needs -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define FASTDIFF_CPU_ISA isa_avx2
#include "conv3x3_impl.inl"
#endif
