"""The vision tower as llama.cpp's mmproj GGUF, the file that sits beside a text GGUF: `export_mmproj` writes one,
`load_mmproj` reads one back onto a model `load_gguf` built.

The conventions are llama.cpp's for Qwen3.5 and Qwen3-VL (its converter's Qwen3VLVisionModel and MmprojModel,
conversion/qwen3vl.py and conversion/base.py; read by tools/mtmd/clip.cpp, whose graph is models/qwen3vl.cpp),
re-implemented here:

- architecture `clip`, general.type `mmproj`; clip.projector_type `qwen3vl_merger`, clip.has_vision_encoder,
  clip.use_gelu (the blocks' GELU), clip.vision.{embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.layer_norm_epsilon, projection_dim (the text model's width), image_size (side of
  the position table x patch), patch_size, spatial_merge_size, image_mean, image_std}; also
  clip.vision.image_min_pixels / image_max_pixels, keys llama.cpp defines but does not read for this projector
  (its Qwen loader fixes 8 to 4096 tokens): qwenlite reads them back, so that images are resized as the
  checkpoint's preprocessor_config.json says;
- tensors (`MMPROJ_NAMES`, `MMPROJ_BLOCK_NAMES`): the Conv3d patch embedding split along time into the two Conv2d
  kernels `v.patch_embd.weight` and `v.patch_embd.weight.1` (one per frame of a temporal patch) and its bias;
  `v.position_embd.weight`; per block `v.blk.N.{ln1, ln2, attn_qkv, attn_out, ffn_up, ffn_down}`; the merger's norm
  `v.post_ln` and its two linears `mm.0`, `mm.2`;
- types, the converter's (MmprojModel.tensor_force_quant and ModelBase.prepare_tensors in conversion/base.py): 1-D
  tensors (norms, biases) and the position table F32 (ggml resamples the table in F32), the patch kernels F16 in an
  F16 file and F32 otherwise, the other matrices in the file's type (F16, F32, BF16 or Q8_0; a Q8_0 matrix whose
  rows do not split into blocks of 32 falls back to F16, as the converter's does). `convert --dtype q8_0` writes a
  Q8_0 mmproj, as the converter's `--outtype q8_0 --mmproj`; q4_0 (which the converter has no mmproj for) an F16 one.
  A Q8_0 mmproj is read back dequantized (gguf_import.dequantize_rows, as the text tensors).

The tower has no deepstack mergers (Qwen3-VL's clip.vision.is_deepstack_layers): an mmproj with them is refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import gguf
import torch

from qwenlite.config import ModelConfig, VisionConfig, load_config
from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io.checkpoint import match_vision
from qwenlite.io.gguf_export import gguf_metadata, read_stored, to_numpy, write_gguf
from qwenlite.io.gguf_import import dequantize_rows, read_gguf
from qwenlite.io.images import ImageProcessor
from qwenlite.model.vision import VisionModel
from qwenlite.text.tokenizer import Tokenizer

PROJECTOR_TYPE = "qwen3vl_merger"
PATCH = "patch_embed.proj.weight"  # ours (D, C, 2, P, P): the two frames' kernels, v.patch_embd.weight and .weight.1
PATCH_FRAMES = ("v.patch_embd.weight", "v.patch_embd.weight.1")
MMPROJ_NAMES = {  # our tower's names (without `visual.`) -> llama.cpp's
    "patch_embed.proj.bias": "v.patch_embd.bias",
    "pos_embed.weight": "v.position_embd.weight",
    "merger.norm.weight": "v.post_ln.weight",
    "merger.norm.bias": "v.post_ln.bias",
    "merger.linear_fc1.weight": "mm.0.weight",
    "merger.linear_fc1.bias": "mm.0.bias",
    "merger.linear_fc2.weight": "mm.2.weight",
    "merger.linear_fc2.bias": "mm.2.bias",
}
MMPROJ_BLOCK_NAMES = {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn_qkv", "attn.proj": "attn_out",
                      "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down"}  # fmt: skip
# --dtype of `convert` -> (the mmproj's matrices, general.file_type, file name tag): F16 unless f32 / bf16 / q8_0 is
# asked for (the converter's types for an mmproj; q4_0 has none there, and the tower runs once per image)
MMPROJ_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, "F32"),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
}
F16 = (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, "F16")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def mmproj_name(name: str) -> str:
    """One of our tower's tensor names (without `visual.`; not the patch kernel, which is two) -> llama.cpp's."""
    if name in MMPROJ_NAMES:
        return MMPROJ_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in MMPROJ_BLOCK_NAMES:
        return f"v.blk.{m.group(1)}.{MMPROJ_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise QwenliteError(f"vision tower tensor {name} has no llama.cpp mmproj name")


def mmproj_tensor_type(
    gguf_name: str, shape: tuple[int, ...], matrix_type: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """The converter's type rule for an mmproj tensor of `shape` (see the module docstring)."""
    if len(shape) <= 1 or gguf_name == "v.position_embd.weight":
        return gguf.GGMLQuantizationType.F32
    if gguf_name in PATCH_FRAMES and matrix_type != gguf.GGMLQuantizationType.F16:
        return gguf.GGMLQuantizationType.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[matrix_type][0]:
        return gguf.GGMLQuantizationType.F16  # rows that do not split into the type's blocks
    return matrix_type


