/* Runs every exported kernel of one instruction set's file (linked with it) on deterministic inputs and writes the
 * outputs to stdout, so that two builds can be compared output by output: tests/test_kernel_builds.py builds this
 * with avx2.c natively (also for AVX-VNNI), with avx512.c (natively or emulated) and with neon.c for AArch64 (run
 * under qemu-user), and compares.
 *
 * The inputs come from the driver's own LCG and plain IEEE arithmetic (no libc rand, no libm beyond sqrtf, which
 * is correctly rounded), so both builds see the same bits. Output: a record per output array, a 64-byte header
 * (name, 48 bytes NUL-padded; int32 1 if bf16 else fp32; int32 1 if it must be bitwise equal; int64 element count)
 * then the raw little-endian values. The first record is named "isa:<qk_isa()>" and has no values. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *qk_isa(void);
void qk_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads);
void qk_gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K, int nthreads);
void qk_gemv_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads);
void qk_dequant_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, int64_t r0, int64_t r1, int64_t K,
                     void *out, int out_bf16, int nthreads);
void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads);
void qk_dequant_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, int64_t Np, int64_t t0, int64_t t1,
                     int64_t K, void *out, int out_bf16, int nthreads);
void qk_rmsnorm(const void *x, int64_t ld, const void *w, int w_bf16, float eps, void *out, int act_bf16, int64_t M,
                int64_t D, int nthreads);
void qk_gdn_decode(const void *qkv, void *conv_state, const void *conv_w, int64_t Kc, const void *a, const void *bp,
                   const void *A_log, const void *dt_bias, float *state, const void *z, const void *norm_w, float eps,
                   void *out, int act_bf16, int w_bf16, int64_t B, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                   int nthreads);
void qk_attn_decode(const void *qg, const void *kx, const void *vx, const void *q_w, const void *k_w, float eps,
                    const void *cos, const void *sin, int64_t R, const int64_t *pos, void *kc, void *vc, void *out,
                    int gated, int act_bf16, int w_bf16, int64_t B, int64_t H, int64_t Hkv, int64_t Tmax, int64_t D,
                    int nthreads);
void qk_conv_silu(const void *x, void *state, const void *w, float *out, int act_bf16, int w_bf16, int64_t B,
                  int64_t T, int64_t C, int64_t Kc, int nthreads);
void qk_delta_rule(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                   float *o, int64_t B, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nthreads);
struct qk_model;
int qk_decode_step(const struct qk_model *m, void *x, void *logits, int nthreads);
int qk_rewind(const struct qk_model *m, const int64_t *keep, int nthreads);
int qk_draft(const struct qk_model *m, void *x, const struct qk_linear *embed, int64_t *tokens, void *logits,
             int64_t n, int64_t count, int nthreads);
float qk_read(const float *p, int64_t n, int nthreads);

#define THREADS 2 /* OpenMP on, in the calls big enough for threads_for to split */

/* ------------------------------------------------------------------------------------------------------------ */
/* inputs and outputs */

#define SEED 0x853c49e6748fea9bull
static uint64_t lcg = SEED;

/* uniform in [-1, 1), a multiple of 2^-23: exact in fp32 */
static float uniform(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(int32_t)(lcg >> 40) / 8388608.0f - 1.0f;
}

static void *alloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) {
        fprintf(stderr, "kernels_driver: out of memory\n");
        exit(2);
    }
    return p;
}

/* n fp32 values as bf16 (each one's high half: the same bits everywhere), in place when bf, else unchanged */
static void *narrow(float *f, int64_t n, int bf) {
    for (int64_t i = 0; bf && i < n; i++) {
        uint32_t u;
        memcpy(&u, f + i, 4);
        ((uint16_t *)f)[i] = (uint16_t)(u >> 16); /* bytes 2i, 2i + 1: of a value already read */
    }
    return f;
}

/* n values of scale * uniform + offset, as fp32 or bf16 */
static void *values(int64_t n, int bf, float scale, float offset) {
    float *f = alloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) f[i] = uniform() * scale + offset;
    return narrow(f, n, bf);
}

static void emit(const char *name, const void *p, int64_t n, int bf, int exact) {
    char head[48] = {0};
    strncpy(head, name, sizeof head - 1);
    const int32_t flags[2] = {bf, exact};
    fwrite(head, 1, sizeof head, stdout);
    fwrite(flags, 4, 2, stdout);
    fwrite(&n, 8, 1, stdout);
    if (n) fwrite(p, bf ? 2 : 4, (size_t)n, stdout);
}

static const char *dt(int bf) { return bf ? "bf16" : "f32"; }

