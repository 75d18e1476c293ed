/* Fused selective scan (Mamba S6) for CPUs: forward and backward, plain C with OpenMP, no PyTorch headers.
 *
 * Layout (channels-last): u, delta, z are (batch, length, dim) and B, C are (batch, length, d_state), each with its
 * own batch and length strides in elements (last dimension contiguous; a batch stride of 0 is an expanded view).
 * A is (dim, d_state) contiguous with A <= 0; D and delta_bias are (dim,) contiguous or NULL; z may be NULL.
 * Any of batch, length and dim may be 0.
 *
 * Work is split over (batch x blocks of LANES channels); the channels of a block are the lanes of one vector, so the
 * contraction with C needs no horizontal sums, and the state h[d_state][LANES] stays in registers / L1. The forward
 * stores the state entering every chunk of `chunk_size` steps; the backward re-runs each chunk from it (keeping the
 * chunk's states and decays in a per-thread buffer) and propagates the adjoint of the state in reverse.
 *
 * The backward is deterministic: every gradient summed over channels (dB, dC) or over batch and time (dA, dD,
 * d delta_bias) is added in a fixed order that does not depend on the number of threads, and its scratch memory is
 * bounded (it does not grow with batch x length): batch rows are processed in groups, all work items of a group step
 * through the chunks together, and each chunk's per-block partial sums of dB and dC are reduced over blocks before
 * the next chunk. See docs/native.md.
 */
#include <stdlib.h>

#include "api.h"
#include "kernel.h"

#define MAX_STATE 16
/* Steps whose step sizes are computed ahead of their state updates: the softplus is a long dependency chain that,
 * interleaved with the updates of each step, stalls them (grouping made the forward 1.3x faster, alike for groups of
 * 4 to 16). */
#define STEP_GROUP 8

/* Pointers and per-block constants of one (batch, channel block) work item. */
typedef struct {
    const float *u, *delta, *B, *C, *z;
    int64_t step_u, step_delta, step_B, step_C, step_z;
    int64_t batch, first_channel;
    int lanes, has_skip;
    vfloat skip, bias;
} block_view;

INLINE int64_t channel_blocks(const mz_scan_args *a) { return ceil_div(a->dim, LANES); }

static block_view make_view(const mz_scan_args *a, int64_t item) {
    int64_t n_blocks = channel_blocks(a);
    block_view v;
    v.batch = item / n_blocks;
    v.first_channel = (item % n_blocks) * LANES;
    v.lanes = (int)min_i64(a->dim - v.first_channel, LANES);
    v.u = a->u + v.batch * a->u_batch_stride + v.first_channel;
    v.delta = a->delta + v.batch * a->delta_batch_stride + v.first_channel;
    v.z = a->z ? a->z + v.batch * a->z_batch_stride + v.first_channel : NULL;
    v.B = a->B + v.batch * a->B_batch_stride;
    v.C = a->C + v.batch * a->C_batch_stride;
    v.step_u = a->u_length_stride;
    v.step_delta = a->delta_length_stride;
    v.step_z = a->z_length_stride;
    v.step_B = a->B_length_stride;
    v.step_C = a->C_length_stride;
    v.has_skip = a->D != NULL;
    v.skip = a->D ? load_lanes(a->D + v.first_channel, v.lanes) : splat(0.0f);
    v.bias = a->delta_bias ? load_lanes(a->delta_bias + v.first_channel, v.lanes) : splat(0.0f);
    return v;
}

/* Column n of A for the block's channels, scaled by `scale`. */
INLINE void load_A(const mz_scan_args *a, const block_view *v, int N, float scale, vfloat *out) {
    for (int n = 0; n < N; ++n) {
        out[n] = splat(0.0f);
        for (int i = 0; i < v->lanes; ++i) out[n][i] = a->A[(v->first_channel + i) * N + n] * scale;
    }
}

/* State (N vectors of LANES channels) <-> a (dim, N) slice of a state tensor. */
INLINE void store_state(float *dst, const block_view *v, int N, const vfloat *h) {
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < v->lanes; ++i) dst[(v->first_channel + i) * N + n] = h[n][i];
}

INLINE void load_state(const float *src, const block_view *v, int N, vfloat *h) {
    for (int n = 0; n < N; ++n) {
        h[n] = splat(0.0f);
        for (int i = 0; i < v->lanes; ++i) h[n][i] = src[(v->first_channel + i) * N + n];
    }
}

