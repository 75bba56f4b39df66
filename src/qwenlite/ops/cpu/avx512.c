/* qwenlite's CPU kernels for x86 with AVX-512 (F, BW, VL), AVX512-BF16 and AVX512-VNNI, built by qwenlite/ops/cpu/kernels.py
 * with the machine's C compiler (-O3 -march=native -fopenmp) and called through ctypes. avx2.c has the same
 * functions for AVX2 + FMA. Each has a pure-torch reference twin it is tested against:
 *
 *   qk_gemv_bf16    y = x W^T, W bf16 (N, K), x and y bf16                     twin: F.linear
 *   qk_gemv_int8    y = x (q * s)^T, q int8 (N, K), s (N, K/G)                  twin: quant_matmul.int8_matmul_ref
 *   qk_gemv_int4    y = x ((q - 8) * s + z)^T, q in quant_matmul's tiled64       twin: quant_matmul.int4_matmul_ref
 *   qk_gemv_f32     y = x W^T, all fp32                                          twin: F.linear
 *   qk_gemm_bf16    (avx2.c only) y = x W^T for a prompt, bf16, fp32 sums          twin: kernels.linear_fp32
 *   qk_dequant_int8 / qk_dequant_int4: rows of W (int4: W^T) in bf16 or fp32 (prefill: dequantize, then torch's GEMM)
 *   qk_gdn_decode   a Gated DeltaNet layer's token between projections           twin: qwen3_5.GatedDeltaNet (torch path)
 *                   (conv, SiLU, L2 norms, gates, delta rule in one pass over the state, gated RMSNorm)
 *   qk_conv_silu    a prompt's causal conv + SiLU, carrying the state              twin: conv.causal_conv1d + F.silu
 *   qk_delta_rule   a prompt's gated delta rule, carrying the state (delta_rule.h)  twin: delta_rule.gated_delta_rule_recurrent
 *   qk_rmsnorm      zero-centred RMSNorm                                          twin: qwen3_5.RMSNorm (torch path)
 *   qk_attn_decode  an attention layer's token between projections                twin: qwen3_5.Attention (torch path)
 *                   (q/k norms unless their weights are NULL, rotary, cache write, attention, output gate)
 *   qk_decode_step  the whole model for one token per row, from the above (step.h)   twin: Qwen3_5ForCausalLM.forward
 *   qk_read         reads memory as a GEMV does, for `qwenlite bench`'s bandwidth figure
 *
 * The GEMVs are for few activation rows (decode, batched decode): each pass streams the weights once for up to
 * MB rows of x, accumulating in fp32. Decode is bound by memory bandwidth, so the inner loops do just enough
 * arithmetic per byte to keep up with it: bf16 weights by AVX512-BF16 dot products; quantized weights with bf16
 * activations in integers, the activations quantized once per call as avx2.c does (quant_x86.h: int16 blocks for
 * int8 weights, int8 blocks of 16 for int4 ones) and multiplied by AVX512-VNNI's vpdpwssd / vpdpbusd, so the three
 * instruction sets give the same numbers up to fp32 summation order; fp32 activations by widening the weights to
 * fp32 and FMA. Every CPU with AVX512-BF16 has VNNI (Cooper Lake, Sapphire Rapids and later, Zen 4 and 5). Threads
 * split the output rows (OpenMP; the runtime is torch's own libgomp, loaded first).
 *
 * Activations: fp32 or bf16 (`x_bf16`), outputs likewise (`y_bf16`); scales fp32 or bf16 (`s_bf16`).
 * Everything is contiguous, row-major. */

#include "common.h"

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) \
      && defined(__AVX512VNNI__))
#error "avx512.c needs AVX-512 F, BW, VL, BF16 and VNNI (kernels.py builds it only for such a CPU)"
#endif

#include <immintrin.h>

#include "quant_x86.h"

const char *qk_isa(void) { return "avx512"; }

/* 16 bf16 -> 16 fp32 */
static inline __m512 cvt_bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }


