"""Speculative decoding in the server's engine (serve/runner.py, serve/engine.py): concurrent rows draft and are
verified in one batched forward, and each gets plain decoding's tokens, greedy, whatever its drafts (always right,
right and wrong in a pattern, prompt lookup, the MTP head); stop ids and max_tokens end a row inside an accepted
run where plain decoding ends it; sampling keeps to the filtered distribution; constrained rows decode unchanged."""

from __future__ import annotations

import queue
import re

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from qwenlite.cli import main
from qwenlite.cli.main import build_parser
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.io.load import load_model, load_mtp
from qwenlite.model import runner
from qwenlite.sample import SamplingParams
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine, Finish, Request, Token
from qwenlite.speculative import MTPDraft, NgramDraft
from qwenlite.text.grammar import Grammars, regex
from qwenlite.text.tokenizer import Tokenizer

from helpers import PatternDraft, chi_square_p, make_hf_checkpoint, random_ids, tiny_checkpoint, wait_until
from train_helpers import single_threaded

GREEDY = SamplingParams(temperature=0)
CTX = 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matmuls are microseconds: a second thread only adds contention."""
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir).model


def run_all(engine: Engine, requests: list[Request], events: bool = False) -> list:
    """Submit all at once (they decode together); -> each request's (token ids, finish reason), or its Tokens."""
    queues = [queue.SimpleQueue() for _ in requests]
    for request, q in zip(requests, queues, strict=True):
        engine.submit(request, q.put)
    out = []
    for q in queues:
        tokens = []
        while not isinstance(event := q.get(timeout=60), Finish):
            tokens.append(event)
        out.append(tokens if events else ([t.id for t in tokens], event.reason))
    return out


def plain(model, requests: list[Request], events: bool = False) -> list:
    engine = Engine(model, max_concurrency=len(requests), ctx=CTX, cache_mb=0)
    try:
        return run_all(engine, requests, events)
    finally:
        engine.close()


def speculating(model, requests, k, drafts, max_concurrency=None, events=False) -> tuple[list, Engine]:
    engine = Engine(model, max_concurrency or len(requests), ctx=CTX, cache_mb=0, speculate=k, drafts=drafts)
    try:
        return run_all(engine, requests, events), engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def batch(tiny):
    """Four greedy requests of different prompt lengths and max_tokens, one ended by a stop id, and their plain
    (unspeculated) answers, which differ from each other."""
    V = tiny.config.vocab_size
    prompts = [random_ids(1, n, V, seed=n)[0].tolist() for n in (5, 9, 14, 20)]
    requests = [Request(p, GREEDY, m) for p, m in zip(prompts, (24, 17, 30, 21), strict=True)]
    free = plain(tiny, [Request(r.prompt_ids, GREEDY, 30) for r in requests])
    requests[2].stop_ids = frozenset({free[2][0][11]})  # ends the third request inside a run of accepted drafts
    expected = plain(tiny, requests)
    assert len({tuple(t) for t, _ in expected}) == 4 and expected[2][1] == "stop"
    refs = {tuple(r.prompt_ids): tokens for r, (tokens, _) in zip(requests, free, strict=True)}
    return requests, expected, refs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_rows_get_plain_decodings_tokens_when_drafts_are_always_right(tiny, batch, k):
    requests, expected, refs = batch
    got, engine = speculating(tiny, requests, k, lambda: PatternDraft(refs))
    assert got == expected
    # Every draft kept, but where the stop id was a draft: the row takes it and ends, and it counts as not gained
    assert engine.drafted_tokens - 1 <= engine.accepted_tokens <= engine.drafted_tokens
    assert engine.decode_steps < max(len(t) for t, _ in expected) - 1  # several tokens per step


