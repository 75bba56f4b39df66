/* The whole decode step, written once for every instruction set: included at the end of each ISA's file after
 * its kernels and its vector helpers, named for this file by the macros VL (fp32 lanes per vector), V_LD / V_ST
 * (VL values of fp32 or bf16 as fp32, and back), V_ADD, V_MUL, V_ROUND (to the activation dtype and back) and
 * V_SILU. */

/* A whole decode step in one call: every layer of the model for B rows of T consecutive tokens each (T == 1:
 * decode; T > 1: the pending token and the drafts of speculative decoding), with the kernels above, so that a token
 * costs no Python. Twin: Qwen3_5ForCausalLM.forward with a cache (module by module). The model is described by
 * plan.h's structs, which kernels.py fills and checks against qk_plan_layout.
 *
 * Position-wise work (norms, projections, MLP / MoE, the head) runs over all B T rows at once, so each GEMV reads its
 * weights once for all of them. The token-mixing layers run token by token, each token t the decode kernels' call
 * over the B rows (rows t B .. t B + B - 1, contiguous in the token-major layout): attention writes token t's key and
 * value at positions[b] + t and attends over [0, positions[b] + t] (causal within the row, its cached prefix
 * before), Gated DeltaNet takes its conv and recurrence one token further. A token's arithmetic is thus a decode
 * step's, whatever T. */

#include "plan.h"

#define PLAN_TYPE(T) {#T, -1, sizeof(T)}
#define PLAN_FIELD(T, F) {#T "." #F, offsetof(T, F), sizeof(((T *)0)->F)}

