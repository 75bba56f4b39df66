"""The engine on a tiny random checkpoint (real vocabulary): continuous batching gives each request what it gets
alone, prompt-state reuse prefills only the new tokens and computes exactly what a cold prompt does, and the
queue, cancellation and context limits hold."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from qwenlite.errors import ContextLengthExceeded, QwenliteError
from qwenlite.generate import generate_tokens
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.model.cache import make_cache
from qwenlite.model.runner import run_model
from qwenlite.sample import SamplingParams
from qwenlite.serve import runner as runner_module
from qwenlite.serve.engine import Engine, Finish, PromptLogprobs, QueueFull, Request, Token
from qwenlite.serve.openai import turn_starts
from qwenlite.serve.prompt_cache import PromptCache, snapshot_bytes
from qwenlite.serve.scheduler import cut_prefill
from qwenlite.text.tokenizer import Tokenizer

from helpers import tiny_checkpoint, wait_until

GREEDY = SamplingParams(temperature=0)
CTX = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory)
    return load_checkpoint(path).model, Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def engine(tiny):
    engine = Engine(tiny[0], max_concurrency=8, max_queue=8, ctx=CTX)
    yield engine
    engine.close()


def chat_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, enable_thinking=False))


def run(engine: Engine, request: Request) -> tuple[list[Token], Finish, list]:
    tokens, others = [], []
    for event in engine.events(request):
        (tokens if isinstance(event, Token) else others).append(event)
    return tokens, others[-1], others[:-1]


def reference(model, prompt, params, max_tokens) -> list[int]:
    return list(generate_tokens(model, prompt, params, max_tokens, max_context=CTX))


def test_batched_requests_that_join_and_leave_match_generate(tiny, engine):
    """Eight requests, two of them joining a running batch, different prompt lengths and max_tokens, greedy,
    seeded sampling and penalties: each gets exactly the tokens `generate_tokens` gives it alone. (Sampling keeps
    top_k: a random model's distribution is nearly flat over 248K tokens, where batched rounding could move a draw.)"""
    model, tok = tiny
    settings = [GREEDY] * 5 + [
        SamplingParams(temperature=0.9, top_k=50, seed=7),
        SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3),
    ]
    prompts = [chat_ids(tok, [{"role": "user", "content": "word " * (3 * i + 1)}]) for i in range(8)]
    lengths = [12 + 3 * i for i in range(8)]
    queues = [queue.SimpleQueue() for _ in prompts]
    engine.max_batch = 0
    for i in range(6):
        engine.submit(Request(prompts[i], settings[i], lengths[i]), queues[i].put)
    first = queues[0].get(timeout=10)
    assert isinstance(first, Token)  # the batch is running: the last two join it
    for i in (6, 7):
        engine.submit(Request(prompts[i], settings[i], lengths[i]), queues[i].put)
    for i, q in enumerate(queues):
        events = [first] if i == 0 else []
        while not isinstance(event := q.get(timeout=30), Finish):
            events.append(event)
        assert event.reason == "length" and event.usage.completion_tokens == lengths[i]
        assert [e.id for e in events] == reference(model, prompts[i], settings[i], lengths[i]), f"request {i}"
    assert engine.max_batch == 8
    wait_until(lambda: engine.active == 0, timeout=5)


def count_prefilled_tokens(monkeypatch) -> list[int]:
    """Tokens the engines run through prefill (run_model called with logits_to_keep), one entry per piece."""
    pieces = []

    def counting(model, ids, cache, **kwargs):
        if "logits_to_keep" in kwargs:
            pieces.append(ids.shape[1])
        return run_model(model, ids, cache, **kwargs)

    monkeypatch.setattr(runner_module, "run_model", counting)
    return pieces