@pytest.mark.parametrize(("k", "path"), [(1, "one call"), (2, "one call"), (3, "one call"), (3, "modules")])
def test_greedy_rows_get_plain_decodings_tokens_when_drafts_are_partly_right(tiny, batch, k, path, monkeypatch):
    """Round r's first wrong draft is draft r % (k + 1) (k + 1: none wrong): rows of one forward keep different
    numbers of tokens, and every accepted length occurs. The verifications run in one C call (each row rewound by
    replaying its kept tokens), or through the modules (each row's state after every token kept)."""
    requests, expected, refs = batch
    ran, step = [], runner.step_in_one_call

    def counted(model, input_ids, cache, **options):
        out = None if path == "modules" else step(model, input_ids, cache, **options)
        ran.append(out is not None and input_ids.shape[1] > 1)
        return out

    monkeypatch.setattr(runner, "step_in_one_call", counted)
    got, engine = speculating(tiny, requests, k, lambda: PatternDraft(refs, lambda r, j: j == r % (k + 1)))
    assert got == expected
    assert 0 < engine.accepted_tokens < engine.drafted_tokens
    assert any(ran) == (path == "one call")


def test_rows_joining_a_speculating_batch_get_plain_decodings_tokens(tiny, batch):
    """Two rows for four requests: rows leave and new ones join (a prefill between verification steps)."""
    requests, expected, refs = batch
    got, _ = speculating(tiny, requests, 3, lambda: PatternDraft(refs, lambda r, j: j == r % 3), max_concurrency=2)
    assert got == expected


def test_a_constrained_row_decodes_unspeculated_beside_speculating_rows(tiny, tiny_dir, batch):
    requests, expected, refs = batch
    grammars = Grammars(Tokenizer.from_dir(tiny_dir), tiny.config.vocab_size)

    def constrained() -> Request:
        return Request(requests[0].prompt_ids, GREEDY, 12, grammar=grammars.matcher(regex("[a-z ]{4,40}")))

    want = plain(tiny, [constrained()])
    got, _ = speculating(tiny, [constrained(), *requests[1:]], 3, lambda: PatternDraft(refs))
    assert got == [*want, *expected[1:]] and want[0][0] != expected[0][0][:12]  # the grammar is in play
    alone, engine = speculating(tiny, [constrained()], 3, lambda: PatternDraft(refs))
    assert alone == want and engine.drafted_tokens == 0


