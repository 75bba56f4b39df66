"""The HTTP server, live on localhost, driven by the official `openai` client and raw httpx: a tiny random
checkpoint for parity with `qwenlite run` (generate), batching, prompt-state reuse and scoring; a scripted model
for what a random model never writes (tool calls, reasoning); every bad input's status and error shape."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import qwenlite
from qwenlite.cli import main as cli_main
from qwenlite.generate import generate_tokens, stream
from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.sample import SamplingParams
from qwenlite.serve.app import chat_page, create_app
from qwenlite.serve.engine import Engine
from qwenlite.serve.openai import turn_starts
from qwenlite.text.tokenizer import Tokenizer
from qwenlite.text.toolcalls import ToolCallDelta, ToolCallParser

from helpers import LiveServer, ScriptedModel, console_script, tiny_checkpoint, wait_until

GREEDY = SamplingParams(temperature=0)
CTX = 1024
API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir).model, Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    engine = Engine(model, max_concurrency=8, max_queue=8, ctx=CTX)
    server = LiveServer(create_app(engine, tok, "tiny", defaults={"temperature": 0.7}), engine)
    yield server
    server.stop()


def chat_ids(tok: Tokenizer, messages: list[dict], thinking: bool = False) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, enable_thinking=thinking))


def run_answer(model, tok, ids, max_tokens: int) -> tuple[str, str]:
    """What `qwenlite run` prints for these prompt ids: (answer, reasoning)."""
    chunks = list(stream(model, tok, ids, GREEDY, max_tokens))
    return "".join(c.text for c in chunks), "".join(c.reasoning for c in chunks)


# --- the official client against the tiny checkpoint ------------------------------------------------------------


def test_chat_non_streaming_and_streaming_equal_qwenlite_run(tiny, live):
    model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    ids = chat_ids(tok, messages)
    expected, _ = run_answer(model, tok, ids, 16)
    client = live.client()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 16)
    assert reply.usage.total_tokens == len(ids) + 16

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_greedy_chat_equals_the_qwenlite_run_command(tiny_dir, live, capsys):
    prompt = "Name three colours."
    assert cli_main(["run", str(tiny_dir), prompt, "--temperature", "0", "--max-tokens", "16", "--no-think"]) == 0
    printed = capsys.readouterr().out
    messages = [{"role": "user", "content": prompt}]
    reply = live.client().chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content + "\n" == printed and len(set(printed.split())) > 2


def test_eight_concurrent_requests_run_in_one_batch_and_equal_qwenlite_run(tiny, live):
    model, tok = tiny
    questions = [[{"role": "user", "content": f"Question {i}: " + "why " * i}] for i in range(8)]
    expected = [run_answer(model, tok, chat_ids(tok, m), 40)[0] for m in questions]
    client = live.client()
    live.engine.max_batch = 0

    def ask(messages):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, questions))
    assert [r.choices[0].message.content for r in replies] == expected
    assert live.engine.max_batch == 8


def test_enable_thinking_on_and_off(tiny, live):
    """On, the template opens a <think> block, so the (random) model's words are reasoning; off, they are the answer."""
    model, tok = tiny
    messages = [{"role": "user", "content": "Think about it."}]
    client = live.client()
    for thinking in (True, False):
        answer, reasoning = run_answer(model, tok, chat_ids(tok, messages, thinking), 12)
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        )  # fmt: skip
        message = reply.choices[0].message
        assert (message.content or "", getattr(message, "reasoning_content", None) or "") == (answer, reasoning)
        assert bool(reasoning) == thinking and bool(answer) != thinking


