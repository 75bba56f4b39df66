/* qk_gemv_bf16 alone, timed in C: M rows of x over the Qwen3.5-0.8B's 186 body matrices (random bf16 weights) in
 * layer order, and over one 1024 x 1024 matrix in cache; best of 8, 2 threads. M = K + 1 for a verification of K
 * drafts.
 *   gcc -O2 -o gemv_bf16_rows gemv_bf16_rows.c -ldl -fopenmp -Wl,--no-as-needed -lm
 *   ./gemv_bf16_rows ~/.cache/qwenlite/kernels/kernels-avx2-<hash>.so M */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef void (*gemv_t)(const uint16_t *, const uint16_t *, uint16_t *, int64_t, int64_t, int64_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
struct mat { int64_t n, k; uint16_t *w; };
static struct mat mk(int64_t n, int64_t k) {
    struct mat m = {n, k, 0};
    m.w = aligned_alloc(64, n * k * 2);
    for (int64_t i = 0; i < n * k; i++) m.w[i] = 0x3c00 + (rand() & 0x3ff) - 0x200;
    return m;
}
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    gemv_t g = (gemv_t)dlsym(h, "qk_gemv_bf16");
    int M = argc > 2 ? atoi(argv[2]) : 1;
    int64_t layer_gdn[][2] = {{6144, 1024}, {2048, 1024}, {16, 1024}, {16, 1024}, {1024, 2048}};
    int64_t layer_attn[][2] = {{4096, 1024}, {512, 1024}, {512, 1024}, {1024, 2048}};
    int64_t mlp[][2] = {{3584, 1024}, {3584, 1024}, {1024, 3584}};
    struct mat ms[200];
    int n = 0;
    for (int l = 0; l < 24; l++) {
        if (l % 4 == 3) for (int i = 0; i < 4; i++) ms[n++] = mk(layer_attn[i][0], layer_attn[i][1]);
        else for (int i = 0; i < 5; i++) ms[n++] = mk(layer_gdn[i][0], layer_gdn[i][1]);
        for (int i = 0; i < 3; i++) ms[n++] = mk(mlp[i][0], mlp[i][1]);
    }
    int64_t bytes = 0;
    for (int i = 0; i < n; i++) bytes += ms[i].n * ms[i].k * 2;
    uint16_t *x = malloc(32 * 4096 * 2), *y = malloc(32 * 10000 * 2);
    for (int i = 0; i < 32 * 4096; i++) x[i] = 0x3f00 + (rand() & 0xff) - 0x80;
    double best = 1e9, hot = 1e9;
    for (int r = 0; r < 8; r++) {
        double t = now();
        for (int i = 0; i < n; i++) g(ms[i].w, x, y, M, ms[i].n, ms[i].k, 2);
        t = now() - t;
        best = t < best ? t : best;
        t = now();
        for (int i = 0; i < 100; i++) g(ms[1].w, x, y, M, 1024, 1024, 2); /* 2 MB, in L3 */
        t = (now() - t) / 100;
        hot = t < hot ? t : hot;
    }
    printf("M=%d: %d matrices %.0f MB: %.2f ms %.1f GB/s; 1024x1024 in cache %.1f us %.1f GB/s\n", M, n, bytes / 1e6,
           best * 1e3, bytes / best / 1e9, hot * 1e6, 2 * 1024 * 1024 / hot / 1e9);
}
