"""Inference cache, owned by the caller: per attention layer a preallocated KV buffer, per linear-attention
layer the conv inputs and the fp32 recurrent state. The recurrent state cannot be rewound, so going back
to an earlier point means restoring a snapshot taken there.

Rows are independent sequences, each with its own length: a batch of rows at different positions can
decode together (continuous batching), and `rows(a, b)` is a view that writes through to this cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qwenlite.config import ModelConfig
from qwenlite.errors import ContextLengthExceeded, InvalidArgument


@dataclass
class AttentionCache:
    k: torch.Tensor  # (B, Hkv, Tmax, D)
    v: torch.Tensor  # (B, Hkv, Tmax, D)


@dataclass
class LinearAttentionCache:
    conv: torch.Tensor  # (B, K-1, conv_dim): the last K-1 inputs of the causal conv
    state: torch.Tensor  # (B, Hv, Dk, Dv) fp32
    # While drafted tokens are verified (`Cache.track`): (conv, state) after each token of the forward but its last,
    # in buffers kept for the next verification (`spare`): fresh MB-sized buffers cost page faults at every token,
    # measured 2 ms per copy of a 0.8B layer's state against ~0.1 ms into a reused one.
    trail: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    spare: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # The one-call step's (model/runner.py) instead: (conv, state) as they were before the verification, and its
    # tokens' recurrence inputs (the projections), from which `rewind` replays the kept tokens; reused likewise.
    before: tuple[torch.Tensor, torch.Tensor] | None = None
    inputs: torch.Tensor | None = None


LayerCache = AttentionCache | LinearAttentionCache


class Cache:
    def __init__(self, layers: list[LayerCache], lengths: torch.Tensor, rope_deltas: torch.Tensor | None = None):
        self.layers = layers
        self.lengths = lengths  # (B,) int64 on the CPU: tokens processed per row, the next token's KV slot
        # (B,) int64: the next token's rotary position minus its slot; nonzero after an image (model/vision.py)
        self.rope_deltas = torch.zeros_like(lengths) if rope_deltas is None else rope_deltas
        # Set by a tracked forward that ran in one C call (model/runner.py): rewinds each row to keep[b] tokens
        self.replay: Callable[[list[int]], None] | None = None

    @property
    def tracking(self) -> bool:
        """Whether the next forward keeps what `rewind` needs (`track` was called)."""
        return any(getattr(layer, "trail", None) is not None for layer in self.layers)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_seq_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                return layer.k.shape[2]
        return 1 << 62  # only recurrent layers: no bound

    def rows(self, start: int, stop: int) -> Cache:
        """A view of rows start..stop-1: the model writes through it into this cache."""
        layers: list[LayerCache] = [
            AttentionCache(c.k[start:stop], c.v[start:stop])
            if isinstance(c, AttentionCache)
            else LinearAttentionCache(c.conv[start:stop], c.state[start:stop])
            for c in self.layers
        ]
        return Cache(layers, self.lengths[start:stop], self.rope_deltas[start:stop])

    def reset_row(self, row: int) -> None:
        """Make `row` an empty sequence: zero recurrent state (KV past length 0 is never read)."""
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCache):
                layer.conv[row].zero_()
                layer.state[row].zero_()
        self.lengths[row] = 0
        self.rope_deltas[row] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src` (e.g. to keep the active rows of a batch contiguous)."""
        n = int(self.lengths[src])
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                layer.k[dst, :, :n] = layer.k[src, :, :n]
                layer.v[dst, :, :n] = layer.v[src, :, :n]
            else:
                layer.conv[dst] = layer.conv[src]
                layer.state[dst] = layer.state[src]
        self.lengths[dst] = n
        self.rope_deltas[dst] = self.rope_deltas[src]

    def track(self) -> None:
        """Keep what `rewind` needs to return to the state after any token of the next forward: the verification
        step of speculative decoding. The module path keeps the recurrent state after every token
        (GatedDeltaNet.mix_keeping_states); the one-call step (model/runner.py) keeps the state before the forward and
        every token's recurrence inputs, and sets `replay`."""
        self.replay = None
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCache):
                layer.trail = []

    def rewind(self, run: int, keep: int | Sequence[int]) -> None:
        """After a tracked forward of `run` tokens, keep its first `keep` (1..run; one int for all rows or one per
        row) as if only they had been run: the recurrent layers take the state kept after each row's last kept
        token (or, after the one-call step, restore the state from before the forward and replay the kept tokens'
        recurrence: no weight read again), attention forgets the rest by length. Ends tracking."""
        keeps = [keep] * self.batch_size if isinstance(keep, int) else list(keep)
        if len(keeps) != self.batch_size or not all(1 <= k <= run for k in keeps):
            raise InvalidArgument(f"cannot keep {keep} tokens of a tracked forward of {run} in {self.batch_size} rows")
        replay, self.replay = self.replay, None
        if replay is not None:
            replay(keeps)
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCache):
                if replay is None:
                    for b, k in enumerate(keeps):
                        if k < run:
                            conv, state = layer.trail[k - 1]
                            layer.conv[b].copy_(conv[b])
                            layer.state[b].copy_(state[b])
                    layer.spare += layer.trail
                layer.trail = None
        self.lengths -= run - torch.tensor(keeps)

    def snapshot(self) -> Cache:
        """An independent copy of the state (KV trimmed to the longest row)."""
        n = int(self.lengths.max()) if self.batch_size else 0
        layers: list[LayerCache] = []
        for layer in self.layers:
            if isinstance(layer, AttentionCache):
                layers.append(AttentionCache(layer.k[:, :, :n].clone(), layer.v[:, :, :n].clone()))
            else:
                layers.append(LinearAttentionCache(layer.conv.clone(), layer.state.clone()))
        return Cache(layers, self.lengths.clone(), self.rope_deltas.clone())

    def restore(self, snap: Cache) -> None:
        """Return to the point where `snap` was taken, reusing this cache's buffers."""
        n = int(snap.lengths.max()) if snap.batch_size else 0
        if n > self.max_seq_len:
            raise ContextLengthExceeded(f"snapshot of {n} tokens does not fit a cache of {self.max_seq_len}")
        if snap.batch_size != self.batch_size:
            raise InvalidArgument(
                f"snapshot of batch {snap.batch_size} cannot restore a cache of batch {self.batch_size}"
            )
        for mine, theirs in zip(self.layers, snap.layers, strict=True):
            if isinstance(mine, AttentionCache):
                mine.k[:, :, :n].copy_(theirs.k[:, :, :n])
                mine.v[:, :, :n].copy_(theirs.v[:, :, :n])
            else:
                mine.conv.copy_(theirs.conv)
                mine.state.copy_(theirs.state)
        self.lengths.copy_(snap.lengths)
        self.rope_deltas.copy_(snap.rope_deltas)


def make_cache(
    config: ModelConfig,
    batch_size: int = 1,
    max_seq_len: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    layer_types: Sequence[str] | None = None,
) -> Cache:
    """A cache for the model of `config`, or for layers of `layer_types` (the MTP head's one attention layer)."""
    c = config
    layers: list[LayerCache] = []
    for layer_type in c.layer_types if layer_types is None else layer_types:
        if layer_type == "full_attention":
            shape = (batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
            layers.append(
                AttentionCache(
                    torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
                )
            )
        else:
            conv = torch.zeros(batch_size, c.linear_conv_kernel_dim - 1, c.linear_conv_dim, dtype=dtype, device=device)
            state = torch.zeros(
                batch_size, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim, device=device
            )
            layers.append(LinearAttentionCache(conv, state))
    return Cache(layers, torch.zeros(batch_size, dtype=torch.long))