INLINE int64_t time_index(const mz_scan_args *a, int64_t step) { return a->reverse ? a->length - 1 - step : step; }

/* Step size after bias and softplus (`softplus_on` is a compile-time constant equal to a->delta_softplus). */
INLINE vfloat step_size(const block_view *v, int64_t t, int softplus_on, int lanes) {
    vfloat dt = load_lanes(v->delta + t * v->step_delta, lanes) + v->bias;
    return softplus_on ? softplus(dt) : dt;
}

/* exp(dt * A) from A2 = A * log2(e), with the degree-4 polynomial (relative error 5.4e-6; the FMA it saves is
 * 1 of the 9 per state and 16 channels that bound the scan). After a softplus dt >= 0, so the argument is <= 0;
 * without it a negative step (a growing state) is allowed too. */
INLINE vfloat decay_of(vfloat dt, vfloat A2, int softplus_on) { return exp2_any(dt * A2, !softplus_on, 1); }

/* One step of the recurrence for a block: h_n = exp(dt A_n) h_n + (dt u) B_n for every state n; returns
 * skip_term + sum_n C_n h_n. */
INLINE vfloat update_state(vfloat *h, const vfloat *A2, vfloat dt, vfloat du, const float *Bt, const float *Ct,
                           const int N, const int softplus_on, vfloat skip_term) {
    vfloat acc[2] = {skip_term, splat(0.0f)}; /* two chains halve the latency */
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
        h[n] = decay_of(dt, A2[n], softplus_on) * h[n] + du * Bt[n];
        acc[n & 1] += h[n] * Ct[n];
    }
    return acc[0] + acc[1];
}

/* `full` (a compile-time constant) says the block has LANES channels: its loads and stores then need no lane count. */
INLINE void forward_block(const mz_scan_args *a, const block_view *view, const int N, const int softplus_on,
                          const int full, float *y, float *last_state, float *chunk_states) {
    block_view v = *view;
    const int lanes = full ? LANES : v.lanes;
    vfloat A2[MAX_STATE], h[MAX_STATE];
    load_A(a, &v, N, LOG2E, A2);
    for (int n = 0; n < N; ++n) h[n] = splat(0.0f);
    int64_t n_chunks = ceil_div(a->length, a->chunk_size);
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        store_state(chunk_states + (v.batch * n_chunks + chunk) * a->dim * N, &v, N, h);
        int64_t end = min_i64((chunk + 1) * a->chunk_size, a->length);
        for (int64_t start = chunk * a->chunk_size; start < end; start += STEP_GROUP) {
            int count = (int)min_i64(STEP_GROUP, end - start);
            vfloat dts[STEP_GROUP];
            for (int i = 0; i < count; ++i) dts[i] = step_size(&v, time_index(a, start + i), softplus_on, lanes);
            for (int i = 0; i < count; ++i) {
                int64_t t = time_index(a, start + i);
                vfloat u = load_lanes(v.u + t * v.step_u, lanes);
                vfloat out = update_state(h, A2, dts[i], dts[i] * u, v.B + t * v.step_B, v.C + t * v.step_C, N,
                                          softplus_on, v.has_skip ? v.skip * u : splat(0.0f));
                if (v.z) out *= silu(load_lanes(v.z + t * v.step_z, lanes));
                store_lanes(y + (v.batch * a->length + t) * a->dim + v.first_channel, out, lanes);
            }
        }
    }
    store_state(last_state + v.batch * a->dim * N, &v, N, h);
}

/* Per-thread scratch of the backward: the chunk's states (entering state first), decays and step sizes. */
typedef struct {
    vfloat *states, *decays, *steps;
} thread_scratch;

/* What a work item carries from one chunk to the previous one: the state adjoint and its running sums. */
typedef struct {
    vfloat adj[MAX_STATE], dA[MAX_STATE], dD, dbias;
} item_carry;

