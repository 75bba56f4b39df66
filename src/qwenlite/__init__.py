"""qwenlite: run, serve, shrink, train and measure Qwen3.5 models.

model, tokenizer = qwenlite.load("Qwen/Qwen3.5-0.8B")
ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
print(qwenlite.generate(model, tokenizer, ids, qwenlite.SamplingParams(temperature=0)))
"""

from __future__ import annotations

import torch

from qwenlite.generate import generate, generate_tokens, stream
from qwenlite.io.hub import DEFAULT_MODEL, resolve_model_path
from qwenlite.io.load import load_model
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.sample import SamplingParams
from qwenlite.text.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["load", "generate", "generate_tokens", "stream", "SamplingParams", "Tokenizer", "Qwen3_5ForCausalLM"]


def load(
    model: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str = "cpu", quant: str | None = None
) -> tuple[Qwen3_5ForCausalLM, Tokenizer]:
    """A local checkpoint directory (quantized or not), a .gguf file or a hub id -> (model, tokenizer); `quant`
    "int8" / "int4" quantizes on load."""
    return load_model(resolve_model_path(model), dtype, quant, device)
