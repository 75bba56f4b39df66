"""Weight-only quantization as a module swap on a built model (gpt-fast style), and quantized checkpoints.

`quantize_model(model, bits)` replaces every nn.Linear (all projections and the head) by a `QuantLinear` and the
embedding by a `QuantEmbedding` that dequantizes only the rows it looks up; a tied head is quantized once and
shares its tensors with the embedding. Norms, the conv, A_log and dt_bias stay as they are. Formats (see
ops/quant_matmul.py): int8 symmetric, one scale per output channel by default (the layout torch's int8 kernel
takes; a group size makes it group-wise, on the reference path); int4 asymmetric, group 128 by default.

Module buffers are named as the checkpoint's tensors (`model.layers.0.mlp.up_proj.qweight`, `.scales` /
`.scales_and_zeros`), so a quantized checkpoint is the quantized model's state dict: `quantize_checkpoint` writes
it (streaming, one tensor at a time, into a temporary directory renamed when complete) with a
`quantization_config` block in config.json, and `load_quantized` builds the swapped model on the meta device and
assigns the memory-mapped tensors to it, converting nothing when the dtype is the stored one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qwenlite.config import DTYPES, ModelConfig, load_config, resolve_dtype
from qwenlite.errors import QwenliteError
from qwenlite.model import Qwen3_5ForCausalLM
from qwenlite.ops import kernels
from qwenlite.ops import quant_matmul as qm
from qwenlite.weights import INDEX_FILE, Checkpoint, expected_shapes, match_tensors, open_safetensors, read_tensor

QUANT_METHOD = "qwenlite"
FORMATS = {8: "int8-symmetric", 4: "int4-asymmetric-tiled64"}
DEFAULT_GROUP_SIZE = {8: None, 4: 128}  # None: one group per output channel
QUANT_CHOICES = {"int8": 8, "int4": 4}


def resolve_group_size(bits: int, group_size: int | None, in_features: int) -> int:
    if bits not in FORMATS:
        raise QwenliteError(f"bits must be 4 or 8, got {bits}")
    group_size = group_size or DEFAULT_GROUP_SIZE[bits] or in_features
    if bits == 4 and group_size not in qm.INT4_GROUP_SIZES:
        raise QwenliteError(f"int4 group size must be one of {qm.INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise QwenliteError(
            f"a layer with {in_features} inputs cannot be split into groups of {group_size}: "
            "choose a group size that divides every layer's input size"
        )
    return group_size


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 (`qweight` (N, K), `scales` (N, K/G)) or int4 (`qweight` tiled64
    (Np/64, K, 32), `scales_and_zeros` (K/G, Np, 2)); the scales' dtype is the compute dtype. `fast` selects
    qwenlite's kernels (ops/kernels.py), else torch's, where they apply; False forces the pure-torch reference."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None, bias: bool = False):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = resolve_group_size(bits, group_size, in_features)
        self.fast = True
        self._kernel_weight: torch.Tensor | None = None  # int4 in the kernel's layout; a view where it is tiled64
        N, K, G = out_features, in_features, self.group_size
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, K // G, dtype=dtype, device=device))
        else:
            Np = qm.padded_rows(N)
            tiled = (Np // qm.TILE, K, qm.TILE // 2)
            self.register_buffer("qweight", torch.empty(tiled, dtype=torch.uint8, device=device))
            self.register_buffer("scales_and_zeros", torch.empty(K // G, Np, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int | None = None,
                    bias: torch.Tensor | None = None) -> QuantLinear:  # fmt: skip
        N, K = weight.shape
        layer = cls(K, N, bits, group_size, weight.dtype, "meta", bias is not None)
        layer.set_weight(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (N, K) into this layer's buffers (compute dtype = the scales' dtype)."""
        dtype = self.scale_tensor.dtype
        if self.bits == 8:
            self.qweight, self.scales = qm.quantize_int8(weight, self.group_size, dtype)
        else:
            self.qweight, self.scales_and_zeros = qm.quantize_int4(weight, self.group_size, dtype)
        self._kernel_weight = None

    @property
    def scale_tensor(self) -> torch.Tensor:
        return self.scales if self.bits == 8 else self.scales_and_zeros

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) fp32: what this layer multiplies by."""
        if self.bits == 8:
            return qm.dequantize_int8(self.qweight, self.scales)
        return qm.dequantize_int4(self.qweight, self.scales_and_zeros)[: self.out_features]

    def _apply(self, fn, recurse=True):
        self._kernel_weight = None  # .to() / .float() move the buffers: the kernel view must follow
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.bits == 8:
            if self.fast and kernels.int8_ok(x2, self.qweight, self.scales):
                y = kernels.int8_matmul(x2, self.qweight, self.scales)
            elif self.fast and qm.int8_fast_ok(x2, self.qweight, self.scales):
                y = qm.int8_matmul_fast(x2, self.qweight, self.scales)
            else:
                y = qm.int8_matmul_ref(x2, self.qweight, self.scales)
        elif self.fast and kernels.int4_ok(x2, self.qweight, self.scales_and_zeros, self.group_size):
            y = kernels.int4_matmul(x2, self.qweight, self.scales_and_zeros, self.group_size, self.out_features)
        elif self.fast and qm.int4_fast_ok(x2, self.scales_and_zeros, self.group_size):
            if self._kernel_weight is None:
                self._kernel_weight = qm.int4_kernel_weight(self.qweight)
            y = qm.int4_matmul_fast(x2, self._kernel_weight, self.scales_and_zeros, self.group_size, self.out_features)
        else:
            y = qm.int4_matmul_ref(x2, self.qweight, self.scales_and_zeros, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def kernel_fields(self) -> list[int] | None:
        """This projection for kernels.decode_step, or None where no kernel takes it."""
        N, K, G = self.out_features, self.in_features, self.group_size
        s = self.scale_tensor
        if not self.fast or self.bias is not None or s.dtype not in kernels.ACT_DTYPES or G % 16:
            return None
        if not (self.qweight.is_contiguous() and s.is_contiguous() and s.device.type == "cpu"):
            return None
        fmt = kernels.FMT_INT8 if self.bits == 8 else kernels.FMT_INT4
        Np = N if self.bits == 8 else qm.padded_rows(N)
        return [fmt, self.qweight.data_ptr(), s.data_ptr(), int(s.dtype == torch.bfloat16), G, N, Np, K]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, fast={self.fast}"  # fmt: skip


class QuantEmbedding(nn.Module):
    """Embedding lookup from the same storage as a QuantLinear (rows = tokens): only the looked-up rows are
    dequantized. A tied head and this module hold the very same tensors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        # Borrow QuantLinear's buffer layout: an (N = vocab, K = hidden) matrix.
        layout = QuantLinear(embedding_dim, num_embeddings, bits, group_size, dtype, device)
        self.num_embeddings, self.embedding_dim, self.bits, self.group_size = (
            num_embeddings, embedding_dim, bits, layout.group_size)  # fmt: skip
        self.register_buffer("qweight", layout.qweight)
        self.register_buffer("scales" if bits == 8 else "scales_and_zeros", layout.scale_tensor)

    @classmethod
    def sharing(cls, head: QuantLinear) -> QuantEmbedding:
        emb = cls(head.out_features, head.in_features, head.bits, head.group_size, head.scale_tensor.dtype, "meta")
        emb.share(head)
        return emb

    def share(self, head: QuantLinear) -> None:
        self.qweight = head.qweight
        if self.bits == 8:
            self.scales = head.scales
        else:
            self.scales_and_zeros = head.scales_and_zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return qm.int8_rows(self.qweight, self.scales, ids, self.scales.dtype)
        return qm.int4_rows(self.qweight, self.scales_and_zeros, ids, self.scales_and_zeros.dtype)


