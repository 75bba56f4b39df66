/* qwenlite's CPU kernels for 64-bit ARM with Advanced SIMD (NEON: every AArch64 CPU, phones, Macs, Graviton,
 * Raspberry Pi 4/5), the same functions, arguments and twins as avx512.c (its header lists them), on 4-lane vectors
 * and 32 registers. The functions mirror avx2.c's one by one.
 *
 * Quantized weights meet bf16 activations as on avx2.c (its header says how and why), in integers:
 * - int8 weights: the activations as int16 blocks with power-of-two scales (quant_x86.h's quantize_x16), the weights
 *   widened to int16, smlal (4 products an instruction) into int32, kept in avx2.c's 8 lanes, in both builds
 *   (sdot multiplies int8 only: int16 activations would need splitting into two bytes each, not done);
 * - int4 weights: the activations as int8 blocks of 16 (scale max |x| / 127, quant_matmul.quantize_activations is
 *   the twin), with the dotprod extension's sdot (vdotq_s32, 16 products an instruction, four columns' bytes
 *   transposed into row-major quads, then split into nibbles) where the compiler targets it (__ARM_FEATURE_DOTPROD:
 *   kernels.py builds with -march=armv8.2-a+dotprod where /proc/cpuinfo lists asimddp), else ARMv8.0's smlal on
 *   int8 (8 products an instruction, on each column's nibbles as they lie); 32 rows of a tile a pass.
 * The integers are exact and every fp32 step after them is avx2.c's, so both builds give avx2.c's bits for these
 * GEMVs; tests/test_kernel_builds.py checks it. fp32 activations (fp32 models: tests, training) keep the float path:
 * weights widened to fp32, FMA. i8mm's smmla (__ARM_FEATURE_MATMUL_INT8) is not used yet.
 *
 * Rounding: each step rounds where avx2.c's does (FMA where it fuses, a separate multiply and add where the twin
 * rounds twice, as in dequantization's (q - 8) * s + z); only the fp32 summation order differs (4 lanes, not 8),
 * except in the integer GEMVs above, which keep avx2.c's order. */

#include "common.h"

#if !(defined(__aarch64__) && defined(__ARM_NEON))
#error "neon.c needs AArch64 with Advanced SIMD (kernels.py builds it with -march=armv8-a+simd or armv8.2-a+dotprod)"
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

#include "gemv_float.h"

void qk_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const float *xf = stage_f32(x, 1, M * K);
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

/* bf16 activations as int16 blocks, quant_x86.h's quantize_x16 (avx2.c's header says why): blocks of common.h's
 * block_len columns, each scale a power of two with the block's largest |x| < 2^15 sx; an inf or NaN makes the
 * scale NaN, so the outputs are NaN. */
static void quantize_x16(const uint16_t *x, int64_t M, int64_t K, int64_t BL, int16_t *xq, float *sx) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / BL; b++) {
            const uint16_t *xb = x + m * K + b * BL;
            uint16x8_t most = vdupq_n_u16(0); /* the largest |x| as bf16 bits: the exponent decides the scale */
            for (int64_t i = 0; i < BL; i += 8) most = vmaxq_u16(most, vandq_u16(vld1q_u16(xb + i), vdupq_n_u16(0x7fff)));
            const uint16_t top = vmaxvq_u16(most);
            int e = 0;
            if (top) frexpf(bf16_to_f32(top), &e); /* top < 2^e */
            const float scale = ldexpf(1.0f, e - 15), inv = ldexpf(1.0f, 15 - e);
            sx[m * (K / BL) + b] = top >= 0x7f80 ? NAN : scale;
            for (int64_t i = 0; i < BL; i += 8) {
                const uint16x8_t h = vld1q_u16(xb + i);
                const int32x4_t lo = vcvtnq_s32_f32(vmulq_f32(cvt_bf16x4(vget_low_u16(h)), vdupq_n_f32(inv)));
                const int32x4_t hi = vcvtnq_s32_f32(vmulq_f32(cvt_bf16x4(vget_high_u16(h)), vdupq_n_f32(inv)));
                vst1q_s16(xq + m * K + b * BL + i, vcombine_s16(vqmovn_s32(lo), vqmovn_s32(hi)));
            }
        }
}

/* The sum of 8 lanes (a: 0-3, b: 4-7) in avx2.c's hsum8 order, ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)) */
static inline float hsum8(float32x4_t a, float32x4_t b) {
    const float32x4_t t = vaddq_f32(a, b);
    const float32x2_t u = vadd_f32(vget_low_f32(t), vget_high_f32(t));
    return vget_lane_f32(u, 0) + vget_lane_f32(u, 1);
}

