/* Runs the portable kernels of an aarch64 build of libmambazoo_native.so (under QEMU on x86 machines) against
 * scalar double-precision references of the scan, the bidirectional scan, the all-states scan, the conv, the RMSNorm
 * and the gate; exits non-zero when they disagree. See .ci/aarch64-check and docs/native.md.
 * Usage: check_portable path/to/libmambazoo_native.so */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "api.h" /* csrc/: the kernels' argument structs */

enum { BATCH = 2, LENGTH = 150, DIM = 37, STATES = 16, TAPS = 4, CHUNK = 64 };

static float uniform(void) { return (float)rand() / RAND_MAX * 2.0f - 1.0f; }

static float *random_floats(int count, float scale, float offset) {
    float *values = malloc(sizeof(float) * count);
    for (int i = 0; i < count; ++i) values[i] = offset + scale * uniform();
    return values;
}

/* Max |error| / max |reference| of the scan with D, z gate, delta_bias and softplus, in one direction. */
static double scan_error(int (*forward)(const mz_scan_args *, float *, float *, float *), int reverse) {
    float *u = random_floats(BATCH * LENGTH * DIM, 1, 0), *delta = random_floats(BATCH * LENGTH * DIM, 0.5f, 0);
    float *z = random_floats(BATCH * LENGTH * DIM, 1, 0), *B = random_floats(BATCH * LENGTH * STATES, 1, 0);
    float *C = random_floats(BATCH * LENGTH * STATES, 1, 0), *D = random_floats(DIM, 0.1f, 1);
    float *bias = random_floats(DIM, 1, -3), *A = malloc(sizeof(float) * DIM * STATES);
    for (int i = 0; i < DIM * STATES; ++i) A[i] = -(float)(i % STATES + 1) * (1 + 0.1f * uniform());
    float *y = malloc(sizeof(float) * BATCH * LENGTH * DIM), *last = malloc(sizeof(float) * BATCH * DIM * STATES);
    float *chunks = malloc(sizeof(float) * BATCH * ((LENGTH + CHUNK - 1) / CHUNK) * DIM * STATES);
    mz_scan_args a = {BATCH, LENGTH, DIM, STATES, CHUNK, u, LENGTH * DIM, DIM, delta, LENGTH * DIM, DIM, A, B,
                   LENGTH * STATES, STATES, C, LENGTH * STATES, STATES, D, z, LENGTH * DIM, DIM, bias, 1, reverse, 2};
    if (forward(&a, y, last, chunks) != 0) return INFINITY;
    double worst = 0, largest = 0;
    for (int b = 0; b < BATCH; ++b) {
        for (int d = 0; d < DIM; ++d) {
            double h[STATES] = {0};
            for (int step = 0; step < LENGTH; ++step) {
                int t = reverse ? LENGTH - 1 - step : step, row = b * LENGTH + t;
                double x = delta[row * DIM + d] + bias[d], dt = x > 20 ? x : log1p(exp(x)), ut = u[row * DIM + d];
                double out = D[d] * ut, zt = z[row * DIM + d];
                for (int n = 0; n < STATES; ++n) {
                    h[n] = exp(dt * A[d * STATES + n]) * h[n] + dt * ut * B[row * STATES + n];
                    out += h[n] * C[row * STATES + n];
                }
                out *= zt / (1 + exp(-zt));
                worst = fmax(worst, fabs(out - y[row * DIM + d]));
                largest = fmax(largest, fabs(out));
            }
        }
    }
    return worst / largest;
}

/* Max |error| / max |reference| of the bidirectional inference scan (rank-RANK step projection, A = -exp(A_log),
 * both directions summed, gated by SiLU(z) and halved). */
enum { RANK = 5 };

static mz_scan_direction random_direction(void) {
    float *projected = random_floats(BATCH * LENGTH * (RANK + 2 * STATES), 1, 0);
    float *A_log = malloc(sizeof(float) * DIM * STATES);
    for (int i = 0; i < DIM * STATES; ++i) A_log[i] = logf((float)(i % STATES + 1)) + 0.3f * uniform();
    int64_t row = RANK + 2 * STATES;
    mz_scan_direction d = {random_floats(BATCH * LENGTH * DIM, 1, 0), LENGTH * DIM, DIM, projected, LENGTH * row, row,
                           random_floats(DIM * RANK, 0.5f, 0), random_floats(DIM, 1, -3), A_log, projected + RANK,
                           LENGTH * row, row, projected + RANK + STATES, LENGTH * row, row,
                           random_floats(DIM, 0.1f, 1)};
    return d;
}

