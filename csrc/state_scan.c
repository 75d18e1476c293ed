/* All-states scan (selective scan with a one-dimensional state, N = 1) for CPUs: forward and backward, plain C with
 * OpenMP, no PyTorch headers.
 *
 *     s_t = softplus(delta_t + bias)   (each part optional; softplus passes arguments above 20 through)
 *     h_t = exp(s_t * A) * h_{t-1} + (s_t * u_t) * B_t,   h_{-1} = 0,   every h_t is written out.
 *
 * Layout (channels-last): u and delta are (batch, length, dim) and B is (batch, length) with their own batch and
 * length strides in elements (last dimension contiguous; a batch stride of 0 is an expanded view). A and bias are
 * (dim,) contiguous (bias may be NULL). The states are written contiguous (batch, length, dim).
 *
 * Work is split over (batch x blocks of 16 channels); the 16 channels of a block are the lanes of one vector. The
 * backward needs no recomputation: h_{t-1} is read from the states of the forward. It runs the adjoint
 * g_t = dL/dh_t + exp(s_{t+1} A) g_{t+1} backwards in scan order; the only scratch is one (batch, length) partial sum
 * of dB and two (dim,) partials per thread.
 *
 * NaN and Inf follow the sequential definition: the exponentials below return NaN for NaN and exactly 0 below the
 * clamp of exp2_clamped (where e^x < 2e-38), and softplus returns NaN for NaN, so a non-finite input poisons the same
 * states as in a float reference.
 */
#include <stdlib.h>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

typedef struct {
    int64_t batch, length, dim;
    const float *u;
    int64_t u_batch_stride, u_length_stride;
    const float *delta;
    int64_t delta_batch_stride, delta_length_stride;
    const float *A;
    const float *B;
    int64_t B_batch_stride, B_length_stride;
    const float *delta_bias;
    int32_t delta_softplus, reverse, n_threads;
} mz_state_scan_args;

typedef struct {
    float *du, *ddelta, *dA, *dB, *ddelta_bias;
} mz_state_scan_grads;

/* e^x for x <= 0: exactly 0 where exp2_clamped clamps (e^x < 2e-38), NaN for NaN. */
INLINE v16 exp_nonpositive(v16 x) {
    v16 x2 = x * LOG2E;
    v16 e = select_mask(x2 < -125.0f, splat(0.0f), exp2_clamped(x2));
    return select_mask(x != x, x, e);
}

/* softplus(x) = max(x, 0) + log1p(e^-|x|), x itself above 20 (as torch), NaN for NaN. */
INLINE v16 softplus_exact(v16 x) {
    v16 soft = vmax(x, splat(0.0f)) + log1p_unit(exp_nonpositive(-vabs(x)));
    soft = select_mask(x > 20.0f, x, soft);
    return select_mask(x != x, x, soft);
}

/* d softplus / dx: sigmoid(x), 1 above the passthrough threshold. */
INLINE v16 softplus_slope(v16 x) { return select_mask(x > 20.0f, splat(1.0f), sigmoid(x)); }

/* Pointers and per-block constants of one (batch, channel block) work item. */
typedef struct {
    const float *u, *delta, *B;
    int64_t batch, first_channel;
    int lanes;
    v16 A, bias;
} block_view;

static block_view make_view(const mz_state_scan_args *a, int64_t item) {
    int64_t n_blocks = (a->dim + LANES - 1) / LANES;
    block_view v;
    v.batch = item / n_blocks;
    v.first_channel = (item % n_blocks) * LANES;
    v.lanes = (int)(a->dim - v.first_channel < LANES ? a->dim - v.first_channel : LANES);
    v.u = a->u + v.batch * a->u_batch_stride + v.first_channel;
    v.delta = a->delta + v.batch * a->delta_batch_stride + v.first_channel;
    v.B = a->B + v.batch * a->B_batch_stride;
    v.A = load_lanes(a->A + v.first_channel, v.lanes);
    v.bias = a->delta_bias ? load_lanes(a->delta_bias + v.first_channel, v.lanes) : splat(0.0f);
    return v;
}

INLINE int64_t time_index(const mz_state_scan_args *a, int64_t step) {
    return a->reverse ? a->length - 1 - step : step;
}

/* Offset of row t of the block in a contiguous (batch, length, dim) tensor. */
INLINE int64_t row_offset(const mz_state_scan_args *a, const block_view *v, int64_t t) {
    return (v->batch * a->length + t) * a->dim + v->first_channel;
}

/* Delta plus bias (the softplus argument). */
INLINE v16 biased_delta(const mz_state_scan_args *a, const block_view *v, int64_t t) {
    return load_lanes(v->delta + t * a->delta_length_stride, v->lanes) + v->bias;
}

static void forward_block(const mz_state_scan_args *a, int64_t item, float *states) {
    block_view v = make_view(a, item);
    v16 h = splat(0.0f);
    for (int64_t step = 0; step < a->length; ++step) {
        int64_t t = time_index(a, step);
        v16 biased = biased_delta(a, &v, t);
        v16 s = a->delta_softplus ? softplus_exact(biased) : biased;
        v16 u = load_lanes(v.u + t * a->u_length_stride, v.lanes);
        h = exp_nonpositive(s * v.A) * h + (s * u) * v.B[t * a->B_length_stride];
        store_lanes(states + row_offset(a, &v, t), h, v.lanes);
    }
}

