"""Model configuration: the checkpoint's config.json as a dataclass, derived values resolved once."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenlite.errors import CheckpointError, InvalidArgument, QwenliteError

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3", "qwen2")
# The dense families: every layer full attention, a plain RMSNorm (w * x_hat), no output gate, full rotary.
DENSE_FAMILIES = ("qwen3", "qwen2")
ARCHITECTURES = {"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # fmt: skip
# The mixture-of-experts family: Qwen3.5's layers with a routed MLP (wrapper config `qwen3_5_moe`, text config
# `qwen3_5_moe_text`), and what transformers' Qwen3_5MoeTextConfig assumes for a key config.json leaves out, where
# ours (Qwen3.5-0.8B's) differ.
MOE_FAMILIES = ("qwen3_5_moe", "qwen3_5_moe_text")
MOE_KEYS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "output_router_logits",
    "router_aux_loss_coef",
)
MOE_DEFAULTS: dict[str, Any] = {"hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                                "max_position_embeddings": 32768, "tie_word_embeddings": False,
                                "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
                                "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}  # fmt: skip
# What transformers' Qwen3Config / Qwen2Config assume for a key config.json leaves out, where ours (Qwen3.5's)
# differ; head_dim is Qwen3's 128, or hidden_size / num_attention_heads for Qwen2, which has no such key.
DENSE_DEFAULTS: dict[str, Any] = {"vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": False,
                                  "rope_theta": 10000.0, "head_dim": 128}  # fmt: skip
# Keys of the Qwen3.5 layers (Gated DeltaNet, output gate, MTP) that a dense family's config.json does not have.
QWEN35_ONLY_KEYS = ("attn_output_gate", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads", "full_attention_interval",
                    "partial_rotary_factor", "mtp_num_hidden_layers")  # fmt: skip
LAYER_TYPES = ("linear_attention", "full_attention")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys of the multimodal wrapper config (`qwen3_5`) that belong to neither the text nor the vision config.
WRAPPER_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass
class VisionConfig:
    """The vision tower's `vision_config` (model_type `qwen3_5_vision`); field names are its keys."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu_pytorch_tanh":
            raise CheckpointError(f"vision_config hidden_act {self.hidden_act!r} is not gelu_pytorch_tanh")
        if self.hidden_size % self.num_heads:
            raise CheckpointError("vision_config hidden_size must be a multiple of num_heads")
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise CheckpointError("vision_config num_position_embeddings must be a square (a side x side grid)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        raw = {**raw, "rope_theta": (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta"))}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names and v is not None})


