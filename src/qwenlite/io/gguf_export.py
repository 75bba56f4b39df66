"""Export a checkpoint as GGUF for llama.cpp's `qwen35` architecture (`qwen35moe` for Qwen3.5 MoE, `qwen3` and
`qwen2` for the dense families).

The conventions are llama.cpp's converter's (convert_hf_to_gguf.py; the classes now live in
conversion/qwen.py: Qwen3NextModel, _LinearAttentionVReorderBase, _Qwen35MRopeMixin, Qwen3_5TextModel; the
writing rules in conversion/base.py: TextModel.set_gguf_parameters, ModelBase.prepare_tensors, _set_vocab_gpt2),
re-implemented here, never copied:

- tensor names: llama.cpp's `qwen35` names (`blk.N.attn_qkv`, `ssm_conv1d`, `ssm_a`, `ssm_dt.bias`, ...), the table
  `GGUF_NAMES` (tested against gguf-py's own TensorNameMap);
- zero-centred RMSNorm weights are stored as 1 + w (every `*norm.weight` but the gated `linear_attn.norm`);
- `A_log` is stored as `ssm_a` = -exp(A_log); `dt_bias` as `ssm_dt.bias`; the conv weight squeezed to (C, K);
- when there are more value heads than key heads, every value-head axis of a linear-attention layer is reordered
  from grouped by key head (HF: k0v0 k0v1 k1v0 k1v1) to tiled (k0v0 k1v0 k0v1 k1v1), for ggml's broadcast: the
  V rows of in_proj_qkv and of the conv, in_proj_z rows, in_proj_a / in_proj_b rows, A_log, dt_bias, out_proj columns;
- 1-D tensors, norms and the conv stay F32, the rest in the chosen dtype;
- metadata `qwen35.*` as the converter writes it, with rope.dimension_sections defaulting to [11, 11, 10, 0] and
  attention.recurrent_layers, each block's kind (false for the MTP block), which llama.cpp's loader prefers to
  full_attention_interval and its converter writes since llama.cpp #28208 (file for file equal to the converter's
  output then, but for the tensors' order: tried on the demo model with its MTP head);
- the tokenizer as "gpt2" BPE with pre-tokenizer "qwen35": every id up to vocab_size (unused ids as [PADn]),
  token types, merges, special ids and chat template (via gguf-py's SpecialVocab, as the converter).

Qwen3.5 MoE (`qwen35moe`, the converter's Qwen2MoeModel rules): each layer's experts stacked into one 3-D tensor
per projection (`ffn_gate_exps` / `ffn_up_exps` (E, I, H), `ffn_down_exps` (E, H, I) in torch order), the shared
expert as `ffn_*_shexp`, the router `ffn_gate_inp` and the shared expert's gate `ffn_gate_inp_shexp` in F32
(the converter keeps the router F32; its gate, one row, costs nothing either); `expert_count`, `expert_used_count`,
`expert_feed_forward_length`, `expert_shared_feed_forward_length` in the metadata.

Qwen3 and Qwen2 (`qwen3` / `qwen2`, the converter's Qwen3Model / Qwen2Model: plain TextModel rules): the
tensors as stored (no q/k permutation, RMSNorm weights w as they are, since llama.cpp multiplies by w and these norms
are not zero-centred), the norm before the MLP as `ffn_norm` (qwen35's is `post_attention_norm`), Qwen2's q/k/v
biases as `attn_q.bias` ...; metadata without the rope sections and ssm keys, and key_length / value_length only when
config.json has head_dim (Qwen3 does, Qwen2 does not: llama.cpp then divides). A Qwen3 checkpoint with
attention_bias is refused: llama.cpp's qwen3 reads no attention biases. The tokenizer's pre-tokenizer is named by its
split regex: Qwen2 / Qwen3's is llama.cpp's "qwen2" (the converter finds it by hash, and so does a test).

The multi-token-prediction head (`mtp.*`, where the checkpoint has one) is the tail block, as llama.cpp's converter
writes it for `--spec-type draft-mtp` (its _Qwen35MtpMixin): block_count = num_hidden_layers + 1 and
nextn_predict_layers = 1; the head's decoder layer `mtp.layers.0.*` is block N = num_hidden_layers under the names
and conventions of a main full-attention layer (MoE for qwen35moe), and its own tensors are `blk.N.nextn.*`
(`GGUF_MTP_NAMES`: fc (H, 2H), embedding half first, as `eh_proj`; its three zero-centred norms stored as 1 + w like
the others). Its types follow the main layers' rule: matrices (eh_proj included) in the chosen dtype, norms and the
router F32. A checkpoint without the head gets no tail block. llama.cpp builds older than its Qwen3.5 MTP support
(#22673) may not load a file with one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
from tqdm import tqdm

from qwenlite.config import ModelConfig, load_config
from qwenlite.errors import QwenliteError
from qwenlite.io.checkpoint import (
    Part,
    Stored,
    check_names,
    expected_shapes,
    match_tensors,
    open_safetensors,
    read_tensor,
    source,
)
from qwenlite.io.files import atomic_write
from qwenlite.model.mtp import MTP, PREFIX
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.text.vocab import QWEN3_PATTERN, QWEN35_PATTERN

# our model_type -> llama.cpp's architecture
GGUF_ARCHES = {"qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe", "qwen3": "qwen3", "qwen2": "qwen2"}
# llama.cpp's pre-tokenizer name -> the split regex it stands for
PRE_TOKENIZERS = {"qwen35": QWEN35_PATTERN, "qwen2": QWEN3_PATTERN}
DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]  # what the converter writes when config.json has no mrope_section
RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"  # gguf-py's Keys.Attention.RECURRENT_LAYERS (newer than ours)
# --dtype -> (type of the big matrices, general.file_type)
FILE_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_NAMES = {  # model.layers.{i}.<key> -> blk.{i}.<value>
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",  # query and output gate, interleaved per head, as stored
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_MOE_LAYER_NAMES = {  # qwen35moe's, beside the above but the dense MLP's
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the router
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}
GGUF_DENSE_LAYER_NAMES = {  # qwen3's and qwen2's, over the above
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
# model.layers.{i}.mlp.experts.{e}.<key> -> blk.{i}.<value>, expert e of the stacked tensor
GGUF_EXPERT_NAMES = {"gate_proj.weight": "ffn_gate_exps.weight", "up_proj.weight": "ffn_up_exps.weight",
                     "down_proj.weight": "ffn_down_exps.weight"}  # fmt: skip
# mtp.<key> -> blk.{N}.<value>, N = num_hidden_layers: the MTP head's own tensors (gguf-py's NEXTN_* names, which
# its tables do not list for qwen35); the head's layers are mtp.layers.{j}.* -> blk.{N + j}.*, as main layers
GGUF_MTP_NAMES = {
    "fc.weight": "nextn.eh_proj.weight",
    "pre_fc_norm_embedding.weight": "nextn.enorm.weight",
    "pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
    "norm.weight": "nextn.shared_head_norm.weight",
}
_LAYER = re.compile(r"(?:model|mtp)\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(.+)")


def block_name(name: str, layers: int) -> str:
    """An MTP head layer's tensor under the name of the main layer whose block it takes (mtp.layers.{j}.<key> ->
    model.layers.{layers + j}.<key>); any other name as it is."""
    m = _LAYER.fullmatch(name)
    return f"model.layers.{layers + int(m.group(1))}.{m.group(2)}" if m and name.startswith(PREFIX) else name


def _head_own(name: str) -> bool:
    """One of the MTP head's own tensors (not its layers')."""
    return name.startswith(PREFIX) and name.removeprefix(PREFIX) in GGUF_MTP_NAMES


def gguf_name(name: str, dense: bool = False, layers: int = 0) -> str:
    """Our (sanitized) checkpoint tensor name -> llama.cpp's qwen35 / qwen35moe name, or with `dense` its qwen3 /
    qwen2 name (every expert of a layer and projection -> the one stacked tensor; `expert_index` says where). The MTP
    head's `mtp.*` names need `layers`, the model's num_hidden_layers: its block comes after them."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    if name.startswith(PREFIX) and layers <= 0:
        raise ValueError(f"{name}: the MTP head's block number needs the model's layer count")
    if _head_own(name):
        return f"blk.{layers}.{GGUF_MTP_NAMES[name.removeprefix(PREFIX)]}"
    name = block_name(name, layers)
    layer_names = GGUF_LAYER_NAMES | (GGUF_DENSE_LAYER_NAMES if dense else GGUF_MOE_LAYER_NAMES)
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in layer_names:
        return f"blk.{m.group(1)}.{layer_names[m.group(2)]}"
    e = _EXPERT.fullmatch(m.group(2)) if m and not dense else None
    if e and e.group(2) in GGUF_EXPERT_NAMES:
        return f"blk.{m.group(1)}.{GGUF_EXPERT_NAMES[e.group(2)]}"
    raise QwenliteError(f"tensor {name} has no llama.cpp {'qwen3 / qwen2' if dense else 'qwen35'} name")