/* ------------------------------------------------------------------------------------------------------------ */
/* GEMVs and dequantization: real shapes (the 0.8B's K = 1024, N cut to 384 to keep qemu quick) and awkward ones */

static const int ROWS[] = {1, 3, 5, 8};

static void gemv_float_cases(void) {
    static const int64_t shapes[][2] = {{1024, 384}, {100, 96}, {33, 7}, {1, 5}, {64, 1}}; /* K, N */
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int64_t K = shapes[c][0], N = shapes[c][1];
        for (int bf = 0; bf < 2; bf++) {
            void *W = values(N * K, bf, 1.0f, 0.0f);
            for (size_t r = 0; r < 4; r++) {
                const int64_t M = ROWS[r];
                void *x = values(M * K, bf, 1.0f, 0.0f), *y = alloc((size_t)(M * N) * 4);
                if (bf) qk_gemv_bf16(W, x, y, M, N, K, THREADS);
                else qk_gemv_f32(W, x, y, M, N, K, THREADS);
                char name[48];
                snprintf(name, sizeof name, "gemv_%s K%lld N%lld M%lld", dt(bf), (long long)K, (long long)N, (long long)M);
                emit(name, y, M * N, bf, 0);
                free(x);
                free(y);
            }
            free(W);
        }
    }
}

/* bf16 activations of 5 rows with an inf in row 1 and a NaN in row 3: those rows' outputs must be NaN, the others'
 * untouched. NaNs are made one bit pattern (a NaN's sign and payload are not part of the contract). */
static void *bad_rows(int64_t K) {
    uint16_t *x = values(5 * K, 1, 1.0f, 0.0f);
    x[1 * K + K / 2] = 0x7f80;     /* +inf */
    x[3 * K + K / 3 + 1] = 0x7fc1; /* a NaN */
    return x;
}

static void emit_bad(const char *name, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if ((y[i] & 0x7fff) > 0x7f80) y[i] = 0x7fc0;
    emit(name, y, n, 1, 1);
}

static void int8_cases(void) {
    static const int64_t shapes[][2] = {{1024, 384}, {96, 100}, {16, 5}, {160, 48}};
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int64_t K = shapes[c][0], N = shapes[c][1];
        const int64_t groups[] = {16, 32, K};
        int8_t *q = alloc((size_t)(N * K));
        for (int64_t i = 0; i < N * K; i++) q[i] = (int8_t)(int)(uniform() * 127.0f);
        for (int g = 0; g < 3; g++) {
            const int64_t G = groups[g];
            if (K % G) continue;
            for (int bf = 0; bf < 2; bf++) { /* activations, scales and outputs in one dtype, as the model has them */
                void *s = values(N * (K / G), bf, 0.005f, 0.01f);
                for (size_t r = 0; r < 4; r++) {
                    const int64_t M = ROWS[r];
                    void *x = values(M * K, bf, 1.0f, 0.0f), *y = alloc((size_t)(M * N) * 4);
                    qk_gemv_int8(q, s, bf, G, x, bf, y, bf, M, N, K, THREADS);
                    char name[48];
                    snprintf(name, sizeof name, "int8_%s K%lld N%lld G%lld M%lld", dt(bf), (long long)K, (long long)N,
                             (long long)G, (long long)M);
                    emit(name, y, M * N, bf, bf); /* bf16: integers, then the same fp32 steps */
                    free(x);
                    free(y);
                }
                for (int obf = 0; obf < 2; obf++) {
                    const int64_t r0 = N / 3;
                    void *w = alloc((size_t)((N - r0) * K) * 4);
                    qk_dequant_int8(q, s, bf, G, r0, N, K, w, obf, THREADS);
                    char name[48];
                    snprintf(name, sizeof name, "dequant_int8 s%s %s K%lld N%lld G%lld", dt(bf), dt(obf), (long long)K,
                             (long long)N, (long long)G);
                    emit(name, w, (N - r0) * K, obf, 1);
                    free(w);
                }
                free(s);
            }
        }
        if (K == 96) { /* inf and NaN, one scale per row */
            void *s = values(N, 1, 0.005f, 0.01f), *x = bad_rows(K), *y = alloc((size_t)(5 * N) * 2);
            qk_gemv_int8(q, s, 1, K, x, 1, y, 1, 5, N, K, THREADS);
            emit_bad("int8_bf16 inf and nan", y, 5 * N);
            free(s), free(x), free(y);
        }
        free(q);
    }
}

