/* qwenlite's CPU kernels, built by qwenlite/ops/kernels.py with the machine's C compiler (-O3 -march=native
 * -fopenmp) and called through ctypes. Each has a pure-torch reference twin it is tested against:
 *
 *   qk_gemv_bf16    y = x W^T, W bf16 (N, K), x and y bf16                     twin: F.linear
 *   qk_gemv_int8    y = x (q * s)^T, q int8 (N, K), s (N, K/G)                  twin: quant_matmul.int8_matmul_ref
 *   qk_gemv_int4    y = x ((q - 8) * s + z)^T, q in quant_matmul's tiled64       twin: quant_matmul.int4_matmul_ref
 *   qk_dequant_int8 / qk_dequant_int4: rows of W in bf16 or fp32 (prefill: dequantize, then torch's GEMM)
 *   qk_gdn_decode   a Gated DeltaNet layer's token between projections           twin: model.GatedDeltaNet (torch path)
 *                   (conv, SiLU, L2 norms, gates, delta rule in one pass over the state, gated RMSNorm)
 *   qk_rmsnorm      zero-centred RMSNorm                                          twin: model.RMSNorm (torch path)
 *   qk_attn_decode  one query per row over its cached keys                        twin: attention.causal_attention
 *   qk_read         reads memory as a GEMV does, for `qwenlite bench`'s bandwidth figure
 *
 * The GEMVs are for few activation rows (decode, batched decode): each pass streams the weights once for up to
 * MB rows of x, accumulating in fp32. Decode is bound by memory bandwidth, so the inner loops do just enough
 * arithmetic per byte to keep up with it: bf16 by AVX512-BF16 dot products, int8 and int4 by widening to fp32
 * and FMA. Threads split the output rows (OpenMP; the runtime is torch's own libgomp, loaded first).
 *
 * Activations: fp32 or bf16 (`x_bf16`), outputs likewise (`y_bf16`); scales fp32 or bf16 (`s_bf16`).
 * Everything is contiguous, row-major. Without AVX-512 the file builds only qk_simd() == 0, and qwenlite uses
 * torch's kernels instead. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int qk_version(void) { return 1; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)

#include <immintrin.h>

int qk_simd(void) { return 1; }

#define MB 4 /* activation rows per pass over the weights */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store_out(void *y, int y_bf16, int64_t i, float v) {
    if (y_bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

static inline float load_scale(const void *s, int s_bf16, int64_t i) {
    return s_bf16 ? bf16_to_f32(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

/* 16 bf16 -> 16 fp32 */
static inline __m512 cvt_bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* x (M, K) fp32 or bf16 -> fp32, in a per-thread buffer that grows as needed */
static _Thread_local float *xbuf;
static _Thread_local size_t xcap;

static const float *stage_f32(const void *x, int x_bf16, int64_t n) {
    if (!x_bf16) return (const float *)x;
    if ((size_t)n > xcap) {
        free(xbuf);
        xcap = (size_t)n;
        xbuf = aligned_alloc(64, ((xcap * sizeof(float)) + 63) & ~(size_t)63);
    }
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < n; i++) xbuf[i] = bf16_to_f32(h[i]);
    return xbuf;
}

static inline int threads_for(int nthreads, int64_t work) { return work < (1 << 15) ? 1 : nthreads; }

/* ------------------------------------------------------------------------------------------------------------ */
/* bf16 weights: x bf16 (M, K), W (N, K), y bf16 (M, N) */

static inline __attribute__((always_inline)) void bf16_row(const uint16_t *w, const uint16_t *x, uint16_t *y,
                                                           int64_t n, int64_t N, int64_t K, const int MC) {
    __m512 acc[MB][2];
    for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int m = 0; m < MC; m++) {
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
        }
    }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? 0xffffffffu : ((1u << (K - k)) - 1);
        __m512i w0 = _mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < MC; m++)
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)w0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < MC; m++) y[m * N + n] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
}

