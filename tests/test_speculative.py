"""Speculative decoding (speculative.py, generate.speculative_tokens) is exact: greedy output is plain decoding's
token for token whatever the drafts (the checkpoint's random MTP head, drafts always right, right and wrong in a
chosen pattern), stops end at the same token, the caches after a rejection are plain decoding's, and sampling keeps
plain sampling's distribution (chi-square tests)."""

from __future__ import annotations

import json

import pytest
import torch

from qwenlite import speculative
from qwenlite.cli import main
from qwenlite.errors import InvalidArgument
from qwenlite.generate import GenerationStats, decode_step, generate_tokens, prefill, stream
from qwenlite.io.load import load_model, load_mtp
from qwenlite.model import runner
from qwenlite.model.cache import AttentionCache, make_cache
from qwenlite.model.quantized import QuantLinear
from qwenlite.ops.cpu import kernels
from qwenlite.sample import (
    SamplingParams,
    apply_processors,
    make_generator,
    make_logits_processors,
    probabilities,
    verify_draft,
)
from qwenlite.speculative import MTPDraft, NgramDraft, Speculation

from helpers import (
    TINY_TEXT_CONFIG,
    PatternDraft,
    chi_square_p,
    make_hf_checkpoint,
    random_ids,
    tiny_checkpoint,
    tracked_step_against_plain_decoding,
)
from train_helpers import single_threaded

GREEDY = SamplingParams(temperature=0)
V = TINY_TEXT_CONFIG["vocab_size"]
N = 40  # generated tokens
STATE_TOL = 1e-5  # fp32: the verification's projections over several rows against the decode step's over one


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matmuls are microseconds: a second thread only adds contention (measured 14 ms against
    up to 490 ms per sampled generation on a loaded 2-core machine)."""
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The tiny published-layout checkpoint with a random MTP head."""
    path = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(path, layout="conditional_generation", add_mtp=True)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """The tiny checkpoint in fp32; a prompt; plain greedy decoding's tokens."""
    path = tiny_path
    model, _ = load_model(path, "float32", with_tokenizer=False)
    prompt = random_ids(1, 17, seed=11)[0].tolist()
    return model, load_mtp(path, model), prompt, list(generate_tokens(model, prompt, GREEDY, N))


def count_one_call_drafts(monkeypatch) -> list[int]:
    """A 1 appended for each set of greedy drafts made in one C call."""
    ran = []
    real = speculative.head_drafts_in_one_call

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        ran.extend([1] if out is not None else [])
        return out

    monkeypatch.setattr(speculative, "head_drafts_in_one_call", spy)
    return ran


def count_one_call_verifications(monkeypatch, off: bool = False) -> list[int]:
    """The token counts of the one-call steps of several tokens (verifications) that ran, appended as they run;
    `off`: the step refused (as where it does not apply), so that everything runs through the modules."""
    ran, step = [], runner.step_in_one_call

    def counted(model, input_ids, cache, **options):
        out = None if off else step(model, input_ids, cache, **options)
        if out is not None and input_ids.shape[1] > 1:
            ran.append(input_ids.shape[1])
        return out

    monkeypatch.setattr(runner, "step_in_one_call", counted)
    return ran