/* Re-run one chunk from its entering state (s->states[0..N)), keeping every state, decay and step size. */
INLINE void recompute_chunk(const mz_scan_args *a, const block_view *v, const int N, const int softplus_on,
                            const vfloat *A2, int64_t start, int64_t end, thread_scratch *s) {
    for (int64_t step = start; step < end; ++step) /* all step sizes first (see STEP_GROUP) */
        s->steps[step - start] = step_size(v, time_index(a, step), softplus_on, v->lanes);
    for (int64_t step = start; step < end; ++step) {
        int64_t t = time_index(a, step), i = step - start;
        vfloat dt = s->steps[i];
        vfloat du = dt * load_lanes(v->u + t * v->step_u, v->lanes);
        const float *Bt = v->B + t * v->step_B;
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
            vfloat decay = decay_of(dt, A2[n], softplus_on);
            s->decays[i * N + n] = decay;
            s->states[(i + 1) * N + n] = decay * s->states[i * N + n] + du * Bt[n];
        }
    }
}

/* Backward through one chunk of one work item: writes du, ddelta, dz of the chunk's steps, the item's per-step
 * partial sums of dB and dC over its channels (part_dB/part_dC, chunk_size x N, in scan order), and updates the
 * carried adjoint and running sums. */
INLINE void backward_chunk(const mz_scan_args *a, int64_t item, int64_t chunk, const int N, const int softplus_on,
                           const float *chunk_states, const float *grad_y, const mz_scan_grads *g, item_carry *c,
                           float *part_dB, float *part_dC, thread_scratch *s) {
    block_view v = make_view(a, item);
    vfloat A[MAX_STATE], A2[MAX_STATE], wB[MAX_STATE], wC[MAX_STATE];
    load_A(a, &v, N, 1.0f, A);
    load_A(a, &v, N, LOG2E, A2);
    int64_t n_chunks = ceil_div(a->length, a->chunk_size);
    int64_t start = chunk * a->chunk_size, end = min_i64(start + a->chunk_size, a->length);
    load_state(chunk_states + (v.batch * n_chunks + chunk) * a->dim * N, &v, N, s->states);
    recompute_chunk(a, &v, N, softplus_on, A2, start, end, s);
    vfloat *adj = c->adj, *dA = c->dA;
    vint valid_lanes;
    for (int i = 0; i < LANES; ++i) valid_lanes[i] = i < v.lanes ? -1 : 0;
    for (int64_t step = end - 1; step >= start; --step) {
        int64_t t = time_index(a, step), i = step - start;
        int64_t row = v.batch * a->length + t;
        vfloat dt = s->steps[i];
        vfloat u = load_lanes(v.u + t * v.step_u, v.lanes);
        vfloat dy = load_lanes(grad_y + row * a->dim + v.first_channel, v.lanes);
        vfloat z = splat(0.0f), z_sigmoid = splat(0.0f), dout = dy;
        if (v.z) {
            z = load_lanes(v.z + t * v.step_z, v.lanes);
            z_sigmoid = sigmoid(z);
            dout = dy * (z * z_sigmoid);
        }
        const float *Bt = v.B + t * v.step_B, *Ct = v.C + t * v.step_C;
        vfloat du = dt * u, zero = splat(0.0f);
        vfloat out[2] = {v.has_skip ? v.skip * u : zero, zero}, adj_Bs[2] = {zero, zero}, ddts[2] = {zero, zero};
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) { /* sums over n in two chains each: half the latency */
            vfloat state = s->states[(i + 1) * N + n], previous = s->states[i * N + n];
            vfloat decay = s->decays[i * N + n];
            out[n & 1] += state * Ct[n];
            wC[n] = dout * state;
            adj[n] += dout * Ct[n];
            wB[n] = adj[n] * du;
            adj_Bs[n & 1] += adj[n] * Bt[n];
            vfloat d_log_decay = adj[n] * previous * decay;
            ddts[n & 1] += d_log_decay * A[n];
            dA[n] += d_log_decay * dt;
            adj[n] = decay * adj[n];
        }
        vfloat adj_B = adj_Bs[0] + adj_Bs[1], ddt = ddts[0] + ddts[1] + u * adj_B;
        if (softplus_on) ddt *= sigmoid(load_lanes(v.delta + t * v.step_delta, v.lanes) + v.bias);
        c->dbias += ddt;
        vfloat du_grad = dt * adj_B;
        if (v.has_skip) {
            c->dD += dout * u;
            du_grad += dout * v.skip;
        }
        store_lanes(g->du + row * a->dim + v.first_channel, du_grad, v.lanes);
        store_lanes(g->ddelta + row * a->dim + v.first_channel, ddt, v.lanes);
        if (v.z) {
            vfloat dsilu = z_sigmoid * (1.0f + z * (1.0f - z_sigmoid));
            store_lanes(g->dz + row * a->dim + v.first_channel, dy * (out[0] + out[1]) * dsilu, v.lanes);
        }
        if (v.lanes < LANES) { /* lanes past dim hold 0 * inf = NaN when an input is infinite: leave them out */
            for (int n = 0; n < N; ++n) {
                wB[n] = (vfloat)((vint)wB[n] & valid_lanes);
                wC[n] = (vfloat)((vint)wC[n] & valid_lanes);
            }
        }
        lane_sums(wB, N, part_dB + i * N);
        lane_sums(wC, N, part_dC + i * N);
    }
}

