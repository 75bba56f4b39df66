"""The serving engine's computing half: the model, the batch cache of one row per running request, the prompt
cache, prefill pieces, the batched decode forward and sampling. serve/scheduler.py says which sequence runs in
which row; serve/engine.py runs both in one thread.

Prompt-state reuse: the recurrent state cannot be rewound, so the runner keeps snapshots of a row, keyed by the
exact token ids they cover (serve/prompt_cache.py): after the prefill pieces the scheduler marks and at the end
of each generation. A new prompt restores the longest stored prefix and prefills only the rest.

LoRA adapters (model/adapters.py, attached by io/adapters.load_adapters): a request names its adapter by index (0:
the base); before each forward the runner selects each row's, so one decode step serves rows of different adapters,
and the prompt cache keys a state with the adapter it was computed under.

Speculative decoding (`speculate` K > 0, speculative.py): each row drafts up to K tokens with a draft of its own
(the MTP head with its own cache, or prompt lookup in its own context), and one forward of the n rows x (1 + the
most drafts) positions verifies them all, a row with fewer drafts padded (the padding's KV and states are
dropped). Each row keeps its drafts up to the first the model disagrees with (greedy: the argmax; sampling: the
rejection rule, sample.verify_draft), and the engine takes its tokens one by one until one finishes it; then
each row's recurrent state is rewound to its last kept token (Cache.track / rewind), as generate.py does for one
sequence. Constrained rows (a grammar) and rows on a LoRA adapter decode one token per step in the same forward:
a grammar cannot take back tokens, and the drafts know only the base model. A step in which no row drafts is a
plain decode step."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from qwenlite.errors import InvalidArgument, QwenliteError
from qwenlite.model.adapters import adapter_selection
from qwenlite.model.cache import AttentionCache, Cache, make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import run_model, run_model_hidden
from qwenlite.model.vision import embed_prompt, mrope_positions
from qwenlite.sample import (
    apply_processors,
    draw,
    greedy,
    make_generator,
    make_logits_processors,
    make_sampler,
    probabilities,
    verify_draft,
)
from qwenlite.serve.prompt_cache import PromptCache, adapter_key, image_key
from qwenlite.serve.scheduler import PromptLogprobs, Request, Sequence, Token, cut_prefill
from qwenlite.speculative import Draft, DraftMaker, check_speculate, greedy_pick

ECHO_CHUNK = 128  # prompt logprobs need every position's logits: (128, V) fp32 is 127 MB at V = 248320


def cache_bytes(cache: Cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in ((layer.k, layer.v) if isinstance(layer, AttentionCache) else (layer.conv, layer.state))
    )


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = torch.topk(logprobs, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


@dataclass
class RowState:
    """A sequence's tensors and sampling state, kept on `Sequence.state`."""

    processors: list
    sampler: object
    history: torch.Tensor | None = None  # (L,) the sequence so far, for the penalties
    logits: torch.Tensor | None = None  # (V,) the next token's, after prefill
    embeds: torch.Tensor | None = None  # (1, T, hidden) a prompt with images: its embeddings from `start` on,
    positions: torch.Tensor | None = None  # (3, T) and multimodal rotary positions
    start: int = 0  # the first prompt position not restored from a snapshot
    prompt_lp: list = field(default_factory=list)
    prompt_top: list = field(default_factory=list)
    draft: Draft | None = None  # a speculating row's own draft
    hidden: torch.Tensor | None = None  # (n, H) final hidden states of the positions run since it last drafted
    generator: torch.Generator | None = None  # a speculating row's draws when it samples (the rejection rule)


def _fill_masks(grammars: list) -> None:
    """Each matcher's next mask; a matcher that fails leaves its mask unfilled, and its row fails when it samples."""
    for grammar in grammars:
        try:
            grammar.fill_mask()
        except QwenliteError:
            pass