# ---------------------------------------------------------------------------------------------
# The module swap


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]  # fmt: skip


@torch.no_grad()
def quantize_model(model: Qwen3_5ForCausalLM, bits: int = 8, group_size: int | None = None) -> Qwen3_5ForCausalLM:
    """Swap every nn.Linear for a QuantLinear and the embedding for a QuantEmbedding, in place, quantizing the
    current weights (one layer at a time, so the extra memory is one layer's fp32 copy). Returns the model."""
    embed = model.model.embed_tokens
    if not isinstance(embed, nn.Embedding):
        raise QwenliteError("this model is already quantized")
    tied = model.lm_head.weight is embed.weight
    for parent, name, linear in _linears(model):
        setattr(parent, name, QuantLinear.from_weight(linear.weight, bits, group_size, linear.bias))
    if tied:
        model.model.embed_tokens = QuantEmbedding.sharing(model.lm_head)
    else:
        head = QuantLinear.from_weight(embed.weight, bits, group_size)
        model.model.embed_tokens = QuantEmbedding.sharing(head)
    # The tensors left (norms, conv, A_log, dt_bias: a few MB) may be views of a memory-mapped checkpoint, which
    # keeps the whole file mapped and every page quantization read resident: own copies let the mapping go.
    for module in model.modules():
        if not isinstance(module, QuantLinear | QuantEmbedding):
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()
    return model