@dataclass
class ModelConfig:
    """Field names are the Hugging Face `config.json` keys of the Qwen3.5 text model."""

    model_type: str = "qwen3_5_text"
    vocab_size: int = 248320
    hidden_size: int = 1024
    intermediate_size: int = 3584
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attn_output_gate: bool = True
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mtp_num_hidden_layers: int = 0
    # Mixture of experts (qwen3_5_moe_text only): every layer's MLP is a router over `num_experts` experts of
    # `moe_intermediate_size`, `num_experts_per_tok` of them per token, plus a gated shared expert.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # Training a MoE: whether the objective adds the router's load-balancing loss, scaled by the coefficient, as
    # transformers' Qwen3_5MoeForCausalLM adds it to `loss` (off by default there too; train/moe.py computes it).
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    dtype: str = "bfloat16"
    eos_token_id: int | list[int] | None = None
    # Multimodal rotary positions (rope_parameters' mrope_section: rotary frequencies per t / h / w stream,
    # interleaved); text positions are the same in all three, so only image tokens see them.
    mrope_section: list[int] | None = None
    # The multimodal wrapper's vision tower and image / video tokens; None for a text-only config. Not written by
    # to_dict.
    vision_config: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    # Unknown keys of the source file, kept so that a config written back loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise CheckpointError(f"unsupported model_type {self.model_type!r}; choose from {', '.join(ARCHITECTURES)}")
        if self.layer_types is None and self.dense:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.layer_types is None:
            i = self.full_attention_interval
            self.layer_types = [
                "full_attention" if (n + 1) % i == 0 else "linear_attention" for n in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise CheckpointError(
                f"config layer_types must list {self.num_hidden_layers} entries from {LAYER_TYPES}, "
                f"got {self.layer_types}"
            )
        if self.dense and (self.attn_output_gate or self.partial_rotary_factor != 1.0 or "linear_attention" in
                           self.layer_types):  # fmt: skip
            raise CheckpointError(
                f"a {self.model_type} model has full attention in every layer, no output gate and full rotary"
            )
        if self.moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        if self.moe and min(self.moe_intermediate_size, self.shared_expert_intermediate_size) < 1:
            raise CheckpointError("moe_intermediate_size and shared_expert_intermediate_size must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise CheckpointError("linear_num_value_heads must be a multiple of linear_num_key_heads")

    # Derived values, in one place.
    @property
    def dense(self) -> bool:
        """Qwen3 / Qwen2: all layers full attention, and a plain RMSNorm `w * x_hat` everywhere."""
        return self.model_type in DENSE_FAMILIES

    @property
    def moe(self) -> bool:
        """Qwen3.5 MoE: each layer's MLP is routed experts plus a gated shared expert."""
        return self.model_type == "qwen3_5_moe_text"

    @property
    def zero_centred_norms(self) -> bool:
        """Qwen3.5's RMSNorm scales by (1 + w), w stored zero-centred; the dense families' by w."""
        return not self.dense

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm of q and k before the rotary: Qwen3.5 and Qwen3, not Qwen2."""
        return self.model_type != "qwen2"

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases; the others as `attention_bias` says (which also covers o_proj)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES.get(self.dtype, torch.bfloat16)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Accepts a nested `qwen3_5` / `qwen3_5_moe` config (text under `text_config`), a flat `qwen3_5_text` /
        `qwen3_5_moe_text` one, or a dense `qwen3` / `qwen2` one."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}; qwenlite supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type in DENSE_FAMILIES:
            return cls.from_dense_dict(raw)
        text = dict(raw.get("text_config") or raw)
        # The multimodal wrapper owns tying, dtype and eos; the text config may repeat them.
        for key in ("tie_word_embeddings", "dtype", "torch_dtype", "eos_token_id"):
            if key in raw and raw is not text and raw[key] is not None:
                text[key] = raw[key]
        if "torch_dtype" in text and "dtype" not in text:
            text["dtype"] = text["torch_dtype"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
            if key in rope:
                text[key] = rope[key]
        if model_type in MOE_FAMILIES:
            text = {**MOE_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
        if raw is not text and raw.get("vision_config"):
            text["vision_config"] = VisionConfig.from_dict(raw["vision_config"])
            text.update({k: raw[k] for k in WRAPPER_KEYS if k in raw})
        text["model_type"] = "qwen3_5_moe_text" if model_type in MOE_FAMILIES else "qwen3_5_text"
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in text.items() if k in names and v is not None}
        # Unknown keys ride along; the ones to_dict() writes itself do not.
        derived = {"torch_dtype", "architectures", "rope_parameters", *WRAPPER_KEYS}
        extra = {k: v for k, v in text.items() if k not in names and k not in derived}
        return cls(**known, extra=extra)

    @classmethod
    def from_dense_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """A `qwen3` / `qwen2` config.json, with transformers' defaults for the keys it leaves out. Refuses what the
        model does not compute: a sliding window, rotary scaling, an activation other than SiLU."""
        family = raw["model_type"]
        text = dict(raw)
        if text.get("use_sliding_window") or "sliding_attention" in (text.get("layer_types") or []):
            raise CheckpointError(
                f"this {family} checkpoint uses sliding-window attention (use_sliding_window), "
                "which qwenlite does not implement"
            )
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(
                f"this {family} checkpoint uses {rope_type!r} rotary scaling; qwenlite has only the default"
            )
        if text.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"this {family} checkpoint uses hidden_act {text['hidden_act']!r}; qwenlite has silu")
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if "torch_dtype" in text and "dtype" not in text:
            text["dtype"] = text["torch_dtype"]
        if family == "qwen2":
            # Qwen2 has no head_dim key (transformers divides unless one is set) and no attention_bias (q/k/v
            # biased, o_proj not).
            text.pop("attention_bias", None)
            if text.get("head_dim") is None and text.get("hidden_size") and text.get("num_attention_heads"):
                text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        text = {**DENSE_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
        text.setdefault("num_key_value_heads", text.get("num_attention_heads", cls.num_attention_heads))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", *QWEN35_ONLY_KEYS, *MOE_KEYS}
        known = {k: v for k, v in text.items() if k in names}
        derived = {"torch_dtype", "architectures", "rope_parameters", "rope_scaling", *QWEN35_ONLY_KEYS, *MOE_KEYS}
        extra = {k: v for k, v in raw.items() if k not in names and k not in derived}
        return cls(**known, attn_output_gate=False, partial_rotary_factor=1.0, mtp_num_hidden_layers=0, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """A flat config.json that transformers' class for this family reads (`Qwen3_5ForCausalLM`,
        `Qwen3_5MoeForCausalLM`, `Qwen3ForCausalLM`, `Qwen2ForCausalLM`)."""
        skip = ("extra", "vision_config", "image_token_id", "video_token_id", "mrope_section")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out = {**self.extra, **out}
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": out.pop("rope_theta"),
            "partial_rotary_factor": out.pop("partial_rotary_factor"),
        }
        if self.mrope_section is not None:
            out["rope_parameters"] |= {"mrope_section": self.mrope_section, "mrope_interleaved": True}
        out.pop("full_attention_interval")
        if not self.moe:
            for key in MOE_KEYS:
                out.pop(key)
        if self.dense:
            del out["rope_parameters"]["partial_rotary_factor"]
            for key in QWEN35_ONLY_KEYS:
                out.pop(key, None)
            if self.model_type == "qwen2":
                out.pop("attention_bias")
        return out

    def to_multimodal_dict(self) -> dict[str, Any]:
        """The nested config.json of the published `Qwen3_5ForConditionalGeneration` (or its MoE twin), for a
        config with a vision tower: to_dict's text config under `text_config`, the tower's `vision_config`, the
        image and video token ids; tying and eos on the wrapper, which owns them."""
        family = self.model_type.removesuffix("_text")
        text = self.to_dict()
        del text["architectures"], text["dtype"]  # the wrapper's dtype is the one read
        vision = dataclasses.asdict(self.vision_config)
        vision["rope_parameters"] = {"rope_theta": vision.pop("rope_theta")}
        architecture = ARCHITECTURES[self.model_type].replace("ForCausalLM", "ForConditionalGeneration")
        return {"architectures": [architecture], "model_type": family, "text_config": text,
                "vision_config": {**vision, "model_type": family + "_vision"},
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "tie_word_embeddings": self.tie_word_embeddings, "eos_token_id": self.eos_token_id,
                "dtype": self.dtype}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """A dtype given by name or as torch's, or None for the checkpoint's own."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise QwenliteError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype or config.torch_dtype


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {checkpoint_dir}: not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    try:
        return ModelConfig.from_dict(raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None


# Real shapes of the published checkpoints (DESIGN.md section 1) and a tiny one for tests and demos.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3.5-0.8b": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                         num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=16,
                         tie_word_embeddings=True),
    "qwen3.5-2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
                       num_key_value_heads=2, linear_num_key_heads=16, linear_num_value_heads=16,
                       tie_word_embeddings=True),
    "qwen3.5-4b": dict(hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32,
                       tie_word_embeddings=True),
    "qwen3.5-9b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                       num_key_value_heads=4, linear_num_key_heads=16, linear_num_value_heads=32,
                       tie_word_embeddings=False),
    # Qwen/Qwen3.5-35B-A3B (and Qwen3.6-35B-A3B, the same shapes): 256 experts of 512, 8 per token, a shared expert
    # of 512; 40 layers (30 linear : 10 full). Its config.json as published copies show it (and transformers'
    # Qwen3_5MoeTextConfig defaults, documented as this checkpoint's).
    "qwen3.5-35b-a3b": dict(model_type="qwen3_5_moe_text", hidden_size=2048, intermediate_size=512,
                            num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                            linear_num_key_heads=16, linear_num_value_heads=32, num_experts=256,
                            num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            tie_word_embeddings=False),
    # Qwen/Qwen3-0.6B (dense: every layer full attention).
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       rope_theta=1_000_000.0, partial_rotary_factor=1.0, attn_output_gate=False,
                       max_position_embeddings=40960, tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B (dense, q/k/v biases, no q/k norms); its vocabulary is Qwen3's but for four special tokens.
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         rope_theta=1_000_000.0, partial_rotary_factor=1.0, attn_output_gate=False,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    # mlx-lm's Qwen3.5 test shape: hidden 128, 4 layers (3 linear : 1 full), the real vocabulary.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=32, linear_value_head_dim=32, tie_word_embeddings=True),
}  # fmt: skip


def preset_config(name: str, layers: int | None = None, **overrides: Any) -> ModelConfig:
    """A preset's config; `layers` makes a shallower copy: the whole model's first `layers` layers, linear and full
    attention where they are in it, each at its real shape (benchmarks of a large model on a small machine)."""
    if name not in PRESETS:
        raise QwenliteError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    mtp = 0 if PRESETS[name].get("model_type") in DENSE_FAMILIES else 1
    config = ModelConfig(**{**PRESETS[name], "mtp_num_hidden_layers": mtp, **overrides})
    if layers is None:
        return config
    if not 1 <= layers <= config.num_hidden_layers:
        raise InvalidArgument(f"--layers must be between 1 and {name}'s {config.num_hidden_layers}, got {layers}")
    return dataclasses.replace(config, num_hidden_layers=layers, layer_types=config.layer_types[:layers])
