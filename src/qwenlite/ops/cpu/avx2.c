/* qwenlite's CPU kernels for x86 with AVX2 and FMA (x86-64-v3: every x86 laptop and server since 2013-2015), the
 * same functions, arguments and twins as avx512.c (its header lists them), on 8-lane vectors and 16 registers.
 *
 * Quantized weights meet bf16 activations in integers (as in avx512.c, through AVX512-VNNI there): each activation
 * row is quantized once per call (quant_x86.h) and the weights are multiplied in integers:
 * - int8 weights: the activations as int16 in blocks (one power-of-two scale per block of at most 256 columns
 *   inside a weight group), the weights widened to int16, both through vpmaddwd (16 products per instruction,
 *   summed in pairs into int32). A power-of-two block scale keeps every bf16 value within 2^7 of its block's largest
 *   exactly, and the rest within 2^-15 of that largest, below bf16's own rounding (2^-9 of each value); the block
 *   sums (at most 128 pairs of 127 x 32767 per lane) cannot overflow int32.
 * - int4 weights: the activations as int8 in blocks of 16 (scale max |x| / 127, quant_matmul.quantize_activations is
 *   the twin), the nibbles of two adjacent columns side by side meeting an activation pair in vpmaddubsw (32
 *   products per instruction, summed in pairs into int16; 8 pairs per block stay below 2^15). The cost, against
 *   float activations, is stated in tests/test_kernels.py (KL 3.5e-5 on a trained model, where the int4 weights
 *   themselves cost 1.6e-3).
 * Both GEMVs pass over W once for all rows of x (a tile or a block of rows of W against every 4 rows of x in turn),
 * so prefill takes them too (kernels.integer_gemv). fp32 activations (fp32 models: tests, training) keep the float
 * path: weights widened to fp32, FMA. */

#include "common.h"

#if !(defined(__AVX2__) && defined(__FMA__))
#error "avx2.c needs AVX2 and FMA (kernels.py builds it with -march=x86-64-v3)"
#endif

#include <immintrin.h>
#include <omp.h>

#include "quant_x86.h"

const char *qk_isa(void) { return "avx2"; }

/* ------------------------------------------------------------------------------------------------------------ */
/* 8-lane helpers */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 8 fp32 -> 8 bf16, rounded to nearest even as torch (and f32_to_bf16) rounds, NaN kept a NaN */
static inline __m128i cvt_f32x8_bf16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    r = _mm256_packus_epi32(r, r); /* per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7] */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, _MM_SHUFFLE(3, 1, 2, 0)));
}

/* 1 or 8 values of fp32 or bf16 (`bf`, a compile-time constant where it matters) as fp32, and back */
static inline __m256 ld8(const void *p, int64_t i, const int bf) {
    return bf ? cvt_bf16x8(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))) : _mm256_loadu_ps((const float *)p + i);
}

static inline void st8(void *p, int64_t i, __m256 v, const int bf) {
    if (bf)
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), cvt_f32x8_bf16(v));
    else
        _mm256_storeu_ps((float *)p + i, v);
}

static inline __m256 round8(__m256 v, const int bf) { return bf ? cvt_bf16x8(cvt_f32x8_bf16(v)) : v; }

/* e^x, the Cephes polynomial of avx512.c's exp16, with 2^n applied in two halves (n up to 128 at x = 88.37) */
static inline __m256 exp8(__m256 x) {
    /* clamped; x86 min / max return the second operand when one is NaN: x second, so a NaN stays a NaN */
    x = _mm256_max_ps(_mm256_set1_ps(-88.37626f), _mm256_min_ps(_mm256_set1_ps(88.37626f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static inline __m256 silu8(__m256 x) {
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

static inline float sumsq(const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    return hsum8(acc);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* bf16 and fp32 weights, fp32 activations (bf16 ones staged to fp32 once per call): y (M, N) = x (M, K) W^T */

/* How far ahead of the weights being multiplied the int4 GEMV prefetches, in bytes: a decode step streams them from
 * memory once, and the hardware prefetcher alone left it waiting on loads (perf: 22% of its cycles on one load);
 * 4 KB measured best on a 2-core Zen 3 (0.8B int4 decode 50 -> 57-59 tok/s; 2 KB 56, 8 KB 54-55). The int8 GEMV
 * gained nothing from it (33.6 against 33.7 tok/s), though it too streams below the bandwidth probe's rate (27 GB/s
 * against ~37 over the 0.8B's matrices; 50 GB/s in cache). */
#define PREFETCH 4096

static inline __attribute__((always_inline)) float dot_tail(const void *w, const int wbf, const float *x, int64_t k,
                                                            int64_t K) {
    float acc = 0.0f;
    for (; k < K; k++) acc += ld1(w, k, wbf) * x[k];
    return acc;
}

static inline __attribute__((always_inline)) void float_row(const void *w, const int wbf, const float *x, void *y,
                                                            const int ybf, int64_t n, int64_t N, int64_t K,
                                                            const int MC) {
    __m256 acc[MB][2];
    for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = ld8(w, k, wbf), w1 = ld8(w, k + 8, wbf);
        for (int m = 0; m < MC; m++) {
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        const __m256 w0 = ld8(w, k, wbf);
        for (int m = 0; m < MC; m++) acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MC; m++)
        store_out(y, ybf, m * N + n, hsum8(_mm256_add_ps(acc[m][0], acc[m][1])) + dot_tail(w, wbf, x + m * K, k, K));
}

#include "gemv_float.h"

/* A tile of y: rows m..m+MR of x (fp32, rows K apart) against rows n..n+NR of W (fp32, rows K apart, from the
 * thread's converted block), MR x NR accumulators of 8 lanes each over k, summed and rounded to bf16 at the end. */
static inline __attribute__((always_inline)) void gemm_tile(const float *x, const float *w, uint16_t *y, int64_t N,
                                                            int64_t K, const int MR, const int NR) {
    __m256 acc[4][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[3];
        for (int j = 0; j < NR; j++) wv[j] = _mm256_loadu_ps(w + j * K + k);
        for (int i = 0; i < MR; i++) {
            const __m256 xv = _mm256_loadu_ps(x + i * K + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float v = hsum8(acc[i][j]);
            for (int64_t t = k; t < K; t++) v += x[i * K + t] * w[j * K + t];
            y[i * N + j] = f32_to_bf16(v);
        }
}

/* gemm_tile with the tile's shape, mr x nr (at most 4 x 3), a compile-time constant in each case */
static void gemm_tiles(const float *x, const float *w, uint16_t *y, int64_t N, int64_t K, int mr, int nr) {
#define GEMM_TILES(MR)                                                                                                 \
    (nr == 3 ? gemm_tile(x, w, y, N, K, MR, 3) : nr == 2 ? gemm_tile(x, w, y, N, K, MR, 2) : gemm_tile(x, w, y, N, K, MR, 1))
    switch (mr) {
    case 4: GEMM_TILES(4); break;
    case 3: GEMM_TILES(3); break;
    case 2: GEMM_TILES(2); break;
    default: GEMM_TILES(1);
    }
#undef GEMM_TILES
}

/* y (M, N) = x (M, K) W^T for many rows (a prompt), W and x bf16, y rounded once from fp32 sums: F.linear in fp32
 * of the widened operands (kernels.linear_fp32, the twin) without widening W in memory. Each thread takes blocks of
 * W's rows, widens one block into its scratch (at most ~192 KB: it stays in L2) and runs every row of x against it,
 * 4 rows of x by 3 of W at a time (12 accumulators: the FMAs, not the loads, are the bound); blocks are handed out
 * one at a time, so a thread slowed by another process on its core does not hold the other back. Returns 0, or 1
 * when a buffer could not be allocated (nothing computed). */
int qk_gemm_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    int64_t nb = (int64_t)(49152 / K) / 3 * 3; /* W rows per block: 192 KB of fp32 */
    nb = nb < 3 ? 3 : nb;
    const int64_t blocks = (N + nb - 1) / nb;
    float *xf = scratch(1, sizeof(float) * (size_t)(M * K));
    int failed = !xf;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *wf = scratch(0, sizeof(float) * (size_t)(nb * K)); /* this thread's block of W, widened */
        failed |= !wf;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < (xf ? M : 0); m++)
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(x[m * K + k]);
#pragma omp for schedule(dynamic, 1)
        for (int64_t bi = 0; bi < blocks; bi++) {
            if (!wf || !xf) continue; /* nothing computed: the caller is told */
            const int64_t n0 = bi * nb, rows = N - n0 < nb ? N - n0 : nb;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t k = 0; k + 8 <= K; k += 8) _mm256_storeu_ps(wf + r * K + k, ld8(W + (n0 + r) * K, k, 1));
            if (K % 8)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t k = K / 8 * 8; k < K; k++) wf[r * K + k] = bf16_to_f32(W[(n0 + r) * K + k]);
            for (int64_t m = 0; m < M; m += 4) {
                const int mr = (int)(M - m < 4 ? M - m : 4);
                for (int64_t j = 0; j < rows; j += 3) {
                    const int nr = (int)(rows - j < 3 ? rows - j : 3);
                    const float *xm = xf + m * K, *wj = wf + j * K;
                    uint16_t *yt = y + m * N + n0 + j;
                    gemm_tiles(xm, wj, yt, N, K, mr, nr);
                }
            }
        }
    }
    return failed;
}

void qk_gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    const float *xf = stage_f32(x, 1, M * K);
    if (xf) gemv_float(W, 1, xf, y, 1, M, N, K, nthreads);
}

void qk_gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    gemv_float(W, 0, x, y, 0, M, N, K, nthreads);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* ------------------------------------------------------------------------------------------------------------ */
/* int8 weights, symmetric: W = q * s, q (N, K) int8, s (N, K/G); G % 16 == 0 */

static inline __m256 i8x8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

/* fp32 activations: weights widened to fp32 */
static inline __attribute__((always_inline)) void int8_row_f32(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                               const float *x, void *y, int y_bf16, int64_t n,
                                                               int64_t N, int64_t K, const int MC) {
    __m256 tot[MB];
    for (int m = 0; m < MC; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        __m256 acc[MB][2];
        for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        for (int64_t k = g0; k < g0 + G; k += 16) {
            const __m256 w0 = i8x8(w + k), w1 = i8x8(w + k + 8);
            for (int m = 0; m < MC; m++) {
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
            }
        }
        const __m256 sv = _mm256_set1_ps(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(acc[m][0], acc[m][1]), sv, tot[m]);
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, hsum8(tot[m]));
}

/* int16 activations: per block, int32 sums of q xq; then fp32 sum of (block sum) sx per group, times s */
static inline __attribute__((always_inline)) void int8_row_i16(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                               int64_t BL, const int16_t *xq, const float *sx,
                                                               void *y, int y_bf16, int64_t n, int64_t N, int64_t K,
                                                               const int MC) {
    const int64_t nb = K / BL;
    __m256 tot[MB];
    for (int m = 0; m < MC; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        __m256 gacc[MB];
        for (int m = 0; m < MC; m++) gacc[m] = _mm256_setzero_ps();
        for (int64_t b0 = g0; b0 < g0 + G; b0 += BL) {
            __m256i acc[MB];
            for (int m = 0; m < MC; m++) acc[m] = _mm256_setzero_si256();
            for (int64_t k = b0; k < b0 + BL; k += 16) {
                const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
                for (int m = 0; m < MC; m++)
                    acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i *)(xq + m * K + k))));
            }
            for (int m = 0; m < MC; m++)
                gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(sx[m * nb + b0 / BL]), gacc[m]);
        }
        const __m256 sv = _mm256_set1_ps(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) tot[m] = _mm256_fmadd_ps(gacc[m], sv, tot[m]);
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, hsum8(tot[m]));
}

