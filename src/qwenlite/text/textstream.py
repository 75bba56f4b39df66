"""Token ids in, text out, one token at a time: the text layer shared by `generate.stream` and the server.

`TextStream` splits reasoning (inside <think>...</think>) from the answer, never emits a broken UTF-8
sequence, and cuts stop strings out. It holds no model and no loop, so a batched engine can feed each
request's tokens as they come."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qwenlite.text.tokenizer import IM_START, IncrementalDetokenizer, Tokenizer


class StopMatcher:
    """Holds back the tail of the text that could still grow into a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def starts_in_reasoning(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> bool:
    """True when the prompt ends inside an open <think> block (the Qwen3.5 template opens one for the
    assistant when thinking is on), so the first generated tokens are reasoning."""
    think, end_think = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    im_start = tokenizer.token_to_id(IM_START)
    for t in reversed(prompt_ids):
        if t == end_think or t == im_start:
            return False
        if t == think:
            return True
    return False


CHANNEL_OPENERS = (IM_START, "<think>", "</think>")


@dataclass
class Delta:
    text: str = ""  # answer text
    reasoning: str = ""  # text inside <think>...</think>

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning)


class TextStream:
    """Feed generated token ids with `add`; call `finish` when generation ends without a stop string."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.think, self.end_think = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        self.in_reasoning = starts_in_reasoning(tokenizer, prompt_ids)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stop)
        # Newlines that open a channel (the answer of a chat prompt, after <think> / </think>) are dropped, and so
        # are those that close the reasoning: held back until more reasoning shows they were inside it. A prompt
        # with none of those tokens (a raw continuation) opens no channel: its continuation comes out exactly.
        openers = {tokenizer.token_to_id(t) for t in CHANNEL_OPENERS}
        self.at_channel_start = not openers.isdisjoint(prompt_ids)
        self.held = ""

    def _emit(self, text: str) -> Delta:
        if self.at_channel_start:
            text = text.lstrip("\n")
            self.at_channel_start = not text
        if self.in_reasoning:
            text = self.held + text
            self.held = text[len(text.rstrip("\n")) :]
            text = text[: len(text) - len(self.held)]
            return Delta(reasoning=text)
        return Delta(text=text)

    def add(self, token: int) -> tuple[Delta, bool]:
        """One generated token -> (the text it completes, possibly empty; whether a stop string was hit)."""
        if token in (self.think, self.end_think):
            # Switch channels: what the detokenizer and matcher hold belongs to the channel being left.
            delta = self._emit(self.matcher.flush() + self.detok.flush())
            self.in_reasoning, self.at_channel_start, self.held = token == self.think, True, ""
            return delta, False
        text, hit = self.matcher.push(self.detok.add(token))
        return self._emit(text), hit

    def finish(self) -> Delta:
        """The text still held back once generation has ended (by a stop id or a length limit)."""
        text, hit = self.matcher.push(self.detok.flush())
        return self._emit(text if hit else text + self.matcher.flush())
