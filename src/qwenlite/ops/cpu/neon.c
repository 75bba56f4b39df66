/* qwenlite's CPU kernels for 64-bit ARM with Advanced SIMD (NEON: every AArch64 CPU, phones, Macs, Graviton,
 * Raspberry Pi 4/5), the same functions, arguments and twins as avx512.c (its header lists them), on 4-lane vectors
 * and 32 registers. The functions mirror avx2.c's one by one.
 *
 * Quantized weights take the float path whatever the activations' dtype: int8 widened to fp32, int4 nibbles
 * widened to fp32, FMA (bf16 activations staged to fp32 once per call). avx2.c's integer path (bf16 activations as
 * int16 blocks) is not here yet; on ARM it would be vmlal_s16, or int8 activations through the dotprod extension's
 * sdot (vdotq_s32) and i8mm's smmla where __ARM_FEATURE_DOTPROD / __ARM_FEATURE_MATMUL_INT8 say the CPU has them.
 *
 * Rounding: each step rounds where avx2.c's does (FMA where it fuses, a separate multiply and add where the twin
 * rounds twice, as in dequantization's (q - 8) * s + z); only the fp32 summation order differs (4 lanes, not 8). */

#include "common.h"

#if !(defined(__aarch64__) && defined(__ARM_NEON))
#error "neon.c needs AArch64 with Advanced SIMD (kernels.py builds it with -march=armv8-a+simd)"
#endif

#include <arm_neon.h>
#include <omp.h>

const char *qk_isa(void) { return "neon"; }

/* ------------------------------------------------------------------------------------------------------------ */
/* 4-lane helpers */

static inline float hsum4(float32x4_t v) { return vaddvq_f32(v); }

/* 4 bf16 -> 4 fp32: the bf16 bits are the fp32's high half */
static inline float32x4_t cvt_bf16x4(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }

/* 4 fp32 -> 4 bf16, rounded to nearest even as torch (and f32_to_bf16) rounds, NaN kept a NaN */
static inline uint16x4_t cvt_f32x4_bf16(float32x4_t v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint16x4_t r = vaddhn_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff))); /* high halves of u + 0x7fff + odd */
    const uint16x4_t nan = vorr_u16(vshrn_n_u32(u, 16), vdup_n_u16(0x40));
    return vbsl_u16(vmovn_u32(vceqq_f32(v, v)), r, nan);
}

/* 1 or 4 values of fp32 or bf16 (`bf`, a compile-time constant where it matters) as fp32, and back */
static inline float32x4_t ld4(const void *p, int64_t i, const int bf) {
    return bf ? cvt_bf16x4(vld1_u16((const uint16_t *)p + i)) : vld1q_f32((const float *)p + i);
}

static inline void st4(void *p, int64_t i, float32x4_t v, const int bf) {
    if (bf)
        vst1_u16((uint16_t *)p + i, cvt_f32x4_bf16(v));
    else
        vst1q_f32((float *)p + i, v);
}

static inline float32x4_t round4(float32x4_t v, const int bf) { return bf ? cvt_bf16x4(cvt_f32x4_bf16(v)) : v; }

/* e^x, the Cephes polynomial of avx2.c's exp8 (vfmsq_f32(a, b, c) = a - b c and vfmaq_f32(a, b, c) = a + b c,
 * fused, as fnmadd / fmadd there), 2^n applied in two halves (n up to 128 at x = 88.37) */
static inline float32x4_t exp4(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(88.37626f)), vdupq_n_f32(-88.37626f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t ni = vcvtq_s32_f32(n), half = vshrq_n_s32(ni, 1);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half, vdupq_n_s32(127)), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(ni, half), vdupq_n_s32(127)), 23));
    return vmulq_f32(vmulq_f32(p, s1), s2);
}

static inline float32x4_t silu4(float32x4_t x) {
    return vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0f), exp4(vsubq_f32(vdupq_n_f32(0.0f), x))));
}

static inline float sumsq(const float *x, int64_t n) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(x + i), vld1q_f32(x + i));
    return hsum4(acc);
}

