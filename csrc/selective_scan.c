/* Fused selective scan (Mamba S6) for CPUs: forward and backward, plain C with OpenMP, no PyTorch headers.
 *
 * Layout (channels-last): u, delta, z are (batch, length, dim) and B, C are (batch, length, d_state), each with its
 * own batch and length strides in elements (last dimension contiguous; a batch stride of 0 is an expanded view).
 * A is (dim, d_state) contiguous with A <= 0; D and delta_bias are (dim,) contiguous or NULL; z may be NULL.
 *
 * Work is split over (batch x blocks of 16 channels); the 16 channels of a block are the lanes of one vector, so the
 * contraction with C needs no horizontal sums, and the state h[d_state][16] stays in registers / L1. The forward
 * stores the state entering every chunk of `chunk_size` steps; the backward re-runs each chunk from it (keeping the
 * chunk's states and decays in a per-thread buffer) and propagates the adjoint of the state in reverse.
 */
#include <stdlib.h>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

#define MAX_STATE 16

typedef struct {
    int64_t batch, length, dim, d_state, chunk_size;
    const float *u;
    int64_t u_batch_stride, u_length_stride;
    const float *delta;
    int64_t delta_batch_stride, delta_length_stride;
    const float *A;
    const float *B;
    int64_t B_batch_stride, B_length_stride;
    const float *C;
    int64_t C_batch_stride, C_length_stride;
    const float *D;
    const float *z;
    int64_t z_batch_stride, z_length_stride;
    const float *delta_bias;
    int32_t delta_softplus, reverse, n_threads;
} mz_scan_args;

typedef struct {
    float *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *ddelta_bias;
} mz_scan_grads;

/* Pointers and per-block constants of one (batch, channel block) work item. */
typedef struct {
    const float *u, *delta, *B, *C, *z;
    int64_t step_u, step_delta, step_B, step_C, step_z;
    int64_t batch, first_channel;
    int lanes;
    v16 skip, bias;
} block_view;

static block_view make_view(const mz_scan_args *a, int64_t item) {
    int64_t n_blocks = (a->dim + LANES - 1) / LANES;
    block_view v;
    v.batch = item / n_blocks;
    v.first_channel = (item % n_blocks) * LANES;
    v.lanes = (int)(a->dim - v.first_channel < LANES ? a->dim - v.first_channel : LANES);
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
    v.skip = a->D ? load_lanes(a->D + v.first_channel, v.lanes) : splat(0.0f);
    v.bias = a->delta_bias ? load_lanes(a->delta_bias + v.first_channel, v.lanes) : splat(0.0f);
    return v;
}

/* Column n of A for the block's channels, scaled by `scale`. */
INLINE void load_A(const mz_scan_args *a, const block_view *v, int N, float scale, v16 *out) {
    for (int n = 0; n < N; ++n) {
        out[n] = splat(0.0f);
        for (int i = 0; i < v->lanes; ++i) out[n][i] = a->A[(v->first_channel + i) * N + n] * scale;
    }
}

/* State (N vectors of 16 channels) <-> a (dim, N) slice of a state tensor. */
INLINE void store_state(float *dst, const block_view *v, int N, const v16 *h) {
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < v->lanes; ++i) dst[(v->first_channel + i) * N + n] = h[n][i];
}

INLINE void load_state(const float *src, const block_view *v, int N, v16 *h) {
    for (int n = 0; n < N; ++n) {
        h[n] = splat(0.0f);
        for (int i = 0; i < v->lanes; ++i) h[n][i] = src[(v->first_channel + i) * N + n];
    }
}

INLINE int64_t time_index(const mz_scan_args *a, int64_t step) { return a->reverse ? a->length - 1 - step : step; }

/* Step size after bias and softplus. */
INLINE v16 step_size(const mz_scan_args *a, const block_view *v, int64_t t) {
    v16 dt = load_lanes(v->delta + t * v->step_delta, v->lanes) + v->bias;
    return a->delta_softplus ? softplus(dt) : dt;
}

