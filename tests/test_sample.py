"""Samplers and logits processors, checked against hand-made distributions and transformers' warpers."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenlite.sample import (
    NUCLEUS_GUESSES,
    SamplingParams,
    apply_processors,
    filter_weights,
    make_logits_processors,
    make_sampler,
)

# Probabilities with known nucleus boundaries, placed at shuffled ids so that id bookkeeping is tested.
PROBS = [0.5, 0.3, 0.15, 0.05]
IDS = [5, 2, 7, 0]  # PROBS[i] belongs to token IDS[i]
V = 9


def crafted_logits() -> torch.Tensor:
    logits = torch.full((V,), -math.inf)
    logits[IDS] = torch.tensor(PROBS).log()
    return logits


def draw(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = make_sampler(params)
    return [sampler(logits) for _ in range(n)]


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def hf_warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warp in warpers:
        scores = warp(None, scores)
    return scores[0]


def dense_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """filter_weights' output scattered back to (V,) and normalised."""
    weights, ids = filter_weights(logits, params)
    dense = torch.zeros_like(logits) if ids is not None else weights
    if ids is not None:
        dense[ids] = weights
    return dense / dense.sum()


# --- sampler ------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    sampler = make_sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen)
        assert sampler(logits) == int(logits.argmax())


def test_seed_reproduces_draws_and_different_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = draw(SamplingParams(temperature=1.0, seed=123), logits, 50)
    b = draw(SamplingParams(temperature=1.0, seed=123), logits, 50)
    c = draw(SamplingParams(temperature=1.0, seed=124), logits, 50)
    assert a == b
    assert a != c
    # Unseeded samplers draw from fresh entropy.
    assert draw(SamplingParams(temperature=1.0), logits, 50) != draw(SamplingParams(temperature=1.0), logits, 50)


def test_seed_reproduces_draws_with_filters():
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=7)
    assert draw(params, logits, 50) == draw(params, logits, 50)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_top_k_1_is_argmax(temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert set(draw(SamplingParams(temperature=temperature, top_k=1, seed=0), logits, 50)) == {int(logits.argmax())}


def test_top_k_draws_only_the_k_best():
    logits = crafted_logits()
    tokens = draw(SamplingParams(temperature=1.0, top_k=3, seed=0), logits, 2000)
    assert set(tokens) == set(IDS[:3])
    # A top_k at or above the vocabulary size is the same as no top_k.
    assert set(draw(SamplingParams(temperature=1.0, top_k=V, seed=0), logits, 2000)) == set(IDS)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.4, 1),  # the best token alone already crosses 0.4
        (0.75, 2),  # 0.5 < 0.75, 0.5 + 0.3 crosses it: the crossing token is kept
        (0.85, 3),
        (0.99, 4),
        (1.0, 4),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    tokens = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=0), crafted_logits(), 2000)
    assert set(tokens) == set(IDS[:kept])
    # Survivors keep their relative odds (renormalised).
    expected = torch.tensor(PROBS[:kept], dtype=torch.float64)
    expected /= expected.sum()
    observed = frequencies(tokens, V)[IDS[:kept]]
    assert (observed - expected).abs().max() < 0.04


@pytest.mark.parametrize(("min_p", "kept"), [(0.05, 4), (0.2, 3), (0.5, 2), (0.9, 1)])
def test_min_p_drops_tokens_below_fraction_of_best(min_p, kept):
    # Thresholds min_p * 0.5: 0.025, 0.1, 0.25, 0.45.
    tokens = draw(SamplingParams(temperature=1.0, min_p=min_p, seed=0), crafted_logits(), 2000)
    assert set(tokens) == set(IDS[:kept])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_frequencies_match_softmax(temperature):
    vocab = 8
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    tokens = draw(SamplingParams(temperature=temperature, seed=11), logits, 4000)
    expected = torch.softmax(logits.double() / temperature, dim=0)
    assert (frequencies(tokens, vocab) - expected).abs().max() < 0.03


