/* Common header of every kernel source in csrc/ (the recipe is in docs/native.md).
 *
 * setup.py compiles each kernel source once per instruction set, defining MZ_ISA to the ISA's name (avx512, avx2 or
 * portable) and hiding every symbol by default. A kernel exports its entry points with MZ_EXPORT(name), which
 * appends the ISA suffix: MZ_EXPORT(mz_scan_forward) defines mz_scan_forward_avx512 in the AVX-512 object, and so
 * on; mambazoo/ops/native.py binds the variant the CPU supports (or the one MAMBAZOO_NATIVE_ISA forces).
 */
#ifndef MAMBAZOO_KERNEL_H
#define MAMBAZOO_KERNEL_H

#include <stdint.h>
#include <string.h>

#include "simd.h"

#ifndef MZ_ISA
#define MZ_ISA portable
#endif

#define MZ_JOIN_(name, isa) name##_##isa
#define MZ_JOIN(name, isa) MZ_JOIN_(name, isa)
#define MZ_EXPORT(name) __attribute__((visibility("default"))) MZ_JOIN(name, MZ_ISA)

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
#endif

INLINE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#endif