/* x (n values, fp32 or bf16) as fp32: bf16 widened into scratch slot 0 (common.h's stage_f32, with the allocation
 * checked); NULL if it fails. n % 4 == 0 or a scalar tail. */
static const float *staged(const void *x, int x_bf16, int64_t n) {
    if (!x_bf16) return (const float *)x;
    float *f = scratch(0, sizeof(float) * (size_t)n);
    if (!f) return NULL;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(f + i, ld4(x, i, 1));
    for (; i < n; i++) f[i] = ld1(x, i, 1);
    return f;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* bf16 and fp32 weights, fp32 activations (bf16 ones staged to fp32 once per call): y (M, N) = x (M, K) W^T */

static inline __attribute__((always_inline)) float dot_tail(const void *w, const int wbf, const float *x, int64_t k,
                                                            int64_t K) {
    float acc = 0.0f;
    for (; k < K; k++) acc += ld1(w, k, wbf) * x[k];
    return acc;
}

static inline __attribute__((always_inline)) void float_row(const void *w, const int wbf, const float *x, void *y,
                                                            const int ybf, int64_t n, int64_t N, int64_t K,
                                                            const int MC) {
    float32x4_t acc[MB][4];
    for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = vdupq_n_f32(0.0f);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const float32x4_t w0 = ld4(w, k, wbf), w1 = ld4(w, k + 4, wbf), w2 = ld4(w, k + 8, wbf), w3 = ld4(w, k + 12, wbf);
        for (int m = 0; m < MC; m++) {
            acc[m][0] = vfmaq_f32(acc[m][0], w0, vld1q_f32(x + m * K + k));
            acc[m][1] = vfmaq_f32(acc[m][1], w1, vld1q_f32(x + m * K + k + 4));
            acc[m][2] = vfmaq_f32(acc[m][2], w2, vld1q_f32(x + m * K + k + 8));
            acc[m][3] = vfmaq_f32(acc[m][3], w3, vld1q_f32(x + m * K + k + 12));
        }
    }
    for (; k + 4 <= K; k += 4) {
        const float32x4_t w0 = ld4(w, k, wbf);
        for (int m = 0; m < MC; m++) acc[m][0] = vfmaq_f32(acc[m][0], w0, vld1q_f32(x + m * K + k));
    }
    for (int m = 0; m < MC; m++) {
        const float32x4_t a = vaddq_f32(vaddq_f32(acc[m][0], acc[m][1]), vaddq_f32(acc[m][2], acc[m][3]));
        store_out(y, ybf, m * N + n, hsum4(a) + dot_tail(w, wbf, x + m * K, k, K));
    }
}

static void gemv_float(const void *W, const int wbf, const float *x, void *y, const int ybf, int64_t M, int64_t N,
                       int64_t K, int nthreads) {
    const size_t ysz = ybf ? 2 : 4;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
        const float *xm = x + m0 * K;
        char *ym = (char *)y + m0 * N * ysz;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
        for (int64_t n = 0; n < N; n++) {
            const char *w = (const char *)W + n * K * (wbf ? 2 : 4);
            switch (mc) {
            case 1: float_row(w, wbf, xm, ym, ybf, n, N, K, 1); break;
            case 2: float_row(w, wbf, xm, ym, ybf, n, N, K, 2); break;
            case 3: float_row(w, wbf, xm, ym, ybf, n, N, K, 3); break;
            default: float_row(w, wbf, xm, ym, ybf, n, N, K, 4); break;
            }
        }
    }
}

void qk_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const float *xf = staged(x, 1, M * K);
    if (!xf) return;
    gemv_float(W, 1, xf, y, 1, M, N, K, nthreads);
}

void qk_gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    gemv_float(W, 0, x, y, 0, M, N, K, nthreads);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int8 weights, symmetric: W = q * s, q (N, K) int8, s (N, K/G); G % 16 == 0 */

