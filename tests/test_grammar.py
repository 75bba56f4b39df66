"""Constrained decoding (text/grammar.py) on a random-weight model with the real vocabulary, where only a real
constraint can produce valid output: JSON schemas, any JSON object, regexes, Lark grammars, Qwen3.5's XML tool calls
read back by ToolCallParser, reasoning left free until </think>; `qwenlite run --json-schema`."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from qwenlite.cli import main as cli_main
from qwenlite.errors import GrammarError, InvalidArgument
from qwenlite.generate import GenerationStats, generate_tokens, stream
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.sample import SamplingParams
from qwenlite.speculative import NgramDraft, Speculation
from qwenlite.text import grammar
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.toolcalls import ToolCallDelta, ToolCallParser

from helpers import SCHEMAS, TOOLS, ScriptThenNoise
from tiny_chat import make_chat_checkpoint

VOCAB = 512  # the tiny model's logits; its tokenizer has 480 ids
RUNS = [SamplingParams(temperature=0)] + [SamplingParams(temperature=1.0, seed=s) for s in (1, 2)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-weight model (vocabulary 512) with a small byte-level tokenizer and the Qwen3.5 template, its
    special tokens included: decode steps and masks cost little, so many answers fit in a few seconds."""
    path = tmp_path_factory.mktemp("tiny-chat")
    make_chat_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir).model, Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def grammars(tiny):
    model, tok = tiny
    return grammar.Grammars(tok, model.config.vocab_size)


def answer(model, tok, prompt_ids, params, matcher, max_tokens=120) -> tuple[str, str, str]:
    """(answer text, reasoning, finish reason) of one constrained generation."""
    chunks = list(stream(model, tok, prompt_ids, params, max_tokens, grammar=matcher))
    text, reasoning = "".join(c.text for c in chunks), "".join(c.reasoning for c in chunks)
    return text, reasoning, chunks[-1].finish_reason


def user_prompt(tok, text: str, **kwargs) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}], enable_thinking=False, **kwargs)


def test_json_schemas_constrain_a_random_model(tiny, grammars):
    model, tok = tiny
    prompt = user_prompt(tok, "Describe a book as JSON.")
    free = tok.decode(list(generate_tokens(model, prompt, RUNS[0], 20)))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # without the constraint, the model writes noise
    for name, schema in SCHEMAS.items():
        for params in RUNS:
            text, _, finish = answer(model, tok, prompt, params, grammars.matcher(grammar.json_schema(schema), prompt))
            assert finish == "stop", (name, params, text)
            jsonschema.validate(json.loads(text), schema)


def test_json_object_answers_parse(tiny, grammars):
    _, tok = tiny
    closers = [i for c in ('"', "]") for i in tok.encode_plain(c)] + sorted(tok.eos_token_ids)
    model = ScriptThenNoise(tok, [], closers, vocab_size=VOCAB)
    prompt = user_prompt(tok, "Any JSON object, please.")
    free = "".join(c.text for c in stream(model, tok, prompt, RUNS[0], 30))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    for params in RUNS:
        text, _, finish = answer(model, tok, prompt, params, grammars.matcher(grammar.json_object(), prompt), 100)
        assert finish == "stop", text
        value = json.loads(text)
        assert isinstance(value, dict) and value, text


def test_regex_and_lark_constraints(tiny, grammars):
    model, tok = tiny
    prompt = user_prompt(tok, "A code, please.")
    for params in RUNS:
        text, _, finish = answer(model, tok, prompt, params, grammars.matcher(grammar.regex(r"[A-Z]{2}-\d{3}"), prompt))
        assert finish == "stop" and re.fullmatch(r"[A-Z]{2}-\d{3}", text), text
        lark = 'start: "yes" | "no" | "n=" NUM\nNUM: /[0-9]{1,2}/'
        text, _, finish = answer(model, tok, prompt, params, grammars.matcher(grammar.lark(lark), prompt))
        assert finish == "stop" and re.fullmatch(r"yes|no|n=[0-9]{1,2}", text), text


def test_thinking_then_json(tiny, grammars):
    _, tok = tiny
    model = ScriptThenNoise(tok, ["Let me think", tok.token_to_id("</think>")], vocab_size=VOCAB)
    schema = SCHEMAS["enum-bool-int"]
    prompt = tok.encode_chat([{"role": "user", "content": "Think, then JSON."}], enable_thinking=True)
    for params in RUNS:
        text, reasoning, finish = answer(
            model, tok, prompt, params, grammars.matcher(grammar.json_schema(schema), prompt)
        )
        assert reasoning == "Let me think" and finish == "stop"
        jsonschema.validate(json.loads(text), schema)
    # Constrained from the first token instead, the script could not be written: the JSON comes as "reasoning"
    text, reasoning, _ = answer(model, tok, prompt, RUNS[0], grammars.matcher(grammar.json_schema(schema)))
    assert text == "" and reasoning.startswith('{"colour": ')


