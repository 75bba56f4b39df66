"""Reading and writing checkpoints in the Hugging Face layout (config.json + sharded safetensors).

Tensors are memory-mapped: a checkpoint already in the requested dtype starts without copying a byte,
and a conversion holds one converted copy, never two. Loading is strict: every tensor the model needs
must be there with its shape, and nothing unexpected may be left over."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwenlite.config import DTYPES, ModelConfig, load_config
from qwenlite.errors import QwenliteError
from qwenlite.model import Qwen3_5ForCausalLM

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
    return {name: path for path in shards for name in _open(path).keys()}


def _open(path: Path):
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


def load_checkpoint(
    checkpoint_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Build the model described by `config.json` and fill it from the safetensors files, strictly."""
    root = Path(checkpoint_dir)
    config = load_config(root)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise QwenliteError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or config.torch_dtype
    # Values carry (file, stored name): sanitizing renames, reading needs the name as stored.
    files, mtp_files = sanitize({name: (path, name) for name, path in checkpoint_files(root).items()})
    if config.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice

    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    shapes = expected_shapes(model)
    missing = sorted(set(shapes) - set(files))
    if missing:
        raise QwenliteError(f"checkpoint {root} is missing tensor {missing[0]}" + _more(missing))
    unexpected = sorted(set(files) - set(shapes))
    if unexpected:
        name = unexpected[0]
        raise QwenliteError(f"unexpected tensor {name} in {files[name][0]}" + _more(unexpected))

    handles = {path: _open(path) for path, _ in (*files.values(), *mtp_files.values())}
    state: dict[str, torch.Tensor] = {}
    for name, (path, stored) in files.items():
        tensor = _get(handles[path], stored, path)
        if tuple(tensor.shape) != shapes[name]:
            raise QwenliteError(
                f"tensor {name} in {path} has shape {tuple(tensor.shape)}, expected {shapes[name]} from config.json"
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
    mtp = {name: _get(handles[path], stored, path) for name, (path, stored) in mtp_files.items()}
    return Checkpoint(model=model, config=config, path=root, mtp=mtp)


def _get(handle, name: str, path: Path) -> torch.Tensor:
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
    """Write config.json and safetensors shards (with an index when there are several), each atomically,
    in the flat `Qwen3_5ForCausalLM` layout that transformers and qwenlite both load."""
    out = Path(out_dir)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    tensors.update(extra_tensors or {})
    shards = _plan_shards(tensors.items(), max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, name in zip(shards, names, strict=True):
        atomic_write(out / name, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {k: name for shard, name in zip(shards, names, strict=True) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    config = model.config.to_dict()
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def _plan_shards(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards
