"""Reading and writing checkpoints in the Hugging Face layout (config.json + sharded safetensors).

Tensors are memory-mapped: a checkpoint already in the requested dtype starts without copying a byte,
and a conversion holds one converted copy, never two. Loading is strict: every tensor the model needs
must be there with its shape, and nothing unexpected may be left over."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from qwenlite.config import ModelConfig, load_config, resolve_dtype
from qwenlite.errors import QwenliteError
from qwenlite.model import Qwen3_5ForCausalLM, initial_value

INDEX_FILE = "model.safetensors.index.json"
V = TypeVar("V")


def sanitize(tensors: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V]]:
    """Raw checkpoint names -> (our text-model names, MTP head names). Pure and idempotent.

    `Qwen3_5ForConditionalGeneration` keeps the text model under `model.language_model.`, a vision tower
    under `model.visual.` (skipped: qwenlite is text-only) and the multi-token-prediction head under `mtp.`
    (returned apart, for speculative decoding)."""
    text: dict[str, V] = {}
    mtp: dict[str, V] = {}
    for name, value in tensors.items():
        if name.startswith(("model.visual.", "visual.")):
            continue
        if name.startswith("mtp."):
            mtp[name] = value
            continue
        if name.startswith("model.language_model."):
            name = "model." + name.removeprefix("model.language_model.")
        text[name] = value
    return text, mtp


def checkpoint_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the shard index or by reading the headers."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QwenliteError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: root / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise QwenliteError(f"{index} lists {path.name}, which is missing from {root}")
        return files
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise QwenliteError(f"no *.safetensors weight files in {root}")
    return {name: path for path in shards for name in open_safetensors(path).keys()}


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise QwenliteError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None


@dataclass
class Checkpoint:
    model: Qwen3_5ForCausalLM
    config: ModelConfig
    path: Path
    mtp: dict[str, torch.Tensor] = field(default_factory=dict)  # multi-token-prediction head, memory-mapped


def expected_shapes(model: Qwen3_5ForCausalLM) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


TensorSource = tuple[Path, str]  # (file, name as stored there)


def match_tensors(
    root: Path, shapes: Mapping[str, tuple[int, ...]], tied: bool
) -> tuple[dict[str, TensorSource], dict[str, TensorSource]]:
    """Where each tensor the model needs is stored, strictly: a missing or unexpected tensor is an error that
    names it. Returns (model tensors, MTP head tensors), keyed by our names."""
    # Values carry (file, stored name): sanitizing renames, reading needs the name as stored.
    files, mtp_files = sanitize({name: (path, name) for name, path in checkpoint_files(root).items()})
    if tied:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    missing = sorted(set(shapes) - set(files))
    if missing:
        raise QwenliteError(f"checkpoint {root} is missing tensor {missing[0]}" + _more(missing))
    unexpected = sorted(set(files) - set(shapes))
    if unexpected:
        path, stored = files[unexpected[0]]
        raise QwenliteError(f"unexpected tensor {stored} in {path}" + _more(unexpected))
    return files, mtp_files


def load_checkpoint(
    checkpoint_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Build the model described by `config.json` and fill it from the safetensors files, strictly."""
    root = Path(checkpoint_dir)
    config = load_config(root)
    if "quantization_config" in config.extra:  # written by `qwenlite quantize`
        from qwenlite.quant import load_quantized

        return load_quantized(root, dtype, device)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    shapes = expected_shapes(model)
    files, mtp_files = match_tensors(root, shapes, config.tie_word_embeddings)

    handles = {path: open_safetensors(path) for path, _ in (*files.values(), *mtp_files.values())}
    state: dict[str, torch.Tensor] = {}
    for name, (path, stored) in files.items():
        tensor = read_tensor(handles[path], stored, path)
        if tuple(tensor.shape) != shapes[name]:
            raise QwenliteError(
                f"tensor {stored} in {path} has shape {tuple(tensor.shape)}, expected {shapes[name]} from config.json"
            )
        # One dtype for every tensor, as the reference; forward does norms and gates in fp32.
        state[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.init_rope(device)
    model.eval()
    mtp = {name: read_tensor(handles[path], stored, path) for name, (path, stored) in mtp_files.items()}
    return Checkpoint(model=model, config=config, path=root, mtp=mtp)


def read_tensor(handle, name: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise QwenliteError(f"cannot read tensor {name} from {path}: {e}") from None


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    model: Qwen3_5ForCausalLM,
    out_dir: str | Path,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write config.json and safetensors shards in the flat `Qwen3_5ForCausalLM` layout that transformers
    and qwenlite both load."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    tensors.update(extra_tensors or {})
    dtype = next(iter(tensors.values())).dtype
    write_checkpoint(model.config, out_dir, tensors.items(), dtype, max_shard_bytes)


def write_checkpoint(
    config: ModelConfig,
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int = 4 << 30,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream (name, tensor) pairs into shards of at most `max_shard_bytes`, each written atomically, then
    the index (when there are several) and config.json. Holds one shard in memory at a time."""
    out = Path(out_dir)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_paths: list[Path] = []
    total = 0

    def flush() -> None:
        path = out / f"model-{len(shard_paths) + 1:05d}.safetensors"
        atomic_write(path, lambda p: save_file(shard, str(p), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, path.name))
        shard_paths.append(path)
        shard.clear()

    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shard and size + n > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += n
        total += n
        if progress:
            progress(n)
    flush()
    # Final names follow the Hugging Face convention, which needs the shard count.
    names = (
        ["model.safetensors"]
        if len(shard_paths) == 1
        else [f"model-{i + 1:05d}-of-{len(shard_paths):05d}.safetensors" for i in range(len(shard_paths))]
    )
    renamed = {p.name: name for p, name in zip(shard_paths, names, strict=True)}
    for p, name in zip(shard_paths, names, strict=True):
        os.replace(p, out / name)
    if len(shard_paths) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    config_dict = config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config_dict, indent=2)))


def write_random_checkpoint(
    config: ModelConfig, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> None:
    """A checkpoint with the real shapes and random weights (the model's documented initialisation), made
    one tensor at a time so that a 9B checkpoint needs no more memory than one shard."""
    with torch.device("meta"):
        shapes = expected_shapes(Qwen3_5ForCausalLM(config))
    generator = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in shapes.values()) * torch.finfo(dtype).bits // 8
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing random weights") as bar:
        items = ((name, initial_value(name, shape, generator).to(dtype)) for name, shape in shapes.items())
        write_checkpoint(config, out_dir, items, dtype, max_shard_bytes=2 << 30, progress=bar.update)