def quantize_model_empty(model: Qwen3_5ForCausalLM, bits: int, group_size: int | None,
                         dtype: torch.dtype) -> Qwen3_5ForCausalLM:  # fmt: skip
    """The same swap on a meta-device model, with empty buffers to assign a quantized checkpoint's tensors to."""
    for parent, name, linear in _linears(model):
        layer = QuantLinear(linear.in_features, linear.out_features, bits, group_size, dtype, "meta",
                            linear.bias is not None)  # fmt: skip
        setattr(parent, name, layer)
    c = model.config
    model.model.embed_tokens = QuantEmbedding(c.vocab_size, c.hidden_size, bits, group_size, dtype, "meta")
    return model


def apply_quant(model: Qwen3_5ForCausalLM, quant: str | None) -> Qwen3_5ForCausalLM:
    """`--quant int8|int4` on run/chat/serve: quantize a loaded model in place (None or "none": as is)."""
    if quant in (None, "none"):
        return model
    if quant not in QUANT_CHOICES:
        raise QwenliteError(f"unknown quantization {quant!r}; choose from {', '.join(QUANT_CHOICES)}")
    return quantize_model(model, QUANT_CHOICES[quant])


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints

# Files a checkpoint directory carries besides its weights; copied as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")  # fmt: skip


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.bool: "BOOL"}  # fmt: skip
ALIGN = 64


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors start 64-byte aligned in the file, and so in its memory map, whenever the
    sizes before them allow (tensors of a multiple of 64 bytes, every real packed weight, come first).
    safetensors' own writer aligns to 8 bytes only, and torch 2.13's int8 kernel crashes on a weight that is not
    16-byte aligned once M >= 4 (measured)."""
    # Then the rest, widest dtype first, so that each still starts aligned to its element size.
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGN != 0, -tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)  # safetensors pads its header with spaces too
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in order:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())


def write_aligned_checkpoint(
    config: ModelConfig, out: Path, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
    max_shard_bytes: int = 2 << 30,
) -> None:  # fmt: skip
    """weights.write_checkpoint's layout (shards, index, config.json) in `save_aligned` files, holding one shard in
    memory; `out` is a fresh directory the caller renames when complete, so no file needs an atomic write."""
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        path = out / f"shard-{len(written) + 1:05d}.safetensors"
        save_aligned(shard, path, {"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, t in tensors:
        if shard and sum(v.nbytes for v in shard.values()) + t.nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        total += t.nbytes
    flush()
    n = len(written)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (path, _), name in zip(written, final, strict=True):
        path.rename(out / name)
    if n > 1:
        weight_map = {t: name for (_, names), name in zip(written, final, strict=True) for t in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config_dict = config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))


def quantization_config(bits: int, group_size: int | None) -> dict:
    return {"quant_method": QUANT_METHOD, "format": FORMATS[bits], "bits": bits, "group_size": group_size,
            "symmetric": bits == 8, "modules": "every Linear and the embedding (a tied head shares it)"}  # fmt: skip


def _quantized_names(model: Qwen3_5ForCausalLM) -> set[str]:
    names = {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    return names | {"model.embed_tokens.weight"}


def quantize_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint at `checkpoint_dir` quantized to `out_dir`: safetensors with `*.qweight` and
    `*.scales` / `*.scales_and_zeros` for every Linear and the embedding, the other tensors (and the MTP head)
    in `dtype` (default: the checkpoint's), config.json with a `quantization_config` block, tokenizer and
    generation files copied. Reads and quantizes one tensor at a time; `out_dir` appears only when complete."""
    root, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QwenliteError(f"{out} already exists and is not empty")
    config = load_config(root)
    if "quantization_config" in config.extra:
        raise QwenliteError(f"{root} is already quantized ({config.extra['quantization_config']})")
    dtype = dtype or config.torch_dtype
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    shapes = expected_shapes(model)
    for name in _quantized_names(model) & set(shapes):
        resolve_group_size(bits, group_size, shapes[name][1])  # fail before writing anything
    files, mtp_files = match_tensors(root, shapes, config.tie_word_embeddings)
    quantized = _quantized_names(model)
    qconfig = dataclasses.replace(
        config, dtype=str(dtype).removeprefix("torch."),
        extra={**config.extra, "quantization_config": quantization_config(bits, group_size)},
    )  # fmt: skip

    def tensors(bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
        handles = {}
        for name, (path, stored) in [*files.items(), *mtp_files.items()]:
            if path not in handles:
                handles[path] = open_safetensors(path)
            t = read_tensor(handles[path], stored, path)
            if name in quantized:
                layer = QuantLinear.from_weight(t.to(dtype), bits, group_size)
                prefix = name.removesuffix(".weight")
                yield f"{prefix}.qweight", layer.qweight
                yield f"{prefix}.{'scales' if bits == 8 else 'scales_and_zeros'}", layer.scale_tensor
            else:
                yield name, t.to(dtype).contiguous()
            bar.update(1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        desc = f"quantizing to int{bits}"
        with tqdm(total=len(files) + len(mtp_files), unit="tensor", desc=desc, disable=not progress) as bar:
            write_aligned_checkpoint(qconfig, tmp, tensors(bar), dtype)
        for name in SIDE_FILES:
            if (root / name).is_file():
                shutil.copy(root / name, tmp / name)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quantization_config(config: ModelConfig, where: Path) -> tuple[int, int | None] | None:
    """(bits, group_size) from config.json's quantization_config, None when there is none; errors when it is
    not one qwenlite wrote."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    bits = qc.get("bits") if isinstance(qc, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMATS.get(bits):
        raise QwenliteError(f"{where}/config.json: quantization_config {qc} is not a qwenlite int8/int4 checkpoint")
    group_size = qc.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise QwenliteError(f"{where}/config.json: bad group_size {group_size!r} in quantization_config")
    return bits, group_size


def is_quantized_checkpoint(checkpoint_dir: str | Path) -> bool:
    return read_quantization_config(load_config(checkpoint_dir), Path(checkpoint_dir)) is not None


def load_quantized(
    checkpoint_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """A checkpoint written by `quantize_checkpoint`, memory-mapped: the packed weights are used in place, and
    so is everything else when `dtype` is the stored one (otherwise scales and small tensors are converted)."""
    root = Path(checkpoint_dir)
    config = load_config(root)
    found = read_quantization_config(config, root)
    if found is None:
        raise QwenliteError(f"{root} is not a quantized checkpoint (no quantization_config in config.json)")
    bits, group_size = found
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    try:
        quantize_model_empty(model, bits, group_size, dtype)
    except QwenliteError as e:
        raise QwenliteError(f"{root}: {e}") from None
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    files, mtp_files = match_tensors(root, {k: tuple(v.shape) for k, v in expected.items()}, config.tie_word_embeddings)

    handles = {path: open_safetensors(path) for path, _ in (*files.values(), *mtp_files.values())}
    state = {}
    for name, (path, stored) in files.items():
        t = read_tensor(handles[path], stored, path)
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise QwenliteError(f"tensor {stored} in {path} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if want.dtype in (torch.int8, torch.uint8):
            if t.dtype != want.dtype:
                raise QwenliteError(f"tensor {stored} in {path} is {t.dtype}, expected {want.dtype} for int{bits}")
            # A file not written by save_aligned: an aligned copy keeps the int8 kernel usable (see there).
            state[name] = t.to(device) if t.data_ptr() % ALIGN == 0 else t.clone()
        else:
            state[name] = t.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:  # the head is the embedding's storage
        state |= {f"lm_head.{k.rpartition('.')[2]}": v for k, v in state.items() if k.startswith("model.embed_tokens.")}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.init_rope(device)
    model.eval()
    mtp = {name: read_tensor(handles[path], stored, path) for name, (path, stored) in mtp_files.items()}
    return Checkpoint(model=model, config=config, path=root, mtp=mtp)


# ---------------------------------------------------------------------------------------------
# CLI


def add_quantize_command(subparsers) -> argparse.ArgumentParser:
    """`qwenlite quantize MODEL OUT --bits 4|8 [--group-size G]`."""
    p = subparsers.add_parser(
        "quantize",
        help="write an int8 or int4 weight-only quantized checkpoint",
        description="Quantize every linear layer and the embedding of MODEL and write the result to OUT, "
        "a checkpoint that `qwenlite run OUT` loads memory-mapped.",
    )
    p.add_argument("model", help="checkpoint directory or hub id")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True)
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale (default: int8 one per output channel, int4 128)")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="dtype of the scales and unquantized tensors (default: the checkpoint's)")  # fmt: skip
    p.set_defaults(func=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from qwenlite.hub import resolve_model_path

    dtype = DTYPES[args.dtype] if args.dtype else None
    out = quantize_checkpoint(resolve_model_path(args.model), args.out, args.bits, args.group_size, dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0