static inline __m512 ld16(const void *p, int64_t i, const int bf) {
    return bf ? cvt_bf16x16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))) : _mm512_loadu_ps((const float *)p + i);
}

static inline void st16(void *p, int64_t i, __m512 v, const int bf) {
    if (bf)
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)p + i, v);
}

static inline __m512 round16(__m512 v, const int bf) { return bf ? cvt_bf16x16((__m256i)_mm512_cvtneps_pbh(v)) : v; }

/* e^x, Cephes' polynomial with AVX-512 scalef; relative error ~1e-7 */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.37626f)), _mm512_set1_ps(-88.37626f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu16(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static inline float sumsq(const float *x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
    return _mm512_reduce_add_ps(acc);
}


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

/* fp32 activations: weights widened to fp32 */
static inline __m512 i8x16(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

static inline __attribute__((always_inline)) void int8_row_f32(const int8_t *w, const void *s, int s_bf16, int64_t G,
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

/* bf16 activations as int16 blocks (quant_x86.h, avx2.c's scheme): per block, int32 sums of q xq through vpdpwssd
 * (32 products an instruction, summed in pairs into 16 int32 lanes: at most 16 products of 127 x 32767 a lane per
 * block of 256 columns); then an fp32 sum of (block sum) sx per group, times s. A block of 16 columns more than a
 * multiple of 32 (groups of 16 or 48) multiplies the upper half of x by zeros. */
static inline __attribute__((always_inline)) void int8_row_i16(const int8_t *w, const void *s, int s_bf16, int64_t G,
                                                               int64_t BL, const int16_t *xq, const float *sx,
                                                               void *y, int y_bf16, int64_t n, int64_t N, int64_t K,
                                                               const int MC) {
    const int64_t nb = K / BL;
    __m512 tot[MB];
    for (int m = 0; m < MC; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        __m512 gacc[MB];
        for (int m = 0; m < MC; m++) gacc[m] = _mm512_setzero_ps();
        for (int64_t b0 = g0; b0 < g0 + G; b0 += BL) {
            __m512i acc[MB][4]; /* four chains: one would wait on vpdpwssd's latency (llvm-mca: 7 cycles a step) */
            for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_si512();
            int64_t k = b0;
            for (; k + 128 <= b0 + BL; k += 128)
                for (int j = 0; j < 4; j++) {
                    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + 32 * j)));
                    for (int m = 0; m < MC; m++)
                        acc[m][j] = _mm512_dpwssd_epi32(acc[m][j], wv, _mm512_loadu_si512(xq + m * K + k + 32 * j));
                }
            for (; k + 32 <= b0 + BL; k += 32) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k)));
                for (int m = 0; m < MC; m++)
                    acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], wv, _mm512_loadu_si512(xq + m * K + k));
            }
            if (k < b0 + BL) {
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w + k))));
                for (int m = 0; m < MC; m++)
                    acc[m][1] = _mm512_dpwssd_epi32(acc[m][1], wv, _mm512_maskz_loadu_epi16(0xffff, xq + m * K + k));
            }
            for (int m = 0; m < MC; m++) { /* integer sums: exact in any order */
                const __m512i a = _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), _mm512_add_epi32(acc[m][2], acc[m][3]));
                gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sx[m * nb + b0 / BL]), gacc[m]);
            }
        }
        const __m512 sv = _mm512_set1_ps(load_scale(s, s_bf16, n * (K / G) + gi));
        for (int m = 0; m < MC; m++) tot[m] = _mm512_fmadd_ps(gacc[m], sv, tot[m]);
    }
    for (int m = 0; m < MC; m++) store_out(y, y_bf16, m * N + n, _mm512_reduce_add_ps(tot[m]));
}

#include "gemv_int8.h"

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

/* How far ahead of the weights being multiplied the int4 GEMV prefetches, in bytes: avx2.c's figure (measured
 * there, on a 2-core Zen 3; not measured on an AVX-512 CPU). */