/* 16 int8 -> 4 x 4 fp32 (exact) */
static inline void i8x16(const int8_t *p, float32x4_t v[4]) {
    const int8x16_t b = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
    v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    v[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    v[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

/* fp32 activations: weights widened to fp32; per group an fp32 sum of q x, then times s */
static inline __attribute__((always_inline)) void int8_row_f32(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                               const float *x, void *y, int y_bf16, int64_t n,
                                                               int64_t N, int64_t K, const int MC) {
    float32x4_t tot[MB];
    for (int m = 0; m < MC; m++) tot[m] = vdupq_n_f32(0.0f);
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        float32x4_t acc[MB][4];
        for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = vdupq_n_f32(0.0f);
        for (int64_t k = g0; k < g0 + G; k += 16) {
            float32x4_t wv[4];
            i8x16(w + k, wv);
            for (int m = 0; m < MC; m++)
                for (int j = 0; j < 4; j++) acc[m][j] = vfmaq_f32(acc[m][j], wv[j], vld1q_f32(x + m * K + k + 4 * j));
        }
        const float32x4_t sv = vdupq_n_f32(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) {
            const float32x4_t a = vaddq_f32(vaddq_f32(acc[m][0], acc[m][1]), vaddq_f32(acc[m][2], acc[m][3]));
            tot[m] = vfmaq_f32(tot[m], a, sv);
        }
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, hsum4(tot[m]));
}

void qk_gemv_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    const float *xf = staged(x, x_bf16, M * K);
    if (!xf) return;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
        const float *xm = xf + m0 * K;
        char *ym = (char *)y + m0 * N * (y_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
        for (int64_t n = 0; n < N; n++) {
            const int8_t *w = W + n * K;
            switch (mc) {
            case 1: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 1); break;
            case 2: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 2); break;
            case 3: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 3); break;
            default: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 4); break;
            }
        }
    }
}

void qk_dequant_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, int64_t r0, int64_t r1, int64_t K,
                     void *out, int out_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (r1 - r0) * K))
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = 0; k < K; k += 16) {
            const float32x4_t sv = vdupq_n_f32(load_scale(s, s_bf16, r * (K / G) + k / G));
            float32x4_t q[4];
            i8x16(W + r * K + k, q);
            for (int j = 0; j < 4; j++) st4(out, (r - r0) * K + k + 4 * j, vmulq_f32(q[j], sv), out_bf16);
        }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int4 weights, asymmetric, tiled64: byte [t, k, j] = q[64t + j, k] | q[64t + 32 + j, k] << 4, shape (Np/64, K, 32);
 * scales_and_zeros (K/G, Np, 2); W = (q - 8) * s + z = q * s + (z - 8 s). The 64 rows of a tile in two halves
 * (low nibbles: rows 0-31, high: 32-63), one activation row at a time over the tile (it stays in L1/L2). */

/* s and z - 8 s of the tile's 64 rows in group gi */
static inline void tile_scales(const void *sz, int s_bf16, int64_t Np, int64_t gi, int64_t t, float *s, float *z8) {
    for (int r = 0; r < 64; r++) {
        const int64_t i = (gi * Np + t * 64 + r) * 2;
        s[r] = load_scale(sz, s_bf16, i);
        z8[r] = load_scale(sz, s_bf16, i + 1) - 8.0f * s[r];
    }
}

/* One column of a tile (32 bytes) as its 64 rows' nibbles in row order: rows 0-15, 16-31, 32-47, 48-63 */
static inline void tile_nibbles(const uint8_t *col, uint8x16_t parts[4]) {
    const uint8x16_t b0 = vld1q_u8(col), b1 = vld1q_u8(col + 16), nib = vdupq_n_u8(15);
    parts[0] = vandq_u8(b0, nib);
    parts[1] = vandq_u8(b1, nib);
    parts[2] = vshrq_n_u8(b0, 4);
    parts[3] = vshrq_n_u8(b1, 4);
}