def test_prompt_state_reuse_prefills_only_the_new_tokens_and_matches_a_cold_prompt(tiny, monkeypatch):
    """Turn 2 restores the snapshot taken where turn 1's answer starts and prefills the rest, and only the rest: its
    logprobs are bit-identical to a cold engine's, and its tokens equal `generate_tokens`."""
    model, tok = tiny
    prefilled = count_prefilled_tokens(monkeypatch)
    header = tok.encode("<|im_start|>assistant\n")
    warm = Engine(model, max_concurrency=2, ctx=CTX)
    cold = Engine(model, max_concurrency=2, ctx=CTX, cache_mb=0)
    try:
        turn1 = [{"role": "user", "content": "Tell me about the sea."}]
        ids1 = chat_ids(tok, turn1)
        tokens, finish, _ = run(warm, Request(ids1, GREEDY, 6, snapshot_at=turn_starts(ids1, header)))
        assert finish.usage.cached_tokens == 0
        answer = tok.decode([t.id for t in tokens])
        turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the sky?"}]
        ids2 = chat_ids(tok, turn2)
        shared = turn_starts(ids1, header)[-1]  # turn 1's prompt up to its answer
        assert ids2[:shared] == ids1[:shared] and ids2[shared] != ids1[shared]

        request = Request(ids2, GREEDY, 8, logprobs=5, snapshot_at=turn_starts(ids2, header))
        prefilled.clear()
        got, finish, _ = run(warm, request)
        assert finish.usage.cached_tokens == shared and finish.usage.prompt_tokens == len(ids2)
        assert sum(prefilled) == len(ids2) - shared  # what the model ran, not only what usage reports
        prefilled.clear()
        expected, cold_finish, _ = run(cold, request)
        assert cold_finish.usage.cached_tokens == 0 and sum(prefilled) == len(ids2)
        assert [(t.id, t.logprob, t.top_logprobs) for t in got] == [(t.id, t.logprob, t.top_logprobs) for t in expected]
        assert [t.id for t in got] == reference(model, ids2, GREEDY, 8)
    finally:
        warm.close()
        cold.close()


def test_interval_snapshots_reuse_a_shared_prefix_whatever_the_template(tiny, monkeypatch):
    """No named positions at all (a template whose assistant header `turn_starts` cannot find): the snapshots
    taken every `snapshot_interval` tokens still give a second prompt that shares 45 tokens the state after 32,
    and it computes bit-identically what a cold engine (same cuts, no cache) computes."""
    model, tok = tiny
    prefilled = count_prefilled_tokens(monkeypatch)
    warm = Engine(model, max_concurrency=1, ctx=CTX, snapshot_interval=16)
    cold = Engine(model, max_concurrency=1, ctx=CTX, snapshot_interval=16, cache_mb=0)
    try:
        shared = tok.encode("the shared part of both documents, " * 8)[:45]
        first = shared + tok.encode(" and then the first one ends here.")
        second = shared + tok.encode(" but the second one goes somewhere else entirely, far away.")
        assert first[45] != second[45]
        run(warm, Request(first, GREEDY, 3))
        request = Request(second, GREEDY, 6, logprobs=3)
        prefilled.clear()
        got, finish, _ = run(warm, request)
        assert finish.usage.cached_tokens == 32  # the last interval inside the shared prefix
        assert sum(prefilled) == len(second) - 32
        expected, cold_finish, _ = run(cold, request)
        assert cold_finish.usage.cached_tokens == 0
        assert [(t.id, t.logprob, t.top_logprobs) for t in got] == [(t.id, t.logprob, t.top_logprobs) for t in expected]
    finally:
        warm.close()
        cold.close()


def test_a_prompt_that_extends_a_finished_generation_continues_from_its_state(tiny, monkeypatch):
    """A tool result appended to the answer: the state at the end of the generation is restored, and only the
    tokens after it are prefilled."""
    model, tok = tiny
    prefilled = count_prefilled_tokens(monkeypatch)
    engine = Engine(model, max_concurrency=1, ctx=CTX)
    try:
        prompt = chat_ids(tok, [{"role": "user", "content": "Call a tool."}])
        tokens, finish, _ = run(engine, Request(prompt, GREEDY, 5))
        generated = [t.id for t in tokens]
        follow = prompt + generated + tok.encode("<|im_end|>\n<|im_start|>user\n<tool_response>\n42")
        prefilled.clear()
        got, finish, _ = run(engine, Request(follow, GREEDY, 6))
        # finished by length: the last sampled token was never fed, so the state covers one token less
        assert finish.usage.cached_tokens == len(prompt) + len(generated) - 1
        assert sum(prefilled) == len(follow) - finish.usage.cached_tokens
        assert [t.id for t in got] == reference(model, follow, GREEDY, 6)
    finally:
        engine.close()