#include "gemv_int8.h"

void qk_dequant_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, int64_t r0, int64_t r1, int64_t K,
                     void *out, int out_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (r1 - r0) * K))
    for (int64_t r = r0; r < r1; r++)
        for (int64_t k = 0; k < K; k += 8) {
            const __m256 v = _mm256_mul_ps(i8x8(W + r * K + k), _mm256_set1_ps(load_scale(s, s_bf16, r * (K / G) + k / G)));
            st8(out, (r - r0) * K + k, v, out_bf16);
        }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* int4 weights, asymmetric, tiled64: byte [t, k, j] = q[64t + j, k] | q[64t + 32 + j, k] << 4, shape (Np/64, K, 32);
 * scales_and_zeros (K/G, Np, 2); W = (q - 8) * s + z = q * s + (z - 8 s). The 64 rows of a tile in two halves
 * (low nibbles: rows 0-31, high: 32-63), one activation row at a time over the tile (it stays in L1/L2). */

/* s and z - 8 s of the tile's 64 rows in group gi */
static inline void tile_scales(const void *sz, int s_bf16, int64_t Np, int64_t gi, int64_t t, float *s, float *z8) {
    const int64_t base = (gi * Np + t * 64) * 2;
    if (!s_bf16) {
        for (int r = 0; r < 64; r++) {
            s[r] = ((const float *)sz)[base + 2 * r];
            z8[r] = ((const float *)sz)[base + 2 * r + 1] - 8.0f * s[r];
        }
        return;
    }
    for (int r = 0; r < 64; r += 8) { /* 8 (s, z) pairs of bf16, each pair one 32-bit lane: s low, z high */
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + base + 2 * r));
        const __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 zv = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
        _mm256_store_ps(s + r, sv);
        _mm256_store_ps(z8 + r, _mm256_sub_ps(zv, _mm256_mul_ps(_mm256_set1_ps(8.0f), sv))); /* 8 s is exact */
    }
}

