"""One loader for every model reference: a .gguf file, a quantized checkpoint or a Hugging Face checkpoint
directory (after io/hub.py has resolved a hub id to one), and the sampling defaults a checkpoint recommends."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenlite.errors import CheckpointError, InvalidArgument, QwenliteError
from qwenlite.io.checkpoint import assemble_mtp, checkpoint_files, load_checkpoint, load_vision, read_mtp, sanitize
from qwenlite.io.gguf_import import load_gguf, load_gguf_mtp
from qwenlite.io.gguf_mmproj import attach_mmproj, check_mmproj, mmproj_preprocessing
from qwenlite.io.images import ImageProcessor
from qwenlite.io.quantized import is_quantized_checkpoint, load_and_quantize, load_quantized
from qwenlite.io.video import VideoProcessor
from qwenlite.model.mtp import MTP
from qwenlite.model.quantized import apply_quant, quant_bits
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.sample import SAMPLING_FIELDS
from qwenlite.text.tokenizer import Tokenizer


def load_model(
    model_path: str | Path,
    dtype: torch.dtype | str | None = None,
    quant: str | None = None,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    mmproj: str | Path | None = None,
) -> tuple[Qwen3_5ForCausalLM, Tokenizer | None]:
    """A resolved model path -> (model, tokenizer): a .gguf file, a quantized checkpoint (memory-mapped as
    written) or a Hugging Face checkpoint directory; `quant` ("int8" / "int4") quantizes on load, a checkpoint
    directory one tensor at a time (never holding its unquantized weights). The vision tower comes unquantized: a
    checkpoint directory's (quantized or not), or a GGUF's mmproj (`mmproj`, else found beside it: `find_mmproj`).
    `with_tokenizer=False` skips building a checkpoint directory's tokenizer (~280 MB for the 248K vocabulary)
    and returns None for it; a GGUF's comes from its metadata either way."""
    path = Path(model_path)
    bits = quant_bits(quant)
    device = check_device(device)
    mmproj = find_mmproj(path, mmproj)
    if path.is_file() and path.suffix == ".gguf":
        if mmproj is not None:
            check_mmproj(mmproj)  # before the minutes a large model takes to load
        model, _config, tokenizer = load_gguf(path, dtype)
        model = apply_quant(model.to(device), quant)
        if mmproj is not None:
            attach_mmproj(model, tokenizer, mmproj)  # after quantizing: the tower stays as it is
        return model, tokenizer
    if is_quantized_checkpoint(path):
        if bits:
            raise QwenliteError(f"{path} is already quantized; drop --quant")
        model = load_quantized(path, dtype, device).model
    elif bits:
        model = load_and_quantize(path, bits, dtype=dtype, device=device).model  # one tensor at a time
        model.visual = load_vision(path, model.config, model.dtype, device)  # unquantized
    else:
        model = load_checkpoint(path, dtype, device, vision=True).model
    return model, Tokenizer.from_dir(path) if with_tokenizer else None


def find_mmproj(model_path: str | Path, mmproj: str | Path | None = None) -> Path | None:
    """The mmproj GGUF for a .gguf model: `mmproj` when given, else the only `mmproj-*.gguf` beside the model
    (None when there is none, or several: then it must be given). Only a GGUF takes one: a checkpoint directory
    carries its tower."""
    path = Path(model_path)
    gguf = path.is_file() and path.suffix == ".gguf"
    if mmproj is not None:
        if not gguf:
            raise InvalidArgument(f"--mmproj is for a .gguf model; {path} carries its own vision tower, if any")
        if not Path(mmproj).is_file():
            raise CheckpointError(f"mmproj {mmproj} is not a file")
        return Path(mmproj)
    found = sorted(path.parent.glob("mmproj-*.gguf")) if gguf else []
    return found[0] if len(found) == 1 else None


def processors(
    model_path: str | Path, model: Qwen3_5ForCausalLM, mmproj: str | Path | None = None
) -> tuple[ImageProcessor, VideoProcessor]:
    """What reads images and videos for `model`, loaded from `model_path` (with `mmproj`, as `load_model`): a
    checkpoint's preprocessor files, or the preprocessing a GGUF's mmproj describes."""
    path, vision = Path(model_path), model.config.vision_config
    mmproj = find_mmproj(path, mmproj)
    if mmproj is None:
        return ImageProcessor.from_dir(path, vision), VideoProcessor.from_dir(path, vision)
    settings = mmproj_preprocessing(mmproj)
    video = {k: v for k, v in settings.items() if not k.endswith("_pixels")}  # a video's budget is its own
    return ImageProcessor(**settings), VideoProcessor(**video)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine has: a one-line error instead of torch's traceback."""
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidArgument(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if where.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgument(f"device {device!r}: torch sees no CUDA GPU (torch {torch.__version__})")
        if (where.index or 0) >= count:
            raise InvalidArgument(f"device {device!r}: this machine has {count} CUDA GPU(s)")
    return where


def load_mtp(model_path: str | Path, model: Qwen3_5ForCausalLM) -> MTP | None:
    """The multi-token-prediction head a checkpoint directory or a GGUF (its `nextn` tail block) ships for `model`
    (the model's dtype and device), or None where there is none (a checkpoint without `mtp.*`, a GGUF without
    nextn_predict_layers). Unquantized even in a quantized checkpoint (quantize_checkpoint stores it so) or a
    quantized GGUF (dequantized, as the model): one layer, small beside the shared head, which is the model's;
    speculative.make_drafts quantizes it as the model is (model/quantized.quantize_like)."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_mtp(path, model.config, model.dtype, model.device)
    if not path.is_dir():
        return None
    experts = model.config.num_experts if model.config.moe else 0
    _, mtp_files = sanitize({name: (file, name) for name, file in checkpoint_files(path).items()}, experts)
    if not mtp_files:
        return None
    return assemble_mtp(model.config, read_mtp(mtp_files), model.dtype, model.device)


def generation_defaults(path: Path) -> dict:
    """Sampling settings the checkpoint recommends in generation_config.json (greedy when do_sample is false)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    out = {k: cfg[k] for k in SAMPLING_FIELDS if isinstance(cfg.get(k), int | float)}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
