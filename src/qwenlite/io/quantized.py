"""Quantized checkpoints: the quantized model's state dict (model/quantized.py) on disk, and quantization on load.

`quantize_checkpoint` writes it into a temporary directory renamed when complete, with a `quantization_config`
block in config.json; `load_and_quantize` keeps the same tensors in memory instead (`--quant` on a Hugging Face
checkpoint). Both read the unquantized checkpoint through one stream (`quantize_tensors` over
`io.checkpoint.stream_tensors`): one tensor read, quantized and let go at a time, so that the peak is the
quantized model plus the largest unquantized tensor, never the whole unquantized model. `load_quantized` builds
the swapped model on the meta device and assigns the memory-mapped tensors of a quantized checkpoint to it,
converting nothing when the dtype is the stored one.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qwenlite.config import ModelConfig, load_config, resolve_dtype
from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io.checkpoint import (
    ALIGN,
    Checkpoint,
    Stored,
    TensorSource,
    assemble,
    copy_side_files,
    expected_shapes,
    load_vision,
    match_tensors,
    match_vision,
    read_mtp,
    read_tensors,
    stream_tensors,
    write_checkpoint,
)
from qwenlite.model.quantized import FORMATS, QuantLinear, quantize_model_empty, resolve_group_size
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM

QUANT_METHOD = "qwenlite"


def quantization_config(bits: int, group_size: int | None) -> dict:
    return {"quant_method": QUANT_METHOD, "format": FORMATS[bits], "bits": bits, "group_size": group_size,
            "symmetric": bits == 8, "modules": "every Linear and the embedding (a tied head shares it)"}  # fmt: skip


def _quantized_names(model: Qwen3_5ForCausalLM) -> set[str]:
    names = {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    return names | {"model.embed_tokens.weight"}


@dataclasses.dataclass
class _Source:
    """An unquantized checkpoint about to be quantized: checked (names, shapes, group sizes) before any tensor
    is read."""

    config: ModelConfig
    model: Qwen3_5ForCausalLM  # on the meta device, unquantized
    shapes: dict[str, tuple[int, ...]]
    files: dict[str, Stored]
    mtp_files: dict[str, Stored]
    vision_files: dict[str, TensorSource]  # the tower's (`visual.*`), written unquantized; empty without one
    vision_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, root: Path, bits: int, group_size: int | None) -> _Source:
        config = load_config(root)
        if "quantization_config" in config.extra:
            raise QwenliteError(f"{root} is already quantized ({config.extra['quantization_config']})")
        with torch.device("meta"):
            model = Qwen3_5ForCausalLM(config)
        shapes = expected_shapes(model)
        for name in _quantized_names(model) & set(shapes):
            resolve_group_size(bits, group_size, shapes[name][1])  # fail before reading anything
        files, mtp_files = match_tensors(root, shapes, config)
        return cls(config, model, shapes, files, mtp_files, *match_vision(root, config))


def quantize_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantized: set[str],
    bits: int,
    group_size: int | None,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, unquantized tensor) pairs -> the quantized model's state dict entries, one tensor at a time: the
    `quantized` names as `*.qweight` and `*.scales` / `*.scales_and_zeros`, the rest converted to `dtype`. Every
    tensor yielded is a new one on `device`, its own memory (not a view of a memory map). A source in another
    dtype than `dtype` costs one converted copy of the tensor at hand."""
    for name, t in tensors:
        if name in quantized:
            layer = QuantLinear.from_weight(t.to(device=device, dtype=dtype), bits, group_size)
            prefix = name.removesuffix(".weight")
            yield f"{prefix}.qweight", layer.qweight
            yield f"{prefix}.{'scales' if bits == 8 else 'scales_and_zeros'}", layer.scale_tensor
        else:
            yield name, t.to(device=device, dtype=dtype, copy=True)