#define PREFETCH 4096

/* Where int4_tile_i8's accumulators hold a tile's 64 rows, as 4 vectors of 16 lanes (the order the byte and word
 * unpacks leave): vector r lane i holds row 32 (r / 2) + 4 (r % 2) + I8_ROWS[i]. I8_ROWS doubles as the indices of
 * those rows in two vectors of 16 consecutive rows (permutex2var) for even r; odd r adds 4. */
static const int32_t I8_ROWS[16] = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};

static inline __m256i col(const uint8_t *tile, int64_t k) { return _mm256_loadu_si256((const __m256i *)(tile + k * 32)); }

/* bf16 activations as int8 blocks of 16 (quant_x86.h's quantize_x8, avx2.c's scheme), MC rows of x over one tile,
 * four columns at a time through vpdpbusd (AVX512-VNNI: 64 products of an unsigned nibble and a signed activation
 * an instruction, summed in fours into 16 int32 lanes). Columns k..k+3 (128 bytes) are shuffled so that each 32-bit
 * lane holds one byte position's four columns: its low nibbles are a row of the tile's first half, its high ones
 * the row 32 further; each row of x meets them with its four activations broadcast. Per block of 16 columns the
 * int32 sums are scaled by the block's sx into fp32; per group, times s, plus (z - 8 s) times the group's sum of
 * x. `tot` holds the rows in the accumulators' lane order (I8_ROWS). */
static inline __attribute__((always_inline)) void int4_tile_i8(const uint8_t *tile, const void *sz, int s_bf16,
                                                               int64_t G, const int8_t *xq, const float *sx,
                                                               const float *xsum, float *tot, int64_t t, int64_t Np,
                                                               int64_t K, const int MC) {
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i rows0 = _mm512_loadu_si512(I8_ROWS), rows1 = _mm512_add_epi32(rows0, _mm512_set1_epi32(4));
    const int64_t ng = K / G, nb = K / 16;
    for (int64_t gi = 0; gi < ng; gi++) {
        __m512 f[MB][4];
        for (int m = 0; m < MC; m++) f[m][0] = f[m][1] = f[m][2] = f[m][3] = _mm512_setzero_ps();
        for (int64_t b0 = gi * G; b0 < (gi + 1) * G; b0 += 16) {
            __m512i acc[MB][4];
            for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_si512();
            for (int64_t k = b0; k < b0 + 16; k += 4) {
                _mm_prefetch((const char *)(tile + k * 32 + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(tile + k * 32 + PREFETCH + 64), _MM_HINT_T0);
                /* c0 | c2 and c1 | c3 (32 bytes a column; a byte: row j low, row 32 + j high), the upper halves
                 * inserted as they load (no shuffle port) */
                const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(col(tile, k)), col(tile, k + 2), 1);
                const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(col(tile, k + 1)), col(tile, k + 3), 1);
                /* per 128-bit lane, (c0, c1) byte pairs then (c2, c3) ones, for bytes 0-7, 16-23, 8-15, 24-31 */
                const __m512i u0 = _mm512_unpacklo_epi8(a, b), u1 = _mm512_unpackhi_epi8(a, b);
                const __m512i v01 = _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
                const __m512i v23 = _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
                const __m512i z0 = _mm512_unpacklo_epi16(v01, v23), z1 = _mm512_unpackhi_epi16(v01, v23);
                const __m512i w[4] = {_mm512_and_si512(z0, nib), _mm512_and_si512(z1, nib),
                                      _mm512_and_si512(_mm512_srli_epi16(z0, 4), nib),
                                      _mm512_and_si512(_mm512_srli_epi16(z1, 4), nib)};
                for (int m = 0; m < MC; m++) {
                    int32_t four;
                    memcpy(&four, xq + m * K + k, 4);
                    const __m512i xv = _mm512_set1_epi32(four);
                    for (int r = 0; r < 4; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], w[r], xv);
                }
            }
            for (int m = 0; m < MC; m++) {
                const __m512 bs = _mm512_set1_ps(sx[m * nb + b0 / 16]);
                for (int r = 0; r < 4; r++) f[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), bs, f[m][r]);
            }
        }
        __m512 sn[4], zn[4]; /* rows 0-15, 16-31, 32-47, 48-63 */
        for (int h = 0; h < 4; h++) load_sz(sz, s_bf16, Np, gi, t * 64 + h * 16, &sn[h], &zn[h]);
        for (int r = 0; r < 4; r++) {
            const __m512i idx = r % 2 ? rows1 : rows0;
            const __m512 sv = _mm512_permutex2var_ps(sn[2 * (r / 2)], idx, sn[2 * (r / 2) + 1]);
            const __m512 zv = _mm512_permutex2var_ps(zn[2 * (r / 2)], idx, zn[2 * (r / 2) + 1]);
            const __m512 z8 = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, zv); /* z - 8 s */
            for (int m = 0; m < MC; m++) {
                float *o = tot + m * 64 + 16 * r;
                const __m512 v = _mm512_fmadd_ps(f[m][r], sv, _mm512_load_ps(o));
                _mm512_store_ps(o, _mm512_fmadd_ps(z8, _mm512_set1_ps(xsum[m * ng + gi]), v));
            }
        }
    }
}