/* 16 nibbles (one per byte) -> 4 x 4 fp32 (exact) */
static inline void u8x16_f32(uint8x16_t b, float32x4_t v[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_high_u8(b);
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

/* fp32 activations: one column (32 bytes, 64 rows) at a time, nibbles widened to fp32 */
static void int4_tile_f32(const uint8_t *tile, const void *sz, int s_bf16, int64_t G, const float *x,
                          const float *xsum, float *tot, int64_t t, int64_t Np, int64_t K) {
    for (int64_t gi = 0; gi < K / G; gi++) {
        float32x4_t acc[16];
        for (int r = 0; r < 16; r++) acc[r] = vdupq_n_f32(0.0f);
        for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
            uint8x16_t parts[4];
            tile_nibbles(tile + k * 32, parts);
            const float32x4_t xv = vdupq_n_f32(x[k]);
            for (int p = 0; p < 4; p++) { /* rows 16 p .. 16 p + 15 */
                float32x4_t q[4];
                u8x16_f32(parts[p], q);
                for (int j = 0; j < 4; j++) acc[4 * p + j] = vfmaq_f32(acc[4 * p + j], q[j], xv);
            }
        }
        float s[64] __attribute__((aligned(16))), z8[64] __attribute__((aligned(16)));
        tile_scales(sz, s_bf16, Np, gi, t, s, z8);
        const float32x4_t xs = vdupq_n_f32(xsum[gi]);
        for (int r = 0; r < 16; r++) {
            const float32x4_t v = vfmaq_f32(vld1q_f32(tot + 4 * r), acc[r], vld1q_f32(s + 4 * r));
            vst1q_f32(tot + 4 * r, vfmaq_f32(v, vld1q_f32(z8 + 4 * r), xs));
        }
    }
}

void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads) {
    const int64_t ng = K / G;
    float *xsum = scratch(1, sizeof(float) * (size_t)(M * ng));
    const float *xf = staged(x, x_bf16, M * K);
    if (!xsum || !xf) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t gi = 0; gi < ng; gi++) {
            float acc = 0;
            for (int64_t k = gi * G; k < (gi + 1) * G; k++) acc += xf[m * K + k];
            xsum[m * ng + gi] = acc;
        }
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, Np * K))
    for (int64_t t = 0; t < Np / 64; t++) {
        const uint8_t *tile = P + t * K * 32;
        for (int64_t m = 0; m < M; m++) {
            float tot[64] = {0};
            int4_tile_f32(tile, sz, s_bf16, G, xf + m * K, xsum + m * ng, tot, t, Np, K);
            for (int64_t r = 0; r < 64 && t * 64 + r < n_out; r++) store_out(y, y_bf16, m * n_out + t * 64 + r, tot[r]);
        }
    }
}

/* Rows [64 t0, 64 t1) of W, transposed: out (K, 64 (t1 - t0)) = W[rows, :]^T, each value computed as the reference
 * does, (q - 8) * s + z rounded once per op, then rounded to the output dtype. */
void qk_dequant_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, int64_t Np, int64_t t0, int64_t t1,
                     int64_t K, void *out, int out_bf16, int nthreads) {
    const int64_t ld = (t1 - t0) * 64;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (t1 - t0) * 64 * K))
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = P + t * K * 32;
        for (int64_t gi = 0; gi < K / G; gi++) {
            float s[64] __attribute__((aligned(16))), z[64] __attribute__((aligned(16)));
            for (int r = 0; r < 64; r++) {
                s[r] = load_scale(sz, s_bf16, (gi * Np + t * 64 + r) * 2);
                z[r] = load_scale(sz, s_bf16, (gi * Np + t * 64 + r) * 2 + 1);
            }
            for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
                uint8x16_t parts[4];
                tile_nibbles(tile + k * 32, parts);
                for (int p = 0; p < 4; p++) {
                    float32x4_t q[4];
                    u8x16_f32(parts[p], q);
                    for (int j = 0; j < 4; j++) { /* rows 16 p + 4 j .. + 3 */
                        const int r = 16 * p + 4 * j;
                        const float32x4_t w = vaddq_f32(vmulq_f32(vsubq_f32(q[j], vdupq_n_f32(8.0f)), vld1q_f32(s + r)),
                                                        vld1q_f32(z + r));
                        st4(out, k * ld + (t - t0) * 64 + r, w, out_bf16);
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Decode-step fusions, as avx512.c's (the same contracts, comments there) on 4 lanes. */

static inline __attribute__((always_inline)) void rmsnorm_impl(const void *x, int64_t ld, const void *w, float eps,
                                                               void *out, int64_t M, int64_t D, int nthreads,
                                                               const int ABF, const int WBF) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, M * D * 8))
    for (int64_t m = 0; m < M; m++) {
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < D; i += 4) {
            const float32x4_t v = ld4(x, m * ld + i, ABF);
            acc = vfmaq_f32(acc, v, v);
        }
        const float32x4_t r = vdupq_n_f32(1.0f / sqrtf(hsum4(acc) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 4) {
            const float32x4_t scale = vaddq_f32(vdupq_n_f32(1.0f), ld4(w, i, WBF));
            st4(out, m * D + i, vmulq_f32(vmulq_f32(ld4(x, m * ld + i, ABF), r), scale), ABF);
        }
    }
}

