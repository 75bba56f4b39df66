"""Training a mixture of experts (Qwen3.5 MoE): the router's load-balancing loss, and what the loops ask of it.

transformers' Qwen3_5MoeForCausalLM adds `router_aux_loss_coef * aux_loss` to its `loss` when the config sets
`output_router_logits` (false by default, and in the configs we know of); qwenlite's objectives (pretraining,
SFT, DPO) add the same term under the same setting, so that a training step minimises what transformers' would.
`aux_loss` is Switch Transformer's (eqs. 4-6) as transformers' `load_balancing_loss_func` computes it: over every
MoE layer's router logits of the forward (the main model's layers; the MTP head's is not one of them, transformers
having no head), the share of top-k slots each expert receives times its mean router probability, both averaged
over layers and real (unpadded) tokens, summed over experts, times the expert count. The slot shares carry no
gradient; the probabilities do.

The router logits are read by forward hooks on the routers (`recording_router_logits`), so the model's forward stays
the reference that inference runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from qwenlite.config import ModelConfig
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM, SparseMoeBlock


def aux_loss_enabled(config: ModelConfig) -> bool:
    """Whether a training objective adds the router's load-balancing loss: a MoE whose config asks for it."""
    return config.moe and config.output_router_logits


@contextmanager
def recording_router_logits(model: Qwen3_5ForCausalLM) -> Iterator[list[torch.Tensor]]:
    """A list that receives each MoE layer's router logits (B * T, E), in layer order, for the forwards run inside
    (the main model's layers only)."""
    logits: list[torch.Tensor] = []
    blocks = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    handles = [b.gate.register_forward_hook(lambda _m, _x, out: logits.append(out)) for b in blocks]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The load-balancing loss (module docstring) of one forward's router logits, each (B * T, E); `mask` (B, T):
    the real tokens (None: all). A scalar fp32 tensor, the probabilities taken in fp32 whatever the weights' dtype
    (transformers takes them in the logits' dtype: the same in fp32)."""
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    slots = torch.zeros(num_experts, device=device)  # top-k slots per expert, summed over layers
    probs = torch.zeros(num_experts, device=device)  # router probabilities per expert, summed over layers
    rows = torch.zeros((), device=device)
    weight = None if mask is None else mask.reshape(-1, 1).to(device=device, dtype=torch.float32)  # (B * T, 1)
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = nn.functional.one_hot(torch.topk(p, top_k, dim=-1).indices, num_experts).sum(1).float()  # (N, E)
        if weight is not None:
            chosen, p = chosen * weight, p * weight
        slots = slots + chosen.sum(0)
        probs = probs + p.sum(0)
        rows = rows + (len(p) if weight is None else weight.sum())
    return num_experts * torch.sum(slots / rows * probs / rows)


def padding_mask(lengths: Sequence[int], T: int) -> torch.Tensor:
    """(B, T) bool: the first lengths[b] positions of row b, the real tokens of a right-padded batch."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
