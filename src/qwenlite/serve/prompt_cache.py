"""Prompt-state reuse: the recurrent state cannot be rewound, so the engine keeps snapshots of a cache row, keyed
by the exact token ids they cover, in a byte-bounded LRU; a new prompt restores the longest stored prefix. An
image's tokens are all `<|image_pad|>`, so in a key each stands for its image's content digest instead: two
different images never share a state, and a follow-up about the same image restores the one after it. A state
computed under a LoRA adapter is keyed with the adapter in its first element, so it is never restored for another
adapter or the base."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from qwenlite.model.cache import Cache
from qwenlite.model.vision import ImageInput, VideoInput


def image_key(
    ids: Sequence[int],
    images: Sequence[ImageInput | VideoInput],
    image_token_id: int,
    video_token_id: int | None = None,
) -> tuple:
    """`ids` with each image or video token replaced by its input's digest (inputs in order, each `tokens` long)."""
    digests = iter([image.digest for image in images for _ in range(image.tokens)])
    return tuple(next(digests) if i in (image_token_id, video_token_id) else i for i in ids)


def adapter_key(key: tuple, adapter: int) -> tuple:
    """`key` for a prompt run under adapter `adapter` (0: the base, keyed as it is): its first element becomes
    (adapter, element), which no other adapter's key and no token id equals, so prefixes never match across."""
    return ((adapter, key[0]), *key[1:]) if adapter and key else key


def snapshot_bytes(snap: Cache) -> int:
    # Tensors only: a linear-attention layer also has its verification trail (None or a list, see Cache.track).
    tensors = [t for layer in snap.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


class PromptCache:
    """Row snapshots keyed by the exact token ids they cover, least recently used evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[Cache, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence) -> tuple[int, Cache | None]:
        """The longest stored prefix of `ids` that leaves at least one token to prefill: (its length, snapshot)."""
        best: tuple[int, ...] | None = None
        for key in self._entries:
            if len(ids) > len(key) > (len(best) if best else 0) and tuple(ids[: len(key)]) == key:
                best = key
        if best is None:
            return 0, None
        self._entries.move_to_end(best)
        return len(best), self._entries[best][0]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __contains__(self, ids: Sequence) -> bool:
        return tuple(ids) in self._entries

    def store(self, ids: Sequence, snap: Cache) -> None:
        key, size = tuple(ids), snapshot_bytes(snap)
        if size > self.max_bytes or key in self._entries:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted
        self._entries[key] = (snap, size)
        self.nbytes += size