void qk_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
        const uint16_t *xm = x + m0 * K;
        uint16_t *ym = y + m0 * N;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
        for (int64_t n = 0; n < N; n++) {
            const uint16_t *w = W + n * K;
            switch (mc) {
            case 1: bf16_row(w, xm, ym, n, N, K, 1); break;
            case 2: bf16_row(w, xm, ym, n, N, K, 2); break;
            case 3: bf16_row(w, xm, ym, n, N, K, 3); break;
            default: bf16_row(w, xm, ym, n, N, K, 4); break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int8 weights, symmetric: W = q * s, q (N, K) int8, s (N, K/G); G % 16 == 0 */

static inline __m512 i8x16(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

static inline __attribute__((always_inline)) void int8_row(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                           const float *x, void *y, int y_bf16, int64_t n,
                                                           int64_t N, int64_t K, const int MC) {
    __m512 tot[MB];
    for (int m = 0; m < MC; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        __m512 acc[MB][4];
        for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
        int64_t k = g0;
        for (; k + 64 <= g0 + G; k += 64) {
            __m512 w0 = i8x16(w + k), w1 = i8x16(w + k + 16), w2 = i8x16(w + k + 32), w3 = i8x16(w + k + 48);
            for (int m = 0; m < MC; m++) {
                const float *xm = x + m * K + k;
                acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
                acc[m][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2]);
                acc[m][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3]);
            }
        }
        for (; k < g0 + G; k += 16) {
            __m512 w0 = i8x16(w + k);
            for (int m = 0; m < MC; m++) acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
        }
        const __m512 sv = _mm512_set1_ps(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            tot[m] = _mm512_fmadd_ps(a, sv, tot[m]);
        }
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, _mm512_reduce_add_ps(tot[m]));
}

void qk_gemv_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    const float *xf = stage_f32(x, x_bf16, M * K);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
        const float *xm = xf + m0 * K;
        char *ym = (char *)y + m0 * N * (y_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
        for (int64_t n = 0; n < N; n++) {
            const int8_t *w = W + n * K;
            switch (mc) {
            case 1: int8_row(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 1); break;
            case 2: int8_row(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 2); break;
            case 3: int8_row(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 3); break;
            default: int8_row(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 4); break;
            }
        }
    }
}