static const struct qk_plan_field plan_layout[] = {
    PLAN_TYPE(struct qk_linear), PLAN_FIELD(struct qk_linear, fmt), PLAN_FIELD(struct qk_linear, s_bf16),
    PLAN_FIELD(struct qk_linear, w), PLAN_FIELD(struct qk_linear, s), PLAN_FIELD(struct qk_linear, bias),
    PLAN_FIELD(struct qk_linear, g), PLAN_FIELD(struct qk_linear, n), PLAN_FIELD(struct qk_linear, np),
    PLAN_FIELD(struct qk_linear, k),
    PLAN_TYPE(struct qk_gdn), PLAN_FIELD(struct qk_gdn, qkv), PLAN_FIELD(struct qk_gdn, z), PLAN_FIELD(struct qk_gdn, a),
    PLAN_FIELD(struct qk_gdn, b), PLAN_FIELD(struct qk_gdn, conv_w), PLAN_FIELD(struct qk_gdn, A_log),
    PLAN_FIELD(struct qk_gdn, dt_bias), PLAN_FIELD(struct qk_gdn, norm_w),
    PLAN_TYPE(struct qk_attn), PLAN_FIELD(struct qk_attn, q), PLAN_FIELD(struct qk_attn, k),
    PLAN_FIELD(struct qk_attn, v), PLAN_FIELD(struct qk_attn, q_norm), PLAN_FIELD(struct qk_attn, k_norm),
    PLAN_TYPE(struct qk_mlp), PLAN_FIELD(struct qk_mlp, gate), PLAN_FIELD(struct qk_mlp, up),
    PLAN_FIELD(struct qk_mlp, down),
    PLAN_TYPE(struct qk_moe), PLAN_FIELD(struct qk_moe, router), PLAN_FIELD(struct qk_moe, experts),
    PLAN_FIELD(struct qk_moe, shared), PLAN_FIELD(struct qk_moe, shared_gate),
    PLAN_TYPE(union qk_mixer), PLAN_FIELD(union qk_mixer, gdn), PLAN_FIELD(union qk_mixer, attn),
    PLAN_TYPE(struct qk_layer), PLAN_FIELD(struct qk_layer, kind), PLAN_FIELD(struct qk_layer, in_norm),
    PLAN_FIELD(struct qk_layer, post_norm), PLAN_FIELD(struct qk_layer, mixer), PLAN_FIELD(struct qk_layer, out),
    PLAN_FIELD(struct qk_layer, mlp), PLAN_FIELD(struct qk_layer, moe),
    PLAN_TYPE(struct qk_gdn_cache), PLAN_FIELD(struct qk_gdn_cache, conv), PLAN_FIELD(struct qk_gdn_cache, state),
    PLAN_FIELD(struct qk_gdn_cache, before_conv), PLAN_FIELD(struct qk_gdn_cache, inputs),
    PLAN_FIELD(struct qk_gdn_cache, before_state),
    PLAN_TYPE(struct qk_attn_cache), PLAN_FIELD(struct qk_attn_cache, k), PLAN_FIELD(struct qk_attn_cache, v),
    PLAN_TYPE(union qk_cache), PLAN_FIELD(union qk_cache, gdn), PLAN_FIELD(union qk_cache, attn),
    PLAN_TYPE(struct qk_model), PLAN_FIELD(struct qk_model, act_bf16), PLAN_FIELD(struct qk_model, w_bf16),
    PLAN_FIELD(struct qk_model, gated), PLAN_FIELD(struct qk_model, eps), PLAN_FIELD(struct qk_model, hidden),
    PLAN_FIELD(struct qk_model, intermediate), PLAN_FIELD(struct qk_model, n_layers), PLAN_FIELD(struct qk_model, vocab),
    PLAN_FIELD(struct qk_model, k_heads), PLAN_FIELD(struct qk_model, v_heads), PLAN_FIELD(struct qk_model, k_head_dim),
    PLAN_FIELD(struct qk_model, v_head_dim), PLAN_FIELD(struct qk_model, conv_kernel), PLAN_FIELD(struct qk_model, heads),
    PLAN_FIELD(struct qk_model, kv_heads), PLAN_FIELD(struct qk_model, head_dim), PLAN_FIELD(struct qk_model, rotary_dim),
    PLAN_FIELD(struct qk_model, n_experts), PLAN_FIELD(struct qk_model, top_k),
    PLAN_FIELD(struct qk_model, layers), PLAN_FIELD(struct qk_model, final_norm), PLAN_FIELD(struct qk_model, head),
    PLAN_FIELD(struct qk_model, fuse), PLAN_FIELD(struct qk_model, fuse_norm_e), PLAN_FIELD(struct qk_model, fuse_norm_h),
    PLAN_FIELD(struct qk_model, rows), PLAN_FIELD(struct qk_model, tokens),
    PLAN_FIELD(struct qk_model, max_seq_len), PLAN_FIELD(struct qk_model, logits_rows), PLAN_FIELD(struct qk_model, positions),
    PLAN_FIELD(struct qk_model, cos), PLAN_FIELD(struct qk_model, sin), PLAN_FIELD(struct qk_model, caches),
};

const struct qk_plan_field *qk_plan_layout(int64_t *n) {
    *n = (int64_t)(sizeof plan_layout / sizeof *plan_layout);
    return plan_layout;
}

/* y (M, n) = x W^T in the activation dtype; then y = round(y + bias) where the projection has one */
static void linear(const struct qk_linear *l, const void *x, void *y, int64_t M, int bf, int nthreads) {
    switch (l->fmt) {
    case FMT_BF16: qk_gemv_bf16(l->w, x, y, M, l->n, l->k, nthreads); break;
    case FMT_F32: qk_gemv_f32(l->w, x, y, M, l->n, l->k, nthreads); break;
    case FMT_INT8: qk_gemv_int8(l->w, l->s, l->s_bf16, l->g, x, bf, y, bf, M, l->n, l->k, nthreads); break;
    default: qk_gemv_int4(l->w, l->s, l->s_bf16, l->g, x, bf, y, bf, M, l->np, l->n, l->k, nthreads);
    }
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < l->n; i++) store_out(y, bf, m * l->n + i, ld1(y, m * l->n + i, bf) + ld1(l->bias, i, bf));
}

/* x = round(x + h) over n elements of the activation dtype */
static void add_into(void *x, const void *h, int64_t n, int bf) {
    for (int64_t i = 0; i < n; i += VL)
        bf ? V_ST(x, i, V_ADD(V_LD(x, i, 1), V_LD(h, i, 1)), 1) : V_ST(x, i, V_ADD(V_LD(x, i, 0), V_LD(h, i, 0)), 0);
}