static void int4_cases(void) {
    static const int64_t shapes[][2] = {{1024, 384}, {96, 100}, {64, 33}, {256, 130}};
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int64_t K = shapes[c][0], N = shapes[c][1], Np = (N + 63) / 64 * 64;
        uint8_t *packed = alloc((size_t)(Np / 64 * K * 32)); /* tiled64 (Np/64, K, 32), any nibbles are valid */
        for (int64_t i = 0; i < Np / 64 * K * 32; i++) packed[i] = (uint8_t)(lcg = lcg * 6364136223846793005ull + 1, lcg >> 56);
        for (int64_t G = 32; G <= 128; G *= 4) {
            if (K % G) continue;
            for (int bf = 0; bf < 2; bf++) {
                /* (K/G, Np, 2): scale, zero */
                float *sz32 = values((K / G) * Np * 2, 0, 0.005f, 0.0f);
                for (int64_t i = 0; i < (K / G) * Np; i++) sz32[2 * i] += 0.01f;
                void *sz = narrow(sz32, (K / G) * Np * 2, bf);
                for (size_t r = 0; r < 4; r++) {
                    const int64_t M = ROWS[r];
                    void *x = values(M * K, bf, 1.0f, 0.0f), *y = alloc((size_t)(M * N) * 4);
                    qk_gemv_int4(packed, sz, bf, G, x, bf, y, bf, M, Np, N, K, THREADS);
                    char name[48];
                    snprintf(name, sizeof name, "int4_%s K%lld N%lld G%lld M%lld", dt(bf), (long long)K, (long long)N,
                             (long long)G, (long long)M);
                    emit(name, y, M * N, bf, bf);
                    free(x);
                    free(y);
                }
                for (int obf = 0; obf < 2; obf++) {
                    const int64_t t0 = Np / 64 / 2, t1 = Np / 64;
                    void *w = alloc((size_t)(K * (t1 - t0) * 64) * 4);
                    qk_dequant_int4(packed, sz, bf, G, Np, t0, t1, K, w, obf, THREADS);
                    char name[48];
                    snprintf(name, sizeof name, "dequant_int4 s%s %s K%lld N%lld G%lld", dt(bf), dt(obf), (long long)K,
                             (long long)N, (long long)G);
                    emit(name, w, K * (t1 - t0) * 64, obf, 1);
                    free(w);
                }
                free(sz);
            }
        }
        if (K == 96) { /* inf and NaN, groups of 32 */
            void *sz = values((K / 32) * Np * 2, 1, 0.005f, 0.01f), *x = bad_rows(K), *y = alloc((size_t)(5 * N) * 2);
            qk_gemv_int4(packed, sz, 1, 32, x, 1, y, 1, 5, Np, N, K, THREADS);
            emit_bad("int4_bf16 inf and nan", y, 5 * N);
            free(sz), free(x), free(y);
        }
        free(packed);
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* The fusions, in each activation / weight dtype pair the model has (weights fp32 under bf16 activations too) */

static const int DTYPES[][2] = {{0, 0}, {1, 1}, {1, 0}}; /* act bf16, weights bf16 */

static void rmsnorm_cases(void) {
    static const int64_t shapes[][3] = {{6, 256, 512}, {5, 48, 48}, {1, 1024, 1024}}; /* M, D, row stride */
    for (int d = 0; d < 3; d++)
        for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
            const int abf = DTYPES[d][0], wbf = DTYPES[d][1];
            const int64_t M = shapes[c][0], D = shapes[c][1], ld = shapes[c][2];
            void *x = values(M * ld, abf, 2.0f, 0.0f), *w = values(D, wbf, 0.3f, 0.0f), *out = alloc((size_t)(M * D) * 4);
            qk_rmsnorm(x, ld, w, wbf, 1e-6f, out, abf, M, D, THREADS);
            char name[48];
            snprintf(name, sizeof name, "rmsnorm a%s w%s M%lld D%lld ld%lld", dt(abf), dt(wbf), (long long)M,
                     (long long)D, (long long)ld);
            emit(name, out, M * D, abf, 0);
            free(x);
            free(w);
            free(out);
        }
}

