/* The gated delta rule over a prompt's T tokens, written once for every instruction set: included by each ISA's file
 * after its delta_step (one token on one head, in place). Twin: ops/delta_rule.py's gated_delta_rule_recurrent, the
 * spec, computed token by token as it is written; the chunked form there does the same in more flops (small
 * matmuls, a triangular solve) and a dozen elementwise passes over memory. Each head's state (Dk x Dv fp32: 64 KB at
 * 128 x 128) is independent column by column, so each block of DELTA_COLS columns (16 KB at 32) runs through all T
 * tokens in the core's L1 cache; heads and blocks side by side.
 *
 * q, k (B, T, Hk, Dk) and v (B, T, Hv, Dv) fp32, contiguous; value head h reads key head h / (Hv / Hk); g (log decay)
 * and beta (B, T, Hv) fp32; state (B, Hv, Dk, Dv) fp32, advanced in place; o (B, T, Hv, Dv) fp32. */
void qk_delta_rule(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                   float *o, int64_t B, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nthreads) {
    const int64_t rep = Hv / Hk, nc = (Dv + DELTA_COLS - 1) / DELTA_COLS;
#pragma omp parallel for collapse(3) schedule(static) num_threads(threads_for(nthreads, B * T * Hv * Dk * Dv))
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hv; h++)
            for (int64_t c = 0; c < nc; c++) {
                const int64_t j0 = c * DELTA_COLS, w = Dv - j0 < DELTA_COLS ? Dv - j0 : DELTA_COLS;
                for (int64_t t = 0; t < T; t++) {
                    const int64_t kh = (b * T + t) * Hk + h / rep, vh = (b * T + t) * Hv + h;
                    delta_step(state + (b * Hv + h) * Dk * Dv + j0, q + kh * Dk, k + kh * Dk, v + vh * Dv + j0, g[vh],
                               beta[vh], o + vh * Dv + j0, Dk, w, Dv);
                }
            }
}
