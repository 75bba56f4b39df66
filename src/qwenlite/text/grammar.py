"""Constrained decoding: a constraint (a JSON schema, any JSON object, a regex, a Lark grammar, tool calls) compiled
against a tokenizer, and a per-sequence matcher that masks the logits of the next token and accepts the sampled one.

The engine is llguidance, chosen by measurement (bench/grammar.py, on the real 248,320-token vocabulary, one AMD EPYC
core, quiet): per-token masks take 25-35 us on flat schemas and ~190 us on a nested one (p99 3 ms), against
xgrammar's 2-16 us (p99 under 100 us); but llguidance compiles a schema in ~1 ms where xgrammar takes 40-120 ms (a
server sees new schemas in requests, and that time lands on the time to first token), its wheel depends on nothing
(xgrammar's requires torch, transformers and triton, and imports transformers, which qwenlite never imports at run
time), its masks overlap the forward (it drops the GIL), and its Lark syntax with inline `%json{...}` writes the XML
tool-call grammar in a few lines. Both are far below a decode step: with a JSON schema, a random-weight
Qwen3.5-0.8B decodes within ~1% of its free speed (0.26 ms per token in the loop, 0.56 ms of mask beside a 59 ms
step).

`Grammars` holds the tokenizer's token table (built once, ~2.5 s for Qwen3.5's vocabulary) and an LRU cache of
compiled constraints; `Grammars.matcher` gives a `GrammarMatcher` per sequence. A prompt that opens in reasoning
gets a deferred matcher: the reasoning is free (but may not end the answer), the constraint starts after
`</think>`."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from qwenlite.errors import GrammarError
from qwenlite.text.textstream import starts_in_reasoning
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# JSON is written as json.dumps writes it (and as models write it): ", " and ": ", no other whitespace, so that a
# model cannot spend its tokens on blank space.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """A constraint in llguidance's grammar form (also the cache key); `what` names it in error messages."""

    grammar: str
    what: str