static void gdn_cases(void) {
    static const int64_t shapes[][5] = {{1, 16, 16, 128, 128}, {3, 2, 4, 32, 48}, {2, 1, 3, 16, 16}}; /* B Hk Hv Dk Dv */
    const int64_t Kc = 4;
    for (int d = 0; d < 3; d++)
        for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
            const int abf = DTYPES[d][0], wbf = DTYPES[d][1];
            const int64_t B = shapes[c][0], Hk = shapes[c][1], Hv = shapes[c][2], Dk = shapes[c][3], Dv = shapes[c][4];
            const int64_t C = 2 * Hk * Dk + Hv * Dv;
            void *conv_w = values(C * Kc, wbf, 0.5f, 0.0f), *A_log = values(Hv, wbf, 1.0f, 0.0f);
            void *dt_bias = values(Hv, wbf, 1.0f, 0.0f), *norm_w = values(Dv, wbf, 0.3f, 1.0f);
            void *conv = values(B * (Kc - 1) * C, abf, 1.0f, 0.0f);
            float *state = values(B * Hv * Dk * Dv, 0, 0.1f, 0.0f);
            char tag[32], name[48];
            snprintf(tag, sizeof tag, "a%s w%s B%lld Hv%lld Dv%lld", dt(abf), dt(wbf), (long long)B, (long long)Hv,
                     (long long)Dv);
            for (int step = 0; step < 3; step++) {
                void *qkv = values(B * C, abf, 1.0f, 0.0f), *a = values(B * Hv, abf, 2.0f, 0.0f);
                void *b = values(B * Hv, abf, 2.0f, 0.0f), *z = values(B * Hv * Dv, abf, 1.0f, 0.0f);
                void *out = alloc((size_t)(B * Hv * Dv) * 4);
                qk_gdn_decode(qkv, conv, conv_w, Kc, a, b, A_log, dt_bias, state, z, norm_w, 1e-6f, out, abf, wbf, B, Hk,
                              Hv, Dk, Dv, THREADS);
                snprintf(name, sizeof name, "gdn out%d %s", step, tag);
                emit(name, out, B * Hv * Dv, abf, 0);
                free(qkv), free(a), free(b), free(z), free(out);
            }
            snprintf(name, sizeof name, "gdn state %s", tag);
            emit(name, state, B * Hv * Dk * Dv, 0, 0);
            snprintf(name, sizeof name, "gdn conv %s", tag);
            emit(name, conv, B * (Kc - 1) * C, abf, 1);
            free(conv_w), free(A_log), free(dt_bias), free(norm_w), free(conv), free(state);
        }
}

/* cos, sin (B, R) as rotary makes them (the halves repeated), from a random cosine: the same bits everywhere */
static void rotary(int64_t B, int64_t R, int bf, void **cos, void **sin) {
    float *c = alloc((size_t)(B * R) * 4), *s = alloc((size_t)(B * R) * 4);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < R / 2; i++) {
            const float u = uniform();
            c[b * R + i] = c[b * R + i + R / 2] = u;
            s[b * R + i] = s[b * R + i + R / 2] = sqrtf(1.0f - u * u);
        }
    *cos = narrow(c, B * R, bf);
    *sin = narrow(s, B * R, bf);
}

static void attn_cases(void) {
    static const int64_t shapes[][6] = {{3, 8, 2, 256, 64, 40}, {2, 4, 4, 32, 16, 8}}; /* B H Hkv D R Tmax */
    for (int d = 0; d < 3; d++)
        for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++)
            for (int gated = 0; gated < 2; gated++) {
                const int abf = DTYPES[d][0], wbf = DTYPES[d][1];
                const int64_t B = shapes[c][0], H = shapes[c][1], Hkv = shapes[c][2], D = shapes[c][3];
                const int64_t R = shapes[c][4], Tmax = shapes[c][5];
                void *q_w = values(D, wbf, 0.3f, 0.0f), *k_w = values(D, wbf, 0.3f, 0.0f);
                void *kc = values(B * Hkv * Tmax * D, abf, 1.0f, 0.0f), *vc = values(B * Hkv * Tmax * D, abf, 1.0f, 0.0f);
                char tag[32], name[48];
                snprintf(tag, sizeof tag, "a%s w%s g%d B%lld H%lld D%lld", dt(abf), dt(wbf), gated, (long long)B,
                         (long long)H, (long long)D);
                for (int step = 0; step < 3; step++) {
                    int64_t pos[3];
                    for (int64_t b = 0; b < B; b++) pos[b] = (b * 17) % (Tmax - 3) + step; /* rows at different places */
                    void *qg = values(B * H * D * (gated ? 2 : 1), abf, 1.0f, 0.0f);
                    void *kx = values(B * Hkv * D, abf, 1.0f, 0.0f), *vx = values(B * Hkv * D, abf, 1.0f, 0.0f);
                    void *cos, *sin, *out = alloc((size_t)(B * H * D) * 4);
                    rotary(B, R, abf, &cos, &sin);
                    qk_attn_decode(qg, kx, vx, q_w, k_w, 1e-6f, cos, sin, R, pos, kc, vc, out, gated, abf, wbf, B, H, Hkv,
                                   Tmax, D, THREADS);
                    snprintf(name, sizeof name, "attn out%d %s", step, tag);
                    emit(name, out, B * H * D, abf, 0);
                    free(qg), free(kx), free(vx), free(cos), free(sin), free(out);
                }
                snprintf(name, sizeof name, "attn kcache %s", tag);
                emit(name, kc, B * Hkv * Tmax * D, abf, 0);
                snprintf(name, sizeof name, "attn vcache %s", tag);
                emit(name, vc, B * Hkv * Tmax * D, abf, 1);
                free(q_w), free(k_w), free(kc), free(vc);
            }
}