def quantize_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    bits: int,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint at `checkpoint_dir` quantized to `out_dir`: safetensors with `*.qweight` and
    `*.scales` / `*.scales_and_zeros` for every Linear and the embedding, the other tensors (and the vision
    tower and MTP head, where the checkpoint has them) in `dtype` (default: the checkpoint's), config.json with a
    `quantization_config` block, tokenizer, generation and preprocessor files copied. Reads and quantizes one
    tensor at a time (memory: one output shard, at most 2 GiB, plus the largest unquantized tensor); `out_dir`
    appears only when complete."""
    root, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QwenliteError(f"{out} already exists and is not empty")
    src = _Source.open(root, bits, group_size)
    dtype = dtype or src.config.torch_dtype
    qconfig = dataclasses.replace(
        src.config, dtype=str(dtype).removeprefix("torch."),
        extra={**src.config.extra, "quantization_config": quantization_config(bits, group_size)},
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        read = itertools.chain(
            stream_tensors(src.files, src.shapes),
            stream_tensors(src.vision_files, src.vision_shapes),
            stream_tensors(src.mtp_files),
        )
        total = len(src.files) + len(src.vision_files) + len(src.mtp_files)
        with tqdm(read, total=total, unit="tensor", desc=f"quantizing to int{bits}", disable=not progress) as bar:
            tensors = quantize_tensors(bar, _quantized_names(src.model), bits, group_size, dtype)
            write_checkpoint(qconfig, tmp, tensors, dtype, max_shard_bytes=2 << 30, multimodal=bool(src.vision_files))
        copy_side_files(root, tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_and_quantize(
    checkpoint_dir: str | Path,
    bits: int,
    group_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Checkpoint:
    """A Hugging Face checkpoint quantized as it is read: what `quantize_model(load_checkpoint(...).model)`
    gives, built from the stream `quantize_checkpoint` writes, without ever holding the unquantized model. The
    MTP head stays memory-mapped, as `load_checkpoint` leaves it. Progress shows on a terminal only."""
    root = Path(checkpoint_dir)
    src = _Source.open(root, bits, group_size)
    dtype = resolve_dtype(dtype, src.config)
    quantized = _quantized_names(src.model)
    model = quantize_model_empty(src.model, bits, group_size, dtype)
    read = stream_tensors(src.files, src.shapes)
    desc = f"quantizing to int{bits}"
    with tqdm(read, total=len(src.files), unit="tensor", desc=desc, disable=None if progress else True) as bar:
        state = dict(quantize_tensors(bar, quantized, bits, group_size, dtype, device))
    return Checkpoint(assemble(model, state, device), src.config, root, read_mtp(src.mtp_files))


def read_quantization_config(config: ModelConfig, where: Path) -> tuple[int, int | None] | None:
    """(bits, group_size) from config.json's quantization_config, None when there is none; errors when it is
    not one qwenlite wrote."""
    qc = config.extra.get("quantization_config")
    if qc is None:
        return None
    bits = qc.get("bits") if isinstance(qc, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMATS.get(bits):
        raise CheckpointError(f"{where}/config.json: quantization_config {qc} is not a qwenlite int8/int4 checkpoint")
    group_size = qc.get("group_size")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise CheckpointError(f"{where}/config.json: bad group_size {group_size!r} in quantization_config")
    return bits, group_size


def is_quantized_checkpoint(checkpoint_dir: str | Path) -> bool:
    return read_quantization_config(load_config(checkpoint_dir), Path(checkpoint_dir)) is not None


def load_quantized(
    checkpoint_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """A checkpoint written by `quantize_checkpoint`, memory-mapped: the packed weights are used in place, and
    so is everything else when `dtype` is the stored one (otherwise scales and small tensors are converted). Its
    vision tower, where it has one, comes unquantized as `load_vision` reads it."""
    root = Path(checkpoint_dir)
    config = load_config(root)
    found = read_quantization_config(config, root)
    if found is None:
        raise CheckpointError(f"{root} is not a quantized checkpoint (no quantization_config in config.json)")
    bits, group_size = found
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    try:
        quantize_model_empty(model, bits, group_size, dtype)
    except QwenliteError as e:
        raise CheckpointError(f"{root}: {e}") from None
    shapes = expected_shapes(model)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    files, mtp_files = match_tensors(root, shapes, config)
    state = {}
    for name, t in read_tensors(files, shapes):
        want = dtypes[name]
        if want in (torch.int8, torch.uint8):
            if t.dtype != want:
                raise CheckpointError(f"tensor {name} in {root} is {t.dtype}, expected {want} for int{bits}")
            # A file not written by save_aligned: an aligned copy keeps the int8 kernel usable (see there).
            state[name] = t.to(device) if t.data_ptr() % ALIGN == 0 else t.clone()
        else:
            state[name] = t.to(device=device, dtype=dtype)
    model = assemble(model, state, device)
    model.visual = load_vision(root, config, dtype, device)
    return Checkpoint(model, config, root, read_mtp(mtp_files))
