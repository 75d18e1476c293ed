/* Depthwise causal 1-D convolution in the channels-last layout, forward and backward, plain C with OpenMP.
 *
 * y_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t-K+1+k}[d]) for t in scan order with x_{<0} = 0 (the zeros are
 * multiplied like data, as by a zero-padded nn.Conv1d: an infinite weight makes the first steps NaN); `reverse` runs
 * the sequence from its end (anti-causal). x is (batch, length, dim) with batch and length strides in elements (last
 * dimension contiguous); weight (dim, K) and bias (dim,) are contiguous. Any of batch, length and dim may be 0.
 *
 * The forward splits the work over (batch x segments of the sequence); each item walks its rows in order and computes
 * every channel block of a row, so the K - 1 earlier rows it reads again are still in L1 and both tensors stream
 * through memory once. The backward walks each (batch, channel block) from the end with a window of the next K-1
 * pre-activation gradients; its weight and bias gradients are summed per item and then over batch rows in a fixed
 * order (deterministic whatever the thread count, scratch bounded by a group of rows).
 */
#include <stdlib.h>

#include "api.h"
#include "kernel.h"

#define MAX_KERNEL 8
#define MIN_SEGMENT 16 /* fewest steps per forward work item */

typedef struct {
    const float *x;
    int64_t batch, first_channel;
    int lanes;
    vfloat weight[MAX_KERNEL], bias;
} conv_view;

INLINE int64_t conv_blocks(const mz_conv_args *a) { return ceil_div(a->dim, LANES); }

static conv_view make_conv_view(const mz_conv_args *a, int64_t batch, int64_t block) {
    conv_view v;
    v.batch = batch;
    v.first_channel = block * LANES;
    v.lanes = (int)min_i64(a->dim - v.first_channel, LANES);
    v.x = a->x + v.batch * a->x_batch_stride + v.first_channel;
    for (int k = 0; k < a->kernel_size; ++k) {
        v.weight[k] = splat(0.0f);
        for (int i = 0; i < v.lanes; ++i) v.weight[k][i] = a->weight[(v.first_channel + i) * a->kernel_size + k];
    }
    v.bias = a->bias ? load_lanes(a->bias + v.first_channel, v.lanes) : splat(0.0f);
    return v;
}

INLINE int64_t conv_time(const mz_conv_args *a, int64_t step) { return a->reverse ? a->length - 1 - step : step; }

INLINE vfloat input_at(const mz_conv_args *a, const conv_view *v, int64_t step) {
    return load_lanes(v->x + conv_time(a, step) * a->x_length_stride, v->lanes);
}

/* Input at scan step `step`, zero before the start. */
INLINE vfloat padded_input_at(const mz_conv_args *a, const conv_view *v, int64_t step) {
    return step >= 0 ? input_at(a, v, step) : splat(0.0f);
}

/* Pre-activation output at scan step `step`. */
INLINE vfloat pre_activation(const mz_conv_args *a, const conv_view *v, int64_t step, const int K) {
    vfloat acc = v->bias;
    for (int k = 0; k < K; ++k) acc += v->weight[k] * padded_input_at(a, v, step - (K - 1) + k);
    return acc;
}

