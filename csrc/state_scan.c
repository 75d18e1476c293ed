/* All-states scan (selective scan with a one-dimensional state, N = 1) for CPUs: forward and backward, plain C with
 * OpenMP, no PyTorch headers.
 *
 *     s_t = softplus(delta_t + bias)   (each part optional)
 *     h_t = exp(s_t * A) * h_{t-1} + (s_t * u_t) * B_t,   h_{-1} = 0,   every h_t is written out.
 *
 * Layout (channels-last): u and delta are (batch, length, dim) and B is (batch, length) with their own batch and
 * length strides in elements (last dimension contiguous; a batch stride of 0 is an expanded view). A (A <= 0) and
 * bias are (dim,) contiguous (bias may be NULL). The states are written contiguous (batch, length, dim). Any of batch,
 * length and dim may be 0.
 *
 * Work is split over (batch x blocks of LANES channels); the channels of a block are the lanes of one vector. The
 * backward needs no recomputation: h_{t-1} is read from the states of the forward. It runs the adjoint
 * g_t = dL/dh_t + exp(s_{t+1} A) g_{t+1} backwards in scan order.
 *
 * The backward is deterministic with bounded scratch memory, as the selective scan's (docs/native.md): batch rows are
 * processed in groups, all work items of a group step through chunks of CHUNK steps together, and each chunk's
 * per-block partial sums of dB are reduced over blocks in block order before the next chunk; dA and d delta_bias are
 * carried per item and added in batch order. The result does not depend on the number of threads; the scratch is
 * CHUNK floats per work item of a group (about 16 items per thread), whatever the batch size and length.
 *
 * NaN and infinity propagate as in the float64 reference (simd.h: no clamp swallows a NaN, exp(-inf) = 0).
 */
#include <stdlib.h>

#include "api.h"
#include "kernel.h"

/* Steps per chunk of the backward. Long, because the work between two barriers is small (N = 1): every chunk costs
 * two barriers of the thread team, and its partial sums take CHUNK floats per work item. */
#define CHUNK 2048

/* Pointers and per-block constants of one (batch, channel block) work item. */
typedef struct {
    const float *u, *delta, *B;
    int64_t batch, first_channel;
    int lanes;
    vfloat A, A2, bias; /* A2 = A * log2(e) */
} block_view;

INLINE int64_t channel_blocks(const mz_state_scan_args *a) { return ceil_div(a->dim, LANES); }

