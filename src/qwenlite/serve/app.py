"""The HTTP app: the OpenAI routes (serve/openai.py), the web chat page at / (data/chat.html, when installed) with its
scripts at /static (data/web), the API described at /openapi.json and /docs, Prometheus metrics at /metrics
(serve/metrics.py), errors in the OpenAI shape; and `serve`, which loads a model and
runs the app under uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenlite.io.adapters import check_names, load_adapters
from qwenlite.io.hub import resolve_model_path
from qwenlite.io.images import ImageProcessor
from qwenlite.io.load import generation_defaults, load_model, processors
from qwenlite.io.video import VideoProcessor
from qwenlite.serve.engine import SNAPSHOT_INTERVAL, Engine, cache_bytes
from qwenlite.serve.metrics import Metrics
from qwenlite.serve.openai import ApiError, OpenAIServer, error_response
from qwenlite.serve.protocol import ChatCompletion, Completion, ErrorResponse, Health, ModelList
from qwenlite.speculative import check_speculate, make_drafts
from qwenlite.text.tokenizer import Tokenizer

log = logging.getLogger("qwenlite.serve")

DEFAULT_CTX = 16384  # the cache is preallocated for every slot: 262144 tokens x 4 slots would not fit a laptop


def chat_page() -> str | None:
    page = resources.files("qwenlite") / "data" / "chat.html"
    return page.read_text(encoding="utf-8") if page.is_file() else None


class WebFiles(StaticFiles):
    """Each response says `no-cache`: the browser asks again (a 304 while unchanged), so a page left open across an
    upgrade gets, on its next reload, the new scripts with the new chat.html."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def web_files() -> StaticFiles | None:
    """The page's scripts and styles and the libraries it vendors (qwenlite/data/web/), for /static."""
    folder = resources.files("qwenlite") / "data" / "web"
    return WebFiles(directory=str(folder)) if folder.is_dir() else None


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    defaults: dict | None = None,
    aliases: Sequence[str] = (),
    allow_special_in_content: bool = False,
    images: ImageProcessor | None = None,
    allow_image_urls: bool = False,
    videos: VideoProcessor | None = None,
) -> FastAPI:
    """`images`, `videos`: the checkpoint's image and video preprocessing, for a model with a vision tower (None:
    no images, no videos)."""
    metrics = Metrics(engine)
    api = OpenAIServer(engine, tokenizer, model_name, api_key, defaults, aliases, allow_special_in_content, metrics,
                       images, allow_image_urls, videos)  # fmt: skip
    app = FastAPI(
        title="qwenlite",
        version="0.1.0",
        summary="An OpenAI-compatible server for Qwen3.5 models",
        docs_url=None,  # /docs below: FastAPI's Swagger UI with the copy in qwenlite/data/web, not a CDN's
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.api = api
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500)}
    auth = [Depends(api.authorize)]
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=auth,
                      responses={200: {"model": ChatCompletion, "description": "The answer, or with `stream` "
                                       "server-sent events of ChatCompletionChunk"}, **errors})  # fmt: skip
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], dependencies=auth,
                      responses={200: {"model": Completion, "description": "The answer, or with `stream` "
                                       "server-sent events of Completion chunks"}, **errors})  # fmt: skip
    app.add_api_route("/v1/models", api.models, methods=["GET"], dependencies=auth, response_model=ModelList,
                      responses=errors)  # fmt: skip
    app.add_api_route("/health", api.health, methods=["GET"], response_model=Health)

    async def index() -> Response:
        page = chat_page()
        if page is None:
            raise ApiError(404, "this installation has no web chat page (qwenlite/data/chat.html)")
        return HTMLResponse(page)

    async def prometheus() -> Response:
        """The Prometheus text format. Without the API key, like /health: scrapers usually scrape without auth (vLLM
        serves its /metrics so too), and the numbers say nothing of what clients sent."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def api_error(request: Request, e: ApiError) -> Response:
        if not e.counted:
            metrics.refused(request.url.path, e.status)
        return error_response(e)

    async def invalid_request(request: Request, e: RequestValidationError) -> Response:
        """A body the request's schema refuses, in the OpenAI shape, `param` the path to the field at fault."""
        metrics.refused(request.url.path, 400)
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(ApiError(400, f"the request body is not valid JSON: {first['msg']}"))
        loc = [str(p) for p in first["loc"]]
        param = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
        return error_response(ApiError(400, f"{param or 'body'}: {first['msg']}", param=param))

    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(ApiError(e.status_code, message))

    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="qwenlite API",
                                   swagger_js_url="/static/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui.css", swagger_favicon_url="")  # fmt: skip

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse,
                      summary="Prometheus metrics in the text exposition format")  # fmt: skip
    if (files := web_files()) is not None:
        app.mount("/static", files)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    return app


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 4,
    max_queue: int = 64,
    ctx: int | None = None,
    cache_mb: float = 1024,
    dtype: str | None = None,
    served_model_name: str | None = None,
    quant: str | None = None,
    allow_special_in_content: bool = False,
    allow_image_urls: bool = False,
    device: str = "cpu",
    snapshot_interval: int = SNAPSHOT_INTERVAL,
    lora: Sequence[tuple[str, str]] = (),
    mmproj: str | None = None,
    speculate: int = 0,
    draft: str = "mtp",
) -> None:
    """Load `model` and serve it until interrupted. `allow_special_in_content`: chat messages that spell control
    tokens ("<|im_end|>") get those tokens, as before qwenlite encoded them as text. `allow_image_urls`: image
    parts may name public http(s) URLs, which the server downloads (else data: URLs only). `lora`: (name, PEFT
    adapter directory) pairs, each served as the model `name`, all on the one base in the same batches; an adapter
    that does not fit the base stops the start-up with its name and the mismatch. `mmproj`: a GGUF model's vision
    tower (io/load.py's `find_mmproj`). `speculate` K > 0: each row drafts up to K tokens a step with `draft`
    ("mtp" or "ngram", speculative.make_drafts)."""
    import uvicorn

    path = resolve_model_path(model)
    name = served_model_name or model
    aliases = (str(path), path.name)
    check_names([n for n, _ in lora], (name, *aliases))  # before the minutes a large model takes to load
    if speculate:
        check_speculate(speculate)
    loaded, tokenizer = load_model(path, dtype, quant, device, mmproj=mmproj)
    if lora:
        load_adapters(loaded, lora)
    drafts = make_drafts(path, loaded, speculate, draft)
    ctx = min(ctx or DEFAULT_CTX, loaded.config.max_position_embeddings)
    engine = Engine(loaded, max_concurrency, max_queue, ctx, cache_mb, snapshot_interval=snapshot_interval,
                    speculate=speculate, drafts=drafts)  # fmt: skip
    images = videos = None
    if loaded.visual is not None:
        images, videos = processors(path, loaded, mmproj)
    app = create_app(engine, tokenizer, name, api_key, generation_defaults(path), aliases,
                     allow_special_in_content, images, allow_image_urls, videos)  # fmt: skip
    print(
        f"qwenlite serve: {name} on http://{host}:{port}/v1 | context {ctx} tokens x {max_concurrency} slots "
        f"({cache_bytes(engine.cache) / 2**20:.0f} MiB cache on {loaded.device}), queue {max_queue}, "
        f"prompt cache {cache_mb:g} MiB"
        + (" | API key required" if api_key else "")
        + (" | control tokens allowed in messages" if allow_special_in_content else "")
        + (" | images and videos" + (" (and their URLs)" if allow_image_urls else "") if images else "")
        + (f" | LoRA adapters: {', '.join(n for n, _ in lora)}" if lora else "")
        + (f" | speculating {speculate} tokens ({draft} drafts)" if speculate else ""),
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()
