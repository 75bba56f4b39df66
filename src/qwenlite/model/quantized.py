"""Weight-only quantization as a module swap on a built model (gpt-fast style).

`quantize_model(model, bits)` replaces every nn.Linear (all projections and the head) by a `QuantLinear` and the
embedding by a `QuantEmbedding` that dequantizes only the rows it looks up; a tied head is quantized once and
shares its tensors with the embedding. Norms, the conv, A_log and dt_bias stay as they are. Formats (see
ops/quant_matmul.py): int8 symmetric, one scale per output channel by default (the layout torch's int8 kernel
takes; a group size makes it group-wise, on the reference path); int4 asymmetric, group 128 by default.

Module buffers are named as the checkpoint's tensors (`model.layers.0.mlp.up_proj.qweight`, `.scales` /
`.scales_and_zeros`), so a quantized checkpoint (io/quantized.py) is the quantized model's state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenlite.errors import QwenliteError
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.ops import quant_matmul as qm
from qwenlite.ops.cpu import kernels

FORMATS = {8: "int8-symmetric", 4: "int4-asymmetric-tiled64"}
DEFAULT_GROUP_SIZE = {8: None, 4: 128}  # None: one group per output channel
QUANT_CHOICES = {"int8": 8, "int4": 4}


def resolve_group_size(bits: int, group_size: int | None, in_features: int) -> int:
    if bits not in FORMATS:
        raise QwenliteError(f"bits must be 4 or 8, got {bits}")
    group_size = group_size or DEFAULT_GROUP_SIZE[bits] or in_features
    if bits == 4 and group_size not in qm.INT4_GROUP_SIZES:
        raise QwenliteError(f"int4 group size must be one of {qm.INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise QwenliteError(
            f"a layer with {in_features} inputs cannot be split into groups of {group_size}: "
            "choose a group size that divides every layer's input size"
        )
    return group_size


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 (`qweight` (N, K), `scales` (N, K/G)) or int4 (`qweight` tiled64
    (Np/64, K, 32), `scales_and_zeros` (K/G, Np, 2)); the scales' dtype is the compute dtype. `fast` selects
    qwenlite's kernels (ops/cpu/kernels.py), else torch's, where they apply; False forces the pure-torch reference."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None, bias: bool = False):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = resolve_group_size(bits, group_size, in_features)
        self.fast = True
        self._kernel_weight: torch.Tensor | None = None  # int4 in the kernel's layout; a view where it is tiled64
        N, K, G = out_features, in_features, self.group_size
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, K // G, dtype=dtype, device=device))
        else:
            Np = qm.padded_rows(N)
            tiled = (Np // qm.TILE, K, qm.TILE // 2)
            self.register_buffer("qweight", torch.empty(tiled, dtype=torch.uint8, device=device))
            self.register_buffer("scales_and_zeros", torch.empty(K // G, Np, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, group_size: int | None = None,
                    bias: torch.Tensor | None = None) -> QuantLinear:  # fmt: skip
        N, K = weight.shape
        layer = cls(K, N, bits, group_size, weight.dtype, "meta", bias is not None)
        layer.set_weight(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (N, K) into this layer's buffers (compute dtype = the scales' dtype)."""
        dtype = self.scale_tensor.dtype
        if self.bits == 8:
            self.qweight, self.scales = qm.quantize_int8(weight, self.group_size, dtype)
        else:
            self.qweight, self.scales_and_zeros = qm.quantize_int4(weight, self.group_size, dtype)
        self._kernel_weight = None

    @property
    def scale_tensor(self) -> torch.Tensor:
        return self.scales if self.bits == 8 else self.scales_and_zeros

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) fp32: what this layer multiplies by."""
        if self.bits == 8:
            return qm.dequantize_int8(self.qweight, self.scales)
        return qm.dequantize_int4(self.qweight, self.scales_and_zeros)[: self.out_features]

    def _apply(self, fn, recurse=True):
        self._kernel_weight = None  # .to() / .float() move the buffers: the kernel view must follow
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.bits == 8:
            if self.fast and kernels.int8_ok(x2, self.qweight, self.scales):
                y = kernels.int8_matmul(x2, self.qweight, self.scales)
            elif self.fast and qm.int8_fast_ok(x2, self.qweight, self.scales):
                y = qm.int8_matmul_fast(x2, self.qweight, self.scales)
            else:
                y = qm.int8_matmul_ref(x2, self.qweight, self.scales)
        elif self.fast and kernels.int4_ok(x2, self.qweight, self.scales_and_zeros, self.group_size):
            y = kernels.int4_matmul(x2, self.qweight, self.scales_and_zeros, self.group_size, self.out_features)
        elif self.fast and qm.int4_fast_ok(x2, self.scales_and_zeros, self.group_size):
            if self._kernel_weight is None:
                self._kernel_weight = qm.int4_kernel_weight(self.qweight)
            y = qm.int4_matmul_fast(x2, self._kernel_weight, self.scales_and_zeros, self.group_size, self.out_features)
        else:
            y = qm.int4_matmul_ref(x2, self.qweight, self.scales_and_zeros, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def kernel_plan(self, dtype: torch.dtype) -> kernels.QkLinear | None:
        """This projection for kernels.decode_step under activations of `dtype`, or None where no kernel takes it."""
        N, K, G = self.out_features, self.in_features, self.group_size
        s = self.scale_tensor
        if not self.fast or s.dtype not in kernels.ACT_DTYPES or G % 16:
            return None
        if not (self.qweight.is_contiguous() and s.is_contiguous() and s.device.type == "cpu"):
            return None
        fmt = kernels.FMT_INT8 if self.bits == 8 else kernels.FMT_INT4
        Np = N if self.bits == 8 else qm.padded_rows(N)
        return kernels.plan_linear(fmt, self.qweight, N, K, dtype, self.bias, s, G, Np)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, fast={self.fast}"  # fmt: skip


class QuantEmbedding(nn.Module):
    """Embedding lookup from the same storage as a QuantLinear (rows = tokens): only the looked-up rows are
    dequantized. A tied head and this module hold the very same tensors."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None,
                 dtype: torch.dtype, device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        # Borrow QuantLinear's buffer layout: an (N = vocab, K = hidden) matrix.
        layout = QuantLinear(embedding_dim, num_embeddings, bits, group_size, dtype, device)
        self.num_embeddings, self.embedding_dim, self.bits, self.group_size = (
            num_embeddings, embedding_dim, bits, layout.group_size)  # fmt: skip
        self.register_buffer("qweight", layout.qweight)
        self.register_buffer("scales" if bits == 8 else "scales_and_zeros", layout.scale_tensor)

    @classmethod
    def sharing(cls, head: QuantLinear) -> QuantEmbedding:
        emb = cls(head.out_features, head.in_features, head.bits, head.group_size, head.scale_tensor.dtype, "meta")
        emb.share(head)
        return emb

    def share(self, head: QuantLinear) -> None:
        self.qweight = head.qweight
        if self.bits == 8:
            self.scales = head.scales
        else:
            self.scales_and_zeros = head.scales_and_zeros

    scale_tensor = QuantLinear.scale_tensor

    def kernel_plan(self, dtype: torch.dtype) -> kernels.QkLinear | None:
        """This table for kernels.embed_rows and the C drafts, its rows in `dtype` (the scales' dtype, which the
        reference rounds them to), or None where no kernel reads it."""
        s = self.scale_tensor
        if s.dtype != dtype or dtype not in kernels.ACT_DTYPES or not kernels.available():
            return None
        if not (self.qweight.is_contiguous() and s.is_contiguous() and s.device.type == "cpu"):
            return None
        N, K = self.num_embeddings, self.embedding_dim
        fmt, Np = (kernels.FMT_INT8, N) if self.bits == 8 else (kernels.FMT_INT4, qm.padded_rows(N))
        return kernels.plan_linear(fmt, self.qweight, N, K, dtype, None, s, self.group_size, Np)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.scale_tensor.dtype
        table = self.kernel_plan(dtype) if ids.device.type == "cpu" else None
        if table is not None:  # in C: the torch twin below cost 0.15-0.25 ms of a 17 ms 0.8B int4 decode token
            N = self.num_embeddings
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < N):
                bad = int(ids[(ids < 0) | (ids >= N)].reshape(-1)[0])
                raise IndexError(f"token id {bad} is outside the embedding's {N} rows")
            return kernels.embed_rows(table, ids, dtype)
        if self.bits == 8:
            return qm.int8_rows(self.qweight, self.scales, ids, dtype)
        return qm.int4_rows(self.qweight, self.scales_and_zeros, ids, dtype)


