"""Structured output for the OpenAI adapter: which constraint a request asks for (OpenAI's `response_format`,
vLLM's `guided_json` / `guided_regex` / `guided_grammar`, a `tool_choice` that forces calls), compiled once per
distinct constraint, and each engine request's own matcher (text/grammar.py). The engine masks each constrained
row's logits with it, the masks computed while the batched forward runs (serve/runner.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from qwenlite.errors import GrammarError
from qwenlite.serve.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from qwenlite.text import grammar
from qwenlite.text.tokenizer import Tokenizer


def requested(
    body: ChatCompletionRequest | CompletionRequest, tools: list[dict] | None, tokenizer: Tokenizer
) -> dict[str, Callable[[], grammar.Constraint]]:
    """{request field: how to make the constraint it asks for}; several are refused by the caller."""
    out: dict[str, Callable[[], grammar.Constraint]] = {}
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        out["response_format"] = grammar.json_object
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        if schema is None:
            raise GrammarError("response_format json_schema needs json_schema.schema", param="response_format")
        out["response_format.json_schema.schema"] = lambda: grammar.json_schema(schema)
    if body.guided_json is not None:
        out["guided_json"] = lambda: grammar.json_schema(body.guided_json)
    if body.guided_regex is not None:
        out["guided_regex"] = lambda: grammar.regex(body.guided_regex)
    if body.guided_grammar is not None:
        out["guided_grammar"] = lambda: grammar.lark(body.guided_grammar)
    choice = getattr(body, "tool_choice", None)
    if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        name = None if choice == "required" else choice.function.name
        out["tool_choice"] = lambda: grammar.tool_calls(tools, name, tokenizer)
    return out


class StructuredOutput:
    """The tokenizer's grammar table, built on first use (about 2.5 s for Qwen3.5's vocabulary), and its cache of
    compiled constraints. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._grammars: grammar.Grammars | None = None
        self._lock = threading.Lock()

    def grammars(self) -> grammar.Grammars:
        with self._lock:
            if self._grammars is None:
                self._grammars = grammar.Grammars(self.tokenizer, self.vocab_size)
            return self._grammars

    def constraint(self, body, tools: list[dict] | None) -> grammar.Constraint | None:
        """The request's one constraint, compiled, or None; GrammarError (with the field as `param`) for one that
        does not compile, or for more than one."""
        asked = requested(body, tools, self.tokenizer)
        if not asked:
            return None
        if len(asked) > 1:
            fields = ", ".join(asked)
            raise GrammarError(f"only one of {fields} may constrain the answer", param=next(iter(asked)))
        ((param, make),) = asked.items()
        try:
            constraint = make()
            self.grammars().compile(constraint)
        except GrammarError as e:
            raise GrammarError(str(e), param=param) from None
        return constraint

    def matcher(self, constraint: grammar.Constraint | None, ids: list[int]) -> grammar.GrammarMatcher | None:
        """A request's own matcher (each of n samples its own), deferred to </think> when the prompt opens in
        reasoning."""
        return None if constraint is None else self.grammars().matcher(constraint, ids)
