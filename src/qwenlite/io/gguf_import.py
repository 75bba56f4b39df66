"""Run a llama.cpp GGUF of Qwen3.5 (architecture `qwen35`, or `qwen35moe` for Qwen3.5 MoE) or of the dense Qwen3 /
Qwen2 (`qwen3` / `qwen2`): the inverse of gguf_export.py.

- config from the `<arch>.*` metadata (block_count, embedding_length, ssm.*, rope.* (dimension_sections: the
  multimodal rotary sections), ...); the head is tied when
  there is no `output.weight`; a file with `nextn_predict_layers` = 1 has block_count = num_hidden_layers + 1, its
  tail block the multi-token-prediction head (gguf_export's layout), which `load_gguf` leaves and `load_gguf_mtp`
  reads (more than one such layer is refused: qwenlite runs one);
  a dense file without attention.key_length has llama.cpp's head size, embedding_length / head_count; rotary
  scaling (rope.scaling.type other than none) is refused, as config.py refuses it in a config.json;
- tensors found under the exporter's own names (gguf_export.gguf_name of each of ours), and each of its
  conventions undone by `unconvert_tensor`: Qwen3.5's norms stored as 1 + w, `ssm_a` = -exp(A_log), the conv
  squeezed to (C, K), value heads tiled for ggml's broadcast (untiling is the same transpose with the grid's sides
  swapped); a MoE layer's stacked `ffn_*_exps` tensor converted once, each expert's module given its view of it;
  the dense families' tensors are stored as they are;
- the tokenizer rebuilt from `tokenizer.ggml.*` (tokens, types, merges, eos id) as a byte-level BPE with the split
  regex its pre-tokenizer names (`qwen35`, or `qwen2` for Qwen2 / Qwen3's) and NFC, the chat template from
  `tokenizer.chat_template`: no tokenizer.json needed.

This first version dequantizes every tensor to the target dtype at load, with gguf-py's `gguf.quants.dequantize`
(F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and the other types it knows), a block of rows at a time. Keeping Q8_0 /
Q4_0 packed for the int8 / int4 kernels is the follow-up: Q4_0 is exactly int4 with group 32, s = d, z = 0.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken
from tqdm import tqdm

from qwenlite.config import DENSE_FAMILIES, DTYPES, ModelConfig
from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io.checkpoint import assemble, assemble_mtp, expected_shapes
from qwenlite.io.gguf_export import (
    GGUF_ARCHES,
    PRE_TOKENIZERS,
    expert_index,
    gguf_name,
    stored_as_multiplier,
    tile_value_heads,
)
from qwenlite.model.mtp import MTP, PREFIX
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.text.tokenizer import ENDOFTEXT, IM_END, Tokenizer
from qwenlite.text.vocab import qwen35_bpe

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
ROW_CHUNK = 8192  # rows dequantized at a time: bounds the fp32 temporary of the 248K-row embedding


def unconvert_tensor(name: str, t: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """llama.cpp's values under its name -> our tensor `name`, fp32. Pure; the inverse of
    gguf_export.convert_tensor."""
    t = t.float()
    if name.endswith("A_log"):
        t = torch.log(-t)
    elif name.endswith("conv1d.weight"):
        t = t.unsqueeze(1)  # (C, K) -> (C, 1, K)
    elif stored_as_multiplier(name, c):
        t = t - 1  # stored as the multiplier 1 + w
    if ".linear_attn." in name and c.linear_num_value_heads != c.linear_num_key_heads:
        # Tiled order is a (Hv/Hk, Hk) grid of heads; transposing it back is the export's tiling with r = Hv/Hk.
        r, Dv, key_dim = c.linear_num_value_heads // c.linear_num_key_heads, c.linear_value_head_dim, c.linear_key_dim
        if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            t = torch.cat([t[: 2 * key_dim], tile_value_heads(t[2 * key_dim :], 0, r, Dv)])
        elif name.endswith("in_proj_z.weight"):
            t = tile_value_heads(t, 0, r, Dv)
        elif name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
            t = tile_value_heads(t, 0, r, 1)
        elif name.endswith("out_proj.weight"):
            t = tile_value_heads(t, 1, r, Dv)
    return t


# ---------------------------------------------------------------------------------------------
# Metadata


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ours: (rows, cols), the reverse of GGUF's ne order
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 (rows, bytes per row), or (bytes,) for a 1-D tensor: a view of the memory map

    @property
    def n_bytes(self) -> int:
        return self.data.nbytes


_SCALARS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


class _Cursor:
    def __init__(self, buf: np.ndarray):
        self.view, self.pos = memoryview(buf), 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.view, self.pos)
        self.pos += 8 + n
        return str(self.view[self.pos - n : self.pos], "utf-8", "replace")

    def value(self, kind: int):
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        item, n = gguf.GGUFValueType(self.scalar("<I")), self.scalar("<Q")  # an array
        if item in _SCALARS:
            values = struct.unpack_from(f"<{n}{_SCALARS[item][1]}", self.view, self.pos)
            self.pos += n * struct.calcsize(_SCALARS[item])
            return list(values)
        if item == gguf.GGUFValueType.STRING:
            return [self.string() for _ in range(n)]
        return [self.value(item) for _ in range(n)]


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors) of a little-endian GGUF v2/v3 file, tensor data memory-mapped. gguf-py's GGUFReader
    does the same but builds a numpy view per array element: 15 s for Qwen3.5's 248K tokens and merges."""
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        cur = _Cursor(buf)
        if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (a big-endian file?)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, ne, gguf.GGMLQuantizationType(cur.scalar("<I")), cur.scalar("<Q")))
        alignment = meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        start = -(-cur.pos // alignment) * alignment
        tensors = {}
        for name, ne, kind, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            row_bytes = ne[0] // block * size
            rows = int(np.prod(ne[1:], dtype=np.int64))
            at = start + offset
            if at + rows * row_bytes > len(buf):
                raise ValueError(f"tensor {name} ends past the end of the file (truncated?)")
            data = buf[at : at + rows * row_bytes]
            data = data.reshape(rows, row_bytes) if len(ne) > 1 else data
            tensors[name] = GGUFTensor(name, tuple(reversed(ne)), kind, data)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise CheckpointError(f"cannot read {path}: not a valid GGUF file ({e})") from None
    return meta, tensors


def _scalar(value) -> int:
    # llama.cpp allows some per-layer keys as arrays (head_count_kv); the converter writes scalars for ours.
    if isinstance(value, list):
        value = max(value)
    return value


def config_from_gguf(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], dtype: str, where: Path) -> ModelConfig:
    """ModelConfig from `<arch>.*` metadata (qwen35, qwen35moe, qwen3, qwen2) and the tensors' shapes (ours: rows,
    cols)."""
    arch = meta.get("general.architecture")
    model_type = {a: t for t, a in GGUF_ARCHES.items()}.get(arch)
    if model_type is None:
        raise CheckpointError(
            f"{where}: architecture {arch!r} is not one qwenlite reads ({', '.join(map(repr, GGUF_ARCHES.values()))})"
        )

    def key(k: str):
        value = meta.get(f"{arch}.{k}")
        if value is None:
            raise CheckpointError(f"{where}: metadata {arch}.{k} is missing")
        return _scalar(value)

    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{where}: tensor token_embd.weight is missing")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":  # as config.py refuses it in a config.json
        raise CheckpointError(f"{where} uses {scaling!r} rotary scaling; qwenlite has only the default")
    common = dict(
        model_type=model_type,
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=key("embedding_length"),
        num_attention_heads=key("attention.head_count"),
        num_key_value_heads=key("attention.head_count_kv"),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in shapes,
        rope_theta=float(key("rope.freq_base")),
        mtp_num_hidden_layers=0,
        dtype=dtype,
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if model_type in DENSE_FAMILIES:
        head_dim = meta.get(f"{arch}.attention.key_length") or common["hidden_size"] // common["num_attention_heads"]
        return ModelConfig(
            **common,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            head_dim=_scalar(head_dim),
            attn_output_gate=False,
            partial_rotary_factor=1.0,
        )
    head_dim, v_heads = key("attention.key_length"), key("ssm.time_step_rank")
    nextn = nextn_layers(meta, where)
    layers = key("block_count") - nextn
    interval = key("full_attention_interval")
    heads = common["num_attention_heads"]
    q_rows = shapes.get(f"blk.{interval - 1}.attn_q.weight", (2 * heads * head_dim,))[0]
    moe = {}
    if model_type == "qwen3_5_moe_text":
        moe = dict(num_experts=key("expert_count"),
                   num_experts_per_tok=key("expert_used_count"),
                   moe_intermediate_size=key("expert_feed_forward_length"),
                   shared_expert_intermediate_size=key("expert_shared_feed_forward_length"))  # fmt: skip
    # A MoE model computes no dense MLP: its feed_forward_length, when written at all, is only carried along.
    intermediate = meta.get(f"{arch}.feed_forward_length") if moe else key("feed_forward_length")
    return ModelConfig(
        **(common | {"mtp_num_hidden_layers": nextn}),
        **moe,
        intermediate_size=_scalar(intermediate or moe.get("moe_intermediate_size")),
        num_hidden_layers=layers,
        head_dim=head_dim,
        attn_output_gate=q_rows == 2 * heads * head_dim,
        linear_conv_kernel_dim=key("ssm.conv_kernel"),
        linear_key_head_dim=key("ssm.state_size"),
        linear_value_head_dim=key("ssm.inner_size") // v_heads,
        linear_num_key_heads=key("ssm.group_count"),
        linear_num_value_heads=v_heads,
        full_attention_interval=interval,
        partial_rotary_factor=key("rope.dimension_count") / head_dim,
        # The multimodal rotary streams (t, h, w), which only image tokens tell apart (an mmproj brings them).
        mrope_section=list(meta.get(f"{arch}.rope.dimension_sections") or [])[:3] or None,
    )


def nextn_layers(meta: dict[str, Any], where: Path) -> int:
    """How many multi-token-prediction blocks follow the model's layers: 0 or 1 (more are refused)."""
    n = _scalar(meta.get(f"{meta.get('general.architecture')}.nextn_predict_layers") or 0)
    if n > 1:
        raise CheckpointError(
            f"{where} has {n} multi-token-prediction layers (nextn_predict_layers); qwenlite runs one"
        )
    return n


def tokenizer_from_gguf(meta: dict[str, Any], where: Path) -> Tokenizer:
    """Byte-level BPE from tokenizer.ggml.tokens / token_type / merges with the split regex of its pre-tokenizer;
    control and user-defined tokens become added tokens on their ids; unused ([PADn]) ids are left out."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{where}: tokenizer {model!r} with pre-tokenizer {pre!r}; qwenlite reads 'gpt2' with "
            f"{' or '.join(map(repr, PRE_TOKENIZERS))} (Qwen3.5's, Qwen2 / Qwen3's)"
        )
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{where}: no tokenizer.ggml.tokens; a GGUF without its vocabulary cannot be run")
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    used = {i for i, kind in enumerate(types) if kind != gguf.TokenType.UNUSED}
    vocab = {tokens[i]: i for i in sorted(used)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = qwen35_bpe(vocab, merges, PRE_TOKENIZERS[pre])

    def added(kind) -> list[AddedToken]:
        return [AddedToken(tokens[i], special=kind == gguf.TokenType.CONTROL, normalized=False)
                for i in sorted(used) if types[i] == kind]  # fmt: skip

    # Already in the model's vocabulary, so they keep their ids.
    tok.add_special_tokens(added(gguf.TokenType.CONTROL))
    tok.add_tokens(added(gguf.TokenType.USER_DEFINED))
    special_tokens = {}
    for key in ("eos", "bos", "padding", "unknown"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and i in used:
            special_tokens[{"padding": "pad", "unknown": "unk"}.get(key, key) + "_token"] = tokens[i]
    candidates = (special_tokens.get("eos_token"), IM_END, ENDOFTEXT)
    eos_ids = {i for t in candidates if t and (i := tok.token_to_id(t)) is not None}
    return Tokenizer(tok, meta.get("tokenizer.chat_template"), eos_ids, special_tokens)


# ---------------------------------------------------------------------------------------------
# Tensors


def dequantize_rows(t: GGUFTensor, rows: slice | None = None) -> torch.Tensor:
    """A GGUF tensor (or a slice of its rows) as fp32, in our (rows, cols) order."""
    data = t.data if rows is None else t.data[rows]
    values = gguf.quants.dequantize(data, t.tensor_type)
    # F32 data comes back as the read-only memory map itself: copy, so the model owns writable tensors.
    values = torch.from_numpy(values.copy() if not values.flags.writeable else np.ascontiguousarray(values))
    return values.reshape(-1, *t.shape[1:]) if len(t.shape) > 1 else values.reshape(t.shape)


def default_dtype(meta: dict[str, Any]) -> str:
    """float32 for an all-F32 file, else bfloat16 (what Qwen3.5 was trained in; fp16 activations can overflow)."""
    return "float32" if meta.get("general.file_type") == gguf.LlamaFileType.ALL_F32 else "bfloat16"


def load_gguf(
    path: str | Path, dtype: torch.dtype | str | None = None, progress: bool = True
) -> tuple[Qwen3_5ForCausalLM, ModelConfig, Tokenizer]:
    """A llama.cpp qwen35 / qwen35moe / qwen3 / qwen2 GGUF -> (model, config, tokenizer), every tensor dequantized
    to `dtype` (default: see `default_dtype`). Strict: a missing, unexpected or misshapen tensor is an error that
    names it."""
    path = Path(path)
    meta, stored = read_gguf(path)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    dtype = dtype or default_dtype(meta)
    if dtype not in DTYPES:
        raise QwenliteError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    config = config_from_gguf(meta, {n: t.shape for n, t in stored.items()}, dtype, path)
    tokenizer = tokenizer_from_gguf(meta, path)  # before the long part: a file we cannot tokenize for fails now
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    shapes = expected_shapes(model)
    wanted = _wanted(shapes, config)
    # Blocks past the text model's layers (up to block_count) are the multi-token-prediction head: load_gguf_mtp's.
    nextn = range(config.num_hidden_layers, _scalar(meta[f"{meta['general.architecture']}.block_count"]))
    _check_names(path, stored, wanted, lambda n: _block(n) in nextn)
    assemble(model, _read_state(path, stored, wanted, shapes, config, DTYPES[dtype], progress))
    return model, config, tokenizer


def load_gguf_mtp(
    path: str | Path, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> MTP | None:
    """The multi-token-prediction head of the GGUF at `path` (its tail block, see gguf_export), for the model
    `load_gguf` read from it (`config`), in `dtype` on `device`; None when the file has none. Strict, as load_gguf:
    a missing, unexpected or misshapen tensor of the block is an error that names it."""
    path = Path(path)
    meta, stored = read_gguf(path)
    if not nextn_layers(meta, path):
        return None
    with torch.device("meta"):
        head = MTP(config)
    shapes = {PREFIX + name: tuple(t.shape) for name, t in head.state_dict().items()}
    wanted = _wanted(shapes, config)
    _check_names(path, stored, wanted, lambda n: _block(n) < config.num_hidden_layers)
    state = _read_state(path, stored, wanted, shapes, config, torch.float32, progress=False)
    return assemble_mtp(config, state, dtype, device)


def _wanted(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> dict[str, list[str]]:
    """GGUF name -> ours: one, or a layer's experts in order."""
    wanted: dict[str, list[str]] = {}
    for name in sorted(shapes, key=lambda n: expert_index(n) or 0):
        wanted.setdefault(gguf_name(name, config.dense, config.num_hidden_layers), []).append(name)
    return wanted


def _check_names(path: Path, stored: dict[str, GGUFTensor], wanted: dict[str, list[str]], elsewhere) -> None:
    """Every wanted tensor stored, and nothing else but what `elsewhere(name)` leaves to another reader."""
    unexpected = sorted(n for n in stored if n not in wanted and not elsewhere(n))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]} in {path}")
    missing = sorted(n for n in wanted if n not in stored)
    if missing:
        raise CheckpointError(f"{path} is missing tensor {missing[0]} ({wanted[missing[0]][0]})")