/* the value v rounded to the activation dtype, as fp32 */
static inline float act_round(float v, int bf) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* g = round(round(silu(g)) * u) (the tail of a width no multiple of VL, an expert's, in scalars) */
static void silu_mul(void *g, const void *u, int64_t n, int bf) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        if (bf) V_ST(g, i, V_MUL(V_ROUND(V_SILU(V_LD(g, i, 1)), 1), V_LD(u, i, 1)), 1);
        else V_ST(g, i, V_MUL(V_SILU(V_LD(g, i, 0)), V_LD(u, i, 0)), 0);
    }
    for (; i < n; i++) {
        const float v = ld1(g, i, bf);
        store_out(g, bf, i, act_round(v / (1.0f + expf(-v)), bf) * ld1(u, i, bf));
    }
}

/* y (M, hidden) = mlp(x); g, u: (M, width) scratch (u may be y) */
static void mlp(const struct qk_mlp *p, const void *x, void *y, int64_t M, void *g, void *u, int bf, int nthreads) {
    linear(&p->gate, x, g, M, bf, nthreads);
    linear(&p->up, x, u, M, bf, nthreads);
    silu_mul(g, u, M * p->gate.n, bf);
    linear(&p->down, g, y, M, bf, nthreads);
}

/* y (B, Hd) = SparseMoeBlock(x) as the module computes it: router logits, softmax in fp32, the top k (ties to the
 * lower expert), renormalised and rounded to the activation dtype; each chosen expert's output times its weight,
 * rounded, a row's k added in expert order; plus round(sigmoid(shared_gate x)) * shared(x). Each expert runs once
 * over the rows that chose it. With at least as many chosen experts as threads (decode: top_k of them), the experts
 * run side by side, each on one thread: one parallel region for all of them instead of three per expert (24 a token
 * at top_k 8, each over a few hundred KB). Scratch: t (B, max(n_experts, Hd)) the logits then the experts' sum,
 * g (B, width), s (B), and pool (B * top_k, Hd + 2 * width): each chosen (row, expert) pair's input, then its output,
 * and its gate and up projections. */
static void moe(const struct qk_model *m, const struct qk_moe *e, const void *x, void *y, int64_t B, char *t, char *g,
                char *s, char *pool, int64_t width, int bf, int nthreads) {
    const int64_t E = m->n_experts, k = m->top_k, Hd = m->hidden, esz = bf ? 2 : 4;
    int64_t chosen[B * k], rows[B * k], active[B * k], start[B * k + 1];
    float weight[B * k], w[B * k];
    int first[B];
    char *xs = pool, *gs = xs + B * k * Hd * esz, *us = gs + B * k * width * esz;
    linear(&e->router, x, t, B, bf, nthreads);
    for (int64_t b = 0; b < B; b++) {
        float p[E], mx = -INFINITY, sum = 0.0f, kept = 0.0f;
        for (int64_t i = 0; i < E; i++) {
            p[i] = ld1(t, b * E + i, bf);
            mx = p[i] > mx ? p[i] : mx;
        }
        for (int64_t i = 0; i < E; i++) sum += p[i] = expf(p[i] - mx);
        for (int64_t j = 0; j < k; j++) { /* the largest left, the lower expert on ties; then out of the running */
            int64_t best = 0;
            for (int64_t i = 1; i < E; i++) best = p[i] > p[best] ? i : best;
            chosen[b * k + j] = best, weight[b * k + j] = p[best] / sum, kept += p[best] / sum;
            p[best] = -1.0f;
        }
        for (int64_t j = 0; j < k; j++) weight[b * k + j] = act_round(weight[b * k + j] / kept, bf);
        first[b] = 1;
    }
    int64_t n = 0, R = 0; /* the chosen experts in expert order, their rows gathered one after another */
    start[0] = 0;
    for (int64_t ex = 0; ex < E; ex++) {
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < k; j++)
                if (chosen[b * k + j] == ex) {
                    memcpy(xs + R * Hd * esz, (const char *)x + b * Hd * esz, (size_t)(Hd * esz));
                    rows[R] = b, w[R++] = weight[b * k + j];
                }
        if (R > start[n]) active[n++] = ex, start[n] = R;
    }
    const int side_by_side = nthreads > 1 && n >= nthreads; /* else one expert after another, every thread in each */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (side_by_side)
    for (int64_t i = 0; i < n; i++)
        mlp(e->experts + active[i], xs + start[i] * Hd * esz, xs + start[i] * Hd * esz, start[i + 1] - start[i],
            gs + start[i] * width * esz, us + start[i] * width * esz, bf, side_by_side ? 1 : nthreads);
    for (int64_t r = 0; r < R; r++) { /* in expert order, as the module adds them */
        const int64_t b = rows[r];
        for (int64_t i = 0; i < Hd; i++) {
            const float v = act_round(ld1(xs, r * Hd + i, bf) * w[r], bf);
            store_out(t, bf, b * Hd + i, first[b] ? v : ld1(t, b * Hd + i, bf) + v);
        }
        first[b] = 0;
    }
    mlp(&e->shared, x, y, B, g, y, bf, nthreads);
    linear(&e->shared_gate, x, s, B, bf, nthreads);
    for (int64_t b = 0; b < B; b++) {
        const float gate = act_round(1.0f / (1.0f + expf(-ld1(s, b, bf))), bf);
        for (int64_t i = 0; i < Hd; i++)
            store_out(y, bf, b * Hd + i, ld1(t, b * Hd + i, bf) + act_round(gate * ld1(y, b * Hd + i, bf), bf));
    }
}

