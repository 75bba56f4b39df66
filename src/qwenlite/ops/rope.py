"""Rotary position embedding on the first `rotary_dim` dims of each head (partial rotary, half-split layout)."""

from __future__ import annotations

import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (...) -> cos, sin (..., rotary_dim), computed in fp32 and cast once."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal rotary: positions (3, T) for the t, h and w streams -> cos, sin (T, rotary_dim). Frequency j takes
    stream h where j % 3 == 1 and j < 3 * section[1], w where j % 3 == 2 and j < 3 * section[2], t elsewhere (the
    interleaved layout); with equal streams (text) it is `rope_cos_sin` of one of them."""
    freqs = positions.float()[..., None] * inv_freq  # (3, T, R/2)
    picked = freqs[0].clone()
    for stream in (1, 2):
        picked[..., stream : 3 * section[stream] : 3] = freqs[stream, ..., stream : 3 * section[stream] : 3]
    emb = torch.cat([picked, picked], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (T, R), or (B, 1, T, R) for per-row positions, with R <= D. Dims past R pass
    through unchanged."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
