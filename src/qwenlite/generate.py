"""Generation in three layers: `generate_tokens` yields token ids, `stream` yields text chunks (answer and
reasoning apart, stop strings, finish reason, timings), `generate` returns the answer as a string.

The core works on token ids; only `stream` knows the tokenizer."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from qwenlite.errors import InvalidArgument, QwenliteError
from qwenlite.model.cache import Cache, make_cache
from qwenlite.model.qwen3_5 import Qwen3_5ForCausalLM
from qwenlite.model.runner import PREFILL_CHUNK, context_length, run_model
from qwenlite.model.vision import ImageInput, embed_prompt
from qwenlite.sample import (
    SamplingParams,
    apply_processors,
    draw,
    greedy,
    make_generator,
    make_logits_processors,
    make_sampler,
    probabilities,
    verify_draft,
)
from qwenlite.speculative import Speculation, forward_hidden, greedy_pick, verify_forward
from qwenlite.text.grammar import GrammarMatcher
from qwenlite.text.textstream import TextStream
from qwenlite.text.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    finish_reason: str = "length"  # "stop" once an end-of-turn token or a stop string ends generation
    draft_tokens: int = 0  # speculative decoding: tokens drafted, drafts the model kept, verification forwards
    accepted_tokens: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification forward: the kept drafts and the model's own next token."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes from prefill; decode steps produce the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    def summary(self) -> str:
        line = (
            f"prompt {self.prompt_tokens} tok, {self.prompt_tokens_per_second:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, {self.decode_tokens_per_second:.1f} tok/s | "
            f"time to first token {self.time_to_first_token * 1000:.0f} ms"
        )
        if self.verify_steps:
            line += (
                f" | speculation: acceptance {self.acceptance_rate:.1%}, "
                f"{self.mean_accepted_length:.2f} tok per verification"
            )
        return line


def prefill(
    model: Qwen3_5ForCausalLM,
    ids: Sequence[int],
    cache: Cache,
    chunk: int = PREFILL_CHUNK,
    images: Sequence[ImageInput] = (),
) -> torch.Tensor:
    """Run the prompt through the model in pieces of `chunk` tokens; returns the last position's logits (V,).
    `images` (images and videos) fill the prompt's `<|image_pad|>` / `<|video_pad|>` runs, in order
    (io/images.expand_image_tokens and io/video.expand_video_tokens lay them out)."""
    device = model.device
    logits = embeds = positions = None
    if images:
        embeds, positions, delta = embed_prompt(model, ids, images)
        cache.rope_deltas.fill_(delta)
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start : start + chunk]], device=device)
        if embeds is None:
            logits = run_model(model, piece, cache, logits_to_keep=1)
        else:
            end = start + piece.shape[1]
            logits = run_model(model, piece, cache, 1, embeds[:, start:end], positions[:, start:end])
    return logits[0, -1]


def decode_step(model: Qwen3_5ForCausalLM, token: int, cache: Cache) -> torch.Tensor:
    """One token in, the next token's logits (V,) out."""
    ids = torch.tensor([[token]], device=model.device)
    return run_model(model, ids, cache)[0, -1]