/* Output of one direction for channel d of batch row b at every step, in double. */
static void direction_reference(const mz_scan_direction *s, int b, int d, int reverse, double *out) {
    double h[STATES] = {0};
    for (int step = 0; step < LENGTH; ++step) {
        int t = reverse ? LENGTH - 1 - step : step;
        const float *x = s->dt_low_rank + b * s->dt_batch_stride + t * s->dt_length_stride;
        const float *B = s->B + b * s->B_batch_stride + t * s->B_length_stride;
        const float *C = s->C + b * s->C_batch_stride + t * s->C_length_stride;
        double pre = s->dt_bias[d], ut = s->u[b * s->u_batch_stride + t * s->u_length_stride + d];
        for (int r = 0; r < RANK; ++r) pre += (double)x[r] * s->dt_weight[d * RANK + r];
        double dt = pre > 20 ? pre : log1p(exp(pre)), y = s->D[d] * ut;
        for (int n = 0; n < STATES; ++n) {
            h[n] = exp(-dt * exp(s->A_log[d * STATES + n])) * h[n] + dt * ut * B[n];
            y += h[n] * C[n];
        }
        out[t] = y;
    }
}

static double bidirectional_error(int (*scan)(const mz_bidirectional_scan_args *, float *)) {
    float *z = random_floats(BATCH * LENGTH * DIM, 1, 0), *y = malloc(sizeof(float) * BATCH * LENGTH * DIM);
    mz_bidirectional_scan_args a = {BATCH, LENGTH, DIM, STATES, RANK, random_direction(), random_direction(), z,
                                    LENGTH * DIM, DIM, 0.5f, 2};
    if (scan(&a, y) != 0) return INFINITY;
    double worst = 0, largest = 0, forward[LENGTH], backward[LENGTH];
    for (int b = 0; b < BATCH; ++b) {
        for (int d = 0; d < DIM; ++d) {
            direction_reference(&a.forward, b, d, 0, forward);
            direction_reference(&a.backward, b, d, 1, backward);
            for (int t = 0; t < LENGTH; ++t) {
                int i = (b * LENGTH + t) * DIM + d;
                double out = (forward[t] + backward[t]) * z[i] / (1 + exp(-z[i])) * 0.5;
                worst = fmax(worst, fabs(out - y[i]));
                largest = fmax(largest, fabs(out));
            }
        }
    }
    return worst / largest;
}

/* Max |error| / max |reference| of every state of the all-states scan (N = 1) with delta_bias and softplus. */
static double state_scan_error(int (*forward)(const mz_state_scan_args *, float *), int reverse) {
    float *u = random_floats(BATCH * LENGTH * DIM, 1, 0), *delta = random_floats(BATCH * LENGTH * DIM, 0.5f, 0);
    float *B = random_floats(BATCH * LENGTH, 1, 0), *bias = random_floats(DIM, 1, -3);
    float *A = random_floats(DIM, 0.5f, -1); /* in [-1.5, -0.5] */
    float *states = malloc(sizeof(float) * BATCH * LENGTH * DIM);
    mz_state_scan_args a = {BATCH, LENGTH, DIM, u, LENGTH * DIM, DIM, delta, LENGTH * DIM, DIM, A, B, LENGTH, 1, bias,
                         1, reverse, 2};
    if (forward(&a, states) != 0) return INFINITY;
    double worst = 0, largest = 0;
    for (int b = 0; b < BATCH; ++b) {
        for (int d = 0; d < DIM; ++d) {
            double h = 0;
            for (int step = 0; step < LENGTH; ++step) {
                int t = reverse ? LENGTH - 1 - step : step, row = b * LENGTH + t;
                double x = delta[row * DIM + d] + bias[d], dt = x > 20 ? x : log1p(exp(x));
                h = exp(dt * A[d]) * h + dt * u[row * DIM + d] * B[row];
                worst = fmax(worst, fabs(h - states[row * DIM + d]));
                largest = fmax(largest, fabs(h));
            }
        }
    }
    return worst / largest;
}

/* Max |error| / max |reference| of the conv with bias and SiLU. */
static double conv_error(int (*forward)(const mz_conv_args *, float *)) {
    float *x = random_floats(BATCH * LENGTH * DIM, 1, 0), *weight = random_floats(DIM * TAPS, 1, 0);
    float *bias = random_floats(DIM, 1, 0), *y = malloc(sizeof(float) * BATCH * LENGTH * DIM);
    mz_conv_args a = {BATCH, LENGTH, DIM, TAPS, x, LENGTH * DIM, DIM, weight, bias, 1, 0, 2};
    if (forward(&a, y) != 0) return INFINITY;
    double worst = 0, largest = 0;
    for (int b = 0; b < BATCH; ++b) {
        for (int t = 0; t < LENGTH; ++t) {
            for (int d = 0; d < DIM; ++d) {
                double out = bias[d];
                for (int k = 0; k < TAPS; ++k) {
                    int source = t - TAPS + 1 + k;
                    if (source >= 0) out += weight[d * TAPS + k] * x[(b * LENGTH + source) * DIM + d];
                }
                out /= 1 + exp(-out);
                worst = fmax(worst, fabs(out - y[(b * LENGTH + t) * DIM + d]));
                largest = fmax(largest, fabs(out));
            }
        }
    }
    return worst / largest;
}