/* Specialisations for common state sizes and both softplus settings (constants let the compiler unroll the state
 * loop and keep the state in registers). */
typedef void (*forward_fn)(const mz_scan_args *, int64_t, float *, float *, float *);
typedef void (*backward_fn)(const mz_scan_args *, int64_t, int64_t, const float *, const float *,
                            const mz_scan_grads *, item_carry *, float *, float *, thread_scratch *);

#define SPECIALISE(NAME, N, SOFTPLUS)                                                                              \
    static void forward_##NAME(const mz_scan_args *a, int64_t item, float *y, float *last, float *chunks) {         \
        block_view view = make_view(a, item);                                                                      \
        if (view.lanes == LANES) {                                                                                 \
            forward_block(a, &view, N, SOFTPLUS, 1, y, last, chunks);                                              \
        } else {                                                                                                   \
            forward_block(a, &view, N, SOFTPLUS, 0, y, last, chunks);                                              \
        }                                                                                                          \
    }                                                                                                              \
    static void backward_##NAME(const mz_scan_args *a, int64_t item, int64_t chunk, const float *chunks,           \
                                const float *gy, const mz_scan_grads *g, item_carry *c, float *pB, float *pC,      \
                                thread_scratch *s) {                                                               \
        backward_chunk(a, item, chunk, N, SOFTPLUS, chunks, gy, g, c, pB, pC, s);                                  \
    }
SPECIALISE(1_softplus, 1, 1)
SPECIALISE(8_softplus, 8, 1)
SPECIALISE(16_softplus, 16, 1)
SPECIALISE(any_softplus, (int)a->d_state, 1)
SPECIALISE(1_linear, 1, 0)
SPECIALISE(8_linear, 8, 0)
SPECIALISE(16_linear, 16, 0)
SPECIALISE(any_linear, (int)a->d_state, 0)

static void pick(const mz_scan_args *a, forward_fn *forward, backward_fn *backward) {
    int64_t N = a->d_state;
    if (a->delta_softplus) {
        *forward = N == 16 ? forward_16_softplus : N == 8 ? forward_8_softplus : N == 1 ? forward_1_softplus
                                                                                        : forward_any_softplus;
        *backward = N == 16 ? backward_16_softplus : N == 8 ? backward_8_softplus : N == 1 ? backward_1_softplus
                                                                                           : backward_any_softplus;
    } else {
        *forward = N == 16 ? forward_16_linear : N == 8 ? forward_8_linear : N == 1 ? forward_1_linear
                                                                                    : forward_any_linear;
        *backward = N == 16 ? backward_16_linear : N == 8 ? backward_8_linear : N == 1 ? backward_1_linear
                                                                                       : backward_any_linear;
    }
}

static int valid(const mz_scan_args *a) {
    return a->batch >= 0 && a->length >= 0 && a->dim >= 0 && a->d_state >= 1 && a->d_state <= MAX_STATE &&
           a->chunk_size > 0 && a->n_threads > 0;
}

/* Largest d_state the kernels support. */
int MZ_EXPORT(mz_scan_max_state)(void) { return MAX_STATE; }

/* Forward: y (batch, length, dim), last_state (batch, dim, d_state) and chunk_states (batch, n_chunks, dim,
 * d_state), all contiguous float32. Returns 0, -1 for invalid sizes, -3 when A has a positive entry. */
int MZ_EXPORT(mz_scan_forward)(const mz_scan_args *a, float *y, float *last_state, float *chunk_states) {
    if (!valid(a)) return -1;
    for (int64_t i = 0; i < a->dim * a->d_state; ++i)
        if (a->A[i] > 0.0f) return -3;
    forward_fn run;
    backward_fn unused;
    pick(a, &run, &unused);
    int64_t items = a->batch * channel_blocks(a);
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) run(a, item, y, last_state, chunk_states);
    return 0;
}