void qk_rmsnorm(const void *x, int64_t ld, const void *w, int w_bf16, float eps, void *out, int act_bf16, int64_t M,
                int64_t D, int nthreads) {
    if (act_bf16 && w_bf16) rmsnorm_impl(x, ld, w, eps, out, M, D, nthreads, 1, 1);
    else if (act_bf16) rmsnorm_impl(x, ld, w, eps, out, M, D, nthreads, 1, 0);
    else if (w_bf16) rmsnorm_impl(x, ld, w, eps, out, M, D, nthreads, 0, 1);
    else rmsnorm_impl(x, ld, w, eps, out, M, D, nthreads, 0, 0);
}

/* The gated delta rule for one token on one head, in place (avx512.c's delta_step), 32 columns at a time. */
static void delta_step(float *s, const float *q, const float *k, const float *v, float g, float beta, float *o,
                       int64_t Dk, int64_t Dv) {
    const float32x4_t decay = vdupq_n_f32(expf(g)), bt = vdupq_n_f32(beta);
    for (int64_t j0 = 0; j0 < Dv; j0 += 32) {
        const int nb = (int)((Dv - j0) / 4 < 8 ? (Dv - j0) / 4 : 8);
        float32x4_t acc[8];
        for (int c = 0; c < 8; c++) acc[c] = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < Dk; i++) {
            const float32x4_t ki = vdupq_n_f32(k[i]);
            for (int c = 0; c < nb; c++) acc[c] = vfmaq_f32(acc[c], vld1q_f32(s + i * Dv + j0 + 4 * c), ki);
        }
        float32x4_t d[8], oa[8];
        for (int c = 0; c < nb; c++) {
            d[c] = vmulq_f32(bt, vsubq_f32(vld1q_f32(v + j0 + 4 * c), vmulq_f32(decay, acc[c])));
            oa[c] = vdupq_n_f32(0.0f);
        }
        for (int64_t i = 0; i < Dk; i++) {
            const float32x4_t ki = vdupq_n_f32(k[i]), qi = vdupq_n_f32(q[i]);
            for (int c = 0; c < nb; c++) {
                float *p = s + i * Dv + j0 + 4 * c;
                const float32x4_t x = vfmaq_f32(vmulq_f32(vld1q_f32(p), decay), ki, d[c]);
                vst1q_f32(p, x);
                oa[c] = vfmaq_f32(oa[c], x, qi);
            }
        }
        for (int c = 0; c < nb; c++) vst1q_f32(o + j0 + 4 * c, oa[c]);
    }
}