static void conv_cases(void) {
    const int64_t B = 2, C = 96;
    for (int d = 0; d < 3; d++)
        for (int64_t Kc = 2; Kc <= 4; Kc += 2) {
            const int abf = DTYPES[d][0], wbf = DTYPES[d][1];
            void *w = values(C * Kc, wbf, 0.5f, 0.0f), *state = alloc((size_t)(B * (Kc - 1) * C) * 4);
            const int64_t lengths[] = {5, 1, 70}; /* a prompt in three pieces, carrying the state */
            char name[48];
            for (int p = 0; p < 3; p++) {
                const int64_t T = lengths[p];
                void *x = values(B * T * C, abf, 1.0f, 0.0f);
                float *out = alloc((size_t)(B * T * C) * 4);
                qk_conv_silu(x, state, w, out, abf, wbf, B, T, C, Kc, THREADS);
                snprintf(name, sizeof name, "conv out T%lld a%s w%s Kc%lld", (long long)T, dt(abf), dt(wbf), (long long)Kc);
                emit(name, out, B * T * C, 0, 0);
                free(x), free(out);
            }
            snprintf(name, sizeof name, "conv state a%s w%s Kc%lld", dt(abf), dt(wbf), (long long)Kc);
            emit(name, state, B * (Kc - 1) * C, abf, 1);
            free(w), free(state);
        }
}

/* a prompt's delta rule in two pieces, carrying the state; the columns (48, 80) no multiple of a pass's 32 or 64 */
static void delta_cases(void) {
    static const int64_t shapes[][6] = {{1, 2, 2, 32, 48, 7}, {2, 1, 3, 16, 80, 5}}; /* B Hk Hv Dk Dv T */
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int64_t B = shapes[c][0], Hk = shapes[c][1], Hv = shapes[c][2], Dk = shapes[c][3], Dv = shapes[c][4];
        float *state = values(B * Hv * Dk * Dv, 0, 0.1f, 0.0f);
        char name[48];
        for (int p = 0; p < 2; p++) {
            const int64_t T = shapes[c][5] + p;
            float *q = values(B * T * Hk * Dk, 0, 0.2f, 0.0f), *k = values(B * T * Hk * Dk, 0, 0.2f, 0.0f);
            float *v = values(B * T * Hv * Dv, 0, 1.0f, 0.0f), *g = values(B * T * Hv, 0, 0.5f, -0.5f);
            float *beta = values(B * T * Hv, 0, 0.5f, 0.5f), *o = alloc((size_t)(B * T * Hv * Dv) * 4);
            qk_delta_rule(q, k, v, g, beta, state, o, B, T, Hk, Hv, Dk, Dv, THREADS);
            snprintf(name, sizeof name, "delta out B%lld Dv%lld T%lld", (long long)B, (long long)Dv, (long long)T);
            emit(name, o, B * T * Hv * Dv, 0, 0);
            free(q), free(k), free(v), free(g), free(beta), free(o);
        }
        snprintf(name, sizeof name, "delta state B%lld Dv%lld", (long long)B, (long long)Dv);
        emit(name, state, B * Hv * Dk * Dv, 0, 0);
        free(state);
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* The whole decode step (step.h) on a two-layer model (a Gated DeltaNet layer, an attention layer), described in
 * plan.h's structs; a Qwen2-like attention layer too (no output gate, no q/k norms, q/k/v biases), and MoE MLPs (5
 * experts of width 20, 3 per token, a shared expert of width 40: widths no multiple of the vectors). */

#include "plan.h"

/* the pointers a plan holds, freed after the case */
static void *owned[256];
static int n_owned;

static void *own(void *p) {
    if (n_owned == (int)(sizeof owned / sizeof *owned)) exit(3);
    return owned[n_owned++] = p;
}

/* a linear layer (N, K) in format fmt; bf: the dtype of bf16 / fp32 weights and of quantized scales; abf >= 0: a
 * bias in that activation dtype */
