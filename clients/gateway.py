"""A Mistral-API-compatible HTTP gateway in front of Triton (FastAPI + uvicorn).

`POST /v1/chat/completions` (JSON or `text/event-stream`), `POST /v1/embeddings`, `GET /v1/models`,
`GET /v1/models/{id}`, `/health`, `/metrics`. Errors are JSON bodies shaped like Mistral's, with
the status the problem calls for: 422 invalid request body, 400 a request the model cannot serve,
401 a missing/wrong API key (when PLATEFORME_API_KEYS is set), 404 an unknown model, 503 Triton
unreachable or overloaded.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from plateforme.clients.registry import Endpoint, Registry
from plateforme.clients.sdk import (
    MAX_CHOICES, PARAMETER_RANGES, AsyncTransport, ChatPlan, CompletionChunk, InvalidRequestError, ModelNotFoundError,
    PlateformeError, UsageInfo, all_or_none, completion_id, completion_response, embedding_response, first_chunk,
    plan_chat, stream_chunks_async,
)
from plateforme.clients.triton_client import DEFAULT_GRPC_URL

DEFAULT_PORT = 8080
# nginx's status for a request whose client closed the connection before the answer.
CLIENT_CLOSED = 499
# The counted routes, by path (the `route` label of plateforme_gateway_requests_total).
_ROUTES = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}


# -- request bodies --------------------------------------------------------------------------
class _Body(BaseModel):
    # SDKs add fields over time (metadata, prompt_mode, ...): ignore what is not served.
    model_config = ConfigDict(extra="ignore")


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class CalledFunction(_Body):
    name: str
    arguments: str | dict[str, Any]


class ToolCallSpec(_Body):
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: CalledFunction


class TextChunk(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextChunk] | None = None
    tool_calls: list[ToolCallSpec] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class FunctionName(_Body):
    name: str


class ToolChoiceFunction(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


def _bounded(name: str, **kwargs):
    low, high = PARAMETER_RANGES[name]
    return Field(None, ge=low, le=high, **kwargs)


class ChatCompletionRequest(_Body):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = _bounded("temperature")
    top_p: float | None = _bounded("top_p")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                   validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    stream: bool = False
    stop: str | list[str] | None = None
    random_seed: int | None = _bounded("random_seed", validation_alias=AliasChoices("random_seed", "seed"))
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "any", "required"] | ToolChoiceFunction | None = None
    presence_penalty: float | None = _bounded("presence_penalty")
    frequency_penalty: float | None = _bounded("frequency_penalty")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    parallel_tool_calls: bool | None = None
    safe_prompt: bool = False


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(validation_alias=AliasChoices("input", "inputs"))
    encoding_format: Literal["float", "base64"] = "float"
    # Change what comes back, so refused rather than ignored: vectors are float32 of the model's width.
    output_dtype: Literal["float"] | None = None
    output_dimension: int | None = None

    @field_validator("output_dimension")
    @classmethod
    def _no_other_dimension(cls, value):
        if value is not None:
            raise ValueError("is not served: vectors have the model's own dimension (see the response's length)")
        return value


# -- errors ----------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                422: "invalid_request_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "api_error"),
            "param": param, "code": str(status)}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


# -- the app ---------------------------------------------------------------------------------
@dataclass
class GatewayConfig:
    triton_url: str = DEFAULT_GRPC_URL
    protocol: str = "grpc"
    # Bearer keys accepted; empty: no authentication. Default: PLATEFORME_API_KEYS, comma-separated.
    api_keys: frozenset[str] = field(default_factory=lambda: frozenset(
        k.strip() for k in os.environ.get("PLATEFORME_API_KEYS", "").split(",") if k.strip()))
    timeout: float = 300.0
    # max_tokens when a request gives none; None: the endpoint's own default (the rest of the context,
    # as in Mistral's API, unless the repository was rendered with another default_max_tokens).
    default_max_tokens: int | None = None


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("plateforme_gateway_requests", "Gateway requests by route, model and status",
                                ["route", "model", "status"], registry=self.registry)
        self.latency = Histogram("plateforme_gateway_request_seconds", "Time to the full answer (or first byte "
                                 "of a stream)", ["route"], registry=self.registry)
        self.tokens = Counter("plateforme_gateway_tokens", "Tokens by model and kind (prompt, completion)",
                              ["model", "kind"], registry=self.registry)


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    """The gateway's ASGI app; serve it with `uvicorn.run(create_app(...))`."""
    config = config or GatewayConfig()
    # One gRPC channel (or HTTP session) for every request, on the server's event loop.
    transport = AsyncTransport(config.triton_url, config.protocol, timeout=config.timeout)
    registry = Registry(config.triton_url, config.protocol)
    metrics = _Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await transport.close()

    app = FastAPI(title="plateforme gateway", version="0.1.0", lifespan=lifespan,
                  description="Mistral's La Plateforme API in front of a Triton server.")
    app.state.config, app.state.transport, app.state.registry = config, transport, registry
    open_paths = {"/health", "/metrics", "/docs", "/openapi.json"}

    if config.api_keys:
        # A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task and a stream per request.
        app.add_middleware(_Authenticate, keys=config.api_keys, open_paths=open_paths)

    def refused(request: Request, status: int, message: str, model: str | None = None) -> Response:
        """An error answer, counted as the routes count theirs (the model: as the route read it)."""
        route = _ROUTES.get(request.url.path)
        if route is not None:
            metrics.requests.labels(route, model or getattr(request.state, "model", ""), str(status)).inc()
        return error_response(status, message)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(_problem(e) for e in exc.errors())
        model = exc.body.get("model") if isinstance(exc.body, dict) else None
        return refused(request, 422, f"invalid request: {problems}", model if isinstance(model, str) else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return refused(request, exc.status_code, str(exc.detail))

    @app.exception_handler(PlateformeError)
    async def endpoint_error(request: Request, exc: PlateformeError):
        return refused(request, exc.status_code, exc.message)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Mistral-shaped like every other error; uvicorn still logs the traceback.
        return refused(request, 500, f"internal error ({type(exc).__name__}); see the gateway's log")

    async def lookup(name: str, kind: str) -> Endpoint:
        # Known and fresh: no thread hop; otherwise the registry asks Triton (blocking) in a thread.
        endpoint = registry.cached(name) or await run_in_threadpool(registry.get, name)
        if endpoint is None:
            raise ModelNotFoundError(f"model {name!r} is not served here; see GET /v1/models")
        if endpoint.kind != kind:
            raise InvalidRequestError(f"model {name!r} serves {endpoint.kind} requests, not {kind} requests")
        return endpoint

    @app.get("/health")
    async def health():
        try:
            served = await run_in_threadpool(registry.endpoints, True)
        except PlateformeError as exc:
            return error_response(503, exc.message)
        return {"status": "ok", "models": [e.id for e in served]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        served = await run_in_threadpool(registry.endpoints)
        return {"object": "list", "data": [e.card() for e in served]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        return (await lookup_any(model_id)).card()

    async def lookup_any(name: str) -> Endpoint:
        endpoint = await run_in_threadpool(registry.get, name)
        if endpoint is None:
            raise ModelNotFoundError(f"model {name!r} is not served here; see GET /v1/models")
        return endpoint

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        start = time.perf_counter()
        request.state.model = body.model
        endpoint = await lookup(body.model, "chat")
        plan = plan_chat(
            [_message(m) for m in body.messages], temperature=body.temperature, top_p=body.top_p,
            max_tokens=body.max_tokens, stop=body.stop, random_seed=body.random_seed,
            response_format=body.response_format.model_dump(exclude_none=True) if body.response_format else None,
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            tool_choice=body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice,
            safe_prompt=body.safe_prompt, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            parallel_tool_calls=body.parallel_tool_calls, default_max_tokens=config.default_max_tokens,
        )
        # `n` choices are `n` requests sampled with their own seeds, sent together.
        plans = plan.choices(body.n or 1)
        if not body.stream:
            answers = asyncio.ensure_future(all_or_none([
                transport.complete(endpoint.model, choice.tensors(stream=False), stop_model=endpoint.engine_model)
                for choice in plans]))
            chunks = await _unless_disconnected(request, answers)
            if chunks is None:  # the client went away: its requests were stopped, nobody reads an answer
                metrics.requests.labels("chat", body.model, str(CLIENT_CLOSED)).inc()
                return Response(status_code=CLIENT_CLOSED)
            response = completion_response(body.model, plan, *chunks)
            _count(metrics, "chat", body.model, response.usage, start)
            return Response(response.model_dump_json(), media_type="application/json")

        streams = [transport.generate(endpoint.model, choice.tensors(stream=True), stream=True) for choice in plans]
        try:
            # The first chunks come before the response starts, so early errors get their status.
            firsts = await all_or_none([first_chunk(stream) for stream in streams])
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        sources = [_prepend(first, stream) for first, stream in zip(firsts, streams)]
        events = (stream_chunks_async(body.model, plan, sources[0]) if len(sources) == 1
                  else _interleaved_choices(body.model, plans, sources))
        metrics.latency.labels("chat").observe(time.perf_counter() - start)
        return StreamingResponse(_sse(events, metrics, body.model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        start = time.perf_counter()
        request.state.model = body.model
        endpoint = await lookup(body.model, "embedding")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise InvalidRequestError("input must be a non-empty string or a non-empty list of non-empty strings")
        vectors, counts = await transport.embed(endpoint.model, texts)
        response = embedding_response(body.model, vectors, counts, body.encoding_format)
        _count(metrics, "embeddings", body.model, response.usage, start)
        return Response(response.model_dump_json(), media_type="application/json")

    return app


async def _unless_disconnected(request: Request, answer: asyncio.Future, poll_s: float = 0.2):
    """The answer's result, or None if the client disconnects first: the answer is then cancelled,
    which stops its request in Triton. (A streamed answer notices when it next writes; a whole
    one would run to its end, holding a KV cache slot, for nobody.)"""
    while True:
        done, _ = await asyncio.wait({answer}, timeout=poll_s)
        if done:
            return answer.result()
        if await request.is_disconnected():
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError, PlateformeError):
                await answer
            return None


class _Authenticate:
    """401 unless `Authorization: Bearer <key>` carries one of `keys` (paths in `open_paths` are open)."""

    def __init__(self, app, keys: frozenset[str], open_paths: set[str]):
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or key.strip() not in self.keys:
                response = error_response(401, "missing or invalid API key (Authorization: Bearer <key>)")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _message(message: Message) -> dict:
    out = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        out["content"] = [{"type": "text", "text": c.text} for c in message.content]
    return out


def _problem(error: dict) -> str:
    """One of pydantic's validation errors, as its field path and message."""
    if error.get("type") == "json_invalid":  # its location is a character offset
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    return f"{where}: {error['msg']}" if where else error["msg"]


async def _interleaved_choices(model: str, plans: list[ChatPlan], sources: list[AsyncIterator]
                               ) -> AsyncIterator[CompletionChunk]:
    """The stream chunks of several choices as they come, each with its index, under one id. The
    last choice to finish carries the usage of all (the prompt counted once, as in a whole answer).
    An error in one ends them all. (Chunks wait in an unbounded queue: n is at most MAX_CHOICES and
    each answer at most max_tokens.)"""
    answer = (completion_id(), int(time.time()))
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for chunk in stream_chunks_async(model, plans[index], sources[index], index, answer):
                queue.put_nowait(chunk)  # closing the stream (cancelled, or an error) cancels its request
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    pumps = [asyncio.ensure_future(pump(index)) for index in range(len(sources))]
    try:
        running, completion_tokens = len(pumps), 0
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                if item.usage is not None:  # a choice's last chunk
                    completion_tokens += item.usage.completion_tokens
                    finished_all = running == 1
                    item.usage = UsageInfo(prompt_tokens=item.usage.prompt_tokens, completion_tokens=completion_tokens,
                                           total_tokens=item.usage.prompt_tokens + completion_tokens
                                           ) if finished_all else None
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _sse(events: AsyncIterator, metrics: _Metrics, model: str) -> AsyncIterator[bytes]:
    """`data: {chunk}` lines, then `data: [DONE]`; an error mid-stream is sent as a last error
    event. A client that leaves cancels this generator, which cancels the request in Triton."""
    status = "200"
    try:
        try:
            async for event in events:
                if event.usage is not None:
                    metrics.tokens.labels(model, "prompt").inc(event.usage.prompt_tokens)
                    metrics.tokens.labels(model, "completion").inc(event.usage.completion_tokens)
                yield b"data: " + event.model_dump_json().encode() + b"\n\n"
        except PlateformeError as exc:
            status = str(exc.status_code)
            yield f"data: {json.dumps(error_body(exc.status_code, exc.message))}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except BaseException:
        status = str(CLIENT_CLOSED)  # the client went away
        raise
    finally:
        await events.aclose()
        metrics.requests.labels("chat", model, status).inc()


def _count(metrics: _Metrics, route: str, model: str, usage, start: float) -> None:
    metrics.requests.labels(route, model, "200").inc()
    metrics.latency.labels(route).observe(time.perf_counter() - start)
    metrics.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
    metrics.tokens.labels(model, "completion").inc(usage.completion_tokens)


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the gateway until Ctrl-C."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
