// The AVX2 (+FMA, F16C) build of the cfg_combine CPU loop; cfg_combine.cpp picks it at run time
// when torch reports AVX2 or better (ATEN_CPU_CAPABILITY=default forces the portable build).
//
// Only this file is compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2
// (setup.py adds them to *_avx2.cpp), the way ATen builds its kernels once per capability; the
// extension still loads on CPUs without AVX2, because nothing here runs unless the CPU has it.
// It must come after the portable files on the link line, so that the linker keeps their copies
// of inline functions that every file emits (setup.py orders the objects so).
#include "cfg_combine_kernel.h"

#if FASTDIFF_CPU_HAVE_AVX2
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__)
#error "cfg_combine_avx2.cpp needs -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
#endif
#define FASTDIFF_CPU_ISA isa_avx2
#include "cfg_combine_chunk.inl"
#endif
