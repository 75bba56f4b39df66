/* AVX-512 on a CPU without it, for the tests only: test_kernels.py builds avx512.c for AVX2 with this header forced
 * in first (`-include`), so that avx512.c's kernels run against their torch twins on any x86-64-v3 machine. SIMDe
 * (Debian's libsimde-dev, header-only) stands in for the intrinsics under their own names; the few it lacks (0.7.4)
 * are written below as the Intel SDM defines them, scalar and slow. The feature macros avx512.c checks are then
 * defined by hand. */

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <stdint.h>
#include <string.h>

#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512BF16__ 1
#define __AVX512VNNI__ 1

static inline simde__m512 qk_emu_cvtepi32_ps(simde__m512i a) {
    int32_t i[16];
    float f[16];
    memcpy(i, &a, 64);
    for (int j = 0; j < 16; j++) f[j] = (float)i[j]; /* the default rounding, to nearest even, as vcvtdq2ps */
    simde__m512 r;
    memcpy(&r, f, 64);
    return r;
}

#define QK_EMU_WIDEN(name, TI, TO, n, AT)                                                                            \
    static inline simde__m512i name(AT a) {                                                                          \
        TI i[n];                                                                                                     \
        TO o[n];                                                                                                     \
        memcpy(i, &a, sizeof i);                                                                                     \
        for (int j = 0; j < n; j++) o[j] = (TO)i[j];                                                                 \
        simde__m512i r;                                                                                              \
        memcpy(&r, o, 64);                                                                                           \
        return r;                                                                                                    \
    }
QK_EMU_WIDEN(qk_emu_cvtepi8_epi32, int8_t, int32_t, 16, simde__m128i)
QK_EMU_WIDEN(qk_emu_cvtepu8_epi32, uint8_t, int32_t, 16, simde__m128i)
QK_EMU_WIDEN(qk_emu_cvtepu16_epi32, uint16_t, int32_t, 16, simde__m256i)
QK_EMU_WIDEN(qk_emu_cvtepu8_epi16, uint8_t, int16_t, 32, simde__m256i)

/* vcvtneps2bf16: round to nearest even, denormal inputs as zero, NaN kept quiet */
static inline simde__m256i qk_emu_cvtneps_pbh(simde__m512 a) {
    uint32_t u[16];
    uint16_t h[16];
    memcpy(u, &a, 64);
    for (int j = 0; j < 16; j++) {
        const uint32_t x = u[j];
        if ((x & 0x7fffffffu) > 0x7f800000u)
            h[j] = (uint16_t)((x >> 16) | 0x40);
        else if ((x & 0x7f800000u) == 0)
            h[j] = (uint16_t)((x >> 16) & 0x8000);
        else
            h[j] = (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    }
    simde__m256i r;
    memcpy(&r, h, 32);
    return r;
}

/* masked loads read only the lanes their mask names (the others may lie past the end of an allocation) */
static inline simde__m512i qk_emu_maskz_loadu_epi16(uint32_t k, const void *p) {
    int16_t o[32];
    for (int j = 0; j < 32; j++) o[j] = (k >> j & 1) ? ((const int16_t *)p)[j] : 0;
    simde__m512i r;
    memcpy(&r, o, 64);
    return r;
}

static inline simde__m512 qk_emu_maskz_loadu_ps(uint16_t k, const void *p) {
    float o[16];
    for (int j = 0; j < 16; j++) o[j] = (k >> j & 1) ? ((const float *)p)[j] : 0.0f;
    simde__m512 r;
    memcpy(&r, o, 64);
    return r;
}

/* GCC's sequence for it: the halves added, then the quarters, then neighbours */
static inline float qk_emu_reduce_add_ps(simde__m512 a) {
    float f[16];
    memcpy(f, &a, 64);
    for (int j = 0; j < 8; j++) f[j] = f[j + 8] + f[j];
    for (int j = 0; j < 4; j++) f[j] = f[j + 4] + f[j];
    for (int j = 0; j < 2; j++) f[j] = f[j] + f[j + 2];
    return f[0] + f[1];
}

#define _mm512_cvtepi32_ps qk_emu_cvtepi32_ps
#define _mm512_cvtepi8_epi32 qk_emu_cvtepi8_epi32
#define _mm512_cvtepu8_epi32 qk_emu_cvtepu8_epi32
#define _mm512_cvtepu16_epi32 qk_emu_cvtepu16_epi32
#define _mm512_cvtepu8_epi16 qk_emu_cvtepu8_epi16
#define _mm512_cvtneps_pbh qk_emu_cvtneps_pbh
#define _mm512_maskz_loadu_epi16 qk_emu_maskz_loadu_epi16
#define _mm512_maskz_loadu_ps qk_emu_maskz_loadu_ps
#define _mm512_reduce_add_ps qk_emu_reduce_add_ps
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_shuffle_f32x4(a, b, imm)
#define _mm512_shuffle_i64x2(a, b, imm) simde_mm512_shuffle_i64x2(a, b, imm)
