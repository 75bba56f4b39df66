"""The Qwen3.5 text model, and the models it contains: Qwen3.5 MoE, whose layers' MLP is routed experts plus a
gated shared expert (`SparseMoeBlock`); the dense Qwen3 / Qwen2, the same decoder with full attention in every
layer, no output gate, full rotary and a plain RMSNorm (`w * x_hat`), q/k norms for Qwen3, q/k/v biases for Qwen2
(ModelConfig's derived flags say which). Attribute paths mirror the checkpoint's tensor
names (`model.layers.{i}.linear_attn.in_proj_qkv.weight`, `model.layers.{i}.self_attn.q_norm.weight`, ...), so
loading is a name lookup.

One forward serves training (no cache: the whole sequence, differentiable) and inference (a `Cache`:
prefill of any length, then decode steps). Norms, gates and the recurrent state are computed in fp32
whatever the weight dtype; everything else runs in the weight dtype.

Inference without gradients takes qwenlite's own CPU kernels where they apply (ops/cpu/kernels.py): each module
takes its own (decode GEMVs, the fused Gated DeltaNet and attention tokens, RMSNorm, the prompt's conv). Modules
with a `fast` flag say whether they may, `set_fast` flips them all, and False runs the pure-torch code, the
kernels' reference, everywhere. The whole-model decode step in one C call is the caller's choice
(model/runner.py), never taken from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.config import ModelConfig
from qwenlite.errors import ContextLengthExceeded
from qwenlite.model.versions import weights_changed
from qwenlite.ops.attention import causal_attention
from qwenlite.ops.conv import causal_conv1d
from qwenlite.ops.cpu import kernels
from qwenlite.ops.delta_rule import gated_delta_rule_chunked, gated_delta_rule_step
from qwenlite.ops.rope import apply_rope, mrope_cos_sin, rope_cos_sin, rope_inv_freq

if TYPE_CHECKING:
    from qwenlite.model.cache import AttentionCache, Cache, LinearAttentionCache


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class NoInitOnMeta:
    """A torch layer that draws no initial values on the meta device: loaders build the model there and assign the
    checkpoint's tensors (the draws cost ~0.3 ms a layer, and a random draw on meta imports torch._dynamo: seconds
    of every start-up)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embedding(NoInitOnMeta, nn.Embedding):
    pass


class Conv1d(NoInitOnMeta, nn.Conv1d):
    pass


class Linear(NoInitOnMeta, nn.Linear):
    """nn.Linear whose inference over a few rows (decode, batched decode) of bf16 runs qwenlite's GEMV, which
    streams the weights at close to the memory bandwidth, and over many rows (prefill) of bf16 an fp32 GEMM on CPUs
    whose bf16 GEMM is slow (qwenlite's own where the instruction set has one, kernels.gemm_bf16, else torch's on
    widened weights, kernels.linear_fp32); anything else is F.linear."""

    fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.fast and not needs_grad(x, self.weight):
            if kernels.gemv_bf16_ok(x2, self.weight):
                y = kernels.gemv_bf16(x2, self.weight)
            elif kernels.gemm_bf16_ok(x2, self.weight):
                y = kernels.gemm_bf16(x2, self.weight)
            elif kernels.linear_fp32_ok(x2, self.weight):
                y = kernels.linear_fp32(x2, self.weight)
            else:
                return F.linear(x, self.weight, self.bias)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def kernel_plan(self, dtype: torch.dtype) -> kernels.QkLinear | None:
        """This projection for kernels.decode_step under activations of `dtype`, or None where no kernel takes it."""
        w = self.weight
        fmt = {torch.bfloat16: kernels.FMT_BF16, torch.float32: kernels.FMT_F32}.get(w.dtype)
        if not self.fast or fmt is None or not w.is_contiguous() or w.device.type != "cpu":
            return None
        return kernels.plan_linear(fmt, w, *w.shape, dtype, self.bias)