def parse_calls(tok, text: str) -> list[dict]:
    parser = ToolCallParser(TOOLS)
    calls: dict[int, dict] = {}
    for piece in parser.feed(text) + parser.finish():
        assert isinstance(piece, ToolCallDelta), f"content outside the calls: {piece!r}"
        call = calls.setdefault(piece.index, {"name": None, "arguments": ""})
        call["name"] = piece.name or call["name"]
        call["arguments"] += piece.arguments
    return list(calls.values())


def test_tool_calls_follow_the_parameter_schemas(tiny, grammars):
    model, tok = tiny
    prompt = user_prompt(tok, "Call a tool.")  # the tools' descriptions would overflow the tiny context
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name in (None, "add", "get_weather"):
        constraint = grammar.tool_calls(TOOLS, name, tok)
        stopped = 0
        for params in RUNS:
            text, _, finish = answer(model, tok, prompt, params, grammars.matcher(constraint, prompt), 250)
            if finish != "stop":
                continue
            stopped += 1
            calls = parse_calls(tok, text)
            assert calls and (name is None or [c["name"] for c in calls] == [name]), text
            for call in calls:
                jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        assert stopped >= 2, name


def test_tool_call_strings_follow_pattern_enum_and_length(tiny, grammars):
    _, tok = tiny
    properties = {"code": {"type": "string", "pattern": "^[A-Z]{2}$"}, "kind": {"enum": ["a", "b"]},
                  "note": {"type": "string", "maxLength": 3}}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": properties}}}]
    constraint = grammar.tool_calls(tools, "f", tok)

    def call(**values) -> str:
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
        return f"<tool_call>\n<function=f>\n{params}</function>\n</tool_call>"

    matcher = grammars.matcher(constraint)
    for token in tok.encode(call(code="AB", kind="b", note="x y")):
        matcher.accept(token)
    assert matcher.is_terminated
    for bad in (call(code="ABC"), call(code="ab"), call(kind="c"), call(note="long")):
        matcher = grammars.matcher(constraint)
        with pytest.raises(GrammarError, match="breaks the constraint"):
            for token in tok.encode(bad):
                matcher.accept(token)


def test_compile_errors_say_why(grammars, tiny):
    _, tok = tiny
    cases = [
        (lambda: grammar.json_schema({"type": "strin"}), "Invalid type: strin"),
        (lambda: grammar.json_schema("{not json"), "not JSON"),
        (lambda: grammar.json_schema({"$ref": "#"}), "no answer satisfies the JSON schema"),
        (lambda: grammar.regex("[a-"), "unclosed character class"),
        (lambda: grammar.lark("start: undefined_rule"), "undefined_rule"),
        (lambda: grammar.tool_calls(TOOLS, "nope", tok), "'nope', which is not among the tools"),
        (
            lambda: grammar.tool_calls(
                [
                    {
                        "function": {
                            "name": "f",
                            "parameters": {"properties": {"p": {"type": "string", "minLength": "x"}}},
                        }
                    }
                ],
                None,
                tok,
            ),
            "cannot be compiled",
        ),
    ]
    for make, reason in cases:
        with pytest.raises(GrammarError, match=re.escape(reason)) as e:
            grammars.compile(make())
        assert isinstance(e.value, InvalidArgument) and "\n" not in str(e.value)


def test_compiled_grammars_are_cached_and_masks_cover_the_logits(tiny, grammars):
    _, tok = tiny
    constraint = grammar.json_schema(SCHEMAS["nested"])
    assert grammars.compile(grammar.json_schema(SCHEMAS["nested"])) is grammars.compile(constraint)
    matcher = grammars.matcher(constraint)
    logits = torch.zeros(VOCAB)
    matcher.apply(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == tok.encode_plain("{")  # an object opens with "{"
    matcher.accept(tok.encode_plain("{")[0])
    allowed = matcher.allowed()
    assert allowed[tok.encode_plain('"')[0]] and not allowed[tok.vocab_size :].any()  # ids past the tokenizer's
    # The tool-call markers are the special tokens, as the model writes them
    tools = grammars.matcher(grammar.tool_calls(TOOLS, "add", tok))
    assert tools.allowed().nonzero().flatten().tolist() == [tok.token_to_id("<tool_call>")]


def test_speculation_with_a_grammar_is_refused(tiny, grammars):
    model, tok = tiny
    prompt = user_prompt(tok, "x")
    matcher = grammars.matcher(grammar.json_object(), prompt)
    tokens = generate_tokens(
        model, prompt, RUNS[0], 5, (), None, GenerationStats(), Speculation(NgramDraft(), 2), grammar=matcher
    )
    with pytest.raises(InvalidArgument, match="speculative decoding"):
        next(tokens)


def test_run_json_schema(tiny_dir, tmp_path, capsys):
    schema = SCHEMAS["enum-bool-int"]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "uncompilable.json").write_text(json.dumps({"type": "strin"}))
    argv = ["run", str(tiny_dir), "Give me JSON", "--temperature", "0", "--max-tokens", "80", "--json-schema"]
    assert cli_main(argv + [str(tmp_path / "schema.json")]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    for name, reason in (("bad.json", "is not JSON"), ("uncompilable.json", "Invalid type: strin")):
        assert cli_main(argv + [str(tmp_path / name)]) != 0
        err = capsys.readouterr().err.strip()
        assert reason in err and "\n" not in err