/* dst = src, n bytes, split over the threads: a recurrent layer's state (1 MB at 0.8B) copied where one core's
 * share of the bandwidth would leave the other idle */
static void copy_bytes(void *dst, const void *src, int64_t n, int nthreads) {
    const int64_t parts = threads_for(nthreads, n / 4), each = (n + parts - 1) / parts;
#pragma omp parallel for schedule(static) num_threads(parts)
    for (int64_t i = 0; i < parts; i++) {
        const int64_t a = i * each, b = a + each < n ? a + each : n;
        if (b > a) memcpy((char *)dst + a, (const char *)src + a, (size_t)(b - a));
    }
}

/* The Gated DeltaNet layer's mixing for T tokens of B rows, token by token: qkv (T B, C), z (T B, Hv Dv), a and b
 * (T B, Hv) -> out (T B, Hv Dv). A tracked step keeps the state before it and these inputs (plan.h). */
static void gdn_tokens(const struct qk_model *m, const struct qk_gdn *g, const struct qk_gdn_cache *c, const char *qkv,
                       const char *z, const char *a, const char *b, char *out, int bf, int nthreads) {
    const int64_t B = m->rows, T = m->tokens, N = B * T, Hv = m->v_heads, esz = bf ? 2 : 4;
    const int64_t C = 2 * m->k_heads * m->k_head_dim + Hv * m->v_head_dim, vdim = Hv * m->v_head_dim;
    if (c->inputs) {
        memcpy(c->before_conv, c->conv, (size_t)(B * (m->conv_kernel - 1) * C * esz));
        copy_bytes(c->before_state, c->state, 4 * B * Hv * m->k_head_dim * m->v_head_dim, nthreads);
        char *in = c->inputs;
        memcpy(in, qkv, (size_t)(N * C * esz));
        memcpy(in + N * C * esz, z, (size_t)(N * vdim * esz));
        memcpy(in + N * (C + vdim) * esz, a, (size_t)(N * Hv * esz));
        memcpy(in + N * (C + vdim + Hv) * esz, b, (size_t)(N * Hv * esz));
    }
    for (int64_t t = 0; t < T; t++)
        qk_gdn_decode(qkv + t * B * C * esz, c->conv, g->conv_w, m->conv_kernel, a + t * B * Hv * esz,
                      b + t * B * Hv * esz, g->A_log, g->dt_bias, c->state, z + t * B * vdim * esz, g->norm_w, m->eps,
                      out + t * B * vdim * esz, bf, m->w_bf16, B, m->k_heads, Hv, m->k_head_dim, m->v_head_dim,
                      nthreads);
}