/* int16 activations: per block, int32 sums of q xq (weights widened to int16, smull / smlal: 4 products an
 * instruction), then an fp32 sum of (block sum) sx per group, times s. The int32 sums are kept in avx2.c's 8 lanes
 * (lane i: the columns 2i and 2i + 1 of every 16), so each fp32 step rounds as there: the same bits. */
static inline __attribute__((always_inline)) void int8_row_i16(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                               int64_t BL, const int16_t *xq, const float *sx,
                                                               void *y, int y_bf16, int64_t n, int64_t N, int64_t K,
                                                               const int MC) {
    const int64_t nb = K / BL;
    float32x4_t tot[MB][2];
    for (int m = 0; m < MC; m++) tot[m][0] = tot[m][1] = vdupq_n_f32(0.0f);
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        float32x4_t gacc[MB][2];
        for (int m = 0; m < MC; m++) gacc[m][0] = gacc[m][1] = vdupq_n_f32(0.0f);
        for (int64_t b0 = g0; b0 < g0 + G; b0 += BL) {
            int32x4_t acc[MB][4]; /* lane j of acc[m][c]: column 4 c + j of every 16 */
            for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = vdupq_n_s32(0);
            for (int64_t k = b0; k < b0 + BL; k += 16) {
                const int8x16_t wb = vld1q_s8(w + k);
                const int16x8_t wl = vmovl_s8(vget_low_s8(wb)), wh = vmovl_high_s8(wb);
                for (int m = 0; m < MC; m++) {
                    const int16x8_t x0 = vld1q_s16(xq + m * K + k), x1 = vld1q_s16(xq + m * K + k + 8);
                    acc[m][0] = vmlal_s16(acc[m][0], vget_low_s16(wl), vget_low_s16(x0));
                    acc[m][1] = vmlal_high_s16(acc[m][1], wl, x0);
                    acc[m][2] = vmlal_s16(acc[m][2], vget_low_s16(wh), vget_low_s16(x1));
                    acc[m][3] = vmlal_high_s16(acc[m][3], wh, x1);
                }
            }
            for (int m = 0; m < MC; m++) {
                const float32x4_t bs = vdupq_n_f32(sx[m * nb + b0 / BL]);
                const int32x4_t lo = vpaddq_s32(acc[m][0], acc[m][1]), hi = vpaddq_s32(acc[m][2], acc[m][3]);
                gacc[m][0] = vfmaq_f32(gacc[m][0], vcvtq_f32_s32(lo), bs);
                gacc[m][1] = vfmaq_f32(gacc[m][1], vcvtq_f32_s32(hi), bs);
            }
        }
        const float32x4_t sv = vdupq_n_f32(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) {
            tot[m][0] = vfmaq_f32(tot[m][0], gacc[m][0], sv);
            tot[m][1] = vfmaq_f32(tot[m][1], gacc[m][1], sv);
        }
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, hsum8(tot[m][0], tot[m][1]));
}

#include "gemv_int8.h"

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

/* bf16 activations as int8, in blocks of 16 columns (never crossing a weight group: G % 16 == 0): quant_x86.h's
 * quantize_x8 (twin: quant_matmul.quantize_activations), x (M, K) bf16 -> xq (M, K) int8 and sx (M, K / 16),
 * x ~ xq * sx with sx = max |x| / 127, rounded to nearest even. An inf or NaN in a block makes its scale NaN. */
static void quantize_x8(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *sx) {
    for (int64_t i = 0; i < M * K; i += 16) {
        const uint16x8_t h0 = vld1q_u16(x + i), h1 = vld1q_u16(x + i + 8);
        const float32x4_t v[4] = {cvt_bf16x4(vget_low_u16(h0)), cvt_bf16x4(vget_high_u16(h0)),
                                  cvt_bf16x4(vget_low_u16(h1)), cvt_bf16x4(vget_high_u16(h1))};
        float32x4_t most = vabsq_f32(v[0]);
        uint32x4_t finite = vcltq_f32(most, vdupq_n_f32(INFINITY)); /* false for inf and NaN */
        for (int j = 1; j < 4; j++) {
            most = vmaxq_f32(most, vabsq_f32(v[j]));
            finite = vandq_u32(finite, vcltq_f32(vabsq_f32(v[j]), vdupq_n_f32(INFINITY)));
        }
        const float top = vmaxvq_f32(most);
        const int bad = vminvq_u32(finite) == 0;
        sx[i / 16] = bad ? NAN : top / 127.0f;
        const float32x4_t inv = vdupq_n_f32(top > 0 && !bad ? 127.0f / top : 0.0f);
        int16x4_t q[4];
        for (int j = 0; j < 4; j++) q[j] = vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[j], inv)));
        vst1q_s8(xq + i, vcombine_s8(vqmovn_s16(vcombine_s16(q[0], q[1])), vqmovn_s16(vcombine_s16(q[2], q[3]))));
    }
}

