/* Float vectors of the hardware's width (GCC/Clang vector extensions) and branch-free math on them.
 *
 * Every kernel source is compiled once per instruction set (see docs/native.md). A vfloat holds LANES floats: 16
 * (one zmm register) with the AVX-512 flags, 8 (one ymm) with AVX2 + FMA, 4 (one xmm: SSE2 on x86-64, NEON on
 * aarch64) in the portable build, which uses no flag beyond the architecture's baseline. Vectors are kept at the
 * native width because GCC lowers wider generic vectors poorly (it scalarises their compares and shuffles their
 * halves through the stack). Kernels are written in terms of LANES; only rounding to an integer, the power-of-two
 * scaling and the reciprocal have ISA-specific forms.
 *
 * NaN and infinity follow IEEE arithmetic as the PyTorch reference does: a NaN argument gives NaN out of every
 * function here (no clamp swallows it), exp of -inf is exactly 0 and sigmoid/softplus of +-inf are the limits.
 */
#ifndef MAMBAZOO_SIMD_H
#define MAMBAZOO_SIMD_H

#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define MZ_SIMD_AVX512 1
#define LANES 16
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define MZ_SIMD_AVX2 1
#define LANES 8
#include <immintrin.h>
#else
#define LANES 4
#endif

typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));
typedef float vfloat_unaligned __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

#define INLINE static inline __attribute__((always_inline))

INLINE vfloat splat(float x) { return (vfloat){0} + x; }

/* Lanes where `mask` is all ones take `if_true`, the others `if_false` (mask lanes come from a vector compare). */
INLINE vfloat select_mask(vint mask, vfloat if_true, vfloat if_false) {
    return (vfloat)(((vint)if_true & mask) | ((vint)if_false & ~mask));
}

/* Load `count` (0..LANES) consecutive floats; missing lanes are zero. */
INLINE vfloat load_lanes(const float *p, int count) {
    if (count == LANES) return *(const vfloat_unaligned *)p;
#ifdef MZ_SIMD_AVX512
    return (vfloat)_mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), p);
#else
    vfloat v = splat(0.0f);
    for (int i = 0; i < count; ++i) v[i] = p[i];
    return v;
#endif
}

INLINE void store_lanes(float *p, vfloat v, int count) {
    if (count == LANES) {
        *(vfloat_unaligned *)p = v;
        return;
    }
#ifdef MZ_SIMD_AVX512
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << count) - 1u), (__m512)v);
#else
    for (int i = 0; i < count; ++i) p[i] = v[i];
#endif
}

INLINE vfloat vabs(vfloat a) { return (vfloat)((vint)a & 0x7fffffff); }

/* All-ones lanes where the sign bit is set (negative numbers, -0 and NaNs with the sign bit). */
INLINE vint sign_mask(vfloat x) { return (vint)x >> 31; }

/* min(x, limit) that returns x itself when it is NaN. */
INLINE vfloat min_keep_nan(vfloat x, float limit) { return select_mask(x > limit, splat(limit), x); }

/* 1 / d for finite positive normal d, to about 1 ulp: a hardware estimate refined by one Newton step where the ISA
 * has one (14 -> 28 bits with AVX-512, 12 -> 23 bits with AVX2). */
INLINE vfloat reciprocal(vfloat d) {
#if defined(MZ_SIMD_AVX512)
    vfloat r = (vfloat)_mm512_rcp14_ps((__m512)d);
#elif defined(MZ_SIMD_AVX2)
    vfloat r = (vfloat)_mm256_rcp_ps((__m256)d);
#else
    return 1.0f / d;
#endif
#if defined(MZ_SIMD_AVX512) || defined(MZ_SIMD_AVX2)
    return r * (2.0f - d * r);
#endif
}

/* 2^f for |f| <= 1/2: degree-5 polynomial with p(0) = 1 and p'(0) = ln 2 exactly (relative error 1.1e-7 with these
 * float32 coefficients, plus float32 rounding). Both constraints matter for long sequences: a decay a = 2^x close
 * to 1 weights about 1 / (1 - a) past steps, so a relative error e(x) per step becomes e(x) / (1 - a) in the state;
 * with p(0) = 1 and p'(0) = ln 2 that ratio stays O(x) instead of approaching |p'(0) - ln 2| / ln 2. */
INLINE vfloat exp2_fraction(vfloat f) {
    vfloat p = splat(1.3302305e-3f);
    p = p * f + 9.670629e-3f;
    p = p * f + 5.5505592e-2f;
    p = p * f + 2.4022263e-1f;
    p = p * f + 6.931472e-1f;
    return p * f + 1.0f;
}

/* 2^f for |f| <= 1/2 with one FMA fewer: degree 4 under the same two constraints, relative error 5.4e-6 (with the
 * float32 coefficients). The scan's decays use it (their exponential bounds the scan's speed; see decay_of in
 * selective_scan.c and docs/native.md, "Numerics"); everything else uses exp2_fraction. */
INLINE vfloat exp2_fraction_short(vfloat f) {
    vfloat p = splat(9.528321e-3f);
    p = p * f + 5.5793341e-2f;
    p = p * f + 2.4025109e-1f;
    p = p * f + 6.931472e-1f;
    return p * f + 1.0f;
}

