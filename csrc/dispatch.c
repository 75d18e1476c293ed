/* Instruction-set detection and build facts for mambazoo/ops/native.py (compiled once, without ISA flags).
 *
 * The kernels are compiled once per ISA with suffixed entry points (see kernel.h); Python asks which ISAs this CPU
 * can run and binds the matching variant. setup.py defines MZ_COMPILED_ISAS (e.g. "avx512 avx2 portable").
 */
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

#ifndef MZ_COMPILED_ISAS
#define MZ_COMPILED_ISAS "portable"
#endif

#define MZ_STRINGIFY_(x) #x
#define MZ_STRINGIFY(x) MZ_STRINGIFY_(x)

/* Whether this CPU and operating system can run the kernels compiled for `isa` ("avx512", "avx2", "portable"). The
 * compiler's CPU model (__builtin_cpu_supports) also checks that the OS saves the AVX/AVX-512 register state. */
EXPORT int mz_cpu_supports(const char *isa) {
    if (strcmp(isa, "portable") == 0) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(isa, "avx2") == 0) return avx2;
    if (strcmp(isa, "avx512") == 0)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

/* The ISAs whose kernels are in this library, best first, separated by spaces. */
EXPORT const char *mz_compiled_isas(void) { return MZ_COMPILED_ISAS; }

/* Compiler and OpenMP runtime the library was built with. */
EXPORT const char *mz_build_info(void) {
    return
#if defined(__clang__)
        "clang " __clang_version__
#elif defined(__GNUC__)
        "gcc " __VERSION__
#else
        "unknown compiler"
#endif
#if defined(_OPENMP) && defined(__clang__)
        "; OpenMP " MZ_STRINGIFY(_OPENMP) " (libomp)";
#elif defined(_OPENMP)
        "; OpenMP " MZ_STRINGIFY(_OPENMP) " (libgomp)";
#else
        "; no OpenMP (single-threaded kernels)";
#endif
}