def expert_index(name: str) -> int | None:
    """The expert a per-expert tensor name belongs to (its slice of the stacked GGUF tensor), else None."""
    m = _LAYER.fullmatch(name)
    e = _EXPERT.fullmatch(m.group(2)) if m else None
    return int(e.group(1)) if e else None


# ---------------------------------------------------------------------------------------------
# Tensor conventions


def tile_value_heads(t: torch.Tensor, dim: int, num_k_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder value heads along `dim` from grouped by key head, (Hk, Hv/Hk) order, to tiled, (Hv/Hk, Hk) order;
    each head is `head_dim` entries long along `dim`."""
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], num_k_heads, -1, head_dim, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def convert_tensor(name: str, t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """Our tensor -> the values llama.cpp expects under its name, fp32. Pure."""
    t = t.float()
    if ".linear_attn." in name and c.linear_num_value_heads != c.linear_num_key_heads:
        Hk, Dv, key_dim = c.linear_num_key_heads, c.linear_value_head_dim, c.linear_key_dim
        if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):  # rows [q | k | v]: only v is per value head
            t = torch.cat([t[: 2 * key_dim], tile_value_heads(t[2 * key_dim :], 0, Hk, Dv)])
        elif name.endswith("in_proj_z.weight"):
            t = tile_value_heads(t, 0, Hk, Dv)
        elif name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
            t = tile_value_heads(t, 0, Hk, 1)
        elif name.endswith("out_proj.weight"):
            t = tile_value_heads(t, 1, Hk, Dv)
    if name.endswith("A_log"):
        return -torch.exp(t)
    if name.endswith("conv1d.weight"):
        return t.squeeze(1)  # (C, 1, K) -> (C, K)
    if stored_as_multiplier(name, c):
        return t + 1  # zero-centred RMSNorm: llama.cpp multiplies by the stored weight
    return t


def stored_as_multiplier(name: str, c: ModelConfig) -> bool:
    """Whether tensor `name` is a zero-centred RMSNorm weight w, which llama.cpp stores as 1 + w: every norm of a
    Qwen3.5 model (the MTP head's pre_fc_norm_embedding / _hidden too) but the gated `linear_attn.norm`."""
    norm = name.endswith(("norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight"))
    return c.zero_centred_norms and norm and not name.endswith("linear_attn.norm.weight")


def tensor_type(
    name: str, ndim: int, matrix_type: gguf.GGMLQuantizationType, row: int | None = None
) -> gguf.GGMLQuantizationType:
    """F32 for 1-D tensors, norms, the conv and anything not named *.weight; `matrix_type` for the rest, or F16
    when a row of `row` values does not split into its blocks (as the converter falls back)."""
    if (ndim <= 1 or name.endswith("_norm.weight") or ".ssm_conv1d." in name or ".ffn_gate_inp" in name
            or not name.endswith(".weight")):  # fmt: skip
        return gguf.GGMLQuantizationType.F32
    if row is not None and row % gguf.GGML_QUANT_SIZES[matrix_type][0]:
        return gguf.GGMLQuantizationType.F16
    return matrix_type


def to_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A tensor's values as GGUF stores them in `qtype`."""
    t = t.contiguous()
    if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        return gguf.quants.quantize(t.numpy(), qtype)  # uint8 blocks, (rows, bytes per row)
    if qtype == gguf.GGMLQuantizationType.F32:
        return t.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # round to nearest even, as gguf-py


# ---------------------------------------------------------------------------------------------
# Metadata and tokenizer


def _raw_config(root: Path) -> dict:
    raw = json.loads((root / "config.json").read_text())
    return {**raw, **(raw.get("text_config") or {})}


def check_layer_types(c: ModelConfig) -> None:
    # llama.cpp derives each layer's kind from full_attention_interval alone.
    interval = c.full_attention_interval
    pattern = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(c.num_hidden_layers)]
    if c.layer_types != pattern:
        raise QwenliteError(
            f"layer_types {c.layer_types} do not follow full_attention_interval {interval}; GGUF cannot express them"
        )


def add_model_metadata(
    writer: gguf.GGUFWriter, c: ModelConfig, raw: dict, file_type: gguf.LlamaFileType, nextn: int = 0
) -> None:
    """The `<arch>.*` keys; `nextn` MTP layers after the model's (block_count counts them too)."""
    writer.add_block_count(c.num_hidden_layers + nextn)
    if nextn:
        writer.add_nextn_predict_layers(nextn)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    if not c.dense:
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        sections = list(rope.get("mrope_section") or DEFAULT_MROPE_SECTIONS)
        writer.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if not c.dense or "head_dim" in raw:  # the converter writes them when config.json has head_dim
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(file_type)
    if c.dense:
        return
    writer.add_ssm_conv_kernel(c.linear_conv_kernel_dim)
    writer.add_ssm_state_size(c.linear_key_head_dim)
    writer.add_ssm_group_count(c.linear_num_key_heads)
    writer.add_ssm_time_step_rank(c.linear_num_value_heads)
    writer.add_ssm_inner_size(c.linear_value_dim)
    writer.add_full_attention_interval(c.full_attention_interval)
    recurrent = [kind == "linear_attention" for kind in c.layer_types] + [False] * nextn  # the MTP block attends
    writer.add_array(RECURRENT_LAYERS.format(arch=writer.arch), recurrent)
    writer.add_rope_dimension_count(c.rotary_dim)
    if c.moe:
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


def _looks_special(token: str) -> bool:
    # The converter also marks added tokens shaped like <|...|> as control tokens.
    return token.startswith("<|") and token.endswith("|>")


def _regexes(node) -> list[str]:
    """Every split regex of a tokenizer.json pre_tokenizer tree."""
    if isinstance(node, list):
        return [r for child in node for r in _regexes(child)]
    if not isinstance(node, dict):
        return []
    own = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"] else []
    return own + [r for key, child in node.items() if key != "pattern" for r in _regexes(child)]


def add_tokenizer_metadata(writer: gguf.GGUFWriter, root: Path, vocab_size: int) -> None:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise QwenliteError(f"no tokenizer.json in {root}: a GGUF carries its tokenizer, so export needs one")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise QwenliteError(f"cannot read {path}: {e}") from None
    regexes = _regexes(spec.get("pre_tokenizer"))
    pre = next((name for name, pattern in PRE_TOKENIZERS.items() if pattern in regexes), None)
    if (spec.get("model") or {}).get("type") != "BPE" or pre is None:
        raise QwenliteError(
            f"{path} is not a byte-level BPE with Qwen3.5's or Qwen2 / Qwen3's pre-tokenizer regex; llama.cpp's "
            "'qwen35' and 'qwen2' pre-tokenizers would split text differently"
        )
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise QwenliteError(f"{path} has id {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        if i not in added:
            types[i] = gguf.TokenType.NORMAL
        elif added[i].special or _looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            types[i] = gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special ids (eos, pad, ...), add_*_token flags and the chat template, read as the converter reads them.
    gguf.SpecialVocab(root, load_merges=True).add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class PlannedTensor:
    names: tuple[str, ...]  # ours: one, or a layer's experts in order (stacked)
    gguf_name: str
    shape: tuple[int, ...]  # as written (numpy order)
    qtype: gguf.GGMLQuantizationType
    sources: tuple[Stored, ...]  # where each of `names` is stored


def plan_tensors(root: Path, c: ModelConfig, matrix_type: gguf.GGMLQuantizationType) -> list[PlannedTensor]:
    """What will be written, in llama.cpp's usual order, checked strictly against the model's expected shapes (and
    the MTP head's, where the checkpoint has one: its block after the model's layers)."""
    with torch.device("meta"):
        shapes = expected_shapes(Qwen3_5ForCausalLM(c))
        head = MTP(c) if not c.dense else None
    # A tied checkpoint gets no output tensor: llama.cpp falls back to token_embd.
    files, mtp_files = match_tensors(root, shapes, c)
    if mtp_files and head is not None:
        mtp_shapes = {PREFIX + name: tuple(t.shape) for name, t in head.state_dict().items()}
        check_names(root, mtp_shapes, mtp_files)
        shapes, files = shapes | mtp_shapes, files | mtp_files
    layers = c.num_hidden_layers

    def order(name: str) -> tuple[int, int, str, int]:
        if _head_own(name):
            return (1, layers, "", 0)  # the head's own tensors lead its block
        name = block_name(name, layers)
        m = _LAYER.fullmatch(name)
        if m:
            e = expert_index(name)  # a layer's experts together, in expert order
            key = m.group(2) if e is None else "mlp.experts." + m.group(2).split(".", 3)[3]
            return (1, int(m.group(1)), key, e or 0)
        return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name, 0)

    grouped: dict[str, list[str]] = {}
    for name in sorted(shapes, key=order):
        grouped.setdefault(gguf_name(name, c.dense, layers), []).append(name)
    plan = []
    for target, names in grouped.items():
        shape = shapes[names[0]]
        if names[0].endswith("conv1d.weight"):
            shape = (shape[0], shape[2])
        if expert_index(names[0]) is not None:
            shape = (len(names), *shape)
        qtype = tensor_type(target, len(shape), matrix_type, shape[-1])
        plan.append(PlannedTensor(tuple(names), target, shape, qtype, tuple(files[n] for n in names)))
    return plan


def read_stored(handles: dict, stored: Stored) -> torch.Tensor:
    """A tensor of the checkpoint (an expert's part of a fused one included), memory-mapped; `handles` keeps the
    files opened so far."""
    path, name = source(stored)
    if path not in handles:
        handles[path] = open_safetensors(path)
    t = read_tensor(handles[path], name, path)
    return stored.take(t, f"{name} in {path}") if isinstance(stored, Part) else t


def export_gguf(
    checkpoint_dir: str | Path, out_path: str | Path, dtype: str = "f16", name: str | None = None, progress=True
) -> Path:
    """Write the checkpoint at `checkpoint_dir` as one GGUF file for llama.cpp's architecture of its family (see
    GGUF_ARCHES). The file is written under a temporary name and renamed when complete; tensors are converted and
    written one at a time."""
    if dtype not in FILE_TYPES:
        raise QwenliteError(f"unknown GGUF dtype {dtype!r}; choose from {', '.join(FILE_TYPES)}")
    root, out_path = Path(checkpoint_dir), Path(out_path)
    matrix_type, file_type = FILE_TYPES[dtype]
    c = load_config(root)
    if c.o_bias:
        raise QwenliteError(
            f"this {c.model_type} checkpoint has attention biases (attention_bias), which llama.cpp's "
            f"{GGUF_ARCHES[c.model_type]} architecture does not read; GGUF cannot carry them"
        )
    if not c.dense:
        check_layer_types(c)
    plan = plan_tensors(root, c, matrix_type)

    writer = gguf.GGUFWriter(path=None, arch=GGUF_ARCHES[c.model_type])
    writer.add_type(gguf.GGUFType.MODEL)
    gguf_metadata(root, name, sum(int(np.prod(t.shape)) for t in plan)).set_gguf_meta_model(writer)
    nextn = int(any(t.names[0].startswith(PREFIX) for t in plan))  # one MTP layer, or none
    add_model_metadata(writer, c, _raw_config(root), file_type, nextn)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer_metadata(writer, root, c.vocab_size)

    handles: dict = {}

    def arrays():
        for t in plan:
            parts = [convert_tensor(n, read_stored(handles, s), c) for n, s in zip(t.names, t.sources, strict=True)]
            stacked = expert_index(t.names[0]) is not None
            yield to_numpy(torch.stack(parts) if stacked else parts[0], t.qtype)

    write_gguf(writer, out_path, [(t.gguf_name, t.shape, t.qtype) for t in plan], arrays(), progress)
    return out_path


def gguf_metadata(root: Path, name: str | None, total_params: int) -> gguf.Metadata:
    """The `general.*` keys of a checkpoint's GGUF files, as the converter finds them; the name is at least the
    directory's."""
    metadata = gguf.Metadata.load(None, root, name, total_params)
    metadata.name = metadata.name or name or root.resolve().name
    metadata.size_label = metadata.size_label or gguf.size_label(total_params, total_params, 0, 0)
    return metadata


def stored_layout(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype]:
    """How a tensor of `shape` (numpy order) and `qtype` lies in the file: its numpy shape and dtype (a quantized one
    as uint8 rows of blocks)."""
    np_dtypes = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                 gguf.GGMLQuantizationType.BF16: np.uint16}  # fmt: skip
    if qtype in np_dtypes:
        return shape, np.dtype(np_dtypes[qtype])
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), np.dtype(np.uint8)


def write_gguf(
    writer: gguf.GGUFWriter,
    out_path: Path,
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]],
    arrays: Iterable[np.ndarray],
    progress: bool = True,
) -> None:
    """Write `writer`'s metadata and `tensors` (name, shape, type) to `out_path`, under a temporary name renamed when
    complete: `arrays` gives each tensor's data in order (`to_numpy`), one at a time, as it is written."""
    layouts = [stored_layout(shape, qtype) for _, shape, qtype in tensors]
    for (name, _, qtype), (shape, dtype) in zip(tensors, layouts, strict=True):
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=qtype)
    total_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in layouts)

    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress) as bar:
                for (name, _, _), (shape, _), data in zip(tensors, layouts, arrays, strict=True):
                    assert data.shape == shape, (name, data.shape, shape)
                    writer.write_tensor_data(data)
                    bar.update(data.nbytes)
        finally:
            writer.close()

    atomic_write(out_path, write)
