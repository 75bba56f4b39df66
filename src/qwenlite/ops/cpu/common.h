/* What every instruction set's kernels share (avx512.c, avx2.c and neon.c include it first): the C library,
 * bf16 <-> fp32 scalars as torch rounds them, the fp32 staging buffer, per-thread scratch buffers and the thread
 * heuristic. Nothing here uses SIMD intrinsics; each file's -m flags decide what the compiler makes of the loops. */

#ifndef QK_COMMON_H
#define QK_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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


/* The int8 GEMVs' bf16 activations as int16 blocks (avx2.c's header says why): a block is at most 256 columns and
 * never crosses a weight group of G columns (G % 16 == 0, so a block is BL = 16 d columns for the largest divisor d
 * of G / 16 with 16 d <= 256). */
static inline int64_t block_len(int64_t G) {
    int64_t d = G / 16 < 16 ? G / 16 : 16;
    while ((G / 16) % d) d--;
    return 16 * d;
}

static inline int threads_for(int nthreads, int64_t work) { return work < (1 << 18) ? 1 : nthreads; }

/* 1 or 16 values of fp32 or bf16 (`bf`, a compile-time constant where it matters) as fp32, and back */
static inline float ld1(const void *p, int64_t i, const int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* A per-thread scratch buffer of at least n bytes (64-byte aligned), kept between calls; NULL if allocation fails.
 * Slots 0 and 1 are the kernels' own; slot 2 is stage_f32's. */
static void *scratch(int slot, size_t n) {
    static _Thread_local void *buf[3];
    static _Thread_local size_t cap[3];
    if (n > cap[slot]) {
        free(buf[slot]);
        cap[slot] = (n + 63) & ~(size_t)63;
        buf[slot] = aligned_alloc(64, cap[slot]);
        if (!buf[slot]) cap[slot] = 0;
    }
    return buf[slot];
}

/* x (n values) fp32 or bf16 -> fp32: bf16 widened into scratch slot 2; NULL if it cannot be allocated. */
static const float *stage_f32(const void *x, int x_bf16, int64_t n) {
    if (!x_bf16) return (const float *)x;
    float *f = scratch(2, sizeof(float) * (size_t)n);
    if (!f) return NULL;
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < n; i++) f[i] = bf16_to_f32(h[i]);
    return f;
}

#endif