/* fp32 activations: one column (32 bytes, 64 rows) at a time, nibbles widened to fp32 */
static void int4_tile_f32(const uint8_t *tile, const void *sz, int s_bf16, int64_t G, const float *x,
                          const float *xsum, float *tot, int64_t t, int64_t Np, int64_t K) {
    const __m256i nib = _mm256_set1_epi8(15);
    for (int64_t gi = 0; gi < K / G; gi++) {
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(tile + k * 32));
            const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
            const __m256 xv = _mm256_set1_ps(x[k]);
            const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                      _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            for (int p = 0; p < 4; p++) { /* rows 16 p .. 16 p + 15 */
                acc[2 * p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), xv, acc[2 * p]);
                acc[2 * p + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(parts[p], 8))), xv,
                                                 acc[2 * p + 1]);
            }
        }
        float s[64] __attribute__((aligned(32))), z8[64] __attribute__((aligned(32)));
        tile_scales(sz, s_bf16, Np, gi, t, s, z8);
        const __m256 xs = _mm256_set1_ps(xsum[gi]);
        for (int r = 0; r < 8; r++) {
            const __m256 v = _mm256_fmadd_ps(acc[r], _mm256_load_ps(s + 8 * r), _mm256_loadu_ps(tot + 8 * r));
            _mm256_storeu_ps(tot + 8 * r, _mm256_fmadd_ps(_mm256_load_ps(z8 + 8 * r), xs, v));
        }
    }
}

/* int8 activations, MC rows of x at once over one tile: columns k and k + 1 byte-interleaved put each row's two
 * nibbles side by side, where vpmaddubsw meets them with the pair (xq[k], xq[k + 1]) (unsigned nibble times signed
 * activation, summed in pairs to int16: at most 2 * 15 * 127, so a block's 8 pairs stay below 2^15). Per block of 16
 * columns the int16 sums are widened, scaled by the block's sx and summed in fp32; per group, times s, plus
 * (z - 8 s) times the group's sum of x. Both nibbles of a byte pair are taken in the same pass (the low ones rows
 * 0-31, the high ones rows 32-63), so that the pair is loaded and interleaved once and each row's activations
 * broadcast once for all 64 rows (a pass per half took the 0.8B's body GEMVs 10.9 ms at one row, now 9.7; 13.7 at
 * two, now 10.6); the unpacked nibbles are shared by the MC rows. The sums hold each half's 32 rows as 0-7, 16-23,
 * 8-15, 24-31 (the lane order of unpacklo / unpackhi). */
static inline __attribute__((always_inline)) void int4_tile_i8(const uint8_t *tile, const void *sz, int s_bf16,
                                                               int64_t G, const int8_t *xq, const float *sx,
                                                               const float *xsum, float *tot, int64_t t, int64_t Np,
                                                               int64_t K, const int MC) {
    static const int lane_row[4] = {0, 16, 8, 24};
    const __m256i nib = _mm256_set1_epi8(15);
    const int64_t ng = K / G, nb = K / 16;
    for (int64_t gi = 0; gi < ng; gi++) {
        float s[64] __attribute__((aligned(32))), z8[64] __attribute__((aligned(32)));
        tile_scales(sz, s_bf16, Np, gi, t, s, z8);
        __m256 f[MB][8];
        for (int m = 0; m < MC; m++)
            for (int r = 0; r < 8; r++) f[m][r] = _mm256_setzero_ps();
        for (int64_t b0 = gi * G; b0 < (gi + 1) * G; b0 += 16) {
            __m256i acc[MB][4];
            for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_si256();
            for (int64_t k = b0; k < b0 + 16; k += 2) { /* the weights some KB ahead, on their way meanwhile */
                _mm_prefetch((const char *)(tile + k * 32 + PREFETCH), _MM_HINT_T0);
                const __m256i c0 = _mm256_loadu_si256((const __m256i *)(tile + k * 32));
                const __m256i c1 = _mm256_loadu_si256((const __m256i *)(tile + (k + 1) * 32));
                const __m256i u0 = _mm256_unpacklo_epi8(c0, c1), u1 = _mm256_unpackhi_epi8(c0, c1);
                const __m256i q[4] = {_mm256_and_si256(u0, nib), _mm256_and_si256(u1, nib),
                                      _mm256_and_si256(_mm256_srli_epi16(u0, 4), nib),
                                      _mm256_and_si256(_mm256_srli_epi16(u1, 4), nib)};
                for (int m = 0; m < MC; m++) {
                    int16_t pair;
                    memcpy(&pair, xq + m * K + k, 2);
                    const __m256i xv = _mm256_set1_epi16(pair);
                    for (int u = 0; u < 4; u++) acc[m][u] = _mm256_add_epi16(acc[m][u], _mm256_maddubs_epi16(q[u], xv));
                }
            }
            for (int m = 0; m < MC; m++) {
                const __m256 bs = _mm256_set1_ps(sx[m * nb + b0 / 16]);
                for (int u = 0; u < 4; u++) {
                    const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[m][u]));
                    const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[m][u], 1));
                    f[m][2 * u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), bs, f[m][2 * u]);
                    f[m][2 * u + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), bs, f[m][2 * u + 1]);
                }
            }
        }
        for (int m = 0; m < MC; m++) {
            const __m256 xs = _mm256_set1_ps(xsum[m * ng + gi]);
            for (int r = 0; r < 8; r++) {
                const int row = 32 * (r / 4) + lane_row[r % 4];
                float *o = tot + m * 64 + row;
                const __m256 v = _mm256_fmadd_ps(f[m][r], _mm256_load_ps(s + row), _mm256_loadu_ps(o));
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_load_ps(z8 + row), xs, v));
            }
        }
    }
}