INLINE vfloat silu_derivative(vfloat x) {
    vfloat s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

/* Per-call constants of the forward: the weights as vectors, (n_blocks, K) (lanes past dim are zero), and biases. */
typedef struct {
    const vfloat *weight, *bias;
    int64_t n_blocks, segment, n_segments;
} conv_plan;

/* One output vector of the forward: `lanes` channels of block `block` at a step whose K input rows are `rows` (the
 * first `padding` of them are the zeros in front of the sequence). */
INLINE void forward_vector(const conv_plan *p, const float *const *rows, int64_t block, int lanes, int64_t padding,
                           int silu_on, const int K, float *out_row) {
    const vfloat *w = p->weight + block * K;
    vfloat out = p->bias[block];
    for (int64_t k = 0; k < K; ++k)
        out += w[k] * (k < padding ? splat(0.0f) : load_lanes(rows[k] + block * LANES, lanes));
    store_lanes(out_row + block * LANES, silu_on ? silu(out) : out, lanes);
}

/* Forward of one (batch, segment) item: rows in order, every channel block of a row in turn (the rows a step reads
 * were read by the previous steps, so they come from L1). Full blocks and the partial last block run separate loops,
 * so the hot one has no lane-count test. */
INLINE void forward_item(const mz_conv_args *a, const conv_plan *p, int64_t item, const int K, float *y) {
    int64_t batch = item / p->n_segments, first = (item % p->n_segments) * p->segment;
    int64_t end = min_i64(first + p->segment, a->length), dim = a->dim, stride = a->x_length_stride;
    int64_t full_blocks = dim / LANES;
    int silu_on = a->silu, tail = (int)(dim % LANES);
    const float *x = a->x + batch * a->x_batch_stride;
    float *y_batch = y + batch * a->length * dim;
    for (int64_t step = first; step < end; ++step) {
        const float *rows[MAX_KERNEL];
        for (int k = 0; k < K; ++k) {
            int64_t source = step - (K - 1) + k;
            rows[k] = source >= 0 ? x + conv_time(a, source) * stride : x;
        }
        float *out_row = y_batch + conv_time(a, step) * dim;
        int64_t padding = step >= K - 1 ? 0 : K - 1 - step; /* the first steps read some of the zeros in front */
        if (padding == 0) {
            for (int64_t block = 0; block < full_blocks; ++block)
                forward_vector(p, rows, block, LANES, 0, silu_on, K, out_row);
        } else {
            for (int64_t block = 0; block < full_blocks; ++block)
                forward_vector(p, rows, block, LANES, padding, silu_on, K, out_row);
        }
        if (tail) forward_vector(p, rows, full_blocks, tail, padding, silu_on, K, out_row);
    }
}

/* Backward of one (batch, block) item over the whole sequence, from its last scan step: writes dx and the item's
 * weight and bias gradients (sums[0..K) and sums[K]). */
INLINE void backward_item(const mz_conv_args *a, int64_t item, const int K, const float *grad_y, float *dx,
                          vfloat *sums) {
    int64_t n_blocks = conv_blocks(a);
    conv_view v = make_conv_view(a, item / n_blocks, item % n_blocks);
    int64_t offset = v.batch * a->length * a->dim + v.first_channel;
    vfloat dweight[MAX_KERNEL], dbias = splat(0.0f), later[MAX_KERNEL]; /* later[j]: pre-activation grad at step+1+j */
    for (int k = 0; k < K; ++k) dweight[k] = later[k] = splat(0.0f);
    for (int64_t step = a->length - 1; step >= 0; --step) {
        int64_t row = conv_time(a, step) * a->dim;
        vfloat dpre = load_lanes(grad_y + offset + row, v.lanes);
        if (a->silu) dpre *= silu_derivative(pre_activation(a, &v, step, K));
        dbias += dpre;
        for (int k = 0; k < K; ++k) dweight[k] += dpre * padded_input_at(a, &v, step - (K - 1) + k);
        vfloat grad = v.weight[K - 1] * dpre; /* outputs at steps step .. step+K-1 read this input */
        for (int k = 0; k < K - 1; ++k) /* no output past the end (and no zero times the weight, as in PyTorch) */
            if (step + K - 1 - k < a->length) grad += v.weight[k] * later[K - 2 - k];
        store_lanes(dx + offset + row, grad, v.lanes);
        for (int j = K - 2; j > 0; --j) later[j] = later[j - 1];
        later[0] = dpre;
    }
    for (int k = 0; k < K; ++k) sums[k] = dweight[k];
    sums[K] = dbias;
}

typedef void (*conv_forward_fn)(const mz_conv_args *, const conv_plan *, int64_t, float *);
typedef void (*conv_backward_fn)(const mz_conv_args *, int64_t, const float *, float *, vfloat *);

#define SPECIALISE(NAME, K)                                                                                        \
    static void forward_##NAME(const mz_conv_args *a, const conv_plan *p, int64_t item, float *y) {                \
        forward_item(a, p, item, K, y);                                                                            \
    }                                                                                                              \
    static void backward_##NAME(const mz_conv_args *a, int64_t item, const float *gy, float *dx, vfloat *sums) {       \
        backward_item(a, item, K, gy, dx, sums);                                                                   \
    }
SPECIALISE(k2, 2)
SPECIALISE(k3, 3)
SPECIALISE(k4, 4)
SPECIALISE(any, (int)a->kernel_size)

