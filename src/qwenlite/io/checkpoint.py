"""Reading and writing checkpoints in the Hugging Face layout (config.json + sharded safetensors).

Tensors are memory-mapped: a checkpoint already in the requested dtype starts without copying a byte,
and a conversion holds one converted copy, never two. Loading is strict: every tensor the model needs
must be there with its shape, and nothing unexpected may be left over."""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from qwenlite.config import ModelConfig, load_config, resolve_dtype
from qwenlite.errors import CheckpointError
from qwenlite.io.files import atomic_write
from qwenlite.model.mtp import MTP, PREFIX
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, initial_value
from qwenlite.model.versions import weights_changed
from qwenlite.model.vision import VisionModel

INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint directory carries besides its weights (tokenizer, template, sampling defaults, image and video
# preprocessing), copied as they are into every checkpoint made from it.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "preprocessor_config.json", "video_preprocessor_config.json")  # fmt: skip
V = TypeVar("V")


# A fused expert tensor of transformers' in-memory layout (`save_pretrained(save_original_format=False)` writes it):
# `mlp.experts.gate_up_proj` (E, 2I, H) holds each expert's gate rows then its up rows, `mlp.experts.down_proj`
# (E, H, I) each expert's down_proj. Ours: one module per expert; the parts are views, no copy.
FUSED_EXPERTS = {"gate_up_proj": (("gate_proj", 0), ("up_proj", 1)), "down_proj": (("down_proj", None),)}


@dataclass(frozen=True)
class Part(Generic[V]):
    """Expert `expert`'s share of a fused expert tensor stored as `source`: its gate (half 0) or up (half 1) rows of
    gate_up_proj, or (half None) its whole down_proj. `experts` is the count config.json gives."""

    source: V
    expert: int
    half: int | None
    experts: int

    def take(self, fused: torch.Tensor, where: str) -> torch.Tensor:
        """This part of the fused tensor, a view of it; the fused tensor's expert count checked."""
        if fused.dim() != 3 or fused.shape[0] != self.experts:
            raise CheckpointError(
                f"fused expert tensor {where} has shape {tuple(fused.shape)}, expected {self.experts} experts "
                "(num_experts in config.json) first"
            )
        t = fused[self.expert]
        return t if self.half is None else t.chunk(2, dim=0)[self.half]


def sanitize(
    tensors: Mapping[str, V], num_experts: int = 0, vision: bool = False
) -> tuple[dict[str, V | Part[V]], dict[str, V]]:
    """Raw checkpoint names -> (our model's names, MTP head names). Pure and idempotent.

    `Qwen3_5ForConditionalGeneration` keeps the text model under `model.language_model.`, a vision tower
    under `model.visual.` (ours `visual.` with `vision`, else skipped) and the multi-token-prediction head under
    `mtp.` (returned apart, for speculative decoding). A MoE model (`num_experts` > 0) stored with fused expert tensors
    gets one `Part` per expert and projection, named as the per-expert layout stores it."""
    text: dict[str, V | Part[V]] = {}
    mtp: dict[str, V | Part[V]] = {}
    for name, value in tensors.items():
        if name.startswith(("model.visual.", "visual.")):
            if vision:
                text["visual." + name.removeprefix("model.").removeprefix("visual.")] = value
            continue
        into = mtp if name.startswith("mtp.") else text  # the MTP head's MoE layer is stored as the model's
        if name.startswith("model.language_model."):
            name = "model." + name.removeprefix("model.language_model.")
        experts, _, last = name.rpartition(".")
        if num_experts and experts.endswith(".mlp.experts") and last in FUSED_EXPERTS:
            for e in range(num_experts):
                for projection, half in FUSED_EXPERTS[last]:
                    into[f"{experts}.{e}.{projection}.weight"] = Part(value, e, half, num_experts)
            continue
        into[name] = value
    return text, mtp


def checkpoint_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the shard index or by reading the headers."""
    root = Path(checkpoint_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: root / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{index} lists {path.name}, which is missing from {root}")
        return files
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors weight files in {root}")
    return {name: path for path in shards for name in open_safetensors(path).keys()}


def open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None


@dataclass
class Checkpoint:
    model: Qwen3_5ForCausalLM
    config: ModelConfig
    path: Path
    mtp: dict[str, torch.Tensor] = field(default_factory=dict)  # multi-token-prediction head, memory-mapped


def expected_shapes(model: Qwen3_5ForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `model` stores, by our name: a tied head is the embedding's, stored once."""
    tied = model.config.tie_word_embeddings
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return {name: shape for name, shape in shapes.items() if not (tied and name.startswith("lm_head."))}


TensorSource = tuple[Path, str]  # (file, name as stored there)
Stored = TensorSource | Part[TensorSource]  # a tensor, or an expert's part of a fused one


def source(stored: Stored) -> TensorSource:
    return stored.source if isinstance(stored, Part) else stored


def match_tensors(
    root: Path, shapes: Mapping[str, tuple[int, ...]], config: ModelConfig
) -> tuple[dict[str, Stored], dict[str, Stored]]:
    """Where each tensor the model needs is stored, strictly: a missing or unexpected tensor is an error that
    names it. Returns (model tensors, MTP head tensors), keyed by our names."""
    # Values carry (file, stored name): sanitizing renames, reading needs the name as stored.
    sources = {name: (path, name) for name, path in checkpoint_files(root).items()}
    files, mtp_files = sanitize(sources, config.num_experts if config.moe else 0)
    if config.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    check_names(root, shapes, files)
    return files, mtp_files


def check_names(root: Path, shapes: Mapping[str, tuple[int, ...]], files: Mapping[str, TensorSource]) -> None:
    """A missing or unexpected tensor is an error that names it."""
    missing = sorted(set(shapes) - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {root} is missing tensor {missing[0]}" + _more(missing))
    unexpected = sorted(set(files) - set(shapes))
    if unexpected:
        path, stored = source(files[unexpected[0]])
        raise CheckpointError(f"unexpected tensor {stored} in {path}" + _more(unexpected))


def load_checkpoint(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    vision: bool = False,
) -> Checkpoint:
    """Build the model described by `config.json` and fill it from the safetensors files, strictly. A quantized
    checkpoint is io/quantized.py's (io/load.py picks the loader for any model reference). `vision` keeps the
    vision tower of a checkpoint that has one (`load_vision`); training loads go without."""
    root = Path(checkpoint_dir)
    config = load_config(root)
    if "quantization_config" in config.extra:
        raise CheckpointError(f"{root} is a quantized checkpoint; load it with qwenlite.io.load.load_model")
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(config)
    shapes = expected_shapes(model)
    files, mtp_files = match_tensors(root, shapes, config)
    # One dtype for every tensor, as the reference; forward does norms and gates in fp32.
    state = {name: t.to(device=device, dtype=dtype) for name, t in read_tensors(files, shapes)}
    model = assemble(model, state, device)
    if vision:
        model.visual = load_vision(root, config, dtype, device)
    return Checkpoint(model, config, root, read_mtp(mtp_files))


def load_vision(
    root: Path, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> VisionModel | None:
    """The vision tower (`model.visual.*`, strictly) of a checkpoint whose config has one, in `dtype` (never
    quantized: it runs once per image over hundreds of rows, where weight-only int8 saves no time), or None."""
    files, shapes = match_vision(root, config)
    if not files:
        return None
    with torch.device("meta"):
        tower = VisionModel(config.vision_config)
    state = {name.removeprefix("visual."): t.to(device=device, dtype=dtype) for name, t in read_tensors(files, shapes)}
    tower.load_state_dict(state, strict=True, assign=True)
    tower.init_rope(device)
    return tower.eval()


def match_vision(root: Path, config: ModelConfig) -> tuple[dict[str, TensorSource], dict[str, tuple[int, ...]]]:
    """Where the vision tower's tensors are stored and their shapes, by our names (`visual.*`), strictly; both empty
    when the config or the checkpoint has no tower."""
    if config.vision_config is None:
        return {}, {}
    named, _ = sanitize({name: (path, name) for name, path in checkpoint_files(root).items()}, vision=True)
    files = {k: v for k, v in named.items() if k.startswith("visual.")}
    if not files:
        return {}, {}
    with torch.device("meta"):
        tower = VisionModel(config.vision_config)
    shapes = {"visual." + name: tuple(t.shape) for name, t in tower.state_dict().items()}
    check_names(root, shapes, files)
    return files, shapes


def read_tensors(
    files: Mapping[str, Stored], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, memory-mapped tensor) for each of `files` (from `match_tensors`), a fused expert tensor's parts as
    views of it; its shape checked when `shapes` are given."""
    handles: dict[Path, object] = {}
    for name, where in files.items():
        path, stored = source(where)
        if path not in handles:
            handles[path] = open_safetensors(path)
        tensor = read_tensor(handles[path], stored, path)  # a view of the file's mapping: no copy
        if isinstance(where, Part):
            tensor = where.take(tensor, f"{stored} in {path}")
        if shapes is not None and tuple(tensor.shape) != tuple(shapes[name]):
            raise CheckpointError(
                f"tensor {stored} in {path} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])} "
                "from config.json"
            )
        yield name, tensor


def stream_tensors(
    files: Mapping[str, Stored], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, memory-mapped tensor) for each of `files`, like `read_tensors`, for one pass over a whole
    checkpoint (quantizing): when the next tensor is asked for, the previous one's pages are dropped from this
    process (MADV_DONTNEED; still readable, a later access reads them from the file again). A mapping otherwise
    keeps every page it touched resident until it is unmapped: the whole checkpoint by the end of a pass. The
    tensors must not be written to. `shapes`, when given, are checked."""
    maps: dict[Path, tuple[mmap.mmap, int, dict]] = {}
    for name, where in files.items():
        path, stored = source(where)
        if path not in maps:
            maps[path] = _map_safetensors(path)
        mapped, start, header = maps[path]
        dtype, shape, (lo, hi) = _entry(header, stored, path)
        if start + hi > len(mapped):
            raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file (at {stored})")
        if hi == lo:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            count = (hi - lo) // dtype.itemsize
            tensor = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + lo).view(shape)
        if isinstance(where, Part):  # an expert's part of a fused tensor: only its bytes are read and let go
            part = where.take(tensor, f"{stored} in {path}")
            offset = part.data_ptr() - tensor.data_ptr()
            lo, hi, tensor = lo + offset, lo + offset + part.nbytes, part
        if shapes is not None and tuple(tensor.shape) != tuple(shapes[name]):
            raise CheckpointError(
                f"tensor {stored} in {path} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])} "
                "from config.json"
            )
        yield name, tensor
        if hi > lo and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: there the pages stay until the end
            page = (start + lo) // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, page, start + hi - page)


def _map_safetensors(path: Path) -> tuple[mmap.mmap, int, dict]:
    """A safetensors file mapped copy-on-write (never written: its pages stay the file's), where its data starts,
    and its header's tensor entries."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        return mapped, 8 + length, header
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None


def _entry(header: dict, stored: str, path: Path) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (start, end) bytes) of tensor `stored` in a safetensors header, checked against each other."""
    try:
        entry = header[stored]
        dtype = SAFETENSORS_TYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        start, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read tensor {stored} from {path}: bad safetensors header ({e!r})") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - start != nbytes:
        raise CheckpointError(f"cannot read tensor {stored} from {path}: {end - start} bytes for shape {shape}")
    return dtype, shape, (start, end)


def read_mtp(mtp_files: Mapping[str, Stored]) -> dict[str, torch.Tensor]:
    """The multi-token-prediction head's tensors as stored, memory-mapped (not part of the model's state; their
    shapes are checked by `assemble_mtp`)."""
    return dict(read_tensors(mtp_files))


def assemble_mtp(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> MTP:
    """The MTP head from a checkpoint's `mtp.*` tensors (`read_mtp`), strictly, in `dtype` on `device`."""
    with torch.device("meta"):
        head = MTP(config)
    shapes = {PREFIX + name: tuple(t.shape) for name, t in head.state_dict().items()}
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise CheckpointError(f"the MTP head is missing tensor {missing[0]}" + _more(missing))
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        more = _more(unexpected)
        raise CheckpointError(f"unexpected MTP tensor {unexpected[0]} (qwenlite runs one MTP layer)" + more)
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"MTP tensor {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
    state = {name.removeprefix(PREFIX): t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    head.load_state_dict(state, strict=True, assign=True)
    return head.eval()


def assemble(
    model: Qwen3_5ForCausalLM, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> Qwen3_5ForCausalLM:
    """The tail every loader shares: `model`, built on the meta device (quantized or not), takes `state`'s tensors
    as its own; a tied head takes the embedding's (one Parameter for both, as in a model built whole)."""
    embed, head = model.model.embed_tokens, model.lm_head
    if model.config.tie_word_embeddings:
        state = state | {"lm_head." + k.removeprefix("model.embed_tokens."): v for k, v in state.items()
                         if k.startswith("model.embed_tokens.")}  # fmt: skip
    assign_state(model, state)
    if model.config.tie_word_embeddings:
        for name, p in embed.named_parameters(recurse=False):
            setattr(head, name, p)
    model.model.init_rope(device)
    return model.eval()


def assign_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """module.load_state_dict(state, strict=True, assign=True) in one pass over the names: torch's filters the state
    at every module, which grows with modules x tensors (a 35B-A3B has ~100,000 of each: about a minute)."""
    modules = dict(module.named_modules())
    expected = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        first = f"missing tensor {missing[0]}" + _more(missing) if missing else ""
        extra = f"unexpected tensor {unexpected[0]}" + _more(unexpected) if unexpected else ""
        raise CheckpointError(f"{type(module).__name__}: " + "; ".join(x for x in (first, extra) if x))
    for name, t in state.items():
        path, _, attr = name.rpartition(".")
        owner, old = modules[path], expected[name]
        if t.shape != old.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(old.shape)}")
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = t
    weights_changed()  # the dicts were written directly, past the registration hooks


def read_tensor(handle, name: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def save_checkpoint(
    model: Qwen3_5ForCausalLM,
    out_dir: str | Path,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write config.json and safetensors shards that transformers and qwenlite both load: the flat
    `Qwen3_5ForCausalLM` layout, or for a model carrying its vision tower the published
    `Qwen3_5ForConditionalGeneration` one (`sanitize` reads both)."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    multimodal = model.visual is not None
    if multimodal:
        tensors = {multimodal_name(k): v for k, v in tensors.items()}
    tensors.update(extra_tensors or {})
    dtype = next(iter(tensors.values())).dtype
    write_checkpoint(model.config, out_dir, tensors.items(), dtype, max_shard_bytes, multimodal=multimodal)


def multimodal_name(name: str) -> str:
    """Our name -> the published multimodal layout's: `sanitize` backwards (`visual.` and `model.` go under
    `model.visual.` and `model.language_model.`; the head stays)."""
    if name.startswith("visual."):
        return "model." + name
    return "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name


def write_checkpoint(
    config: ModelConfig,
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int = 4 << 30,
    progress: Callable[[int], None] | None = None,
    multimodal: bool = False,
) -> None:
    """Stream (name, tensor) pairs into `save_aligned` shards of at most `max_shard_bytes`, each written
    atomically, then the index (when there are several) and config.json (`multimodal`: the nested one, with the
    vision tower's config). Holds one shard in memory at a time."""
    out = Path(out_dir)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        path = out / f"model-{len(written) + 1:05d}.safetensors"
        atomic_write(path, lambda p: save_aligned(shard, p, {"format": "pt"}))
        written.append((path, list(shard)))
        shard.clear()

    for name, t in tensors:
        if shard and size + t.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += t.nbytes
        total += t.nbytes
        if progress:
            progress(t.nbytes)
    flush()
    # Final names follow the Hugging Face convention, which needs the shard count.
    n = len(written)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (path, _), name in zip(written, final, strict=True):
        os.replace(path, out / name)
    if n > 1:
        weight_map = {t: name for (_, names), name in zip(written, final, strict=True) for t in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
    config_dict = config.to_multimodal_dict() if multimodal else config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config_dict, indent=2)))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.bool: "BOOL"}  # fmt: skip
SAFETENSORS_TYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
ALIGN = 64


def save_aligned(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
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
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


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
        zero_centred = config.zero_centred_norms
        items = (
            (name, initial_value(name, shape, generator, zero_centred).to(dtype)) for name, shape in shapes.items()
        )
        write_checkpoint(config, out_dir, items, dtype, max_shard_bytes=2 << 30, progress=bar.update)


def copy_side_files(src: Path, out: Path) -> None:
    """Copy the `SIDE_FILES` that `src` has into `out`, each atomically."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            atomic_write(out / name, lambda p, name=name: shutil.copyfile(src / name, p))