def test_prompt_state_reuse_through_the_server(tiny, live):
    """Turn 2 reports the restored prefix in usage and answers what a cold prompt answers, logprobs included."""
    model, tok = tiny
    client = live.client()
    turn1 = [{"role": "user", "content": "Describe a quiet harbour at dawn."}]
    first = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And at dusk?"}]  # fmt: skip
    ids1, ids2 = chat_ids(tok, turn1), chat_ids(tok, turn2)
    shared = turn_starts(ids1, tok.encode("<|im_start|>assistant\n"))[-1]

    def ask():
        return client.chat.completions.create(
            model="tiny", messages=turn2, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
        )

    warm = ask()
    assert warm.usage.prompt_tokens == len(ids2)
    assert warm.usage.prompt_tokens_details.cached_tokens == shared
    assert warm.choices[0].message.content == run_answer(model, tok, ids2, 8)[0]
    live.engine.prompt_cache.clear()
    cold = ask()
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.choices[0].logprobs == cold.choices[0].logprobs  # bit-identical floats


def test_completions_echo_and_logprobs(tiny, live):
    """What an evaluation harness sends: the prompt's own token logprobs (echo, max_tokens 0 or 1)."""
    model, tok = tiny
    client = live.client()
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = tok.encode(prompt)
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)  # (T, V)
    expected = full[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()

    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.tokens == [tok.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert choice.logprobs.text_offset[:3] == [
        0,
        len(choice.logprobs.tokens[0]),
        len("".join(choice.logprobs.tokens[:2])),
    ]
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)

    # lm-eval-harness's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1, temperature 0
    batch = [ids, ids[:5]]
    raw = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": batch, "temperature": 0,
                     "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}).json()  # fmt: skip
    choices = sorted(raw["choices"], key=lambda c: c["index"])
    for c, p in zip(choices, batch, strict=True):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(p) + 1
        assert lp["token_logprobs"][1 : len(p)] == pytest.approx(expected[: len(p) - 1], abs=1e-4)
        pairs = zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True)
        greedy = [logprob == max(top.values()) for logprob, top in pairs]
        assert greedy[-1]  # the generated token is the greedy one
        assert greedy[:-1] == [full[i].argmax().item() == p[i + 1] for i in range(len(p) - 1)]

    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert plain.choices[0].text == tok.decode(list(generate_tokens(model, ids, GREEDY, 10, tok.eos_token_ids)))
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_models_health_and_the_page(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    page = httpx.get(live.url + "/")
    if chat_page() is None:
        assert page.status_code == 404 and page.json()["error"]["type"] == "invalid_request_error"
    else:
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 800,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.Client(timeout=30) as client, client.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):  # the role chunk and a few tokens
            while not next(lines).startswith("data:"):
                pass
        assert live.engine.active == 1
        steps = live.engine.decode_steps
    freed = wait_until(lambda: live.engine.active == 0, timeout=5)
    assert freed < 2.0 and live.engine.decode_steps - steps <= 10  # typically 1


