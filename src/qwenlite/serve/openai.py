"""The OpenAI-compatible API over the engine: /v1/chat/completions, /v1/completions, /v1/models, /health
(serve/app.py routes them).

A thin layer: it renders chat messages with the checkpoint's template, hands token ids to the engine, and turns
the engine's tokens back into the OpenAI shapes: reasoning in `reasoning_content`, the model's XML tool calls in
`tool_calls` (streamed as deltas too), logprobs, usage with cached prompt tokens. Errors use the OpenAI error
shape with the matching status; nothing one request does can stop the server or keep a slot: a client that
goes away cancels its request, which frees its row before the engine's next step."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from qwenlite.errors import ContextLengthExceeded, GrammarError, InvalidArgument, QwenliteError
from qwenlite.io.images import ImageProcessor
from qwenlite.io.video import VideoProcessor, expand_vision_tokens
from qwenlite.model.vision import ImageInput, VideoInput
from qwenlite.sample import SAMPLING_FIELDS, SamplingParams
from qwenlite.serve.engine import Engine, Finish, PromptLogprobs, QueueFull, Token, Usage
from qwenlite.serve.engine import Request as EngineRequest
from qwenlite.serve.image_urls import MAX_VIDEO_BYTES, image_bytes
from qwenlite.serve.metrics import Metrics, Trace
from qwenlite.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    FunctionCallOut,
    Health,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
)
from qwenlite.serve.structured import StructuredOutput
from qwenlite.text.grammar import Constraint
from qwenlite.text.textstream import Delta, StopMatcher, TextStream
from qwenlite.text.tokenizer import (
    ASSISTANT_HEADER,
    ENCODE_CHAT_ARGUMENTS,
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
)
from qwenlite.text.toolcalls import ToolCallDelta, ToolCallParser

MAX_N = 16  # samples per prompt (`n`)
# (type, no text, no image_url, no video_url)
VALID_PARTS = (("text", False, True, True), ("image_url", True, False, True), ("video_url", True, True, False))

# Not settable through chat_template_kwargs: encode_chat's own arguments (enable_thinking is taken apart).
RESERVED_TEMPLATE_KWARGS = ENCODE_CHAT_ARGUMENTS | {"enable_thinking"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.counted = False  # in the metrics already (by the request's trace)
        self.kind = kind or {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code))


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status)


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


# --- tokens -> the answer's pieces -----------------------------------------------------------------------------

Piece = tuple[str, str] | ToolCallDelta  # chat: ("content" | "reasoning", text) or a tool-call delta
# One choice's progress: (choice index, pieces, finish reason or None). Completion pieces are plain text.
Update = tuple[int, list, str | None]


class ChatOutput:
    """One chat choice's text layer: generated tokens in; reasoning, content and tool-call pieces out, and the
    OpenAI logprob entries of the tokens."""

    def __init__(self, server: OpenAIServer, prompt_ids: list[int], stop: Sequence[str], tools):
        self.server = server
        self.text = TextStream(server.tokenizer, prompt_ids, stop)
        self.parser = ToolCallParser(tools) if tools is not None else None
        self.logprobs: list[TokenLogprob] = []
        self.sent = 0  # logprob entries already streamed
        self.tokens = 0

    def _pieces(self, delta: Delta) -> list[Piece]:
        out: list[Piece] = [("reasoning", delta.reasoning)] if delta.reasoning else []
        if delta.text:
            items = self.parser.feed(delta.text) if self.parser else [delta.text]
            out += [("content", i) if isinstance(i, str) else i for i in items]
        return out

    def _flush_parser(self) -> list[Piece]:
        items = self.parser.finish() if self.parser else []
        return [("content", i) if isinstance(i, str) else i for i in items]

    def add(self, event: Token) -> tuple[list[Piece], bool]:
        """-> the pieces this token completes, and whether a stop string ended the answer."""
        self.tokens += 1
        if event.logprob is not None:  # the engine scores the token where the request asked for logprobs
            self.logprobs.append(self.server.logprob_entry(event))
        delta, hit = self.text.add(event.id)
        pieces = self._pieces(delta)
        return (pieces + self._flush_parser(), True) if hit else (pieces, False)

    def finish(self) -> list[Piece]:
        return self._pieces(self.text.finish()) + self._flush_parser()

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.parser and self.parser.calls else reason

    def new_logprobs(self) -> list[TokenLogprob]:
        n, self.sent = self.sent, len(self.logprobs)
        return self.logprobs[n:]


class CompletionOutput:
    """One /v1/completions choice: text (the echoed prompt first), stop strings, OpenAI's legacy logprobs."""

    def __init__(self, server: OpenAIServer, prompt_ids: list[int], body: CompletionRequest):
        self.server = server
        self.detok = IncrementalDetokenizer(server.tokenizer)
        self.matcher = StopMatcher(_stops(body.stop))
        self.top = body.logprobs
        self.logprobs = CompletionLogprobs() if body.logprobs is not None else None
        self.echo = server.tokenizer.decode(prompt_ids) if body.echo else ""  # sent with the first text
        self.prompt_ids = prompt_ids
        self.length = 0  # characters of text so far, for text_offset
        self.sent = 0  # logprob entries already streamed
        self.tokens = 0

    def _log(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None, chars: int) -> None:
        if self.logprobs is None:
            return
        lp = self.logprobs
        lp.tokens.append(self.server.token_text(token))
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(self.server.top_dict(top) if top is not None else None)
        lp.text_offset.append(self.length)
        self.length += chars

    def _echoed(self, text: str) -> list[str]:
        text, self.echo = self.echo + text, ""
        return [text]

    def add_prompt(self, event: PromptLogprobs) -> None:
        for token, logprob, top in zip(self.prompt_ids, event.logprobs, event.top_logprobs, strict=True):
            self._log(token, logprob, top if self.top else None, len(self.server.token_text(token)))

    def add(self, event: Token) -> tuple[list[str], bool]:
        self.tokens += 1
        text, hit = self.matcher.push(self.detok.add(event.id))
        self._log(event.id, event.logprob, event.top_logprobs if self.top else None, len(text))
        return self._echoed(text), hit

    def finish(self) -> list[str]:
        text, hit = self.matcher.push(self.detok.flush())
        return self._echoed(text if hit else text + self.matcher.flush())

    @staticmethod
    def finish_reason(reason: str) -> str:
        return reason

    def new_logprobs(self) -> CompletionLogprobs | None:
        lp = self.logprobs
        if lp is None:
            return None
        n, self.sent = self.sent, len(lp.tokens)
        return CompletionLogprobs(tokens=lp.tokens[n:], token_logprobs=lp.token_logprobs[n:],
                                  top_logprobs=lp.top_logprobs[n:], text_offset=lp.text_offset[n:])  # fmt: skip