void qk_gemv_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t Np, int64_t n_out, int64_t K, int nthreads) {
    const int64_t ng = K / G;
    int8_t *xq;
    float *sx, *xsum;
    if (int4_activations(x, x_bf16, M, K, G, &xq, &sx, &xsum)) return;
    const float *xf = x_bf16 ? NULL : x;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, Np * K))
    for (int64_t t = 0; t < (n_out + 63) / 64; t++) { /* the tiles of the first n_out rows: Np is their stride */
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mc = (int)(M - m0 < MB ? M - m0 : MB);
            char *ym = (char *)y + m0 * n_out * (y_bf16 ? 2 : 4);
            if (!x_bf16) {
                const float *xm = xf + m0 * K, *xs = xsum + m0 * ng;
                switch (mc) {
                case 1: int4_tile(P, sz, s_bf16, G, xm, xs, ym, y_bf16, t, Np, n_out, K, 1); break;
                case 2: int4_tile(P, sz, s_bf16, G, xm, xs, ym, y_bf16, t, Np, n_out, K, 2); break;
                case 3: int4_tile(P, sz, s_bf16, G, xm, xs, ym, y_bf16, t, Np, n_out, K, 3); break;
                default: int4_tile(P, sz, s_bf16, G, xm, xs, ym, y_bf16, t, Np, n_out, K, 4); break;
                }
                continue;
            }
            float tot[MB * 64] __attribute__((aligned(64))) = {0};
            const uint8_t *tile = P + t * K * 32;
            const int8_t *xm = xq + m0 * K;
            const float *sm = sx + m0 * (K / 16), *xs = xsum + m0 * ng;
            switch (mc) {
            case 1: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 1); break;
            case 2: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 2); break;
            case 3: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 3); break;
            default: int4_tile_i8(tile, sz, s_bf16, G, xm, sm, xs, tot, t, Np, K, 4); break;
            }
            for (int m = 0; m < mc; m++)
                for (int r = 0; r < 4; r++)
                    for (int i = 0; i < 16; i++) {
                        const int64_t row = t * 64 + 32 * (r / 2) + 4 * (r % 2) + I8_ROWS[i];
                        if (row < n_out) store_out(ym, y_bf16, m * n_out + row, tot[m * 64 + 16 * r + i]);
                    }
        }
    }
}

/* Rows [64 t0, 64 t1) of W, transposed: out (K, 64 (t1 - t0)) = W[rows, :]^T, each value computed as the reference
 * does, (q - 8) * s + z rounded once per op, then rounded to the output dtype. Transposed because the tiled
 * layout holds a column of 64 rows contiguously: every store is a whole vector. */