void qk_dequant_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, int64_t r0, int64_t r1, int64_t K,
                     void *out, int out_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (r1 - r0) * K))
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_mul_ps(i8x16(W + r * K + k), _mm512_set1_ps(load_scale(s, s_bf16, r * (K / G) + k / G)));
            int64_t o = (r - r0) * K + k;
            if (out_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + o), (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_storeu_ps((float *)out + o, v);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int4 weights, asymmetric, tiled64: byte [t, k, j] = q[64t + j, k] | q[64t + 32 + j, k] << 4, shape (Np/64, K, 32);
 * scales_and_zeros (K/G, Np, 2); W = (q - 8) * s + z = q * s + (z - 8 s). */

/* The 64 rows of one tile at column k, as four vectors of 16 rows (fp32 q in [0, 15]). */
static inline void unpack_tile_col(const uint8_t *p, __m512 q[4]) {
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    __m256i lo = _mm256_and_si256(b, _mm256_set1_epi8(15));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15));
    q[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
    q[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
    q[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
    q[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
}

/* s and z of 16 rows starting at `row` in group gi */
static inline void load_sz(const void *sz, int s_bf16, int64_t Np, int64_t gi, int64_t row, __m512 *s, __m512 *z) {
    int64_t i = (gi * Np + row) * 2;
    if (s_bf16) {
        __m512i u = _mm512_loadu_si512((const uint16_t *)sz + i); /* 16 (s, z) pairs */
        *s = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
        *z = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        const float *f = (const float *)sz + i;
        __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        *s = _mm512_permutex2var_ps(a, even, b);
        *z = _mm512_permutex2var_ps(a, odd, b);
    }
}

static inline __attribute__((always_inline)) void int4_tile(const uint8_t *P, const void *sz, int s_bf16, int64_t G,
                                                            const float *x, const float *xsum, void *y, int y_bf16,
                                                            int64_t t, int64_t Np, int64_t n_out, int64_t K,
                                                            const int MC) {
    const int64_t ng = K / G;
    float tot[MB][64] __attribute__((aligned(64)));
    memset(tot, 0, sizeof tot);
    const uint8_t *tile = P + t * K * 32;
    for (int64_t gi = 0; gi < ng; gi++) {
        __m512 acc[MB][4];
        for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
        for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
            __m512 q[4];
            unpack_tile_col(tile + k * 32, q);
            for (int m = 0; m < MC; m++) {
                const __m512 xv = _mm512_set1_ps(x[m * K + k]);
                acc[m][0] = _mm512_fmadd_ps(q[0], xv, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(q[1], xv, acc[m][1]);
                acc[m][2] = _mm512_fmadd_ps(q[2], xv, acc[m][2]);
                acc[m][3] = _mm512_fmadd_ps(q[3], xv, acc[m][3]);
            }
        }
        for (int r = 0; r < 4; r++) {
            __m512 s, z;
            load_sz(sz, s_bf16, Np, gi, t * 64 + r * 16, &s, &z);
            const __m512 z8 = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z); /* z - 8 s */
            for (int m = 0; m < MC; m++) {
                __m512 v = _mm512_fmadd_ps(acc[m][r], s, _mm512_load_ps(&tot[m][r * 16]));
                _mm512_store_ps(&tot[m][r * 16], _mm512_fmadd_ps(z8, _mm512_set1_ps(xsum[m * ng + gi]), v));
            }
        }
    }
    for (int m = 0; m < MC; m++)
        for (int64_t r = 0; r < 64 && t * 64 + r < n_out; r++) store_out(y, y_bf16, m * n_out + t * 64 + r, tot[m][r]);
}

void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads) {
    const float *xf = stage_f32(x, x_bf16, M * K);
    const int64_t ng = K / G;
    float *xsum = malloc(sizeof(float) * (size_t)(M * ng));
    for (int64_t m = 0; m < M; m++)
        for (int64_t gi = 0; gi < ng; gi++) {
            float acc = 0;
            for (int64_t k = gi * G; k < (gi + 1) * G; k++) acc += xf[m * K + k];
            xsum[m * ng + gi] = acc;
        }
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
        const float *xm = xf + m0 * K, *sm = xsum + m0 * ng;
        char *ym = (char *)y + m0 * n_out * (y_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, Np * K))
        for (int64_t t = 0; t < Np / 64; t++) {
            switch (mc) {
            case 1: int4_tile(P, sz, s_bf16, G, xm, sm, ym, y_bf16, t, Np, n_out, K, 1); break;
            case 2: int4_tile(P, sz, s_bf16, G, xm, sm, ym, y_bf16, t, Np, n_out, K, 2); break;
            case 3: int4_tile(P, sz, s_bf16, G, xm, sm, ym, y_bf16, t, Np, n_out, K, 3); break;
            default: int4_tile(P, sz, s_bf16, G, xm, sm, ym, y_bf16, t, Np, n_out, K, 4); break;
            }
        }
    }
    free(xsum);
}

/* rows [64 t0, 64 t1) of W, (64 (t1 - t0), K), computed as the reference does: (q - 8) * s + z, rounded once per op.
 * Row by row (strided byte reads within a tile that stays in cache), so that the output is written contiguously. */
void qk_dequant_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, int64_t Np, int64_t t0, int64_t t1,
                     int64_t K, void *out, int out_bf16, int nthreads) {
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (t1 - t0) * 64 * K))
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = P + t * K * 32;
        for (int r = 0; r < 64; r++) {
            const int j = r & 31, shift = (r >> 5) * 4;
            const int64_t row = t * 64 + r, o = (row - t0 * 64) * K;
            for (int64_t gi = 0; gi < ng; gi++) {
                const float s = load_scale(sz, s_bf16, (gi * Np + row) * 2), z = load_scale(sz, s_bf16, (gi * Np + row) * 2 + 1);
                for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
                    const float q = (float)((tile[k * 32 + j] >> shift) & 15);
                    const float w = (q - 8.0f) * s;
                    if (out_bf16)
                        ((uint16_t *)out)[o + k] = f32_to_bf16(w + z);
                    else
                        ((float *)out)[o + k] = w + z;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Decode-step fusions: what the model's torch code does for one token in dozens of small ops, in one call.
 * `act_bf16`: activations (and caches) bf16, else fp32; `w_bf16`: the small weights (norms, conv, A_log, dt_bias)
 * bf16, else fp32. Roundings to the activation dtype happen where the torch code rounds. */

static inline float act_load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline float act_round(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Zero-centred RMSNorm, x_hat * (1 + w), over rows of D at a stride of `ld` elements -> out (M, D) contiguous.
 * Twin: model.RMSNorm's torch path. */
void qk_rmsnorm(const void *x, int64_t ld, const void *w, int w_bf16, float eps, void *out, int act_bf16, int64_t M,
                int64_t D, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, M * D * 8))
    for (int64_t m = 0; m < M; m++) {
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) {
            const float v = act_load(x, act_bf16, m * ld + i);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++)
            store_out(out, act_bf16, m * D + i, act_load(x, act_bf16, m * ld + i) * r * (1.0f + act_load(w, w_bf16, i)));
    }
}