def mmproj_path(out_path: Path, name: str, dtype: str) -> Path:
    """Where `convert` writes the mmproj of a text GGUF at `out_path`: beside it, `mmproj-<name>-<TYPE>.gguf` (the
    model's general.name, spaces as dashes), as llama.cpp's published models name theirs (and as qwenlite finds
    it: the only mmproj-*.gguf there)."""
    return out_path.parent / f"mmproj-{'-'.join(name.split())}-{MMPROJ_TYPES.get(dtype, F16)[2]}.gguf"


# ---------------------------------------------------------------------------------------------
# Export


def export_mmproj(
    checkpoint_dir: str | Path, out_path: str | Path, dtype: str = "f16", name: str | None = None, progress=True
) -> Path:
    """Write the vision tower of the checkpoint at `checkpoint_dir` as a llama.cpp mmproj GGUF (see the module's
    conventions), under a temporary name renamed when complete; tensors read and written one at a time."""
    root, out_path = Path(checkpoint_dir), Path(out_path)
    c = load_config(root)
    files, shapes = match_vision(root, c)
    if not files:
        raise QwenliteError(f"{root} has no vision tower (model.visual.*) to write as an mmproj")
    v = c.vision_config
    if v.temporal_patch_size != 2:
        raise QwenliteError(f"llama.cpp's mmproj holds a temporal patch of 2 frames, not {v.temporal_patch_size}")
    matrix_type, file_type, _ = MMPROJ_TYPES.get(dtype, F16)
    with torch.device("meta"):
        eps = VisionModel(v).merger.norm.eps
    images = ImageProcessor.from_dir(root, v)  # preprocessor_config.json's, or the published defaults

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    gguf_metadata(root, name, sum(math.prod(s) for s in shapes.values())).set_gguf_meta_model(writer)
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_use_gelu(True)
    writer.add_vision_projection_dim(v.out_hidden_size)
    writer.add_vision_image_size(math.isqrt(v.num_position_embeddings) * v.patch_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.depth)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_attention_layernorm_eps(eps)
    writer.add_vision_spatial_merge_size(v.spatial_merge_size)
    writer.add_vision_image_mean(list(images.image_mean))
    writer.add_vision_image_std(list(images.image_std))
    writer.add_vision_min_pixels(images.min_pixels)
    writer.add_vision_max_pixels(images.max_pixels)

    tensors, sources = [], []  # (gguf name, shape, type); (where it is stored, frame of the patch kernel or None)
    for ours, where in files.items():
        tower_name, shape = ours.removeprefix("visual."), shapes[ours]
        if tower_name == PATCH:
            for frame, target in enumerate(PATCH_FRAMES):
                frame_shape = (shape[0], shape[1], *shape[3:])
                tensors.append((target, frame_shape, mmproj_tensor_type(target, frame_shape, matrix_type)))
                sources.append((where, frame))
        else:
            target = mmproj_name(tower_name)
            tensors.append((target, shape, mmproj_tensor_type(target, shape, matrix_type)))
            sources.append((where, None))

    def arrays():
        handles: dict = {}
        for (where, frame), (_, _, qtype) in zip(sources, tensors, strict=True):
            t = read_stored(handles, where).float()
            yield to_numpy(t if frame is None else t[:, :, frame], qtype)

    write_gguf(writer, out_path, tensors, arrays(), progress)
    return out_path


# ---------------------------------------------------------------------------------------------
# Import


def check_mmproj(path: str | Path) -> tuple[dict[str, Any], dict]:
    """(metadata, tensors) of a file that must be an mmproj of the projector qwenlite reads: a CheckpointError
    otherwise (before any model is loaded, where a caller checks first)."""
    path = Path(path)
    meta, stored = read_gguf(path)
    kind = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder"):
        raise CheckpointError(f"{path} is not an mmproj with a vision encoder (general.architecture 'clip')")
    if kind != PROJECTOR_TYPE:
        raise CheckpointError(f"{path} has projector type {kind!r}; qwenlite reads {PROJECTOR_TYPE!r} (Qwen3.5's)")
    if any(meta.get("clip.vision.is_deepstack_layers") or []):
        raise CheckpointError(f"{path} has deepstack layers (Qwen3-VL's); a Qwen3.5 tower has none")
    return meta, stored