INLINE void forward_block(const mz_scan_args *a, int64_t item, int N, float *y, float *last_state,
                          float *chunk_states) {
    block_view v = make_view(a, item);
    v16 A2[MAX_STATE], h[MAX_STATE];
    load_A(a, &v, N, LOG2E, A2);
    for (int n = 0; n < N; ++n) h[n] = splat(0.0f);
    int64_t n_chunks = (a->length + a->chunk_size - 1) / a->chunk_size;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
        store_state(chunk_states + (v.batch * n_chunks + chunk) * a->dim * N, &v, N, h);
        int64_t end = (chunk + 1) * a->chunk_size < a->length ? (chunk + 1) * a->chunk_size : a->length;
        for (int64_t step = chunk * a->chunk_size; step < end; ++step) {
            int64_t t = time_index(a, step);
            v16 dt = step_size(a, &v, t);
            v16 u = load_lanes(v.u + t * v.step_u, v.lanes);
            v16 du = dt * u;
            const float *Bt = v.B + t * v.step_B, *Ct = v.C + t * v.step_C;
            v16 acc[2] = {v.skip * u, splat(0.0f)}; /* two accumulators halve the dependency chain */
#pragma GCC unroll 16
            for (int n = 0; n < N; ++n) {
                h[n] = exp2_clamped(dt * A2[n]) * h[n] + du * Bt[n];
                acc[n & 1] += h[n] * Ct[n];
            }
            v16 out = acc[0] + acc[1];
            if (v.z) {
                v16 z = load_lanes(v.z + t * v.step_z, v.lanes);
                out *= z * sigmoid(z);
            }
            store_lanes(y + (v.batch * a->length + t) * a->dim + v.first_channel, out, v.lanes);
        }
    }
    store_state(last_state + v.batch * a->dim * N, &v, N, h);
}

/* Per-thread scratch of the backward: the chunk's states (entering state first), decays and step sizes, plus the
 * thread's partial sums of the gradients reduced over batch (dA, dD, ddelta_bias) or channels (dB, dC). */
typedef struct {
    v16 *states, *decays, *steps;
    float *dA, *dD, *ddelta_bias, *dB, *dC;
} thread_scratch;

/* Re-run one chunk from its entering state, keeping every state, decay and step size. */
INLINE void recompute_chunk(const mz_scan_args *a, const block_view *v, int N, const v16 *A2, int64_t start,
                            int64_t end, thread_scratch *s) {
    for (int64_t step = start; step < end; ++step) {
        int64_t t = time_index(a, step), i = step - start;
        v16 dt = step_size(a, v, t);
        v16 du = dt * load_lanes(v->u + t * v->step_u, v->lanes);
        const float *Bt = v->B + t * v->step_B;
        s->steps[i] = dt;
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) {
            v16 decay = exp2_clamped(dt * A2[n]);
            s->decays[i * N + n] = decay;
            s->states[(i + 1) * N + n] = decay * s->states[i * N + n] + du * Bt[n];
        }
    }
}

