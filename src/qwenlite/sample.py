"""Sampling: logits processors that reshape logits from the token history, and a sampler closure.

A decode step runs `apply_processors(processors, token_ids, logits)` and then `sampler(logits)`.
Processors are plain functions `(token_ids, logits) -> logits`; the sampler owns the only state
(its random generator). Everything here works on one sequence, logits of shape (V,).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwenlite.errors import InvalidArgument

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[torch.Tensor], int]

# The knobs of the distribution (a seed aside): the names of SamplingParams' fields, generation_config.json's
# keys and the OpenAI request's.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"
)  # fmt: skip
# Without top_k, top-p looks for its nucleus among the best 1024, then 16384 tokens (topk: ~0.6, ~3 ms
# for 248320 logits on a CPU) and sorts the whole vocabulary (~17 ms) only when both fall short.
NUCLEUS_GUESSES = (1024, 16384)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus, in (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL: over prompt + generated tokens, logit > 0 -> /rp, < 0 -> *rp
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token present in the generated text
    frequency_penalty: float = 0.0  # OpenAI: count * penalty subtracted, counting generated tokens only
    seed: int | None = None  # None -> a nondeterministic seed

    def validate(self) -> None:
        """Raise InvalidArgument naming the first out-of-range field. Comparisons are written so NaN fails."""
        rules = {  # field -> (in range, what it must be)
            "temperature": (self.temperature >= 0 and math.isfinite(self.temperature), "finite and >= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            "min_p": (0 <= self.min_p <= 1, "in [0, 1]"),
            "repetition_penalty": (
                self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
                "finite and > 0",
            ),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            "seed": (self.seed is None or isinstance(self.seed, int), "an integer or None"),
        }
        for name, (ok, expected) in rules.items():
            if not ok:
                raise InvalidArgument(f"{name} must be {expected}, got {getattr(self, name)!r}", param=name)


# ---------------------------------------------------------------------------------------------------
# Logits processors


def make_repetition_penalty(penalty: float) -> LogitsProcessor:
    """CTRL / HF rule: every token already in the sequence (prompt included) becomes less likely."""

    def process(token_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ids = token_ids.to(logits.device)  # (L,)
        seen = logits.gather(0, ids)
        # Dividing a negative logit would raise it, so negatives are multiplied instead.
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        # Repeated ids scatter the same value, so duplicates need no torch.unique (and no host sync).
        return logits.scatter(0, ids, seen)

    return process


def make_presence_frequency_penalty(presence: float, frequency: float, prompt_len: int) -> LogitsProcessor:
    """OpenAI / vLLM rule: logit -= frequency * count + presence * (count > 0), counting generated tokens."""

    def process(token_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        generated = token_ids[prompt_len:].to(logits.device)  # (L - prompt_len,)
        # A (V,) count vector via index_add: no sort, no host sync, linear in V + L.
        counts = torch.zeros_like(logits).index_add_(0, generated, torch.ones_like(generated, dtype=logits.dtype))
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    return process


def make_logits_processors(params: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """Processors for `params`, in the order HF and vLLM apply them; empty when all are neutral.

    Each takes the whole sequence so far (prompt + generated, 1-D LongTensor) and logits (V,) fp32,
    and returns new logits without modifying its input.
    """
    params.validate()
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(params.repetition_penalty))
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        processors.append(
            make_presence_frequency_penalty(params.presence_penalty, params.frequency_penalty, prompt_len)
        )
    return processors


def apply_processors(
    processors: Sequence[LogitsProcessor], token_ids: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    for process in processors:
        logits = process(token_ids, logits)
    return logits


# ---------------------------------------------------------------------------------------------------
# Sampler


def _sorted_nucleus_candidates(weights: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best tokens, sorted descending, enough of them to hold `mass`: top-k guesses, else a full sort."""
    for k in NUCLEUS_GUESSES:
        if k >= weights.numel():
            break
        top_w, top_ids = torch.topk(weights, k)  # (k,), sorted descending
        if top_w.sum() >= mass:
            return top_w, top_ids
    return torch.sort(weights, descending=True)