def read_mmproj(path: Path, config: ModelConfig) -> tuple[dict[str, Any], dict, VisionConfig]:
    """(metadata, tensors, the tower's config) of an mmproj for a model of `config`: a CheckpointError naming what
    does not fit."""
    meta, stored = check_mmproj(path)
    width = meta.get("clip.vision.projection_dim")
    if width != config.hidden_size:
        raise CheckpointError(f"{path} projects images to width {width}, but the model's is {config.hidden_size}")

    def key(k: str):
        value = meta.get(f"clip.vision.{k}")
        if value is None:
            raise CheckpointError(f"{path}: metadata clip.vision.{k} is missing")
        return value

    for k in ("image_mean", "image_std"):
        key(k)  # llama.cpp's loader requires them too
    patch = stored.get(PATCH_FRAMES[0])
    positions = stored.get("v.position_embd.weight")
    if patch is None or positions is None or len(patch.shape) != 4:
        raise CheckpointError(f"{path} lacks a 4-D {PATCH_FRAMES[0]} or v.position_embd.weight")
    try:
        vision = VisionConfig(
            depth=key("block_count"), hidden_size=key("embedding_length"),
            intermediate_size=key("feed_forward_length"), num_heads=key("attention.head_count"),
            in_channels=patch.shape[1], patch_size=key("patch_size"),
            spatial_merge_size=meta.get("clip.vision.spatial_merge_size", 2), temporal_patch_size=len(PATCH_FRAMES),
            out_hidden_size=width, num_position_embeddings=positions.shape[0],
        )  # fmt: skip
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return meta, stored, vision


def load_mmproj(
    path: str | Path, config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> VisionModel:
    """The vision tower of the mmproj at `path`, for a model of `config`, in `dtype` on `device`. Strict: a missing,
    unexpected or misshapen tensor, or a projector that does not fit the model, is a CheckpointError naming it."""
    path = Path(path)
    _, stored, vision = read_mmproj(path, config)
    with torch.device("meta"):
        tower = VisionModel(vision)
    shapes = {name: tuple(t.shape) for name, t in tower.state_dict().items()}
    wanted = {mmproj_name(n): n for n in shapes if n != PATCH}
    unexpected = sorted(set(stored) - set(wanted) - set(PATCH_FRAMES))
    missing = sorted((set(wanted) | set(PATCH_FRAMES)) - set(stored))
    if unexpected or missing:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]} in {path}" if unexpected else f"{path} is missing tensor {missing[0]}"
        )
    state = {}
    for target, name in wanted.items():
        t, want = stored[target], shapes[name]
        if t.shape != want:
            raise CheckpointError(f"tensor {target} in {path} has shape {t.shape}, expected {want} for {name}")
        state[name] = dequantize_rows(t)
    frames = []
    D, C, _, P, _ = shapes[PATCH]
    for target in PATCH_FRAMES:
        if stored[target].shape != (D, C, P, P):
            raise CheckpointError(
                f"tensor {target} in {path} has shape {stored[target].shape}, expected {(D, C, P, P)}"
            )
        frames.append(dequantize_rows(stored[target]))
    state[PATCH] = torch.stack(frames, 2)
    tower.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, strict=True, assign=True)
    tower.init_rope(device)
    return tower.eval()


def attach_mmproj(model, tokenizer: Tokenizer, path: str | Path) -> None:
    """Give a model `load_gguf` built the vision tower of the mmproj at `path` (in the model's dtype and device),
    and its config the tower's and the image / video pad tokens of its vocabulary."""
    c = model.config
    if c.dense:
        raise CheckpointError(f"{path}: qwenlite reads an mmproj with a Qwen3.5 GGUF (qwen35, qwen35moe) only")
    for token in ("<|image_pad|>", "<|video_pad|>"):
        if tokenizer.token_to_id(token) is None:
            raise CheckpointError(f"the model's vocabulary has no {token} token for the images of {path}")
    model.visual = load_mmproj(path, c, model.dtype, model.device)
    c.vision_config = model.visual.config
    c.image_token_id = tokenizer.token_to_id("<|image_pad|>")
    c.video_token_id = tokenizer.token_to_id("<|video_pad|>")


def mmproj_preprocessing(path: str | Path) -> dict[str, Any]:
    """The image preprocessing an mmproj describes, as `io.images.ImageProcessor` fields: mean, std, patch and merge
    sizes, and the pixel bounds where it has them (see the module docstring)."""
    meta, _ = read_gguf(Path(path))
    out = {"image_mean": tuple(meta["clip.vision.image_mean"]), "image_std": tuple(meta["clip.vision.image_std"]),
           "patch_size": meta["clip.vision.patch_size"], "temporal_patch_size": len(PATCH_FRAMES),
           "merge_size": meta.get("clip.vision.spatial_merge_size", 2)}  # fmt: skip
    for key in ("min_pixels", "max_pixels"):
        if f"clip.vision.image_{key}" in meta:
            out[key] = meta[f"clip.vision.image_{key}"]
    return out