def test_sampling_with_one_candidate_is_greedy_and_a_seed_repeats(tiny, batch):
    """top_k = 1 makes the rejection rule's target one-hot: the sampled rows' output is greedy decoding's, through
    the draws; with more candidates the same seed gives the same tokens again, each among the row's top_k."""
    requests, expected, refs = batch
    one = [Request(r.prompt_ids, SamplingParams(temperature=0.9, top_k=1, seed=i), r.max_tokens, r.stop_ids)
           for i, r in enumerate(requests)]  # fmt: skip
    drafts = lambda: PatternDraft(refs, lambda r, j: j == r % 3)  # noqa: E731
    assert speculating(tiny, one, 2, drafts)[0] == expected
    some = [Request(r.prompt_ids, SamplingParams(temperature=0.9, top_k=3, seed=i), 12, logprobs=3)
            for i, r in enumerate(requests)]  # fmt: skip
    engine = Engine(tiny, 4, ctx=CTX, cache_mb=0, speculate=2, drafts=drafts)
    try:
        first = [list(engine.events(r)) for r in some]
        again = [list(engine.events(r)) for r in some]
    finally:
        engine.close()
    assert [[e.id for e in g if isinstance(e, Token)] for g in first] == [
        [e.id for e in g if isinstance(e, Token)] for g in again
    ]
    for g in first:
        for t in (e for e in g if isinstance(e, Token)):
            assert t.id in [i for i, _ in t.top_logprobs]  # logprobs are before the filters: the top 3 are top_k's


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny published-layout checkpoint with a random MTP head and a vocabulary of 512: its greedy answers
    repeat tokens of the prompt, so prompt lookup finds drafts."""
    path = tmp_path_factory.mktemp("mtp")
    make_hf_checkpoint(path, layout="conditional_generation", add_mtp=True)
    model, _ = load_model(path, "float32", with_tokenizer=False)
    return model, load_mtp(path, model)


def test_the_mtp_head_drafts_for_each_row(small):
    model, head = small
    requests = [Request(random_ids(1, n, seed=n)[0].tolist(), GREEDY, 20) for n in (6, 11, 17)]
    got, engine = speculating(model, requests, 3, lambda: MTPDraft(model, head))
    assert got == plain(model, requests)
    assert engine.verifications > 0 and engine.drafted_tokens > 0


def test_ngram_drafts_give_plain_decodings_tokens(small):
    model, _ = small
    requests = [Request(list(range(a, a + 6)) * 4, GREEDY, 20) for a in (5, 40, 300)]  # lookups find something
    got, engine = speculating(model, requests, 3, NgramDraft)
    assert got == plain(model, requests)
    assert engine.drafted_tokens > 0


def test_logprobs_and_penalties_are_plain_decodings(small):
    """A row that asks for logprobs gets each token's, as plain decoding scores it; penalties see the drafts."""
    model, _ = small
    params = SamplingParams(temperature=0, presence_penalty=1.5, repetition_penalty=1.3)
    asks = [Request(random_ids(1, n, seed=n)[0].tolist(), params, 24, logprobs=3) for n in (6, 11)]
    want = plain(model, asks, events=True)
    refs = {tuple(r.prompt_ids): [t.id for t in w] for r, w in zip(asks, want, strict=True)}
    assert [t.id for t in want[0]] != plain(model, [Request(asks[0].prompt_ids, GREEDY, 24)])[0][0]  # in play
    got, _ = speculating(model, asks, 3, lambda: PatternDraft(refs, lambda r, j: j == 2), events=True)
    for g, w in zip(got, want, strict=True):
        assert [t.id for t in g] == [t.id for t in w]
        assert [t.top_logprobs[0][0] for t in g] == [t.top_logprobs[0][0] for t in w]
        # fp32: the verification's projections over several positions against the decode step's over one
        assert [t.logprob for t in g] == pytest.approx([t.logprob for t in w], abs=1e-4)


def complete(engine: Engine, tok: Tokenizer, bodies: list[dict]) -> tuple[list[dict], str]:
    """POST each body to /v1/completions of an app on `engine` (closed after); -> the responses, /metrics."""
    try:
        with TestClient(create_app(engine, tok, "tiny")) as client:
            out = [client.post("/v1/completions", json={"model": "tiny", **body}).json() for body in bodies]
            wait_until(lambda: engine.active == 0)  # a row a stop string ended leaves at the engine's next step
            return out, client.get("/metrics").text
    finally:
        engine.close()


