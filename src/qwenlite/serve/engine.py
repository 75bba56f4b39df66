"""Continuous batching over one model, on token ids, no HTTP: serve/scheduler.py decides (the queue, the rows,
the prefill pieces, what a token does), serve/runner.py computes (the model, the caches, sampling), and the
engine runs them in one thread.

Callers submit requests from any thread and get events (tokens, prompt logprobs, a finish) through a callback.
Between decode steps the engine drops cancelled requests, admits waiting ones and prefills them one piece at a
time into the row after the decoding rows (at most one chunk's worth of tokens per step, so a long prompt does
not stall the running streams), then runs one decode step over the decoding rows. With speculative decoding a
step verifies each row's drafts and gives it one or more tokens (serve/runner.py), taken one by one through the
scheduler, so a stop id, max_tokens or a listener's stop string ends a row where plain decoding would."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import PREFILL_CHUNK, context_length
from qwenlite.serve.runner import Runner, cache_bytes
from qwenlite.serve.scheduler import (
    Event,
    Finish,
    Handle,
    PromptLogprobs,
    QueueFull,
    Request,
    Scheduler,
    Sequence,
    Token,
    Usage,
)
from qwenlite.speculative import DraftMaker

__all__ = ["Engine", "Event", "Finish", "PromptLogprobs", "QueueFull", "Request", "Token", "Usage", "cache_bytes"]

log = logging.getLogger("qwenlite.serve.engine")

SNAPSHOT_INTERVAL = 1024  # prompt tokens between snapshots, whatever the template; a 0.8B snapshot is ~20 MB + KV


class Engine:
    def __init__(
        self,
        model: Qwen3_5ForCausalLM,
        max_concurrency: int = 4,
        max_queue: int = 64,
        ctx: int | None = None,
        cache_mb: float = 1024,
        prefill_chunk: int = PREFILL_CHUNK,
        snapshot_interval: int = SNAPSHOT_INTERVAL,
        speculate: int = 0,
        drafts: DraftMaker | None = None,
    ):
        """`snapshot_interval`: keep the prompt state every this many tokens (0: only where requests ask).
        `speculate` K > 0: each row drafts up to K tokens a step with its own draft from `drafts`
        (speculative.make_drafts)."""
        self.model = model
        self.ctx = context_length(model, ctx)
        self.max_concurrency, self.max_queue, self.speculate = max_concurrency, max_queue, speculate
        self.prefill_chunk = prefill_chunk
        self.scheduler = Scheduler(max_concurrency, max_queue, self.ctx, model.config.vocab_size)
        self.runner = Runner(
            model, max_concurrency, self.ctx, cache_mb, prefill_chunk, snapshot_interval, speculate, drafts
        )
        self.cache, self.prompt_cache = self.runner.cache, self.runner.prompt_cache
        self.max_batch = 0  # the largest decode batch so far
        self.decode_steps = 0
        self.verifications = 0  # speculation: rows whose drafts a step verified, their drafts, the drafts kept
        self.drafted_tokens = self.accepted_tokens = 0
        self._thread = threading.Thread(target=self._run, name="qwenlite-engine", daemon=True)
        self._thread.start()

    # --- any thread -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a cache row."""
        return self.scheduler.active

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters the model carries; Request.adapter i (>= 1) runs with names[i - 1]."""
        return self.runner.adapter_names

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; `on_event` is called from the engine thread and must not block.

        Raises QueueFull, ContextLengthExceeded, or another QwenliteError for an invalid request."""
        self.scheduler.check(request)
        request.params.validate()
        keyed = self.runner.key(request)
        handle = Handle(request, self.scheduler.wake)
        prompt = request.prompt_ids
        self.scheduler.add(
            Sequence(handle, on_event, min(request.max_tokens, self.ctx - len(prompt)), list(prompt), keyed)
        )
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
        self.scheduler.stop()
        self._thread.join()

    # --- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self.scheduler.wait_for_work():
                try:
                    self._step()
                except Exception as e:  # a bug or an out-of-memory: fail what runs, keep serving
                    log.exception("engine step failed")
                    self._fail_running(f"{type(e).__name__}: {e}")
        running, waiting = self.scheduler.drain()
        for seq in running:
            self._finish(seq, "error", "the engine shut down")
        for seq in waiting:
            self._finish(seq, "cancelled")

    def _step(self) -> None:
        gone, moves = self.scheduler.cancelled()
        for seq in gone:
            self._finish(seq, "cancelled")
        self.runner.move_rows(moves)
        self._prefill()
        if self.scheduler.rows:
            self._decode()

    def _fail_running(self, message: str) -> None:
        running, _ = self.scheduler.drain(keep_waiting=True)
        for seq in running:
            self._finish(seq, "error", message)

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            log.exception("event callback failed; cancelling the request")
            seq.handle.cancelled = True

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finished = reason
        self._emit(seq, Finish(reason, seq.handle.usage, error))

    def _accept(self, seq: Sequence, token: Token) -> None:
        for event in self.scheduler.accept(seq, token):
            self._emit(seq, event)

    # Prefill --------------------------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Prefill pieces of waiting prompts, about one chunk's worth of tokens, admitting requests as rows free up."""
        budget = self.prefill_chunk
        while budget > 0:
            seq = self.scheduler.prefilling
            row = len(self.scheduler.rows)
            if seq is None:
                seq = self.scheduler.admit()
                if seq is None:
                    return
                try:
                    self.runner.start(seq, row)
                except Exception as e:
                    log.exception("admitting a request failed")
                    self.scheduler.prefilled()
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
                    continue
            try:
                budget -= self.runner.prefill(seq, row)
                if not seq.pieces:
                    self.scheduler.prefilled()
                    self._after_prefill(seq, row)
            except Exception as e:
                log.exception("prefill failed")
                if self.scheduler.prefilling is seq:
                    self.scheduler.prefilled()
                self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _after_prefill(self, seq: Sequence, row: int) -> None:
        if seq.request.prompt_logprobs is not None:
            self._emit(seq, self.runner.prompt_logprobs(seq))
        if seq.max_tokens == 0:
            self._finish(seq, "length")
            return
        self._accept(seq, self.runner.first_token(seq))
        if seq.finished:
            self.runner.keep_state(seq, row)
        else:
            self.scheduler.start_decoding(seq)

    # Decode ---------------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = list(self.scheduler.rows)
        try:
            drafts = [self.runner.propose(seq) for seq in rows]
            logits = self.runner.decode(rows, drafts)
        except Exception as e:  # nothing tells which request broke the step: all of them fail
            log.exception("decode step failed")
            self._fail_running(f"{type(e).__name__}: {e}")
            return
        self.decode_steps += 1
        self.max_batch = max(self.max_batch, len(rows))
        kept = []  # tokens of each row's forward it keeps: the engine took one token after each
        for seq, row_logits, row_drafts in zip(rows, logits, drafts, strict=True):
            taken = 0
            try:
                for token in self.runner.tokens(seq, row_logits, row_drafts):
                    taken += 1
                    self._accept(seq, token)
                    if seq.finished:
                        break
            except Exception as e:
                log.exception("sampling failed")
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
            kept.append(max(taken, 1))
            if row_drafts:
                self.verifications += 1
                self.drafted_tokens += len(row_drafts)
                self.accepted_tokens += max(taken - 1, 0)
        self.runner.rewind(rows, kept)
        for seq in [s for s in rows if s.finished]:
            if seq.finished in ("stop", "length"):
                self.runner.keep_state(seq, self.scheduler.rows.index(seq))
            self.runner.move_rows(self.scheduler.remove(seq))
