"""Request scheduler and batched runner: continuous batching over one model, on token ids, no HTTP.

One thread owns the model and a batch cache of `max_concurrency` rows of `ctx` tokens. Callers submit requests
from any thread and get events (tokens, prompt logprobs, a finish) through a callback. Between decode steps the
scheduler drops cancelled requests, admits waiting ones and prefills them one at a time into the row after the
decoding rows (at most one prefill budget per step, so a long prompt does not stall the running streams), then
runs one decode step over rows [0, n). A request that leaves hands its row to the last one (`copy_row`), so the
decoding rows stay contiguous.

Prompt-state reuse: the recurrent state cannot be rewound, so the engine keeps snapshots of a row, keyed by
the exact token ids they cover, in a byte-bounded LRU: at the prompt positions the caller names
(`snapshot_at`, e.g. where each assistant turn starts) and at the end of each generation. A new prompt restores
the longest stored prefix and prefills only the rest. The prefill is cut at the same named positions whether
or not a snapshot is restored, so a warm prompt computes exactly what a cold one does."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qwenlite.errors import ContextLengthExceeded, QwenliteError
from qwenlite.model.cache import AttentionCache, Cache, make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import PREFILL_CHUNK, context_length, run_model
from qwenlite.model.vision import ImageInput, embed_prompt, mrope_positions
from qwenlite.sample import SamplingParams, apply_processors, make_logits_processors, make_sampler
from qwenlite.serve.prompt_cache import PromptCache, image_key

log = logging.getLogger("qwenlite.serve.engine")

ECHO_CHUNK = 128  # prompt logprobs need every position's logits: (128, V) fp32 is 127 MB at V = 248320


class QueueFull(QwenliteError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # clipped to what the context leaves; 0 only with prompt_logprobs
    stop_ids: frozenset[int] = frozenset()  # end generation (not emitted)
    logprobs: int | None = None  # per generated token: its logprob and this many alternatives; None = off
    prompt_logprobs: int | None = None  # the same for each prompt token (echo); such a prompt is prefilled cold
    snapshot_at: tuple[int, ...] = ()  # prompt positions worth a snapshot for later prompts
    images: tuple[ImageInput, ...] = ()  # what the prompt's <|image_pad|> runs hold, in order


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens restored from a snapshot instead of prefilled


@dataclass
class Token:
    id: int
    logprob: float | None = None  # log-softmax of the logits after penalties, before temperature
    top_logprobs: list[tuple[int, float]] | None = None  # best first


@dataclass
class PromptLogprobs:
    logprobs: list[float | None]  # one per prompt token; the first has none
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class Finish:
    reason: str  # "stop", "length", "cancelled" or "error"
    usage: Usage
    error: str | None = None


Event = Token | PromptLogprobs | Finish


class Handle:
    """A submitted request. `cancel` from any thread: the engine drops it before its next step."""

    def __init__(self, engine: Engine, request: Request):
        self.request = request
        self.usage = Usage(prompt_tokens=len(request.prompt_ids))  # cached_tokens is set on admission
        self.cancelled = False
        self._engine = engine

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._wake()


@dataclass
class _Sequence:
    handle: Handle
    on_event: Callable[[Event], None]
    max_tokens: int
    tokens: list[int]  # prompt + generated
    keyed: tuple  # the prompt as the prompt cache keys it: image tokens stand for their image's content
    processors: list = field(default_factory=list)
    sampler: Callable[[torch.Tensor], int] | None = None
    history: torch.Tensor | None = None  # (L,) the sequence so far, for the penalties
    pieces: deque = field(default_factory=deque)  # prefill pieces left: (start, end, snapshot after)
    logits: torch.Tensor | None = None  # (V,) the next token's, after prefill
    embeds: torch.Tensor | None = None  # (1, T, hidden) a prompt with images: its embeddings from `start` on,
    positions: torch.Tensor | None = None  # (3, T) and multimodal rotary positions
    start: int = 0  # the first prompt position not restored from a snapshot
    prompt_lp: list = field(default_factory=list)
    prompt_top: list = field(default_factory=list)
    finished: str | None = None

    @property
    def request(self) -> Request:
        return self.handle.request

    def key(self, n: int) -> tuple:
        """The prompt cache's key for the first n tokens (prompt, then generated)."""
        return (self.keyed + tuple(self.tokens[len(self.keyed) : n]))[:n]