static struct qk_linear make_linear(int fmt, int bf, int64_t N, int64_t K, int abf) {
    const int64_t G = 32, Np = (N + 63) / 64 * 64;
    const float scale = 2.0f / sqrtf((float)K);
    struct qk_linear l = {.fmt = fmt, .s_bf16 = bf, .g = G, .n = N, .np = Np, .k = K};
    if (fmt == FMT_BF16 || fmt == FMT_F32) {
        l.w = own(values(N * K, fmt == FMT_BF16, scale, 0.0f));
    } else if (fmt == FMT_INT8) {
        int8_t *q = own(alloc((size_t)(N * K)));
        for (int64_t i = 0; i < N * K; i++) q[i] = (int8_t)(int)(uniform() * 127.0f);
        l.w = q;
        l.s = own(values(N * (K / G), bf, 0.2f * scale / 127.0f, scale / 127.0f));
    } else {
        uint8_t *p = own(alloc((size_t)(Np / 64 * K * 32)));
        for (int64_t i = 0; i < Np / 64 * K * 32; i++) p[i] = (uint8_t)(lcg = lcg * 6364136223846793005ull + 1, lcg >> 56);
        l.w = p;
        float *sz = values((K / G) * Np * 2, 0, scale / 8.0f, 0.0f); /* zeros about the scales' size */
        for (int64_t i = 0; i < (K / G) * Np; i++) sz[2 * i] = fabsf(sz[2 * i]) + scale / 8.0f;
        l.s = own(narrow(sz, (K / G) * Np * 2, bf));
    }
    if (abf >= 0) l.bias = own(values(N, abf, 1.0f, 0.0f));
    return l;
}

static struct qk_mlp make_mlp(int fmt, int bf, int64_t width, int64_t Hd) {
    struct qk_mlp p = {make_linear(fmt, bf, width, Hd, -1), make_linear(fmt, bf, width, Hd, -1),
                       make_linear(fmt, bf, Hd, width, -1)};
    return p;
}

