/* The decode step's plan: the int64 field orders in which kernels.py (model/runner.py's Plan) describes the model to
 * qk_decode_step (step.h), and which qk_plan_fields reports so that Python and C are checked to agree. Included by
 * step.h and by tests/kernels_driver.c. */

#ifndef QK_PLAN_H
#define QK_PLAN_H

enum { LIN_FMT, LIN_W, LIN_S, LIN_S_BF16, LIN_G, LIN_N, LIN_NP, LIN_K, LIN_FIELDS }; /* one linear layer */
enum { FMT_BF16, FMT_F32, FMT_INT8, FMT_INT4 };

/* per layer: kind, norms, then 5 linears (qkv/q, z/k, a/v, b/-, out/o), 3 MLP linears, then layer-kind tensors */
enum {
    L_KIND, L_IN_NORM, L_POST_NORM,
    L_LIN0, L_LIN1 = L_LIN0 + LIN_FIELDS, L_LIN2 = L_LIN1 + LIN_FIELDS, L_LIN3 = L_LIN2 + LIN_FIELDS,
    L_LIN4 = L_LIN3 + LIN_FIELDS, L_GATE = L_LIN4 + LIN_FIELDS, L_UP = L_GATE + LIN_FIELDS, L_DOWN = L_UP + LIN_FIELDS,
    L_T0 = L_DOWN + LIN_FIELDS, L_T1, L_T2, L_T3, L_T4, L_T5, L_FIELDS
};
/* linear attention: LIN0..4 = in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj;
 *   T0..T3 = conv weight, A_log, dt_bias, gated-norm weight; T4, T5 = conv state, recurrent state
 * full attention: LIN0..2 = q_proj, k_proj, v_proj, LIN4 = o_proj; T0, T1 = q_norm, k_norm; T4, T5 = k, v caches */

/* model-wide: */
enum {
    M_ACT_BF16, M_W_BF16, M_B, M_HIDDEN, M_INTER, M_LAYERS, M_EPS_E9, /* eps * 1e9, an integer */
    M_HK, M_HV, M_DK, M_DV, M_KC, M_H, M_HKV, M_D, M_TMAX, M_R, M_GATED,
    M_POS, M_COS, M_SIN, M_FINAL_NORM, M_HEAD, M_VOCAB = M_HEAD + LIN_FIELDS, M_FIELDS
};

#endif
