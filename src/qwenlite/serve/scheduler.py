"""Which request runs where and when, with no torch in it: the waiting queue, the cache rows, the prefill pieces,
and what a sampled token does to a sequence. serve/runner.py computes; serve/engine.py runs both in one thread.

Rows: the decoding sequences hold cache rows [0, n) in order, and a prompt being prefilled holds row n. A sequence
that leaves hands its row to the last decoding one, and the prefill moves down one, so the decoding rows stay
contiguous; `remove` says which row copies that takes.

Prefill pieces: a prompt is prefilled in pieces of at most one chunk, cut at the positions the caller names
(`snapshot_at`, e.g. where each assistant turn starts) and at every multiple of the snapshot interval, with a
snapshot after each cut. A prompt restored from a snapshot starts at one of those cuts, so a warm prompt computes
exactly the pieces a cold one does from there on; the interval snapshots let any shared prefix be reused to
within one interval, whatever the chat template's shape (llama.cpp's context checkpoints do the same)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwenlite.errors import ContextLengthExceeded, QwenliteError

if TYPE_CHECKING:  # types only: the scheduler never touches a tensor
    from qwenlite.model.vision import ImageInput
    from qwenlite.sample import SamplingParams
    from qwenlite.text.grammar import GrammarMatcher


class QueueFull(QwenliteError):
    """Every slot is busy and the waiting queue is full."""


# --- requests and their events -------------------------------------------------------------------------------


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
    adapter: int = 0  # the LoRA adapter its rows run with: 0 the base, i the model's i-th (model/adapters.py)
    grammar: GrammarMatcher | None = None  # structured output: this request's own matcher (text/grammar.py)


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

    def __init__(self, request: Request, wake: Callable[[], None]):
        self.request = request
        self.usage = Usage(prompt_tokens=len(request.prompt_ids))  # cached_tokens is set on admission
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


@dataclass(frozen=True)
class Piece:
    """Prompt positions [start, end) to prefill in one forward; `snapshot`: keep the state after it."""

    start: int
    end: int
    snapshot: bool


@dataclass
class Sequence:
    handle: Handle
    on_event: Callable[[Event], None]
    max_tokens: int
    tokens: list[int]  # prompt + generated
    keyed: tuple  # the prompt as the prompt cache keys it (image tokens stand for their image's content)
    pieces: deque[Piece] = field(default_factory=deque)  # prefill pieces left
    state: object = None  # the runner's per-sequence tensors (sampler, penalties' history, logits, image embeddings)
    finished: str | None = None

    @property
    def request(self) -> Request:
        return self.handle.request

    def key(self, n: int) -> tuple:
        """The prompt cache's key for the first n tokens (prompt, then generated)."""
        return (self.keyed + tuple(self.tokens[len(self.keyed) : n]))[:n]