def test_prompt_logprobs_score_every_prompt_token(tiny, engine):
    """echo + logprobs with max_tokens 0: a prefill in pieces (past the 128-token echo chunk) that returns each
    prompt token's log-probability, as a full forward computes it."""
    model, tok = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 14)[:150]
    tokens, finish, (prompt,) = run(engine, Request(ids, GREEDY, 0, prompt_logprobs=3))
    assert tokens == [] and finish.reason == "length" and finish.usage.completion_tokens == 0
    assert isinstance(prompt, PromptLogprobs) and len(prompt.logprobs) == len(ids) and prompt.logprobs[0] is None
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # (T, V)
    expected = full[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(prompt.logprobs[1:]), expected, atol=1e-4)
    best = [top[0][0] for top in prompt.top_logprobs[1:]]
    assert best == full[:-1].argmax(-1).tolist() and all(len(top) == 3 for top in prompt.top_logprobs[1:])


def test_a_full_queue_refuses_at_once(tiny):
    engine = Engine(tiny[0], max_concurrency=1, max_queue=1, ctx=CTX)
    try:
        prompt = tiny[1].encode("hello there")
        first = engine.submit(Request(prompt, GREEDY, 400), lambda e: None)
        second = engine.submit(Request(prompt, GREEDY, 400), lambda e: None)
        with pytest.raises(QueueFull):
            engine.submit(Request(prompt, GREEDY, 400), lambda e: None)
        first.cancel()
        second.cancel()
        wait_until(lambda: engine.active == 0 and engine.waiting == 0, timeout=5)
        tokens, finish, _ = run(engine, Request(prompt, GREEDY, 3))  # and it keeps serving
        assert finish.reason == "length" and len(tokens) == 3
    finally:
        engine.close()


def test_cancelling_frees_the_slot_before_the_next_step(tiny, engine):
    """Cancelled during a step (here from its own listener, as its third token is emitted, so the timing is exact):
    no token after that one, no decode step between the cancel and its Finish, and its row is free."""
    prompt = tiny[1].encode("a long story")
    tokens, steps, finish = [], {}, []
    handed_back = threading.Event()

    def on_event(event):
        if isinstance(event, Token):
            tokens.append(event.id)
            if len(tokens) == 3:
                assert handed_back.wait(5)
                handle.cancel()
                steps["at cancel"] = engine.decode_steps
        else:
            steps["at finish"] = engine.decode_steps
            finish.append(event)

    handle = engine.submit(Request(prompt, GREEDY, 400), on_event)
    handed_back.set()
    wait_until(lambda: finish, timeout=10)
    assert finish[0].reason == "cancelled" and len(tokens) == 3 and finish[0].usage.completion_tokens == 3
    assert steps["at finish"] == steps["at cancel"]
    wait_until(lambda: engine.active == 0, timeout=2)


def test_cancelling_from_another_thread_costs_at_most_the_step_in_flight(tiny, engine):
    """cancel() from the caller's thread, mid-decode: the step running then may still emit one token; the next
    step does not run for it."""
    prompt = tiny[1].encode("a long story")
    events: queue.SimpleQueue = queue.SimpleQueue()
    after_cancel, handle = [], []

    def on_event(event):
        if handle and handle[0].cancelled:
            after_cancel.append((event, engine.decode_steps))
        events.put(event)

    handle.append(engine.submit(Request(prompt, GREEDY, 400), on_event))
    for _ in range(3):
        assert isinstance(events.get(timeout=10), Token)
    handle[0].cancel()
    steps = engine.decode_steps
    wait_until(lambda: after_cancel and isinstance(after_cancel[-1][0], Finish), timeout=5)
    *late, (finish, steps_at_finish) = after_cancel
    assert finish.reason == "cancelled"
    assert len(late) <= 1 and all(isinstance(e, Token) for e, _ in late)
    assert steps_at_finish - steps <= 1
    wait_until(lambda: engine.active == 0, timeout=2)