#ifdef __AVXVNNI__
/* int4_tile_i8 on a CPU with AVX-VNNI (Intel since Alder Lake; kernels.py adds -mavxvnni there): four columns at a
 * time through vpdpbusd (32 products of an unsigned nibble and a signed activation an instruction, summed in fours
 * into int32; llvm-mca estimates 1.15x the bytes a cycle at one row of x and 1.28x at four on Alder Lake,
 * bench/results/avx512-vnni-mca). The block sums are exact integers either way and each row's fp32 steps are
 * int4_tile_i8's, so the numbers are its own bit for bit. Columns k..k+3 byte- then word-interleaved put each byte
 * position's four columns in one 32-bit lane: vector u of 8 holds rows 32 (u / 4) + 4 (u % 4) + 0..3 in lanes 0-3
 * and the same + 16 in lanes 4-7. */
static inline __attribute__((always_inline)) void int4_tile_vnni(const uint8_t *tile, const void *sz, int s_bf16,
                                                                 int64_t G, const int8_t *xq, const float *sx,
                                                                 const float *xsum, float *tot, int64_t t, int64_t Np,
                                                                 int64_t K, const int MC) {
    const __m256i nib = _mm256_set1_epi8(15);
    const int64_t ng = K / G, nb = K / 16;
    for (int64_t gi = 0; gi < ng; gi++) {
        float s[64] __attribute__((aligned(32))), z8[64] __attribute__((aligned(32)));
        tile_scales(sz, s_bf16, Np, gi, t, s, z8);
        __m256 f[MB][8];
        for (int m = 0; m < MC; m++)
            for (int u = 0; u < 8; u++) f[m][u] = _mm256_setzero_ps();
        for (int64_t b0 = gi * G; b0 < (gi + 1) * G; b0 += 16) {
            __m256i acc[MB][8];
            for (int m = 0; m < MC; m++)
                for (int u = 0; u < 8; u++) acc[m][u] = _mm256_setzero_si256();
            for (int64_t k = b0; k < b0 + 16; k += 4) {
                _mm_prefetch((const char *)(tile + k * 32 + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(tile + k * 32 + PREFETCH + 64), _MM_HINT_T0);
                const __m256i c0 = _mm256_loadu_si256((const __m256i *)(tile + k * 32));
                const __m256i c1 = _mm256_loadu_si256((const __m256i *)(tile + (k + 1) * 32));
                const __m256i c2 = _mm256_loadu_si256((const __m256i *)(tile + (k + 2) * 32));
                const __m256i c3 = _mm256_loadu_si256((const __m256i *)(tile + (k + 3) * 32));
                const __m256i a0 = _mm256_unpacklo_epi8(c0, c1), a1 = _mm256_unpackhi_epi8(c0, c1);
                const __m256i b0v = _mm256_unpacklo_epi8(c2, c3), b1v = _mm256_unpackhi_epi8(c2, c3);
                const __m256i z[4] = {_mm256_unpacklo_epi16(a0, b0v), _mm256_unpackhi_epi16(a0, b0v),
                                      _mm256_unpacklo_epi16(a1, b1v), _mm256_unpackhi_epi16(a1, b1v)};
                __m256i w[8];
                for (int i = 0; i < 4; i++) {
                    w[i] = _mm256_and_si256(z[i], nib);
                    w[4 + i] = _mm256_and_si256(_mm256_srli_epi16(z[i], 4), nib);
                }
                for (int m = 0; m < MC; m++) {
                    int32_t four;
                    memcpy(&four, xq + m * K + k, 4);
                    const __m256i xv = _mm256_set1_epi32(four);
                    for (int u = 0; u < 8; u++) acc[m][u] = _mm256_dpbusd_avx_epi32(acc[m][u], w[u], xv);
                }
            }
            for (int m = 0; m < MC; m++) {
                const __m256 bs = _mm256_set1_ps(sx[m * nb + b0 / 16]);
                for (int u = 0; u < 8; u++) f[m][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][u]), bs, f[m][u]);
            }
        }
        for (int m = 0; m < MC; m++) {
            const __m256 xs = _mm256_set1_ps(xsum[m * ng + gi]);
            for (int u = 0; u < 8; u++) {
                const int row = 32 * (u / 4) + 4 * (u % 4);
                float *o = tot + m * 64 + row;
                const __m256 v = _mm256_fmadd_ps(f[m][u], _mm256_loadu2_m128(s + row + 16, s + row), _mm256_loadu2_m128(o + 16, o));
                _mm256_storeu2_m128(o + 16, o, _mm256_fmadd_ps(_mm256_loadu2_m128(z8 + row + 16, z8 + row), xs, v));
            }
        }
    }
}
#define INT4_TILE int4_tile_vnni
#else
#define INT4_TILE int4_tile_i8
#endif