def set_fast(model: nn.Module, fast: bool) -> None:
    """Let every module use qwenlite's kernels where they apply (True), or force the pure-torch reference."""
    for m in model.modules():
        if hasattr(m, "fast"):
            m.fast = fast
    weights_changed()


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm (Qwen3.5): x_hat * (1 + w), w initialised to 0 (layer, final, q/k norms). With
    `zero_centred=False` the plain RMSNorm of Qwen3 / Qwen2: w * x_hat, w initialised to 1."""

    def __init__(self, dim: int, eps: float, zero_centred: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centred = zero_centred
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centred:
            # As the reference: x_hat rounded to the input dtype, then the weight (no kernel computes this one).
            return (self.weight * rms_normalize(x, self.eps).to(x.dtype)).to(x.dtype)
        if self.fast and not needs_grad(x, self.weight) and kernels.rmsnorm_ok(x, self.weight):
            return kernels.rmsnorm(x, self.weight, self.eps)
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class RMSNormGated(nn.Module):
    """Plain gated RMSNorm inside Gated DeltaNet: w * x_hat * silu(z), w initialised to 1."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The reference rounds x_hat to the input dtype before the weight; keep that rounding.
        x_hat = rms_normalize(x, self.eps).to(x.dtype)
        return (self.weight * x_hat * F.silu(z.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Linear attention: fused qkv projection -> causal depthwise conv + SiLU -> gated delta rule ->
    gated norm with z -> out_proj."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_k_heads, self.num_v_heads = c.linear_num_key_heads, c.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = c.linear_key_head_dim, c.linear_value_head_dim
        self.key_dim, self.value_dim = c.linear_key_dim, c.linear_value_dim
        conv_dim = c.linear_conv_dim
        self.in_proj_qkv = Linear(c.hidden_size, conv_dim, bias=False)
        self.in_proj_z = Linear(c.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = Linear(c.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(c.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = Conv1d(conv_dim, conv_dim, c.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        A = torch.empty(self.num_v_heads)
        self.A_log = nn.Parameter(A if A.is_meta else A.uniform_(0.01, 16).log())  # nothing to draw on meta
        self.norm = RMSNormGated(self.head_v_dim, c.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, c.hidden_size, bias=False)
        self.fast = True

    def forward(self, x: torch.Tensor, cache: LinearAttentionCache | None = None) -> torch.Tensor:
        if cache is not None and cache.trail is not None and x.shape[1] > 1:
            return self.out_proj(self.mix_keeping_states(x, cache))
        qkv, a, b, z = self.in_proj_qkv(x), self.in_proj_a(x), self.in_proj_b(x), self.in_proj_z(x)
        return self.out_proj(self.mix(qkv, a, b, z, cache))

    def mix_keeping_states(self, x: torch.Tensor, cache: LinearAttentionCache) -> torch.Tensor:
        """`mix` for drafted tokens under verification (speculative decoding): the projections over all rows at once,
        then the conv and the recurrence token by token, appending to `cache.trail` the (conv, state) after each
        token but the last (which the cache holds), since a recurrent state cannot be rewound to the last accepted
        token. Token by token, each step is the decode step's computation (the fused kernel where it applies)."""
        qkv, a, b, z = self.in_proj_qkv(x), self.in_proj_a(x), self.in_proj_b(x), self.in_proj_z(x)
        out = []
        for t in range(x.shape[1]):
            if t:
                conv, state = (
                    cache.spare.pop() if cache.spare else (torch.empty_like(cache.conv), torch.empty_like(cache.state))
                )
                cache.trail.append((conv.copy_(cache.conv), state.copy_(cache.state)))
            # One token's slice of several rows is strided: contiguous, it takes the fused kernel as one row's does
            step = [u[:, t : t + 1].contiguous() for u in (qkv, a, b, z)]
            out.append(self.mix(*step, cache))
        return torch.cat(out, dim=1)

    def mix(
        self, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, cache: LinearAttentionCache | None
    ) -> torch.Tensor:
        """Between the projections and out_proj: conv + SiLU, the gated delta rule, the gated norm with z.
        qkv (B, T, conv_dim), a and b (B, T, Hv), z (B, T, Hv Dv) -> (B, T, Hv Dv)."""
        B, T, _ = qkv.shape
        small = (self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight)
        fast = cache is not None and self.fast and not needs_grad(qkv)
        if fast and kernels.gdn_decode_ok(qkv, cache.state, *small):
            return kernels.gdn_decode(self, qkv, a, b, z, cache.conv, cache.state)
        dtype = qkv.dtype
        if fast and kernels.conv_silu_ok(qkv, cache.conv, small[0]):
            qkv, conv_state = kernels.conv_silu(qkv, self.conv1d.weight, cache.conv), None  # state advanced in place
        else:
            qkv, conv_state = causal_conv1d(qkv, self.conv1d.weight, cache.conv if cache is not None else None)
            qkv = F.silu(qkv)  # fp32
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.reshape(B, T, self.num_k_heads, self.head_k_dim)) * self.head_k_dim**-0.5
        k = l2_normalize(k.reshape(B, T, self.num_k_heads, self.head_k_dim))
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        beta = b.float().sigmoid()  # (B, T, Hv)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # log decay

        # A prompt in inference: the recurrence in C, token by token (the chunked form's matmuls are for autograd).
        state = cache.state if cache is not None else None
        in_c = T > 1 and self.fast and not needs_grad(qkv) and kernels.delta_rule_ok(v, state)
        if cache is None:
            o, _ = (kernels.delta_rule if in_c else gated_delta_rule_chunked)(q, k, v, g, beta)
        else:
            if conv_state is not None:
                cache.conv.copy_(conv_state)
            if T == 1:
                o, _ = gated_delta_rule_step(q, k, v, g, beta, cache.state)
            elif in_c:
                o, _ = kernels.delta_rule(q, k, v, g, beta, cache.state)  # the state advanced in place
            else:
                o, state = gated_delta_rule_chunked(q, k, v, g, beta, cache.state)
                cache.state.copy_(state)
        o = o.to(dtype)  # (B, T, Hv, Dv)
        z = z.reshape(B, T, self.num_v_heads, self.head_v_dim)
        return self.norm(o, z).reshape(B, T, self.value_dim)


class Attention(nn.Module):
    """Gated attention (Qwen3.5): q_proj emits per head the query and an output gate; per-head q/k RMSNorm;
    partial rotary; GQA; output o_proj(attn * sigmoid(gate)). Qwen3: no gate, plain q/k norms, full rotary.
    Qwen2: no gate, no q/k norms, biases on q/k/v."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        q_out = self.num_heads * self.head_dim * (2 if c.attn_output_gate else 1)
        self.gated = c.attn_output_gate
        self.q_proj = Linear(c.hidden_size, q_out, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.o_bias)
        self.qk_norm = c.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.zero_centred_norms)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, c.zero_centred_norms)
        # The fused decode kernel computes Qwen3.5's zero-centred q/k norms; other layers take the torch path.
        self.fused_decode = c.qk_norm and c.zero_centred_norms
        self.fast = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache | None = None,
        start: int | list[int] = 0,
    ) -> torch.Tensor:
        """`start`: the position of x's first token, one int for all rows or one per row."""
        B, T, _ = x.shape
        D = self.head_dim
        qg = self.q_proj(x)
        fused = cache is not None and self.fast and self.fused_decode and not needs_grad(x)
        if fused and kernels.attn_decode_ok(qg, cache.k, self.q_norm.weight, self.k_norm.weight):
            pos = torch.tensor([start] * B if isinstance(start, int) else start)
            o = kernels.attn_decode(self, qg, self.k_proj(x), self.v_proj(x), cos, sin, cache.k, cache.v, pos)
            return self.o_proj(o)
        q = qg.view(B, T, self.num_heads, -1)
        if self.gated:
            q, gate = q.split(D, dim=-1)  # per head: [query | gate]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D).transpose(1, 2)
        if cache is None:
            o = causal_attention(q, k, v, scale=D**-0.5)
        elif isinstance(start, int):
            cache.k[:, :, start : start + T] = k
            cache.v[:, :, start : start + T] = v
            o = causal_attention(q, cache.k[:, :, : start + T], cache.v[:, :, : start + T], scale=D**-0.5)
        else:  # rows at different positions: each attends over its own prefix
            rows = []
            for b, s in enumerate(start):
                cache.k[b, :, s : s + T] = k[b]
                cache.v[b, :, s : s + T] = v[b]
                rows.append(
                    causal_attention(
                        q[b : b + 1], cache.k[b : b + 1, :, : s + T], cache.v[b : b + 1, :, : s + T], D**-0.5
                    )
                )
            o = torch.cat(rows)
        o = o.transpose(1, 2).reshape(B, T, -1)
        if self.gated:
            o = o * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(o)


class MLP(nn.Module):
    """SwiGLU: the dense layers' MLP, and each expert (and the shared expert) of a MoE layer at its own width."""

    def __init__(self, c: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or c.intermediate_size
        self.gate_proj = Linear(c.hidden_size, width, bias=False)
        self.up_proj = Linear(c.hidden_size, width, bias=False)
        self.down_proj = Linear(width, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """x W^T for the router's logits and the shared expert's gate: not a Linear, so that quantization leaves these
    few small matrices in the activations' dtype (the reference keeps them so; llama.cpp stores ffn_gate_inp as F32)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (weights (N, k) in the logits' dtype, experts (N, k)): softmax over all experts in
    fp32, the top k (ties as torch.topk breaks them), renormalised to sum to 1, as the reference."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(logits.dtype), experts


class SparseMoeBlock(nn.Module):
    """Qwen3.5 MoE's MLP: each token through its top-k routed experts, weighted, plus the shared expert scaled by
    sigmoid(shared_expert_gate(x)). One module per expert (`experts.{e}.gate_proj`, ...), so an expert is an MLP
    like any other (quantized, given the decode GEMVs) and a fused checkpoint layout loads as views of its tensors.
    Tokens are grouped by expert: each expert that received any runs once over its rows, so a decode step reads
    only the selected experts' weights."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = Gate(c.hidden_size, c.num_experts)
        self.experts = nn.ModuleList(MLP(c, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.shared_expert = MLP(c, c.shared_expert_intermediate_size)
        self.shared_expert_gate = Gate(c.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        N, k = B * T, self.top_k
        x = x.reshape(N, H)
        weights, chosen = route(self.gate(x), k)  # (N, k)
        slots = chosen.flatten().argsort(stable=True)  # (N * k,) the (token, rank) slots grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        weights = weights.flatten()
        y = x.new_empty(N * k, H)  # row i: slot slots[i]'s output, so each expert writes one contiguous block
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                s = slots[start : start + n]
                y[start : start + n] = expert(x.index_select(0, s // k)) * weights[s, None]
                start += n
        # Each token's k outputs added in expert order, as the reference's index_add_ loop over experts adds them: a
        # token's rows of y, ascending, are in expert order. (Scatters, torch's CPU index_add_ / index_put_, can take
        # 10-100 ms a call with two threads on a busy core.)
        rows = slots.argsort().view(N, k).sort(-1).values  # (N, k)
        y = y.index_select(0, rows.flatten()).view(N, k, H)
        out = y[:, 0]
        for j in range(1, k):
            out = out + y[:, j]
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (out + shared).reshape(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(c)
        else:
            self.self_attn = Attention(c)
        self.mlp = SparseMoeBlock(c) if c.moe else MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centred_norms)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centred_norms)

    def forward(self, x, cos, sin, cache=None, start: int = 0) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, cache)
        else:
            h = self.self_attn(h, cos, sin, cache, start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, t) for t in c.layer_types)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centred_norms)
        self.config = c
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary frequencies (on the CPU, then moved: arange on the meta device imports torch._dynamo):
        a model built on the meta device has none until this runs with a device."""
        with torch.device("cpu"):
            inv_freq = rope_inv_freq(self.config.rotary_dim, self.config.rope_theta)
        self.register_buffer("inv_freq", inv_freq.to(device or self.norm.weight.device), persistent=False)

    def rotary(
        self,
        T: int,
        cache: Cache | None,
        dtype: torch.dtype,
        device: torch.device,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int | list[int]]:
        """cos, sin for T tokens after what `cache` holds, and where they start in the cache (one int, or one per
        row when the rows' lengths differ). `positions`: a prompt with images' multimodal rotary positions (3, T);
        otherwise a row's positions continue from its cache's length plus its rope delta. The MTP head
        (model/mtp.py) positions its tokens the same way."""
        steps = torch.arange(T, device=device)
        start: int | list[int] = 0
        if cache is not None:
            lengths = cache.lengths.tolist()
            if max(lengths) + T > cache.max_seq_len:
                raise ContextLengthExceeded(f"{max(lengths) + T} tokens do not fit a cache of {cache.max_seq_len}")
            start = lengths[0] if min(lengths) == max(lengths) else lengths
        if positions is not None:
            return *mrope_cos_sin(positions, self.inv_freq, self.config.mrope_section or [11, 11, 10], dtype), start
        if cache is None:
            positions = steps  # (T,)
        else:
            first = (cache.lengths + cache.rope_deltas).tolist()  # each row's next rope position
            if min(first) == max(first):
                positions = steps + first[0]  # (T,)
            else:
                positions = (torch.tensor(first, device=steps.device)[:, None] + steps).unsqueeze(1)  # (B, 1, T)
        return *rope_cos_sin(positions, self.inv_freq, dtype), start

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, hidden), normed. A prompt with images (one row) passes its
        input embeddings (1, T, hidden) and multimodal rotary positions (3, T) (model/vision.embed_prompt)."""
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        cos, sin, start = self.rotary(input_ids.shape[1], cache, x.dtype, input_ids.device, positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.lengths += input_ids.shape[1]
        return self.norm(x)


def initial_value(
    name: str, shape: tuple[int, ...], generator: torch.Generator | None = None, zero_centred: bool = True
) -> torch.Tensor:
    """The documented initialisation, by tensor name, in fp32: zero-centred norms start at 0 (scale 1), plain
    ones (`zero_centred=False`: Qwen3 / Qwen2) at 1, the gated norm's weight at 1, dt_bias at 1, A_log at
    log(U(0.01, 16)) as the reference; biases at 0; every projection, the conv and the embedding from N(0, 0.02)."""
    if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
        return torch.ones(shape)
    if name.endswith("norm.weight"):
        return torch.zeros(shape) if zero_centred else torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(0.01, 16, generator=generator).log()
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator)


class Qwen3_5ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The vision tower (model/vision.VisionModel), when the loader keeps one (io/checkpoint.load_vision).
        self.visual: nn.Module | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Qwen3_5ForCausalLM:
        """`.to()`, `.half()`, ... move tensors: the weights' version says so (model/versions.py)."""
        out = super()._apply(fn, recurse)
        weights_changed()
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized head has no .weight to ask)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) fp32, or only the last `logits_to_keep` positions: prefill
        needs one row, and the 248K-row head is the costliest matmul of a small model. `embeds` and `positions`:
        a prompt with images, from `embed_prompt`."""
        h = self.model(input_ids, cache, embeds, positions)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h).float()
