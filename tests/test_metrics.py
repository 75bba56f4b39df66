"""GET /metrics: the Prometheus text format, parsed back, with counters that move by exactly what the requests
between two scrapes did (their usage, their statuses, one first token each), the engine's gauges, a cancelled
stream counted as 499, and apps in one process that count apart. The scripted model stands in for the network."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine

from helpers import LiveServer, ScriptedModel, wait_until

API_KEY = "sk-metrics"
SCRIPTS = {"[plain]": ["Hello there, friend."], "[count]": ["one two three four five six"], "[long]": ["la " * 600]}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def start(tokenizer, api_key: str | None = API_KEY) -> LiveServer:
    engine = Engine(ScriptedModel(tokenizer, SCRIPTS, delay=0.005), max_concurrency=2, max_queue=2, ctx=1024)
    return LiveServer(create_app(engine, tokenizer, "scripted", api_key=api_key), engine)


@pytest.fixture(scope="module")
def server(qwen35_tokenizer):
    live = start(qwen35_tokenizer)
    yield live
    live.stop()


def scrape(server: LiveServer) -> dict[tuple, float]:
    """Every sample, without the API key: {(name, sorted label pairs): value}."""
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:
    """Summed over every label value."""
    return sum(v for (n, _), v in samples.items() if n == name)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def requests(endpoint: str, status: int) -> dict:
    return {"endpoint": endpoint, "status": str(status)}


def post(server: LiveServer, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def stream_usage(server: LiveServer, path: str, body: dict) -> dict:
    """A streamed request read to [DONE]; its usage chunk."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        chunks = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return httpx.Response(200, content=chunks[-2]).json()["usage"]


def test_counters_move_by_what_the_requests_did(server):
    wait_until(lambda: server.engine.active == 0 and server.engine.waiting == 0)
    before = scrape(server)
    chat = post(server, CHAT, {"messages": [{"role": "user", "content": "[plain]"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "Hello there, friend."
    completion = stream_usage(server, COMPLETIONS, {"prompt": "[count]", "max_tokens": 4})
    assert completion["completion_tokens"] == 4
    assert post(server, CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).status_code == 400
    assert post(server, COMPLETIONS, {"prompt": "[count]"}, key=None).status_code == 401
    after = scrape(server)

    usages = [chat.json()["usage"], completion]
    assert moved(before, after, "qwenlite_requests_total", **requests(CHAT, 200)) == 1
    assert moved(before, after, "qwenlite_requests_total", **requests(CHAT, 400)) == 1
    assert moved(before, after, "qwenlite_requests_total", **requests(COMPLETIONS, 200)) == 1
    assert moved(before, after, "qwenlite_requests_total", **requests(COMPLETIONS, 401)) == 1
    assert total(after, "qwenlite_requests_total") - total(before, "qwenlite_requests_total") == 4  # nothing else
    assert moved(before, after, "qwenlite_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved(before, after, "qwenlite_generated_tokens_total") == sum(u["completion_tokens"] for u in usages)
    cached = sum(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages)
    assert moved(before, after, "qwenlite_cached_tokens_total") == cached
    # One first token per answered request; a gap between each two successive tokens of an answer.
    assert moved(before, after, "qwenlite_time_to_first_token_seconds_count") == 2
    gaps = sum(u["completion_tokens"] - 1 for u in usages)
    assert moved(before, after, "qwenlite_inter_token_latency_seconds_count") == gaps
    assert moved(before, after, "qwenlite_inter_token_latency_seconds_bucket", le="+Inf") == gaps
    assert moved(before, after, "qwenlite_time_to_first_token_seconds_sum") > 0
    assert moved(before, after, "qwenlite_decode_steps_total") >= max(u["completion_tokens"] for u in usages) - 1
    assert value(after, "qwenlite_decode_steps_total") == server.engine.decode_steps
    assert value(after, "qwenlite_requests_waiting") == 0 and value(after, "qwenlite_requests_active") == 0
    assert ("qwenlite_requests_waiting", ()) in after and ("qwenlite_requests_active", ()) in after


def test_gauges_read_the_engine_and_a_closed_stream_counts_as_499(server):
    before = scrape(server)
    body = {"messages": [{"role": "user", "content": "[long]"}], "max_tokens": 600, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + CHAT, json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        wait_until(lambda: server.engine.active == 1)
        during = scrape(server)
    assert value(during, "qwenlite_requests_active") == 1 and value(during, "qwenlite_requests_waiting") == 0
    wait_until(lambda: moved(before, scrape(server), "qwenlite_requests_total", **requests(CHAT, 499)) == 1)
    after = scrape(server)
    assert moved(before, after, "qwenlite_requests_total", **requests(CHAT, 200)) == 0
    assert value(after, "qwenlite_requests_active") == 0
    assert 1 <= moved(before, after, "qwenlite_generated_tokens_total") < 600


def test_each_app_counts_its_own_requests(server, qwen35_tokenizer):
    other = start(qwen35_tokenizer, api_key=None)
    try:
        first = scrape(other)
        assert not any(name == "qwenlite_requests_total" for name, _ in first)
        assert value(first, "qwenlite_prompt_tokens_total") == 0
        before = scrape(server)
        assert post(other, CHAT, {"messages": [{"role": "user", "content": "[plain]"}]}, key=None).status_code == 200
        assert moved(first, scrape(other), "qwenlite_requests_total", **requests(CHAT, 200)) == 1
        assert scrape(server) == before
    finally:
        other.stop()