static inline __attribute__((always_inline)) void gdn_decode_impl(
    const void *qkv, void *conv_state, const void *conv_w, int64_t Kc, const void *a, const void *bp,
    const void *A_log, const void *dt_bias, float *state, const void *z, const void *norm_w, float eps, void *out,
    int64_t B, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nthreads, const int ABF, const int WBF) {
    const int64_t C = 2 * Hk * Dk + Hv * Dv, rep = Hv / Hk;
    float *xs = scratch(0, sizeof(float) * (size_t)(B * C));
    if (!xs) return;
    for (int64_t b = 0; b < B; b++) {
        float *xb = xs + b * C;
        const int64_t cs = b * (Kc - 1) * C;
        for (int64_t c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < Kc - 1; j++) acc += ld1(conv_state, cs + j * C + c, ABF) * ld1(conv_w, c * Kc + j, WBF);
            xb[c] = acc + ld1(qkv, b * C + c, ABF) * ld1(conv_w, c * Kc + Kc - 1, WBF);
        }
        for (int64_t c = 0; c < C; c += 4) {
            vst1q_f32(xb + c, silu4(vld1q_f32(xb + c)));
            for (int64_t j = 0; j + 1 < Kc - 1; j++) st4(conv_state, cs + j * C + c, ld4(conv_state, cs + (j + 1) * C + c, ABF), ABF);
            if (Kc > 1) st4(conv_state, cs + (Kc - 2) * C + c, ld4(qkv, b * C + c, ABF), ABF);
        }
        for (int64_t h = 0; h < 2 * Hk; h++) {
            float *v = xb + h * Dk;
            const float r = 1.0f / sqrtf(sumsq(v, Dk) + 1e-6f) * (h < Hk ? 1.0f / sqrtf((float)Dk) : 1.0f);
            for (int64_t i = 0; i < Dk; i += 4) vst1q_f32(v + i, vmulq_f32(vld1q_f32(v + i), vdupq_n_f32(r)));
        }
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * Hv * Dk * Dv))
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hv; h++) {
            const float *xb = xs + b * C;
            const float *q = xb + (h / rep) * Dk, *k = xb + Hk * Dk + (h / rep) * Dk, *v = xb + 2 * Hk * Dk + h * Dv;
            const float beta = 1.0f / (1.0f + expf(-ld1(bp, b * Hv + h, ABF)));
            const float u = ld1(a, b * Hv + h, ABF) + ld1(dt_bias, h, WBF);
            const float g = -expf(ld1(A_log, h, WBF)) * (u > 20.0f ? u : log1pf(expf(u)));
            float o[Dv] __attribute__((aligned(16)));
            delta_step(state + (b * Hv + h) * Dk * Dv, q, k, v, g, beta, o, Dk, Dv);
            for (int64_t j = 0; j < Dv; j += 4) vst1q_f32(o + j, round4(vld1q_f32(o + j), ABF));
            const float32x4_t r = vdupq_n_f32(1.0f / sqrtf(sumsq(o, Dv) / (float)Dv + eps));
            for (int64_t j = 0; j < Dv; j += 4) {
                const int64_t i = (b * Hv + h) * Dv + j;
                const float32x4_t xh = round4(vmulq_f32(vld1q_f32(o + j), r), ABF);
                const float32x4_t wx = round4(vmulq_f32(ld4(norm_w, j, WBF), xh), ABF && WBF);
                st4(out, i, vmulq_f32(wx, silu4(ld4(z, i, ABF))), ABF);
            }
        }
}

void qk_gdn_decode(const void *qkv, void *conv_state, const void *conv_w, int64_t Kc, const void *a, const void *bp,
                   const void *A_log, const void *dt_bias, float *state, const void *z, const void *norm_w, float eps,
                   void *out, int act_bf16, int w_bf16, int64_t B, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                   int nthreads) {
#define GDN_ARGS qkv, conv_state, conv_w, Kc, a, bp, A_log, dt_bias, state, z, norm_w, eps, out, B, Hk, Hv, Dk, Dv, nthreads
    if (act_bf16 && w_bf16) gdn_decode_impl(GDN_ARGS, 1, 1);
    else if (act_bf16) gdn_decode_impl(GDN_ARGS, 1, 0);
    else if (w_bf16) gdn_decode_impl(GDN_ARGS, 0, 1);
    else gdn_decode_impl(GDN_ARGS, 0, 0);
#undef GDN_ARGS
}

