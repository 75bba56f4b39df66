"""PEFT LoRA adapters on disk: reading one (`read_adapter`), checking it against a base model (`check_adapter`),
and loading several onto one model for per-row serving (`load_adapters`). Training reads through the same
functions (train/lora.py's load_adapter) and writes the format (save_adapter).

The format: adapter_config.json (peft_type LORA, r, lora_alpha, target_modules, ...) and
adapter_model.safetensors with `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
(out, r). Paths are the flat Qwen3_5ForCausalLM's, or the published Qwen3_5ForConditionalGeneration's
(`model.language_model.*`), read as the flat ones. Every way an adapter can fail to fit its base is a
CheckpointError that names the adapter and the mismatch, at load, never a silent no-op at generation time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qwenlite.errors import CheckpointError, InvalidArgument
from qwenlite.model.adapters import Adapter, AdapterSelection, adapter_selection, attach_adapters
from qwenlite.model.quantized import QuantLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LANGUAGE_MODEL_PREFIX = "model.language_model."  # the published layout's text model
UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
VOCABULARY_MODULES = ("embed_tokens", "lm_head")


def read_adapter(adapter_dir: str | Path, name: str | None = None) -> Adapter:
    """A PEFT LoRA adapter directory -> Adapter (named `name`, by default the directory's name), its files and
    their agreement with each other checked: config and weights present and readable, LORA, each adapted module
    with both A and B, ranks as `r` says. Whether it fits a model is `check_adapter`'s question."""
    root = Path(adapter_dir)
    label = f"adapter {name} ({root})" if name else f"the adapter in {root}"
    name = name or root.name
    config_path, weights_path = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS

    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"{label}: {message}")

    for path in (config_path, weights_path):
        if not path.is_file():
            raise fail(f"not a PEFT adapter: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise fail(f"cannot read the adapter: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise fail(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise fail(f"peft_type {config.get('peft_type')!r} is not supported, only LORA")
    for key in UNSUPPORTED:
        if config.get(key):
            raise fail(f"{key} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, int | float):
        raise fail(f'{ADAPTER_CONFIG} needs a positive integer "r" and a number "lora_alpha"')
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, kind = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        if path.startswith(LANGUAGE_MODEL_PREFIX):
            path = "model." + path.removeprefix(LANGUAGE_MODEL_PREFIX)
        if kind not in ("lora_A", "lora_B"):
            # A resized vocabulary shows as full embedding / head copies (modules_to_save) or embedding LoRA.
            if any(m in key for m in VOCABULARY_MODULES):
                parts.setdefault(key, {})["vocabulary"] = tensor
                continue
            raise fail(f"unexpected tensor {key}")
        if tensor.dim() != 2:
            raise fail(f"{key} is {tuple(tensor.shape)}, not a matrix")
        parts.setdefault(path, {})[kind] = tensor.float()
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, pair in parts.items():
        if "vocabulary" in pair:
            continue
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise fail(f"{path} has no {missing}")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.shape[0] != r or B.shape[1] != r:
            raise fail(f"{path} has rank {A.shape[0]} (A) / {B.shape[1]} (B), but {ADAPTER_CONFIG} says r = {r}")
        weights[path] = (A, B)
    vocabulary = {key: pair["vocabulary"] for key, pair in parts.items() if "vocabulary" in pair}
    if not weights and not vocabulary:
        raise fail(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, int | float):
        raise fail(f"lora_dropout {dropout!r} is not a number")
    return Adapter(name, r, float(alpha), scaling, weights, vocabulary, float(dropout))


def check_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Refuse an adapter that does not fit `model`: a module the base lacks (or that is not a linear layer, or is
    outside the text model's layers and head), an A or B whose shape is not the base layer's, another vocabulary, or
    a vocabulary module it would replace."""
    name = adapter.name
    vocab = model.config.vocab_size
    for key, tensor in adapter.vocabulary.items():  # full copies (V, hidden), embedding LoRA A (r, V)
        size = tensor.shape[-1] if "lora_embedding_A" in key else tensor.shape[0]
        if "lora_embedding_B" not in key and size != vocab:
            raise CheckpointError(
                f"adapter {name}: trained on a vocabulary of {size} tokens ({key} is {tuple(tensor.shape)}), "
                f"the base has {vocab}"
            )
    for key in adapter.vocabulary:
        raise CheckpointError(f"adapter {name}: {key} replaces or adapts the embedding or head, not supported")
    modules = dict(model.named_modules())
    for path, (A, B) in adapter.weights.items():
        layer = modules.get(path)
        if layer is not None and not (path.startswith("model.layers.") or path == "lm_head"):
            # The vision tower runs on image patches, before any row's adapter is chosen.
            raise CheckpointError(f"adapter {name}: targets {path}, outside the text model's layers and head")
        if not isinstance(layer, nn.Linear | QuantLinear):
            what = "which the base lacks" if layer is None else f"a {type(layer).__name__}, not a linear layer"
            raise CheckpointError(f"adapter {name}: targets {path}, {what}")
        if path.endswith("lm_head") and B.shape[0] != layer.out_features:
            raise CheckpointError(
                f"adapter {name}: trained on a vocabulary of {B.shape[0]} tokens (lm_head.lora_B is "
                f"{tuple(B.shape)}), the base has {layer.out_features}"
            )
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise CheckpointError(
                f"adapter {name}: {path} is {A.shape[1]} -> {B.shape[0]} (lora_A {tuple(A.shape)}, lora_B "
                f"{tuple(B.shape)}), the base's is {layer.in_features} -> {layer.out_features}"
            )


def check_names(names: Sequence[str], taken: Sequence[str] = ()) -> None:
    """Adapter names: each given once, none empty, none in `taken` (the base model's own names, say)."""
    for i, name in enumerate(names):
        if not name:
            raise InvalidArgument("an adapter needs a name", param="lora")
        if name in names[:i]:
            raise InvalidArgument(f"the adapter name {name!r} is given twice", param="lora")
        if name in taken:
            raise InvalidArgument(f"the adapter name {name!r} is the base model's; choose another", param="lora")


def load_adapters(model: nn.Module, adapters: Sequence[tuple[str, str | Path]]) -> AdapterSelection:
    """(name, PEFT directory) pairs -> every adapter read, checked against `model` and attached to it for per-row
    selection (the i-th pair is index i + 1; 0 is the base). Nothing is attached unless all fit."""
    if adapter_selection(model) is not None:
        raise CheckpointError("this model already carries adapters")
    check_names([name for name, _ in adapters])
    read = [read_adapter(path, name) for name, path in adapters]
    for adapter in read:
        check_adapter(adapter, model)
    return attach_adapters(model, read)