/* The 32 rows of a tile in bytes h .. h + 15 of its 32-byte columns (h = 0 or 16: rows h .. h + 15 in the low
 * nibbles, 32 + h .. 47 + h in the high ones) over the columns [k0, k1) of one weight group, for MC rows of int8
 * activations: per block of 16 columns the exact int32 sums of q xq, in fp32 times the block's sx, added to
 * f (MC, 32) (f[m][i]: the low-nibble row h + i for i < 16, the high-nibble row 16 + h + i after). */
#if defined(__ARM_FEATURE_DOTPROD)
enum { PASS_ROWS = 2 }; /* rows of x per pass: 8 accumulators each, 32 registers */

/* sdot (vdotq_s32, 16 products an instruction): four columns' bytes transposed to row-major quads (byte 4r + c: row
 * r, column c), then split into nibbles; each 32-bit lane meets the activations xq[k .. k + 3] as one value. */
static inline __attribute__((always_inline)) void group_sums(const uint8_t *col, int64_t k0, int64_t k1,
                                                             const int8_t *xq, const float *sx, int64_t K, float *f,
                                                             const int MC) {
    for (int64_t b0 = k0; b0 < k1; b0 += 16) {
        int32x4_t acc[PASS_ROWS][8];
        for (int m = 0; m < MC; m++)
            for (int i = 0; i < 8; i++) acc[m][i] = vdupq_n_s32(0);
#pragma GCC unroll 1 /* unrolled, the four steps' weights stay live together and the accumulators spill */
        for (int64_t k = b0; k < b0 + 16; k += 4) {
            const uint8x16_t c0 = vld1q_u8(col + k * 32), c1 = vld1q_u8(col + (k + 1) * 32);
            const uint8x16_t c2 = vld1q_u8(col + (k + 2) * 32), c3 = vld1q_u8(col + (k + 3) * 32);
            const uint16x8_t a0 = vreinterpretq_u16_u8(vzip1q_u8(c0, c1)), a1 = vreinterpretq_u16_u8(vzip2q_u8(c0, c1));
            const uint16x8_t d0 = vreinterpretq_u16_u8(vzip1q_u8(c2, c3)), d1 = vreinterpretq_u16_u8(vzip2q_u8(c2, c3));
            const uint8x16_t q[4] = {vreinterpretq_u8_u16(vzip1q_u16(a0, d0)), vreinterpretq_u8_u16(vzip2q_u16(a0, d0)),
                                     vreinterpretq_u8_u16(vzip1q_u16(a1, d1)), vreinterpretq_u8_u16(vzip2q_u16(a1, d1))};
            int8x16_t w[8]; /* rows 4i .. 4i + 3 of the 32 */
            for (int i = 0; i < 4; i++) {
                w[i] = vreinterpretq_s8_u8(vandq_u8(q[i], vdupq_n_u8(15)));
                w[4 + i] = vreinterpretq_s8_u8(vshrq_n_u8(q[i], 4));
            }
            for (int m = 0; m < MC; m++) {
                int32_t quad;
                memcpy(&quad, xq + m * K + k, 4);
                const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(quad));
                for (int i = 0; i < 8; i++) acc[m][i] = vdotq_s32(acc[m][i], w[i], xv);
            }
        }
        for (int m = 0; m < MC; m++) {
            const float32x4_t bs = vdupq_n_f32(sx[m * (K / 16) + b0 / 16]);
            for (int i = 0; i < 8; i++) vst1q_f32(f + m * 32 + 4 * i, vfmaq_f32(vld1q_f32(f + m * 32 + 4 * i), vcvtq_f32_s32(acc[m][i]), bs));
        }
    }
}
#else
enum { PASS_ROWS = MB };

/* ARMv8.0: per column, the 32 rows' nibbles times the column's activation, smlal into int16 (8 products an
 * instruction; 16 columns of at most 15 * 128 stay below 2^15), widened to int32 once per block. */
