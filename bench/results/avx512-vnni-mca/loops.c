/* The inner loops of qwenlite's quantized GEMVs for one step (MC rows of activations, accumulators in registers), for
 * llvm-mca: the old avx512.c loops (int8 weights widened to fp32; int4 nibbles widened to bf16 for AVX512-BF16),
 * the new VNNI ones (as in avx512.c since this folder), avx2.c's, and avx2.c's int4 loop with AVX-VNNI (as in
 * avx2.c since). Regions are named "<loop>:<bytes of weights a step>". README.md has the commands. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifndef MC
#define MC 1
#endif
#define BEGIN(name) __asm__ volatile("# LLVM-MCA-BEGIN " name)
#define END() __asm__ volatile("# LLVM-MCA-END")
static inline __m256i col(const uint8_t *tile, int64_t k) { return _mm256_loadu_si256((const __m256i *)(tile + k * 32)); }

#ifdef __AVX512VNNI__
void old_int8_f32(const int8_t *w, const float *x, int64_t K, __m512 *out) {
    __m512 acc[MC][4];
    for (int m = 0; m < MC; m++) for (int j = 0; j < 4; j++) acc[m][j] = out[4 * m + j];
    for (int64_t k = 0; k < K; k += 64) {
        BEGIN("avx512_old_int8_f32:64");
        for (int j = 0; j < 4; j++) {
            const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16 * j))));
            for (int m = 0; m < MC; m++) acc[m][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * j), acc[m][j]);
        }
        END();
    }
    for (int m = 0; m < MC; m++) for (int j = 0; j < 4; j++) out[4 * m + j] = acc[m][j];
}

void new_int8_one_chain(const int8_t *w, const int16_t *xq, int64_t K, __m512i *out) {
    __m512i acc[MC];
    for (int m = 0; m < MC; m++) acc[m] = out[m];
    for (int64_t k = 0; k < K; k += 32) {
        BEGIN("avx512_vnni_int8_one_chain:32");
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k)));
        for (int m = 0; m < MC; m++) acc[m] = _mm512_dpwssd_epi32(acc[m], wv, _mm512_loadu_si512(xq + m * K + k));
        END();
    }
    for (int m = 0; m < MC; m++) out[m] = acc[m];
}

void new_int8(const int8_t *w, const int16_t *xq, int64_t K, __m512i *out) {
    __m512i acc[MC][4];
    for (int m = 0; m < MC; m++) for (int j = 0; j < 4; j++) acc[m][j] = out[4 * m + j];
    for (int64_t k = 0; k < K; k += 128) {
        BEGIN("avx512_vnni_int8_four_chains:128");
        for (int j = 0; j < 4; j++) {
            const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + 32 * j)));
            for (int m = 0; m < MC; m++)
                acc[m][j] = _mm512_dpwssd_epi32(acc[m][j], wv, _mm512_loadu_si512(xq + m * K + k + 32 * j));
        }
        END();
    }
    for (int m = 0; m < MC; m++) for (int j = 0; j < 4; j++) out[4 * m + j] = acc[m][j];
}

void old_int4_bf16(const uint8_t *tile, const uint16_t *x, int64_t K, __m512 *out) {
    const __m256i nib = _mm256_set1_epi8(15);
    const __m512i one28 = _mm512_set1_epi16(0x4300);
    __m512 acc[MC][4];
    for (int m = 0; m < MC; m++) for (int r = 0; r < 4; r++) acc[m][r] = out[4 * m + r];
    for (int64_t kk = 0; kk < K; kk += 2) {
        BEGIN("avx512_old_int4_bf16:64");
        {
            const __m256i c0 = col(tile, kk), c1 = col(tile, kk + 1);
            const __m256i ul = _mm256_unpacklo_epi8(c0, c1), uh = _mm256_unpackhi_epi8(c0, c1);
            __m512i w[4];
            w[0] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(ul, nib)), one28);
            w[1] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(uh, nib)), one28);
            w[2] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(ul, 4), nib)), one28);
            w[3] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(uh, 4), nib)), one28);
            for (int m = 0; m < MC; m++) {
                int32_t pair;
                memcpy(&pair, x + m * K + kk, 4);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                for (int r = 0; r < 4; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)w[r], xv);
            }
        }
        END();
    }
    for (int m = 0; m < MC; m++) for (int r = 0; r < 4; r++) out[4 * m + r] = acc[m][r];
}

void new_int4(const uint8_t *tile, const int8_t *xq, int64_t K, __m512i *out) {
    const __m512i nib = _mm512_set1_epi8(15);
    __m512i acc[MC][4];
    for (int m = 0; m < MC; m++) for (int r = 0; r < 4; r++) acc[m][r] = out[4 * m + r];
    for (int64_t k = 0; k < K; k += 4) {
        BEGIN("avx512_vnni_int4:128");
        _mm_prefetch((const char *)(tile + k * 32 + 4096), _MM_HINT_T0);
        _mm_prefetch((const char *)(tile + k * 32 + 4096 + 64), _MM_HINT_T0);
        const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(col(tile, k)), col(tile, k + 2), 1);
        const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(col(tile, k + 1)), col(tile, k + 3), 1);
        const __m512i u0 = _mm512_unpacklo_epi8(a, b), u1 = _mm512_unpackhi_epi8(a, b);
        const __m512i v01 = _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i v23 = _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i z0 = _mm512_unpacklo_epi16(v01, v23), z1 = _mm512_unpackhi_epi16(v01, v23);
        const __m512i w[4] = {_mm512_and_si512(z0, nib), _mm512_and_si512(z1, nib),
                              _mm512_and_si512(_mm512_srli_epi16(z0, 4), nib), _mm512_and_si512(_mm512_srli_epi16(z1, 4), nib)};
        for (int m = 0; m < MC; m++) {
            int32_t four;
            memcpy(&four, xq + m * K + k, 4);
            const __m512i xv = _mm512_set1_epi32(four);
            for (int r = 0; r < 4; r++) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], w[r], xv);
        }
        END();
    }
    for (int m = 0; m < MC; m++) for (int r = 0; r < 4; r++) out[4 * m + r] = acc[m][r];
}
#else
void avx2_int8(const int8_t *w, const int16_t *xq, int64_t K, __m256i *out) {
    __m256i acc[MC];
    for (int m = 0; m < MC; m++) acc[m] = out[m];
    for (int64_t k = 0; k < K; k += 16) {
        BEGIN("avx2_int8:16");
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
        for (int m = 0; m < MC; m++)
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i *)(xq + m * K + k))));
        END();
    }
    for (int m = 0; m < MC; m++) out[m] = acc[m];
}

void avx2_int4(const uint8_t *tile, const int8_t *xq, int64_t K, __m256i *out) {
    const __m256i nib = _mm256_set1_epi8(15);
    __m256i acc[MC][4];
    for (int m = 0; m < MC; m++) for (int u = 0; u < 4; u++) acc[m][u] = out[4 * m + u];
    for (int64_t kk = 0; kk < K; kk += 2) {
        BEGIN("avx2_int4:64");
        {
            _mm_prefetch((const char *)(tile + kk * 32 + 4096), _MM_HINT_T0);
            const __m256i c0 = col(tile, kk), c1 = col(tile, kk + 1);
            const __m256i u0 = _mm256_unpacklo_epi8(c0, c1), u1 = _mm256_unpackhi_epi8(c0, c1);
            const __m256i q[4] = {_mm256_and_si256(u0, nib), _mm256_and_si256(u1, nib),
                                  _mm256_and_si256(_mm256_srli_epi16(u0, 4), nib), _mm256_and_si256(_mm256_srli_epi16(u1, 4), nib)};
            for (int m = 0; m < MC; m++) {
                int16_t pair;
                memcpy(&pair, xq + m * K + kk, 2);
                const __m256i xv = _mm256_set1_epi16(pair);
                for (int u = 0; u < 4; u++) acc[m][u] = _mm256_add_epi16(acc[m][u], _mm256_maddubs_epi16(q[u], xv));
            }
        }
        END();
    }
    for (int m = 0; m < MC; m++) for (int u = 0; u < 4; u++) out[4 * m + u] = acc[m][u];
}

#ifdef __AVXVNNI__
void avxvnni_int4(const uint8_t *tile, const int8_t *xq, int64_t K, __m256i *out) {
    const __m256i nib = _mm256_set1_epi8(15);
    __m256i acc[MC][8];
    for (int m = 0; m < MC; m++) for (int u = 0; u < 8; u++) acc[m][u] = out[8 * m + u];
    for (int64_t k = 0; k < K; k += 4) {
        BEGIN("avxvnni_int4:128");
        _mm_prefetch((const char *)(tile + k * 32 + 4096), _MM_HINT_T0);
        _mm_prefetch((const char *)(tile + k * 32 + 4096 + 64), _MM_HINT_T0);
        const __m256i a0 = _mm256_unpacklo_epi8(col(tile, k), col(tile, k + 1)), a1 = _mm256_unpackhi_epi8(col(tile, k), col(tile, k + 1));
        const __m256i b0 = _mm256_unpacklo_epi8(col(tile, k + 2), col(tile, k + 3)), b1 = _mm256_unpackhi_epi8(col(tile, k + 2), col(tile, k + 3));
        const __m256i z[4] = {_mm256_unpacklo_epi16(a0, b0), _mm256_unpackhi_epi16(a0, b0),
                              _mm256_unpacklo_epi16(a1, b1), _mm256_unpackhi_epi16(a1, b1)};
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
        END();
    }
    for (int m = 0; m < MC; m++) for (int u = 0; u < 8; u++) out[8 * m + u] = acc[m][u];
}
#endif
#endif