/* The attention layer's mixing for T tokens of B rows, token by token: qg (T B, H * 2D or H * D), k and v
 * (T B, Hkv D) -> out (T B, H D); token t of row b at positions[b] + t. */
static void attn_tokens(const struct qk_model *m, const struct qk_attn *a, const struct qk_attn_cache *c,
                        const char *qg, const char *k, const char *v, char *out, int bf, int nthreads) {
    const int64_t B = m->rows, T = m->tokens, esz = bf ? 2 : 4, D = m->head_dim, R = m->rotary_dim;
    const int64_t qdim = m->heads * D * (m->gated ? 2 : 1), kvdim = m->kv_heads * D;
    int64_t pos[B];
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < B; i++) pos[i] = m->positions[i] + t;
        qk_attn_decode(qg + t * B * qdim * esz, k + t * B * kvdim * esz, v + t * B * kvdim * esz, a->q_norm,
                       a->k_norm, m->eps, (const char *)m->cos + t * B * R * esz, (const char *)m->sin + t * B * R * esz,
                       R, pos, c->k, c->v, out + t * B * m->heads * D * esz, m->gated, bf, m->w_bf16, B, m->heads,
                       m->kv_heads, m->max_seq_len, D, nthreads);
    }
}

/* x (T rows, hidden) act, token-major: the embeddings in, the final normed hidden states out (in place; the MTP
 * head's, fuse.w set: (T rows, 2 hidden) in, its first T rows x hidden values out); logits (T rows, vocab) act, or
 * (logits_rows, vocab): the last rows'. Returns 0, or 1 when its buffer could not be allocated (nothing computed). */
int qk_decode_step(const struct qk_model *m, void *x, void *logits, int nthreads) {
    const int bf = m->act_bf16, wbf = m->w_bf16;
    const int64_t B = m->rows * m->tokens, Hd = m->hidden, Hv = m->v_heads, esz = bf ? 2 : 4;
    const int64_t Cq = 2 * m->k_heads * m->k_head_dim + Hv * m->v_head_dim, vdim = Hv * m->v_head_dim;
    int64_t widest = m->intermediate;
    const int64_t dims[] = {Cq, vdim, m->heads * m->head_dim * 2, 2 * Hd, m->n_experts};
    for (int i = 0; i < 5; i++) widest = dims[i] > widest ? dims[i] : widest;
    const int64_t pairs = m->n_experts ? B * m->top_k : 0; /* (row, expert) pairs of a MoE layer */
    char *buf = malloc((size_t)(esz * (B * (Hd + 4 * widest + 2 * Hv) + pairs * (Hd + 2 * widest))));
    if (!buf) return 1;
    char *h = buf, *t0 = h + B * Hd * esz, *t1 = t0 + B * widest * esz, *t2 = t1 + B * widest * esz,
         *t3 = t2 + B * widest * esz, *ta = t3 + B * widest * esz, *tb = ta + B * Hv * esz, *pool = tb + B * Hv * esz;
    if (m->fuse.w) { /* the MTP head's prelude: each half of a row normed, side by side again, then fc */
        qk_rmsnorm(x, 2 * Hd, m->fuse_norm_e, wbf, m->eps, t0, bf, B, Hd, nthreads);
        qk_rmsnorm((char *)x + Hd * esz, 2 * Hd, m->fuse_norm_h, wbf, m->eps, t1, bf, B, Hd, nthreads);
        for (int64_t r = 0; r < B; r++) {
            memcpy(t2 + 2 * r * Hd * esz, t0 + r * Hd * esz, (size_t)(Hd * esz));
            memcpy(t2 + (2 * r + 1) * Hd * esz, t1 + r * Hd * esz, (size_t)(Hd * esz));
        }
        linear(&m->fuse, t2, x, B, bf, nthreads);
    }
    for (int64_t li = 0; li < m->n_layers; li++) {
        const struct qk_layer *L = m->layers + li;
        const union qk_cache *c = m->caches + li;
        qk_rmsnorm(x, Hd, L->in_norm, wbf, m->eps, h, bf, B, Hd, nthreads);
        if (L->kind == QK_LINEAR_ATTENTION) {
            const struct qk_gdn *g = &L->mixer.gdn;
            linear(&g->qkv, h, t0, B, bf, nthreads);
            linear(&g->z, h, t1, B, bf, nthreads);
            linear(&g->a, h, ta, B, bf, nthreads);
            linear(&g->b, h, tb, B, bf, nthreads);
            gdn_tokens(m, g, &c->gdn, t0, t1, ta, tb, t2, bf, nthreads);
        } else {
            const struct qk_attn *a = &L->mixer.attn;
            linear(&a->q, h, t0, B, bf, nthreads); /* q and gate */
            linear(&a->k, h, t1, B, bf, nthreads);
            linear(&a->v, h, t3, B, bf, nthreads);
            attn_tokens(m, a, &c->attn, t0, t1, t3, t2, bf, nthreads);
        }
        linear(&L->out, t2, t0, B, bf, nthreads);
        add_into(x, t0, B * Hd, bf);
        qk_rmsnorm(x, Hd, L->post_norm, wbf, m->eps, h, bf, B, Hd, nthreads);
        if (L->moe) moe(m, L->moe, h, t1, B, t0, t3, ta, pool, widest, bf, nthreads);
        else mlp(&L->mlp, h, t1, B, t0, t1, bf, nthreads);
        add_into(x, t1, B * Hd, bf);
    }
    qk_rmsnorm(x, Hd, m->final_norm, wbf, m->eps, h, bf, B, Hd, nthreads);
    memcpy(x, h, (size_t)(B * Hd * esz));
    const int64_t L = m->logits_rows > 0 && m->logits_rows < B ? m->logits_rows : B;
    linear(&m->head, (char *)x + (B - L) * Hd * esz, logits, L, bf, nthreads);
    free(buf);
    return 0;
}

