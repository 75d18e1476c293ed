/* The argument structs of the native entry points (mz_scan_*, mz_state_scan_*, mz_conv_*, mz_rms_norm, mz_gated_sum),
 * shared by the kernel sources and tests/aarch64/check_portable.c; mambazoo/ops/native.py mirrors them with ctypes.
 * Strides are in elements; the last dimension of every tensor is contiguous.
 */
#ifndef MAMBAZOO_API_H
#define MAMBAZOO_API_H

#include <stdint.h>

/* Selective scan (csrc/selective_scan.c). */
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

/* Bidirectional inference scan (csrc/selective_scan.c, mz_scan_bidirectional): one direction in Mamba's
 * parametrisation, delta = dt_low_rank @ dt_weight^T (dt_weight (dim, dt_rank) contiguous) and A = -exp(A_log). */
typedef struct {
    const float *u;
    int64_t u_batch_stride, u_length_stride;
    const float *dt_low_rank;
    int64_t dt_batch_stride, dt_length_stride;
    const float *dt_weight;
    const float *dt_bias; /* (dim,) or NULL */
    const float *A_log;   /* (dim, d_state) contiguous */
    const float *B;
    int64_t B_batch_stride, B_length_stride;
    const float *C;
    int64_t C_batch_stride, C_length_stride;
    const float *D; /* (dim,) or NULL */
} mz_scan_direction;

typedef struct {
    int64_t batch, length, dim, d_state, dt_rank;
    mz_scan_direction forward, backward;
    const float *z;
    int64_t z_batch_stride, z_length_stride;
    float scale;
    int32_t n_threads;
} mz_bidirectional_scan_args;

/* All-states scan (csrc/state_scan.c). */
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

/* Causal depthwise conv1d (csrc/causal_conv1d.c). */
typedef struct {
    int64_t batch, length, dim, kernel_size;
    const float *x;
    int64_t x_batch_stride, x_length_stride;
    const float *weight;
    const float *bias;
    int32_t silu, reverse, n_threads;
} mz_conv_args;

/* Inference epilogues (csrc/pointwise.c); every tensor contiguous. */
typedef struct {
    int64_t rows, dim;
    const float *x;
    const float *weight; /* (dim,) or NULL */
    float eps;
    int32_t n_threads;
} mz_rms_norm_args;

typedef struct {
    int64_t numel;
    const float *a;
    const float *b; /* or NULL */
    const float *z;
    float scale;
    int32_t n_threads;
} mz_gated_sum_args;

#endif
