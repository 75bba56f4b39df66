"""Constrained decoding's cost, in one run: the two grammar engines qwenlite could use (xgrammar, llguidance) on
the real Qwen3.5 vocabulary (248,320 logits), and decode tokens/s of one model with and without a JSON schema.
Run by hand, never in CI; it wants a quiet machine:

    python bench/grammar.py                        # the engines: compile time, per-token mask time
    qwenlite init-random qwen3.5-0.8b /tmp/q08     # random weights at the real shapes
    python bench/grammar.py --decode /tmp/q08      # and decode tok/s with and without a schema, same run

Decode: sampled answers (temperature 1, seeds 0, 1, ...) to one chat prompt, alternately free (the end-of-turn token
ignored, `--tokens` tokens) and constrained by the "decode" schema (bounded, so each answer ends when its JSON does),
through `generate.generate_tokens`; tokens/s = decode tokens over decode seconds, summed over the runs of each kind.

For each schema, a valid instance (written as a model would: ", " and ": " separators) is tokenized with the real
tokenizer, and the engine's matcher walks it: the time to compute the next token's mask, then accept the token.
xgrammar is imported only when installed (its wheel requires torch, transformers and triton: install it with
`pip install --no-deps --target DIR xgrammar apache-tvm-ffi` and put DIR on PYTHONPATH to compare). qwenlite uses
llguidance (text/grammar.py says why).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.vocab import write_tokenizer_files

VOCAB = 248320  # Qwen3.5's logits; the tokenizer has 248,077 ids
SEPARATORS = (", ", ": ")

# name -> (schema or None for any JSON object, an instance to walk)
SCHEMAS = {
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "enum-bool-int": (
        {
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "ok": {"type": "boolean"},
                "n": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["colour", "ok", "n"],
            "additionalProperties": False,
        },
        {"colour": "green", "ok": True, "n": 42},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "authors": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "email": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}},
                        },
                        "required": ["name", "email"],
                        "additionalProperties": False,
                    },
                },
                "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                "score": {"type": "number"},
            },
            "required": ["title", "authors", "year"],
            "additionalProperties": False,
        },
        {
            "title": "On computable numbers",
            "authors": [
                {"name": "Alan Turing", "email": None, "tags": ["logic", "machines"]},
                {"name": "Alonzo Church", "email": "church@princeton.edu", "tags": []},
            ],
            "year": 1936,
            "score": 9.75,
        },
    ),
    "json_object": (None, {"answer": [1, 2.5, "three", {"four": None, "five": False}], "note": "any object"}),
}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Llguidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        import llguidance
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.LLTokenizer(tok.to_json(), n_vocab=VOCAB, eos_token=sorted(tok.eos_token_ids))
        self.mask = llguidance.torch.allocate_token_bitmask(1, VOCAB)

    def compile(self, schema):
        options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"}, defaults=options
        )
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher  # llguidance compiles lazily: the grammar's first masks build the lexer

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        matcher, times = compiled, []
        for t in tokens:
            t0 = time.perf_counter()
            self.llt.fill_next_token_bitmask(matcher, self.mask)
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), matcher.get_error()
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer):
        import xgrammar

        self.xgr = xgrammar
        vocab = [bytes(tok.token_bytes(i)) for i in range(tok.vocab_size)]
        info = xgrammar.TokenizerInfo(
            vocab, xgrammar.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=sorted(tok.eos_token_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, VOCAB)

    def compile(self, schema):
        if schema is None:
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        matcher, times = self.xgr.GrammarMatcher(compiled), []
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(self.mask)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t), t
        return times


def bench_engines(tok: Tokenizer, repeat: int) -> None:
    engines = []
    for engine in (Llguidance, Xgrammar):
        try:
            t0 = time.perf_counter()
            engines.append(engine(tok))
            print(f"{engine.name}: tokenizer set up in {time.perf_counter() - t0:.2f} s")
        except ImportError as e:
            print(f"{engine.name}: not installed ({e})")
    print(f"\n{'engine':<11} {'schema':<14} {'tokens':>6} {'compile ms':>10} {'first mask ms':>13} "
          f"{'mean mask us':>12} {'p99 mask us':>11}")  # fmt: skip
    for name, (schema, instance) in SCHEMAS.items():
        tokens = tok.encode_plain(json.dumps(instance, ensure_ascii=False))
        for engine in engines:
            compiles, firsts, steps = [], [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                compiled = engine.compile(schema)
                compiles.append(time.perf_counter() - t0)
                times = engine.walk(compiled, tokens)
                firsts.append(times[0])
                steps += times[1:]
            print(
                f"{engine.name:<11} {name:<14} {len(tokens):>6} {statistics.median(compiles) * 1e3:>10.1f} "
                f"{statistics.median(firsts) * 1e3:>13.2f} {statistics.mean(steps) * 1e6:>12.1f} "
                f"{percentile(steps, 0.99) * 1e6:>11.1f}"
            )


# Bounded everywhere, so that a random-weight model's answer ends; strings are where most of its tokens go.
DECODE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "tags": {"type": "array", "items": {"enum": ["fiction", "history", "science"]}, "maxItems": 3},
        "authors": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "alive": {"type": "boolean"},
                    "email": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
                },
                "required": ["name", "alive", "email"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "year", "tags", "authors"],
    "additionalProperties": False,
}


class Timed:
    """Seconds spent in some of an object's methods, the object otherwise unchanged."""

    def __init__(self, obj, names: tuple[str, ...]):
        self.seconds = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(obj, name, self._wrap(name, getattr(obj, name)))

    def _wrap(self, name: str, method):
        def timed(*args):
            t0 = time.perf_counter()
            out = method(*args)
            self.seconds[name] += time.perf_counter() - t0
            return out

        return timed


