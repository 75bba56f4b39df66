/* The int8 GEMV's loops over W and the rows of x, written once for the files that include it after their
 * int8_row_i16 (bf16 activations as int16 blocks, quantize_x16) and int8_row_f32 (fp32 activations): avx2.c,
 * avx512.c and neon.c. One pass over W for all rows of x: a block of NB rows of W (in L2) meets every 4 rows of x in
 * turn. Each (row of W, row of x) pair is the row function's sum, whatever the rows beside it. */

void qk_gemv_int8(const int8_t *W, const void *s, int s_bf16, int64_t G, const void *x, int x_bf16, void *y,
                  int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t BL = block_len(G);
    int16_t *xq = NULL;
    float *sx = NULL;
    const float *xf = NULL;
    if (x_bf16) {
        xq = scratch(0, sizeof(int16_t) * (size_t)(M * K));
        sx = scratch(1, sizeof(float) * (size_t)(M * (K / BL)));
        if (!xq || !sx) return;
        quantize_x16(x, M, K, BL, xq, sx);
    } else {
        xf = x;
    }
    enum { NB = 16 };
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * K))
    for (int64_t n0 = 0; n0 < N; n0 += NB)
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int mc = (int)(M - m0 < MB ? M - m0 : MB);
            char *ym = (char *)y + m0 * N * (y_bf16 ? 2 : 4);
            for (int64_t n = n0; n < n0 + NB && n < N; n++) {
                const int8_t *w = W + n * K;
                if (x_bf16) {
                    const int16_t *xm = xq + m0 * K;
                    const float *sm = sx + m0 * (K / BL);
                    switch (mc) {
                    case 1: int8_row_i16(w, s, s_bf16, G, BL, xm, sm, ym, y_bf16, n, N, K, 1); break;
                    case 2: int8_row_i16(w, s, s_bf16, G, BL, xm, sm, ym, y_bf16, n, N, K, 2); break;
                    case 3: int8_row_i16(w, s, s_bf16, G, BL, xm, sm, ym, y_bf16, n, N, K, 3); break;
                    default: int8_row_i16(w, s, s_bf16, G, BL, xm, sm, ym, y_bf16, n, N, K, 4); break;
                    }
                    continue;
                }
                const float *xm = xf + m0 * K;
                switch (mc) {
                case 1: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 1); break;
                case 2: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 2); break;
                case 3: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 3); break;
                default: int8_row_f32(w, s, s_bf16, G, xm, ym, y_bf16, n, N, K, 4); break;
                }
            }
        }
}