/* 2^x for x <= 127 (with `may_be_positive`; anything above 128 gives +inf), exactly 0 below -125.5 (so results
 * are normal floats or zero, and 2^-inf = 0), NaN for NaN. Branch-free: x = k + f with integer k and |f| <= 1/2.
 * Without `may_be_positive` the argument must be <= 0 (or NaN). `short_polynomial` (a compile-time constant) uses
 * exp2_fraction_short for 2^f. */
#ifdef MZ_SIMD_AVX512
INLINE vfloat exp2_any(vfloat x, int may_be_positive, int short_polynomial) {
    if (may_be_positive) x = min_keep_nan(x, 128.0f);
    __m512 xv = (__m512)x;
    __mmask16 normal = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-125.5f), _CMP_NLT_UQ); /* true for NaN */
    __m512 k = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vfloat f = (vfloat)_mm512_sub_ps(xv, k);
    vfloat p = short_polynomial ? exp2_fraction_short(f) : exp2_fraction(f);
    return (vfloat)_mm512_maskz_scalef_ps(normal, (__m512)p, k); /* 2^k * p, exact */
}
#else
INLINE vfloat exp2_any(vfloat x, int may_be_positive, int short_polynomial) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer in the low bits */
    if (may_be_positive) x = min_keep_nan(x, 128.0f);
    vint underflow = x < -125.5f; /* false for NaN */
    vfloat shifted = x + magic;
    vfloat k = shifted - magic;
    vfloat p = short_polynomial ? exp2_fraction_short(x - k) : exp2_fraction(x - k);
    vfloat scale = (vfloat)(((vint)shifted + 127) << 23); /* 2^k for k in [-126, 128] (128 gives +inf) */
    return (vfloat)((vint)(p * scale) & ~underflow);      /* a NaN p stays NaN whatever the scale */
}
#endif

/* 2^x with the degree-5 polynomial (see exp2_any). */
INLINE vfloat exp2_upto(vfloat x, int may_be_positive) { return exp2_any(x, may_be_positive, 0); }

#define LOG2E 1.44269504088896341f

/* 2^x for x <= 0 (see exp2_upto). */
INLINE vfloat exp2_nonpositive(vfloat x) { return exp2_upto(x, 0); }

/* e^x for x <= 0. */
INLINE vfloat exp_nonpositive(vfloat x) { return exp2_nonpositive(x * LOG2E); }

/* e^x for x <= 127 ln 2 (larger x gives +inf). */
INLINE vfloat exp_upto(vfloat x) { return exp2_upto(x * LOG2E, 1); }

/* sigmoid(x) = 1 / (1 + e^-x): e^-x overflows to +inf for x < -88 and the quotient is then 0, as in PyTorch. */
INLINE vfloat sigmoid(vfloat x) { return 1.0f / (1.0f + exp_upto(-x)); }

/* SiLU(x) = x / (1 + e^-x), PyTorch's formula (so also its NaN at -inf and its -0 below -88). */
INLINE vfloat silu(vfloat x) { return x / (1.0f + exp_upto(-x)); }

/* log(1 + w) for w in [0, 1] as 2 atanh(s), s = w / (2 + w) in [0, 1/3]: odd series in s, no cancellation for small
 * w; truncation error below 2e-8. */
INLINE vfloat log1p_unit(vfloat w) {
    vfloat s = w * reciprocal(w + 2.0f);
    vfloat s2 = s * s;
    vfloat p = splat(1.0f / 13.0f);
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|); equals x to float precision beyond 20, like PyTorch's
 * threshold; +inf for +inf, 0 for -inf, NaN for NaN (through the second term). */
INLINE vfloat softplus(vfloat x) {
    vfloat positive_part = (vfloat)((vint)x & ~sign_mask(x));
    return positive_part + log1p_unit(exp_nonpositive(-vabs(x)));
}

/* Lane permutation of the concatenation a:b with constant indices (indices >= LANES select from b).
 * __builtin_shufflevector exists in clang and in GCC >= 12; older GCC has __builtin_shuffle. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vint){__VA_ARGS__})
#endif

#if LANES == 16
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#elif LANES == 8
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15
#else
#define EVEN_LANES 0, 2, 4, 6
#define ODD_LANES 1, 3, 5, 7
#endif

/* Sums of adjacent lane pairs of a:b: a0+a1, a2+a3, ..., b0+b1, ... */
INLINE vfloat pairwise_sums(vfloat a, vfloat b) { return SHUFFLE(a, b, EVEN_LANES) + SHUFFLE(a, b, ODD_LANES); }

/* out[i] = the sum of the lanes of w[i], for i < count. Blocks of LANES vectors are reduced by a tree of pairwise
 * sums that ends with one vector holding the block's sums in order. The order of the additions is fixed, so the
 * result depends on nothing but the inputs. */
INLINE void lane_sums(const vfloat *w, int count, float *out) {
    for (int first = 0; first < count; first += LANES) {
        int size = count - first < LANES ? count - first : LANES;
        vfloat level[LANES];
        for (int i = 0; i < size; ++i) level[i] = w[first + i];
        for (int i = size; i < LANES; ++i) level[i] = splat(0.0f);
        for (int width = LANES; width > 1; width /= 2)
            for (int i = 0; i < width / 2; ++i) level[i] = pairwise_sums(level[2 * i], level[2 * i + 1]);
        for (int i = 0; i < size; ++i) out[first + i] = level[0][i];
    }
}

#endif