static block_view make_view(const mz_state_scan_args *a, int64_t item) {
    int64_t n_blocks = channel_blocks(a);
    block_view v;
    v.batch = item / n_blocks;
    v.first_channel = (item % n_blocks) * LANES;
    v.lanes = (int)min_i64(a->dim - v.first_channel, LANES);
    v.u = a->u + v.batch * a->u_batch_stride + v.first_channel;
    v.delta = a->delta + v.batch * a->delta_batch_stride + v.first_channel;
    v.B = a->B + v.batch * a->B_batch_stride;
    v.A = load_lanes(a->A + v.first_channel, v.lanes);
    v.A2 = v.A * LOG2E;
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

/* Delta plus bias: the softplus argument. */
INLINE vfloat biased_delta(const mz_state_scan_args *a, const block_view *v, int64_t t, int lanes) {
    return load_lanes(v->delta + t * a->delta_length_stride, lanes) + v->bias;
}

/* exp(s * A). After a softplus s >= 0, so the argument is <= 0; without it a negative step (a growing state) is
 * allowed too. */
INLINE vfloat decay_of(vfloat s, vfloat A2, int softplus_on) { return exp2_upto(s * A2, !softplus_on); }

/* `softplus_on` and `full` (the block has LANES channels) are compile-time constants in the specialisations. */
INLINE void forward_block(const mz_state_scan_args *a, const block_view *v, const int softplus_on, const int full,
                          float *states) {
    const int lanes = full ? LANES : v->lanes;
    vfloat h = splat(0.0f);
    for (int64_t step = 0; step < a->length; ++step) {
        int64_t t = time_index(a, step);
        vfloat x = biased_delta(a, v, t, lanes);
        vfloat s = softplus_on ? softplus(x) : x;
        vfloat u = load_lanes(v->u + t * a->u_length_stride, lanes);
        h = decay_of(s, v->A2, softplus_on) * h + (s * u) * v->B[t * a->B_length_stride];
        store_lanes(states + row_offset(a, v, t), h, lanes);
    }
}

/* What a work item carries from one chunk to the previous one: the adjoint, the decay of the step after the chunk's
 * last one, and the running sums of dA and d delta_bias. */
typedef struct {
    vfloat adjoint, next_decay, dA, dbias;
} item_carry;

/* Backward through one chunk of one work item: writes du and ddelta of the chunk's steps and the item's per-step
 * partial sums of dB over its channels (part_dB, CHUNK floats in scan order). Steps run backwards in groups of LANES,
 * whose LANES channel sums are reduced together. */
INLINE void backward_chunk(const mz_state_scan_args *a, int64_t item, int64_t chunk, const int softplus_on,
                           const float *states, const float *grad_states, const mz_state_scan_grads *g,
                           item_carry *c, float *part_dB) {
    block_view v = make_view(a, item);
    int64_t start = chunk * CHUNK, end = min_i64(start + CHUNK, a->length);
    vint valid_lanes;
    for (int i = 0; i < LANES; ++i) valid_lanes[i] = i < v.lanes ? -1 : 0;
    for (int64_t first = start + (end - 1 - start) / LANES * LANES; first >= start; first -= LANES) {
        int count = (int)min_i64(end - first, LANES);
        vfloat wB[LANES];
        for (int64_t step = first + count - 1; step >= first; --step) {
            int64_t t = time_index(a, step);
            vfloat x = biased_delta(a, &v, t, v.lanes);
            vfloat s = softplus_on ? softplus(x) : x;
            vfloat u = load_lanes(v.u + t * a->u_length_stride, v.lanes);
            float b = v.B[t * a->B_length_stride];
            vfloat decay = decay_of(s, v.A2, softplus_on);
            vfloat previous = step > 0 ? load_lanes(states + row_offset(a, &v, time_index(a, step - 1)), v.lanes)
                                       : splat(0.0f);
            vfloat adjoint = load_lanes(grad_states + row_offset(a, &v, t), v.lanes) + c->next_decay * c->adjoint;
            vfloat d_log_decay = adjoint * previous * decay;
            vfloat ds = adjoint * u * b + d_log_decay * v.A;
            if (softplus_on) ds *= sigmoid(x);
            c->dA += d_log_decay * s;
            c->dbias += ds;
            wB[step - first] = (vfloat)((vint)(adjoint * s * u) & valid_lanes); /* lanes past dim: not summed */
            store_lanes(g->du + row_offset(a, &v, t), adjoint * s * b, v.lanes);
            store_lanes(g->ddelta + row_offset(a, &v, t), ds, v.lanes);
            c->adjoint = adjoint;
            c->next_decay = decay;
        }
        lane_sums(wB, count, part_dB + (first - start));
    }
}

/* Specialisations for both softplus settings and full / partial channel blocks. */
#define SPECIALISE(NAME, SOFTPLUS)                                                                                  \
    static void forward_##NAME(const mz_state_scan_args *a, int64_t item, float *states) {                          \
        block_view view = make_view(a, item);                                                                      \
        if (view.lanes == LANES) {                                                                                 \
            forward_block(a, &view, SOFTPLUS, 1, states);                                                          \
        } else {                                                                                                   \
            forward_block(a, &view, SOFTPLUS, 0, states);                                                          \
        }                                                                                                          \
    }                                                                                                              \
    static void backward_##NAME(const mz_state_scan_args *a, int64_t item, int64_t chunk, const float *states,      \
                                const float *grad_states, const mz_state_scan_grads *g, item_carry *c,             \
                                float *part_dB) {                                                                  \
        backward_chunk(a, item, chunk, SOFTPLUS, states, grad_states, g, c, part_dB);                              \
    }
SPECIALISE(softplus, 1)
SPECIALISE(linear, 0)

static int valid(const mz_state_scan_args *a) {
    return a->batch >= 0 && a->length >= 0 && a->dim >= 0 && a->n_threads > 0;
}

/* Forward: states (batch, length, dim) contiguous float32. Returns 0, -1 for invalid sizes, -3 when A has a positive
 * entry. */
