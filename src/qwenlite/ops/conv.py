"""Depthwise causal conv1d with an explicit carried state (the last K-1 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T), weight (C, 1, K), state (B, C, K-1) or None for zeros.

    Returns the conv output (B, C, T), before activation, and the new state: the last K-1 inputs,
    so that a sequence fed in pieces gives the same output as fed whole."""
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    full = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    out = F.conv1d(full, weight.to(x.dtype), groups=x.shape[1])
    return out, full[:, :, -(K - 1) :]
