/* The int4 GEMV in cache: one matrix of n x 1024 (n = 512, 1024, 2048; 256 KB to 1 MB of random int4 weights, in
 * L2 / L3) times one row of x, 200 calls in a row, best of 20, 2 threads: the kernel's own instruction cost.
 *   gcc -O2 -o gemv_in_cache gemv_in_cache.c -ldl -fopenmp -Wl,--no-as-needed -lm
 *   ./gemv_in_cache ~/.cache/qwenlite/kernels/kernels-avx2-<hash>.so */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef void (*gemv_t)(const uint8_t *, const void *, int, int64_t, const void *, int, void *, int, int64_t, int64_t,
                       int64_t, int64_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    gemv_t g = (gemv_t)dlsym(h, "qk_gemv_int4");
    int64_t K = 1024;
    uint8_t *w = aligned_alloc(64, 4096 * K / 2);
    for (int64_t i = 0; i < 4096 * K / 2; i++) w[i] = rand();
    uint16_t *sz = aligned_alloc(64, 8 * 4096 * 4);
    for (int64_t i = 0; i < 8 * 4096 * 2; i++) sz[i] = 0x3c00 + (rand() & 0xff);
    uint16_t x[4096], y[4096];
    for (int i = 0; i < 4096; i++) x[i] = 0x3f00 + (rand() & 0xff) - 0x80;
    for (int64_t n = 512; n <= 2048; n *= 2) {
        double best = 1e9;
        for (int r = 0; r < 20; r++) {
            double t = now();
            for (int i = 0; i < 200; i++) g(w, sz, 1, 128, x, 1, y, 1, 1, n, n, K, 2);
            t = (now() - t) / 200;
            best = t < best ? t : best;
        }
        printf("n=%lld (%lld KB, in cache): %.2f us\n", (long long)n, (long long)(n * K / 2 / 1024), best * 1e6);
    }
}