# --- the two endpoints' shapes -------------------------------------------------------------------------------


class ChatAnswer:
    """/v1/chat/completions: one prompt's n choices, as chunks and as a whole."""

    endpoint, prompt_param, id_prefix = "/v1/chat/completions", "messages", "chatcmpl"

    def __init__(self, body: ChatCompletionRequest, requests: list[EngineRequest], outputs: list[ChatOutput]):
        self.body, self.requests, self.outputs = body, requests, outputs
        self.want_logprobs = body.logprobs
        self.content: list[list[str]] = [[] for _ in outputs]
        self.reasoning: list[list[str]] = [[] for _ in outputs]
        self.calls: list[dict[int, ToolCallOut]] = [{} for _ in outputs]
        self.finish: list[str | None] = [None] * len(outputs)

    def opening(self, head: dict) -> list[BaseModel]:
        return [self._chunk(head, i, AssistantMessage(role="assistant", content="")) for i in range(len(self.outputs))]

    @staticmethod
    def _chunk(head: dict, index: int, delta: AssistantMessage, entries=None, finish=None) -> ChatCompletionChunk:
        logprobs = ChoiceLogprobs(content=entries) if entries else None
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return ChatCompletionChunk(**head, choices=[choice])

    def chunks(self, head: dict, index: int, pieces: list[Piece], finish: str | None) -> list[BaseModel]:
        entries = self.outputs[index].new_logprobs() or None
        out = []
        for p in pieces:
            if isinstance(p, ToolCallDelta):
                function = FunctionCallOut(name=p.name, arguments=p.arguments)
                call = ToolCallOut(index=p.index, id=p.id, type="function" if p.id else None, function=function)
                delta = AssistantMessage(tool_calls=[call])
            elif p[0] == "content":
                delta = AssistantMessage(content=p[1])
            else:
                delta = AssistantMessage(reasoning_content=p[1])
            out.append(self._chunk(head, index, delta, entries))
            entries = None
        if entries or finish:
            out.append(self._chunk(head, index, AssistantMessage(), entries, finish))
        return out

    def usage_chunk(self, head: dict, usage: UsageInfo) -> BaseModel:
        return ChatCompletionChunk(**head, choices=[], usage=usage)

    def collect(self, index: int, pieces: list[Piece], finish: str | None) -> None:
        self.finish[index] = finish or self.finish[index]
        for p in pieces:
            if isinstance(p, ToolCallDelta):
                call = self.calls[index].setdefault(p.index, ToolCallOut(type="function", function=FunctionCallOut()))
                call.id = call.id or p.id
                call.function.name = call.function.name or p.name
                call.function.arguments += p.arguments
            else:
                (self.content[index] if p[0] == "content" else self.reasoning[index]).append(p[1])

    def response(self, head: dict, usage: UsageInfo) -> BaseModel:
        choices = []
        for i, output in enumerate(self.outputs):
            content, calls = self.content[i], self.calls[i]
            message = AssistantMessage(
                role="assistant",
                content="".join(content) if content or not calls else None,
                reasoning_content="".join(self.reasoning[i]) or None,
                tool_calls=[calls[j] for j in sorted(calls)] or None,
            )
            logprobs = ChoiceLogprobs(content=output.logprobs) if self.want_logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=self.finish[i]))
        return ChatCompletion(**head, choices=choices, usage=usage)


