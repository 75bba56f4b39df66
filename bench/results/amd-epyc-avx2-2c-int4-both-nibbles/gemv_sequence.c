/* The int4 GEMV alone, timed in C (no Python per call): qk_gemv_int4 over the Qwen3.5-0.8B's 186 body matrices in
 * layer order (random weights, group 128, bf16 scales; in_proj_qkv, z, a, b and out_proj of 18 Gated DeltaNet layers,
 * q, k, v and o_proj of 6 attention layers, 24 MLPs) against one matrix of the same bytes, best of 15, 2 threads.
 * Used for the figures of README.md beside it:
 *   gcc -O2 -o gemv_sequence gemv_sequence.c -ldl -fopenmp -Wl,--no-as-needed -lm
 *   ./gemv_sequence ~/.cache/qwenlite/kernels/kernels-avx2-<hash>.so M      (M rows of x: 1 decode, 2..4 verify) */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef void (*gemv_t)(const uint8_t *, const void *, int, int64_t, const void *, int, void *, int, int64_t, int64_t,
                       int64_t, int64_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
struct mat { int64_t n, np, k; uint8_t *w; uint16_t *sz; };
static struct mat mk(int64_t n, int64_t k) {
    struct mat m = {n, (n + 63) / 64 * 64, k, 0, 0};
    m.w = aligned_alloc(64, m.np * k / 2);
    for (int64_t i = 0; i < m.np * k / 2; i++) m.w[i] = rand();
    m.sz = aligned_alloc(64, (k / 128) * m.np * 2 * 2 + 64);
    for (int64_t i = 0; i < (k / 128) * m.np * 2; i++) m.sz[i] = 0x3c00 + (rand() & 0xff);
    return m;
}
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) {
        printf("%s\n", dlerror());
        return 1;
    }
    gemv_t g = (gemv_t)dlsym(h, "qk_gemv_int4");
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
    for (int i = 0; i < n; i++) bytes += ms[i].np * ms[i].k / 2 + (ms[i].k / 128) * ms[i].np * 4;
    uint16_t *x = malloc(2 * 4 * 4096 * 2), *y = malloc(4 * 1000000 * 2);
    for (int i = 0; i < 4 * 4096 * 2; i++) x[i] = 0x3f00 + (rand() & 0xff) - 0x80;
    struct mat big = mk(bytes / (1024 / 2 + 32), 1024);
    double best = 1e9, bestbig = 1e9;
    for (int r = 0; r < 15; r++) {
        double t = now();
        for (int i = 0; i < n; i++) g(ms[i].w, ms[i].sz, 1, 128, x, 1, y, 1, M, ms[i].np, ms[i].n, ms[i].k, 2);
        t = now() - t;
        best = t < best ? t : best;
        t = now();
        g(big.w, big.sz, 1, 128, x, 1, y, 1, M, big.np, big.n, big.k, 2);
        t = now() - t;
        bestbig = t < bestbig ? t : bestbig;
    }
    printf("M=%d: %d matrices %.0f MB: %.2f ms %.1f GB/s; one matrix %lld rows: %.2f ms %.1f GB/s\n", M, n, bytes / 1e6,
           best * 1e3, bytes / best / 1e9, (long long)big.n, bestbig * 1e3, bytes / bestbig / 1e9);
}
