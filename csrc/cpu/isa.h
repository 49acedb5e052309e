// Which CPU builds of the kernels exist. setup.py defines FASTDIFF_CPU_HAVE_AVX2=1 and
// FASTDIFF_CPU_HAVE_AVX512=1 on x86-64 and compiles *_avx2.cpp / *_avx512.cpp with those flags; each
// launcher picks a build at run time. Elsewhere only the portable build exists. Not every op has an
// AVX-512 build (cfg_combine, sampler_step): AVX-512 CPUs run their AVX2 one.
#pragma once

#ifndef FASTDIFF_CPU_HAVE_AVX2
#define FASTDIFF_CPU_HAVE_AVX2 0
#endif
#ifndef FASTDIFF_CPU_HAVE_AVX512
#define FASTDIFF_CPU_HAVE_AVX512 0
#endif