void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads) {
    const int64_t ng = K / G;
    int8_t *xq;
    float *sx, *xsum;
    if (int4_activations(x, x_bf16, M, K, G, &xq, &sx, &xsum)) return;
    const float *xf = x_bf16 ? NULL : x;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, Np * K))
    for (int64_t t = 0; t < (n_out + 63) / 64; t++) { /* the tiles of the first n_out rows: Np is their stride */
        const uint8_t *tile = P + t * K * 32;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mc = (int)(M - m0 < MB ? M - m0 : MB);
            float tot[MB * 64] __attribute__((aligned(32))) = {0};
            if (!x_bf16) {
                for (int m = 0; m < mc; m++) int4_tile_f32(tile, sz, s_bf16, G, xf + (m0 + m) * K, xsum + (m0 + m) * ng,
                                                           tot + m * 64, t, Np, K);
            } else {
                const int8_t *xm = xq + m0 * K;
                const float *sm = sx + m0 * (K / 16), *xs = xsum + m0 * ng;
                switch (mc) {
                case 1: INT4_TILE(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 1); break;
                case 2: INT4_TILE(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 2); break;
                case 3: INT4_TILE(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 3); break;
                default: INT4_TILE(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 4); break;
                }
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
            float s[64] __attribute__((aligned(32))), z[64] __attribute__((aligned(32)));
            for (int r = 0; r < 64; r++) {
                s[r] = load_scale(sz, s_bf16, (gi * Np + t * 64 + r) * 2);
                z[r] = load_scale(sz, s_bf16, (gi * Np + t * 64 + r) * 2 + 1);
            }
            for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(tile + k * 32));
                const __m256i nib = _mm256_set1_epi8(15);
                const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
                const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                                          _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
                for (int r = 0; r < 8; r++) { /* rows 8 r .. 8 r + 7 */
                    const __m128i src = (r & 1) ? _mm_srli_si128(parts[r / 2], 8) : parts[r / 2];
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(src));
                    const __m256 w = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(8.0f)), _mm256_load_ps(s + 8 * r)),
                                                   _mm256_load_ps(z + 8 * r));
                    st8(out, k * ld + (t - t0) * 64 + 8 * r, w, out_bf16);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Decode-step fusions, as avx512.c's (the same contracts, comments there) on 8 lanes. */

