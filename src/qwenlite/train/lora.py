"""LoRA as a module swap on a built model, saved in the PEFT format.

`apply_lora` replaces each targeted `nn.Linear` by a `LoRALinear` that keeps the frozen layer as `base_layer`
and adds `lora_B(lora_A(dropout(x))) * alpha / r`, the names and the initialisation PEFT uses (A Kaiming-uniform,
B zero, so the adapted model starts equal to the base). `save_adapter` writes adapter_config.json and
adapter_model.safetensors with PEFT's key names, so `peft.PeftModel.from_pretrained(transformers_model, dir)` loads
them; `load_adapter` reads them back (through io/adapters.py, which serving shares); `merge_lora` folds
W += alpha / r * B @ A and swaps the plain layers back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qwenlite.errors import QwenliteError
from qwenlite.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, check_adapter, read_adapter
from qwenlite.io.files import atomic_write

# Every projection of both layer kinds; in_proj_b / in_proj_a (one output per value head) are left out, as in
# the usual recipes, and so are the embedding and the head.
DEFAULT_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z", "out_proj",
)  # fmt: skip
# A MoE's routed experts (`mlp.experts.{e}.*`) are never adapted, whatever the targets: per-row serving
# (model/adapters.py) groups tokens by row, not by expert, and PEFT on transformers' model, whose experts are fused
# tensors, would drop them. Its routers and shared-expert gate are no linear layers, so never targets either; its
# shared expert (`mlp.shared_expert.*`) is a plain MLP and is adapted as any other.
ROUTED_EXPERTS = ".mlp.experts."


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling. Adapter weights are fp32 whatever the base dtype."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # PEFT's default: A as nn.Linear's own init (Kaiming-uniform, a=sqrt(5)), B zero.
        bound = 1 / math.sqrt(self.lora_A.in_features)  # what kaiming_uniform_(a=sqrt(5)) gives
        # Drawn on the CPU (a seeded generator is a CPU one): the same adapter on every device.
        a = torch.empty(self.lora_A.weight.shape).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def _matches(path: str, targets: Sequence[str]) -> bool:
    # PEFT's rule for a list of names: the module's full path, or its last components, equal a target.
    return any(path == t or path.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[str]:
    """Wrap every nn.Linear whose path matches `targets` (names such as "q_proj" or full paths), a MoE's routed
    experts excepted (see ROUTED_EXPERTS); freeze all other parameters. alpha defaults to 2r. Each target given must
    match a layer; of the defaults, those the model has. Returns the wrapped module paths."""
    if r < 1:
        raise QwenliteError(f"LoRA rank must be at least 1, got {r}")
    if lora_modules(model):
        raise QwenliteError("this model already carries LoRA adapters; merge them first")
    alpha = 2.0 * r if alpha is None else float(alpha)
    matched = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(p, targets)]
    paths = [p for p in matched if ROUTED_EXPERTS not in p]
    # The defaults name both layer kinds; a model without linear-attention layers (Qwen3, Qwen2) has only the one.
    required = [] if tuple(targets) == DEFAULT_TARGETS else targets
    unused = [t for t in required if not any(_matches(p, [t]) for p in paths)]
    if unused and any(_matches(p, unused[:1]) for p in matched):
        raise QwenliteError(
            f"LoRA target {unused[0]!r} matches only routed experts, which LoRA does not adapt yet (per-row serving "
            "and PEFT on transformers' fused experts take none): adapt attention and the shared expert"
        )
    if unused:
        raise QwenliteError(f"LoRA target {unused[0]!r} matches no linear layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for path in paths:
        layer = LoRALinear(model.get_submodule(path), r, alpha, dropout)
        layer.reset_parameters(generator)
        _set_module(model, path, layer)
    return paths


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The base model, adapters bypassed: DPO's frozen reference without a second copy of the weights."""
    layers = list(lora_modules(model).values())
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, previous, strict=True):
            m.disabled = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B @ A, in fp32) and put the plain layers back. A
    weight that another module shares (a head tied to the embedding) gets its own copy first, and the config says
    the head is no longer tied: the delta is the head's alone."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for path, m in lora_modules(model).items():
        w = m.base_layer.weight
        if uses.get(id(w), 0) > 1:
            w = m.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            config = getattr(model, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                model.config = dataclasses.replace(config, tie_word_embeddings=False)
        w.copy_((w.float() + m.delta_weight()).to(w.dtype))
        _set_module(model, path, m.base_layer)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT format


def _stored_path(path: str, language_model_prefix: bool) -> str:
    # Our paths are the flat Qwen3_5ForCausalLM's; the published Qwen3_5ForConditionalGeneration nests the text
    # model under model.language_model, and the adapter must name the modules of the model it will be loaded on.
    return "model.language_model." + path.removeprefix("model.") if language_model_prefix else path


def save_adapter(
    model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "", language_model_prefix: bool = False
) -> None:
    """Write adapter_config.json and adapter_model.safetensors in the PEFT LoRA format, each atomically."""
    layers = lora_modules(model)
    if not layers:
        raise QwenliteError("the model carries no LoRA adapters to save")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in layers.values()):
        raise QwenliteError("save_adapter needs one rank and alpha for every adapted layer")
    tensors = {}
    for path, m in layers.items():
        key = PEFT_PREFIX + _stored_path(path, language_model_prefix)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        # Short names, as PEFT writes them; none of them names a vision-tower layer of the published checkpoints.
        "target_modules": sorted({p.rpartition(".")[2] for p in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Wrap the modules named in a PEFT LoRA adapter (ours or another tool's) and load its weights, read and
    checked against the model by io/adapters.py (the reader serving shares)."""
    root = Path(adapter_dir)
    adapter = read_adapter(root)
    check_adapter(adapter, model)
    apply_lora(model, adapter.r, adapter.alpha, adapter.dropout, targets=sorted(adapter.weights))
    for path, m in lora_modules(model).items():
        m.scaling = adapter.scaling
        A, B = adapter.weights[path]
        with torch.no_grad():
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
    return sorted(adapter.weights)