def cache_bytes(cache: Cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in ((layer.k, layer.v) if isinstance(layer, AttentionCache) else (layer.conv, layer.state))
    )


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = torch.topk(logprobs, k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


class Engine:
    def __init__(
        self,
        model: Qwen3_5ForCausalLM,
        max_concurrency: int = 4,
        max_queue: int = 64,
        ctx: int | None = None,
        cache_mb: float = 1024,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if max_concurrency < 1 or max_queue < 0:
            raise QwenliteError("max_concurrency must be >= 1 and max_queue >= 0")
        self.model = model
        self.device = model.device
        self.ctx = context_length(model, ctx)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.prefill_chunk = prefill_chunk
        self.cache = make_cache(model.config, max_concurrency, self.ctx, model.dtype, self.device)
        self.prompt_cache = PromptCache(int(cache_mb * 2**20))
        self.max_batch = 0  # the largest decode batch so far
        self.decode_steps = 0
        self._rows: list[_Sequence] = []  # decoding; _rows[i] lives in cache row i
        self._prefilling: _Sequence | None = None  # in cache row len(_rows)
        self._waiting: deque[_Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenlite-engine", daemon=True)
        self._thread.start()

    # --- any thread -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a cache row."""
        return len(self._rows) + (self._prefilling is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; `on_event` is called from the engine thread and must not block.

        Raises QueueFull, ContextLengthExceeded, or another QwenliteError for an invalid request."""
        prompt = request.prompt_ids
        if not prompt:
            raise QwenliteError("the prompt is empty")
        if len(prompt) >= self.ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt)} tokens, longer than the context of {self.ctx} tokens "
                f"(it needs at least one more for the answer)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise QwenliteError(f"prompt token ids must be in [0, {vocab})")
        if request.max_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise QwenliteError(f"max_tokens must be at least 1, got {request.max_tokens}")
        request.params.validate()
        keyed = tuple(prompt)
        if request.images:
            if getattr(self.model, "visual", None) is None:
                raise QwenliteError("this model reads no images: it has no vision tower")
            mrope_positions(prompt, request.images, self.model.config.image_token_id)  # fail here, not in the engine
            keyed = image_key(prompt, request.images, self.model.config.image_token_id)
        handle = Handle(self, request)
        seq = _Sequence(handle, on_event, min(request.max_tokens, self.ctx - len(prompt)), list(prompt), keyed)
        with self._cond:
            if self._closed:
                raise QwenliteError("the engine is shut down")
            free = max(0, self.max_concurrency - self.active)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"server busy: {self.active} requests running and {len(self._waiting)} waiting")
            self._waiting.append(seq)
            self._cond.notify()
        return handle

    def events(self, request: Request) -> Iterator[Event]:
        """Submit and iterate over the request's events until its Finish; closing the iterator cancels it."""
        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(request, q.put)
        try:
            while True:
                event = q.get()
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            handle.cancel()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not (self._waiting or self.active):
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    self._step()
                except Exception as e:  # a bug or an out-of-memory: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the engine shut down")
        with self._cond:
            for seq in self._waiting:
                self._finish(seq, "cancelled")
            self._waiting.clear()

    def _step(self) -> None:
        self._drop_cancelled()
        self._prefill()
        if self._rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for seq in [s for s in self._waiting if s.handle.cancelled]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            self._finish(self._prefilling, "cancelled")
            self._prefilling = None
        for seq in [s for s in self._rows if s.handle.cancelled]:
            self._finish(seq, "cancelled")
            self._remove(seq)

    def _fail_all(self, message: str) -> None:
        for seq in [*self._rows, *([self._prefilling] if self._prefilling else [])]:
            self._finish(seq, "error", message)
        self._rows.clear()
        self._prefilling = None

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            log.exception("event callback failed; cancelling the request")
            seq.handle.cancelled = True

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        seq.finished = reason
        self._emit(seq, Finish(reason, seq.handle.usage, error))

    # Prefill --------------------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Prefill pieces of waiting prompts, about one chunk's worth of tokens, admitting requests as rows free up."""
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefilling is None:
                with self._cond:
                    if not self._waiting or len(self._rows) >= self.max_concurrency:
                        return
                    seq = self._waiting.popleft()
                try:
                    self._admit(seq)
                except Exception as e:
                    log.exception("admitting a request failed")
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
                    continue
                self._prefilling = seq
            seq = self._prefilling
            try:
                budget -= self._prefill_piece(seq)
                if not seq.pieces:
                    self._prefilling = None
                    self._after_prefill(seq)
            except Exception as e:
                log.exception("prefill failed")
                self._prefilling = None
                self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _admit(self, seq: _Sequence) -> None:
        request, row = seq.request, len(self._rows)
        view = self.cache.rows(row, row + 1)
        start, snap = 0, None
        if request.prompt_logprobs is None:
            start, snap = self.prompt_cache.lookup(seq.keyed)
        if snap is not None:
            view.restore(snap)
        else:
            self.cache.reset_row(row)
        seq.handle.usage.cached_tokens = seq.start = start
        if request.images:  # only the images past the restored prefix are encoded
            seq.embeds, seq.positions, delta = embed_prompt(self.model, request.prompt_ids, request.images, start)
            view.rope_deltas.fill_(delta)
        # Cut at every named position past the restored prefix, so warm and cold prompts compute the same.
        n = len(request.prompt_ids)
        chunk = ECHO_CHUNK if request.prompt_logprobs is not None else self.prefill_chunk
        cuts = sorted({p for p in request.snapshot_at if start < p < n} | {n})
        for end in cuts:
            for a in range(start, end, chunk):
                b = min(a + chunk, end)
                seq.pieces.append((a, b, b == end and end < n))
            start = end
        seq.processors = make_logits_processors(request.params, n)
        seq.sampler = make_sampler(request.params)
        if seq.processors:
            seq.history = torch.tensor(request.prompt_ids)

    def _prefill_piece(self, seq: _Sequence) -> int:
        a, b, snapshot = seq.pieces.popleft()
        request, row = seq.request, len(self._rows)
        view = self.cache.rows(row, row + 1)
        ids = torch.tensor([request.prompt_ids[a:b]], device=self.device)
        k = request.prompt_logprobs
        keep = 0 if k is not None else 1
        if seq.embeds is None:
            logits = run_model(self.model, ids, view, logits_to_keep=keep)  # (1, T or 1, V)
        else:
            i, j = a - seq.start, b - seq.start
            embeds, positions = seq.embeds[:, i:j], seq.positions[:, i:j]
            logits = run_model(self.model, ids, view, logits_to_keep=keep, embeds=embeds, positions=positions)
        if k is not None:
            # Position i's logits score prompt token i + 1; the last position's the first generated token.
            targets = torch.tensor(request.prompt_ids[a + 1 : b + 1], device=self.device)
            logprobs = torch.log_softmax(logits[0, : len(targets)], dim=-1)  # (T', V)
            seq.prompt_lp += logprobs.gather(1, targets[:, None])[:, 0].tolist()
            seq.prompt_top += [_top(lp, k) if k else None for lp in logprobs]
        seq.logits = logits[0, -1]
        if snapshot and self.prompt_cache.max_bytes and seq.key(b) not in self.prompt_cache:
            self.prompt_cache.store(seq.key(b), view.snapshot())
        return b - a

    def _after_prefill(self, seq: _Sequence) -> None:
        seq.embeds = seq.positions = None
        if seq.request.prompt_logprobs is not None:
            self._emit(seq, PromptLogprobs([None, *seq.prompt_lp], [None, *seq.prompt_top]))
        if seq.max_tokens == 0:
            self._finish(seq, "length")
            return
        logits, seq.logits = seq.logits, None
        self._sample(seq, logits)
        if seq.finished:
            self._keep_state(seq, len(self._rows))
        else:
            self._rows.append(seq)

    # Decode ---------------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        n = len(self._rows)
        ids = torch.tensor([[seq.tokens[-1]] for seq in self._rows], device=self.device)  # (n, 1)
        try:
            logits = run_model(self.model, ids, self.cache.rows(0, n))[:, -1]  # (n, V)
        except Exception as e:  # nothing tells which request broke the step: all of them fail
            log.exception("decode step failed")
            self._fail_all(f"{type(e).__name__}: {e}")
            return
        self.decode_steps += 1
        self.max_batch = max(self.max_batch, n)
        for seq, row_logits in zip(list(self._rows), logits, strict=True):
            try:
                self._sample(seq, row_logits)
            except Exception as e:
                log.exception("sampling failed")
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
        for seq in [s for s in self._rows if s.finished]:
            if seq.finished in ("stop", "length"):
                self._keep_state(seq, self._rows.index(seq))
            self._remove(seq)

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> None:
        request = seq.request
        if seq.processors:
            logits = apply_processors(seq.processors, seq.history, logits)
        token = seq.sampler(logits)
        if token in request.stop_ids:
            self._finish(seq, "stop")
            return
        event = Token(token)
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            event.logprob = float(logprobs[token])
            event.top_logprobs = _top(logprobs, request.logprobs) if request.logprobs else None
        seq.tokens.append(token)
        seq.handle.usage.completion_tokens += 1
        if seq.history is not None:
            seq.history = torch.cat([seq.history, torch.tensor([token])])
        self._emit(seq, event)
        if seq.handle.usage.completion_tokens >= seq.max_tokens:
            self._finish(seq, "length")

    def _keep_state(self, seq: _Sequence, row: int) -> None:
        """Snapshot a finished generation: a next prompt (a tool result, say) may extend it."""
        if not self.prompt_cache.max_bytes or seq.request.prompt_logprobs is not None:
            return
        covered = seq.key(int(self.cache.lengths[row]))  # the last sampled token was never fed
        if covered not in self.prompt_cache:
            self.prompt_cache.store(covered, self.cache.rows(row, row + 1).snapshot())

    def _remove(self, seq: _Sequence) -> None:
        """Free a decoding row: the last decoding row moves into it, then a prefill in progress moves down one."""
        row, last = self._rows.index(seq), len(self._rows) - 1
        if row != last:
            self.cache.copy_row(last, row)
            self._rows[row] = self._rows[last]
        self._rows.pop()
        if self._prefilling is not None:
            self.cache.copy_row(last + 1, last)