class CompletionAnswer:
    """/v1/completions: each prompt's n choices (prompt-major: choice p * n + i is prompt p's sample i)."""

    endpoint, prompt_param, id_prefix = "/v1/completions", "prompt", "cmpl"

    def __init__(self, body: CompletionRequest, requests: list[EngineRequest], outputs: list[CompletionOutput]):
        self.body, self.requests, self.outputs = body, requests, outputs
        self.choices = [CompletionChoice(index=i, text="", logprobs=o.logprobs) for i, o in enumerate(outputs)]

    @staticmethod
    def opening(head: dict) -> list[BaseModel]:
        return []

    def chunks(self, head: dict, index: int, pieces: list[str], finish: str | None) -> list[BaseModel]:
        logprobs = self.outputs[index].new_logprobs()
        choice = CompletionChoice(index=index, text="".join(pieces), logprobs=logprobs, finish_reason=finish)
        return [Completion(**head, choices=[choice])]

    def usage_chunk(self, head: dict, usage: UsageInfo) -> BaseModel:
        return Completion(**head, choices=[], usage=usage)

    def collect(self, index: int, pieces: list[str], finish: str | None) -> None:
        choice = self.choices[index]
        choice.text += "".join(pieces)
        choice.finish_reason = finish or choice.finish_reason

    def response(self, head: dict, usage: UsageInfo) -> BaseModel:
        return Completion(**head, choices=self.choices, usage=usage)


Answer = ChatAnswer | CompletionAnswer


def turn_starts(ids: Sequence[int], header: Sequence[int]) -> tuple[int, ...]:
    """Positions right after each `header` (the assistant's `<|im_start|>assistant\n`): the next turn's prompt
    shares everything before its answer's start (the template drops that answer's <think> block), so these
    are the snapshots worth keeping."""
    n, header = len(header), list(header)
    return tuple(i + n for i, t in enumerate(ids) if t == header[0] and list(ids[i : i + n]) == header)


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


# --- engine events on the event loop ----------------------------------------------------------------------------


class Refused(Exception):
    """The engine refused request `index` of a submission (nothing of it runs)."""

    def __init__(self, index: int, error: QwenliteError):
        super().__init__(str(error))
        self.index, self.error = index, error


