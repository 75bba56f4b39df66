"""Depthwise causal conv1d with an explicit carried state (the last K-1 inputs), in (B, T, C) layout."""

from __future__ import annotations

import torch


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, C), weight (C, 1, K) as nn.Conv1d stores it, state (B, K-1, C) or None for zeros.

    Returns the conv output (B, T, C) in fp32, before activation, and the new state: the last K-1 inputs,
    so that a sequence fed in pieces gives the same output as fed whole. Written as K shifted
    multiply-adds over the channels-last layout the projections produce: no transposes, and the
    activations that follow stay in fp32."""
    B, T, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, K - 1, C)
    full = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    full_f = full.float()
    w = weight.reshape(C, K).float()
    out = full_f[:, :T] * w[:, 0]
    for j in range(1, K):
        out.addcmul_(full_f[:, j : j + T], w[:, j])
    return out, full[:, T:]