static inline __attribute__((always_inline)) void norm_rope(float *x, const void *w, float eps, const void *cos,
                                                            const void *sin, int64_t R, int64_t D, const int ABF,
                                                            const int WBF) {
    if (w) { /* the q/k norm, where the layer has one (NULL: Qwen2) */
        const float32x4_t r = vdupq_n_f32(1.0f / sqrtf(sumsq(x, D) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 4) {
            const float32x4_t scale = vaddq_f32(vdupq_n_f32(1.0f), ld4(w, i, WBF));
            vst1q_f32(x + i, round4(vmulq_f32(vmulq_f32(vld1q_f32(x + i), r), scale), ABF));
        }
    }
    for (int64_t i = 0; i < R / 2; i++) {
        const float c = ld1(cos, i, ABF), s = ld1(sin, i, ABF);
        const float x1 = x[i], x2 = x[i + R / 2];
#define RND(v) (ABF ? bf16_to_f32(f32_to_bf16(v)) : (v))
        x[i] = RND(RND(x1 * c) + RND(-x2 * s));
        x[i + R / 2] = RND(RND(x2 * c) + RND(x1 * s));
#undef RND
    }
}

static inline __attribute__((always_inline)) void attn_decode_impl(
    const void *qg, const void *kx, const void *vx, const void *q_w, const void *k_w, float eps,
    const void *cos, const void *sin, int64_t R, const int64_t *pos, void *kc, void *vc, void *out, int gated, int64_t B,
    int64_t H, int64_t Hkv, int64_t Tmax, int64_t D, int nthreads, const int ABF, const int WBF) {
    const int64_t rep = H / Hkv, qstride = gated ? 2 * D : D;
    const size_t esz = ABF ? 2 : 4;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) {
        longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
        for (int64_t h = 0; h < Hkv; h++) {
            float k[D] __attribute__((aligned(16)));
            const int64_t src = (b * Hkv + h) * D, dst = ((b * Hkv + h) * Tmax + pos[b]) * D;
            for (int64_t i = 0; i < D; i += 4) vst1q_f32(k + i, ld4(kx, src + i, ABF));
            norm_rope(k, k_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            for (int64_t i = 0; i < D; i += 4) st4(kc, dst + i, vld1q_f32(k + i), ABF);
            memcpy((char *)vc + dst * esz, (const char *)vx + src * esz, D * esz);
        }
    }
    const int nt = threads_for(nthreads, B * H * longest * D * 16);
    /* the scores of one (row, head) per thread, allocated before the parallel loop */
    float *scores = scratch(0, sizeof(float) * (size_t)(nt * longest));
    if (!scores) return;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t L = pos[b] + 1, base = (b * Hkv + h / rep) * Tmax * D, qoff = (b * H + h) * qstride;
            float q[D] __attribute__((aligned(16))), acc[D] __attribute__((aligned(16)));
            for (int64_t i = 0; i < D; i += 4) vst1q_f32(q + i, ld4(qg, qoff + i, ABF));
            norm_rope(q, q_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            const float32x4_t scale = vdupq_n_f32(1.0f / sqrtf((float)D));
            for (int64_t i = 0; i < D; i += 4) {
                vst1q_f32(q + i, vmulq_f32(vld1q_f32(q + i), scale));
                vst1q_f32(acc + i, vdupq_n_f32(0.0f));
            }
            float *p = scores + (int64_t)omp_get_thread_num() * longest;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                float32x4_t sc = vdupq_n_f32(0.0f);
                for (int64_t i = 0; i < D; i += 4) sc = vfmaq_f32(sc, vld1q_f32(q + i), ld4(kc, base + t * D + i, ABF));
                p[t] = hsum4(sc);
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int64_t t = 0; t < L; t++) {
                p[t] = expf(p[t] - mx);
                sum += p[t];
                const float32x4_t pt = vdupq_n_f32(p[t]);
                for (int64_t i = 0; i < D; i += 4)
                    vst1q_f32(acc + i, vfmaq_f32(vld1q_f32(acc + i), pt, ld4(vc, base + t * D + i, ABF)));
            }
            const float32x4_t inv = vdupq_n_f32(1.0f / sum);
            for (int64_t i = 0; i < D; i += 4) {
                float32x4_t o = round4(vmulq_f32(vld1q_f32(acc + i), inv), ABF);
                if (gated) {
                    const float32x4_t gate = ld4(qg, qoff + D + i, ABF);
                    const float32x4_t sig = vdivq_f32(vdupq_n_f32(1.0f),
                                                      vaddq_f32(vdupq_n_f32(1.0f), exp4(vsubq_f32(vdupq_n_f32(0.0f), gate))));
                    o = vmulq_f32(o, round4(sig, ABF));
                }
                st4(out, (b * H + h) * D + i, o, ABF);
            }
        }
}