def test_empirical_frequencies_match_hf_warpers():
    vocab = 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(4)) * 2
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05, seed=5)
    tokens = draw(params, logits, 4000)
    expected = torch.softmax(hf_warped(logits, params).double(), dim=0)
    assert (frequencies(tokens, vocab) - expected).abs().max() < 0.03


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.8, top_k=100, top_p=0.8, min_p=0.02),
        SamplingParams(temperature=1.3, top_p=0.5, min_p=0.3),
    ],
)
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])  # flat to peaked
def test_filters_match_hf_warpers(params, scale):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(6)) * scale
    expected = torch.softmax(hf_warped(logits, params), dim=0)
    probs = dense_probs(logits, params)
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("scale", "low", "high"),
    [
        (4.0, 1, NUCLEUS_GUESSES[0]),  # found by the first top-k guess
        (2.0, NUCLEUS_GUESSES[0], NUCLEUS_GUESSES[1]),  # by the second
        (0.05, NUCLEUS_GUESSES[1], None),  # by the full sort
    ],
)
def test_top_p_nucleus_search_matches_hf_on_every_path(scale, low, high):
    vocab = 4 * NUCLEUS_GUESSES[-1]
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(6)) * scale
    params = SamplingParams(temperature=1.0, top_p=0.9)
    expected = torch.softmax(hf_warped(logits, params), dim=0)
    kept = int((expected > 0).sum())
    assert low < kept and (high is None or kept <= high)
    probs = dense_probs(logits, params)
    assert torch.equal(probs > 0, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


def test_no_full_sort_at_real_vocabulary_size(monkeypatch):
    """Plain, top-k and min-p sampling never sort the vocabulary; top-p alone does only when its
    nucleus is wider than all NUCLEUS_GUESSES (here it spans about 50 tokens, as peaked LM outputs do)."""
    logits = torch.randn(248320, generator=torch.Generator().manual_seed(7)) * 4

    def no_sort(*args, **kwargs):
        raise AssertionError("full sort of the vocabulary")

    monkeypatch.setattr(torch, "sort", no_sort)
    for params in [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, min_p=0.05),
        SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=0.7, top_p=0.9),
    ]:
        assert 0 <= make_sampler(params)(logits) < 248320


def test_sampler_does_not_modify_logits():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(8))
    before = logits.clone()
    make_sampler(SamplingParams(temperature=0.5, top_k=10, top_p=0.9, min_p=0.1, seed=0))(logits)
    assert torch.equal(logits, before)


# --- logits processors --------------------------------------------------------------------------------


def test_neutral_params_give_no_processors():
    assert make_logits_processors(SamplingParams(temperature=0.3, top_k=5, seed=1), prompt_len=4) == []


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(300, generator=gen) * 3
    token_ids = torch.randint(0, 300, (40,), generator=gen)  # with repeats
    processors = make_logits_processors(SamplingParams(repetition_penalty=penalty), prompt_len=25)
    ours = apply_processors(processors, token_ids, logits)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(token_ids[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    prompt = [0, 1, 1, 2]
    generated = [2, 2, 3, 2, 4]  # counts: token 2 -> 3, token 3 -> 1, token 4 -> 1
    token_ids = torch.tensor(prompt + generated)
    logits = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 3.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_processors(make_logits_processors(params, prompt_len=len(prompt)), token_ids, logits)
    expected = torch.tensor(
        [
            1.0,  # prompt only: untouched
            -1.0,  # prompt only: untouched
            2.0 - 0.5 - 3 * 0.25,  # in the prompt too, but only its 3 generated copies count
            0.5 - 0.5 - 1 * 0.25,
            0.0 - 0.5 - 1 * 0.25,
            3.0,  # never seen
        ]
    )
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 3.0]))  # input left alone

    # Before anything is generated they change nothing; negative values reward repetition.
    assert torch.equal(
        apply_processors(make_logits_processors(params, prompt_len=len(token_ids)), token_ids, logits), logits
    )
    rewarded = apply_processors(
        make_logits_processors(SamplingParams(frequency_penalty=-1.0), prompt_len=len(prompt)),
        token_ids,
        logits,
    )
    assert rewarded[2] == 2.0 + 3.0


def test_penalties_compose_in_order():
    token_ids = torch.tensor([3, 1, 3])
    logits = torch.tensor([0.0, 2.0, 0.0, -2.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    out = apply_processors(make_logits_processors(params, prompt_len=1), token_ids, logits)
    # Repetition over all ids (3 and 1), then presence/frequency over the generated [1, 3].
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0 - 1.5, 0.0, -4.0 - 1.5]))


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("seed", 1.5),
    ],
)
def test_validate_rejects_out_of_range(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        make_sampler(params)
    with pytest.raises(ValueError, match=field):
        make_logits_processors(params, prompt_len=0)


def test_validate_accepts_edges():
    for params in [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0),
        SamplingParams(top_p=1e-6, min_p=1.0, repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2),
    ]:
        params.validate()


def test_greedy_is_torch_argmax():
    """The numpy shortcut picks what torch.argmax picks: the first of equal maxima, a NaN over any number, and
    other dtypes and views go through torch."""
    from qwenlite.sample import greedy

    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(248320, generator=gen), torch.tensor([1.0, 3.0, 3.0]), torch.tensor([1.0, float("nan"), 3.0]),
             torch.randn(4, 1000, generator=gen)[2], torch.randn(1000, generator=gen).to(torch.bfloat16)]  # fmt: skip
    for logits in cases:
        assert greedy(logits) == int(torch.argmax(logits))