def json_schema(schema: dict | str) -> Constraint:
    """Answers that validate against `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
    return Constraint(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), "the JSON schema")


def json_object() -> Constraint:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return Constraint(
        llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS), "the JSON object"
    )


def regex(pattern: str) -> Constraint:
    """Answers that match `pattern` as a whole (vLLM's `guided_regex`)."""
    return Constraint(llguidance.LLMatcher.grammar_from_regex(pattern), "the regex")


def lark(source: str) -> Constraint:
    """Answers of a Lark grammar in llguidance's dialect, with `start` as its start rule (vLLM's `guided_grammar`)."""
    return Constraint(llguidance.LLMatcher.grammar_from_lark(source), "the grammar")


# ---------------------------------------------------------------------------------------------------
# Tool calls in Qwen3.5's XML (text/toolcalls.py parses them)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string literal for what we write


def _raw_string(schema: dict) -> str:
    """A Lark terminal body for a string parameter written raw (as ToolCallParser reads it back): the schema's enum,
    const or pattern, else any text of the allowed length; never `</parameter>`, which would end it early."""
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        strings = [v for v in values if isinstance(v, str)]
        if not strings:
            raise GrammarError(f"a string parameter's enum has no strings: {values!r}")
        return "(" + " | ".join(_lark_string(s) for s in strings) + ")"
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    body = f"/(?s:.){{{low},{'' if high is None else int(high)}}}/"
    if "pattern" in schema:  # a JSON schema's pattern searches; matching the whole value is stricter, and valid
        pattern = str(schema["pattern"]).removeprefix("^").removesuffix("$").replace("/", "\\/")
        body = f"/{pattern}/ & {body}"
    return f"({body} & ~/(?s:.)*<\\/parameter>(?s:.)*/)"


def _is_raw(schema: dict) -> bool:
    """The parameters ToolCallParser hands over as raw text (toolcalls.convert_value): strings, untyped ones."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    return "string" in types or types == [None]


def _function_rules(index: int, name: str, parameters: dict) -> list[str]:
    """Rules `f{index}` (one call of `name`) and its parameters', for the tool's `parameters` JSON schema."""
    if not isinstance(parameters, dict):
        raise GrammarError(f"tool {name!r}: parameters must be a JSON schema object")
    properties = parameters.get("properties") or {}
    required = list(parameters.get("required") or [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise GrammarError(f"tool {name!r}: properties must be an object and required a list")
    names = list(properties) + [r for r in required if r not in properties]
    rules, body = [], []
    for j, param in enumerate(names):
        if not re.fullmatch(r"[^>\n]+", str(param)):
            raise GrammarError(f"tool {name!r}: parameter name {param!r} cannot be written in a tool call")
        schema = properties.get(param, {})
        if not isinstance(schema, dict):
            raise GrammarError(f"tool {name!r}: parameter {param!r}'s schema must be an object")
        rule, value = f"f{index}_p{j}", f"F{index}_P{j}"
        if _is_raw(schema):
            # One terminal to the closing tag: a raw value could otherwise end where the lexer likes, not the parser.
            rules.append(f'{value}: "\\n" {_raw_string(schema)} "\\n</parameter>\\n"')
            rules.append(f"{rule}: {_lark_string('<parameter=' + param + '>')} {value}")
        else:
            value_schema = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
            opening = _lark_string(f"<parameter={param}>\n")
            rules.append(f'{rule}: {opening} %json{value_schema} "\\n</parameter>\\n"')
        body.append(rule if param in required else f"{rule}?")
    head = _lark_string(f"\n<function={name}>\n")
    rules.append(f'f{index}: open {head} {" ".join(body)} "</function>\\n" close')
    return rules


def tool_calls(tools: Sequence[dict], name: str | None, tokenizer: Tokenizer) -> Constraint:
    """Qwen3.5's XML tool calls whose arguments follow each tool's `parameters` schema: one or more calls to any
    of `tools` (`tool_choice: "required"`), or, with `name`, one call to that function."""
    functions = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GrammarError("each tool needs a function with a name")
        if not re.fullmatch(r"[^>\n]+", fn["name"]):
            raise GrammarError(f"tool name {fn['name']!r} cannot be written in a tool call")
        functions[fn["name"]] = fn.get("parameters") or {}
    if name is not None and name not in functions:
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    chosen = [name] if name is not None else list(functions)
    if not chosen:
        raise GrammarError('tool_choice "required" needs at least one tool')
    rules = []
    for i, fn in enumerate(chosen):
        try:
            rules += _function_rules(i, fn, functions[fn])
        except GrammarError:
            raise
        except (TypeError, ValueError) as e:  # a minLength that is no number, say
            raise GrammarError(f"tool {fn!r}: its parameters cannot be compiled: {e}") from None
    # The markers are single tokens in Qwen3.5's vocabulary (written by id, as the model writes them), else text.
    for rule, marker in (("open", TOOL_CALL_OPEN), ("close", TOOL_CALL_CLOSE)):
        token = tokenizer.token_to_id(marker)
        rules.append(f"{rule}: " + (f"<[{token}]>" if token is not None else _lark_string(marker)))
    rules.append("call: " + " | ".join(f"f{i}" for i in range(len(chosen))))
    rules.insert(0, "start: call" if name is not None else 'start: call ("\\n" call)*')
    what = f"the parameters of tool {name!r}" if name is not None else "the tools' parameters"
    return Constraint(llguidance.LLMatcher.grammar_from_lark("\n".join(rules)), what)


# ---------------------------------------------------------------------------------------------------
# Compiling and matching


def _one_line(message: str) -> str:
    """llguidance's message on one line, without the excerpts of the source it draws under it."""
    message = message.split("<state>")[0]  # a parser's dump of its state follows
    lines = [line.strip() for line in message.splitlines() if not re.match(r"\s*(\d+\s*\||\^)", line)]
    return " ".join(line for line in lines if line)[:500]


class CompiledGrammar:
    """A checked constraint: a pristine matcher, copied for each sequence (copies share its lexer's caches)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, end_ids: frozenset[int], end_think: int | None):
        self.matcher, self.vocab_size, self.end_ids, self.end_think = matcher, vocab_size, end_ids, end_think


class Grammars:
    """Constraints compiled against one tokenizer, for logits of `vocab_size` entries (the model's, which may
    exceed the tokenizer's ids: those are never allowed). Thread-safe; compiled grammars are cached by constraint."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256):
        if vocab_size < tokenizer.vocab_size:
            raise GrammarError(f"logits of {vocab_size} entries cannot cover the tokenizer's {tokenizer.vocab_size}")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.end_ids = frozenset(tokenizer.eos_token_ids)
        self.table = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=sorted(self.end_ids))
        self.end_think = tokenizer.token_to_id("</think>")
        self.cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The constraint compiled, from the cache when seen before; GrammarError says why one cannot be."""
        with self.lock:
            if (hit := self.cache.get(constraint.grammar)) is not None:
                self.cache.move_to_end(constraint.grammar)
                return hit
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(constraint.grammar, self.table)
        matcher = None if failed else llguidance.LLMatcher(self.table, constraint.grammar, log_level=0)
        if not failed and not matcher.is_error():
            # The first mask, on a copy: a grammar that matches nothing (`{"$ref": "#"}`, say) fails here, not in the
            # engine's thread, and the copies made from it start with its lexer built.
            probe = matcher.deep_copy()
            probe.compute_bitmask()
            if probe.is_error():
                raise GrammarError(f"no answer satisfies {constraint.what} ({_one_line(probe.get_error())})")
        if failed or matcher.is_error():
            reason = _one_line(messages[0] if failed else matcher.get_error())
            raise GrammarError(f"{constraint.what} cannot be compiled: {reason}")
        compiled = CompiledGrammar(matcher, self.vocab_size, self.end_ids, self.end_think)
        with self.lock:
            self.cache[constraint.grammar] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def matcher(self, constraint: Constraint, prompt_ids: Sequence[int] = ()) -> GrammarMatcher:
        """A matcher for one sequence; deferred to `</think>` when the prompt opens in reasoning."""
        deferred = starts_in_reasoning(self.tokenizer, prompt_ids) if prompt_ids else False
        return GrammarMatcher(self.compile(constraint), deferred)


class GrammarMatcher:
    """One sequence's place in a constraint. Per token: `fill_mask` (may run on another thread: it releases the
    GIL), then `apply` to the logits, then `accept` the sampled token. Once the constraint is satisfied and can
    take no more, only the end-of-turn ids are allowed, so the answer ends with finish_reason stop."""

    def __init__(self, compiled: CompiledGrammar, deferred: bool = False):
        self.matcher = compiled.matcher.deep_copy()
        self.vocab_size, self.end_ids, self.end_think = compiled.vocab_size, compiled.end_ids, compiled.end_think
        self.waiting = deferred and self.end_think is not None  # reasoning: free until </think>
        self.bitmask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        self.disallowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.filled = False

    def fill_mask(self) -> None:
        """Compute the next token's mask (`self.disallowed`, (V,) bool)."""
        if self.waiting:
            self.disallowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.disallowed[list(self.end_ids)] = True  # the reasoning must close before the answer can end
        else:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            if self.matcher.is_error():
                raise GrammarError(f"the constraint failed: {_one_line(self.matcher.get_error())}")
            bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]  # (V,)
            self.disallowed = torch.from_numpy(bits == 0)
        self.filled = True

    def allowed(self) -> torch.Tensor:
        """The next token's allowed ids as a (V,) bool tensor (computing the mask if `fill_mask` was not called)."""
        if not self.filled:
            self.fill_mask()
        return ~self.disallowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Disallowed entries of logits (V,) set to -inf, in place; returns logits."""
        if not self.filled:
            self.fill_mask()
        logits.masked_fill_(self.disallowed.to(logits.device), float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        self.filled = False
        if self.waiting:
            self.waiting = token != self.end_think
            return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the constraint: {_one_line(self.matcher.get_error())}")

    @property
    def is_terminated(self) -> bool:
        """The constraint is satisfied and takes no more text: only an end-of-turn token may follow."""
        return not self.waiting and self.matcher.is_stopped()