void qk_dequant_int4(const uint8_t *P, const void *sz, int s_bf16, int64_t G, int64_t Np, int64_t t0, int64_t t1,
                     int64_t K, void *out, int out_bf16, int nthreads) {
    const int64_t ld = (t1 - t0) * 64;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, (t1 - t0) * 64 * K))
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *tile = P + t * K * 32;
        for (int64_t gi = 0; gi < K / G; gi++) {
            __m512 s[4], z[4];
            for (int r = 0; r < 4; r++) load_sz(sz, s_bf16, Np, gi, t * 64 + r * 16, &s[r], &z[r]);
            for (int64_t k = gi * G; k < (gi + 1) * G; k++) {
                __m512 q[4];
                unpack_tile_col(tile + k * 32, q);
                for (int r = 0; r < 4; r++) {
                    const __m512 w = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(q[r], _mm512_set1_ps(8.0f)), s[r]), z[r]);
                    st16(out, k * ld + (t - t0) * 64 + r * 16, w, out_bf16);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Decode-step fusions: what the model's torch code does for one token in dozens of small ops, in one call.
 * `act_bf16`: activations (and caches) bf16, else fp32; `w_bf16`: the small weights (norms, conv, A_log, dt_bias)
 * bf16, else fp32. Roundings to the activation dtype happen where the torch code rounds. Every vector length
 * (head dims, channels) is a multiple of 16; the Python side checks. Each body is written once with the dtypes
 * as compile-time constants (ABF, WBF) and instantiated for the combinations. */

/* Zero-centred RMSNorm, x_hat * (1 + w), over rows of D at a stride of `ld` elements -> out (M, D) contiguous.
 * Twin: model.RMSNorm's torch path. */
static inline __attribute__((always_inline)) void rmsnorm_impl(const void *x, int64_t ld, const void *w, float eps,
                                                               void *out, int64_t M, int64_t D, int nthreads,
                                                               const int ABF, const int WBF) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, M * D * 8))
    for (int64_t m = 0; m < M; m++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) {
            const __m512 v = ld16(x, m * ld + i, ABF);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 16) {
            const __m512 scale = _mm512_add_ps(_mm512_set1_ps(1.0f), ld16(w, i, WBF));
            st16(out, m * D + i, _mm512_mul_ps(_mm512_mul_ps(ld16(x, m * ld + i, ABF), r), scale), ABF);
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

/* The gated delta rule for one token on one head, in place: S = exp(g) S; d = beta (v - S^T k); S = S + k d^T;
 * o = S^T q. S (Dk, Dv; rows ld floats apart) is read twice (the second time from cache) and written once, 64 columns
 * at a time: each column of S evolves on its own. */
static void delta_step(float *s, const float *q, const float *k, const float *v, float g, float beta, float *o,
                       int64_t Dk, int64_t Dv, int64_t ld) {
    const __m512 decay = _mm512_set1_ps(expf(g)), bt = _mm512_set1_ps(beta);
    for (int64_t j0 = 0; j0 < Dv; j0 += 64) {
        const int nb = (int)((Dv - j0) / 16 < 4 ? (Dv - j0) / 16 : 4);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t i = 0; i < Dk; i++) {
            const __m512 ki = _mm512_set1_ps(k[i]);
            for (int c = 0; c < nb; c++) acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(s + i * ld + j0 + 16 * c), ki, acc[c]);
        }
        __m512 d[4], oa[4];
        for (int c = 0; c < nb; c++) { /* d = beta (v - decay S^T k) */
            d[c] = _mm512_mul_ps(bt, _mm512_sub_ps(_mm512_loadu_ps(v + j0 + 16 * c), _mm512_mul_ps(decay, acc[c])));
            oa[c] = _mm512_setzero_ps();
        }
        for (int64_t i = 0; i < Dk; i++) {
            const __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
            for (int c = 0; c < nb; c++) {
                float *p = s + i * ld + j0 + 16 * c;
                const __m512 x = _mm512_fmadd_ps(ki, d[c], _mm512_mul_ps(_mm512_loadu_ps(p), decay));
                _mm512_storeu_ps(p, x);
                oa[c] = _mm512_fmadd_ps(x, qi, oa[c]);
            }
        }
        for (int c = 0; c < nb; c++) _mm512_storeu_ps(o + j0 + 16 * c, oa[c]);
    }
}