def test_stop_strings_usage_and_metrics_over_http(tiny, tiny_dir, batch):
    """A stop string inside a run of accepted drafts ends the answer where the unspeculated server ends it, with
    the same usage; /metrics reports the drafts and the tokens per verification."""
    requests, _, refs = batch
    tok = Tokenizer.from_dir(tiny_dir)
    bodies = [{"prompt": r.prompt_ids, "max_tokens": 24, "temperature": 0} for r in requests[:2]]
    free, _ = complete(Engine(tiny, 2, ctx=CTX, cache_mb=0), tok, bodies)
    text = free[0]["choices"][0]["text"]
    bodies[0]["stop"] = [text[len(text) // 2 : len(text) // 2 + 3]]
    want, _ = complete(Engine(tiny, 2, ctx=CTX, cache_mb=0), tok, bodies)
    assert want[0]["choices"][0]["finish_reason"] == "stop" and len(want[0]["choices"][0]["text"]) < len(text) // 2 + 3
    engine = Engine(tiny, 2, ctx=CTX, cache_mb=0, speculate=3, drafts=lambda: PatternDraft(refs, lambda r, j: j == 2))
    got, metrics = complete(engine, tok, bodies)
    for g, w in zip(got, want, strict=True):
        assert (g["choices"], g["usage"]) == (w["choices"], w["usage"])
    samples = {s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples["qwenlite_speculative_drafted_tokens_total"] == engine.drafted_tokens > 0
    assert samples["qwenlite_speculative_accepted_tokens_total"] == engine.accepted_tokens > 0
    assert samples["qwenlite_speculative_verifications_total"] == engine.verifications > 0
    per_verification = (engine.accepted_tokens + engine.verifications) / engine.verifications
    assert samples["qwenlite_speculative_tokens_per_verification"] == pytest.approx(per_verification)
    assert 1 < per_verification <= 3  # drafts 0 and 1 of each step kept, draft 2 wrong: 3 tokens at most


def test_serve_flags_reach_the_server_and_bad_ones_stop_it_in_one_line(tiny_dir, monkeypatch, capsys):
    cases = [(["--speculate", "9"], "--speculate takes 1..8"), (["--speculate", "2"], "no multi-token-prediction head")]
    for flags, message in cases:
        assert main(["serve", str(tiny_dir), "--port", "1", *flags]) == 1  # stops before it binds
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    seen = []
    monkeypatch.setattr("qwenlite.cli.serve.serve", lambda *args, **kwargs: seen.append(kwargs))
    args = build_parser().parse_args(["serve", "m", "--speculate", "3", "--draft", "ngram"])
    assert args.func(args) == 0
    assert (seen[0]["speculate"], seen[0]["draft"]) == (3, "ngram")


class FlatDraft:
    """Drafts from the model's own next-token logits halved, through the row's `pick`: a distribution q flatter
    than the model's p that overlaps it, so the rejection rule keeps many drafts and redraws the others from the
    residual max(0, p - q), which is far from p."""

    def __init__(self, model):
        self.model = model

    def begin(self, max_seq_len):
        pass

    def propose(self, tokens, hidden, k, pick):
        drafts = []
        for _ in range(k):
            logits = self.model(torch.tensor([[*tokens, *(t for t, _ in drafts)]]))[0, -1] / 3
            drafts.append(pick(logits, [t for t, _ in drafts]))
        return drafts


def test_sampled_rows_keep_the_models_distribution(small):
    """Each token a verification gives (a kept draft, a redraw from the residual, or the model's own) is
    distributed as the model's tempered distribution p there, which the token's full logprobs give: the randomized
    probability integral transforms are uniform (a chi-square over 10 bins), and the chosen tokens' p(t) sum to
    their expectation, sum p^2, within 4 standard deviations (a redraw from p instead of the residual, measured:
    -5, a flatter output)."""
    model, _ = small
    V, T = model.config.vocab_size, 0.3
    prompt = random_ids(1, 9, seed=3)[0].tolist()
    requests = [Request(prompt, SamplingParams(temperature=T, seed=i), 8, logprobs=V) for i in range(100)]
    engine = Engine(model, 8, len(requests), CTX, cache_mb=0, speculate=3, drafts=lambda: FlatDraft(model))
    try:
        answers = run_all(engine, requests, events=True)
    finally:
        engine.close()
    assert 0 < engine.accepted_tokens < engine.drafted_tokens  # both paths of the rule taken
    jitter = torch.Generator().manual_seed(1)
    pit, mass, mean, var = [], [], [], []  # each chosen token's PIT, p(t), and the expectation and variance of p(t)
    for tokens in answers:
        for token in tokens[1:]:  # the first comes from the prefill's plain draw
            logprobs = torch.tensor([lp for _, lp in sorted(token.top_logprobs)], dtype=torch.float64)
            p = torch.softmax(logprobs / T, 0)
            u = float(torch.rand(1, generator=jitter, dtype=torch.float64))
            pit.append(float(p[: token.id].sum() + u * p[token.id]))
            mass.append(float(p[token.id]))
            mean.append(float((p**2).sum()))
            var.append(float((p**3).sum()) - mean[-1] ** 2)
    assert len(pit) == 7 * len(requests)
    assert chi_square_p(torch.histc(torch.tensor(pit), 10, 0, 1), torch.full((10,), 0.1)) > 1e-3
    assert abs(sum(mass) - sum(mean)) < 4 * sum(var) ** 0.5