INLINE void backward_block(const mz_scan_args *a, int64_t item, int N, const float *chunk_states,
                           const float *grad_y, const float *grad_last_state, const mz_scan_grads *g,
                           thread_scratch *s) {
    block_view v = make_view(a, item);
    v16 A[MAX_STATE], A2[MAX_STATE], adj[MAX_STATE], dA[MAX_STATE], wB[LANES], wC[LANES];
    load_A(a, &v, N, 1.0f, A);
    load_A(a, &v, N, LOG2E, A2);
    if (grad_last_state) {
        load_state(grad_last_state + v.batch * a->dim * N, &v, N, adj);
    } else {
        for (int n = 0; n < N; ++n) adj[n] = splat(0.0f);
    }
    for (int n = 0; n < N; ++n) dA[n] = splat(0.0f);
    v16 dD = splat(0.0f), dbias = splat(0.0f);
    int64_t n_chunks = (a->length + a->chunk_size - 1) / a->chunk_size;
    for (int64_t chunk = n_chunks - 1; chunk >= 0; --chunk) {
        int64_t start = chunk * a->chunk_size;
        int64_t end = start + a->chunk_size < a->length ? start + a->chunk_size : a->length;
        load_state(chunk_states + (v.batch * n_chunks + chunk) * a->dim * N, &v, N, s->states);
        recompute_chunk(a, &v, N, A2, start, end, s);
        for (int64_t step = end - 1; step >= start; --step) {
            int64_t t = time_index(a, step), i = step - start;
            int64_t row = v.batch * a->length + t;
            v16 dt = s->steps[i];
            v16 u = load_lanes(v.u + t * v.step_u, v.lanes);
            v16 dy = load_lanes(grad_y + row * a->dim + v.first_channel, v.lanes);
            v16 z = splat(0.0f), z_sigmoid = splat(0.0f), dout = dy;
            if (v.z) {
                z = load_lanes(v.z + t * v.step_z, v.lanes);
                z_sigmoid = sigmoid(z);
                dout = dy * z * z_sigmoid;
            }
            const float *Bt = v.B + t * v.step_B, *Ct = v.C + t * v.step_C;
            v16 du = dt * u, out = v.skip * u, adj_B = splat(0.0f), ddt = splat(0.0f);
#pragma GCC unroll 16
            for (int n = 0; n < N; ++n) {
                v16 state = s->states[(i + 1) * N + n], previous = s->states[i * N + n];
                v16 decay = s->decays[i * N + n];
                out += state * Ct[n];
                wC[n] = dout * state;
                adj[n] += dout * Ct[n];
                wB[n] = adj[n] * du;
                adj_B += adj[n] * Bt[n];
                v16 d_log_decay = adj[n] * previous * decay;
                ddt += d_log_decay * A[n];
                dA[n] += d_log_decay * dt;
                adj[n] = decay * adj[n];
            }
            ddt += u * adj_B;
            if (a->delta_softplus)
                ddt *= sigmoid(load_lanes(v.delta + t * v.step_delta, v.lanes) + v.bias);
            dbias += ddt;
            dD += dout * u;
            store_lanes(g->du + row * a->dim + v.first_channel, dout * v.skip + dt * adj_B, v.lanes);
            store_lanes(g->ddelta + row * a->dim + v.first_channel, ddt, v.lanes);
            if (v.z) {
                v16 dsilu = z_sigmoid * (1.0f + z * (1.0f - z_sigmoid));
                store_lanes(g->dz + row * a->dim + v.first_channel, dy * out * dsilu, v.lanes);
            }
            lane_sums(wB, N, s->dB + row * N);
            lane_sums(wC, N, s->dC + row * N);
        }
    }
    for (int i = 0; i < v.lanes; ++i) {
        int64_t d = v.first_channel + i;
        for (int n = 0; n < N; ++n) s->dA[d * N + n] += dA[n][i];
        s->dD[d] += dD[i];
        s->ddelta_bias[d] += dbias[i];
    }
}

/* Specialisations for common state sizes (constant N lets the compiler unroll and keep the state in registers). */
#define SPECIALISE(N)                                                                                              \
    static void forward_block_##N(const mz_scan_args *a, int64_t item, float *y, float *last, float *chunks) {    \
        forward_block(a, item, N, y, last, chunks);                                                              \
    }                                                                                                            \
    static void backward_block_##N(const mz_scan_args *a, int64_t item, const float *chunks, const float *gy,    \
                                   const float *glast, const mz_scan_grads *g, thread_scratch *s) {             \
        backward_block(a, item, N, chunks, gy, glast, g, s);                                                     \
    }
SPECIALISE(1)
SPECIALISE(4)
SPECIALISE(8)
SPECIALISE(16)

static void forward_block_any(const mz_scan_args *a, int64_t item, float *y, float *last, float *chunks) {
    forward_block(a, item, (int)a->d_state, y, last, chunks);
}

static void backward_block_any(const mz_scan_args *a, int64_t item, const float *chunks, const float *gy,
                               const float *glast, const mz_scan_grads *g, thread_scratch *s) {
    backward_block(a, item, (int)a->d_state, chunks, gy, glast, g, s);
}

typedef void (*forward_fn)(const mz_scan_args *, int64_t, float *, float *, float *);
typedef void (*backward_fn)(const mz_scan_args *, int64_t, const float *, const float *, const float *,
                            const mz_scan_grads *, thread_scratch *);

static int valid(const mz_scan_args *a) {
    return a->batch > 0 && a->length > 0 && a->dim > 0 && a->d_state >= 1 && a->d_state <= MAX_STATE &&
           a->chunk_size > 0 && a->n_threads > 0;
}