int MZ_EXPORT(mz_state_scan_forward)(const mz_state_scan_args *a, float *states) {
    if (!valid(a)) return -1;
    for (int64_t i = 0; i < a->dim; ++i)
        if (a->A[i] > 0.0f) return -3;
    void (*run)(const mz_state_scan_args *, int64_t, float *) = a->delta_softplus ? forward_softplus
                                                                                   : forward_linear;
    int64_t items = a->batch * channel_blocks(a);
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) run(a, item, states);
    return 0;
}

/* Add a finished item's running sums to dA and d delta_bias (called for the rows of a block in batch order). */
static void add_carry(const mz_state_scan_args *a, int64_t item, const item_carry *c, const mz_state_scan_grads *g) {
    block_view v = make_view(a, item);
    for (int i = 0; i < v.lanes; ++i) {
        g->dA[v.first_channel + i] += c->dA[i];
        if (g->ddelta_bias) g->ddelta_bias[v.first_channel + i] += c->dbias[i];
    }
}

/* Rows per group: enough work items to keep every thread busy between two barriers. */
static int64_t group_rows(const mz_state_scan_args *a) {
    int64_t rows = ceil_div(16 * (int64_t)a->n_threads, channel_blocks(a));
    return rows < 1 ? 1 : min_i64(rows, a->batch);
}

/* Backward. states and grad_states are (batch, length, dim) contiguous. Gradients are written contiguous: du and
 * ddelta like u, dB (batch, length), dA (dim,), ddelta_bias (dim,) or NULL when there is no bias. Returns 0, -1 for
 * invalid sizes, -2 when memory runs out. */
int MZ_EXPORT(mz_state_scan_backward)(const mz_state_scan_args *a, const float *states, const float *grad_states,
                                      const mz_state_scan_grads *g) {
    if (!valid(a)) return -1;
    if (a->dim == 0) { /* no channel: dB is a sum of nothing */
        if (a->batch * a->length > 0) memset(g->dB, 0, (size_t)(a->batch * a->length) * sizeof(float));
        return 0;
    }
    memset(g->dA, 0, (size_t)a->dim * sizeof(float));
    if (g->ddelta_bias) memset(g->ddelta_bias, 0, (size_t)a->dim * sizeof(float));
    if (a->batch == 0 || a->length == 0) return 0;
    void (*run)(const mz_state_scan_args *, int64_t, int64_t, const float *, const float *,
                const mz_state_scan_grads *, item_carry *, float *) =
        a->delta_softplus ? backward_softplus : backward_linear;
    int n_threads = a->n_threads;
    int64_t n_blocks = channel_blocks(a), rows_per_group = group_rows(a), n_chunks = ceil_div(a->length, CHUNK);
    int64_t group_items = rows_per_group * n_blocks;
    item_carry *carries = aligned_alloc(sizeof(vfloat), (size_t)group_items * sizeof(item_carry));
    float *partials = malloc((size_t)(group_items * CHUNK) * sizeof(float));
    if (!carries || !partials) {
        free(carries);
        free(partials);
        return -2;
    }
#pragma omp parallel num_threads(n_threads)
    {
        for (int64_t first_row = 0; first_row < a->batch; first_row += rows_per_group) {
            int64_t rows = min_i64(rows_per_group, a->batch - first_row), items = rows * n_blocks;
            int64_t first_item = first_row * n_blocks;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < items; ++i) memset(&carries[i], 0, sizeof(item_carry));
            for (int64_t chunk = n_chunks - 1; chunk >= 0; --chunk) {
                int64_t start = chunk * CHUNK, steps = min_i64(CHUNK, a->length - start);
#pragma omp for schedule(static)
                for (int64_t i = 0; i < items; ++i)
                    run(a, first_item + i, chunk, states, grad_states, g, &carries[i], partials + i * CHUNK);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows * steps; ++r) {
                    int64_t row = r / steps, i = r % steps;
                    const float *part = partials + row * n_blocks * CHUNK + i;
                    float sum = 0.0f;
                    for (int64_t block = 0; block < n_blocks; ++block) sum += part[block * CHUNK];
                    g->dB[(first_row + row) * a->length + time_index(a, start + i)] = sum;
                }
            }
#pragma omp for schedule(static)
            for (int64_t block = 0; block < n_blocks; ++block)
                for (int64_t row = 0; row < rows; ++row)
                    add_carry(a, first_item + row * n_blocks + block, &carries[row * n_blocks + block], g);
        }
    }
    free(carries);
    free(partials);
    return 0;
}