/* The gated delta rule for one token on one head, in place: S = exp(g) S; d = beta (v - S^T k); S = S + k d^T;
 * o = S^T q. S (Dk, Dv) is read twice (the second time from cache) and written once. */
static void delta_step(float *s, const float *q, const float *k, const float *v, float g, float beta, float *o,
                       int64_t Dk, int64_t Dv) {
    const float decay = expf(g);
    float d[Dv];
    for (int64_t j = 0; j < Dv; j++) d[j] = 0.0f;
    for (int64_t i = 0; i < Dk; i++) {
        const float ki = k[i] * decay;
#pragma omp simd
        for (int64_t j = 0; j < Dv; j++) d[j] += s[i * Dv + j] * ki;
    }
    for (int64_t j = 0; j < Dv; j++) {
        d[j] = beta * (v[j] - d[j]);
        o[j] = 0.0f;
    }
    for (int64_t i = 0; i < Dk; i++) {
        const float ki = k[i], qi = q[i];
#pragma omp simd
        for (int64_t j = 0; j < Dv; j++) {
            const float x = s[i * Dv + j] * decay + ki * d[j];
            s[i * Dv + j] = x;
            o[j] += x * qi;
        }
    }
}

/* One token of a Gated DeltaNet layer between its projections and out_proj, for B rows. Twin: the torch path of
 * model.GatedDeltaNet.forward with a cache and T == 1.
 *   qkv (B, C) act, C = 2 Hk Dk + Hv Dv      -> causal conv with conv_state (B, Kc-1, C) act (updated), SiLU
 *   q, k L2-normalised per key head (q times Dk^-1/2); beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias)
 *   state (B, Hv, Dk, Dv) fp32 updated;  o -> act;  out = w * rms(o) * silu(z) per value head, (B, Hv Dv) act */