static inline __attribute__((always_inline)) void group_sums(const uint8_t *col, int64_t k0, int64_t k1,
                                                             const int8_t *xq, const float *sx, int64_t K, float *f,
                                                             const int MC) {
    for (int64_t b0 = k0; b0 < k1; b0 += 16) {
        int16x8_t a[PASS_ROWS][4]; /* rows 8j .. 8j + 7 of the 32 */
        for (int m = 0; m < MC; m++) a[m][0] = a[m][1] = a[m][2] = a[m][3] = vdupq_n_s16(0);
        for (int64_t k = b0; k < b0 + 16; k++) {
            const uint8x16_t c = vld1q_u8(col + k * 32);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(c, vdupq_n_u8(15))), hi = vreinterpretq_s8_u8(vshrq_n_u8(c, 4));
            for (int m = 0; m < MC; m++) {
                const int8x16_t xv = vdupq_n_s8(xq[m * K + k]);
                a[m][0] = vmlal_s8(a[m][0], vget_low_s8(lo), vget_low_s8(xv));
                a[m][1] = vmlal_high_s8(a[m][1], lo, xv);
                a[m][2] = vmlal_s8(a[m][2], vget_low_s8(hi), vget_low_s8(xv));
                a[m][3] = vmlal_high_s8(a[m][3], hi, xv);
            }
        }
        for (int m = 0; m < MC; m++) {
            const float32x4_t bs = vdupq_n_f32(sx[m * (K / 16) + b0 / 16]);
            for (int j = 0; j < 4; j++) {
                float *fj = f + m * 32 + 8 * j;
                vst1q_f32(fj, vfmaq_f32(vld1q_f32(fj), vcvtq_f32_s32(vmovl_s16(vget_low_s16(a[m][j]))), bs));
                vst1q_f32(fj + 4, vfmaq_f32(vld1q_f32(fj + 4), vcvtq_f32_s32(vmovl_high_s16(a[m][j])), bs));
            }
        }
    }
}
#endif

/* int8 activations, MC rows of x over one tile, 32 rows of it a pass (group_sums, PASS_ROWS rows of x at a time);
 * per group, f times s, plus (z - 8 s) times the group's sum of x. Row by row the fp32 steps are avx2.c's
 * int4_tile_i8's, on the same integers: the same bits. */
static inline __attribute__((always_inline)) void int4_tile_i8(const uint8_t *tile, const void *sz, int s_bf16,
                                                               int64_t G, const int8_t *xq, const float *sx,
                                                               const float *xsum, float *tot, int64_t t, int64_t Np,
                                                               int64_t K, const int MC) {
    const int64_t ng = K / G;
    for (int64_t gi = 0; gi < ng; gi++) {
        float s[64] __attribute__((aligned(16))), z8[64] __attribute__((aligned(16)));
        tile_scales(sz, s_bf16, Np, gi, t, s, z8);
        for (int h = 0; h < 32; h += 16) {
            float f[MB * 32] __attribute__((aligned(16))) = {0};
            for (int m0 = 0; m0 < MC; m0 += PASS_ROWS) {
                const int mc = MC - m0 < PASS_ROWS ? MC - m0 : PASS_ROWS;
                const int8_t *xm = xq + m0 * K;
                const float *sm = sx + m0 * (K / 16);
                if (mc == PASS_ROWS) group_sums(tile + h, gi * G, (gi + 1) * G, xm, sm, K, f + m0 * 32, PASS_ROWS);
                else group_sums(tile + h, gi * G, (gi + 1) * G, xm, sm, K, f + m0 * 32, mc);
            }
            for (int m = 0; m < MC; m++) {
                const float32x4_t xs = vdupq_n_f32(xsum[m * ng + gi]);
                for (int i = 0; i < 8; i++) {
                    const int row = (i < 4 ? h : 32 + h) + 4 * (i % 4);
                    float *o = tot + m * 64 + row;
                    const float32x4_t v = vfmaq_f32(vld1q_f32(o), vld1q_f32(f + m * 32 + 4 * i), vld1q_f32(s + row));
                    vst1q_f32(o, vfmaq_f32(v, vld1q_f32(z8 + row), xs));
                }
            }
        }
    }
}