# --- the `qwenlite serve` command ---------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (IPv4 and IPv6), from /proc/net/tcp*: hex as the kernel
    writes them, 0100007F for 127.0.0.1 and 00000000 for 0.0.0.0."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_serve_command_binds_localhost_and_takes_the_checkpoints_defaults(tiny, tiny_dir, tmp_path):
    """`qwenlite serve CHECKPOINT --port P` as a user starts it (the console script, a fresh process, no --host) on a
    checkpoint whose generation_config.json says do_sample false (with a temperature that would sample): it loads,
    listens on 127.0.0.1 only, and a request that names no sampling settings is greedy: twice the in-process greedy
    answer (sampling at 0.7 on this random model would give two different ones)."""
    model, tok = tiny
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != "generation_config.json":
            (ckpt / f.name).symlink_to(f)
    generation = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [248046, 248044]}
    (ckpt / "generation_config.json").write_text(json.dumps(generation))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(qwenlite.__file__).parents[1])}  # this checkout's qwenlite
    argv = [console_script(), "serve", str(ckpt), "--port", str(port), "--ctx", "256", "--max-concurrency", "1"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.perf_counter()
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.perf_counter() - t0 < 45, "no answer on /health within 45 s\n" + log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert f"qwenlite serve: {ckpt} on http://127.0.0.1:{port}/v1" in log.read_text()
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [str(ckpt)]
        messages = [{"role": "user", "content": "Name three colours."}]
        expected, _ = run_answer(model, tok, chat_ids(tok, messages), 12)
        for _ in range(2):
            reply = client.chat.completions.create(model=str(ckpt), messages=messages, max_tokens=12)
            assert reply.choices[0].message.content == expected
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- bad input ---------------------------------------------------------------------------------------------------

LONG = "word " * 1500  # past the 1024-token context

BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    (
        "temperature a string",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),  # fmt: skip
    (
        "max_tokens a string",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
        400,
        "max_tokens",
    ),  # fmt: skip
    (
        "max_tokens 0",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),  # fmt: skip
    (
        "negative max_completion_tokens",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3},
        400,
        "max_tokens",
    ),  # fmt: skip
    (
        "temperature out of range",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
        400,
        "temperature",
    ),  # fmt: skip
    (
        "top_p out of range",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
        400,
        "top_p",
    ),  # fmt: skip
    (
        "unknown model",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),  # fmt: skip
    (
        "prompt longer than the context",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
    ),  # fmt: skip
    (
        "tool arguments not JSON",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        400,
        "messages",
    ),  # fmt: skip
    (
        "template refuses",
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "content": "no user"}]},
        400,
        "messages",
    ),  # fmt: skip
    (
        "an image part without its url",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages.0.content.0",
    ),  # fmt: skip
    (
        "an image for a model without a vision tower",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        400,
        "messages.0.content.0.image_url",
    ),  # fmt: skip
    (
        "a video part without its url",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
        400,
        "messages.0.content.0",
    ),  # fmt: skip
    (
        "a video for a model without a vision tower",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:,"}}]}]},
        400,
        "messages.0.content.0.video_url",
    ),  # fmt: skip
    (
        "enable_thinking not a bool",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": "yes"}},
        400,
        "chat_template_kwargs.enable_thinking",
    ),  # fmt: skip
    (
        "tool_choice without tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),  # fmt: skip
    ("n = 0", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ("n = 17", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ("completion n = 0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completion n = 17", "/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("n * prompts over the queue", "/v1/completions", {"prompt": ["x", "y"], "n": 9}, 400, "n"),
    (
        "completion max_tokens 0 without echo",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 0},
        400,
        "max_tokens",
    ),  # fmt: skip
    ("token id out of range", "/v1/completions", {"prompt": [1, 999999999]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("completion prompt too long", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("logprobs out of range", "/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("no such route", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize(("path", "payload", "status", "param"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])  # fmt: skip
def test_bad_input_answers_its_status_in_the_openai_error_shape(live, path, payload, status, param):
    if isinstance(payload, bytes):
        r = httpx.post(live.url + path, content=payload, headers={"content-type": "application/json"})
    else:
        r = httpx.post(live.url + path, json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if "context" in r.text:
        assert error["code"] == "context_length_exceeded"


def test_the_server_keeps_serving_after_bad_input(tiny, live):
    """Runs after the bad inputs above: right answers, and no slot held."""
    model, tok = tiny
    messages = [{"role": "user", "content": "Still there?"}]
    reply = live.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == run_answer(model, tok, chat_ids(tok, messages), 6)[0]
    wait_until(lambda: live.engine.active == 0 and live.engine.waiting == 0)


# --- a scripted model: tool calls, reasoning, stop strings, auth, a full queue ------------------------------------

THINK, END_THINK = 248068, 248069


TOOL_CALL = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n<parameter=units>\n{\"temp\": \"C\"}\n</parameter>\n</function>\n"
             "</tool_call>")  # fmt: skip
SCRIPTS = {
    "[plain]": ["Hello there, friend."],
    "[weather]": [TOOL_CALL],
    "<tool_response>": ["It is sunny in Paris."],
    "[think]": ["Six times seven.\n", END_THINK, "\n\nThe answer is 42."],
    "[stop]": ["one two STOP three four"],
    "[forced]": [
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    ],
    "[long]": ["la " * 600],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                          "units": {"type": "object"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def scripted(qwen35_tokenizer):
    engine = Engine(ScriptedModel(qwen35_tokenizer, SCRIPTS, delay=0.005), max_concurrency=2, max_queue=1, ctx=CTX)
    server = LiveServer(create_app(engine, qwen35_tokenizer, "scripted", api_key=API_KEY), engine)
    yield server
    server.stop()


def ask(server: LiveServer, content: str, **kwargs):
    messages = [{"role": "user", "content": content}]
    return server.client(API_KEY).chat.completions.create(model="scripted", messages=messages, **kwargs)


def test_a_tool_call_round_trip(scripted):
    reply = ask(scripted, "[weather] in Paris?", tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3, "units": {"temp": "C"}}

    chunks = list(ask(scripted, "[weather] in Paris?", tools=TOOLS, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) == 5  # name, 3 params, close
    assert json.loads("".join(d.function.arguments for d in deltas)) == json.loads(call.function.arguments)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages = [
        {"role": "user", "content": "[weather] in Paris?"},
        {"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    client = scripted.client(API_KEY)
    final = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    assert final.choices[0].message.content == "It is sunny in Paris."
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls


def test_a_named_tool_choice_forces_the_call(scripted):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = ask(scripted, "[forced]", tools=TOOLS, tool_choice=choice)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}


def test_reasoning_is_returned_apart_from_the_answer(scripted):
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    message = ask(scripted, "[think] 6*7?", extra_body=thinking).choices[0].message
    assert (message.reasoning_content, message.content) == ("Six times seven.", "The answer is 42.")
    chunks = list(ask(scripted, "[think] 6*7?", extra_body=thinking, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert "".join(r for r in reasoning if r) == "Six times seven."
    assert "".join(d.content or "" for d in deltas) == "The answer is 42."
    assert not any(d.content and getattr(d, "reasoning_content", None) for d in deltas)


def test_stop_strings(scripted):
    reply = ask(scripted, "[stop]", stop=["STOP"])
    assert reply.choices[0].message.content == "one two " and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 6


def test_the_api_key_is_required(scripted):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(scripted.url + "/v1/chat/completions", json={"messages": []}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(scripted.url + "/v1/models").status_code == 401
    assert httpx.get(scripted.url + "/health").status_code == 200
    assert ask(scripted, "[plain]").choices[0].message.content == "Hello there, friend."


def test_a_full_queue_answers_429_and_closed_streams_free_their_slots(scripted):
    body = {"model": "scripted", "messages": [{"role": "user", "content": "[long]"}], "max_tokens": 600,
            "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = scripted.url + "/v1/chat/completions"
    with httpx.Client(timeout=30, headers=headers) as client:
        streams = [client.stream("POST", url, json=body) for _ in range(3)]  # 2 slots and 1 queue place
        responses = [s.__enter__() for s in streams]
        try:
            wait_until(lambda: scripted.engine.active == 2 and scripted.engine.waiting == 1)
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        finally:
            steps = scripted.engine.decode_steps
            for s in streams:
                s.__exit__(None, None, None)
    assert all(r.status_code == 200 for r in responses)
    wait_until(lambda: scripted.engine.active == 0 and scripted.engine.waiting == 0, timeout=5)
    assert scripted.engine.decode_steps - steps <= 10  # freed when closed (typically 0 or 1); 600 tokens otherwise
    assert ask(scripted, "[plain]").choices[0].message.content == "Hello there, friend."


# --- the tool-call parser alone ---------------------------------------------------------------------------------


def parse(pieces: list[str], tools=TOOLS) -> tuple[str, list[dict]]:
    parser = ToolCallParser(tools)
    items = [i for p in pieces for i in parser.feed(p)] + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    calls: dict[int, dict] = {}
    for d in (i for i in items if isinstance(i, ToolCallDelta)):
        call = calls.setdefault(d.index, {"name": d.name, "arguments": ""})
        call["arguments"] += d.arguments
    return content, [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()]


def test_tool_calls_parse_the_same_however_the_text_is_cut():
    text = TOOL_CALL + "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
    whole = parse([text])
    assert whole == ("Let me check.", [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "units": {"temp": "C"}}},
        {"name": "get_time", "arguments": {}},
    ])  # fmt: skip
    assert parse(list(text)) == whole  # one character at a time


def test_tool_call_values_follow_the_schema():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "properties": {
                        "s": {"type": "string"},
                        "n": {"type": "number"},
                        "b": {"type": "boolean"},
                        "l": {"type": "array"},
                    }
                },
            },
        }
    ]
    call = "<tool_call>\n<function=f>\n" + "".join(
        f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in [("s", "42"), ("n", "2.5"), ("b", "True"), ("l", "[1, 2]"),
                                                            ("x", "7")]) + "</function>\n</tool_call>"  # fmt: skip
    assert parse([call], tools)[1] == [{"name": "f", "arguments": {"s": "42", "n": 2.5, "b": True, "l": [1, 2],
                                                                    "x": "7"}}]  # fmt: skip


def test_text_that_is_not_a_tool_call_stays_content():
    assert parse(["a < b and <tool_ is not a call"]) == ("a < b and <tool_ is not a call", [])
    assert parse(["x <tool_call> no function here </tool_call> y"])[0] == "x<tool_call> no function here  y"
    content, calls = parse(["<tool_call>\n<function=get_weather>\n<parameter=city>\nOs"])  # cut short by max_tokens
    assert content == "" and calls == [{"name": "get_weather", "arguments": {}}]


# --- n samples per prompt ---------------------------------------------------------------------------------------


def sse_events(url: str, payload: dict) -> list:
    """A streamed response's data lines, parsed; the last is the string "[DONE]"."""
    events = []
    with httpx.stream("POST", url, json=payload, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    return events


def test_chat_n_samples_draw_with_seed_plus_i_and_stream_the_same(live):
    """What a pass@k harness asks: n = 3 with seed s is three requests with seeds s, s + 1, s + 2."""
    messages = [{"role": "user", "content": "Write a word."}]
    payload = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 1, "seed": 40}
    url = live.url + "/v1/chat/completions"
    alone = [httpx.post(url, json={**payload, "seed": 40 + i}, timeout=60).json() for i in range(3)]
    reply = httpx.post(url, json={**payload, "n": 3}, timeout=60).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in reply["choices"]]
    assert texts == [a["choices"][0]["message"]["content"] for a in alone]
    assert len(set(texts)) == 3  # the samples differ
    assert [c["finish_reason"] for c in reply["choices"]] == [a["choices"][0]["finish_reason"] for a in alone]
    usage = reply["usage"]
    assert usage["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]  # the prompt counts once
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    events = sse_events(url, {**payload, "n": 3, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [e for e in events[:-1] if e["choices"]]
    streamed, finishes = ["", "", ""], [[], [], []]
    for c in chunks:
        (choice,) = c["choices"]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
        if choice.get("finish_reason"):
            finishes[choice["index"]].append(choice["finish_reason"])
    assert streamed == texts
    assert finishes == [[c["finish_reason"]] for c in reply["choices"]]  # one finish_reason per choice
    assert events[-2]["choices"] == [] and events[-2]["usage"] == usage

    unseeded = httpx.post(url, json={**payload, "seed": None, "n": 3}, timeout=60).json()
    assert len({c["message"]["content"] for c in unseeded["choices"]}) > 1  # each sample draws its own


def test_completions_n_samples_are_prompt_major(live):
    """2 prompts x n = 2: choice p * 2 + i is prompt p with seed s + i; a prompt's tokens count once."""
    prompts = ["The sky is", "Once upon a time, in a land far away,"]
    payload = {"model": "tiny", "max_tokens": 5, "temperature": 1, "seed": 7}
    url = live.url + "/v1/completions"
    alone = [
        [httpx.post(url, json={**payload, "prompt": p, "seed": 7 + i}, timeout=60).json() for i in range(2)]
        for p in prompts
    ]
    reply = httpx.post(url, json={**payload, "prompt": prompts, "n": 2}, timeout=60).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    expected = [alone[p][i]["choices"][0]["text"] for p in range(2) for i in range(2)]
    assert [c["text"] for c in reply["choices"]] == expected
    assert expected[0] != expected[1] and expected[2] != expected[3]
    usage = reply["usage"]
    assert usage["prompt_tokens"] == sum(alone[p][0]["usage"]["prompt_tokens"] for p in range(2))
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for pair in alone for a in pair)

    events = sse_events(url, {**payload, "prompt": prompts, "n": 2, "stream": True,
                              "stream_options": {"include_usage": True}})  # fmt: skip
    streamed = [""] * 4
    for e in events[:-2]:
        (choice,) = e["choices"]
        streamed[choice["index"]] += choice["text"]
    assert streamed == expected and events[-2]["usage"] == usage


def test_n_is_bounded_per_request_and_by_the_queue(live):
    """n above 16 is refused as such, whatever the queue holds; n * prompts beyond slots + queue names both."""
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    too_many = httpx.post(live.url + "/v1/chat/completions", json={**chat, "n": 17}).json()["error"]
    assert too_many["param"] == "n" and "between 1 and 16, got 17" in too_many["message"]
    over = httpx.post(live.url + "/v1/completions", json={"prompt": ["x", "y"], "n": 9, "max_tokens": 1}).json()
    assert over["error"]["param"] == "n" and "18 samples" in over["error"]["message"]
    assert httpx.post(live.url + "/v1/completions", json={"prompt": ["x", "y"], "n": 8, "max_tokens": 1}).is_success


def test_preserved_reasoning_lets_the_next_turn_reuse_the_whole_answer(qwen36_tokenizer_dir):
    """With a Qwen3.6-style template, `preserve_thinking` keeps the reasoning in the history: the next turn's prompt
    then starts with the whole of the last prompt and answer, so it restores that state, where without it only the
    prompt up to the dropped reasoning is restored. OpenAI's `reasoning_effort` reaches the template too."""
    tok = Tokenizer.from_dir(qwen36_tokenizer_dir)
    engine = Engine(ScriptedModel(tok, SCRIPTS), max_concurrency=1, max_queue=4, ctx=CTX)
    server = LiveServer(create_app(engine, tok, "scripted"), engine)
    try:
        client = server.client()
        turn1 = [{"role": "user", "content": "[think] 6*7?"}]
        cached = {}
        for preserve in (False, True):
            engine.prompt_cache.clear()
            kwargs = {"chat_template_kwargs": {"enable_thinking": True, "preserve_thinking": preserve}}
            first = client.chat.completions.create(model="scripted", messages=turn1, extra_body=kwargs)
            answer = first.choices[0].message
            assert (answer.reasoning_content, answer.content) == ("Six times seven.", "The answer is 42.")
            turn2 = [*turn1, {"role": "assistant", "content": answer.content,
                              "reasoning_content": answer.reasoning_content},
                     {"role": "user", "content": "[plain] thanks"}]  # fmt: skip
            kwargs["chat_template_kwargs"]["enable_thinking"] = False  # the history renders the same either way
            second = client.chat.completions.create(model="scripted", messages=turn2, extra_body=kwargs)
            assert second.choices[0].message.content == "Hello there, friend."
            cached[preserve] = second.usage.prompt_tokens_details.cached_tokens
            whole = first.usage.prompt_tokens + first.usage.completion_tokens
        assert cached[True] >= whole - 1 > cached[False] > 0, (cached, whole)

        effort = client.chat.completions.create(model="scripted", messages=turn1, reasoning_effort="low")
        assert effort.usage.prompt_tokens == len(tok.encode_chat(turn1, reasoning_effort="low"))
        with pytest.raises(openai.BadRequestError, match="reasoning_effort must be"):
            client.chat.completions.create(model="scripted", messages=turn1, extra_body={"reasoning_effort": "max"})
    finally:
        server.stop()
