"""Causal grouped-query attention over a (possibly cached) key/value prefix."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Tk >= Tq: the last Tq keys are the queries' own positions.

    Query i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. Returns (B, Hq, Tq, D)."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Tq == 1:  # decode: the single query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns top-left; with a cached prefix the mask must align bottom-right.
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
