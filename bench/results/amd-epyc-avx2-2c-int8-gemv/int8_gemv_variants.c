/* The int8 GEMV at one row of x over the Qwen3.5-0.8B's 186 body matrices (per-channel scales, as `qwenlite
 * quantize --bits 8` writes them), in layer order, best of 15, 2 threads: qwenlite's qk_gemv_int8 (from the kernel
 * library, bf16 x quantized per call) against two stripped-down loops with x quantized beforehand:
 *   A: x as int16 blocks of 256 (qk_gemv_int8's format), weights widened to int16, vpmaddwd, each block unrolled
 *   B: x as int8 blocks of QB with fp32 scales, |x| u8 times sign(w, x) s8 through vpmaddubsw, then vpmaddwd by 1s
 *      (llama.cpp's Q8_0 x Q8_0 on AVX2)
 * `./int8_gemv_variants 0 LIB` streams the 498 MB from memory, `1 LIB` runs one 1 MB matrix 2000 times (cache).
 *   gcc -O3 -march=x86-64-v3 -fopenmp -ffp-contract=off -DQB=128 [-DPF=4096] -o int8_gemv_variants \
 *       int8_gemv_variants.c -ldl -Wl,--no-as-needed -lm
 *   ./int8_gemv_variants 0 ~/.cache/qwenlite/kernels/kernels-avx2-<hash>.so */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <dlfcn.h>
typedef void (*g8_t)(const int8_t *, const void *, int, int64_t, const void *, int, void *, int, int64_t, int64_t, int64_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#ifndef PF
#define PF 0
#endif
/* A: current design: x int16 blocks of BL=256 (pow2 scale), w widened to int16, madd */
static void gemv_a(const int8_t *W, const float *s, const int16_t *xq, const float *sx, float *y, int64_t N, int64_t K) {
    const int64_t BL = 256, nb = K / BL;
#pragma omp parallel for schedule(static) num_threads(2)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = W + n * K;
        __m256 g = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < K; b0 += BL) {
            __m256i acc = _mm256_setzero_si256();
            for (int64_t k = b0; k < b0 + BL; k += 16) {
#if PF
                if (!(k & 63)) _mm_prefetch((const char *)(w + k + PF), _MM_HINT_T0);
#endif
                const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i *)(xq + k))));
            }
            g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx[b0 / BL]), g);
        }
        y[n] = hsum8(g) * s[n];
        (void)nb;
    }
}
/* B: x int8 in blocks of QB (fp32 scale), sign trick: |x| u8 * sign(w, x) s8 via maddubs, madd ones */
#ifndef QB
#define QB 32
#endif
static void gemv_b(const int8_t *W, const float *s, const int8_t *xa, const int8_t *xs, const float *sx, float *y, int64_t N, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
#pragma omp parallel for schedule(static) num_threads(2)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = W + n * K;
        __m256 g = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < K; b0 += QB) {
            __m256i acc = _mm256_setzero_si256();
            for (int64_t k = b0; k < b0 + QB; k += 32) {
#if PF
                if (!(k & 63)) _mm_prefetch((const char *)(w + k + PF), _MM_HINT_T0);
#endif
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
                const __m256i sw = _mm256_sign_epi8(wv, _mm256_loadu_si256((const __m256i *)(xs + k)));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(xa + k)), sw), ones));
            }
            g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sx[b0 / QB]), g);
        }
        y[n] = hsum8(g) * s[n];
    }
}
struct mat { int64_t n, k; int8_t *w; float *s; };
static struct mat mk(int64_t n, int64_t k) {
    struct mat m = {n, k, aligned_alloc(64, n * k), aligned_alloc(64, n * 4 + 64)};
    for (int64_t i = 0; i < n * k; i++) m.w[i] = (int8_t)(rand() % 255 - 127);
    for (int64_t i = 0; i < n; i++) m.s[i] = 0.01f;
    return m;
}
int main(int argc, char **argv) {
    int incache = argc > 1 && atoi(argv[1]);
    int64_t layer_gdn[][2] = {{6144, 1024}, {2048, 1024}, {16, 1024}, {16, 1024}, {1024, 2048}};
    int64_t layer_attn[][2] = {{4096, 1024}, {512, 1024}, {512, 1024}, {1024, 2048}};
    int64_t mlp[][2] = {{3584, 1024}, {3584, 1024}, {1024, 3584}};
    struct mat ms[200];
    int n = 0;
    if (incache) { ms[n++] = mk(1024, 1024); }
    else for (int l = 0; l < 24; l++) {
        if (l % 4 == 3) for (int i = 0; i < 4; i++) ms[n++] = mk(layer_attn[i][0], layer_attn[i][1]);
        else for (int i = 0; i < 5; i++) ms[n++] = mk(layer_gdn[i][0], layer_gdn[i][1]);
        for (int i = 0; i < 3; i++) ms[n++] = mk(mlp[i][0], mlp[i][1]);
    }
    int64_t bytes = 0;
    for (int i = 0; i < n; i++) bytes += ms[i].n * ms[i].k;
    int16_t *xq = aligned_alloc(64, 4096 * 2); int8_t *xa = aligned_alloc(64, 4096), *xs = aligned_alloc(64, 4096);
    float *sx = aligned_alloc(64, 4096 * 4), *y = aligned_alloc(64, 8192 * 4);
    for (int i = 0; i < 4096; i++) { xq[i] = rand() % 60000 - 30000; xs[i] = rand() % 255 - 127; xa[i] = abs(xs[i]); sx[i] = 1e-3f; }
    void *h = dlopen(argv[2], RTLD_NOW); g8_t g8 = (g8_t)dlsym(h, "qk_gemv_int8");
    uint16_t *xb = aligned_alloc(64, 4096 * 2); uint16_t *yb = aligned_alloc(64, 8192 * 2);
    for (int i = 0; i < 4096; i++) xb[i] = 0x3f00 + (rand() & 0xff) - 0x80;
    double bc = 1e9;
    int reps = incache ? 2000 : 1;
    double ba = 1e9, bb = 1e9;
    for (int r = 0; r < 15; r++) {
        double t = now();
        for (int j = 0; j < reps; j++) for (int i = 0; i < n; i++) gemv_a(ms[i].w, ms[i].s, xq, sx, y, ms[i].n, ms[i].k);
        t = (now() - t) / reps; ba = t < ba ? t : ba;
        t = now();
        for (int j = 0; j < reps; j++) for (int i = 0; i < n; i++) gemv_b(ms[i].w, ms[i].s, xa, xs, sx, y, ms[i].n, ms[i].k);
        t = (now() - t) / reps; bb = t < bb ? t : bb;
        t = now();
        for (int j = 0; j < reps; j++) for (int i = 0; i < n; i++) g8(ms[i].w, ms[i].s, 0, ms[i].k, xb, 1, yb, 1, 1, ms[i].n, ms[i].k, 2);
        t = (now() - t) / reps; bc = t < bc ? t : bc;
    }
    printf("real qk_gemv_int8 %.3f ms %.1f GB/s\n", bc * 1e3, bytes / bc / 1e9);
    printf("%s %.0f MB: A (int16 x) %.3f ms %.1f GB/s | B (int8 x, QB %d) %.3f ms %.1f GB/s\n", incache ? "in cache" : "stream",
           bytes / 1e6, ba * 1e3, bytes / ba / 1e9, QB, bb * 1e3, bytes / bb / 1e9);
}