void qk_gdn_decode(const void *qkv, void *conv_state, const void *conv_w, int64_t Kc, const void *a, const void *bp,
                   const void *A_log, const void *dt_bias, float *state, const void *z, const void *norm_w, float eps,
                   void *out, int act_bf16, int w_bf16, int64_t B, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                   int nthreads) {
    const int64_t C = 2 * Hk * Dk + Hv * Dv, rep = Hv / Hk;
    float *xs = malloc(sizeof(float) * (size_t)(B * C));
    for (int64_t b = 0; b < B; b++) {
        float *xb = xs + b * C;
        const int64_t cs = b * (Kc - 1) * C; /* this row's conv state: (Kc-1, C) */
        for (int64_t c = 0; c < C; c++) {
            const float now = act_load(qkv, act_bf16, b * C + c);
            float acc = Kc > 1 ? act_load(conv_state, act_bf16, cs + c) * act_load(conv_w, w_bf16, c * Kc) : now * act_load(conv_w, w_bf16, c * Kc);
            for (int64_t j = 1; j < Kc; j++) {
                const float in = j < Kc - 1 ? act_load(conv_state, act_bf16, cs + j * C + c) : now;
                acc += in * act_load(conv_w, w_bf16, c * Kc + j);
            }
            xb[c] = silu(acc);
            for (int64_t j = 0; j + 1 < Kc - 1; j++) /* shift the window; the newest input goes last */
                store_out(conv_state, act_bf16, cs + j * C + c, act_load(conv_state, act_bf16, cs + (j + 1) * C + c));
            if (Kc > 1) store_out(conv_state, act_bf16, cs + (Kc - 2) * C + c, now);
        }
        for (int64_t h = 0; h < 2 * Hk; h++) { /* q heads, then k heads */
            float *v = xb + h * Dk, ss = 0.0f;
            for (int64_t i = 0; i < Dk; i++) ss += v[i] * v[i];
            const float r = 1.0f / sqrtf(ss + 1e-6f) * (h < Hk ? 1.0f / sqrtf((float)Dk) : 1.0f);
            for (int64_t i = 0; i < Dk; i++) v[i] *= r;
        }
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * Hv * Dk * Dv))
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hv; h++) {
            const float *xb = xs + b * C;
            const float *q = xb + (h / rep) * Dk, *k = xb + Hk * Dk + (h / rep) * Dk, *v = xb + 2 * Hk * Dk + h * Dv;
            const float beta = 1.0f / (1.0f + expf(-act_load(bp, act_bf16, b * Hv + h)));
            const float u = act_load(a, act_bf16, b * Hv + h) + act_load(dt_bias, w_bf16, h);
            const float g = -expf(act_load(A_log, w_bf16, h)) * (u > 20.0f ? u : log1pf(expf(u)));
            float o[Dv];
            delta_step(state + (b * Hv + h) * Dk * Dv, q, k, v, g, beta, o, Dk, Dv);
            float ss = 0.0f;
            for (int64_t j = 0; j < Dv; j++) {
                o[j] = act_round(o[j], act_bf16);
                ss += o[j] * o[j];
            }
            const float r = 1.0f / sqrtf(ss / (float)Dv + eps);
            for (int64_t j = 0; j < Dv; j++) {
                const float xh = act_round(o[j] * r, act_bf16);
                const float wx = act_round(act_load(norm_w, w_bf16, j) * xh, act_bf16 && w_bf16);
                const int64_t i = (b * Hv + h) * Dv + j;
                store_out(out, act_bf16, i, wx * silu(act_load(z, act_bf16, i)));
            }
        }
    free(xs);
}

/* Attention for one query per row over its cached prefix: row b's query sees keys [0, n_keys[b]). Query head h
 * reads key/value head h / (H / Hkv). q (B, H, D) act; k, v caches (B, Hkv, Tmax, D) act; out (B, H, D) act.
 * Twin: ops/attention.causal_attention with Tq == 1. */
void qk_attn_decode(const void *q, const void *kc, const void *vc, const int64_t *n_keys, float scale, void *out,
                    int act_bf16, int64_t B, int64_t H, int64_t Hkv, int64_t Tmax, int64_t D, int nthreads) {
    const int64_t rep = H / Hkv;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * H * n_keys[0] * D))
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t L = n_keys[b], base = (b * Hkv + h / rep) * Tmax * D;
            float qf[D], acc[D];
            float *p = malloc(sizeof(float) * (size_t)L);
            for (int64_t i = 0; i < D; i++) {
                qf[i] = act_load(q, act_bf16, (b * H + h) * D + i);
                acc[i] = 0.0f;
            }
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                float sc = 0.0f;
                for (int64_t i = 0; i < D; i++) sc += qf[i] * act_load(kc, act_bf16, base + t * D + i);
                p[t] = sc * scale;
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int64_t t = 0; t < L; t++) {
                p[t] = expf(p[t] - mx);
                sum += p[t];
                for (int64_t i = 0; i < D; i++) acc[i] += p[t] * act_load(vc, act_bf16, base + t * D + i);
            }
            for (int64_t i = 0; i < D; i++) store_out(out, act_bf16, (b * H + h) * D + i, acc[i] / sum);
            free(p);
        }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Memory bandwidth probe: read `n` floats once, as a decode step reads its weights (`qwenlite bench`). */

float qk_read(const float *p, int64_t n, int nthreads) {
    float total = 0.0f;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : total)
    for (int64_t i = 0; i < n / 64; i++) {
        const float *q = p + i * 64;
        __m512 a = _mm512_add_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(q + 16));
        __m512 b = _mm512_add_ps(_mm512_loadu_ps(q + 32), _mm512_loadu_ps(q + 48));
        total += _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
    return total;
}

#else

int qk_simd(void) { return 0; }

#endif