static void init_carry(const mz_scan_args *a, int64_t item, const float *grad_last_state, item_carry *c) {
    block_view v = make_view(a, item);
    int N = (int)a->d_state;
    if (grad_last_state) {
        load_state(grad_last_state + v.batch * a->dim * N, &v, N, c->adj);
    } else {
        for (int n = 0; n < N; ++n) c->adj[n] = splat(0.0f);
    }
    for (int n = 0; n < N; ++n) c->dA[n] = splat(0.0f);
    c->dD = c->dbias = splat(0.0f);
}

/* dB or dC of one step of one batch row: the item partials of that step summed over channel blocks in order. */
static void reduce_step(const float *partials, int64_t first_item, int64_t n_blocks, int64_t item_stride, int N,
                        float *out) {
    for (int n = 0; n < N; ++n) {
        float sum = 0.0f;
        for (int64_t block = 0; block < n_blocks; ++block) sum += partials[(first_item + block) * item_stride + n];
        out[n] = sum;
    }
}

/* Add a finished item's running sums to dA, dD and d delta_bias (called for the rows of a block in batch order). */
static void add_carry(const mz_scan_args *a, int64_t item, const item_carry *c, const mz_scan_grads *g) {
    block_view v = make_view(a, item);
    int N = (int)a->d_state;
    for (int i = 0; i < v.lanes; ++i) {
        int64_t d = v.first_channel + i;
        for (int n = 0; n < N; ++n) g->dA[d * N + n] += c->dA[n][i];
        if (g->dD) g->dD[d] += c->dD[i];
        if (g->ddelta_bias) g->ddelta_bias[d] += c->dbias[i];
    }
}

/* Rows per group: enough work items to keep every thread busy between two barriers. */
static int64_t group_rows(const mz_scan_args *a) {
    int64_t rows = ceil_div(16 * (int64_t)a->n_threads, channel_blocks(a));
    return rows < 1 ? 1 : min_i64(rows, a->batch);
}

/* Backward. grad_y is (batch, length, dim) contiguous; grad_last_state is (batch, dim, d_state) contiguous or NULL.
 * Gradients are written contiguous: du, ddelta, dz like u; dB, dC (batch, length, d_state); dA (dim, d_state);
 * dD, ddelta_bias (dim,). dD, dz and ddelta_bias may be NULL when the input is absent. Returns 0, -1 for invalid
 * sizes, -2 when memory runs out. */
