"""How inference runs the model: `run_model` is forward with the fastest path that applies. A decode step (one
token per row, no gradients) runs every layer in one call of kernels.decode_step in C, so that a token costs no
Python per layer; anything else, or a model the C step does not describe, is the model's own forward. The
computation is Qwen3_5ForCausalLM.forward's, module by module (its twin in the tests).

The same call takes a few consecutive tokens per row (`step_in_one_call`, `run_model_hidden`): speculative
decoding's verification of the pending token and its drafts, every GEMV over all positions at once, attention and
the Gated DeltaNet token by token as decode steps. A tracked cache (`Cache.track`) has the step keep each recurrent
layer's state from before it and every position's projections, in buffers kept on the cache's layers; `Cache.rewind`
then calls `rewind_in_one_call`, which restores the state of each row that rejected a draft and replays the
recurrence of its kept tokens (the same kernel on the same values: the state plain decoding has). A plan of the MTP
head (its fc and the fc's norms, its layer and norm, the model's head: `head_step_in_one_call`) drafts the same
way.

The C step reads the model from ctypes structs of pointers and sizes (kernels.QkModel holding a kernels.QkLayer per
layer and a kernels.QkLinear per projection: ops/cpu/plan.h's structs). Describing the weights walks ~200 modules
(~100,000 for a 35B-A3B's experts), so the description is built once per model and kept with a list of checks (each
module still in its parent, each tensor still the module's and still at its address, each `fast` flag as it was),
which run only when the weights' version (model/versions.py) moved since they last passed: anything that swaps a
module (quantization, LoRA), moves a tensor (`.to`) or flips `fast` through `set_fast` moves it, and the next step
then rebuilds the plan if a check fails. The plan holds the storages it points at, so that a tensor replaced where
the version cannot see (`p.data = ...` without `weights_changed()`) is read as it was, never freed under the step. A
projection without `kernel_plan` (train/lora.py's LoRALinear) leaves the plan empty. Per-row adapters
(model/adapters.py's AdapterLinear) are described by their base layers, and the step is taken only while every
row is selected to the base; a row on an adapter always decodes through the forward, never around it. The
caches' pointers (and the step's rows and positions) are filled in at every step, into a copy of the model struct
(threads may decode with one model into different caches), since callers pass views of a batch cache.
"""

from __future__ import annotations

import ctypes
import operator
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from qwenlite.config import ModelConfig
from qwenlite.errors import ContextLengthExceeded
from qwenlite.model.adapters import AdapterLinear, AdapterSelection
from qwenlite.model.qwen3_5 import Attention, Qwen3_5ForCausalLM, RMSNorm, SparseMoeBlock
from qwenlite.model.versions import weights_version
from qwenlite.ops.cpu import kernels
from qwenlite.ops.rope import rope_cos_sin

if TYPE_CHECKING:
    from qwenlite.model.cache import Cache, LinearAttentionCache

# The model types kernels.decode_step describes: Qwen3.5's layers (zero-centred norms, q/k norms), Qwen3.5 MoE's (a
# router, the chosen experts and a gated shared expert for the MLP), Qwen3's (every layer full attention, no output
# gate, plain norms: the step computes x_hat * (1 + w') with w' = w - 1 in fp32, exactly w * x_hat for an fp32
# model, one rounding fewer than the reference's for bf16) and Qwen2's (Qwen3's without q/k norms, with q/k/v
# biases: added as the modules' forward adds them, to the projection rounded to the activation dtype).
PLANNED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3", "qwen2")
# Positions (rows x tokens) of one C step: each GEMV passes over its weights once per 4 of them; a verification of 8
# drafts for a few rows fits
STEP_TOKENS = 32
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds the activations (and kernels.GEMM_ROWS follows it)
KIND = {"linear_attention": kernels.LINEAR_ATTENTION, "full_attention": kernels.FULL_ATTENTION}


