/* One decode step of a Gated DeltaNet layer at the 0.8B's shapes (16 key / value heads of 128, conv kernel 4, bf16),
 * qk_gdn_decode alone, 180 calls over 18 states in turn (18 MB, as a token's 18 layers), best of 10, 2 threads.
 *   gcc -O2 -o gdn_decode gdn_decode.c -ldl -fopenmp -Wl,--no-as-needed -lm
 *   ./gdn_decode ~/.cache/qwenlite/kernels/kernels-avx2-<hash>.so */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef void (*gdn_t)(const void *, void *, const void *, int64_t, const void *, const void *, const void *, const void *,
                      float *, const void *, const void *, float, void *, int, int, int64_t, int64_t, int64_t, int64_t,
                      int64_t, int);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static uint16_t *bf(int64_t n, int spread) {
    uint16_t *p = malloc(n * 2);
    for (int64_t i = 0; i < n; i++) p[i] = 0x3c00 + (rand() % spread) - spread / 2;
    return p;
}
int main(int argc, char **argv) {
    void *h = dlopen(argv[1], RTLD_NOW);
    gdn_t g = (gdn_t)dlsym(h, "qk_gdn_decode");
    const int64_t Hk = 16, Hv = 16, D = 128, Kc = 4, C = 2 * Hk * D + Hv * D;
    uint16_t *qkv = bf(C, 256), *conv = bf(3 * C, 256), *cw = bf(C * Kc, 256), *a = bf(Hv, 64), *b = bf(Hv, 64),
             *Al = bf(Hv, 64), *dt = bf(Hv, 64), *z = bf(Hv * D, 256), *nw = bf(D, 64), *out = bf(Hv * D, 2);
    float *state = calloc(Hv * D * D * 18, 4);
    double best = 1e9;
    for (int r = 0; r < 10; r++) {
        double t = now();
        for (int i = 0; i < 180; i++)
            g(qkv, conv, cw, Kc, a, b, Al, dt, state + (i % 18) * Hv * D * D, z, nw, 1e-6f, out, 1, 1, 1, Hk, Hv, D, D, 2);
        t = (now() - t) / 180;
        best = t < best ? t : best;
    }
    printf("gdn_decode (0.8B layer, 18 states round robin): %.1f us\n", best * 1e6);
}
