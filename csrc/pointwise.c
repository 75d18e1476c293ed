/* Inference epilogues of the Mamba blocks, forward only, plain C with OpenMP: row-wise RMSNorm and the gate of the
 * bidirectional mixer. Each replaces a chain of small PyTorch ops whose per-op cost and temporaries dominate at these
 * sizes (docs/native.md).
 *
 * mz_rms_norm: out[r] = (x[r] * (1 / sqrt(sum(x[r]^2) / dim + eps))) * weight for `rows` contiguous rows of `dim`
 *   floats, in the order of operations of PyTorch's float32 F.rms_norm on CPU. The sum of squares runs in LANES
 *   partial sums reduced in a fixed order, so the result does not depend on the thread count. weight may be NULL.
 * mz_gated_sum: out = ((a + b) * silu(z)) * scale over `numel` contiguous floats; b may be NULL (a * silu(z) * scale).
 *
 * NaN and infinity follow the PyTorch formulas (an infinite element makes its row's scale 0, so it becomes NaN and the
 * rest of the row 0; SiLU(-inf) is NaN). Both kernels are memory-bound and fork threads only above MIN_PARALLEL floats.
 */
#include "api.h"
#include "kernel.h"

#define MIN_PARALLEL (1 << 15)
#define GATE_BLOCK 4096 /* floats per work item of the gate */

INLINE float sum_of_lanes(vfloat v) {
    float total = 0.0f;
    for (int i = 0; i < LANES; ++i) total += v[i];
    return total;
}

static void rms_norm_row(const mz_rms_norm_args *a, int64_t row, float *out) {
    const float *x = a->x + row * a->dim;
    out += row * a->dim;
    vfloat squares = splat(0.0f);
    for (int64_t i = 0; i < a->dim; i += LANES) {
        vfloat v = load_lanes(x + i, (int)min_i64(a->dim - i, LANES));
        squares += v * v;
    }
    float scale = 1.0f / __builtin_sqrtf(sum_of_lanes(squares) / (float)a->dim + a->eps);
    for (int64_t i = 0; i < a->dim; i += LANES) {
        int lanes = (int)min_i64(a->dim - i, LANES);
        vfloat y = load_lanes(x + i, lanes) * scale;
        store_lanes(out + i, a->weight ? y * load_lanes(a->weight + i, lanes) : y, lanes);
    }
}

/* out: (rows, dim) contiguous. Returns 0, or -1 for invalid sizes. */
int MZ_EXPORT(mz_rms_norm)(const mz_rms_norm_args *a, float *out) {
    if (a->rows < 0 || a->dim < 0 || a->n_threads < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(a->n_threads) if (a->rows * a->dim >= MIN_PARALLEL)
    for (int64_t row = 0; row < a->rows; ++row) rms_norm_row(a, row, out);
    return 0;
}

/* out: numel contiguous floats. Returns 0, or -1 for invalid sizes. */
int MZ_EXPORT(mz_gated_sum)(const mz_gated_sum_args *a, float *out) {
    if (a->numel < 0 || a->n_threads < 1) return -1;
    int64_t items = ceil_div(a->numel, GATE_BLOCK);
#pragma omp parallel for schedule(static) num_threads(a->n_threads) if (a->numel >= MIN_PARALLEL)
    for (int64_t item = 0; item < items; ++item) {
        int64_t end = min_i64((item + 1) * GATE_BLOCK, a->numel);
        for (int64_t i = item * GATE_BLOCK; i < end; i += LANES) {
            int lanes = (int)min_i64(end - i, LANES);
            vfloat summed = load_lanes(a->a + i, lanes);
            if (a->b) summed += load_lanes(a->b + i, lanes);
            store_lanes(out + i, summed * silu(load_lanes(a->z + i, lanes)) * a->scale, lanes);
        }
    }
    return 0;
}
