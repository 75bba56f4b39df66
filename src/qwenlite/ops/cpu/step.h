/* The whole decode step, written once for every instruction set: included at the end of each ISA's file after
 * its kernels and its vector helpers, named for this file by the macros VL (fp32 lanes per vector), V_LD / V_ST
 * (VL values of fp32 or bf16 as fp32, and back), V_ADD, V_MUL, V_ROUND (to the activation dtype and back) and
 * V_SILU. */

/* A whole decode step in one call: every layer of the model for B rows of one token each, with the kernels above,
 * so that a token costs no Python. Twin: Qwen3_5ForCausalLM.forward with a cache and T == 1 (module by module).
 * The model is described by int64 arrays that kernels.py fills (field orders below, checked by qk_plan_fields). */

#include "plan.h"

int qk_plan_fields(int which) { return which == 0 ? LIN_FIELDS : which == 1 ? L_FIELDS : M_FIELDS; }

#define PTR(v) ((void *)(intptr_t)(v))

static void linear(const int64_t *l, const void *x, void *y, int64_t M, int act_bf16, int nthreads) {
    const int64_t N = l[LIN_N], K = l[LIN_K];
    switch (l[LIN_FMT]) {
    case FMT_BF16: qk_gemv_bf16(PTR(l[LIN_W]), x, y, M, N, K, nthreads); break;
    case FMT_F32: qk_gemv_f32(PTR(l[LIN_W]), x, y, M, N, K, nthreads); break;
    case FMT_INT8:
        qk_gemv_int8(PTR(l[LIN_W]), PTR(l[LIN_S]), (int)l[LIN_S_BF16], l[LIN_G], x, act_bf16, y, act_bf16, M, N, K, nthreads);
        break;
    default:
        qk_gemv_int4(PTR(l[LIN_W]), PTR(l[LIN_S]), (int)l[LIN_S_BF16], l[LIN_G], x, act_bf16, y, act_bf16, M, l[LIN_NP], N, K,
                     nthreads);
    }
}

/* x = round(x + h) over n elements of the activation dtype */
static void add_into(void *x, const void *h, int64_t n, int bf) {
    for (int64_t i = 0; i < n; i += VL)
        bf ? V_ST(x, i, V_ADD(V_LD(x, i, 1), V_LD(h, i, 1)), 1) : V_ST(x, i, V_ADD(V_LD(x, i, 0), V_LD(h, i, 0)), 0);
}

/* g = round(round(silu(g)) * u) */
static void silu_mul(void *g, const void *u, int64_t n, int bf) {
    for (int64_t i = 0; i < n; i += VL) {
        if (bf) V_ST(g, i, V_MUL(V_ROUND(V_SILU(V_LD(g, i, 1)), 1), V_LD(u, i, 1)), 1);
        else V_ST(g, i, V_MUL(V_SILU(V_LD(g, i, 0)), V_LD(u, i, 0)), 0);
    }
}

/* x (B, hidden) act: the embeddings in, the final normed hidden states out (in place); logits (B, vocab) act.
 * Returns 0, or 1 when its buffer could not be allocated (nothing computed). */
int qk_decode_step(const int64_t *m, const int64_t *layers, void *x, void *logits, int nthreads) {
    const int bf = (int)m[M_ACT_BF16], wbf = (int)m[M_W_BF16];
    const int64_t B = m[M_B], Hd = m[M_HIDDEN], esz = bf ? 2 : 4;
    const float eps = (float)m[M_EPS_E9] * 1e-9f;
    const int64_t Cq = 2 * m[M_HK] * m[M_DK] + m[M_HV] * m[M_DV], vdim = m[M_HV] * m[M_DV];
    int64_t widest = m[M_INTER];
    const int64_t dims[] = {Cq, vdim, m[M_H] * m[M_D] * 2, Hd};
    for (int i = 0; i < 4; i++) widest = dims[i] > widest ? dims[i] : widest;
    char *buf = malloc((size_t)(B * esz * (Hd + 4 * widest + 2 * m[M_HV])));
    if (!buf) return 1;
    char *h = buf, *t0 = h + B * Hd * esz, *t1 = t0 + B * widest * esz, *t2 = t1 + B * widest * esz,
         *t3 = t2 + B * widest * esz, *ta = t3 + B * widest * esz, *tb = ta + B * m[M_HV] * esz;
    for (int64_t li = 0; li < m[M_LAYERS]; li++) {
        const int64_t *L = layers + li * L_FIELDS;
        qk_rmsnorm(x, Hd, PTR(L[L_IN_NORM]), wbf, eps, h, bf, B, Hd, nthreads);
        if (L[L_KIND] == 0) {
            linear(L + L_LIN0, h, t0, B, bf, nthreads); /* qkv */
            linear(L + L_LIN1, h, t1, B, bf, nthreads); /* z */
            linear(L + L_LIN2, h, ta, B, bf, nthreads); /* a */
            linear(L + L_LIN3, h, tb, B, bf, nthreads); /* b */
            qk_gdn_decode(t0, PTR(L[L_T4]), PTR(L[L_T0]), m[M_KC], ta, tb, PTR(L[L_T1]), PTR(L[L_T2]), PTR(L[L_T5]), t1,
                          PTR(L[L_T3]), eps, t2, bf, wbf, B, m[M_HK], m[M_HV], m[M_DK], m[M_DV], nthreads);
        } else {
            linear(L + L_LIN0, h, t0, B, bf, nthreads); /* q and gate */
            linear(L + L_LIN1, h, t1, B, bf, nthreads); /* k */
            linear(L + L_LIN2, h, t3, B, bf, nthreads); /* v */
            qk_attn_decode(t0, t1, t3, PTR(L[L_T0]), PTR(L[L_T1]), eps, PTR(m[M_COS]), PTR(m[M_SIN]), m[M_R], PTR(m[M_POS]),
                           PTR(L[L_T4]), PTR(L[L_T5]), t2, (int)m[M_GATED], bf, wbf, B, m[M_H], m[M_HKV], m[M_TMAX], m[M_D],
                           nthreads);
        }
        linear(L + L_LIN4, t2, t0, B, bf, nthreads); /* out_proj / o_proj */
        add_into(x, t0, B * Hd, bf);
        qk_rmsnorm(x, Hd, PTR(L[L_POST_NORM]), wbf, eps, h, bf, B, Hd, nthreads);
        linear(L + L_GATE, h, t0, B, bf, nthreads);
        linear(L + L_UP, h, t1, B, bf, nthreads);
        silu_mul(t0, t1, B * m[M_INTER], bf);
        linear(L + L_DOWN, t0, t1, B, bf, nthreads);
        add_into(x, t1, B * Hd, bf);
    }
    qk_rmsnorm(x, Hd, PTR(m[M_FINAL_NORM]), wbf, eps, h, bf, B, Hd, nthreads);
    memcpy(x, h, (size_t)(B * Hd * esz));
    linear(m + M_HEAD, x, logits, B, bf, nthreads);
    free(buf);
    return 0;
}

