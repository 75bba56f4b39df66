"""Inference cache, owned by the caller: per attention layer a preallocated KV buffer, per linear-attention
layer the conv inputs and the fp32 recurrent state. The recurrent state cannot be rewound, so going back
to an earlier point means restoring a snapshot taken there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenlite.config import ModelConfig


@dataclass
class AttentionCache:
    k: torch.Tensor  # (B, Hkv, Tmax, D)
    v: torch.Tensor  # (B, Hkv, Tmax, D)


@dataclass
class LinearAttentionCache:
    conv: torch.Tensor  # (B, K-1, conv_dim): the last K-1 inputs of the causal conv
    state: torch.Tensor  # (B, Hv, Dk, Dv) fp32


LayerCache = AttentionCache | LinearAttentionCache


@dataclass
class Cache:
    layers: list[LayerCache]
    seq_len: int = 0  # tokens already processed; the next token's position

    @property
    def max_seq_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                return layer.k.shape[2]
        return 1 << 62  # only recurrent layers: no bound

    @property
    def batch_size(self) -> int:
        layer = self.layers[0]
        return (layer.k if isinstance(layer, AttentionCache) else layer.state).shape[0]

    def snapshot(self) -> Cache:
        """An independent copy of the state after `seq_len` tokens (KV trimmed to what is filled)."""
        layers: list[LayerCache] = []
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                n = self.seq_len
                layers.append(AttentionCache(layer.k[:, :, :n].clone(), layer.v[:, :, :n].clone()))
            else:
                layers.append(LinearAttentionCache(layer.conv.clone(), layer.state.clone()))
        return Cache(layers, self.seq_len)

    def restore(self, snap: Cache) -> None:
        """Return to the point where `snap` was taken, reusing this cache's buffers."""
        if snap.seq_len > self.max_seq_len:
            raise ValueError(f"snapshot of {snap.seq_len} tokens does not fit a cache of {self.max_seq_len}")
        if snap.batch_size != self.batch_size:
            raise ValueError(f"snapshot of batch {snap.batch_size} cannot restore a cache of batch {self.batch_size}")
        for mine, theirs in zip(self.layers, snap.layers, strict=True):
            if isinstance(mine, AttentionCache):
                mine.k[:, :, : snap.seq_len].copy_(theirs.k[:, :, : snap.seq_len])
                mine.v[:, :, : snap.seq_len].copy_(theirs.v[:, :, : snap.seq_len])
            else:
                mine.conv.copy_(theirs.conv)
                mine.state.copy_(theirs.state)
        self.seq_len = snap.seq_len


def make_cache(
    config: ModelConfig,
    batch_size: int = 1,
    max_seq_len: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> Cache:
    c = config
    layers: list[LayerCache] = []
    for layer_type in c.layer_types:
        if layer_type == "full_attention":
            shape = (batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
            layers.append(
                AttentionCache(
                    torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device),
                )
            )
        else:
            conv = torch.zeros(batch_size, c.linear_conv_kernel_dim - 1, c.linear_conv_dim, dtype=dtype, device=device)
            state = torch.zeros(
                batch_size,
                c.linear_num_value_heads,
                c.linear_key_head_dim,
                c.linear_value_head_dim,
                device=device,
            )
            layers.append(LinearAttentionCache(conv, state))
    return Cache(layers)