class Plan:
    """The weights' description (None where the C step does not apply) and what it depends on."""

    def __init__(self, model: Qwen3_5ForCausalLM, head: nn.Module | None = None):
        """The model's layers, final norm and head; or, given the MTP `head` (model/mtp.py), its fc with the fc's
        norms, its layers and norm, and the model's head (a draft step)."""
        self.checked = weights_version()  # the weights' version when the checks last passed
        # What must not change: dicts[i][keys[i]] is objects[i] (a module's children, parameters, buffers, `fast`),
        # and tensors[i] still at ptrs[i] (`p.data = ...` and Module.to keep a Parameter, change its storage).
        self.dicts: list[dict] = []
        self.keys: list[str] = []
        self.objects: list[object] = []
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.flagged: set[nn.Module] = set()  # modules whose `fast` flag is watched already
        self.layers: ctypes.Array[kernels.QkLayer] | None = None  # what self.model.layers points at
        self.model: kernels.QkModel | None = None  # all but the fields of a step
        self.owned: list[ctypes.Structure | ctypes.Array] = []  # what the structs point at: MoE layers, their experts
        self.adapters: AdapterSelection | None = None  # the step applies while it selects the base for every row
        # Plain norms: the fp32 w - 1 the step reads, and each source weight's version (an in-place change rebuilds)
        self.shifted: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.build(model, head)
        self.storages = [t.untyped_storage() for t in self.tensors]  # what the pointers point into, kept alive

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the model holds copies of its tensors: it builds its own plan (ctypes pointers do not copy)."""
        return None

    def current(self) -> bool:
        """Whether the description still holds, asked before every step: the checks run when the weights' version
        moved since they last passed; the plain norms' fp32 copies are compared with their sources' in-place change
        counters every time (a few per layer: an optimizer step changes values without moving the version)."""
        now = weights_version()
        if now != self.checked:
            if not self.valid():
                return False
            self.checked = now
        return list(map(version, self.sources)) == self.versions

    def valid(self) -> bool:
        """The checks, in builtins: each watched object in its place, each tensor at its address."""
        return (all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objects))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)  # fmt: skip

    def keep(self, module: nn.Module, *names: str) -> None:
        """Watch `module`'s children / parameters / buffers called `names`, and its `fast` flag (once)."""
        for name in names:
            for d in (module._modules, module._parameters, module._buffers):
                if name in d:
                    self.expect(d, name)
        if hasattr(module, "fast") and module not in self.flagged:
            self.flagged.add(module)
            self.expect(module.__dict__, "fast")

    def expect(self, d: dict, key: str) -> None:
        v = d.get(key)
        self.dicts.append(d)
        self.keys.append(key)
        self.objects.append(v)
        if isinstance(v, torch.Tensor):
            self.tensors.append(v)
            self.ptrs.append(v.data_ptr())

    def linear(self, parent: nn.Module, name: str, dtype: torch.dtype) -> kernels.QkLinear | None:
        module = getattr(parent, name)
        self.keep(parent, name)
        if isinstance(module, AdapterLinear):  # its base layer, for the steps with every row on the base
            self.keep(module, "base_layer")
            self.adapters, module = module.selection, module.base_layer
        self.keep(module, "weight", "bias", "qweight", "scales", "scales_and_zeros")
        weight = getattr(module, "weight", None)  # the step's float GEMVs read activations of the weights' dtype
        if isinstance(weight, torch.Tensor) and weight.dtype != dtype:
            return None
        return module.kernel_plan(dtype) if hasattr(module, "kernel_plan") else None

    def mlp(self, parent: nn.Module, name: str, dtype: torch.dtype) -> kernels.QkMlp | None:
        module = getattr(parent, name)
        self.keep(parent, name)
        parts = [self.linear(module, n, dtype) for n in ("gate_proj", "up_proj", "down_proj")]
        return None if any(p is None for p in parts) else kernels.QkMlp(*parts)

    def gate(self, parent: nn.Module, name: str, dtype: torch.dtype) -> kernels.QkLinear | None:
        """A MoE router's or shared expert gate's x W^T, which the step computes in the activation dtype."""
        module = getattr(parent, name)
        self.keep(parent, name)
        self.keep(module, "weight")
        w = module.weight
        if w.dtype != dtype or not w.is_contiguous() or w.device.type != "cpu":
            return None
        return kernels.plan_linear(kernels.FMT_BF16 if dtype == torch.bfloat16 else kernels.FMT_F32, w, *w.shape, dtype)

    def moe(self, block: SparseMoeBlock, dtype: torch.dtype) -> kernels.QkMoe | None:
        experts = [self.mlp(block.experts, str(e), dtype) for e in range(len(block.experts))]
        parts = [self.gate(block, "gate", dtype), self.mlp(block, "shared_expert", dtype),
                 self.gate(block, "shared_expert_gate", dtype)]  # fmt: skip
        if any(p is None for p in experts + parts):
            return None
        self.owned.append((kernels.QkMlp * len(experts))(*experts))
        self.owned.append(kernels.QkMoe(parts[0], self.owned[-1], *parts[1:]))
        return self.owned[-1]

    def small(self, module: nn.Module, name: str, dtype: torch.dtype | None) -> int | None:
        """A norm's (or other small tensor's) pointer; dtype None: a plain norm's weight w as the fp32 w - 1 the step's
        zero-centred norm reads."""
        self.keep(module, name)
        t = getattr(module, name)
        if t.device.type != "cpu":
            return None
        if dtype is None:
            self.sources.append(t)
            self.versions.append(version(t))
            self.shifted.append(t.detach().float() - 1.0)
            return self.shifted[-1].data_ptr()
        return t.data_ptr() if t.dtype == dtype and t.is_contiguous() else None

    def build(self, model: Qwen3_5ForCausalLM, head: nn.Module | None) -> None:
        c = model.config
        m = model.model if head is None else head  # what holds the layers and the final norm
        self.keep(model, "model", "lm_head")
        self.keep(m, "embed_tokens", "norm", "layers")
        if c.model_type not in PLANNED_MODEL_TYPES or not planned_modules(m, c):
            return
        dtype = model.dtype
        wdtype = m.norm.weight.dtype if c.zero_centred_norms else None  # None: plain norms, shifted to fp32
        dims = (c.hidden_size, c.intermediate_size, c.head_dim, c.linear_key_head_dim, c.linear_value_head_dim)
        if not kernels.available() or dtype not in kernels.ACT_DTYPES or any(n % 16 for n in dims):
            return
        layers: list[kernels.QkLayer] = []
        for i, layer in enumerate(m.layers):
            self.keep(m.layers, str(i))
            self.keep(layer, "input_layernorm", "post_attention_layernorm", "mlp", "linear_attn", "self_attn")
            norms = [self.small(layer.input_layernorm, "weight", wdtype),
                     self.small(layer.post_attention_layernorm, "weight", wdtype)]  # fmt: skip
            if isinstance(layer.mlp, SparseMoeBlock):  # a MoE layer's MLP: its struct, the dense one left empty
                moe = self.moe(layer.mlp, dtype)
                mlp = None if moe is None else kernels.QkMlp()
            else:
                moe, mlp = None, self.mlp(layer, "mlp", dtype)
            kind = KIND[layer.layer_type]
            if kind == kernels.LINEAR_ATTENTION:
                a = layer.linear_attn
                self.keep(a, "conv1d", "norm")
                parts = [*(self.linear(a, n, dtype) for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b")),
                         self.small(a.conv1d, "weight", wdtype), self.small(a, "A_log", wdtype),
                         self.small(a, "dt_bias", wdtype), self.small(a.norm, "weight", wdtype)]  # fmt: skip
                out = self.linear(a, "out_proj", dtype)
            else:
                a = layer.self_attn
                self.keep(a, "q_norm", "k_norm")
                parts = [self.linear(a, n, dtype) for n in ("q_proj", "k_proj", "v_proj")]
                if a.qk_norm:  # else NULL norms: Qwen2 has none
                    parts += [self.small(a.q_norm, "weight", wdtype), self.small(a.k_norm, "weight", wdtype)]
                out = self.linear(a, "o_proj", dtype)
            if any(v is None for v in [*norms, *parts, out, mlp]):
                return
            mixer = (kernels.QkMixer(gdn=kernels.QkGdn(*parts)) if kind == kernels.LINEAR_ATTENTION
                     else kernels.QkMixer(attn=kernels.QkAttn(*parts)))  # fmt: skip
            layers.append(kernels.QkLayer(kind, *norms, mixer, out, mlp, None if moe is None else ctypes.pointer(moe)))
        head, norm = self.linear(model, "lm_head", dtype), self.small(m.norm, "weight", wdtype)
        fuse = kernels.QkLinear()  # the model's: none
        if m is not model.model:  # the MTP head's fc and its norms
            self.keep(m, "fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden")
            fuse = self.linear(m, "fc", dtype)
            fuse_norms = [self.small(m.pre_fc_norm_embedding, "weight", wdtype),
                          self.small(m.pre_fc_norm_hidden, "weight", wdtype)]  # fmt: skip
            if any(v is None for v in fuse_norms):
                return
        if head is None or norm is None or fuse is None:
            return
        self.layers = (kernels.QkLayer * len(layers))(*layers)
        self.model = kernels.QkModel(
            act_bf16=dtype == torch.bfloat16, w_bf16=wdtype == torch.bfloat16, gated=c.attn_output_gate,
            eps=c.rms_norm_eps, hidden=c.hidden_size, n_layers=len(layers),
            intermediate=max(c.intermediate_size, c.moe_intermediate_size, c.shared_expert_intermediate_size),
            vocab=c.vocab_size, k_heads=c.linear_num_key_heads, v_heads=c.linear_num_value_heads,
            k_head_dim=c.linear_key_head_dim, v_head_dim=c.linear_value_head_dim, conv_kernel=c.linear_conv_kernel_dim,
            heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim, rotary_dim=c.rotary_dim,
            n_experts=c.num_experts, top_k=c.num_experts_per_tok, layers=self.layers, final_norm=norm, head=head,
            fuse=fuse,
        )  # fmt: skip
        if fuse.w:
            self.model.fuse_norm_e, self.model.fuse_norm_h = fuse_norms


def version(t: torch.Tensor) -> int:
    """The tensor's in-place change counter; an inference tensor keeps none (-1), and changes only in inference mode."""
    return -1 if t.is_inference() else t._version


def planned_modules(model: nn.Module, c: ModelConfig) -> bool:
    """Whether the norms are all of the config's kind and every attention layer has the config's output gate: the
    module layout the C step reads, one norm kind and one gate for the whole model (a check on the modules
    themselves, beside the one on the model type)."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    return (all(n.zero_centred == c.zero_centred_norms for n in norms)
            and all(a.gated == c.attn_output_gate for a in attention))  # fmt: skip


def context_length(model: Qwen3_5ForCausalLM, max_context: int | None = None) -> int:
    """The tokens a sequence may hold: the model's limit, or `max_context` below it."""
    limit = model.config.max_position_embeddings
    return min(limit, max_context) if max_context else limit


def run_model(
    model: Qwen3_5ForCausalLM,
    input_ids: torch.Tensor,
    cache: Cache | None = None,
    logits_to_keep: int = 0,
    embeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """model(input_ids, cache, logits_to_keep) -> logits, fp32, through the one-call decode step where it applies
    (any other module, a test's stand-in say, is only called). A piece of a prompt with images (`embeds`,
    `positions` from model/vision.embed_prompt) always takes the forward."""
    fits = isinstance(model, Qwen3_5ForCausalLM) and cache is not None and input_ids.shape[1] == 1
    if fits and embeds is None and not torch.is_grad_enabled():
        logits = decode_in_one_call(model, input_ids, cache)
        if logits is not None:
            return logits
    if embeds is not None:
        return model(input_ids, cache, logits_to_keep, embeds, positions)
    return model(input_ids, cache, logits_to_keep)


def run_model_hidden(
    model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """model.model(input_ids, cache) and the head over every position -> (final hidden states (B, T, hidden), logits
    (B, T, V) fp32), through the one-call step where it applies: the verification of speculative decoding, whose
    drafts read every position's hidden state. A tracked cache (`Cache.track`) is rewound by either path's means."""
    if isinstance(model, Qwen3_5ForCausalLM) and not torch.is_grad_enabled():
        out = step_in_one_call(model, input_ids, cache)
        if out is not None:
            return out
    hidden = model.model(input_ids, cache)
    return hidden, model.lm_head(hidden).float()


def decode_in_one_call(model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor | None:
    """forward(input_ids (B, 1), cache) -> logits (B, 1, V) fp32 through kernels.decode_step, or None where it does
    not apply (no kernels, more than MAX_ROWS rows, a module or dtype it does not know)."""
    out = step_in_one_call(model, input_ids, cache, hidden=False)
    return None if out is None else out[1]


def current_plan(model: Qwen3_5ForCausalLM, head: nn.Module | None = None) -> Plan:
    """The model's plan (or its MTP head's), built on first use and again when its checks fail."""
    owner = model if head is None else head
    plan = owner.__dict__.get("_decode_plan")
    if plan is None or not plan.current():
        plan = owner.__dict__["_decode_plan"] = Plan(model, head)
    return plan


def step_in_one_call(
    model: Qwen3_5ForCausalLM, input_ids: torch.Tensor, cache: Cache, hidden: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """forward(input_ids (B, T), cache) through kernels.decode_step -> (final hidden states (B, T, hidden) in the
    model's dtype, logits (B, T, V) fp32), or None where it does not apply (no kernels, more than MAX_ROWS rows or
    STEP_TOKENS positions, a module or dtype it does not know). T > 1: row b's tokens continue its sequence (the
    verification of speculative decoding); a tracked cache (`Cache.track`) keeps what `Cache.rewind` replays. Without
    `hidden` the first is None (plain decoding: a tiny model's token costs ~250 us, every view counts)."""
    plan = current_plan(model)
    B, T = input_ids.shape
    if plan.model is None or B > kernels.MAX_ROWS or B * T > STEP_TOKENS:
        return None
    if plan.adapters is not None and any(plan.adapters.rows):
        return None
    return run_plan(plan, model, input_ids, None, cache, hidden=hidden)


def head_step_in_one_call(
    model: Qwen3_5ForCausalLM, head: nn.Module, x: torch.Tensor, cache: Cache, vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The MTP head over x (1, T, 2 hidden), each position the embedding of its token and the hidden state before it,
    in one C call (fc and its norms, the layer, the norm, the model's head) -> (its normed output (1, T, hidden), the
    last position's logits (1, 1, V) fp32, or of the first `vocab` ids only), or None where the step does not apply.
    `cache`: the head's own (one attention layer)."""
    plan = current_plan(model, head)
    if plan.model is None or x.shape[1] > STEP_TOKENS or x.dtype != model.dtype:
        return None
    return run_plan(plan, model, None, x, cache, last_logits=True, vocab=vocab)


def head_drafts_in_one_call(
    model: Qwen3_5ForCausalLM,
    head: nn.Module,
    ids: torch.Tensor,
    hidden: torch.Tensor,
    count: int,
    cache: Cache,
    vocab: int | None = None,
) -> list[int] | None:
    """`count` greedy drafts of the MTP head in one C call (kernels.draft_greedy): the head over the tokens ids (1, n)
    and the model's hidden states before them (1, n, hidden), then over each draft, each draft the argmax of the
    last logits (of the first `vocab` ids only, where given: the output head reads only their rows); the head's
    cache advances by n + count - 1. None where it does not apply (no plan, more than STEP_TOKENS positions, an
    embedding table the C step cannot read in the activations' dtype)."""
    plan = current_plan(model, head)
    embed = model.model.embed_tokens
    dtype, n = model.dtype, ids.shape[1]
    table = embedding_table(embed, dtype)
    if plan.model is None or n > STEP_TOKENS or table is None:
        return None
    k, v = cache.layers[0].k, cache.layers[0].v
    if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == dtype):
        return None
    step = kernels.QkModel.from_buffer_copy(plan.model)
    caches = (kernels.QkCache * 1)()
    caches[0].attn = kernels.QkAttnCache(k.data_ptr(), v.data_ptr())
    pos = cache.lengths.contiguous()
    end = int(pos[0]) + n + count - 1
    if end > cache.max_seq_len:
        raise ContextLengthExceeded(f"{end} tokens do not fit a cache of {cache.max_seq_len}")
    cos, sin = rope_cos_sin(pos[0] + cache.rope_deltas[0] + torch.arange(n + count - 1), model.model.inv_freq, dtype)
    x = torch.cat([embed(ids[0]), hidden[0].to(dtype)], dim=-1).contiguous()  # (n, 2 hidden)
    step.max_seq_len = cache.max_seq_len
    step.positions, step.cos, step.sin, step.caches = pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), caches
    restrict_head(step, vocab)
    tokens = kernels.draft_greedy(step, x, table, count)
    cache.lengths += n + count - 1
    return tokens


def embedding_table(embed: nn.Module, dtype: torch.dtype) -> kernels.QkLinear | None:
    """The embedding `embed` as the C drafts read it (kernels.embed_rows), its rows in `dtype`: a QuantEmbedding's
    own description, an nn.Embedding's plain rows of that dtype; None where neither applies."""
    if hasattr(embed, "kernel_plan"):
        return embed.kernel_plan(dtype)
    w = getattr(embed, "weight", None)
    if not (isinstance(w, torch.Tensor) and w.dtype == dtype and w.device.type == "cpu" and w.is_contiguous()):
        return None
    return kernels.plan_linear(kernels.FMT_BF16 if dtype == torch.bfloat16 else kernels.FMT_F32, w, *w.shape, dtype)


def restrict_head(step: kernels.QkModel, vocab: int | None) -> None:
    """A step's output head cut to its first `vocab` rows (int4: its first tiles), where that is fewer."""
    if vocab is not None and vocab < step.vocab:
        step.vocab = step.head.n = vocab


def run_plan(
    plan: Plan,
    model: Qwen3_5ForCausalLM,
    input_ids: torch.Tensor | None,
    embeds: torch.Tensor | None,
    cache: Cache,
    last_logits: bool = False,
    hidden: bool = True,
    vocab: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """kernels.decode_step of `plan` over the tokens input_ids (B, T), or `embeds` (B, T, width): the MTP head's
    input (width 2 hidden), at the positions `cache` is at -> (final hidden states (B, T, hidden), logits (B, T, V)
    fp32, or the last row's (1, 1, V) with `last_logits`, V the first `vocab` ids where given; the hidden states
    None without `hidden`); None where the cache's tensors are not what the step reads."""
    dtype = model.dtype
    B, T = input_ids.shape if embeds is None else embeds.shape[:2]
    # The plan is shared: threads may decode with one model into different caches, so the step's fields go in a copy.
    step = kernels.QkModel.from_buffer_copy(plan.model)
    caches = (kernels.QkCache * len(plan.layers))()
    tracked = T > 1 and cache.tracking
    for slot, lc in zip(caches, cache.layers, strict=True):
        recurrent = hasattr(lc, "state")
        first, second = (lc.conv, lc.state) if recurrent else (lc.k, lc.v)
        if not (first.is_contiguous() and second.is_contiguous() and first.dtype == dtype
                and second.dtype == (torch.float32 if recurrent else dtype)):  # fmt: skip
            return None
        if not recurrent:
            slot.attn = kernels.QkAttnCache(first.data_ptr(), second.data_ptr())
        elif not tracked:
            slot.gdn = kernels.QkGdnCache(first.data_ptr(), second.data_ptr())
        else:
            before, inputs = replay_buffers(lc, B * T)
            slot.gdn = kernels.QkGdnCache(first.data_ptr(), second.data_ptr(), before[0].data_ptr(),
                                          inputs.data_ptr(), before[1].data_ptr())  # fmt: skip
    pos = cache.lengths.contiguous()
    if int(pos.max()) + T > cache.max_seq_len:
        raise ContextLengthExceeded(f"{int(pos.max()) + T} tokens do not fit a cache of {cache.max_seq_len}")
    # Decode tokens are text: the three multimodal streams agree, at the slot plus the rope delta.
    first = pos + cache.rope_deltas
    if T > 1:  # token-major, as the step reads them: token t of row b at t B + b
        first = (first[None, :] + torch.arange(T)[:, None]).reshape(-1)
    cos, sin = rope_cos_sin(first, model.model.inv_freq, dtype)  # (T B, R)
    if embeds is None:
        x = model.model.embed_tokens((input_ids.t() if T > 1 else input_ids).reshape(-1)).contiguous()
    else:
        x = (embeds.transpose(0, 1) if T > 1 else embeds).reshape(T * B, -1).clone()  # (T B, hidden or 2 hidden)
    step.rows, step.tokens, step.logits_rows = B, T, int(last_logits)
    restrict_head(step, vocab)
    step.max_seq_len = cache.max_seq_len if cache.max_seq_len < 1 << 62 else 0
    step.positions, step.cos, step.sin, step.caches = pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), caches
    logits = kernels.decode_step(step, x)  # x's first T B hidden values overwritten: the final hidden states
    cache.lengths += T
    if tracked:
        cache.replay = partial(rewind_in_one_call, step)
    states = x.view(-1)[: T * B * step.hidden].view(T, B, -1).transpose(0, 1) if hidden else None
    if T == 1 or last_logits:
        return states, logits.float().unsqueeze(1)
    return states, logits.view(T, B, -1).transpose(0, 1).float()


def replay_buffers(layer: LinearAttentionCache, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A recurrent layer's buffers for a tracked step of n positions (plan.h's qk_gdn_cache): the conv window and
    state before it, and the positions' recurrence inputs; kept on the layer and reused (grown when n is)."""
    if layer.before is None or layer.before[1].shape != layer.state.shape:
        layer.before = torch.empty_like(layer.conv), torch.empty_like(layer.state)
        layer.inputs = None
    B, Hv = layer.state.shape[:2]
    width = n // B * (layer.conv.shape[-1] + Hv * layer.state.shape[-1] + 2 * Hv)  # qkv, z, a, b per position
    if layer.inputs is None or layer.inputs.numel() < B * width:
        layer.inputs = torch.empty(B * width, dtype=layer.conv.dtype)
    return layer.before, layer.inputs


def rewind_in_one_call(step: kernels.QkModel, keep: list[int]) -> None:
    """Cache.replay after a tracked step: each row's recurrent layers back to its first keep[b] tokens (qk_rewind)."""
    kernels.rewind_step(step, torch.tensor(keep, dtype=torch.int64))
