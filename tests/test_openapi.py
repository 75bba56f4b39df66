"""The described API: /openapi.json is a valid OpenAPI 3 document that names every endpoint's typed body and its
answers, /docs renders it, and schemathesis, generating requests from that document (valid and invalid), gets no
5xx from the server: every refusal is a 4xx in the OpenAI error shape."""

from __future__ import annotations

import re

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from qwenlite.io.checkpoint import load_checkpoint
from qwenlite.serve.app import create_app
from qwenlite.serve.engine import Engine
from qwenlite.text.tokenizer import Tokenizer

from helpers import tiny_checkpoint

CTX = 64  # generated requests may ask for any max_tokens: a small context keeps each answer short


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory)
    engine = Engine(load_checkpoint(path).model, max_concurrency=2, max_queue=32, ctx=CTX)
    yield create_app(engine, Tokenizer.from_dir(path), "tiny")
    engine.close()


@pytest.fixture(scope="module")
def spec(app) -> dict:
    with TestClient(app) as client:
        return client.get("/openapi.json").json()


def test_the_document_is_valid_openapi_3_and_describes_every_endpoint(spec):
    validate(spec)  # raises on an invalid document
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    assert set(paths) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    schemas = spec["components"]["schemas"]
    for path, request, answer in (("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion"),
                                  ("/v1/completions", "CompletionRequest", "Completion")):  # fmt: skip
        post = paths[path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request}"}
        assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{answer}"
        }
        assert post["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    chat = schemas["ChatCompletionRequest"]
    assert {"messages", "temperature", "tools", "tool_choice", "stream", "n"} <= set(chat["properties"])
    assert chat["required"] == ["messages"]


def test_docs_render_the_document_offline(app):
    """/docs is FastAPI's Swagger UI page with its script and style from /static: nothing from a CDN."""
    with TestClient(app) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "/openapi.json" in page.text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
        assert sorted(assets) == ["/static/swagger-ui-bundle.js", "/static/swagger-ui.css"], assets
        assert all(client.get(a).status_code == 200 for a in assets)


def test_a_body_the_schema_refuses_is_a_400_naming_the_field(app):
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        missing = client.post("/v1/completions", json={})
        not_json = client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]


OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics")]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_generated_request_gets_a_5xx(app, method, path):
    """Schemathesis draws requests from the document (its pytest plugin does not run on this pytest, so hypothesis
    drives its strategies directly): bodies that fit the schema, which the server answers or refuses (a template
    without a user turn, a regex that does not compile) but never fails on, and bodies that do not, which are 4xx."""
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method]
    seen: dict[GenerationMode, dict[int, int]] = {}
    modes = [(GenerationMode.POSITIVE, 40)] + ([(GenerationMode.NEGATIVE, 20)] if method == "POST" else [])
    for mode, examples in modes:  # a GET without parameters has no invalid request to draw
        statuses = seen[mode] = {}

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1  # noqa: B023
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"], response.text

        check()
    negative = seen.get(GenerationMode.NEGATIVE, {})
    assert sum(negative.values()) == sum(n for status, n in negative.items() if 400 <= status < 500), seen


def test_the_documented_examples_generate(app, spec):
    """Each request body's example in the document (what /docs offers to try) is answered, streamed too."""
    with TestClient(app) as client:
        for path, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
            (example,) = spec["components"]["schemas"][name]["examples"]
            answer = client.post(path, json=example)
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
            streamed = client.post(path, json={**example, "stream": True})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