int MZ_EXPORT(mz_scan_backward)(const mz_scan_args *a, const float *chunk_states, const float *grad_y,
                                const float *grad_last_state, const mz_scan_grads *g) {
    if (!valid(a)) return -1;
    int N = (int)a->d_state, n_threads = a->n_threads;
    if (a->dim == 0) { /* no channel: dB and dC are sums of nothing */
        size_t size = (size_t)(a->batch * a->length * N) * sizeof(float);
        if (size) {
            memset(g->dB, 0, size);
            memset(g->dC, 0, size);
        }
        return 0;
    }
    memset(g->dA, 0, (size_t)(a->dim * N) * sizeof(float));
    if (g->dD) memset(g->dD, 0, (size_t)a->dim * sizeof(float));
    if (g->ddelta_bias) memset(g->ddelta_bias, 0, (size_t)a->dim * sizeof(float));
    if (a->batch == 0 || a->length == 0) return 0;
    forward_fn unused;
    backward_fn run;
    pick(a, &unused, &run);
    int64_t n_blocks = channel_blocks(a), rows_per_group = group_rows(a), cs = a->chunk_size;
    int64_t n_chunks = ceil_div(a->length, cs), group_items = rows_per_group * n_blocks;
    int64_t thread_vectors = (2 * cs + 1) * N + cs, part_size = cs * N;
    item_carry *carries = aligned_alloc(sizeof(vfloat), (size_t)group_items * sizeof(item_carry));
    float *partials = malloc((size_t)(2 * group_items * part_size) * sizeof(float));
    vfloat *vectors = aligned_alloc(sizeof(vfloat), (size_t)(thread_vectors * n_threads) * sizeof(vfloat));
    if (!carries || !partials || !vectors) {
        free(carries);
        free(partials);
        free(vectors);
        return -2;
    }
    float *part_dB = partials, *part_dC = partials + group_items * part_size;
#pragma omp parallel num_threads(n_threads)
    {
        vfloat *w = vectors + omp_get_thread_num() * thread_vectors;
        thread_scratch s = {w, w + (cs + 1) * N, w + (2 * cs + 1) * N};
        for (int64_t first_row = 0; first_row < a->batch; first_row += rows_per_group) {
            int64_t rows = min_i64(rows_per_group, a->batch - first_row), items = rows * n_blocks;
            int64_t first_item = first_row * n_blocks;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < items; ++i) init_carry(a, first_item + i, grad_last_state, &carries[i]);
            for (int64_t chunk = n_chunks - 1; chunk >= 0; --chunk) {
                int64_t start = chunk * cs, steps = min_i64(cs, a->length - start);
#pragma omp for schedule(static)
                for (int64_t i = 0; i < items; ++i)
                    run(a, first_item + i, chunk, chunk_states, grad_y, g, &carries[i], part_dB + i * part_size,
                        part_dC + i * part_size, &s);
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows * steps; ++r) {
                    int64_t row = r / steps, i = r % steps;
                    int64_t out = ((first_row + row) * a->length + time_index(a, start + i)) * N;
                    reduce_step(part_dB + i * N, row * n_blocks, n_blocks, part_size, N, g->dB + out);
                    reduce_step(part_dC + i * N, row * n_blocks, n_blocks, part_size, N, g->dC + out);
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
    free(vectors);
    return 0;
}

/* Bidirectional inference scan: Vim's two directions, their sum, gate and scale in one pass over each work item
 * (no autograd, nothing kept for a backward). Each direction computes its step size from the low-rank projection
 * (delta = dt_low_rank @ dt_weight^T, so the (length, dim) delta never exists) and A = -exp(A_log) itself. */
#define MAX_RANK 64

typedef struct {
    const float *u, *dt, *B, *C;
    int64_t step_u, step_dt, step_B, step_C;
    int has_skip;
    vfloat skip, bias, A2[MAX_STATE], W[MAX_RANK];
} direction_view;

/* Lane i of out[k] = src[(first + i) * stride + k] for k < count (an (n_rows, stride) matrix's rows as lanes). */
INLINE void load_transposed(const float *src, int64_t first, int lanes, int64_t stride, int count, vfloat *out) {
    for (int k = 0; k < count; ++k) {
        out[k] = splat(0.0f);
        for (int i = 0; i < lanes; ++i) out[k][i] = src[(first + i) * stride + k];
    }
}

INLINE void make_direction_view(const mz_bidirectional_scan_args *a, const mz_scan_direction *d, int64_t batch,
                              int64_t first_channel, int lanes, direction_view *v) {
    int N = (int)a->d_state, R = (int)a->dt_rank;
    v->u = d->u + batch * d->u_batch_stride + first_channel;
    v->dt = d->dt_low_rank + batch * d->dt_batch_stride;
    v->B = d->B + batch * d->B_batch_stride;
    v->C = d->C + batch * d->C_batch_stride;
    v->step_u = d->u_length_stride;
    v->step_dt = d->dt_length_stride;
    v->step_B = d->B_length_stride;
    v->step_C = d->C_length_stride;
    v->has_skip = d->D != NULL;
    v->skip = d->D ? load_lanes(d->D + first_channel, lanes) : splat(0.0f);
    v->bias = d->dt_bias ? load_lanes(d->dt_bias + first_channel, lanes) : splat(0.0f);
    load_transposed(d->A_log, first_channel, lanes, N, N, v->A2);
    for (int n = 0; n < N; ++n) v->A2[n] = -exp_upto(v->A2[n]) * LOG2E; /* A log2(e), A = -exp(A_log) */
    load_transposed(d->dt_weight, first_channel, lanes, R, R, v->W);
}

/* softplus(dt_bias + dt_low_rank[t] @ dt_weight^T) for the block's channels (four named chains: an indexed array
 * of accumulators would live in memory). */
INLINE vfloat projected_step(const direction_view *v, int64_t t, int R) {
    const float *x = v->dt + t * v->step_dt;
    vfloat s0 = v->bias, s1 = splat(0.0f), s2 = splat(0.0f), s3 = splat(0.0f);
    int r = 0;
    for (; r + 4 <= R; r += 4) {
        s0 += x[r] * v->W[r];
        s1 += x[r + 1] * v->W[r + 1];
        s2 += x[r + 2] * v->W[r + 2];
        s3 += x[r + 3] * v->W[r + 3];
    }
    for (; r < R; ++r) s0 += x[r] * v->W[r];
    return softplus((s0 + s1) + (s2 + s3));
}

/* Time index of the step-th step of a direction (the backward one starts at the end). */
INLINE int64_t directed_time(int64_t length, int backward, int64_t step) { return backward ? length - 1 - step : step; }

/* Whether a work item's channel block has LANES channels. */
INLINE int full_block(int64_t dim, int64_t item) { return dim - (item % ceil_div(dim, LANES)) * LANES >= LANES; }

/* Work item (batch row, channel block): the forward direction writes its output to y, the backward direction runs
 * from the end and replaces it with ((y_forward + y_backward) * SiLU(z)) * scale. */
INLINE void bidirectional_block(const mz_bidirectional_scan_args *a, int64_t item, const int N, const int full,
                                float *y) {
    int64_t n_blocks = ceil_div(a->dim, LANES), batch = item / n_blocks, first = (item % n_blocks) * LANES;
    const int lanes = full ? LANES : (int)min_i64(a->dim - first, LANES), R = (int)a->dt_rank;
    float *out = y + batch * a->length * a->dim + first;
    const float *z = a->z + batch * a->z_batch_stride + first;
    direction_view v;
    vfloat h[MAX_STATE];
    for (int backward = 0; backward < 2; ++backward) {
        make_direction_view(a, backward ? &a->backward : &a->forward, batch, first, lanes, &v);
        for (int n = 0; n < N; ++n) h[n] = splat(0.0f);
        for (int64_t start = 0; start < a->length; start += STEP_GROUP) {
            int count = (int)min_i64(STEP_GROUP, a->length - start);
            vfloat dts[STEP_GROUP];
            for (int i = 0; i < count; ++i)
                dts[i] = projected_step(&v, directed_time(a->length, backward, start + i), R);
            for (int i = 0; i < count; ++i) {
                int64_t t = directed_time(a->length, backward, start + i);
                vfloat u = load_lanes(v.u + t * v.step_u, lanes);
                vfloat y_t = update_state(h, v.A2, dts[i], dts[i] * u, v.B + t * v.step_B, v.C + t * v.step_C, N, 1,
                                          v.has_skip ? v.skip * u : splat(0.0f));
                if (backward)
                    y_t = ((load_lanes(out + t * a->dim, lanes) + y_t) *
                           silu(load_lanes(z + t * a->z_length_stride, lanes))) * a->scale;
                store_lanes(out + t * a->dim, y_t, lanes);
            }
        }
    }
}

#define SPECIALISE_BIDIRECTIONAL(NAME, N)                                                                          \
    static void bidirectional_##NAME(const mz_bidirectional_scan_args *a, int64_t item, float *y) {                \
        if (full_block(a->dim, item)) {                                                                            \
            bidirectional_block(a, item, N, 1, y);                                                                 \
        } else {                                                                                                   \
            bidirectional_block(a, item, N, 0, y);                                                                 \
        }                                                                                                          \
    }
SPECIALISE_BIDIRECTIONAL(16, 16)
SPECIALISE_BIDIRECTIONAL(any, (int)a->d_state)

/* Largest dt_rank mz_scan_bidirectional supports. */
int MZ_EXPORT(mz_scan_max_rank)(void) { return MAX_RANK; }

/* y (batch, length, dim) contiguous = ((scan(forward) + scan(backward, reversed)) * SiLU(z)) * scale, with softplus
 * step sizes. Returns 0, or -1 for invalid sizes. */
int MZ_EXPORT(mz_scan_bidirectional)(const mz_bidirectional_scan_args *a, float *y) {
    if (a->batch < 0 || a->length < 0 || a->dim < 0 || a->d_state < 1 || a->d_state > MAX_STATE || a->dt_rank < 1 ||
        a->dt_rank > MAX_RANK || a->n_threads < 1)
        return -1;
    void (*run)(const mz_bidirectional_scan_args *, int64_t, float *) =
        a->d_state == 16 ? bidirectional_16 : bidirectional_any;
    int64_t items = a->length ? a->batch * ceil_div(a->dim, LANES) : 0;
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) run(a, item, y);
    return 0;
}
