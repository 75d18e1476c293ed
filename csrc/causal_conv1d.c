/* Depthwise causal 1-D convolution in the channels-last layout, forward and backward, plain C with OpenMP.
 *
 * y_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t-K+1+k}[d]) for t in scan order; `reverse` runs the sequence from
 * its end (anti-causal). x is (batch, length, dim) with batch and length strides in elements (last dimension
 * contiguous); weight (dim, K) and bias (dim,) are contiguous. Work is split over (batch x blocks of 16 channels).
 */
#include <stdlib.h>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define MAX_KERNEL 8

typedef struct {
    int64_t batch, length, dim, kernel_size;
    const float *x;
    int64_t x_batch_stride, x_length_stride;
    const float *weight;
    const float *bias;
    int32_t silu, reverse, n_threads;
} mz_conv_args;

typedef struct {
    const float *x;
    int64_t batch, first_channel;
    int lanes;
    v16 weight[MAX_KERNEL], bias;
} conv_view;

static conv_view make_conv_view(const mz_conv_args *a, int64_t item) {
    int64_t n_blocks = (a->dim + LANES - 1) / LANES;
    conv_view v;
    v.batch = item / n_blocks;
    v.first_channel = (item % n_blocks) * LANES;
    v.lanes = (int)(a->dim - v.first_channel < LANES ? a->dim - v.first_channel : LANES);
    v.x = a->x + v.batch * a->x_batch_stride + v.first_channel;
    for (int k = 0; k < a->kernel_size; ++k) {
        v.weight[k] = splat(0.0f);
        for (int i = 0; i < v.lanes; ++i) v.weight[k][i] = a->weight[(v.first_channel + i) * a->kernel_size + k];
    }
    v.bias = a->bias ? load_lanes(a->bias + v.first_channel, v.lanes) : splat(0.0f);
    return v;
}

INLINE int64_t conv_time(const mz_conv_args *a, int64_t step) { return a->reverse ? a->length - 1 - step : step; }

INLINE v16 input_at(const mz_conv_args *a, const conv_view *v, int64_t step) {
    return load_lanes(v->x + conv_time(a, step) * a->x_length_stride, v->lanes);
}

/* Pre-activation output at scan step `step`. */
INLINE v16 pre_activation(const mz_conv_args *a, const conv_view *v, int64_t step) {
    v16 acc = v->bias;
    int64_t first = a->kernel_size - 1 - step;
    for (int64_t k = first > 0 ? first : 0; k < a->kernel_size; ++k)
        acc += v->weight[k] * input_at(a, v, step - (a->kernel_size - 1) + k);
    return acc;
}

static int conv_valid(const mz_conv_args *a) {
    return a->batch > 0 && a->length > 0 && a->dim > 0 && a->kernel_size >= 1 && a->kernel_size <= MAX_KERNEL &&
           a->n_threads > 0;
}

/* Largest kernel size supported. */
int mz_conv_max_kernel(void) { return MAX_KERNEL; }

/* Forward into y, (batch, length, dim) contiguous. Returns 0, or -1 for invalid sizes. */
int mz_conv_forward(const mz_conv_args *a, float *y) {
    if (!conv_valid(a)) return -1;
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) {
        conv_view v = make_conv_view(a, item);
        for (int64_t step = 0; step < a->length; ++step) {
            v16 out = pre_activation(a, &v, step);
            if (a->silu) out *= sigmoid(out);
            int64_t row = v.batch * a->length + conv_time(a, step);
            store_lanes(y + row * a->dim + v.first_channel, out, v.lanes);
        }
    }
    return 0;
}

/* Backward: grad_y (batch, length, dim) contiguous; writes dx (same, contiguous), dweight (dim, K) and dbias (dim,)
 * (NULL when there is no bias). Returns 0, -1 for invalid sizes, -2 when memory runs out. */
int mz_conv_backward(const mz_conv_args *a, const float *grad_y, float *dx, float *dweight, float *dbias) {
    if (!conv_valid(a)) return -1;
    int64_t K = a->kernel_size, per_thread = a->dim * (K + 1);
    float *partials = calloc((size_t)(per_thread * a->n_threads), sizeof(float));
    if (!partials) return -2;
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel num_threads(a->n_threads)
    {
        float *dw = partials + omp_get_thread_num() * per_thread, *db = dw + a->dim * K;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            conv_view v = make_conv_view(a, item);
            v16 dw_acc[MAX_KERNEL], db_acc = splat(0.0f);
            for (int k = 0; k < K; ++k) dw_acc[k] = splat(0.0f);
            float *dx_block = dx + v.batch * a->length * a->dim + v.first_channel;
            const float *dy_block = grad_y + v.batch * a->length * a->dim + v.first_channel;
            /* pass 1: gradient of the pre-activation, kept in dx; weight and bias gradients */
            for (int64_t step = 0; step < a->length; ++step) {
                int64_t offset = conv_time(a, step) * a->dim;
                v16 dpre = load_lanes(dy_block + offset, v.lanes);
                if (a->silu) {
                    v16 pre = pre_activation(a, &v, step), sig = sigmoid(pre);
                    dpre *= sig * (1.0f + pre * (1.0f - sig));
                }
                db_acc += dpre;
                int64_t first = K - 1 - step;
                for (int64_t k = first > 0 ? first : 0; k < K; ++k)
                    dw_acc[k] += dpre * input_at(a, &v, step - (K - 1) + k);
                store_lanes(dx_block + offset, dpre, v.lanes);
            }
            /* pass 2, in place: dx at step s needs the pre-activation gradients of steps s .. s+K-1 only */
            for (int64_t step = 0; step < a->length; ++step) {
                v16 acc = splat(0.0f);
                for (int64_t k = 0; k < K; ++k) {
                    int64_t source = K - 1 - k;
                    if (step + source < a->length)
                        acc += v.weight[k] * load_lanes(dx_block + conv_time(a, step + source) * a->dim, v.lanes);
                }
                store_lanes(dx_block + conv_time(a, step) * a->dim, acc, v.lanes);
            }
            for (int i = 0; i < v.lanes; ++i) {
                for (int k = 0; k < K; ++k) dw[(v.first_channel + i) * K + k] += dw_acc[k][i];
                db[v.first_channel + i] += db_acc[i];
            }
        }
    }
    for (int64_t i = 0; i < per_thread; ++i) {
        float sum = 0.0f;
        for (int p = 0; p < a->n_threads; ++p) sum += partials[p * per_thread + i];
        if (i < a->dim * K) {
            dweight[i] = sum;
        } else if (dbias) {
            dbias[i - a->dim * K] = sum;
        }
    }
    free(partials);
    return 0;
}