static inline __attribute__((always_inline)) void rmsnorm_impl(const void *x, int64_t ld, const void *w, float eps,
                                                               void *out, int64_t M, int64_t D, int nthreads,
                                                               const int ABF, const int WBF) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, M * D * 8))
    for (int64_t m = 0; m < M; m++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < D; i += 8) {
            const __m256 v = ld8(x, m * ld + i, ABF);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum8(acc) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 8) {
            const __m256 scale = _mm256_add_ps(_mm256_set1_ps(1.0f), ld8(w, i, WBF));
            st8(out, m * D + i, _mm256_mul_ps(_mm256_mul_ps(ld8(x, m * ld + i, ABF), r), scale), ABF);
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
    const __m256 decay = _mm256_set1_ps(expf(g)), bt = _mm256_set1_ps(beta);
    for (int64_t j0 = 0; j0 < Dv; j0 += 32) {
        const int nb = (int)((Dv - j0) / 8 < 4 ? (Dv - j0) / 8 : 4);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t i = 0; i < Dk; i++) {
            const __m256 ki = _mm256_set1_ps(k[i]);
            for (int c = 0; c < nb; c++) acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(s + i * ld + j0 + 8 * c), ki, acc[c]);
        }
        __m256 d[4], oa[4];
        for (int c = 0; c < nb; c++) {
            d[c] = _mm256_mul_ps(bt, _mm256_sub_ps(_mm256_loadu_ps(v + j0 + 8 * c), _mm256_mul_ps(decay, acc[c])));
            oa[c] = _mm256_setzero_ps();
        }
        for (int64_t i = 0; i < Dk; i++) {
            const __m256 ki = _mm256_set1_ps(k[i]), qi = _mm256_set1_ps(q[i]);
            for (int c = 0; c < nb; c++) {
                float *p = s + i * ld + j0 + 8 * c;
                const __m256 x = _mm256_fmadd_ps(ki, d[c], _mm256_mul_ps(_mm256_loadu_ps(p), decay));
                _mm256_storeu_ps(p, x);
                oa[c] = _mm256_fmadd_ps(x, qi, oa[c]);
            }
        }
        for (int c = 0; c < nb; c++) _mm256_storeu_ps(o + j0 + 8 * c, oa[c]);
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
        for (int64_t c = 0; c < C; c += 8) { /* 8 channels at a time, each summed in the scalar order */
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < Kc; j++) {
                float w[8];
                for (int i = 0; i < 8; i++) w[i] = ld1(conv_w, (c + i) * Kc + j, WBF);
                const __m256 in = j < Kc - 1 ? ld8(conv_state, cs + j * C + c, ABF) : ld8(qkv, b * C + c, ABF);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(in, _mm256_loadu_ps(w)));
            }
            _mm256_storeu_ps(xb + c, silu8(acc));
            for (int64_t j = 0; j + 1 < Kc - 1; j++) st8(conv_state, cs + j * C + c, ld8(conv_state, cs + (j + 1) * C + c, ABF), ABF);
            if (Kc > 1) st8(conv_state, cs + (Kc - 2) * C + c, ld8(qkv, b * C + c, ABF), ABF);
        }
        for (int64_t h = 0; h < 2 * Hk; h++) {
            float *v = xb + h * Dk;
            const float r = 1.0f / sqrtf(sumsq(v, Dk) + 1e-6f) * (h < Hk ? 1.0f / sqrtf((float)Dk) : 1.0f);
            for (int64_t i = 0; i < Dk; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(r)));
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
            float o[Dv] __attribute__((aligned(32)));
            delta_step(state + (b * Hv + h) * Dk * Dv, q, k, v, g, beta, o, Dk, Dv, Dv);
            for (int64_t j = 0; j < Dv; j += 8) _mm256_storeu_ps(o + j, round8(_mm256_loadu_ps(o + j), ABF));
            const __m256 r = _mm256_set1_ps(1.0f / sqrtf(sumsq(o, Dv) / (float)Dv + eps));
            for (int64_t j = 0; j < Dv; j += 8) {
                const int64_t i = (b * Hv + h) * Dv + j;
                const __m256 xh = round8(_mm256_mul_ps(_mm256_loadu_ps(o + j), r), ABF);
                const __m256 wx = round8(_mm256_mul_ps(ld8(norm_w, j, WBF), xh), ABF && WBF);
                st8(out, i, _mm256_mul_ps(wx, silu8(ld8(z, i, ABF))), ABF);
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
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(sumsq(x, D) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 8) {
            const __m256 scale = _mm256_add_ps(_mm256_set1_ps(1.0f), ld8(w, i, WBF));
            _mm256_storeu_ps(x + i, round8(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r), scale), ABF));
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
            float k[D] __attribute__((aligned(32)));
            const int64_t src = (b * Hkv + h) * D, dst = ((b * Hkv + h) * Tmax + pos[b]) * D;
            for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(k + i, ld8(kx, src + i, ABF));
            norm_rope(k, k_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            for (int64_t i = 0; i < D; i += 8) st8(kc, dst + i, _mm256_loadu_ps(k + i), ABF);
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
            float q[D] __attribute__((aligned(32))), acc[D] __attribute__((aligned(32)));
            for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(q + i, ld8(qg, qoff + i, ABF));
            norm_rope(q, q_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            const __m256 scale = _mm256_set1_ps(1.0f / sqrtf((float)D));
            for (int64_t i = 0; i < D; i += 8) {
                _mm256_store_ps(q + i, _mm256_mul_ps(_mm256_load_ps(q + i), scale));
                _mm256_store_ps(acc + i, _mm256_setzero_ps());
            }
            float *p = scores + (int64_t)omp_get_thread_num() * longest;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                __m256 sc = _mm256_setzero_ps();
                for (int64_t i = 0; i < D; i += 8) sc = _mm256_fmadd_ps(_mm256_load_ps(q + i), ld8(kc, base + t * D + i, ABF), sc);
                p[t] = hsum8(sc);
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int64_t t = 0; t < L; t++) {
                p[t] = expf(p[t] - mx);
                sum += p[t];
                const __m256 pt = _mm256_set1_ps(p[t]);
                for (int64_t i = 0; i < D; i += 8)
                    _mm256_store_ps(acc + i, _mm256_fmadd_ps(pt, ld8(vc, base + t * D + i, ABF), _mm256_load_ps(acc + i)));
            }
            const __m256 inv = _mm256_set1_ps(1.0f / sum);
            for (int64_t i = 0; i < D; i += 8) {
                __m256 o = round8(_mm256_mul_ps(_mm256_load_ps(acc + i), inv), ABF);
                if (gated) {
                    const __m256 gate = ld8(qg, qoff + D + i, ABF);
                    const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
                    o = _mm256_mul_ps(o, round8(sig, ABF));
                }
                st8(out, (b * H + h) * D + i, o, ABF);
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
        for (int64_t c = 0; c < C; c += 8) {
            __m256 wt[8], hist[8];
            for (int64_t j = 0; j < Kc; j++) {
                float v[8];
                for (int i = 0; i < 8; i++) v[i] = ld1(w, (c + i) * Kc + j, WBF);
                wt[j] = _mm256_loadu_ps(v);
            }
            for (int64_t j = 0; j < Kc - 1; j++) hist[j] = ld8(state, (b * (Kc - 1) + j) * C + c, ABF);
            for (int64_t t = 0; t < T; t++) {
                const __m256 now = ld8(x, (b * T + t) * C + c, ABF);
                __m256 acc = Kc > 1 ? _mm256_mul_ps(hist[0], wt[0]) : _mm256_mul_ps(now, wt[0]);
                for (int64_t j = 1; j < Kc - 1; j++) acc = _mm256_add_ps(acc, _mm256_mul_ps(hist[j], wt[j]));
                if (Kc > 1) acc = _mm256_add_ps(acc, _mm256_mul_ps(now, wt[Kc - 1]));
                _mm256_storeu_ps(out + (b * T + t) * C + c, silu8(acc));
                for (int64_t j = 0; j + 1 < Kc - 1; j++) hist[j] = hist[j + 1];
                if (Kc > 1) hist[Kc - 2] = now;
            }
            for (int64_t j = 0; j < Kc - 1; j++) st8(state, (b * (Kc - 1) + j) * C + c, hist[j], ABF);
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

#define VL 8
#define V_LD ld8
#define V_ST st8
#define V_ADD _mm256_add_ps
#define V_MUL _mm256_mul_ps
#define V_ROUND round8
#define V_SILU silu8
#include "step.h"

/* Memory bandwidth probe: read `n` floats once, as a decode step reads its weights (`qwenlite bench`). */
float qk_read(const float *p, int64_t n, int nthreads) {
    float total = 0.0f;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(+ : total)
    for (int64_t i = 0; i < n / 64; i++) {
        const float *q = p + i * 64;
        __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8)),
                                 _mm256_add_ps(_mm256_loadu_ps(q + 16), _mm256_loadu_ps(q + 24)));
        __m256 b = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(q + 32), _mm256_loadu_ps(q + 40)),
                                 _mm256_add_ps(_mm256_loadu_ps(q + 48), _mm256_loadu_ps(q + 56)));
        total += hsum8(_mm256_add_ps(a, b));
    }
    return total;
}
