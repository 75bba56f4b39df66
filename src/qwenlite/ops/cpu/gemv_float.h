/* The float GEMV's loop over W and the rows of x, written once for the files that include it after their
 * float_row (avx2.c, neon.c): y (M, N) = x (M, K) W^T with W bf16 or fp32, x fp32, y bf16 or fp32.
 *
 * One pass over W for all rows of x, as the int8 GEMV: a block of NB rows of W (in L2) meets every 4 rows of x in
 * turn. It used to stream all of W once per 4 rows: on the 2-core AVX2 EPYC, 5 rows of x (a verification of 4
 * drafts) took the 0.8B's bf16 body GEMVs 72-75 ms, now 64-66; 8 rows 87 -> 83; 1 to 4 rows unchanged (NEON
 * unmeasured). Each (row of W, row of x) pair is float_row's sum, whatever the rows beside it. */

static void gemv_float(const void *W, const int wbf, const float *x, void *y, const int ybf, int64_t M, int64_t N,
                       int64_t K, int nthreads) {
    const size_t ysz = ybf ? 2 : 4;
    enum { NB = 16 };
    /* Every thread from 128 KB of W (~4 us on one core from L2 or L3, against ~1-2 us to start a parallel region),
     * not from threads_for's 2^18 weights (1 MB of fp32): the demo model's fp32 GEMVs (hidden 192, 148-393 KB each)
     * ran on one core, and its plain decoding went from 1.5-1.7 to 1.9-2.1K tok/s on the 2-core AVX2 EPYC. */
    const int nt = N * K * (wbf ? 2 : 4) < (1 << 17) ? 1 : nthreads;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += NB)
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mc = (int)(M - m0 < MB ? M - m0 : MB);
            const float *xm = x + m0 * K;
            char *ym = (char *)y + m0 * N * ysz;
            for (int64_t n = n0; n < n0 + NB && n < N; n++) {
                const char *w = (const char *)W + n * K * (wbf ? 2 : 4);
                switch (mc) {
                case 1: float_row(w, wbf, xm, ym, ybf, n, N, K, 1); break;
                case 2: float_row(w, wbf, xm, ym, ybf, n, N, K, 2); break;
                case 3: float_row(w, wbf, xm, ym, ybf, n, N, K, 3); break;
                default: float_row(w, wbf, xm, ym, ybf, n, N, K, 4); break;
                }
            }
        }
}