/* Per-thread partial sums of the gradients reduced over channels (dB, (batch, length)) or batch (dA, dbias). */
typedef struct {
    float *dB, *dA, *ddelta_bias;
} thread_partials;

static void backward_block(const mz_state_scan_args *a, int64_t item, const float *states, const float *grad_states,
                           const mz_state_scan_grads *g, thread_partials *p) {
    block_view v = make_view(a, item);
    v16 adjoint = splat(0.0f), next_decay = splat(0.0f), dA = splat(0.0f), dbias = splat(0.0f);
    v16 wB[LANES];
    /* Steps run backwards in groups of 16 so that the 16 per-step channel sums of dB are reduced together; the
     * memory rows of a group are contiguous in either scan direction. */
    for (int64_t group = (a->length - 1) / LANES; group >= 0; --group) {
        int64_t first_step = group * LANES;
        int count = (int)(a->length - first_step < LANES ? a->length - first_step : LANES);
        int64_t first_row = a->reverse ? a->length - first_step - count : first_step;
        for (int64_t step = first_step + count - 1; step >= first_step; --step) {
            int64_t t = time_index(a, step);
            v16 biased = biased_delta(a, &v, t);
            v16 s = a->delta_softplus ? softplus_exact(biased) : biased;
            v16 u = load_lanes(v.u + t * a->u_length_stride, v.lanes);
            float b = v.B[t * a->B_length_stride];
            v16 decay = exp_nonpositive(s * v.A);
            v16 previous = step > 0 ? load_lanes(states + row_offset(a, &v, time_index(a, step - 1)), v.lanes)
                                    : splat(0.0f);
            adjoint = load_lanes(grad_states + row_offset(a, &v, t), v.lanes) + next_decay * adjoint;
            v16 d_log_decay = adjoint * previous * decay;
            v16 ds = adjoint * u * b + d_log_decay * v.A;
            if (a->delta_softplus) ds *= softplus_slope(biased);
            dA += d_log_decay * s;
            dbias += ds;
            wB[t - first_row] = adjoint * s * u;
            store_lanes(g->du + row_offset(a, &v, t), adjoint * s * b, v.lanes);
            store_lanes(g->ddelta + row_offset(a, &v, t), ds, v.lanes);
            next_decay = decay;
        }
        lane_sums(wB, count, p->dB + v.batch * a->length + first_row);
    }
    for (int i = 0; i < v.lanes; ++i) {
        p->dA[v.first_channel + i] += dA[i];
        p->ddelta_bias[v.first_channel + i] += dbias[i];
    }
}

static int valid(const mz_state_scan_args *a) {
    return a->batch > 0 && a->length > 0 && a->dim > 0 && a->n_threads > 0;
}

/* Forward: states (batch, length, dim) contiguous float32. Returns 0, or -1 for invalid sizes. */
int mz_state_scan_forward(const mz_state_scan_args *a, float *states) {
    if (!valid(a)) return -1;
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) forward_block(a, item, states);
    return 0;
}

/* Sum the per-thread partial buffers (each `size` floats, `parts` of them, `part_stride` apart) into dst. */
static void reduce_partials(float *dst, const float *partials, int64_t size, int parts, int64_t part_stride,
                            int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < size; ++i) {
        float sum = 0.0f;
        for (int p = 0; p < parts; ++p) sum += partials[p * part_stride + i];
        dst[i] = sum;
    }
}

/* Backward. states and grad_states are (batch, length, dim) contiguous. Gradients are written contiguous: du and
 * ddelta like u, dB (batch, length), dA (dim,), ddelta_bias (dim,) or NULL when there is no bias. Returns 0, -1 for
 * invalid sizes, -2 when memory runs out. */
int mz_state_scan_backward(const mz_state_scan_args *a, const float *states, const float *grad_states,
                           const mz_state_scan_grads *g) {
    if (!valid(a)) return -1;
    int n_threads = a->n_threads;
    int64_t sequence = a->batch * a->length, per_thread = sequence + 2 * a->dim;
    float *partials = calloc((size_t)(per_thread * n_threads), sizeof(float));
    if (!partials) return -2;
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel num_threads(n_threads)
    {
        float *own = partials + omp_get_thread_num() * per_thread;
        thread_partials p = {own, own + sequence, own + sequence + a->dim};
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) backward_block(a, item, states, grad_states, g, &p);
    }
    reduce_partials(g->dB, partials, sequence, n_threads, per_thread, n_threads);
    reduce_partials(g->dA, partials + sequence, a->dim, n_threads, per_thread, n_threads);
    if (g->ddelta_bias)
        reduce_partials(g->ddelta_bias, partials + sequence + a->dim, a->dim, n_threads, per_thread, n_threads);
    free(partials);
    return 0;
}