# ---------------------------------------------------------------------------------------------
# The module swap


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]  # fmt: skip


@torch.no_grad()
def quantize_model(model: Qwen3_5ForCausalLM, bits: int = 8, group_size: int | None = None) -> Qwen3_5ForCausalLM:
    """Swap every nn.Linear for a QuantLinear and the embedding for a QuantEmbedding, in place, quantizing the
    current weights (one layer at a time, so the extra memory is one layer's fp32 copy). Returns the model."""
    embed = model.model.embed_tokens
    if not isinstance(embed, nn.Embedding):
        raise QwenliteError("this model is already quantized")
    tied = model.lm_head.weight is embed.weight
    for parent, name, linear in _linears(model):
        setattr(parent, name, QuantLinear.from_weight(linear.weight, bits, group_size, linear.bias))
    if tied:
        model.model.embed_tokens = QuantEmbedding.sharing(model.lm_head)
    else:
        head = QuantLinear.from_weight(embed.weight, bits, group_size)
        model.model.embed_tokens = QuantEmbedding.sharing(head)
    # The tensors left (norms, conv, A_log, dt_bias: a few MB) may be views of a memory-mapped checkpoint, which
    # keeps the whole file mapped and every page quantization read resident: own copies let the mapping go.
    for module in model.modules():
        if not isinstance(module, QuantLinear | QuantEmbedding):
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()
    return model


