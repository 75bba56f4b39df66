"""Speculative decoding, exact: a draft proposes k tokens, one forward of the main model over the pending token and
the k drafts gives k+1 rows of logits, and the longest prefix of drafts the model agrees with is kept, plus the
model's own next token. At batch 1 a CPU's decode reads every weight once per token; a forward of k+1 rows reads
them once for all, so each accepted draft is a token for a fraction of a pass.

Exactness: greedy, a draft is kept iff it is the argmax of the processed logits, so the output is plain decoding's,
token for token; sampling, the rejection rule (sample.verify_draft) keeps the output distributed as plain
sampling's. Logits processors (penalties) see each row's own history, drafts included, and the same filters
(temperature, top-k, top-p, min-p) shape both the model's and the draft's distributions. Rollback: attention
forgets rejected tokens by length, but the Gated DeltaNet's recurrent and conv states cannot be rewound, so the
verification keeps what it needs to go back (Cache.track / Cache.rewind): the state after the last kept token is
the one plain decoding reaches. The verification runs as the one-call C step where it applies (model/runner.py),
which keeps each layer's state from before it and every token's recurrence inputs (its projections, a few KB); a
rewind restores the state and replays the recurrence of the kept tokens, reading no weight again. Through the
modules, the state after every token is copied instead.

Drafts: the checkpoint's MTP head (`MTPDraft`, model/mtp.py; its steps in one C call each, and greedy drafts without
logits processors, `greedy_pick`, all k in one) and prompt lookup (`NgramDraft`). The core works on
token ids; the loop that drafts, verifies and rolls back is generate.py's `speculative_tokens`, which
`generate_tokens` runs when given a `Speculation`; the server's runner (serve/runner.py) does the same for each of
its rows in one batched forward, each row with a draft of its own (`make_drafts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qwenlite.errors import CheckpointError, InvalidArgument
from qwenlite.io.files import atomic_write
from qwenlite.io.load import load_mtp
from qwenlite.model.cache import Cache, make_cache
from qwenlite.model.mtp import MTP
from qwenlite.model.quantized import quantize_like
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import PREFILL_CHUNK, head_drafts_in_one_call, head_step_in_one_call, run_model_hidden
from qwenlite.ops.cpu import kernels
from qwenlite.sample import greedy

DRAFTS = ("mtp", "ngram")
MAX_SPECULATE = 8  # drafts per verification: a forward of up to 9 rows
DRAFT_VOCABS = (32768, 65536)  # the first ids an MTP draft may be restricted to (MTPDraft), smallest first
# ... where they hold this share of the context's tokens: a token outside the range costs at most its own draft
# (acceptance down by at most ~5%), the range the head's rows (a draft's cost down 3-4x at 248K ids)
DRAFT_COVERAGE = 0.95

# A draft's choice from its logits: (token, its distribution q, or None when the token is deterministic).
Pick = Callable[[torch.Tensor, list[int]], tuple[int, torch.Tensor | None]]


class Draft(Protocol):
    def begin(self, max_seq_len: int) -> None:
        """A new sequence of at most `max_seq_len` tokens."""

    def propose(
        self, tokens: Sequence[int], hidden: torch.Tensor, k: int, pick: Pick
    ) -> list[tuple[int, torch.Tensor | None]]:
        """Up to k (token, q) after `tokens` (prompt and generated, the last one not yet run by the model).
        `hidden` (n, H): the model's final hidden states at the n positions it ran since the last call (the last
        n before the last token). `pick(logits, drafted so far)` chooses a token the way the sampler would."""


DraftMaker = Callable[[], Draft]


def greedy_pick(logits: torch.Tensor, drafted: list[int]) -> tuple[int, None]:
    """The Pick of greedy decoding without logits processors: the argmax, whatever was drafted. A draft handed this
    very function may choose its tokens by any argmax of the same logits (MTPDraft: several in one C call)."""
    return greedy(logits), None


@dataclass
class Speculation:
    draft: Draft
    k: int  # drafts per verification, 1..MAX_SPECULATE

    def __post_init__(self) -> None:
        check_speculate(self.k)


def check_speculate(k: int) -> None:
    if not (isinstance(k, int) and 1 <= k <= MAX_SPECULATE):
        raise InvalidArgument(f"--speculate takes 1..{MAX_SPECULATE} drafted tokens (0 = off), got {k}")


class MTPDraft:
    """Drafts with the checkpoint's MTP head: its first step reads the hidden states of the positions the model ran
    since the last call (their KV entries replace the ones its chained drafts wrote), the next ones its own output.

    Drafts choose among the first DRAFT_VOCABS[i] ids, the smallest that holds DRAFT_COVERAGE of the
    context's tokens so far, else among all: the output head, a 248K-row matrix shared with the model, is most of a
    draft's cost, and BPE vocabularies number their tokens by merge order, roughly by frequency. Measured with
    Qwen3.5's vocabulary (bench/draft_vocab.py): the first 32K ids hold 92-97% of the tokens of English prose,
    Python and C, the first 64K 97-99%, but Chinese, Japanese or Korean text only 22-49%, so such a context keeps the
    whole head. A token outside the range only goes undrafted: the verification decides every token, so greedy
    output is the same, and sampled drafts' q is zero there, which the rejection rule allows."""

    def __init__(self, model: Qwen3_5ForCausalLM, head: MTP):
        self.model, self.head = model, head
        self.cache: Cache | None = None
        self.seen = 0  # context tokens counted, and of them those below each of DRAFT_VOCABS
        self.below = np.zeros(len(DRAFT_VOCABS), dtype=np.int64)

    def begin(self, max_seq_len: int) -> None:
        m = self.model
        self.cache = make_cache(m.config, 1, max_seq_len, m.dtype, m.device, layer_types=["full_attention"])
        self.seen, self.below[:] = 0, 0

    def draft_vocab(self, tokens: Sequence[int]) -> int:
        """How many of the first ids the drafts choose among, given the context `tokens` (class docstring)."""
        if len(tokens) < self.seen:  # another sequence: count afresh
            self.seen, self.below[:] = 0, 0
        new = np.asarray(tokens[self.seen :])
        self.below += (new[:, None] < np.asarray(DRAFT_VOCABS)[None, :]).sum(axis=0)
        self.seen = len(tokens)
        vocab = self.model.config.vocab_size
        held = self.below >= DRAFT_COVERAGE * self.seen
        return next((n for n, ok in zip(DRAFT_VOCABS, held, strict=True) if ok and n < vocab), vocab)

    def propose(
        self, tokens: Sequence[int], hidden: torch.Tensor, k: int, pick: Pick
    ) -> list[tuple[int, torch.Tensor | None]]:
        n, last = hidden.shape[0], len(tokens) - 1
        if n > last:  # hidden state t sits beside token t + 1: the step would write before the cache's start
            raise ValueError(f"{n} hidden states need more than {len(tokens)} tokens (the one after each)")
        self.cache.lengths.fill_(last - n)  # forget what earlier drafts wrote past the model's positions
        ids = torch.tensor([tokens[last - n + 1 :]], device=self.model.device)  # tokens t+1 of hidden t
        vocab = self.draft_vocab(tokens)
        if pick is greedy_pick:
            if not torch.is_grad_enabled():  # every draft in one C call where it applies
                drafts = head_drafts_in_one_call(self.model, self.head, ids, hidden[None], k, self.cache, vocab)
                if drafts is not None:
                    return [(t, None) for t in drafts]
            pick = lambda logits, drafted: (greedy(logits[:vocab]), None)  # noqa: E731 (as the C drafts choose)
        elif vocab < self.model.config.vocab_size:
            pick = partial(_among_first, pick, vocab, self.model.config.vocab_size)
        for start in range(0, n, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, n)
            out, logits = self.step(ids[:, start:end], hidden[None, start:end], vocab)
        drafts: list[tuple[int, torch.Tensor | None]] = []
        for j in range(k):
            token, q = pick(logits[0, -1], [t for t, _ in drafts])
            drafts.append((token, q))
            if j + 1 < k:
                out, logits = self.step(torch.tensor([[token]], device=self.model.device), out[:, -1:], vocab)
        return drafts

    def step(
        self, ids: torch.Tensor, hidden: torch.Tensor, vocab: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over tokens `ids` (1, T) and the hidden states before them (1, T, H) -> (its normed output
        (1, T, H), the last position's logits (1, 1, V) fp32, at least those of the first `vocab` ids): in one C call
        where it applies (model/runner.head_step_in_one_call), else through its modules."""
        if not torch.is_grad_enabled():
            x = torch.cat([self.model.model.embed_tokens(ids), hidden.to(self.model.dtype)], dim=-1)
            out = head_step_in_one_call(self.model, self.head, x, self.cache, vocab)
            if out is not None:
                return out
        out = self.head.run_layers(self.model, self.head.fuse(self.model, ids, hidden), self.cache)
        return out, self.model.lm_head(out[:, -1:]).float()


def _among_first(pick: Pick, vocab: int, size: int, logits: torch.Tensor, drafted: list[int]):
    """`pick` over the first `vocab` logits, the others -inf: a sampled draft's q is zero past them, which the
    rejection rule allows (any q from which the draft was drawn keeps the output distributed as plain sampling's)."""
    full = logits.new_full((size,), float("-inf"))
    full[:vocab] = logits[:vocab]
    return pick(full, drafted)


class NgramDraft:
    """Prompt lookup: the longest suffix of the context (up to `max_ngram` tokens) that occurred earlier proposes
    the tokens that followed its latest earlier occurrence. Pays where output repeats input (code edits, summaries)."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def begin(self, max_seq_len: int) -> None:
        pass

    def propose(
        self, tokens: Sequence[int], hidden: torch.Tensor, k: int, pick: Pick
    ) -> list[tuple[int, torch.Tensor | None]]:
        seq = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier n-gram
            starts = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if len(starts):
                follow = seq[starts[-1] + n : starts[-1] + n + k]
                return [(int(t), None) for t in follow]
        return []


def forward_hidden(model: Qwen3_5ForCausalLM, ids: Sequence[int], cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
    """ids through the model's forward in pieces of PREFILL_CHUNK -> (final hidden states (T, H), logits of the last
    position (V,) fp32): the drafts need every position's hidden state, which the one-call decode step keeps to C."""
    device = model.device
    hidden = []
    for start in range(0, len(ids), PREFILL_CHUNK):
        hidden.append(model.model(torch.tensor([ids[start : start + PREFILL_CHUNK]], device=device), cache)[0])
    h = torch.cat(hidden)
    return h, model.lm_head(h[-1:]).float()[0]


def verify_forward(model: Qwen3_5ForCausalLM, ids: Sequence[int], cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The pending token and the drafts `ids` through the model, tracked (`Cache.track`: follow with `cache.rewind`)
    -> (final hidden states (T, H), logits (T, V) fp32). In one C call where it applies (model/runner.py), else the
    forward; either way each GEMV reads its weights once for all T rows."""
    cache.track()
    hidden, logits = run_model_hidden(model, torch.tensor([list(ids)], device=model.device), cache)
    return hidden[0], logits[0]


def make_drafts(model_path: str | Path, model: Qwen3_5ForCausalLM, k: int, draft: str = "mtp") -> DraftMaker | None:
    """`--speculate K --draft mtp|ngram` for a loaded model: a maker of fresh drafts (one per sequence: the server
    drafts for each row apart), None for K = 0 (off)."""
    if k == 0:
        return None
    if draft not in DRAFTS:
        raise InvalidArgument(f"unknown draft {draft!r}; choose from {', '.join(DRAFTS)}")
    check_speculate(k)  # before the head is read
    if draft == "ngram":
        return NgramDraft
    head = load_mtp(model_path, model)
    if head is None:
        raise CheckpointError(
            f"{model_path} has no multi-token-prediction head (mtp.* tensors) to draft with; use --draft ngram"
        )
    quantize_like(head, model)  # a quantized model's head drafts at the model's precision
    return lambda: MTPDraft(model, head)


def make_speculation(
    model_path: str | Path, model: Qwen3_5ForCausalLM, k: int, draft: str = "mtp"
) -> Speculation | None:
    """`--speculate K --draft mtp|ngram` for one generation: None for K = 0 (off)."""
    drafts = make_drafts(model_path, model, k, draft)
    return None if drafts is None else Speculation(drafts(), k)


# --speculate's default, decided by measurement: `qwenlite bench --speculate K` records whether speculating beat plain
# decoding for that model, precision, device and machine; `run` and `chat` without --speculate follow the record.


def decisions_path() -> Path:
    return kernels.cache_root() / "speculation.json"


def decision_key(model_path: str | Path, quant: str | None, dtype: str | None, device: str = "cpu") -> str:
    """What a measurement holds for: the resolved model path, --quant, --dtype, the device, the CPU, its kernels."""
    return " | ".join([str(Path(model_path).resolve()), f"quant {quant or '-'}", f"dtype {dtype or '-'}", device,
                       kernels.cpu_name(), f"{kernels.isa_label()} kernels"])  # fmt: skip


def read_decisions() -> dict[str, dict]:
    """The recorded measurements; an unreadable file counts as none (it is a cache: `bench` writes it again)."""
    try:
        decisions = json.loads(decisions_path().read_text())
    except (OSError, ValueError):
        return {}
    return decisions if isinstance(decisions, dict) else {}


def record_decision(key: str, k: int, draft: str, speedup: float) -> dict:
    """Record what `bench` measured: speculative decode at `speedup` times plain decode's speed with k drafts from
    `draft`. On when faster, off otherwise; returns the record."""
    record = {"speculate": k if speedup > 1 else 0, "draft": draft, "speedup": round(speedup, 3)}
    decisions = {**read_decisions(), key: record}
    path = decisions_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(decisions, indent=2) + "\n"))
    return record


def measured_default(key: str) -> tuple[int, str, float] | None:
    """(k, draft, the speed-up measured) that `bench` recorded for `key` (k = 0: off), or None if it never ran."""
    record = read_decisions().get(key)
    try:
        return int(record["speculate"]), str(record["draft"]), float(record["speedup"])
    except (TypeError, KeyError, ValueError):
        return None