def cut_prefill(n: int, start: int, snapshot_at: Iterable[int], interval: int, chunk: int) -> list[Piece]:
    """The pieces that prefill prompt positions [start, n): cut at the named positions and at every multiple of
    `interval` (0: none), with a snapshot after each cut short of the end, and at most `chunk` tokens each."""
    cuts = {p for p in snapshot_at if start < p < n} | {n}
    if interval:
        cuts |= set(range((start // interval + 1) * interval, n, interval))
    pieces = []
    for end in sorted(cuts):
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            pieces.append(Piece(a, b, b == end and end < n))
        start = end
    return pieces


# --- the scheduler ---------------------------------------------------------------------------------------------


class Scheduler:
    """The queue and the rows. `add` from any thread; everything else from the engine's thread."""

    def __init__(self, max_rows: int, max_queue: int, ctx: int, vocab_size: int):
        if max_rows < 1 or max_queue < 0:
            raise QwenliteError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_rows, self.max_queue, self.ctx, self.vocab_size = max_rows, max_queue, ctx, vocab_size
        self.rows: list[Sequence] = []  # decoding; rows[i] lives in cache row i
        self.prefilling: Sequence | None = None  # in cache row len(rows)
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.closed = False

    @property
    def active(self) -> int:
        """Requests holding a cache row."""
        return len(self.rows) + (self.prefilling is not None)

    def check(self, request: Request) -> None:
        """Raise ContextLengthExceeded or another QwenliteError for a request the engine cannot run."""
        prompt = request.prompt_ids
        if not prompt:
            raise QwenliteError("the prompt is empty", param="prompt")
        if len(prompt) >= self.ctx:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt)} tokens, longer than the context of {self.ctx} tokens "
                f"(it needs at least one more for the answer)",
                param="prompt",
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise QwenliteError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        if request.max_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise QwenliteError(f"max_tokens must be at least 1, got {request.max_tokens}", param="max_tokens")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; QueueFull when the rows and the queue are taken."""
        with self.cond:
            if self.closed:
                raise QwenliteError("the engine is shut down")
            free = max(0, self.max_rows - self.active)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"server busy: {self.active} requests running and {len(self.waiting)} waiting")
            self.waiting.append(seq)
            self.cond.notify()

    def wait_for_work(self) -> bool:
        """Block until there is something to do; False once closed."""
        with self.cond:
            while not self.closed and not (self.waiting or self.active):
                self.cond.wait()
            return not self.closed

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self) -> None:
        """Take no more requests and let `wait_for_work` return False (any thread)."""
        with self.cond:
            self.closed = True
            self.cond.notify()

    def drain(self, keep_waiting: bool = False) -> tuple[list[Sequence], list[Sequence]]:
        """-> (the sequences holding a row, those waiting), taken out (the waiting ones stay if `keep_waiting`)."""
        waiting = []
        with self.cond:
            if not keep_waiting:
                waiting = list(self.waiting)
                self.waiting.clear()
        running = [*self.rows, *([self.prefilling] if self.prefilling else [])]
        self.rows.clear()
        self.prefilling = None
        return running, waiting

    def cancelled(self) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Take out the cancelled sequences: -> (them, the row copies (src, dst) that keep the rows contiguous)."""
        with self.cond:
            gone = [s for s in self.waiting if s.handle.cancelled]
            for seq in gone:
                self.waiting.remove(seq)
        if self.prefilling is not None and self.prefilling.handle.cancelled:
            gone.append(self.prefilling)
            self.prefilling = None
        moves = []
        for seq in [s for s in self.rows if s.handle.cancelled]:
            gone.append(seq)
            moves += self.remove(seq)
        return gone, moves

    def admit(self) -> Sequence | None:
        """The next waiting sequence, now prefilling in row len(rows), if a row is free and none is prefilling."""
        with self.cond:
            if self.prefilling is not None or not self.waiting or len(self.rows) >= self.max_rows:
                return None
            self.prefilling = self.waiting.popleft()
        return self.prefilling

    def prefilled(self) -> Sequence:
        """The prefilling sequence has no pieces left: it leaves the prefill row (the caller decides where to)."""
        seq, self.prefilling = self.prefilling, None
        return seq

    def start_decoding(self, seq: Sequence) -> None:
        """`seq`, just prefilled in row len(rows), joins the decoding rows."""
        self.rows.append(seq)

    def remove(self, seq: Sequence) -> list[tuple[int, int]]:
        """Free a decoding row: the last decoding row moves into it, then a prefill in progress moves down one.
        -> the row copies (src, dst) to make in that order."""
        row, last = self.rows.index(seq), len(self.rows) - 1
        moves = []
        if row != last:
            moves.append((last, row))
            self.rows[row] = self.rows[last]
        self.rows.pop()
        if self.prefilling is not None:
            moves.append((last + 1, last))
        return moves

    @staticmethod
    def accept(seq: Sequence, token: Token) -> list[Event]:
        """What a sampled token does: a stop id finishes the sequence unseen; any other is appended and emitted,
        and finishes it at max_tokens. -> the events to send."""
        if token.id in seq.request.stop_ids:
            seq.finished = "stop"
            return [Finish("stop", seq.handle.usage)]
        seq.tokens.append(token.id)
        seq.handle.usage.completion_tokens += 1
        if seq.handle.usage.completion_tokens >= seq.max_tokens:
            seq.finished = "length"
            return [token, Finish("length", seq.handle.usage)]
        return [token]