/* One token of a Gated DeltaNet layer between its projections and out_proj, for B rows. Twin: the torch path of
 * model.GatedDeltaNet.forward with a cache and T == 1.
 *   qkv (B, C) act, C = 2 Hk Dk + Hv Dv      -> causal conv with conv_state (B, Kc-1, C) act (updated), SiLU
 *   q, k L2-normalised per key head (q times Dk^-1/2); beta = sigmoid(b); g = -exp(A_log) softplus(a + dt_bias)
 *   state (B, Hv, Dk, Dv) fp32 updated;  o -> act;  out = w * rms(o) * silu(z) per value head, (B, Hv Dv) act */

#define DELTA_COLS 64 /* delta_step's columns per pass */

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
        const int64_t cs = b * (Kc - 1) * C; /* this row's conv state: (Kc-1, C), oldest input first */
        for (int64_t c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < Kc - 1; j++) acc += ld1(conv_state, cs + j * C + c, ABF) * ld1(conv_w, c * Kc + j, WBF);
            xb[c] = acc + ld1(qkv, b * C + c, ABF) * ld1(conv_w, c * Kc + Kc - 1, WBF);
        }
        for (int64_t c = 0; c < C; c += 16) { /* SiLU; shift the window, the newest input last */
            _mm512_storeu_ps(xb + c, silu16(_mm512_loadu_ps(xb + c)));
            for (int64_t j = 0; j + 1 < Kc - 1; j++) st16(conv_state, cs + j * C + c, ld16(conv_state, cs + (j + 1) * C + c, ABF), ABF);
            if (Kc > 1) st16(conv_state, cs + (Kc - 2) * C + c, ld16(qkv, b * C + c, ABF), ABF);
        }
        for (int64_t h = 0; h < 2 * Hk; h++) { /* q heads, then k heads */
            float *v = xb + h * Dk;
            const float r = 1.0f / sqrtf(sumsq(v, Dk) + 1e-6f) * (h < Hk ? 1.0f / sqrtf((float)Dk) : 1.0f);
            for (int64_t i = 0; i < Dk; i += 16) _mm512_storeu_ps(v + i, _mm512_mul_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(r)));
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
            float o[Dv] __attribute__((aligned(64)));
            delta_step(state + (b * Hv + h) * Dk * Dv, q, k, v, g, beta, o, Dk, Dv, Dv);
            for (int64_t j = 0; j < Dv; j += 16) _mm512_storeu_ps(o + j, round16(_mm512_loadu_ps(o + j), ABF));
            const __m512 r = _mm512_set1_ps(1.0f / sqrtf(sumsq(o, Dv) / (float)Dv + eps));
            for (int64_t j = 0; j < Dv; j += 16) {
                const int64_t i = (b * Hv + h) * Dv + j;
                const __m512 xh = round16(_mm512_mul_ps(_mm512_loadu_ps(o + j), r), ABF);
                const __m512 wx = round16(_mm512_mul_ps(ld16(norm_w, j, WBF), xh), ABF && WBF);
                st16(out, i, _mm512_mul_ps(wx, silu16(ld16(z, i, ABF))), ABF);
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

/* One head's vector: zero-centred RMSNorm with weight w, then rotary embedding on the first R dims (half-split
 * layout) with this row's cos and sin (R values, act dtype), rounding to the activation dtype where the torch
 * code does. x (D) fp32 in place. */
static inline __attribute__((always_inline)) void norm_rope(float *x, const void *w, float eps, const void *cos,
                                                            const void *sin, int64_t R, int64_t D, const int ABF,
                                                            const int WBF) {
    if (w) { /* the q/k norm, where the layer has one (NULL: Qwen2) */
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(sumsq(x, D) / (float)D + eps));
        for (int64_t i = 0; i < D; i += 16) {
            const __m512 scale = _mm512_add_ps(_mm512_set1_ps(1.0f), ld16(w, i, WBF));
            _mm512_storeu_ps(x + i, round16(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), r), scale), ABF));
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