/* qwen2: the attention layer as Qwen2's (and the model's gate off); moe: MoE MLPs (routers in the activation dtype) */
static void step_case(const char *tag, int abf, int wbf, int fmt, int qfmt_attn, int qfmt_mlp, int qwen2, int moe) {
    const int64_t B = 2, Hd = 64, I = 128, HK = 2, HV = 4, DK = 16, DV = 16, KC = 4, H = 4, HKV = 2, D = 32, TMAX = 8;
    const int64_t R = 16, VOCAB = 40, Cq = 2 * HK * DK + HV * DV;
    const int attn_fmt = qfmt_attn >= 0 ? qfmt_attn : fmt, mlp_fmt = qfmt_mlp >= 0 ? qfmt_mlp : fmt;
    struct qk_layer layers[2] = {0};
    struct qk_mlp experts[2][5];
    struct qk_moe moes[2];
    union qk_cache caches[2] = {0}; /* not tracked until the tracked step sets its buffers */
    struct qk_model m = {.act_bf16 = abf, .w_bf16 = wbf, .gated = !qwen2, .eps = 1e-6f, .hidden = Hd, .intermediate = I,
                         .n_layers = 2, .vocab = VOCAB, .k_heads = HK, .v_heads = HV, .k_head_dim = DK,
                         .v_head_dim = DV, .conv_kernel = KC, .heads = H, .kv_heads = HKV, .head_dim = D,
                         .rotary_dim = R, .n_experts = moe ? 5 : 0, .top_k = moe ? 3 : 0, .layers = layers, .rows = B, .tokens = 1, .max_seq_len = TMAX, .caches = caches};
    m.final_norm = own(values(Hd, wbf, 0.3f, 0.0f));
    m.head = make_linear(mlp_fmt, wbf, VOCAB, Hd, -1);
    for (int li = 0; li < 2; li++) {
        struct qk_layer *L = layers + li;
        L->in_norm = own(values(Hd, wbf, 0.3f, 0.0f));
        L->post_norm = own(values(Hd, wbf, 0.3f, 0.0f));
        if (li == 0) {
            struct qk_gdn *g = &L->mixer.gdn;
            L->kind = QK_LINEAR_ATTENTION;
            g->qkv = make_linear(attn_fmt, wbf, Cq, Hd, -1);
            g->z = make_linear(attn_fmt, wbf, HV * DV, Hd, -1);
            g->a = make_linear(attn_fmt, wbf, HV, Hd, -1);
            g->b = make_linear(attn_fmt, wbf, HV, Hd, -1);
            L->out = make_linear(attn_fmt, wbf, Hd, HV * DV, -1);
            g->conv_w = own(values(Cq * KC, wbf, 0.5f, 0.0f));
            g->A_log = own(values(HV, wbf, 1.0f, 0.0f));
            g->dt_bias = own(values(HV, wbf, 1.0f, 0.0f));
            g->norm_w = own(values(DV, wbf, 0.3f, 1.0f));
            caches[0].gdn.conv = own(values(B * (KC - 1) * Cq, abf, 1.0f, 0.0f));
            caches[0].gdn.state = own(values(B * HV * DK * DV, 0, 0.1f, 0.0f));
        } else {
            struct qk_attn *a = &L->mixer.attn;
            const int bias = qwen2 ? abf : -1;
            L->kind = QK_FULL_ATTENTION;
            a->q = make_linear(attn_fmt, wbf, H * D * (qwen2 ? 1 : 2), Hd, bias);
            a->k = make_linear(attn_fmt, wbf, HKV * D, Hd, bias);
            a->v = make_linear(attn_fmt, wbf, HKV * D, Hd, bias);
            L->out = make_linear(attn_fmt, wbf, Hd, H * D, -1);
            if (!qwen2) {
                a->q_norm = own(values(D, wbf, 0.3f, 0.0f));
                a->k_norm = own(values(D, wbf, 0.3f, 0.0f));
            }
            caches[1].attn.k = own(values(B * HKV * TMAX * D, abf, 1.0f, 0.0f));
            caches[1].attn.v = own(values(B * HKV * TMAX * D, abf, 1.0f, 0.0f));
        }
        if (moe) {
            const int router_fmt = abf ? FMT_BF16 : FMT_F32;
            for (int e = 0; e < 5; e++) experts[li][e] = make_mlp(mlp_fmt, wbf, 20, Hd);
            moes[li] = (struct qk_moe){make_linear(router_fmt, abf, 5, Hd, -1), experts[li], make_mlp(mlp_fmt, wbf, 40, Hd),
                                       make_linear(router_fmt, abf, 1, Hd, -1)};
            L->moe = moes + li;
        } else {
            L->mlp = make_mlp(mlp_fmt, wbf, I, Hd);
        }
    }
    for (int step = 0; step < 3; step++) {
        int64_t pos[2] = {step, 3 + step};
        void *cos, *sin;
        rotary(B, R, abf, &cos, &sin);
        void *x = values(B * Hd, abf, 1.0f, 0.0f), *logits = alloc((size_t)(B * VOCAB) * 4);
        m.positions = pos, m.cos = cos, m.sin = sin;
        if (qk_decode_step(&m, x, logits, THREADS)) {
            fprintf(stderr, "kernels_driver: qk_decode_step could not allocate its buffer\n");
            exit(2);
        }
        char name[48];
        snprintf(name, sizeof name, "step logits%d %s", step, tag);
        emit(name, logits, B * VOCAB, abf, 0);
        snprintf(name, sizeof name, "step hidden%d %s", step, tag);
        emit(name, x, B * Hd, abf, 0);
        free(cos), free(sin), free(x), free(logits);
    }
    { /* a tracked step of 3 tokens per row (a verification), then each row rewound to its first 1 and 2 tokens */
        const int64_t T = 3, keep[2] = {1, 2};
        int64_t pos[2] = {3, 5};
        void *cos, *sin;
        rotary(T * B, R, abf, &cos, &sin);
        void *x = values(T * B * Hd, abf, 1.0f, 0.0f), *logits = alloc((size_t)(T * B * VOCAB) * 4);
        caches[0].gdn.before_conv = own(alloc((size_t)(B * (KC - 1) * Cq) * 4));
        caches[0].gdn.before_state = own(alloc((size_t)(B * HV * DK * DV) * 4));
        caches[0].gdn.inputs = own(alloc((size_t)(T * B * (Cq + HV * DV + 2 * HV)) * 4));
        m.tokens = T, m.positions = pos, m.cos = cos, m.sin = sin;
        if (qk_decode_step(&m, x, logits, THREADS) || qk_rewind(&m, keep, THREADS)) {
            fprintf(stderr, "kernels_driver: a tracked qk_decode_step or qk_rewind could not allocate\n");
            exit(2);
        }
        char name[48];
        snprintf(name, sizeof name, "step tokens logits %s", tag);
        emit(name, logits, T * B * VOCAB, abf, 0);
        snprintf(name, sizeof name, "step tokens hidden %s", tag);
        emit(name, x, T * B * Hd, abf, 0);
        snprintf(name, sizeof name, "step rewound state %s", tag);
        emit(name, caches[0].gdn.state, B * HV * DK * DV, 0, 0);
        snprintf(name, sizeof name, "step rewound conv %s", tag);
        emit(name, caches[0].gdn.conv, B * (KC - 1) * Cq, abf, 0);
        free(cos), free(sin), free(x), free(logits);
    }
    { /* the MTP head's step: [embedding | hidden state] rows through its prelude (two norms, fc), the last logits */
        int64_t pos[2] = {7, 7};
        void *cos, *sin;
        rotary(B, R, abf, &cos, &sin);
        void *x = values(B * 2 * Hd, abf, 1.0f, 0.0f), *logits = alloc((size_t)VOCAB * 4);
        m.fuse = make_linear(attn_fmt, wbf, Hd, 2 * Hd, -1);
        m.fuse_norm_e = own(values(Hd, wbf, 0.3f, 0.0f));
        m.fuse_norm_h = own(values(Hd, wbf, 0.3f, 0.0f));
        caches[0].gdn.inputs = NULL;
        m.tokens = 1, m.logits_rows = 1, m.positions = pos, m.cos = cos, m.sin = sin;
        if (qk_decode_step(&m, x, logits, THREADS)) {
            fprintf(stderr, "kernels_driver: qk_decode_step could not allocate its buffer\n");
            exit(2);
        }
        char name[48];
        snprintf(name, sizeof name, "step fused logits %s", tag);
        emit(name, logits, VOCAB, abf, 0);
        snprintf(name, sizeof name, "step fused hidden %s", tag);
        emit(name, x, B * Hd, abf, 0);
        free(cos), free(sin), free(x);
        /* greedy drafts in one call: the head over 2 positions of row 0, then over 2 drafts */
        int64_t tokens[3], at[1] = {4};
        float drafted[3];
        const struct qk_linear embed = make_linear(mlp_fmt, wbf, VOCAB, Hd, -1); /* quantized where the MLP is */
        rotary(4, R, abf, &cos, &sin);
        x = values(2 * 2 * Hd, abf, 1.0f, 0.0f);
        m.positions = at, m.cos = cos, m.sin = sin;
        if (qk_draft(&m, x, &embed, tokens, logits, 2, 3, THREADS)) {
            fprintf(stderr, "kernels_driver: qk_draft could not allocate\n");
            exit(2);
        }
        for (int i = 0; i < 3; i++) drafted[i] = (float)tokens[i];
        snprintf(name, sizeof name, "step drafts %s", tag);
        emit(name, drafted, 3, 0, 1);
        free(cos), free(sin), free(x), free(logits);
    }
    while (n_owned) free(owned[--n_owned]);
}