void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads) {
    const int64_t ng = K / G;
    float *xsum = scratch(1, sizeof(float) * (size_t)(M * ng + (x_bf16 ? M * (K / 16) : 0)));
    int8_t *xq = x_bf16 ? scratch(0, (size_t)(M * K)) : NULL;
    if (!xsum || (x_bf16 && !xq)) return;
    float *sx = xsum + M * ng;
    const float *xf = x_bf16 ? NULL : x;
    if (x_bf16) quantize_x8(x, M, K, xq, sx);
    for (int64_t m = 0; m < M; m++) /* the sums of the x the products see: quantized ones where they are */
        for (int64_t gi = 0; gi < ng; gi++) {
            float acc = 0;
            if (x_bf16) {
                for (int64_t b = gi * G / 16; b < (gi + 1) * G / 16; b++)
                    acc += (float)vaddlvq_s8(vld1q_s8(xq + m * K + 16 * b)) * sx[m * (K / 16) + b];
            } else {
                for (int64_t k = gi * G; k < (gi + 1) * G; k++) acc += xf[m * K + k];
            }
            xsum[m * ng + gi] = acc;
        }
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, Np * K))
    for (int64_t t = 0; t < (n_out + 63) / 64; t++) { /* the tiles of the first n_out rows: Np is their stride */
        const uint8_t *tile = P + t * K * 32;
        if (!x_bf16) { /* fp32 activations: one row at a time */
            for (int64_t m = 0; m < M; m++) {
                float tot[64] = {0};
                int4_tile_f32(tile, sz, s_bf16, G, xf + m * K, xsum + m * ng, tot, t, Np, K);
                for (int64_t r = 0; r < 64 && t * 64 + r < n_out; r++) store_out(y, y_bf16, m * n_out + t * 64 + r, tot[r]);
            }
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mc = (int)(M - m0 < MB ? M - m0 : MB);
            float tot[MB * 64] __attribute__((aligned(16))) = {0};
            const int8_t *xm = xq + m0 * K;
            const float *sm = sx + m0 * (K / 16), *xs = xsum + m0 * ng;
            switch (mc) {
            case 1: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 1); break;
            case 2: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 2); break;
            case 3: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 3); break;
            default: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 4); break;
            }
            for (int m = 0; m < mc; m++)
                for (int64_t r = 0; r < 64 && t * 64 + r < n_out; r++)
                    store_out(y, y_bf16, (m0 + m) * n_out + t * 64 + r, tot[m * 64 + r]);
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
                       int64_t Dk, int64_t Dv, int64_t ld) {
    const float32x4_t decay = vdupq_n_f32(expf(g)), bt = vdupq_n_f32(beta);
    for (int64_t j0 = 0; j0 < Dv; j0 += 32) {
        const int nb = (int)((Dv - j0) / 4 < 8 ? (Dv - j0) / 4 : 8);
        float32x4_t acc[8];
        for (int c = 0; c < 8; c++) acc[c] = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < Dk; i++) {
            const float32x4_t ki = vdupq_n_f32(k[i]);
            for (int c = 0; c < nb; c++) acc[c] = vfmaq_f32(acc[c], vld1q_f32(s + i * ld + j0 + 4 * c), ki);
        }
        float32x4_t d[8], oa[8];
        for (int c = 0; c < nb; c++) {
            d[c] = vmulq_f32(bt, vsubq_f32(vld1q_f32(v + j0 + 4 * c), vmulq_f32(decay, acc[c])));
            oa[c] = vdupq_n_f32(0.0f);
        }
        for (int64_t i = 0; i < Dk; i++) {
            const float32x4_t ki = vdupq_n_f32(k[i]), qi = vdupq_n_f32(q[i]);
            for (int c = 0; c < nb; c++) {
                float *p = s + i * ld + j0 + 4 * c;
                const float32x4_t x = vfmaq_f32(vmulq_f32(vld1q_f32(p), decay), ki, d[c]);
                vst1q_f32(p, x);
                oa[c] = vfmaq_f32(oa[c], x, qi);
            }
        }
        for (int c = 0; c < nb; c++) vst1q_f32(o + j0 + 4 * c, oa[c]);
    }
}

#define DELTA_COLS 32 /* delta_step's columns per pass */

#include "delta_rule.h"

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
        for (int64_t c = 0; c < C; c += 4) { /* 4 channels at a time, each summed in the scalar order */
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int64_t j = 0; j < Kc; j++) {
                float w[4];
                for (int i = 0; i < 4; i++) w[i] = ld1(conv_w, (c + i) * Kc + j, WBF);
                const float32x4_t in = j < Kc - 1 ? ld4(conv_state, cs + j * C + c, ABF) : ld4(qkv, b * C + c, ABF);
                acc = vaddq_f32(acc, vmulq_f32(in, vld1q_f32(w)));
            }
            vst1q_f32(xb + c, silu4(acc));
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
            delta_step(state + (b * Hv + h) * Dk * Dv, q, k, v, g, beta, o, Dk, Dv, Dv);
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
