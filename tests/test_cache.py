"""Cache snapshot / restore: the recurrent state cannot be rewound, so going back means restoring a copy."""

import pytest
import torch

from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.model.cache import AttentionCache, LinearAttentionCache, make_cache

from helpers import make_hf_checkpoint, max_abs_diff, random_ids

PREFIX = 70  # past one chunk, so the prefix's state comes from the chunked form
DECODE = 5
MAX_LEN = PREFIX + DECODE + 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    make_hf_checkpoint(path)
    return load_checkpoint(path).model


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, PREFIX + DECODE, seed=21)


@torch.no_grad()
def decode(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` (B, n) one at a time; the logits (B, n, V)."""
    return torch.cat([model(tokens[:, t : t + 1], cache=cache) for t in range(tokens.shape[1])], dim=1)


def prefilled(model, ids, max_len=MAX_LEN):
    cache = make_cache(model.config, batch_size=2, max_seq_len=max_len, dtype=torch.float32)
    with torch.no_grad():
        model(ids[:, :PREFIX], cache=cache)
    return cache


def tensors_of(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        if isinstance(layer, AttentionCache):
            n = int(cache.lengths.max())
            out += [layer.k[:, :, :n], layer.v[:, :, :n]]
        else:
            assert isinstance(layer, LinearAttentionCache)
            out += [layer.conv, layer.state]
    return out


def test_restore_then_decode_again_is_identical(model, ids):
    cache = prefilled(model, ids)
    snap = cache.snapshot()
    assert snap.lengths.tolist() == [PREFIX] * snap.batch_size
    first = decode(model, cache, ids[:, PREFIX:])
    assert cache.lengths.tolist() == [PREFIX + DECODE] * cache.batch_size
    cache.restore(snap)
    assert cache.lengths.tolist() == [PREFIX] * cache.batch_size
    second = decode(model, cache, ids[:, PREFIX:])
    assert torch.equal(first, second)
    # and the decoded logits are the right ones, not merely repeatable
    with torch.no_grad():
        full = model(ids)
    assert max_abs_diff(second, full[:, PREFIX:]) <= 1e-4


def test_restore_after_decoding_other_tokens(model, ids):
    """Speculation that went wrong: decode different tokens, go back, decode the accepted ones."""
    cache = prefilled(model, ids)
    snap = cache.snapshot()
    expected = decode(model, cache, ids[:, PREFIX:])
    for wrong_seed in (1, 2):  # twice: one snapshot serves any number of restores
        cache.restore(snap)
        wrong = random_ids(2, DECODE + 2, seed=wrong_seed)  # longer than the accepted run, too
        assert not torch.equal(decode(model, cache, wrong)[:, :DECODE], expected)
        cache.restore(snap)
        assert torch.equal(decode(model, cache, ids[:, PREFIX:]), expected)


def test_snapshot_is_independent_of_later_writes(model, ids):
    cache = prefilled(model, ids)
    snap = cache.snapshot()
    frozen = [t.clone() for t in tensors_of(snap)]
    live = tensors_of(cache)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(snap), live, strict=True))
    decode(model, cache, ids[:, PREFIX:])
    assert snap.lengths.tolist() == [PREFIX] * snap.batch_size
    after = tensors_of(snap)
    assert all(torch.equal(a, b) for a, b in zip(after, frozen, strict=True)), "a later decode changed the snapshot"
    # and the decode really did write the live state that the snapshot was copied from
    changed = [not torch.equal(a, b) for a, b in zip(tensors_of(prefilled(model, ids)), live, strict=True)]
    assert any(changed)


def test_restoring_does_not_tie_cache_to_snapshot(model, ids):
    """After restore, decoding writes the cache's own buffers, so the snapshot still holds the old point."""
    cache = prefilled(model, ids)
    snap = cache.snapshot()
    frozen = [t.clone() for t in tensors_of(snap)]
    cache.restore(snap)
    decode(model, cache, ids[:, PREFIX:])
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(snap), frozen, strict=True))


@pytest.mark.parametrize("max_len", [MAX_LEN, 2 * MAX_LEN], ids=["same-size", "larger"])
def test_restore_into_a_fresh_cache(model, ids, max_len):
    cache = prefilled(model, ids)
    snap = cache.snapshot()
    expected = decode(model, cache, ids[:, PREFIX:])

    fresh = make_cache(model.config, batch_size=2, max_seq_len=max_len, dtype=torch.float32)
    fresh.restore(snap)
    assert fresh.lengths.tolist() == [PREFIX] * fresh.batch_size
    assert torch.equal(decode(model, fresh, ids[:, PREFIX:]), expected)


def test_restore_into_a_too_small_cache_fails(model, ids):
    snap = prefilled(model, ids).snapshot()
    small = make_cache(model.config, batch_size=2, max_seq_len=PREFIX - 1, dtype=torch.float32)
    with pytest.raises(ValueError):
        small.restore(snap)


def test_restore_into_a_cache_of_another_batch_size_fails(model, ids):
    snap = prefilled(model, ids).snapshot()  # batch 2
    single = make_cache(model.config, batch_size=1, max_seq_len=MAX_LEN, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch"):
        single.restore(snap)


# --- rows at different positions (continuous batching) ---------------------------------------------------------


@torch.no_grad()
def test_rows_at_different_positions_decode_together_as_they_would_alone(model, ids):
    """Row 0 holds a 9-token prompt, row 1 a 70-token one; batched decode steps give each row the logits it
    gets decoding alone (fp32, 1e-5)."""
    lengths = (9, PREFIX)
    steps = ids[:, PREFIX : PREFIX + DECODE]
    batch = make_cache(model.config, batch_size=2, max_seq_len=MAX_LEN, dtype=torch.float32)
    for row, n in enumerate(lengths):
        model(ids[row : row + 1, :n], cache=batch.rows(row, row + 1))  # prefill one row through its view
    assert batch.lengths.tolist() == list(lengths)
    together = decode(model, batch, steps)
    assert batch.lengths.tolist() == [n + DECODE for n in lengths]
    for row, n in enumerate(lengths):
        alone = make_cache(model.config, batch_size=1, max_seq_len=MAX_LEN, dtype=torch.float32)
        model(ids[row : row + 1, :n], cache=alone)
        expected = decode(model, alone, steps[row : row + 1])
        assert max_abs_diff(together[row : row + 1], expected) <= 1e-5


@torch.no_grad()
def test_a_row_snapshot_restores_into_another_row(model, ids):
    batch = make_cache(model.config, batch_size=2, max_seq_len=MAX_LEN, dtype=torch.float32)
    model(ids[:1, :PREFIX], cache=batch.rows(0, 1))
    snap = batch.rows(0, 1).snapshot()
    batch.rows(1, 2).restore(snap)  # e.g. a prompt prefix reused by a second request
    assert batch.lengths.tolist() == [PREFIX, PREFIX]
    out = decode(model, batch, ids[:1, PREFIX:].expand(2, -1))
    assert max_abs_diff(out[0], out[1]) <= 1e-6


@torch.no_grad()
def test_copy_row_moves_a_sequence_to_another_row(model, ids):
    batch = make_cache(model.config, batch_size=3, max_seq_len=MAX_LEN, dtype=torch.float32)
    model(ids[1:2, :PREFIX], cache=batch.rows(2, 3))
    batch.copy_row(2, 0)
    assert batch.lengths.tolist() == [PREFIX, 0, PREFIX]
    out = decode(model, batch.rows(0, 1), ids[1:2, PREFIX:])
    ref = decode(model, batch.rows(2, 3), ids[1:2, PREFIX:])
    assert torch.equal(out, ref)