def bench_decode(path: str, runs: int, tokens: int) -> None:
    from qwenlite.generate import GenerationStats, generate_tokens
    from qwenlite.io.load import load_model
    from qwenlite.sample import SamplingParams
    from qwenlite.text.grammar import Grammars, json_schema

    model, tok = load_model(path)
    grammars = Grammars(tok, model.config.vocab_size)
    constraint = json_schema(DECODE_SCHEMA)
    prompt = tok.encode_chat([{"role": "user", "content": "Describe a book as JSON."}], enable_thinking=False)
    speeds: dict[str, list[float]] = {"free": [], "schema": []}
    ratios, step, masks, path_ms = [], [], [], []
    for run in range(-1, runs):  # run -1 warms up (pages the weights in, builds the kernels and the lexer)
        for kind in speeds:
            params = SamplingParams(temperature=1.0, seed=max(run, 0))
            matcher = grammars.matcher(constraint, prompt) if kind == "schema" else None
            timed = Timed(matcher, ("fill_mask", "apply", "accept")) if matcher is not None else None
            stats = GenerationStats()
            for _ in generate_tokens(model, prompt, params, tokens, (), None, stats, grammar=matcher):
                pass
            n = stats.generated_tokens
            print(f"  {kind} answer {run}: {stats.summary()}", flush=True)
            if run < 0:
                continue
            speeds[kind].append(stats.decode_tokens_per_second)
            step.append(stats.decode_seconds / (n - 1) * 1e3)
            if timed is not None:
                ratios.append(speeds["schema"][-1] / speeds["free"][-1])
                masks.append(timed.seconds["fill_mask"] / n * 1e3)
                path_ms.append((timed.seconds["apply"] + timed.seconds["accept"]) / n * 1e3)
    median = statistics.median
    print(f"\ndecode, {path}: {runs} answers of each kind (at most {tokens} tokens), temperature 1, alternating")
    print(f"{'answers':<8} {'median tok/s':>12} {'best tok/s':>10}")
    for kind, values in speeds.items():
        print(f"{kind:<8} {median(values):>12.2f} {max(values):>10.2f}")
    print(f"with the schema, the median of paired ratios: {median(ratios) - 1:+.1%} tok/s")
    print(f"grammar per token: mask {median(masks):.3f} ms (on the worker thread, beside the decode step), "
          f"apply + accept {median(path_ms):.3f} ms (in the loop); decode step {median(step):.1f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="walks per engine and schema (a fresh matcher each)")
    parser.add_argument("--decode", metavar="MODEL", help="a checkpoint directory: decode tok/s with and without")
    parser.add_argument("--runs", type=int, default=4, help="decode: answers of each kind")
    parser.add_argument("--tokens", type=int, default=64, help="decode: most tokens per answer")
    parser.add_argument("--skip-engines", action="store_true", help="only the decode comparison")
    args = parser.parse_args()
    if not args.skip_engines:
        with tempfile.TemporaryDirectory() as d:
            write_tokenizer_files(d)
            tok = Tokenizer.from_dir(d)
        bench_engines(tok, args.repeat)
    if args.decode:
        bench_decode(args.decode, args.runs, args.tokens)


if __name__ == "__main__":
    main()