static void step_cases(void) {
    step_case("f32", 0, 0, FMT_F32, -1, -1, 0, 0);
    step_case("bf16", 1, 1, FMT_BF16, -1, -1, 0, 0);
    step_case("int8 int4 bf16", 1, 1, FMT_BF16, FMT_INT8, FMT_INT4, 0, 0);
    step_case("int8 int4 f32", 0, 0, FMT_F32, FMT_INT4, FMT_INT8, 0, 0);
    step_case("qwen2 f32", 0, 0, FMT_F32, -1, -1, 1, 0);
    step_case("qwen2 bf16 int8", 1, 0, FMT_BF16, FMT_INT8, -1, 1, 0);
    step_case("moe f32", 0, 0, FMT_F32, -1, -1, 0, 1);
    step_case("moe bf16", 1, 1, FMT_BF16, -1, -1, 0, 1);
}

/* ------------------------------------------------------------------------------------------------------------ */

/* Whether to run `family`: all without arguments, else those named (the no-dotprod NEON build runs the ones it
 * changes). A family's inputs start from the seed, so its cases are the same whatever else runs. */
static int wanted(int argc, char **argv, const char *family) {
    int yes = argc == 1;
    for (int i = 1; i < argc; i++) yes |= !strcmp(argv[i], family);
    lcg = SEED;
    return yes;
}

int main(int argc, char **argv) {
    char isa[48];
    snprintf(isa, sizeof isa, "isa:%s", qk_isa());
    emit(isa, NULL, 0, 0, 1);
    if (wanted(argc, argv, "gemv")) gemv_float_cases();
    if (wanted(argc, argv, "int8")) int8_cases();
    if (wanted(argc, argv, "int4")) int4_cases();
    if (wanted(argc, argv, "rmsnorm")) rmsnorm_cases();
    if (wanted(argc, argv, "gdn")) gdn_cases();
    if (wanted(argc, argv, "attn")) attn_cases();
    if (wanted(argc, argv, "conv")) conv_cases();
    if (wanted(argc, argv, "delta")) delta_cases();
    if (wanted(argc, argv, "step")) step_cases();
    if (wanted(argc, argv, "read")) {
        float *buf = values(64 * 1000, 0, 1.0f, 0.0f);
        const float total = qk_read(buf, 64 * 1000, THREADS);
        emit("read", &total, 1, 0, 0);
        free(buf);
    }
    return fflush(stdout) != 0;
}
