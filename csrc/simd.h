/* Portable 16-lane float vectors (GCC/Clang vector extensions) and branch-free math on them.
 *
 * With -march=native on an AVX-512 machine a v16 is one zmm register; elsewhere the compiler splits it into
 * narrower registers, so the same source builds everywhere.
 */
#ifndef MAMBAZOO_SIMD_H
#define MAMBAZOO_SIMD_H

#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

#define INLINE static inline __attribute__((always_inline))

INLINE v16 splat(float x) { return (v16){0} + x; }

/* Load `count` (1..16) consecutive floats; missing lanes are zero. */
INLINE v16 load_lanes(const float *p, int count) {
    v16 v = splat(0.0f);
    if (count == LANES) {
        memcpy(&v, p, sizeof(v));
    } else {
        for (int i = 0; i < count; ++i) v[i] = p[i];
    }
    return v;
}

INLINE void store_lanes(float *p, v16 v, int count) {
    if (count == LANES) {
        memcpy(p, &v, sizeof(v));
    } else {
        for (int i = 0; i < count; ++i) p[i] = v[i];
    }
}

INLINE v16 select_mask(vi16 mask, v16 if_true, v16 if_false) {
    return (v16)(((vi16)if_true & mask) | ((vi16)if_false & ~mask));
}

#if defined(__AVX512F__)
#include <immintrin.h>

INLINE v16 vmax(v16 a, v16 b) { return (v16)_mm512_max_ps((__m512)a, (__m512)b); }

INLINE v16 vmin(v16 a, v16 b) { return (v16)_mm512_min_ps((__m512)a, (__m512)b); }

INLINE v16 round_to_integer(v16 x) {
    return (v16)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* 2^k * y for integral k (vscalefps: exact, no exponent-field overflow). */
INLINE v16 scale_by_power_of_two(v16 y, v16 k) { return (v16)_mm512_scalef_ps((__m512)y, (__m512)k); }
#else
INLINE v16 vmax(v16 a, v16 b) { return select_mask(a > b, a, b); }

INLINE v16 vmin(v16 a, v16 b) { return select_mask(a < b, a, b); }

INLINE v16 round_to_integer(v16 x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to the nearest integer */
    return (x + magic) - magic;
}

/* 2^k * y for integral k in [-126, 127], building 2^k in the exponent field. */
INLINE v16 scale_by_power_of_two(v16 y, v16 k) {
    k = vmin(k, splat(127.0f));
    vi16 exponent = __builtin_convertvector(k, vi16) + 127;
    return y * (v16)(exponent << 23);
}
#endif

INLINE v16 vabs(v16 a) { return (v16)((vi16)a & 0x7fffffff); }

/* 2^x, branch-free, for x >= -125 (smaller x is clamped there, so results stay normal floats: e^-86.6 ~ 2e-38 is
 * indistinguishable from 0 next to any state). x = k + f with integer k and |f| <= 1/2; 2^f from a degree-6
 * polynomial fitted on [-1/2, 1/2] with p(0) = 1 exactly (relative error 3e-9 before rounding; an unbiased p(0)
 * matters: a decay of 1 + 1e-7 per step would accumulate over long sequences). */
INLINE v16 exp2_clamped(v16 x) {
    x = vmax(x, splat(-125.0f));
    v16 k = round_to_integer(x);
    v16 f = x - k;
    v16 p = splat(1.53375768e-4f);
    p = p * f + 1.33998604e-3f;
    p = p * f + 9.61851953e-3f;
    p = p * f + 5.55032900e-2f;
    p = p * f + 2.40226466e-1f;
    p = p * f + 6.93147206e-1f;
    p = p * f + 1.0f;
    return scale_by_power_of_two(p, k);
}

#define LOG2E 1.44269504088896341f

INLINE v16 vexp(v16 x) { return exp2_clamped(x * LOG2E); }

/* log(1 + w) for w in [0, 1] as 2 atanh(w / (2 + w)): no cancellation for small w. */
INLINE v16 log1p_unit(v16 w) {
    v16 s = w / (w + 2.0f);
    v16 s2 = s * s;
    v16 p = splat(1.0f / 15.0f);
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|) (equals x to float precision beyond 20, like torch). */
INLINE v16 softplus(v16 x) { return vmax(x, splat(0.0f)) + log1p_unit(vexp(-vabs(x))); }

/* sigmoid(x) from e = e^-|x|: 1 / (1 + e) for x >= 0, e / (1 + e) otherwise. */
INLINE v16 sigmoid(v16 x) {
    v16 e = vexp(-vabs(x));
    v16 r = 1.0f / (1.0f + e);
    return select_mask(x >= 0.0f, r, e * r);
}

/* Two lane permutations of the concatenation a:b (indices >= 16 select from b), added. */
INLINE v16 fold(v16 a, v16 b, vi16 lo, vi16 hi) { return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi); }

/* Sum each of `count` (<= 16) vectors over its lanes: out[i] += sum of the lanes of w[i] (w, room for 16 vectors, is
 * overwritten). Groups of 4 vectors are first reduced inside 128-bit lanes (cheap in-lane shuffles) to one vector
 * holding, per 128-bit lane, the 4 partial sums; the 4 such vectors are then folded across 128-bit lanes. */
INLINE void lane_sums(v16 *w, int count, float *out) {
    const vi16 unpack_lo = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29};
    const vi16 unpack_hi = {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31};
    const vi16 pair_lo = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vi16 pair_hi = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const vi16 half_lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi16 half_hi = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi16 quarter_lo = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi16 quarter_hi = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    int groups = (count + 3) / 4;
    for (int i = count; i < 4 * groups; ++i) w[i] = splat(0.0f);
    for (int g = 0; g < groups; ++g) {
        v16 ab = fold(w[4 * g], w[4 * g + 1], unpack_lo, unpack_hi);     /* a0+a2 b0+b2 a1+a3 b1+b3 per lane */
        v16 cd = fold(w[4 * g + 2], w[4 * g + 3], unpack_lo, unpack_hi);
        w[g] = fold(ab, cd, pair_lo, pair_hi);                            /* sum(a) sum(b) sum(c) sum(d) per lane */
    }
    for (int g = groups; g < 4; ++g) w[g] = splat(0.0f);
    v16 first = fold(w[0], w[1], half_lo, half_hi), second = fold(w[2], w[3], half_lo, half_hi);
    v16 sums = fold(first, second, quarter_lo, quarter_hi);
    for (int i = 0; i < count; ++i) out[i] += sums[i];
}

#endif