/* Max |error| / max |reference| of the RMSNorm with a weight over BATCH * LENGTH rows of DIM floats. */
static double rms_norm_error(int (*forward)(const mz_rms_norm_args *, float *)) {
    int rows = BATCH * LENGTH;
    float *x = random_floats(rows * DIM, 1, 0), *weight = random_floats(DIM, 1, 0);
    float *y = malloc(sizeof(float) * rows * DIM);
    mz_rms_norm_args a = {rows, DIM, x, weight, 1e-5f, 2};
    if (forward(&a, y) != 0) return INFINITY;
    double worst = 0, largest = 0;
    for (int r = 0; r < rows; ++r) {
        double squares = 0;
        for (int d = 0; d < DIM; ++d) squares += (double)x[r * DIM + d] * x[r * DIM + d];
        double scale = 1 / sqrt(squares / DIM + 1e-5);
        for (int d = 0; d < DIM; ++d) {
            double out = x[r * DIM + d] * scale * weight[d];
            worst = fmax(worst, fabs(out - y[r * DIM + d]));
            largest = fmax(largest, fabs(out));
        }
    }
    return worst / largest;
}

/* Max |error| / max |reference| of ((a + b) * silu(z)) / 2 over BATCH * LENGTH * DIM floats. */
static double gated_sum_error(int (*forward)(const mz_gated_sum_args *, float *)) {
    int numel = BATCH * LENGTH * DIM;
    float *a = random_floats(numel, 4, 0), *b = random_floats(numel, 4, 0), *z = random_floats(numel, 4, 0);
    float *y = malloc(sizeof(float) * numel);
    mz_gated_sum_args args = {numel, a, b, z, 0.5f, 2};
    if (forward(&args, y) != 0) return INFINITY;
    double worst = 0, largest = 0;
    for (int i = 0; i < numel; ++i) {
        double out = ((double)a[i] + b[i]) * z[i] / (1 + exp(-(double)z[i])) * 0.5;
        worst = fmax(worst, fabs(out - y[i]));
        largest = fmax(largest, fabs(out));
    }
    return worst / largest;
}

int main(int argc, char **argv) {
    void *library = argc > 1 ? dlopen(argv[1], RTLD_NOW) : NULL;
    if (!library) {
        fprintf(stderr, "usage: %s libmambazoo_native.so (%s)\n", argv[0], argc > 1 ? dlerror() : "no path");
        return 2;
    }
    const char *(*build)(void) = (const char *(*)(void))dlsym(library, "mz_build_info");
    const char *(*isas)(void) = (const char *(*)(void))dlsym(library, "mz_compiled_isas");
    int (*scan)(const mz_scan_args *, float *, float *, float *) =
        (int (*)(const mz_scan_args *, float *, float *, float *))dlsym(library, "mz_scan_forward_portable");
    int (*states)(const mz_state_scan_args *, float *) =
        (int (*)(const mz_state_scan_args *, float *))dlsym(library, "mz_state_scan_forward_portable");
    int (*conv)(const mz_conv_args *, float *) = (int (*)(const mz_conv_args *, float *))dlsym(library,
                                                                                           "mz_conv_forward_portable");
    int (*rms)(const mz_rms_norm_args *, float *) =
        (int (*)(const mz_rms_norm_args *, float *))dlsym(library, "mz_rms_norm_portable");
    int (*gate)(const mz_gated_sum_args *, float *) =
        (int (*)(const mz_gated_sum_args *, float *))dlsym(library, "mz_gated_sum_portable");
    int (*bidirectional)(const mz_bidirectional_scan_args *, float *) =
        (int (*)(const mz_bidirectional_scan_args *, float *))dlsym(library, "mz_scan_bidirectional_portable");
    if (!build || !isas || !scan || !states || !conv || !rms || !gate || !bidirectional) {
        fprintf(stderr, "missing entry points in %s\n", argv[1]);
        return 2;
    }
    double errors[8] = {scan_error(scan, 0), scan_error(scan, 1), conv_error(conv), state_scan_error(states, 0),
                        state_scan_error(states, 1), rms_norm_error(rms), gated_sum_error(gate),
                        bidirectional_error(bidirectional)};
    printf("%s; ISAs: %s\n", build(), isas());
    printf("scan forward (B%d L%d D%d N%d), relative error: %.2e forward, %.2e reverse\n", BATCH, LENGTH, DIM, STATES,
           errors[0], errors[1]);
    printf("conv forward (K%d, SiLU), relative error: %.2e\n", TAPS, errors[2]);
    printf("all-states scan forward (B%d L%d D%d), relative error: %.2e forward, %.2e reverse\n", BATCH, LENGTH, DIM,
           errors[3], errors[4]);
    printf("RMSNorm (%d rows of %d), relative error: %.2e\n", BATCH * LENGTH, DIM, errors[5]);
    printf("gated sum, relative error: %.2e\n", errors[6]);
    printf("bidirectional scan (rank %d), relative error: %.2e\n", RANK, errors[7]);
    return errors[0] < 2e-5 && errors[1] < 2e-5 && errors[2] < 1e-5 && errors[3] < 2e-5 && errors[4] < 2e-5 &&
                   errors[5] < 1e-5 && errors[6] < 1e-5 && errors[7] < 2e-5
               ? 0
               : 1;
}