/* Largest d_state the kernels support. */
int mz_scan_max_state(void) { return MAX_STATE; }

/* Forward: y (batch, length, dim), last_state (batch, dim, d_state) and chunk_states (batch, n_chunks, dim,
 * d_state), all contiguous float32. Returns 0, or -1 for invalid sizes. */
int mz_scan_forward(const mz_scan_args *a, float *y, float *last_state, float *chunk_states) {
    if (!valid(a)) return -1;
    forward_fn run = a->d_state == 16 ? forward_block_16
                   : a->d_state == 8  ? forward_block_8
                   : a->d_state == 4  ? forward_block_4
                   : a->d_state == 1  ? forward_block_1
                                      : forward_block_any;
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel for schedule(static) num_threads(a->n_threads)
    for (int64_t item = 0; item < items; ++item) run(a, item, y, last_state, chunk_states);
    return 0;
}

/* Sum the per-thread partial buffers (each `size` floats, `parts` of them) into dst. */
static void reduce_partials(float *dst, const float *partials, int64_t size, int parts, int64_t part_stride,
                            int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t i = 0; i < size; ++i) {
        float sum = 0.0f;
        for (int p = 0; p < parts; ++p) sum += partials[p * part_stride + i];
        dst[i] = sum;
    }
}

/* Backward. grad_y is (batch, length, dim) contiguous; grad_last_state is (batch, dim, d_state) contiguous or NULL.
 * Gradients are written contiguous: du, ddelta, dz like u; dB, dC (batch, length, d_state); dA (dim, d_state);
 * dD, ddelta_bias (dim,). dD, dz and ddelta_bias may be NULL when the input is absent. Returns 0, -1 for invalid
 * sizes, -2 when memory runs out. */
int mz_scan_backward(const mz_scan_args *a, const float *chunk_states, const float *grad_y,
                     const float *grad_last_state, const mz_scan_grads *g) {
    if (!valid(a)) return -1;
    int N = (int)a->d_state, n_threads = a->n_threads;
    backward_fn run = N == 16 ? backward_block_16
                    : N == 8  ? backward_block_8
                    : N == 4  ? backward_block_4
                    : N == 1  ? backward_block_1
                              : backward_block_any;
    int64_t seq = a->batch * a->length * N, per_thread = 2 * seq + a->dim * N + 2 * a->dim;
    int64_t scratch_vectors = (2 * a->chunk_size + 1) * N + a->chunk_size;
    float *partials = calloc((size_t)(per_thread * n_threads), sizeof(float));
    v16 *vectors = aligned_alloc(64, (size_t)(scratch_vectors * n_threads) * sizeof(v16));
    if (!partials || !vectors) {
        free(partials);
        free(vectors);
        return -2;
    }
    int64_t items = a->batch * ((a->dim + LANES - 1) / LANES);
#pragma omp parallel num_threads(n_threads)
    {
        int thread = omp_get_thread_num();
        float *p = partials + thread * per_thread;
        v16 *w = vectors + thread * scratch_vectors;
        thread_scratch s = {w, w + (a->chunk_size + 1) * N, w + (2 * a->chunk_size + 1) * N,
                            p + 2 * seq, p + 2 * seq + a->dim * N, p + 2 * seq + a->dim * N + a->dim, p, p + seq};
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) run(a, item, chunk_states, grad_y, grad_last_state, g, &s);
    }
    reduce_partials(g->dB, partials, seq, n_threads, per_thread, n_threads);
    reduce_partials(g->dC, partials + seq, seq, n_threads, per_thread, n_threads);
    reduce_partials(g->dA, partials + 2 * seq, a->dim * N, n_threads, per_thread, n_threads);
    if (g->dD) reduce_partials(g->dD, partials + 2 * seq + a->dim * N, a->dim, n_threads, per_thread, n_threads);
    if (g->ddelta_bias)
        reduce_partials(g->ddelta_bias, partials + 2 * seq + a->dim * N + a->dim, a->dim, n_threads, per_thread,
                        n_threads);
    free(partials);
    free(vectors);
    return 0;
}