/* After a tracked step of T tokens per row (m as it ran, with its caches), keep row b's first keep[b] tokens
 * (1..T): each Gated DeltaNet layer's conv window and state of a row that keeps fewer than T are restored from
 * before the step and its kept tokens' recurrence replayed from their recorded inputs, the same kernel on the same
 * values, so the state is exactly the one the step had after that token. No weight is read again; attention
 * forgets by length (the caller's). Returns 0, or 1 when its scratch could not be allocated. */
int qk_rewind(const struct qk_model *m, const int64_t *keep, int nthreads) {
    const int bf = m->act_bf16;
    const int64_t B = m->rows, T = m->tokens, N = B * T, Hv = m->v_heads, esz = bf ? 2 : 4, Kc = m->conv_kernel;
    const int64_t C = 2 * m->k_heads * m->k_head_dim + Hv * m->v_head_dim, vdim = Hv * m->v_head_dim;
    const int64_t S = Hv * m->k_head_dim * m->v_head_dim;
    char *out = malloc((size_t)(vdim * esz)); /* the replayed tokens' outputs, not needed */
    if (!out) return 1;
    for (int64_t li = 0; li < m->n_layers; li++) {
        const struct qk_gdn_cache *c = &m->caches[li].gdn;
        if (m->layers[li].kind != QK_LINEAR_ATTENTION || !c->inputs) continue;
        const struct qk_gdn *g = &m->layers[li].mixer.gdn;
        const char *qkv = c->inputs, *z = qkv + N * C * esz, *a = z + N * vdim * esz, *b = a + N * Hv * esz;
        for (int64_t r = 0; r < B; r++) {
            if (keep[r] >= T) continue;
            char *conv = (char *)c->conv + r * (Kc - 1) * C * esz;
            float *state = c->state + r * S;
            memcpy(conv, (const char *)c->before_conv + r * (Kc - 1) * C * esz, (size_t)((Kc - 1) * C * esz));
            copy_bytes(state, c->before_state + r * S, 4 * S, nthreads);
            for (int64_t t = 0; t < keep[r]; t++) {
                const int64_t i = t * B + r;
                qk_gdn_decode(qkv + i * C * esz, conv, g->conv_w, Kc, a + i * Hv * esz, b + i * Hv * esz, g->A_log,
                              g->dt_bias, state, z + i * vdim * esz, g->norm_w, m->eps, out, bf, m->w_bf16, 1,
                              m->k_heads, Hv, m->k_head_dim, m->v_head_dim, nthreads);
            }
        }
    }
    free(out);
    return 0;
}