def speculate(model, prompt, draft, k, params=GREEDY, max_tokens=N, stop_ids=()):
    stats = GenerationStats()
    tokens = list(generate_tokens(model, prompt, params, max_tokens, stop_ids, None, stats, Speculation(draft, k)))
    return tokens, stats


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_is_plain_decoding_with_the_mtp_head(tiny, k):
    model, head, prompt, ref = tiny
    tokens, stats = speculate(model, prompt, MTPDraft(model, head), k)
    assert tokens == ref
    assert stats.draft_tokens > 0 and stats.verify_steps > 0


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_is_plain_decoding_when_drafts_are_always_right(tiny, k):
    model, _, prompt, ref = tiny
    tokens, stats = speculate(model, prompt, PatternDraft({tuple(prompt): ref}), k)
    assert tokens == ref
    assert stats.accepted_tokens == stats.draft_tokens  # every draft kept: k + 1 tokens per forward
    assert stats.verify_steps == -(-(N - 1) // (k + 1))


@pytest.mark.parametrize("path", ["one call", "modules"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_is_plain_decoding_with_a_rejection_at_every_position(tiny, k, path, monkeypatch):
    """Round r's first wrong draft is draft r % (k + 1) (k + 1: none wrong): every accepted length occurs. Verified
    through the one-call C step (its rewind a replay of the kept tokens) and through the modules (their rewind the
    state kept after each token)."""
    model, _, prompt, ref = tiny
    ran = count_one_call_verifications(monkeypatch, off=path == "modules")
    tokens, stats = speculate(model, prompt, PatternDraft({tuple(prompt): ref}, lambda r, j: j == r % (k + 1)), k)
    assert tokens == ref
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    assert len(ran) == (stats.verify_steps if path == "one call" else 0)


def test_greedy_with_penalties_is_plain_decoding(tiny):
    """Processors see each row's own history, drafts included."""
    model, head, prompt, _ = tiny
    params = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    ref = list(generate_tokens(model, prompt, params, N))
    assert ref != tiny[3]  # the penalties change the output, so they are in play
    assert speculate(model, prompt, PatternDraft({tuple(prompt): ref}, lambda r, j: j == r % 3), 3, params)[0] == ref
    assert speculate(model, prompt, MTPDraft(model, head), 2, params)[0] == ref


def test_greedy_is_plain_decoding_on_a_quantized_model(tmp_path):
    """int8 on load (int4's groups of 128 do not divide the tiny hidden size of 64): the verification's GEMVs over
    several rows against the decode step's over one. The MTP head drafts at the model's precision (every linear of
    it int8, per output channel as the model's) through the model's quantized embedding and head, and its drafts in
    one C call are those of its modules (drafts with a pick that is not `greedy_pick` run module by module)."""
    make_hf_checkpoint(tmp_path, layout="conditional_generation", add_mtp=True)
    model, _ = load_model(tmp_path, "float32", "int8", with_tokenizer=False)
    draft = speculative.make_speculation(tmp_path, model, 3).draft
    linears = [m for m in draft.head.modules() if isinstance(m, torch.nn.Linear | QuantLinear)]
    assert len(linears) >= 8 and all(isinstance(m, QuantLinear) and m.bits == 8 for m in linears)
    assert all(m.group_size == m.in_features for m in linears)
    prompt = random_ids(1, 17, seed=11)[0].tolist()
    ref = list(generate_tokens(model, prompt, GREEDY, N))
    assert speculate(model, prompt, draft, 3)[0] == ref
    assert speculate(model, prompt, PatternDraft({tuple(prompt): ref}, lambda r, j: j == r % 4), 3)[0] == ref

    with torch.inference_mode():
        cache = make_cache(model.config, max_seq_len=64, dtype=model.dtype)
        hidden, logits = speculative.forward_hidden(model, prompt, cache)
        tokens = prompt + [int(logits.argmax())]  # each hidden state beside the token after it
        drafts = []
        for pick in (speculative.greedy_pick, lambda logits, drafted: (int(logits.argmax()), None)):
            draft.begin(64)
            drafts.append([t for t, _ in draft.propose(tokens, hidden, 4, pick)])
        x = hidden[None, -1:]
        steps = []
        for vocab in (None, V // 4):  # a step of the head's C plan, its output head cut to the first rows
            draft.begin(64)
            draft.cache.lengths.fill_(5)
            steps.append(draft.step(torch.tensor([[tokens[-1]]]), x, vocab)[1])
    assert drafts[0] == drafts[1]
    assert steps[0].shape[-1] == V and steps[1].shape[-1] == V // 4 and torch.equal(steps[1], steps[0][..., : V // 4])


def test_greedy_drafts_keep_to_the_first_ids_where_the_context_does(tiny, monkeypatch):
    """A context whose tokens lie among the first ids (DRAFT_VOCABS, scaled to the tiny vocabulary) drafts among
    those only: the C drafts are the argmax over the head's first rows, as the modules' logits give it; the output
    is still plain decoding's. A context with many later ids drafts among all."""
    model, head, _, _ = tiny
    monkeypatch.setattr(speculative, "DRAFT_VOCABS", (V // 4, V // 2))
    gen = torch.Generator().manual_seed(3)
    low = torch.randint(0, V // 4, (40,), generator=gen).tolist()  # one later id after them still leaves 95%
    mixed = low[:20] + torch.randint(V // 2, V, (20,), generator=gen).tolist()
    assert MTPDraft(model, head).draft_vocab(low) == V // 4
    assert MTPDraft(model, head).draft_vocab(mixed) == V
    draft = MTPDraft(model, head)
    assert draft.draft_vocab(low[:20]) == V // 4 and draft.draft_vocab(mixed) == V  # counted as the context grows

    with torch.inference_mode():
        cache = make_cache(model.config, max_seq_len=64, dtype=model.dtype)
        hidden, _ = speculative.forward_hidden(model, low[:24], cache)  # up to STEP_TOKENS: the C drafts apply
        drafts, ran = [], count_one_call_drafts(monkeypatch)
        for pick in (speculative.greedy_pick, lambda logits, drafted: (int(logits[: V // 4].argmax()), None)):
            draft.begin(64)
            drafts.append([t for t, _ in draft.propose(low[:25], hidden, 4, pick)])
    assert ran == [1] and drafts[0] == drafts[1] and max(drafts[0]) < V // 4
    ref = list(generate_tokens(model, low, GREEDY, N))
    assert speculate(model, low, MTPDraft(model, head), 3)[0] == ref


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 12])
def test_max_tokens_ends_inside_an_accepted_run(tiny, max_tokens):
    model, _, prompt, ref = tiny
    tokens, _ = speculate(model, prompt, PatternDraft({tuple(prompt): ref}), 4, max_tokens=max_tokens)
    assert tokens == ref[:max_tokens]


def test_stop_id_ends_inside_an_accepted_run(tiny):
    model, _, prompt, ref = tiny
    for j in (1, 6, 9):  # drafts always right, k = 4: the stop falls inside a run of 5
        stop = ref[j]
        want = list(generate_tokens(model, prompt, GREEDY, N, [stop]))
        assert want == ref[: ref.index(stop)]
        tokens, stats = speculate(model, prompt, PatternDraft({tuple(prompt): ref}), 4, stop_ids=[stop])
        assert tokens == want and stats.finish_reason == "stop"


def test_stop_string_ends_at_the_same_token(tiny, qwen35_tokenizer):
    model, head, prompt, ref = tiny
    text = qwen35_tokenizer.decode(ref)
    stop = qwen35_tokenizer.decode(ref[8:10])
    assert stop and stop in text
    plain = list(stream(model, qwen35_tokenizer, prompt, GREEDY, N, [stop]))
    spec = list(
        stream(
            model,
            qwen35_tokenizer,
            prompt,
            GREEDY,
            N,
            [stop],
            speculation=Speculation(PatternDraft({tuple(prompt): ref}), 4),
        )
    )
    assert [(c.text, c.token_ids, c.finish_reason) for c in spec] == [
        (c.text, c.token_ids, c.finish_reason) for c in plain
    ]
    assert plain[-1].finish_reason == "stop"


@pytest.mark.parametrize("run", [1, 3, 5])
def test_rewind_leaves_the_caches_of_plain_decoding(tiny, run):
    """A tracked forward of `run` tokens rewound to its first `keep`: the cache plain decoding has after them."""
    model, _, prompt, ref = tiny
    ids = ref[:run]
    for keep in range(1, run + 1):
        plain = make_cache(model.config, max_seq_len=64, dtype=torch.float32)
        prefill(model, prompt, plain)
        for t in ids[:keep]:
            decode_step(model, t, plain)
        spec = make_cache(model.config, max_seq_len=64, dtype=torch.float32)
        prefill(model, prompt, spec)
        spec.track()
        with torch.inference_mode():
            model.model(torch.tensor([ids]), spec)
        spec.rewind(run, keep)
        n = len(prompt) + keep
        assert spec.lengths.tolist() == plain.lengths.tolist() == [n]
        for mine, theirs in zip(spec.layers, plain.layers, strict=True):
            if isinstance(mine, AttentionCache):
                pairs = [(mine.k[:, :, :n], theirs.k[:, :, :n]), (mine.v[:, :, :n], theirs.v[:, :, :n])]
            else:
                assert mine.trail is None
                pairs = [(mine.conv, theirs.conv), (mine.state, theirs.state)]
            for a, b in pairs:
                assert (a - b).abs().max() < STATE_TOL


def test_rows_rewind_each_to_its_own_token_through_the_fused_kernel(tiny, monkeypatch):
    """Three rows at different lengths, a tracked forward of 3 tokens each, rewound to keep 1, 3 and 2 of them (the
    server's verification): each row's cache is the one plain decoding of its kept tokens gives, and the recurrence
    took the fused decode kernel for all rows at every token (a strided slice of several rows would not)."""
    model, _, prompt, ref = tiny
    prompts, keeps, run = [prompt[:9], prompt[:13], prompt], [1, 3, 2], 3
    ids = [ref[i : i + run] for i in range(3)]
    batch = make_cache(model.config, 3, 64, torch.float32)
    for row, p in enumerate(prompts):
        prefill(model, p, batch.rows(row, row + 1))
    rows = []
    gdn_decode = kernels.gdn_decode
    monkeypatch.setattr(kernels, "gdn_decode", lambda *args: rows.append(args[1].shape[0]) or gdn_decode(*args))
    batch.track()
    with torch.inference_mode():
        model.model(torch.tensor(ids), batch)
    batch.rewind(run, keeps)
    recurrent = sum(not isinstance(layer, AttentionCache) for layer in batch.layers)
    assert rows == [3] * (recurrent * run)
    for row, (p, keep) in enumerate(zip(prompts, keeps, strict=True)):
        plain = make_cache(model.config, max_seq_len=64, dtype=torch.float32)
        prefill(model, p, plain)
        for t in ids[row][:keep]:
            decode_step(model, t, plain)
        n = len(p) + keep
        mine = batch.rows(row, row + 1)
        assert mine.lengths.tolist() == plain.lengths.tolist() == [n]
        for a, b in zip(mine.layers, plain.layers, strict=True):
            if isinstance(a, AttentionCache):
                pairs = [(a.k[:, :, :n], b.k[:, :, :n]), (a.v[:, :, :n], b.v[:, :, :n])]
            else:
                pairs = [(a.conv, b.conv), (a.state, b.state)]
            for x, y in pairs:
                assert (x - y).abs().max() < STATE_TOL


# The one-call step against plain decoding: measured equal bit for bit (0) on AVX2 in fp32 and bf16, each token's
# arithmetic being a decode step's; the tolerances leave room for an instruction set whose GEMV sums a row
# differently when it shares a pass over the weights with other rows (fp32: STATE_TOL; bf16: a step of bf16 at the
# logits' and states' magnitude, ~4).
ONE_CALL_TOL = {"float32": STATE_TOL, "bfloat16": 3e-2}


@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_one_call_verification_rewinds_to_plain_decoding(tiny_path, dtype, quant):
    """Three rows at their own positions, a tracked one-call step of 4 tokens each, rewound to keep 1, 4 and 2 (the
    server's verification; 4: no replay): the kept positions' logits and every cache (KV, conv window, recurrent
    state) are those of plain decoding of the kept tokens."""
    model, _ = load_model(tiny_path, dtype, quant, with_tokenizer=False)
    worst = tracked_step_against_plain_decoding(model, V)
    assert set(worst) == {"logits", "kv", "conv", "state"}
    assert max(worst.values()) <= ONE_CALL_TOL[dtype], worst


def test_greedy_in_bfloat16_is_plain_decoding_through_the_one_call_step(tiny_path, monkeypatch):
    model, _ = load_model(tiny_path, "bfloat16", with_tokenizer=False)
    prompt = random_ids(1, 17, seed=11)[0].tolist()
    ref = list(generate_tokens(model, prompt, GREEDY, N))
    ran = count_one_call_verifications(monkeypatch)
    assert speculate(model, prompt, MTPDraft(model, load_mtp(tiny_path, model)), 2)[0] == ref
    assert speculate(model, prompt, PatternDraft({tuple(prompt): ref}, lambda r, j: j == r % 4), 3)[0] == ref
    assert ran and set(ran) <= {2, 3, 4}


def test_ngram_proposes_what_followed_the_longest_earlier_match():
    draft = NgramDraft(max_ngram=3)
    pick = None
    # "7 8 9" occurred earlier, followed by 4 5 6 (the latest occurrence of the longest suffix wins)
    assert draft.propose([7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 0, 8, 9], None, 3, pick) == [(4, None), (5, None), (6, None)]
    assert draft.propose([1, 2, 3, 1, 2], None, 5, pick) == [(3, None), (1, None), (2, None)]
    assert draft.propose([1, 2, 3], None, 2, pick) == []


def test_greedy_with_ngram_drafts_is_plain_decoding(tiny):
    model, _, _, _ = tiny
    prompt = [5, 6, 7, 8, 9, 10] * 4  # a repetitive prompt, so that lookups find something
    ref = list(generate_tokens(model, prompt, GREEDY, N))
    tokens, stats = speculate(model, prompt, NgramDraft(), 3)
    assert tokens == ref and stats.draft_tokens > 0


def test_speculate_out_of_range_is_refused():
    for k in (0, 9, -1):
        with pytest.raises(InvalidArgument, match="1..8"):
            Speculation(NgramDraft(), k)


# ---------------------------------------------------------------------------------------------------
# Sampling: chi-square goodness of fit, p-value threshold 1e-3 (seeded, so the outcome is fixed).


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_rule_leaves_the_target_distribution(deterministic):
    """verify_draft on 6 tokens: a draft drawn from q (or a fixed draft), kept or replaced, is distributed as p."""
    p = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.0, 0.3])
    q = torch.tensor([0.4, 0.1, 0.2, 0.1, 0.15, 0.05])
    gen = make_generator(SamplingParams(seed=0))
    counts = torch.zeros(6)
    for _ in range(20000):
        if deterministic:
            kept, token = verify_draft(p, None, 3, gen)
        else:
            draft = int(torch.multinomial(q, 1, generator=gen))
            kept, token = verify_draft(p, q, draft, gen)
        counts[token] += 1
    assert counts[4] == 0  # p = 0 is never produced
    assert chi_square_p(counts, p) > 1e-3


class NoisyDraft:
    """Drafts from the model's own logits plus seeded noise, chosen by `pick` (the sampler's filters): a q that
    overlaps p without being it, so that drafts are both kept and rejected."""

    def __init__(self, model, seed: int):
        self.model, self.gen = model, torch.Generator().manual_seed(seed)

    def begin(self, max_seq_len):
        pass

    def propose(self, tokens, hidden, k, pick):
        drafted = []
        for _ in range(k):
            logits = self.model(torch.tensor([list(tokens) + drafted]))[0, -1]
            token, q = pick(logits + torch.randn(logits.shape, generator=self.gen), drafted)
            drafted.append(token)
        return [(t, q) for t in drafted]


class Recording:
    """A draft that appends what it proposes, (token, q) pairs, to `drafted`."""

    def __init__(self, draft, drafted: list):
        self.draft, self.drafted = draft, drafted

    def begin(self, max_seq_len):
        self.draft.begin(max_seq_len)

    def propose(self, tokens, hidden, k, pick):
        out = self.draft.propose(tokens, hidden, k, pick)
        self.drafted.extend(out)
        return out


@torch.inference_mode()
@pytest.mark.parametrize("drafts", ["noisy", "mtp among the first ids"])
def test_sampling_keeps_the_distribution(tiny, drafts, monkeypatch):
    """Four tokens sampled with top-k 2 and penalties, 600 times, with k = 2: the second and third are verified
    drafts (drawn from q, filtered as p is), the fourth the model's own or a replacement; the counts of the
    4-token outcomes fit the exact distribution computed by enumeration. This checks the wiring (rows, histories,
    filters on both sides; a rule that keeps every draft fails it); the rule's residual distribution, whose errors
    are subtle when q is close to p, is checked with more samples by test_rejection_rule_leaves_the_target_....
    The MTP head's drafts here choose among the first V / 2 ids whatever the context: q is zero past them."""
    model, head, prompt, _ = tiny
    monkeypatch.setattr(speculative, "DRAFT_VOCABS", (V // 2,))
    monkeypatch.setattr(speculative, "DRAFT_COVERAGE", 0.0)
    base = dict(temperature=1.0, top_k=2, repetition_penalty=1.3, presence_penalty=0.5)
    processors = make_logits_processors(SamplingParams(**base), len(prompt))

    def dist(context):
        logits = model(torch.tensor([context]))[0, -1].float()
        return probabilities(apply_processors(processors, torch.tensor(context), logits), SamplingParams(**base))

    exact = {(): 1.0}
    for _ in range(4):
        exact = {
            seq + (t,): pr * float(p[t])
            for seq, pr in exact.items()
            for p in [dist(prompt + list(seq))]
            for t in p.nonzero().flatten().tolist()
        }
    index = {t: i for i, t in enumerate(exact)}
    counts = torch.zeros(len(exact))
    stats = GenerationStats()
    drafted = []
    for seed in range(600):
        draft = NoisyDraft(model, seed) if drafts == "noisy" else Recording(MTPDraft(model, head), drafted)
        speculation = Speculation(draft, 2)
        tokens = generate_tokens(model, prompt, SamplingParams(**base, seed=seed), 4, (), None, stats, speculation)
        counts[index[tuple(tokens)]] += 1
    if drafts == "noisy":
        assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts both kept and rejected
    else:  # the random head's drafts are mostly rejected: the rule's replacements carry the distribution
        assert drafted and all(t < V // 2 and q[V // 2 :].sum() == 0 for t, q in drafted)
    assert chi_square_p(counts, torch.tensor(list(exact.values()))) > 1e-3


def test_sampling_with_the_mtp_head_stays_in_the_filtered_support(tiny):
    """The MTP head's drafts (random here: nearly always rejected) feed the same rule: each token is one the
    filters allow after its own prefix."""
    model, head, prompt, _ = tiny
    params = SamplingParams(temperature=0.8, top_k=3, seed=1)
    tokens, stats = speculate(model, prompt, MTPDraft(model, head), 3, params, max_tokens=12)
    assert len(tokens) == 12 and stats.draft_tokens > 0
    with torch.inference_mode():
        for i, t in enumerate(tokens):
            logits = model(torch.tensor([prompt + tokens[:i]]))[0, -1]
            assert t in torch.topk(logits, 3).indices.tolist()


# ---------------------------------------------------------------------------------------------------
# The command line: --speculate K and --draft on run and bench.


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """The tiny preset with the real vocabulary and tokenizer (no MTP head)."""
    return tiny_checkpoint(tmp_path_factory)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_with_ngram_drafts_prints_plain_decodings_answer(lively, capsys):
    argv = ["run", str(lively), "one two three one two three one two", "--raw", "--temperature", "0"]
    argv += ["--max-tokens", "24"]
    code, plain, _ = cli(capsys, *argv)
    assert code == 0
    code, spec, err = cli(capsys, *argv, "--speculate", "3", "--draft", "ngram", "--verbose")
    assert (code, spec) == (0, plain)
    assert "speculation: acceptance" in err


@pytest.mark.parametrize(
    "flags, needle",
    [(["--speculate", "2"], "use --draft ngram"), (["--speculate", "9"], "1..8"), (["--speculate", "-1"], "1..8")],
)
def test_speculate_bad_input_is_one_line(lively, capsys, flags, needle):
    code, _, err = cli(capsys, "run", str(lively), "hi", *flags)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("qwenlite: error:") and needle in lines[0], err


def test_bench_reports_speculation(lively, capsys):
    argv = ["bench", str(lively), "--prompt", "16", "--decode", "6", "--repeat", "1", "--speculate", "2"]
    code, out, _ = cli(capsys, *argv, "--draft", "ngram", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["speculate"] == 2 and r["draft"] == "ngram" and r["speculative_decode_tok_s"] > 0
    assert 0 <= r["acceptance_rate"] <= 1 and r["mean_accepted_length"] >= 1
    assert sorted(r["verify_cost"]) == ["1", "2", "3", "4"] and all(c > 0 for c in r["verify_cost"].values())
    assert r["draft_cost"] == {}
    code, out, _ = cli(capsys, *argv, "--draft", "ngram")
    assert code == 0 and "speculative (K=2, ngram)" in out and "verify K+1 / decode 1" in out


def test_bench_reports_what_an_mtp_draft_costs(tiny_path, capsys, monkeypatch, speculation_decisions):
    """One step of the head against one decode step, choosing among all ids and among the first DRAFT_VOCABS."""
    monkeypatch.setattr(speculative, "DRAFT_VOCABS", (V // 4, V // 2))
    argv = ["bench", str(tiny_path), "--prompt", "16", "--decode", "6", "--repeat", "1", "--speculate", "2"]
    code, out, _ = cli(capsys, *argv, "--json")
    r = json.loads(out)
    assert code == 0 and sorted(map(int, r["draft_cost"])) == [V // 4, V // 2, V]
    assert all(c > 0 for c in r["draft_cost"].values())
    code, out, _ = cli(capsys, *argv)
    line = next(x for x in out.splitlines() if "MTP draft / decode 1" in x)
    assert code == 0 and "all ids" in line and f"first {V // 2} ids" in line and f"first {V // 4} ids" in line


def test_speculation_default_follows_what_bench_measured(lively, capsys, speculation_decisions):
    """Without --speculate, `run` speculates as `bench --speculate K` recorded for this model, precision and machine:
    on where it was faster (the same answer, as always), off where slower or never measured, and an unreadable
    record counts as never measured."""
    argv = ["run", str(lively), "one two three one two three one two", "--raw", "--temperature", "0",
            "--max-tokens", "12", "--verbose"]  # fmt: skip
    code, plain, err = cli(capsys, *argv)
    assert code == 0 and "speculat" not in err  # nothing recorded: off
    bench_argv = ["bench", str(lively), "--prompt", "16", "--decode", "6", "--repeat", "1", "--speculate", "2",
                  "--draft", "ngram", "--json"]  # fmt: skip
    code, out, _ = cli(capsys, *bench_argv)
    r, key = json.loads(out), speculative.decision_key(lively, None, None)
    speedup = r["speculative_decode_tok_s"] / r["decode_tok_s"]
    assert code == 0 and r["default_speculate"] == (2 if speedup > 1 else 0)
    assert speculative.measured_default(key) == (r["default_speculate"], "ngram", pytest.approx(speedup, abs=1e-3))
    for k, measured in ((3, 1.6), (3, 0.7)):
        speculative.record_decision(key, k, "ngram", measured)
        code, out, err = cli(capsys, *argv)
        assert (code, out) == (0, plain)
        on = measured > 1
        assert ("speculating by default: --speculate 3 --draft ngram decoded 1.60x" in err) == on, err
        assert ("speculation: acceptance" in err) == on
    speculative.record_decision(key, 3, "ngram", 1.6)
    code, out, err = cli(capsys, *argv, "--speculate", "0")  # off, whatever was measured
    assert (code, out) == (0, plain) and "speculat" not in err
    speculation_decisions.write_text("{not json")
    assert speculative.measured_default(key) is None
    code, out, err = cli(capsys, *argv)
    assert (code, out) == (0, plain) and "speculat" not in err
