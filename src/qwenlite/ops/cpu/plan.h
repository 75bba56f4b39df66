/* The decode step's plan: the structs in which kernels.py (model/runner.py's Plan) describes the model to
 * qk_decode_step (step.h), mirrored there by ctypes.Structure classes. qk_plan_layout reports every struct's size and
 * every field's offset and size, which kernels.py checks at load, so that Python and C are known to agree. Included by
 * step.h and by tests/kernels_driver.c. */

#ifndef QK_PLAN_H
#define QK_PLAN_H

#include <stddef.h>
#include <stdint.h>

enum { FMT_BF16, FMT_F32, FMT_INT8, FMT_INT4 };
enum { QK_LINEAR_ATTENTION, QK_FULL_ATTENTION };

/* One projection: y (M, n) = x (M, k) W^T, plus the bias when there is one (y rounded to the activation dtype, then
 * the bias added and rounded again, as the module's forward does). */
struct qk_linear {
    int32_t fmt;      /* FMT_* */
    int32_t s_bf16;   /* quantized: the scales are bf16 (else fp32) */
    const void *w;    /* (n, k) bf16 / fp32 / int8, or int4 tiles (np / 64, k, 32) */
    const void *s;    /* int8: scales (n, k / g); int4: scales and zeros (k / g, np, 2) */
    const void *bias; /* (n) in the activation dtype, or NULL */
    int64_t g;        /* quantized: columns per scale group */
    int64_t n, np, k; /* outputs, outputs padded (int4: to 64), inputs */
};

/* The small tensors are in the dtype qk_model.w_bf16 names. */
struct qk_gdn { /* Gated DeltaNet */
    struct qk_linear qkv, z, a, b;
    const void *conv_w, *A_log, *dt_bias, *norm_w;
};

struct qk_attn { /* full attention */
    struct qk_linear q, k, v;
    const void *q_norm, *k_norm; /* (head_dim) each, or NULL: no q/k norms (Qwen2) */
};

struct qk_mlp { /* SwiGLU: down(silu(gate x) * up x) */
    struct qk_linear gate, up, down;
};

struct qk_moe { /* Qwen3.5 MoE's MLP: the top qk_model.top_k of qk_model.n_experts experts, and the shared expert */
    struct qk_linear router;       /* (n_experts, hidden), in the activation dtype */
    const struct qk_mlp *experts;  /* (n_experts) */
    struct qk_mlp shared;
    struct qk_linear shared_gate;  /* (1, hidden), in the activation dtype */
};

union qk_mixer {
    struct qk_gdn gdn;
    struct qk_attn attn;
};

struct qk_layer {
    int32_t kind;                     /* QK_LINEAR_ATTENTION: mixer.gdn, or QK_FULL_ATTENTION: mixer.attn */
    const void *in_norm, *post_norm; /* (hidden) */
    union qk_mixer mixer;
    struct qk_linear out;     /* out_proj or o_proj */
    struct qk_mlp mlp;        /* a dense layer's */
    const struct qk_moe *moe; /* a MoE layer's, or NULL */
};

/* One layer's cache, filled per step. A tracked step (a verification of drafted tokens: `inputs` not NULL) first
 * copies conv and state to before_conv and before_state (same shapes) and keeps every token's recurrence inputs, the
 * projections qkv, z, a and b, in `inputs` as (T, B, C + v_heads v_head_dim + 2 v_heads) activation-dtype values
 * laid out [qkv | z | a | b] each (T B rows, token-major), so that qk_rewind can replay the kept tokens. */
struct qk_gdn_cache {
    void *conv;   /* (B, conv_kernel - 1, C), C = 2 k_heads k_head_dim + v_heads v_head_dim, activation dtype */
    float *state; /* (B, v_heads, k_head_dim, v_head_dim) fp32 */
    void *before_conv, *inputs;
    float *before_state;
};

struct qk_attn_cache {
    void *k, *v; /* (B, kv_heads, max_seq_len, head_dim) each, activation dtype */
};

union qk_cache {
    struct qk_gdn_cache gdn;
    struct qk_attn_cache attn;
};

struct qk_model {
    int32_t act_bf16; /* activations (and caches) bf16, else fp32 */
    int32_t w_bf16;   /* norms' and the Gated DeltaNet's small tensors bf16, else fp32 */
    int32_t gated;    /* attention with an output gate (q_proj emits query and gate per head) */
    float eps;        /* every RMSNorm's */
    int64_t hidden, intermediate, n_layers, vocab;
    int64_t k_heads, v_heads, k_head_dim, v_head_dim, conv_kernel; /* Gated DeltaNet */
    int64_t heads, kv_heads, head_dim, rotary_dim;                 /* attention */
    int64_t n_experts, top_k;                                      /* MoE (0: dense) */
    const struct qk_layer *layers;                                 /* (n_layers) */
    const void *final_norm;
    struct qk_linear head;
    /* The MTP head's prelude, or fuse.w NULL (the model): the step's input is then (T B, 2 hidden), each row the
     * embedding of its token and the hidden state before it, and its layers' input fuse([norm_e(embedding) |
     * norm_h(hidden state)]) */
    struct qk_linear fuse;
    const void *fuse_norm_e, *fuse_norm_h;
    /* per step: `rows` sequences of `tokens` consecutive tokens each, token-major (token t of row b is row t B + b
     * of x, cos, sin and the logits) */
    int64_t rows, tokens, max_seq_len;
    int64_t logits_rows;      /* logits for the last this many of the T B rows only (0: all): the MTP head's last */
    const int64_t *positions; /* (rows): row b's first token sits at positions[b], its token t at positions[b] + t */
    const void *cos, *sin;    /* (tokens, rows, rotary_dim), activation dtype */
    const union qk_cache *caches; /* (n_layers) */
};

/* qk_plan_layout's entries: a type's size (offset -1), or a field's ("type.field") offset and size */
struct qk_plan_field {
    const char *name;
    int64_t offset, size;
};

#endif