void qk_attn_decode(const void *qg, const void *kx, const void *vx, const void *q_w, const void *k_w, float eps,
                    const void *cos, const void *sin, int64_t R, const int64_t *pos, void *kc, void *vc, void *out,
                    int gated, int act_bf16, int w_bf16, int64_t B, int64_t H, int64_t Hkv, int64_t Tmax, int64_t D, int nthreads) {
#define ATTN_ARGS qg, kx, vx, q_w, k_w, eps, cos, sin, R, pos, kc, vc, out, gated, B, H, Hkv, Tmax, D, nthreads
    if (act_bf16 && w_bf16) attn_decode_impl(ATTN_ARGS, 1, 1);
    else if (act_bf16) attn_decode_impl(ATTN_ARGS, 1, 0);
    else if (w_bf16) attn_decode_impl(ATTN_ARGS, 0, 1);
    else attn_decode_impl(ATTN_ARGS, 0, 0);
#undef ATTN_ARGS
}

static inline __attribute__((always_inline)) void conv_silu_impl(const void *x, void *state, const void *w, float *out,
                                                                 int64_t B, int64_t T, int64_t C, int64_t Kc,
                                                                 int nthreads, const int ABF, const int WBF) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * T * C * Kc))
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c += 4) {
            float32x4_t wt[8], hist[8];
            for (int64_t j = 0; j < Kc; j++) {
                float v[4];
                for (int i = 0; i < 4; i++) v[i] = ld1(w, (c + i) * Kc + j, WBF);
                wt[j] = vld1q_f32(v);
            }
            for (int64_t j = 0; j < Kc - 1; j++) hist[j] = ld4(state, (b * (Kc - 1) + j) * C + c, ABF);
            for (int64_t t = 0; t < T; t++) {
                const float32x4_t now = ld4(x, (b * T + t) * C + c, ABF);
                float32x4_t acc = Kc > 1 ? vmulq_f32(hist[0], wt[0]) : vmulq_f32(now, wt[0]);
                for (int64_t j = 1; j < Kc - 1; j++) acc = vaddq_f32(acc, vmulq_f32(hist[j], wt[j]));
                if (Kc > 1) acc = vaddq_f32(acc, vmulq_f32(now, wt[Kc - 1]));
                vst1q_f32(out + (b * T + t) * C + c, silu4(acc));
                for (int64_t j = 0; j + 1 < Kc - 1; j++) hist[j] = hist[j + 1];
                if (Kc > 1) hist[Kc - 2] = now;
            }
            for (int64_t j = 0; j < Kc - 1; j++) st4(state, (b * (Kc - 1) + j) * C + c, hist[j], ABF);
        }
}

void qk_conv_silu(const void *x, void *state, const void *w, float *out, int act_bf16, int w_bf16, int64_t B,
                  int64_t T, int64_t C, int64_t Kc, int nthreads) {
    if (act_bf16 && w_bf16) conv_silu_impl(x, state, w, out, B, T, C, Kc, nthreads, 1, 1);
    else if (act_bf16) conv_silu_impl(x, state, w, out, B, T, C, Kc, nthreads, 1, 0);
    else if (w_bf16) conv_silu_impl(x, state, w, out, B, T, C, Kc, nthreads, 0, 1);
    else conv_silu_impl(x, state, w, out, B, T, C, Kc, nthreads, 0, 0);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* The decode step (step.h) with this file's vectors */

#define VL 4
#define V_LD ld4
#define V_ST st4
#define V_ADD vaddq_f32
#define V_MUL vmulq_f32
#define V_ROUND round4
#define V_SILU silu4
#include "step.h"

/* Memory bandwidth probe: read `n` floats once, as a decode step reads its weights (`qwenlite bench`). */
float qk_read(const float *p, int64_t n, int nthreads) {
    float total = 0.0f;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : total)
    for (int64_t i = 0; i < n / 64; i++) {
        const float *q = p + i * 64;
        float32x4_t a[4];
        for (int j = 0; j < 4; j++)
            a[j] = vaddq_f32(vaddq_f32(vld1q_f32(q + 16 * j), vld1q_f32(q + 16 * j + 4)),
                             vaddq_f32(vld1q_f32(q + 16 * j + 8), vld1q_f32(q + 16 * j + 12)));
        total += hsum4(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
    }
    return total;
}