def test_the_context_limits_each_request(tiny):
    model, tok = tiny
    engine = Engine(model, max_concurrency=2, ctx=32)
    try:
        with pytest.raises(ContextLengthExceeded, match="longer than the context"):
            engine.submit(Request(list(range(1000, 1032)), GREEDY, 5), lambda e: None)
        ids = list(range(1000, 1029))  # 29 tokens: 3 fit
        tokens, finish, _ = run(engine, Request(ids, GREEDY, 10))
        assert finish.reason == "length" and len(tokens) == 3
        assert [t.id for t in tokens] == list(generate_tokens(model, ids, GREEDY, 10, max_context=32))
    finally:
        engine.close()


def test_a_listener_that_fails_cancels_only_its_own_request(tiny, engine):
    """The failing listener's request stops at once (its first token raises; the step in flight may emit one more,
    then it is cancelled); the other request runs to its end with the tokens it gets alone."""
    seen = []

    def broken(event):
        seen.append(event)
        raise RuntimeError("client went away")

    prompt = tiny[1].encode("hello")
    engine.submit(Request(prompt, GREEDY, 300), broken)
    tokens, finish, _ = run(engine, Request(prompt, GREEDY, 4))
    assert finish.reason == "length" and [t.id for t in tokens] == reference(tiny[0], prompt, GREEDY, 4)
    wait_until(lambda: engine.active == 0, timeout=2)
    *emitted, last = seen
    assert isinstance(last, Finish) and last.reason == "cancelled"
    assert 1 <= len(emitted) <= 2 and all(isinstance(e, Token) for e in emitted)


def test_invalid_requests_are_refused_at_submit(tiny, engine):
    for request, match in [
        (Request([], GREEDY, 4), "empty"),
        (Request([1, 2], GREEDY, 0), "max_tokens"),
        (Request([1, 10**9], GREEDY, 4), "token ids"),
        (Request([1, 2], SamplingParams(temperature=-1), 4), "temperature"),
    ]:
        with pytest.raises((QwenliteError, ValueError), match=match):
            engine.submit(request, lambda e: None)
    assert engine.waiting == 0


def test_the_prompt_cache_is_a_byte_bounded_lru(tiny):
    model = tiny[0]

    def snap(n: int):
        cache = make_cache(model.config, 1, 64, torch.float32)
        cache.lengths[0] = n
        return cache.snapshot()

    size = snapshot_bytes(snap(8))
    lru = PromptCache(int(2.5 * size))
    lru.store([1, 2, 3, 4, 5, 6, 7, 8], snap(8))
    lru.store([1, 2, 3, 9, 9, 9, 9, 9], snap(8))
    assert lru.lookup([1, 2, 3, 4, 5, 6, 7, 8, 10])[0] == 8  # also makes it the most recently used
    assert lru.lookup([1, 2, 3, 4, 5, 6, 7, 8])[0] == 0  # a whole prompt: one token must be left to prefill
    lru.store([5, 5, 5, 5, 5, 5, 5, 5], snap(8))  # evicts the least recently used
    assert len(lru) == 2 and lru.nbytes <= lru.max_bytes
    assert lru.lookup([1, 2, 3, 9, 9, 9, 9, 9, 1])[0] == 0
    assert lru.lookup([1, 2, 3, 4, 5, 6, 7, 8, 1])[0] == 8
    small = PromptCache(size - 1)
    small.store([1, 2, 3, 4, 5, 6, 7, 8], snap(8))  # larger than the whole budget: not kept
    assert len(small) == 0 and small.nbytes == 0


@pytest.mark.parametrize(
    ("n", "start", "named", "interval", "chunk", "pieces"),
    [
        (10, 0, (), 0, 4, [(0, 4, False), (4, 8, False), (8, 10, False)]),
        (10, 0, (3,), 0, 4, [(0, 3, True), (3, 7, False), (7, 10, False)]),
        (40, 0, (), 16, 32, [(0, 16, True), (16, 32, True), (32, 40, False)]),
        (40, 16, (20,), 16, 8, [(16, 20, True), (20, 28, False), (28, 32, True), (32, 40, False)]),
        (32, 0, (32,), 16, 64, [(0, 16, True), (16, 32, False)]),  # no snapshot at the prompt's end
    ],
)
def test_prefill_pieces_are_cut_at_named_positions_and_intervals(n, start, named, interval, chunk, pieces):
    assert [(p.start, p.end, p.snapshot) for p in cut_prefill(n, start, named, interval, chunk)] == pieces