def filter_weights(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p, min-p (HF's order) -> (weights (n,), token ids (n,) or None for all V).

    Weights are unnormalised probabilities exp(logit - max): the best token weighs exactly 1, so
    min-p is a plain threshold and sampling needs no softmax. Removed tokens weigh 0. The input is
    left alone; every step after the first allocation works in place, since fresh (V,) buffers
    (page faults) cost more than the arithmetic on a CPU.
    """
    ids: torch.Tensor | None = None
    if 0 < params.top_k < logits.numel():
        # Dividing by T > 0 keeps the order, so pick the k best first and scale only those.
        logits, ids = torch.topk(logits.float(), params.top_k)  # (k,), sorted descending
        logits /= params.temperature
    else:
        logits = logits.float() / params.temperature  # (V,)
    weights = logits.sub_(logits.max()).exp_()
    if params.top_p < 1.0:
        # Nucleus: keep the best tokens until their mass reaches top_p, including the token that
        # crosses it (HF's rule), i.e. drop a token when the mass strictly above it is >= top_p.
        mass = params.top_p * weights.sum()
        if ids is None:
            weights, ids = _sorted_nucleus_candidates(weights, mass)
        mass_above = weights.cumsum(0).sub_(weights)
        weights.masked_fill_(mass_above >= mass, 0.0)
    if params.min_p > 0.0:
        # The best token survives every filter above, so p / p_max is the weight itself.
        weights.masked_fill_(weights < params.min_p, 0.0)
    return weights, ids


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index drawn with probability weights / weights.sum(), by inverting the CDF; consumes `weights`.

    torch.multinomial draws one random number per vocabulary entry (~4 ms for 248320 on a CPU);
    one uniform draw and a cumsum cost ~0.3 ms. The CPU cumsum accumulates fp32 in double, so
    every CDF entry is correctly rounded: any run of tokens gets its mass to within 1e-7.
    """
    cdf = weights.cumsum_(0)  # (n,)
    total = cdf[-1:]
    u = torch.rand(1, generator=generator, dtype=cdf.dtype, device=cdf.device) * total
    # u < total strictly, so searchsorted lands on an index whose weight is > 0.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, u, right=True))


def greedy(logits: torch.Tensor) -> int:
    """argmax of logits (V,), the first of equal maxima. On the CPU through numpy: torch's CPU argmax takes ~140 us
    over a 248K vocabulary, numpy's ~12 (measured), 1.5% of an int4 decode step."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return int(logits.detach().numpy().argmax())
    return int(torch.argmax(logits))


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """The random generator of a sampler: seeded by params.seed, or nondeterministically when it is None."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `make_sampler` draws from, as (V,) fp32 probabilities (0 where a filter removed a token)."""
    weights, ids = filter_weights(logits, params)
    if ids is not None:
        weights = torch.zeros(logits.shape[-1], dtype=weights.dtype, device=weights.device).scatter_(0, ids, weights)
    return weights / weights.sum()


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A token drawn from probabilities (V,), which are left alone."""
    return _draw(probs.clone(), generator)


def verify_draft(p: torch.Tensor, q: torch.Tensor | None, token: int, generator: torch.Generator) -> tuple[bool, int]:
    """The rejection rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023), which leaves the
    output distributed as p: a draft `token` drawn from q (V,) is kept with probability min(1, p / q); otherwise
    the token is drawn from max(0, p - q), renormalised. q None: a deterministic draft, q = one-hot(token).
    Returns (kept, the token)."""
    q_token = 1.0 if q is None else float(q[token])
    u = float(torch.rand(1, generator=generator, dtype=torch.float64, device=p.device))
    if u * q_token < float(p[token]):  # u < p / q without dividing by a q that may be tiny
        return True, token
    residual = p.clone()
    if q is None:
        residual[token] = 0.0
    else:
        residual.sub_(q).clamp_(min=0.0)
    if not residual.sum() > 0:  # p == q up to rounding: a rejection then has no mass to move; p is the answer
        residual = p.clone()
    return False, _draw(residual, generator)


def make_sampler(params: SamplingParams) -> Sampler:
    """logits (V,) -> token id. Temperature 0 is argmax; otherwise a draw seeded by params.seed.

    The generator lives on the device of the logits it first sees, so a seed reproduces the same
    draws on the same device.
    """
    params.validate()
    if params.temperature == 0.0:
        return greedy

    generator: torch.Generator | None = None

    def sample(logits: torch.Tensor) -> int:
        nonlocal generator
        if generator is None or generator.device != logits.device:
            generator = make_generator(params, logits.device)
        weights, ids = filter_weights(logits, params)
        index = _draw(weights, generator)
        return index if ids is None else int(ids[index])

    return sample