def _read_state(
    path: Path,
    stored: dict[str, GGUFTensor],
    wanted: dict[str, list[str]],
    shapes: dict[str, tuple[int, ...]],
    config: ModelConfig,
    torch_dtype: torch.dtype,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Our tensors from the GGUF's `wanted` ones, shapes checked, dequantized, conventions undone, in `torch_dtype`."""
    state: dict[str, torch.Tensor] = {}
    total = sum(stored[g].n_bytes for g in wanted)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading GGUF", disable=not progress) as bar:
        for g, names in wanted.items():
            t, name = stored[g], names[0]
            shape, want = t.shape, shapes[name]
            stored_shape = (want[0], want[2]) if name.endswith("conv1d.weight") else want  # conv squeezed
            stacked = expert_index(name) is not None
            if stacked:
                stored_shape = (len(names), *want)
            if shape != stored_shape:
                raise CheckpointError(f"tensor {g} in {path} has shape {shape}, expected {stored_shape} for {name}")
            if name in ("model.embed_tokens.weight", "lm_head.weight"):  # large, and stored as they are
                out = torch.empty(want, dtype=torch_dtype)
                for r in range(0, want[0], ROW_CHUNK):
                    out[r : r + ROW_CHUNK] = dequantize_rows(t, slice(r, r + ROW_CHUNK))
            else:
                out = unconvert_tensor(name, dequantize_rows(t), config).to(torch_dtype)
            state.update(zip(names, out.unbind(0), strict=True) if stacked else [(name, out)])
            bar.update(t.n_bytes)
    return state


def _block(name: str) -> int:
    """The block index of a `blk.N.*` tensor; -1 for the others."""
    m = _BLOCK.fullmatch(name)
    return int(m.group(1)) if m else -1
