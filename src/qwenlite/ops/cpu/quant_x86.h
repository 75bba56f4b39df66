/* The integer GEMVs' activations on x86 (avx2.c and avx512.c include it after <immintrin.h>; AVX2 code, which every
 * AVX-512 CPU also runs): bf16 rows quantized once per call, as int16 blocks for int8 weights and as int8 blocks of 16
 * for int4 weights (avx2.c's header says why each), and the int4 GEMV's sums of what the products see per weight
 * group. Both files multiply the same quantized activations, so their GEMVs agree with each other and with the twin
 * (quant_matmul.quantize_activations) up to their fp32 summation order. */

#ifndef QK_QUANT_X86_H
#define QK_QUANT_X86_H

#include "common.h"

#include <immintrin.h>

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* 8 bf16 -> 8 fp32 */
static inline __m256 cvt_bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

/* x (M, K) bf16 -> xq (M, K) int16 and sx (M, K / BL): x ~ xq * sx, sx = 2^e with the block's largest |x| < 2^15 sx */
static void quantize_x16(const uint16_t *x, int64_t M, int64_t K, int64_t BL, int16_t *xq, float *sx) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / BL; b++) {
            const uint16_t *xb = x + m * K + b * BL;
            uint16_t top = 0; /* the largest |x| as bf16 bits: the exponent decides the scale */
            for (int64_t i = 0; i < BL; i++) top = (xb[i] & 0x7fff) > top ? (xb[i] & 0x7fff) : top;
            int e = 0;
            if (top) frexpf(bf16_to_f32(top), &e); /* top < 2^e */
            const float scale = ldexpf(1.0f, e - 15), inv = ldexpf(1.0f, 15 - e);
            sx[m * (K / BL) + b] = top >= 0x7f80 ? NAN : scale; /* an inf or NaN in x makes the outputs NaN */
            for (int64_t i = 0; i < BL; i += 8) {
                const __m256 v = _mm256_mul_ps(cvt_bf16x8(_mm_loadu_si128((const __m128i *)(xb + i))), _mm256_set1_ps(inv));
                const __m256i q = _mm256_cvtps_epi32(v); /* |v| < 2^15: exact below 2^7 of the top, else rounded */
                const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q, q), _MM_SHUFFLE(3, 1, 2, 0));
                _mm_storeu_si128((__m128i *)(xq + m * K + b * BL + i), _mm256_castsi256_si128(p));
            }
        }
}

/* bf16 activations as int8, in blocks of 16 columns (never crossing a weight group: G % 16 == 0): x (M, K) bf16 ->
 * xq (M, K) int8 and sx (M, K / 16), x ~ xq * sx with sx = max |x| / 127 (round to nearest), as llama.cpp's Q8
 * activations (blocks of 32 there). An inf or NaN in a block makes its scale NaN, so the outputs are NaN. */
static void quantize_x8(const uint16_t *x, int64_t M, int64_t K, int8_t *xq, float *sx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < M * K; i += 16) {
        const __m256 a = cvt_bf16x8(_mm_loadu_si128((const __m128i *)(x + i)));
        const __m256 b = cvt_bf16x8(_mm_loadu_si128((const __m128i *)(x + i + 8)));
        const __m256 aa = _mm256_and_ps(a, absmask), ab = _mm256_and_ps(b, absmask), inf = _mm256_set1_ps(INFINITY);
        const float top = hmax8(_mm256_max_ps(aa, ab));
        const int bad = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(aa, inf, _CMP_NLT_UQ), _mm256_cmp_ps(ab, inf, _CMP_NLT_UQ)));
        sx[i / 16] = bad ? NAN : top / 127.0f;
        const __m256 inv = _mm256_set1_ps(top > 0 && !bad ? 127.0f / top : 0.0f);
        const __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(a, inv)), qb = _mm256_cvtps_epi32(_mm256_mul_ps(b, inv));
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), _MM_SHUFFLE(3, 1, 2, 0)); /* 16 x int16 */
        const __m128i n = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128((__m128i *)(xq + i), n);
    }
}

/* The int4 GEMV's activations, x (M, K): bf16 rows as xq (M, K) int8 and sx (M, K / 16) (quantize_x8), fp32 rows as
 * they are; and xsum (M, K / G), per row and weight group the sum of the x the products see (the quantized values
 * where they are): W = q s + (z - 8 s) makes each group's output s sum(q x) + (z - 8 s) sum(x). In scratch slots 0
 * and 1; -1 if they cannot be allocated. */
static int int4_activations(const void *x, int x_bf16, int64_t M, int64_t K, int64_t G, int8_t **xq, float **sx,
                            float **xsum) {
    const int64_t ng = K / G;
    *xsum = scratch(1, sizeof(float) * (size_t)(M * ng + (x_bf16 ? M * (K / 16) : 0)));
    *xq = x_bf16 ? scratch(0, (size_t)(M * K)) : NULL;
    if (!*xsum || (x_bf16 && !*xq)) return -1;
    *sx = *xsum + M * ng;
    if (x_bf16) quantize_x8(x, M, K, *xq, *sx);
    for (int64_t m = 0; m < M; m++)
        for (int64_t gi = 0; gi < ng; gi++) {
            float acc = 0;
            for (int64_t b = gi * G / 16; x_bf16 && b < (gi + 1) * G / 16; b++) {
                int32_t q = 0;
                for (int k = 0; k < 16; k++) q += (*xq)[m * K + 16 * b + k];
                acc += (float)q * (*sx)[m * (K / 16) + b];
            }
            for (int64_t k = gi * G; !x_bf16 && k < (gi + 1) * G; k++) acc += ((const float *)x)[m * K + k];
            (*xsum)[m * ng + gi] = acc;
        }
    return 0;
}

#endif