static int conv_valid(const mz_conv_args *a) {
    return a->batch >= 0 && a->length >= 0 && a->dim >= 0 && a->kernel_size >= 1 && a->kernel_size <= MAX_KERNEL &&
           a->n_threads > 0;
}

/* Largest kernel size supported. */
int MZ_EXPORT(mz_conv_max_kernel)(void) { return MAX_KERNEL; }

/* Forward into y, (batch, length, dim) contiguous. Returns 0, -1 for invalid sizes, -2 when memory runs out. */
int MZ_EXPORT(mz_conv_forward)(const mz_conv_args *a, float *y) {
    if (!conv_valid(a)) return -1;
    int64_t K = a->kernel_size, n_blocks = conv_blocks(a);
    if (a->batch == 0 || a->length == 0 || a->dim == 0) return 0;
    conv_forward_fn run = K == 4 ? forward_k4 : K == 3 ? forward_k3 : K == 2 ? forward_k2 : forward_any;
    vfloat *vectors = aligned_alloc(sizeof(vfloat), (size_t)(n_blocks * (K + 1)) * sizeof(vfloat));
    if (!vectors) return -2;
    for (int64_t block = 0; block < n_blocks; ++block) {
        conv_view v = make_conv_view(a, 0, block);
        for (int64_t k = 0; k < K; ++k) vectors[block * K + k] = v.weight[k];
        vectors[n_blocks * K + block] = v.bias;
    }
    /* Segments short enough for about four items per thread, but not so short that rows are reloaded often. */
    int64_t per_row = ceil_div(4 * (int64_t)a->n_threads, a->batch);
    int64_t segment = per_row > 1 ? ceil_div(a->length, per_row) : a->length;
    segment = segment < MIN_SEGMENT ? MIN_SEGMENT : segment;
    conv_plan plan = {vectors, vectors + n_blocks * K, n_blocks, segment, ceil_div(a->length, segment)};
    int64_t items = a->batch * plan.n_segments;
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) run(a, &plan, item, y);
    free(vectors);
    return 0;
}

/* Backward: grad_y (batch, length, dim) contiguous; writes dx (same, contiguous), dweight (dim, K) and dbias (dim,)
 * (NULL when there is no bias). Returns 0, -1 for invalid sizes, -2 when memory runs out. */
int MZ_EXPORT(mz_conv_backward)(const mz_conv_args *a, const float *grad_y, float *dx, float *dweight,
                                float *dbias) {
    if (!conv_valid(a)) return -1;
    int64_t K = a->kernel_size, n_blocks = conv_blocks(a);
    if (a->dim > 0) {
        memset(dweight, 0, (size_t)(a->dim * K) * sizeof(float));
        if (dbias) memset(dbias, 0, (size_t)a->dim * sizeof(float));
    }
    if (a->batch == 0 || a->length == 0 || a->dim == 0) return 0;
    conv_backward_fn run = K == 4 ? backward_k4 : K == 3 ? backward_k3 : K == 2 ? backward_k2 : backward_any;
    int64_t rows_per_group = min_i64(a->batch, ceil_div(8 * (int64_t)a->n_threads, n_blocks));
    vfloat *sums = aligned_alloc(sizeof(vfloat), (size_t)(rows_per_group * n_blocks * (K + 1)) * sizeof(vfloat));
    if (!sums) return -2;
#pragma omp parallel num_threads(a->n_threads)
    for (int64_t first_row = 0; first_row < a->batch; first_row += rows_per_group) {
        int64_t rows = min_i64(rows_per_group, a->batch - first_row), first_item = first_row * n_blocks;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * n_blocks; ++i) run(a, first_item + i, grad_y, dx, sums + i * (K + 1));
#pragma omp for schedule(static)
        for (int64_t block = 0; block < n_blocks; ++block) {
            int lanes = (int)min_i64(a->dim - block * LANES, LANES);
            for (int64_t row = 0; row < rows; ++row) {
                const vfloat *s = sums + (row * n_blocks + block) * (K + 1);
                for (int i = 0; i < lanes; ++i) {
                    int64_t d = block * LANES + i;
                    for (int64_t k = 0; k < K; ++k) dweight[d * K + k] += s[k][i];
                    if (dbias) dbias[d] += s[K][i];
                }
            }
        }
    }
    free(sums);
    return 0;
}
