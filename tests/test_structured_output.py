"""Structured output through the server (serve/structured.py, the engine's per-row matchers): response_format
json_schema and json_object, vLLM's guided_json / guided_regex / guided_grammar, tool_choice required and named,
on both endpoints, streaming and batched, with thinking; a constraint that does not compile is a 400 that says why.
The models are random (the tiny chat model, tiny_chat.py) or write noise (helpers.ScriptThenNoise): only a real
constraint makes their answers valid."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import Tokenizer

from helpers import SCHEMAS, TINY_TEXT_CONFIG, TOOLS, LiveServer, ScriptThenNoise
from tiny_chat import make_chat_checkpoint

SEEDS = {"temperature": 1.0, "seed": 7, "n": 3}  # three samples, seeds 7, 8, 9
GREEDY = {"temperature": 0}
CTX = 4096  # the tools' descriptions in the template take ~1,100 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-serve")
    make_chat_checkpoint(path, text_config={**TINY_TEXT_CONFIG, "max_position_embeddings": CTX})
    return load_checkpoint(path).model, Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    engine = Engine(model, max_concurrency=4, max_queue=8, ctx=CTX)
    server = LiveServer(create_app(engine, tok, "tiny"), engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def thinker(tiny):
    """Writes reasoning and </think>, then noise in which quotes, ] and the end of the turn stand out."""
    _, tok = tiny
    closers = [i for c in ('"', "]") for i in tok.encode_plain(c)] + sorted(tok.eos_token_ids)
    model = ScriptThenNoise(tok, ["Let me think", tok.token_to_id("</think>")], closers)
    engine = Engine(model, max_concurrency=4, max_queue=8, ctx=CTX)
    server = LiveServer(create_app(engine, tok, "thinker"), engine)
    yield server
    server.stop()


def chat(server: LiveServer, content: str = "Answer as asked.", **body) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 150, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(server: LiveServer, **body) -> list[dict]:
    body = {"messages": [{"role": "user", "content": "Answer as asked."}], "max_tokens": 150, **body, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_answers_validate(live):
    for schema in SCHEMAS.values():
        for sampling in (GREEDY, SEEDS):
            reply = chat(live, response_format=json_schema_format(schema), **sampling)
            for choice in reply["choices"]:
                assert choice["finish_reason"] == "stop", choice
                jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    # Without the constraint the same model writes no JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(chat(live, max_tokens=20, **GREEDY)["choices"][0]["message"]["content"])


def test_json_object_answers_parse(thinker):
    format = {"type": "json_object"}
    reply = chat(thinker, response_format=format, chat_template_kwargs={"enable_thinking": False}, **SEEDS)
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_thinking_then_json(thinker):
    schema = SCHEMAS["enum-bool-int"]
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    reply = chat(thinker, response_format=json_schema_format(schema), **thinking, **SEEDS)
    for choice in reply["choices"]:
        message = choice["message"]
        assert message["reasoning_content"] == "Let me think" and choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(message["content"]), schema)
    # A forced tool call after the reasoning, too
    choice = {"type": "function", "function": {"name": "add"}}
    reply = chat(thinker, tools=TOOLS, tool_choice=choice, **thinking, **GREEDY)
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert reply["choices"][0]["message"]["reasoning_content"] == "Let me think"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[1]["function"]["parameters"])


def test_tool_choice_required_and_named_give_valid_calls(live):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for tool_choice, names in (
        ("required", set(schemas)),
        ({"type": "function", "function": {"name": "add"}}, {"add"}),
    ):
        body = {"tools": TOOLS, "tool_choice": tool_choice, "chat_template_kwargs": {"enable_thinking": False}}
        reply = chat(live, "Call a tool.", max_tokens=400, **body, **GREEDY)
        (choice,) = reply["choices"]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["tool_calls"]
        for call in choice["message"]["tool_calls"]:
            assert call["function"]["name"] in names
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_streaming_equals_non_streaming(live):
    body = {"response_format": json_schema_format(SCHEMAS["nested"]), "temperature": 1.0, "seed": 3}
    whole = chat(live, **body)["choices"][0]["message"]["content"]
    chunks = chat_stream(live, **body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(streamed), SCHEMAS["nested"])


def test_constrained_and_free_rows_in_one_batch(live):
    schema = SCHEMAS["nested"]
    bodies = [{"response_format": json_schema_format(schema), "temperature": 1.0, "seed": s} for s in (1, 2)] + [
        {"max_tokens": 40, "temperature": 1.0, "seed": s} for s in (1, 2)
    ]
    alone = [chat(live, **b)["choices"][0]["message"]["content"] for b in bodies]
    before = live.engine.max_batch
    live.engine.max_batch = 0
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: chat(live, **b)["choices"][0]["message"]["content"], bodies))
    assert live.engine.max_batch >= 2  # they shared decode steps
    live.engine.max_batch = max(before, live.engine.max_batch)
    assert together == alone  # seeded: each row samples the same, batched or not
    for text in together[:2]:
        jsonschema.validate(json.loads(text), schema)


def test_completions_take_vllm_guided_fields(live):
    def complete(**body) -> list[dict]:
        body = {"prompt": "The answer:", "max_tokens": 80, **body}
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"]

    for choice in complete(guided_json=SCHEMAS["enum-bool-int"], **SEEDS):
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS["enum-bool-int"])
    for choice in complete(guided_regex=r"[a-z]{3}-\d{2}", **SEEDS):
        assert choice["finish_reason"] == "stop" and re.fullmatch(r"[a-z]{3}-\d{2}", choice["text"])
    for choice in complete(guided_grammar='start: "yes" | "no"', **SEEDS):
        assert choice["text"] in ("yes", "no")
    format = {"type": "json_schema", "json_schema": {"schema": SCHEMAS["nested"]}}
    (choice,) = complete(response_format=format, max_tokens=300)
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), SCHEMAS["nested"])


def test_constraints_that_do_not_compile_are_400s(live):
    messages = [{"role": "user", "content": "x"}]
    cases = [
        ({"response_format": json_schema_format({"type": "strin"})}, "response_format.json_schema.schema",
         "Invalid type: strin"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
        ({"guided_json": "{nope"}, "guided_json", "not JSON"),
        ({"guided_regex": "a", "guided_json": {}}, "guided_json", "only one of"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
          "properties": {"p": {"type": "strin"}}}}}], "tool_choice": "required"}, "tool_choice", "Invalid type"),
    ]  # fmt: skip
    for body, param, reason in cases:
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and reason in error["message"], error
        assert error["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "guided_json": {"type": "strin"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