/* Rows ids (n) of an embedding table described as a projection (rows: tokens, k: hidden) -> out (n, k) in the
 * activation dtype (`bf`): a bf16 / fp32 table's rows as they are (its dtype the activations'), an int8 or int4 one's
 * dequantized in fp32 and rounded once, as quant_matmul.int8_rows (q s) and int4_rows ((q - 8) s + z) compute them
 * (the twins). Only those rows are read. */
void qk_embed_rows(const struct qk_linear *e, const int64_t *ids, int64_t n, void *out, int bf) {
    const int64_t K = e->k, esz = bf ? 2 : 4;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ids[i];
        char *o = (char *)out + i * K * esz;
        if (e->fmt == FMT_BF16 || e->fmt == FMT_F32) {
            memcpy(o, (const char *)e->w + r * K * esz, (size_t)(K * esz));
        } else if (e->fmt == FMT_INT8) {
            const int8_t *q = (const int8_t *)e->w + r * K;
            for (int64_t c = 0; c < K; c++)
                store_out(o, bf, c, (float)q[c] * load_scale(e->s, e->s_bf16, r * (K / e->g) + c / e->g));
        } else { /* tiled64: row r's nibble of column c in byte [r / 64, c, r % 32], high for r % 64 >= 32 */
            const uint8_t *tile = (const uint8_t *)e->w + r / 64 * K * 32 + r % 32;
            const int shift = r % 64 >= 32 ? 4 : 0;
            for (int64_t c = 0; c < K; c++) {
                const int64_t at = (c / e->g * e->np + r) * 2;
                const float q = (float)((tile[c * 32] >> shift) & 15);
                const float scale = load_scale(e->s, e->s_bf16, at), zero = load_scale(e->s, e->s_bf16, at + 1);
                store_out(o, bf, c, (q - 8.0f) * scale + zero);
            }
        }
    }
}

/* Greedy drafting with the MTP head (m: its plan, one row, its cache), `count` tokens in one call. The first step
 * runs the head over the n positions the model ran since the last drafts, x (n, 2 hidden): each the embedding of a
 * token and the model's hidden state before it; each later step over one, [the embedding of the last draft | the
 * head's output before it]. Each step's last logits' argmax (the first of equal maxima) is the next draft. m's cos
 * and sin: (n + count - 1, rotary_dim), a row per position, its positions[0] the first's. embed: the model's
 * embedding table (qk_embed_rows: plain or quantized). tokens (count) out; logits (vocab) act scratch; x
 * overwritten. The drafts only choose what the model verifies: how they round changes the speed, never the output.
 * Returns 0, or 1 when a step's buffer could not be allocated. */
int qk_draft(const struct qk_model *m, void *x, const struct qk_linear *embed, int64_t *tokens, void *logits,
             int64_t n, int64_t count, int nthreads) {
    const int bf = m->act_bf16;
    const int64_t Hd = m->hidden, esz = bf ? 2 : 4, R = m->rotary_dim;
    struct qk_model s = *m;
    int64_t pos = m->positions[0];
    s.rows = s.logits_rows = 1, s.positions = &pos;
    for (int64_t j = 0; j < count; j++) {
        const int64_t T = j ? 1 : n, row = j ? n + j - 1 : 0; /* this step's positions, its first cos / sin row */
        s.tokens = T, s.cos = (const char *)m->cos + row * R * esz, s.sin = (const char *)m->sin + row * R * esz;
        if (qk_decode_step(&s, x, logits, nthreads)) return 1;
        pos += T;
        int64_t best = 0;
        for (int64_t i = 1; i < m->vocab; i++) best = ld1(logits, i, bf) > ld1(logits, best, bf) ? i : best;
        tokens[j] = best;
        /* the last position's output is the next step's hidden state, beside the draft's embedding */
        memmove((char *)x + Hd * esz, (char *)x + (T - 1) * Hd * esz, (size_t)(Hd * esz));
        qk_embed_rows(embed, &best, 1, x, bf);
    }
    return 0;
}