@torch.inference_mode()
def generate_tokens(
    model: Qwen3_5ForCausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Iterable[int] = (),
    max_context: int | None = None,
    stats: GenerationStats | None = None,
    speculation: Speculation | None = None,
    images: Sequence[ImageInput] = (),
    grammar: GrammarMatcher | None = None,
) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded), `max_tokens`, or the context is full.

    `stats`, if given, is filled in as generation goes. `speculation`: the same tokens (the same distribution when
    sampling), drafted and verified several at a time (speculative.py). `images` go to `prefill`. `grammar`: only
    tokens it allows are sampled (text/grammar.py); its next mask is computed on a worker thread while the model
    runs the decode step."""
    params.validate()
    if not prompt_ids:
        raise QwenliteError("the prompt is empty")
    ctx = context_length(model, max_context)
    if len(prompt_ids) >= ctx:
        raise QwenliteError(f"the prompt is {len(prompt_ids)} tokens, longer than the context of {ctx} tokens")
    max_tokens = min(max_tokens, ctx - len(prompt_ids))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    stop = frozenset(stop_ids)
    if speculation is not None:
        if grammar is not None:
            raise InvalidArgument("constrained decoding does not combine with speculative decoding yet: drop one")
        if images:
            raise QwenliteError("speculative decoding does not take images yet: drop --speculate for this prompt")
        yield from speculative_tokens(model, prompt_ids, params, max_tokens, stop, speculation, stats)
        return
    processors = make_logits_processors(params, len(prompt_ids))
    sample = make_sampler(params)
    history = torch.tensor(list(prompt_ids)) if processors else None
    cache = make_cache(
        model.config,
        max_seq_len=len(prompt_ids) + max_tokens,
        dtype=model.dtype,
        device=model.device,
    )

    pending = None  # the grammar's next mask, computed on a worker thread during the decode step
    masks = ThreadPoolExecutor(1, thread_name_prefix="grammar") if grammar is not None else None
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, images=images)
    for n in range(max_tokens):
        if processors:
            logits = apply_processors(processors, history, logits)
        if grammar is not None:
            if pending is not None:
                pending.result()
            grammar.apply(logits)
        token = sample(logits)
        now = time.perf_counter()
        if n == 0:
            stats.prefill_seconds = stats.time_to_first_token = now - t0
        if token in stop:
            stats.finish_reason = "stop"
            return
        stats.generated_tokens += 1
        stats.decode_seconds = now - t0 - stats.prefill_seconds
        if grammar is not None:
            grammar.accept(token)
        yield token
        if n + 1 == max_tokens:
            return
        if history is not None:
            history = torch.cat([history, torch.tensor([token])])
        if masks is not None:
            pending = masks.submit(grammar.fill_mask)
        logits = decode_step(model, token, cache)


def speculative_tokens(
    model: Qwen3_5ForCausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop: frozenset[int],
    speculation: Speculation,
    stats: GenerationStats,
) -> Iterator[int]:
    """`generate_tokens` with speculation (which has checked its arguments; see speculative.py): the same tokens
    yielded, the same stops. `stats` also counts drafted and accepted tokens and verification steps."""
    processors = make_logits_processors(params, len(prompt_ids))
    generator = make_generator(params, model.device) if params.temperature > 0 else None
    history = list(prompt_ids)

    def process(logits: torch.Tensor, context: list[int]) -> torch.Tensor:
        return apply_processors(processors, torch.tensor(context), logits) if processors else logits

    def pick(logits: torch.Tensor, drafted: list[int]) -> tuple[int, torch.Tensor | None]:
        logits = process(logits, history + drafted)
        if generator is None:
            return greedy(logits), None
        q = probabilities(logits, params)
        return draw(q, generator), q

    plain_pick = greedy_pick if generator is None and not processors else pick  # the argmax: drafts may batch it

    def choose(logits: torch.Tensor, context: list[int]) -> int:
        logits = process(logits, context)
        return greedy(logits) if generator is None else draw(probabilities(logits, params), generator)

    # The verification writes the pending token and k drafts, within the last of max_tokens (k is capped so).
    max_seq_len = len(prompt_ids) + max_tokens
    cache = make_cache(model.config, max_seq_len=max_seq_len, dtype=model.dtype, device=model.device)
    draft = speculation.draft
    draft.begin(max_seq_len)
    t0 = time.perf_counter()
    hidden, logits = forward_hidden(model, prompt_ids, cache)
    out = [choose(logits, history)]
    stats.prefill_seconds = stats.time_to_first_token = time.perf_counter() - t0
    produced = 0
    while True:
        for token in out:
            if token in stop:
                stats.finish_reason = "stop"
                return
            produced += 1
            stats.generated_tokens += 1
            stats.decode_seconds = time.perf_counter() - t0 - stats.prefill_seconds
            yield token
            history.append(token)
            if produced == max_tokens:
                return
        k = min(speculation.k, max_tokens - produced - 1)
        drafts = draft.propose(history, hidden, k, plain_pick)[:k] if k > 0 else []
        ids = [history[-1]] + [t for t, _ in drafts]
        hidden, rows = verify_forward(model, ids, cache)  # (T, H), (T, V)
        out = []
        for i, (token, q) in enumerate(drafts):
            logits = process(rows[i], history + out)
            if generator is None:
                right = greedy(logits)
                kept = right == token
            else:
                kept, right = verify_draft(probabilities(logits, params), q, token, generator)
            out.append(right)
            if not kept:
                break
        else:
            out.append(choose(rows[len(drafts)], history + out))
        cache.rewind(len(ids), len(out))
        hidden = hidden[: len(out)]
        stats.draft_tokens += len(drafts)
        stats.accepted_tokens += len(out) - 1
        stats.verify_steps += 1


@dataclass
class Chunk:
    text: str = ""  # answer text
    reasoning: str = ""  # text inside <think>...</think>
    finish_reason: str | None = None  # "stop" or "length" on the last chunk
    stats: GenerationStats | None = None  # on the last chunk
    token_ids: list[int] = field(default_factory=list)


def stream(
    model: Qwen3_5ForCausalLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int = 512,
    stop: Sequence[str] = (),
    max_context: int | None = None,
    speculation: Speculation | None = None,
    images: Sequence[ImageInput] = (),
    grammar: GrammarMatcher | None = None,
) -> Iterator[Chunk]:
    """Yield text chunks as tokens arrive: reasoning and answer apart, never a broken UTF-8 sequence, stop
    strings cut out. The last chunk carries the finish reason and the timings."""
    text = TextStream(tokenizer, prompt_ids, stop)
    stats = GenerationStats()
    eos = tokenizer.eos_token_ids
    tokens = generate_tokens(
        model, prompt_ids, params, max_tokens, eos, max_context, stats, speculation, images, grammar
    )
    for token in tokens:
        delta, hit = text.add(token)
        if delta:
            yield Chunk(text=delta.text, reasoning=delta.reasoning, token_ids=[token])
        if hit:
            stats.finish_reason = "stop"
            break
    else:
        delta = text.finish()
        if delta:
            yield Chunk(text=delta.text, reasoning=delta.reasoning)
    tokens.close()
    yield Chunk(finish_reason=stats.finish_reason, stats=stats)


def generate(
    model: Qwen3_5ForCausalLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int = 512,
    stop: Sequence[str] = (),
) -> str:
    """The whole answer (reasoning left out) as one string."""
    return "".join(c.text for c in stream(model, tokenizer, prompt_ids, params, max_tokens, stop))
