"""One loader for every model reference: a .gguf file, a quantized checkpoint or a Hugging Face checkpoint
directory (after io/hub.py has resolved a hub id to one), and the sampling defaults a checkpoint recommends."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenlite.errors import CheckpointError, QwenliteError
from qwenlite.io.checkpoint import load_checkpoint, load_vision
from qwenlite.io.gguf_import import load_gguf
from qwenlite.io.quantized import is_quantized_checkpoint, load_and_quantize, load_quantized
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
) -> tuple[Qwen3_5ForCausalLM, Tokenizer | None]:
    """A resolved model path -> (model, tokenizer): a .gguf file, a quantized checkpoint (memory-mapped as
    written) or a Hugging Face checkpoint directory; `quant` ("int8" / "int4") quantizes on load, a checkpoint
    directory one tensor at a time (never holding its unquantized weights). A checkpoint directory keeps its vision
    tower, unquantized; quantized checkpoints and GGUF files are text-only.
    `with_tokenizer=False` skips building a checkpoint directory's tokenizer (~280 MB for the 248K vocabulary)
    and returns None for it; a GGUF's comes from its metadata either way."""
    path = Path(model_path)
    bits = quant_bits(quant)
    if path.is_file() and path.suffix == ".gguf":
        model, _config, tokenizer = load_gguf(path, dtype)
        model = model.to(device)
        return apply_quant(model, quant), tokenizer
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