class Runner:
    def __init__(
        self,
        model: Qwen3_5ForCausalLM,
        rows: int,
        ctx: int,
        cache_mb: float,
        prefill_chunk: int,
        snapshot_interval: int,
        speculate: int = 0,
        drafts: DraftMaker | None = None,
    ):
        """`speculate` K > 0: each row drafts up to K tokens per step with its own draft from `drafts`."""
        if speculate:
            check_speculate(speculate)
            if drafts is None:
                raise InvalidArgument("speculative decoding needs a draft")
        self.model, self.device = model, model.device
        self.prefill_chunk, self.snapshot_interval = prefill_chunk, snapshot_interval
        self.speculate, self.drafts = speculate, drafts
        # A verification pads the rows to 1 + K positions: a row near the context's end writes past it, then forgets.
        self.cache = make_cache(model.config, rows, ctx + speculate, model.dtype, self.device)
        # The decoding rows' view, kept while their number holds, so that its buffers for a verification's rewind are
        # reused (fresh ones cost page faults): a copy of each recurrent layer's state, ~1 MB a row at 0.8B (the
        # module path's: one per verified token)
        self.view: Cache | None = None
        self.tracked: tuple[int, list[torch.Tensor]] | None = None  # a verification's width and per-row hidden states
        self.prompt_cache = PromptCache(int(cache_mb * 2**20))
        self.adapters = adapter_selection(model)  # None: the model carries no adapters
        self.masks: ThreadPoolExecutor | None = None  # computes grammar masks while the forward runs

    @property
    def adapter_names(self) -> list[str]:
        """The model's adapters; request.adapter i (>= 1) is names[i - 1]."""
        return list(self.adapters.names) if self.adapters else []

    def key(self, request: Request) -> tuple:
        """The prompt as the prompt cache keys it; a QwenliteError for images this model cannot place or an
        adapter it does not carry."""
        if not 0 <= request.adapter <= len(self.adapter_names):
            raise InvalidArgument(f"adapter {request.adapter} does not exist: this model carries "
                                  f"{len(self.adapter_names)}", param="model")  # fmt: skip
        if not request.images:
            return adapter_key(tuple(request.prompt_ids), request.adapter)
        if getattr(self.model, "visual", None) is None:
            raise QwenliteError("this model reads no images: it has no vision tower")
        tokens = self.model.config.image_token_id, self.model.config.video_token_id
        mrope_positions(request.prompt_ids, request.images, *tokens)  # fails here, not in the engine's thread
        return adapter_key(image_key(request.prompt_ids, request.images, *tokens), request.adapter)

    def select(self, seqs: list[Sequence]) -> None:
        """Each row of the next forward on its sequence's adapter."""
        if self.adapters is not None:
            self.adapters.select([seq.request.adapter for seq in seqs])

    def move_rows(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.cache.copy_row(src, dst)

    # Prefill ------------------------------------------------------------------------------------------------------

    def start(self, seq: Sequence, row: int) -> None:
        """Put `seq`'s prompt in `row`: restore its longest stored prefix (or start empty), encode the images past
        it, and cut the rest into prefill pieces."""
        request = seq.request
        view = self.cache.rows(row, row + 1)
        start, snap = 0, None
        if request.prompt_logprobs is None:
            start, snap = self.prompt_cache.lookup(seq.keyed)
        if snap is not None:
            view.restore(snap)
        else:
            self.cache.reset_row(row)
        seq.handle.usage.cached_tokens = start
        n = len(request.prompt_ids)
        state = RowState(make_logits_processors(request.params, n), make_sampler(request.params), start=start)
        if self.speculate and request.grammar is None and request.adapter == 0:
            state.draft = self.drafts()
            state.draft.begin(n + seq.max_tokens + self.speculate)
            if request.params.temperature > 0:
                state.generator = make_generator(request.params, self.device)
        if state.processors:
            state.history = torch.tensor(request.prompt_ids)
        if request.images:  # only the images past the restored prefix are encoded
            state.embeds, state.positions, delta = embed_prompt(self.model, request.prompt_ids, request.images, start)
            view.rope_deltas.fill_(delta)
        seq.state = state
        if request.prompt_logprobs is not None:  # every position's logits: small pieces, and no snapshots
            seq.pieces.extend(cut_prefill(n, start, (), 0, ECHO_CHUNK))
        else:
            seq.pieces.extend(cut_prefill(n, start, request.snapshot_at, self.snapshot_interval, self.prefill_chunk))

    def prefill(self, seq: Sequence, row: int) -> int:
        """Run `seq`'s next prefill piece in `row`: -> its tokens."""
        piece = seq.pieces.popleft()
        a, b = piece.start, piece.end
        request, state = seq.request, seq.state
        view = self.cache.rows(row, row + 1)
        ids = torch.tensor([request.prompt_ids[a:b]], device=self.device)
        k = request.prompt_logprobs
        keep = 0 if k is not None else 1
        self.select([seq])
        embeds = positions = None
        if state.embeds is not None:
            i, j = a - state.start, b - state.start
            embeds, positions = state.embeds[:, i:j], state.positions[:, i:j]
        if state.draft is None:
            logits = run_model(self.model, ids, view, logits_to_keep=keep, embeds=embeds, positions=positions)
        else:  # the draft's first step reads every prompt position's final hidden state (the MTP head's)
            hidden = self.model.model(ids, view, embeds, positions)  # (1, T, H)
            state.hidden = hidden[0] if state.hidden is None else torch.cat([state.hidden, hidden[0]])
            logits = self.model.lm_head(hidden[:, -keep:] if keep else hidden).float()
        if k is not None:
            # Position i's logits score prompt token i + 1; the last position's the first generated token.
            targets = torch.tensor(request.prompt_ids[a + 1 : b + 1], device=self.device)
            logprobs = torch.log_softmax(logits[0, : len(targets)], dim=-1)  # (T', V)
            state.prompt_lp += logprobs.gather(1, targets[:, None])[:, 0].tolist()
            state.prompt_top += [_top(lp, k) if k else None for lp in logprobs]
        state.logits = logits[0, -1]
        if piece.snapshot and self.prompt_cache.max_bytes and seq.key(b) not in self.prompt_cache:
            self.prompt_cache.store(seq.key(b), view.snapshot())
        if not seq.pieces:
            state.embeds = state.positions = None
        return b - a

    @staticmethod
    def prompt_logprobs(seq: Sequence) -> PromptLogprobs:
        return PromptLogprobs([None, *seq.state.prompt_lp], [None, *seq.state.prompt_top])

    def first_token(self, seq: Sequence) -> Token:
        """The token after the prompt, from the prefill's last logits."""
        logits, seq.state.logits = seq.state.logits, None
        return self.sample(seq, logits)

    # Decode -------------------------------------------------------------------------------------------------------

    def propose(self, seq: Sequence) -> list[tuple[int, torch.Tensor | None]]:
        """A speculating row's drafts for the next step, (token, its distribution q or None), at most K and no more
        than its max_tokens leaves room for beside the model's own next token; none for any other row."""
        state = seq.state
        k = min(self.speculate, seq.max_tokens - seq.handle.usage.completion_tokens - 1)
        if state.draft is None or k < 1:
            return []
        plain = state.generator is None and not state.processors  # the argmax: drafts may batch it
        return state.draft.propose(seq.tokens, state.hidden, k, greedy_pick if plain else partial(self._pick, seq))[:k]

    def _pick(self, seq: Sequence, logits: torch.Tensor, drafted: list[int]) -> tuple[int, torch.Tensor | None]:
        """A draft's choice from its logits, as the row's sampler would choose after `drafted` (speculative.Pick)."""
        state = seq.state
        if state.processors:
            history = torch.cat([state.history, torch.tensor(drafted, dtype=torch.long)])
            logits = apply_processors(state.processors, history, logits)
        if state.generator is None:
            return greedy(logits), None
        q = probabilities(logits, seq.request.params)
        return draw(q, state.generator), q

    def decode(self, seqs: list[Sequence], drafts: list[list]) -> list[torch.Tensor]:
        """One forward of the decoding rows [0, n), each fed its last token and its drafts: -> per row the logits
        (1 + its drafts, V). With drafts the forward keeps each row's states for `rewind`. The rows' grammar masks
        are computed on a worker thread meanwhile (the forward releases the GIL)."""
        grammars = [seq.request.grammar for seq in seqs if seq.request.grammar is not None]
        if grammars and self.masks is None:
            self.masks = ThreadPoolExecutor(1, thread_name_prefix="qwenlite-grammar")
        pending = self.masks.submit(_fill_masks, grammars) if grammars else None
        self.select(seqs)
        self.tracked = None  # a step that failed left its own
        if not any(drafts):
            ids = torch.tensor([[seq.tokens[-1]] for seq in seqs], device=self.device)  # (n, 1)
            logits = list(run_model(self.model, ids, self.cache.rows(0, len(seqs))))  # n x (1, V)
        else:
            T = 1 + max(len(d) for d in drafts)
            ids = [[seq.tokens[-1], *(t for t, _ in d)] for seq, d in zip(seqs, drafts, strict=True)]
            ids = torch.tensor([row + row[:1] * (T - len(row)) for row in ids], device=self.device)  # (n, T)
            if self.view is None or self.view.batch_size != len(seqs):
                self.view = self.cache.rows(0, len(seqs))
            view = self.view
            view.track()
            hidden, every = run_model_hidden(self.model, ids, view)  # (n, T, H), (n, T, V)
            rows = [hidden[b, : 1 + len(d)] for b, d in enumerate(drafts)]  # the padding's are dropped
            logits = [every[b, : 1 + len(d)] for b, d in enumerate(drafts)]
            self.tracked = T, rows
        if pending is not None:
            pending.result()
        return logits

    def tokens(self, seq: Sequence, logits: torch.Tensor, drafts: list) -> Iterator[Token]:
        """`seq`'s tokens from a decode step's logits (1 + its drafts, V): its drafts up to the first the model
        disagrees with, which is replaced by the model's own choice, else all and the model's next. Lazily: the
        caller stops at a token that finishes the sequence, and the penalties see each token before the next."""
        state = seq.state
        for i, (draft, q) in enumerate(drafts):
            processed = self._process(seq, logits[i])
            if state.generator is None:
                right = greedy(processed)
                kept = right == draft
            else:
                kept, right = verify_draft(probabilities(processed, seq.request.params), q, draft, state.generator)
            yield self._token(seq, processed, right)
            if not kept:
                return
        yield self.sample(seq, logits[len(drafts)])

    def rewind(self, seqs: list[Sequence], kept: list[int]) -> None:
        """After a step with drafts: row b keeps the first kept[b] tokens it was fed (its last token and the drafts
        the engine took), its recurrent state rewound there; a draft next reads their hidden states."""
        if self.tracked is None:
            return
        T, hidden = self.tracked
        self.tracked = None
        self.view.rewind(T, kept)
        for seq, h, k in zip(seqs, hidden, kept, strict=True):
            seq.state.hidden = h[:k]

    def sample(self, seq: Sequence, logits: torch.Tensor) -> Token:
        request, state = seq.request, seq.state
        logits = self._process(seq, logits)
        # Structured output samples from the masked logits; logprobs stay the model's own (no -inf among them)
        allowed = logits if request.grammar is None else request.grammar.apply(logits.clone())
        token = state.sampler(allowed)
        if request.grammar is not None and token not in request.stop_ids:
            request.grammar.accept(token)
        return self._token(seq, logits, token)

    @staticmethod
    def _process(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        state = seq.state
        return apply_processors(state.processors, state.history, logits) if state.processors else logits

    @staticmethod
    def _token(seq: Sequence, logits: torch.Tensor, token_id: int) -> Token:
        """`token_id` chosen from `logits` (after penalties): its logprobs if asked, and the penalties' history."""
        request, state = seq.request, seq.state
        token = Token(token_id)
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            token.logprob = float(logprobs[token.id])
            token.top_logprobs = _top(logprobs, request.logprobs) if request.logprobs else None
        if state.history is not None:
            state.history = torch.cat([state.history, torch.tensor([token.id])])
        return token

    def keep_state(self, seq: Sequence, row: int) -> None:
        """Snapshot a finished generation: a next prompt (a tool result, say) may extend it."""
        if not self.prompt_cache.max_bytes or seq.request.prompt_logprobs is not None:
            return
        covered = seq.key(int(self.cache.lengths[row]))  # the last sampled token was never fed
        if covered not in self.prompt_cache:
            self.prompt_cache.store(covered, self.cache.rows(row, row + 1).snapshot())