/* One token of a gated attention layer between its projections and o_proj, for B rows, row b at position pos[b]
 * with rotary cos and sin (B, R) act.
 * Twin: the torch path of model.Attention.forward with a cache and T == 1.
 *   qg (B, H * 2D) act, per head [query | gate] (gated) or (B, H * D); kx, vx (B, Hkv * D) act
 *   q, k: per-head RMSNorm (q_w, k_w) and rotary on the first R dims; k, v written to the caches (B, Hkv, Tmax, D)
 *   at pos[b]; each query head h attends over keys [0, pos[b]] of kv head h / (H / Hkv), scale D^-1/2;
 *   out (B, H * D) act, times sigmoid(gate) when gated. */
static inline __attribute__((always_inline)) void attn_decode_impl(
    const void *qg, const void *kx, const void *vx, const void *q_w, const void *k_w, float eps,
    const void *cos, const void *sin, int64_t R, const int64_t *pos, void *kc, void *vc, void *out, int gated, int64_t B,
    int64_t H, int64_t Hkv, int64_t Tmax, int64_t D, int nthreads, const int ABF, const int WBF) {
    const int64_t rep = H / Hkv, qstride = gated ? 2 * D : D;
    const size_t esz = ABF ? 2 : 4;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++) {
            float k[D] __attribute__((aligned(64)));
            const int64_t src = (b * Hkv + h) * D, dst = ((b * Hkv + h) * Tmax + pos[b]) * D;
            for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(k + i, ld16(kx, src + i, ABF));
            norm_rope(k, k_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            for (int64_t i = 0; i < D; i += 16) st16(kc, dst + i, _mm512_loadu_ps(k + i), ABF);
            memcpy((char *)vc + dst * esz, (const char *)vx + src * esz, D * esz);
        }
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * H * (pos[0] + 1) * D * 16))
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t L = pos[b] + 1, base = (b * Hkv + h / rep) * Tmax * D, qoff = (b * H + h) * qstride;
            float q[D] __attribute__((aligned(64))), acc[D] __attribute__((aligned(64)));
            for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(q + i, ld16(qg, qoff + i, ABF));
            norm_rope(q, q_w, eps, (const char *)cos + b * R * esz, (const char *)sin + b * R * esz, R, D, ABF, WBF);
            const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)D));
            for (int64_t i = 0; i < D; i += 16) {
                _mm512_store_ps(q + i, _mm512_mul_ps(_mm512_load_ps(q + i), scale));
                _mm512_store_ps(acc + i, _mm512_setzero_ps());
            }
            float *p = scratch(0, sizeof(float) * (size_t)L); /* this thread's; NULL only when L floats cannot be had */
            if (!p) continue;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < L; t++) {
                __m512 sc = _mm512_setzero_ps();
                for (int64_t i = 0; i < D; i += 16) sc = _mm512_fmadd_ps(_mm512_load_ps(q + i), ld16(kc, base + t * D + i, ABF), sc);
                p[t] = _mm512_reduce_add_ps(sc);
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int64_t t = 0; t < L; t++) {
                p[t] = expf(p[t] - mx);
                sum += p[t];
                const __m512 pt = _mm512_set1_ps(p[t]);
                for (int64_t i = 0; i < D; i += 16)
                    _mm512_store_ps(acc + i, _mm512_fmadd_ps(pt, ld16(vc, base + t * D + i, ABF), _mm512_load_ps(acc + i)));
            }
            const __m512 inv = _mm512_set1_ps(1.0f / sum);
            for (int64_t i = 0; i < D; i += 16) {
                __m512 o = round16(_mm512_mul_ps(_mm512_load_ps(acc + i), inv), ABF);
                if (gated) {
                    const __m512 gate = ld16(qg, qoff + D + i, ABF);
                    const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
                    o = _mm512_mul_ps(o, round16(sig, ABF));
                }
                st16(out, (b * H + h) * D + i, o, ABF);
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

/* Causal depthwise conv + SiLU over a prompt, channels last, carrying the state: x (B, T, C) act, state (B, Kc-1, C)
 * act (the last Kc-1 inputs, oldest first; updated in place), w (C, Kc), out (B, T, C) fp32 = silu(conv).
 * Twin: ops/conv.causal_conv1d followed by F.silu. Kc <= 8, C % 16 == 0. */
static inline __attribute__((always_inline)) void conv_silu_impl(const void *x, void *state, const void *w, float *out,
                                                                 int64_t B, int64_t T, int64_t C, int64_t Kc,
                                                                 int nthreads, const int ABF, const int WBF) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(nthreads, B * T * C * Kc))
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c += 16) {
            __m512 wt[8], hist[8];
            for (int64_t j = 0; j < Kc; j++) {
                float v[16];
                for (int i = 0; i < 16; i++) v[i] = ld1(w, (c + i) * Kc + j, WBF);
                wt[j] = _mm512_loadu_ps(v);
            }
            for (int64_t j = 0; j < Kc - 1; j++) hist[j] = ld16(state, (b * (Kc - 1) + j) * C + c, ABF);
            for (int64_t t = 0; t < T; t++) {
                const __m512 now = ld16(x, (b * T + t) * C + c, ABF);
                __m512 acc = Kc > 1 ? _mm512_mul_ps(hist[0], wt[0]) : _mm512_mul_ps(now, wt[0]);
                for (int64_t j = 1; j < Kc - 1; j++) acc = _mm512_add_ps(acc, _mm512_mul_ps(hist[j], wt[j]));
                if (Kc > 1) acc = _mm512_add_ps(acc, _mm512_mul_ps(now, wt[Kc - 1]));
                _mm512_storeu_ps(out + (b * T + t) * C + c, silu16(acc));
                for (int64_t j = 0; j + 1 < Kc - 1; j++) hist[j] = hist[j + 1];
                if (Kc > 1) hist[Kc - 2] = now;
            }
            for (int64_t j = 0; j < Kc - 1; j++) st16(state, (b * (Kc - 1) + j) * C + c, hist[j], ABF);
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
/* fp32 weights (fp32 models: tests, training checkpoints): x, y fp32 */

static inline __attribute__((always_inline)) void f32_row(const float *w, const float *x, float *y, int64_t n,
                                                          int64_t N, int64_t K, const int MC) {
    __m512 acc[MB][2];
    for (int m = 0; m < MC; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
        for (int m = 0; m < MC; m++) {
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), acc[m][1]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 mask = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 w0 = _mm512_maskz_loadu_ps(mask, w + k);
        for (int m = 0; m < MC; m++) acc[m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MC; m++) y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

void qk_gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mc = (int)(M - m0 < MB ? M - m0 : MB);
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
        for (int64_t n = 0; n < N; n++) {
            switch (mc) {
            case 1: f32_row(W + n * K, x + m0 * K, y + m0 * N, n, N, K, 1); break;
            case 2: f32_row(W + n * K, x + m0 * K, y + m0 * N, n, N, K, 2); break;
            case 3: f32_row(W + n * K, x + m0 * K, y + m0 * N, n, N, K, 3); break;
            default: f32_row(W + n * K, x + m0 * K, y + m0 * N, n, N, K, 4); break;
            }
        }
    }
}

/* The decode step (step.h) with this file's vectors */
#define VL 16
#define V_LD ld16
#define V_ST st16
#define V_ADD _mm512_add_ps
#define V_MUL _mm512_mul_ps
#define V_ROUND round16
#define V_SILU silu16
#include "step.h"

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