class Submission:
    """Engine requests whose events arrive on this event loop's queue as (index, event), without polling."""

    def __init__(self, engine: Engine, requests: list[EngineRequest]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        for i, request in enumerate(requests):
            try:
                self.handles.append(engine.submit(request, functools.partial(self._put, i)))
            except Exception as e:
                self.cancel()
                if isinstance(e, QwenliteError) and not isinstance(e, QueueFull):
                    raise Refused(i, e) from None
                raise

    def _put(self, index: int, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    async def events(self) -> AsyncIterator[tuple[int, Token | PromptLogprobs | Finish]]:
        """(choice index, event) for the choices still running, until each has finished. A Finish that is an error
        or a cancellation ends them all (ApiError 500 / 499); `stop(index)` ends one early (a stop string)."""
        self.running = set(range(len(self.handles)))
        while self.running:
            index, event = await self.queue.get()
            if index not in self.running:
                continue  # stopped by a stop string already; this is the engine catching up
            if isinstance(event, Finish):
                if event.reason in ("error", "cancelled"):
                    self.cancel()
                    if event.reason == "error":
                        raise ApiError(500, f"generation failed: {event.error}")
                    raise ApiError(499, "the request was cancelled", kind="cancelled")
                self.running.discard(index)
            yield index, event

    def stop(self, index: int) -> None:
        self.handles[index].cancel()
        self.running.discard(index)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


async def _watch_disconnect(request: Request, submission: Submission) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            submission.cancel()
            return


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(request: Request, submission: Submission):
    """Cancel the engine requests when the client goes away, or when the response is done."""
    watcher = asyncio.create_task(_watch_disconnect(request, submission))
    try:
        yield
    finally:
        watcher.cancel()
        submission.cancel()


@contextlib.asynccontextmanager
async def _finished(trace: Trace):
    """A stream that stops without saying how (the client went away, the task was cancelled) counts as 499."""
    try:
        yield
    finally:
        trace.finish(499)


# --- the API ----------------------------------------------------------------------------------------------------


class OpenAIServer:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        model_name: str,
        api_key: str | None = None,
        defaults: dict | None = None,
        aliases: Sequence[str] = (),
        allow_special_in_content: bool = False,
        metrics: Metrics | None = None,
        images: ImageProcessor | None = None,
        allow_image_urls: bool = False,
        videos: VideoProcessor | None = None,
    ):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.images = images  # None: the model reads no images
        self.videos = videos  # None: the model reads no videos
        self.allow_image_urls = allow_image_urls
        self.metrics = metrics or Metrics(engine)
        # Off: what messages, tool calls, tool results and tools spell is text, never a control token.
        self.allow_special_in_content = allow_special_in_content
        self.api_key = api_key
        self.defaults = dict(defaults or {})  # sampling settings a request leaves out (generation_config.json)
        self.names = {model_name, *aliases}
        # LoRA adapters by the name clients send as `model`: the engine request's adapter index (0 = the base).
        self.adapters = {name: i for i, name in enumerate(engine.adapter_names, 1)}
        self.created = int(time.time())
        self.assistant_header = tokenizer.encode(ASSISTANT_HEADER)
        self.structured = StructuredOutput(tokenizer, engine.model.config.vocab_size)

    # Helpers ----------------------------------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, logprob in top:
            out.setdefault(self.token_text(token), logprob)  # ids that decode alike keep the likelier
        return out

    def logprob_entry(self, event: Token) -> TokenLogprob:
        top = [
            TopLogprob(token=self.token_text(t), logprob=lp, bytes=self.tokenizer.token_bytes(t))
            for t, lp in event.top_logprobs or []
        ]
        return TokenLogprob(
            token=self.token_text(event.id),
            logprob=event.logprob,
            bytes=self.tokenizer.token_bytes(event.id),
            top_logprobs=top,
        )

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def check_request(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """What the request's schema cannot say: a model this server serves, n within its bounds."""
        if body.model is not None and body.model not in self.names and body.model not in self.adapters:
            served = ", ".join(repr(name) for name in [self.model_name, *self.adapters])
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")  # fmt: skip
        if not 1 <= body.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {body.n}", param="n")

    def check_n(self, n: int, prompts: int = 1) -> None:
        """The n * prompts engine requests must fit the engine's slots and queue at once."""
        capacity = self.engine.max_concurrency + self.engine.max_queue
        if n > 1 and n * prompts > capacity:
            raise ApiError(400, f"n={n} for {prompts} prompt(s) asks for {n * prompts} samples; this server "
                           f"queues at most {capacity} at once", param="n")  # fmt: skip

    def adapter(self, body: ChatCompletionRequest | CompletionRequest) -> int:
        """The adapter the request's `model` names: 0 for the base (its name, an alias, or none)."""
        return 0 if body.model in self.names else self.adapters.get(body.model, 0)

    @staticmethod
    def samples(params: SamplingParams, n: int) -> list[SamplingParams]:
        """The settings of a prompt's n samples: with a request seed s, sample i draws with seed s + i, so a
        seeded request is reproducible and its samples differ; without one every sample seeds its own draws."""
        return [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i) for i in range(n)]

    def sampling(self, body) -> SamplingParams:
        given = {k: getattr(body, k) for k in (*SAMPLING_FIELDS, "seed")}
        settings = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        if settings.get("top_k", 0) < 0:
            settings["top_k"] = 0  # vLLM's -1: off
        params = SamplingParams(**settings)
        try:
            params.validate()
        except InvalidArgument as e:
            raise ApiError(400, str(e), param=e.param) from None
        return params

    def submit(self, answer: Answer, n: int) -> Submission:
        """Hands the answer's requests to the engine; the engine's refusals become 4xx naming their field (a prompt
        is the endpoint's `messages` or `prompt`; of several prompts, the one at fault)."""
        try:
            return Submission(self.engine, answer.requests)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except Refused as refused:
            e, message = refused.error, str(refused.error)
            param = answer.prompt_param if e.param == "prompt" else e.param
            if param == "prompt" and len(answer.requests) > n:
                message = f"prompt {refused.index // n}: {message}"
            code = "context_length_exceeded" if isinstance(e, ContextLengthExceeded) else None
            raise ApiError(400, message, param=param, code=code) from None

    def usage(self, usages: list[Usage]) -> UsageInfo:
        prompt = sum(u.prompt_tokens for u in usages)
        completion = sum(u.completion_tokens for u in usages)
        cached = sum(u.cached_tokens for u in usages)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    # Chat -------------------------------------------------------------------------------------------------------

    def chat_images(self, body: ChatCompletionRequest) -> list[ImageInput | VideoInput]:
        """The images and videos of the messages' `image_url` / `video_url` parts, in order, decoded and preprocessed
        (CPU work: run it off the event loop). A bad image or video is a 400 naming its part."""
        images = []
        for i, m in enumerate(body.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                video = part.type == "video_url" and part.video_url is not None
                if not video and (part.type != "image_url" or part.image_url is None):
                    continue
                kind = "video" if video else "image"
                param = f"messages.{i}.content.{j}.{kind}_url"
                processor = self.videos if video else self.images
                if processor is None:
                    raise ApiError(400, f"this model reads no {kind}s: it has no vision tower", param=param)
                try:
                    url = (part.video_url if video else part.image_url).url
                    data = image_bytes(url, self.allow_image_urls, MAX_VIDEO_BYTES if video else None, kind)
                    images.append(processor.load(data, name=f"the {kind} in {param}"))
                except QwenliteError as e:
                    raise ApiError(400, str(e), param=param) from None
        return images

    def chat_prompt(
        self, body: ChatCompletionRequest, images: Sequence[ImageInput | VideoInput] = ()
    ) -> tuple[list[int], list[dict] | None]:
        """-> (prompt ids, tools to parse calls for or None); each image or video part is its input's tokens
        (`images`, from `chat_images`). A `tool_choice` that forces calls is a constraint (`constraint`), not part of
        the prompt."""
        messages = []
        for i, m in enumerate(body.messages):
            message = m.model_dump(exclude_none=True)
            if message["role"] == "developer":
                message["role"] = "system"
            if isinstance(m.content, list):
                for j, p in enumerate(m.content):
                    if (p.type, p.text is None, p.image_url is None, p.video_url is None) not in VALID_PARTS:
                        raise ApiError(400, "content parts are text, image_url or video_url",
                                       param=f"messages.{i}.content.{j}")  # fmt: skip
                # The template writes a placeholder per image or video part: it needs no URL (megabytes of base64).
                placeholders = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
                message["content"] = [placeholders.get(p["type"], p) for p in message["content"]]
            messages.append(message)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice or ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        if not isinstance(choice, str) and choice.function.name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice names an unknown tool {choice.function.name!r}", "tool_choice")
        kwargs = dict(body.chat_template_kwargs or {})
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise ApiError(400, "enable_thinking must be true or false", param="chat_template_kwargs.enable_thinking")
        kwargs = {k: v for k, v in kwargs.items() if k not in RESERVED_TEMPLATE_KWARGS}
        if body.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", body.reasoning_effort)  # OpenAI's field, as the template's variable
        try:
            ids = self.tokenizer.encode_chat(
                messages, tools=tools if choice != "none" else None, enable_thinking=thinking,
                allow_special_in_content=self.allow_special_in_content, **kwargs,
            )  # fmt: skip
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            ids = expand_vision_tokens(ids, images, self.tokenizer, self.engine.model.config) if images else ids
        except QwenliteError as e:  # the template wrote a placeholder for fewer (or more) parts than it was sent
            raise ApiError(400, str(e), param="messages") from None
        return ids, (tools if choice != "none" else None)

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        """OpenAI's chat completions: messages rendered with the checkpoint's chat template."""
        return await self.traced(request, body, self._chat_answer)

    async def _chat_answer(self, body: ChatCompletionRequest) -> ChatAnswer:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        params = self.sampling(body)
        images = await asyncio.to_thread(self.chat_images, body)
        ids, tools = self.chat_prompt(body, images)
        self.check_n(body.n)
        constraint = await self.constraint(body, tools)
        requests = [
            EngineRequest(
                ids,
                sample,
                max_tokens if max_tokens is not None else self.engine.ctx,
                frozenset(self.tokenizer.eos_token_ids),
                logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                snapshot_at=turn_starts(ids, self.assistant_header),
                images=tuple(images),
                adapter=self.adapter(body),
                grammar=self.structured.matcher(constraint, ids),
            )
            for sample in self.samples(params, body.n)
        ]
        outputs = [ChatOutput(self, ids, _stops(body.stop), tools) for _ in range(body.n)]
        return ChatAnswer(body, requests, outputs)

    async def constraint(self, body, tools: list[dict] | None) -> Constraint | None:
        """The request's constraint, compiled off the event loop; a 400 naming the field for one that does not."""
        try:
            return await asyncio.to_thread(self.structured.constraint, body, tools)
        except GrammarError as e:
            raise ApiError(400, str(e), param=e.param) from None

    # Completions ------------------------------------------------------------------------------------------------

    def completion_prompts(self, prompt) -> list[list[int]]:
        """A raw prompt is the client's whole prompt, not chat content: its control tokens are encoded as such
        (as llama.cpp and vLLM do), whatever `allow_special_in_content` says."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    async def completions(self, request: Request, body: CompletionRequest) -> Response:
        """OpenAI's legacy completions: the prompt as given (text or token ids), `echo` and `logprobs`."""
        return await self.traced(request, body, self._completion_answer)

    async def _completion_answer(self, body: CompletionRequest) -> CompletionAnswer:
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        if max_tokens < (0 if body.echo else 1):
            raise ApiError(400, f"max_tokens must be at least {0 if body.echo else 1}, got {max_tokens}", "max_tokens")
        params = self.sampling(body)
        prompts = self.completion_prompts(body.prompt)
        self.check_n(body.n, len(prompts))
        constraint = await self.constraint(body, None)
        echo_only = body.echo and body.logprobs is None and max_tokens == 0  # a prefill that returns no tokens
        requests = [
            EngineRequest(
                ids,
                sample,
                max_tokens,
                frozenset(self.tokenizer.eos_token_ids),
                logprobs=body.logprobs,
                prompt_logprobs=0 if echo_only else body.logprobs if body.echo else None,
                adapter=self.adapter(body),
                grammar=self.structured.matcher(constraint, ids),
            )
            for ids in prompts
            for sample in self.samples(params, body.n)
        ]
        outputs = [CompletionOutput(self, ids, body) for ids in prompts for _ in range(body.n)]
        return CompletionAnswer(body, requests, outputs)

    # Both -------------------------------------------------------------------------------------------------------

    async def traced(self, request: Request, body, make_answer) -> Response:
        """Builds the endpoint's answer, runs it, and counts the request once it has finished: here for a JSON
        answer or an error, at the stream's end for a stream (499 when the client went away)."""
        endpoint = "/v1/chat/completions" if isinstance(body, ChatCompletionRequest) else "/v1/completions"
        trace = self.metrics.trace(endpoint)
        try:
            self.check_request(body)
            response = await self.respond(request, await make_answer(body), trace)
        except ApiError as e:
            trace.finish(e.status)
            e.counted = True
            raise
        except asyncio.CancelledError:
            trace.finish(499)
            raise
        except Exception:
            trace.finish(500)
            raise
        if not isinstance(response, StreamingResponse):
            trace.finish(response.status_code)
        return response

    async def respond(self, request: Request, answer: Answer, trace: Trace) -> Response:
        body, n = answer.body, answer.body.n
        submission = self.submit(answer, n)
        trace.usages = lambda: choice_usages(submission, answer.outputs, n)
        model = body.model if self.adapter(body) else self.model_name  # an adapter answers under its own name
        head = dict(id=f"{answer.id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)
        updates = self.updates(submission, answer, trace)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self.stream(request, submission, answer, updates, head, include_usage, trace)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with _cancelled_on_disconnect(request, submission):
            async for index, pieces, finish in updates:
                answer.collect(index, pieces, finish)
        usage = self.usage(choice_usages(submission, answer.outputs, n))
        return JSONResponse(answer.response(head, usage).model_dump(exclude_none=True))

    @staticmethod
    async def updates(submission: Submission, answer: Answer, trace: Trace) -> AsyncIterator[Update]:
        """Each choice's pieces as its tokens arrive, then once its finish reason, until every choice has finished."""
        outputs = answer.outputs
        async for index, event in submission.events():
            output = outputs[index]
            if isinstance(event, PromptLogprobs):
                output.add_prompt(event)
            elif isinstance(event, Token):
                trace.token(index)
                pieces, hit = output.add(event)
                if hit:
                    submission.stop(index)
                yield index, pieces, output.finish_reason("stop") if hit else None
            else:
                yield index, output.finish(), output.finish_reason(event.reason)

    async def stream(self, request, submission, answer: Answer, updates, head: dict, include_usage: bool, trace):
        """Server-sent events: the answer's chunks, an error in the OpenAI shape if generation fails, usage if asked,
        then [DONE]."""
        async with _cancelled_on_disconnect(request, submission), _finished(trace):
            for chunk in answer.opening(head):
                yield _sse(chunk)
            try:
                async for index, pieces, finish in updates:
                    for chunk in answer.chunks(head, index, pieces, finish):
                        yield _sse(chunk)
            except ApiError as e:
                trace.finish(e.status)
                if e.status != 499:
                    yield _sse(e.body())
                    yield "data: [DONE]\n\n"
                return
            if include_usage:
                usage = self.usage(choice_usages(submission, answer.outputs, answer.body.n))
                yield _sse(answer.usage_chunk(head, usage))
            trace.finish(200)
            yield "data: [DONE]\n\n"

    # The rest ---------------------------------------------------------------------------------------------------

    async def models(self) -> ModelList:
        """The base model, then each LoRA adapter with the base as its `parent` (as vLLM lists them)."""
        cards = [ModelCard(id=name, created=self.created, max_model_len=self.engine.ctx,
                           parent=self.model_name if name != self.model_name else None)
                 for name in [self.model_name, *self.adapters]]  # fmt: skip
        return ModelList(data=cards)

    async def health(self) -> Health:
        """Liveness, with the engine's rows in use and requests waiting (no API key needed)."""
        return Health(status="ok", active=self.engine.active, waiting=self.engine.waiting)


def output_usage(submission: Submission, output: ChatOutput | CompletionOutput, index: int = 0) -> Usage:
    """The engine's counts, with the completion tokens this side consumed (a stop string ends the count)."""
    usage = submission.handles[index].usage
    return Usage(usage.prompt_tokens, output.tokens, usage.cached_tokens)


def choice_usages(submission: Submission, outputs: Sequence[ChatOutput | CompletionOutput], n: int) -> list[Usage]:
    """One per choice, n choices a prompt: a prompt's tokens (and cached tokens) count once, on its first sample,
    as OpenAI counts them; every choice's completion tokens count."""
    usages = [output_usage(submission, o, i) for i, o in enumerate(outputs)]
    return [u if i % n == 0 else Usage(0, u.completion_tokens, 0) for i, u in enumerate(usages)]