@torch.no_grad()
def quantize_like(module: nn.Module, model: Qwen3_5ForCausalLM) -> nn.Module:
    """Swap `module`'s nn.Linear layers for QuantLinear ones at `model`'s precision, in place: the bits of its
    (quantized) head and its group size, per output channel where its head has one group per channel (int8's
    default). A module beside an unquantized model stays as it is. For the MTP head of a quantized model: its drafts
    then read int8 / int4 weights as the model's steps do (drafts only propose, so this changes speed, not output)."""
    head = model.lm_head
    if not isinstance(head, QuantLinear):
        return module
    group = None if head.group_size == head.in_features and head.bits == 8 else head.group_size
    for parent, name, linear in _linears(module):
        setattr(parent, name, QuantLinear.from_weight(linear.weight, head.bits, group, linear.bias))
    return module


def quantize_model_empty(model: Qwen3_5ForCausalLM, bits: int, group_size: int | None,
                         dtype: torch.dtype) -> Qwen3_5ForCausalLM:  # fmt: skip
    """The same swap on a meta-device model, with empty buffers to assign a quantized checkpoint's tensors to."""
    for parent, name, linear in _linears(model):
        layer = QuantLinear(linear.in_features, linear.out_features, bits, group_size, dtype, "meta",
                            linear.bias is not None)  # fmt: skip
        setattr(parent, name, layer)
    c = model.config
    model.model.embed_tokens = QuantEmbedding(c.vocab_size, c.hidden_size, bits, group_size, dtype, "meta")
    return model


def quant_bits(quant: str | None) -> int | None:
    """`--quant int8|int4` as bits; None or "none": no quantization."""
    if quant in (None, "none"):
        return None
    if quant not in QUANT_CHOICES:
        raise QwenliteError(f"unknown quantization {quant!r}; choose from {', '.join(QUANT_CHOICES)}")
    return QUANT_CHOICES[quant]


def apply_quant(model: Qwen3_5ForCausalLM, quant: str | None) -> Qwen3_5ForCausalLM:
    """`--quant int8|int4` on a model already in memory: quantize it in place (None or "none": as is). A
    checkpoint on disk quantizes on load without holding its unquantized weights (io/quantized.py)."""
    bits = quant_bits(quant)
    return model if bits is None else quantize_model(model, bits)
