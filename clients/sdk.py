"""A Python client for plateforme endpoints, shaped like Mistral's `mistralai` SDK.

`PlateformeClient(url).chat.complete(model=..., messages=[...])` talks to Triton directly (gRPC by
default, HTTP as an option) and returns pydantic objects with the fields of Mistral's API, so code
written for `mistralai.Mistral` ports by changing the constructor. The request mapping (tools,
tool_choice, JSON mode, safe_prompt) and the parsing of `[TOOL_CALLS]` live here and are shared by
the gateway. No torch, no models: only the wire.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import string
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from plateforme.clients.triton_client import (  # noqa: F401 (errors and transports re-exported)
    AnswerTimeoutError, AsyncTransport, EndpointError, GenerationChunk, GenerationParams, InvalidRequestError,
    ModelNotFoundError, PlateformeError, ServerUnavailableError, Transport, chat_tensors, classify, join_chunks,
)

SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
# The most choices (`n`) one chat request may ask for: each is a request of its own to the engine.
MAX_CHOICES = 16
# Inclusive bounds of the API's numeric arguments, checked by the SDK and the gateway alike.
PARAMETER_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "random_seed": (0, 2**63 - 1),
                    "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
# The engine's finish reasons -> the Mistral API's.
_FINISH_REASONS = {"end_id": "stop", "stop": "stop", "length": "length", "model_length": "model_length",
                   "cancelled": "error"}


# -- API objects -----------------------------------------------------------------------------
class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as in Mistral's API


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    model: str
    created: int
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class CompletionResponseStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    model: str
    created: int
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class CompletionEvent(BaseModel):
    """What `chat.stream` yields, as in `mistralai` (`event.data.choices[0].delta.content`)."""

    data: CompletionChunk


class EmbeddingResponseData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


# -- request mapping -------------------------------------------------------------------------
class ChatPlan(BaseModel):
    """A chat request turned into ensemble inputs."""

    messages_json: str
    params: dict[str, Any] = Field(default_factory=dict)
    guide_type: str | None = None
    guide: str | None = None
    # The answer is a bare JSON list of calls (tool_choice forced a call through guided decoding).
    forced_tool_call: bool = False

    def tensors(self, stream: bool) -> dict[str, tuple[np.ndarray, str]]:
        inputs = chat_tensors(GenerationParams(**self.params), messages_json=self.messages_json, stream=stream)
        if self.guide_type:
            inputs["guided_decoding_guide_type"] = (np.array([[self.guide_type.encode()]], dtype=object), "BYTES")
        if self.guide:
            inputs["guided_decoding_guide"] = (np.array([[self.guide.encode()]], dtype=object), "BYTES")
        return inputs

    def choices(self, n: int) -> list["ChatPlan"]:
        """`n` plans that sample independently (the API's `n`): seeds seed, seed + 1, ... from the
        request's seed, or from a random one."""
        if n == 1:
            return [self]
        base = self.params.get("seed")
        base = random.getrandbits(62) if base is None else base
        return [self.model_copy(update={"params": {**self.params, "seed": (base + i) % 2**64}}) for i in range(n)]


def plan_chat(
    messages: list[dict],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    random_seed: int | None = None,
    response_format: dict | None = None,
    tools: list[dict] | None = None,
    tool_choice: str | dict | None = None,
    safe_prompt: bool = False,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    parallel_tool_calls: bool | None = None,
    default_max_tokens: int | None = None,
) -> ChatPlan:
    """Map Mistral API chat arguments onto the ensemble's `messages` request and tensors.

    tool_choice: "none" hides the tools; "auto" (default) lets the model choose; "any"/"required"
    and {"type": "function", "function": {"name": ...}} force a call by constraining the answer
    to a JSON list of calls to the allowed tools (guided decoding).
    """
    arguments = {"temperature": temperature, "top_p": top_p, "random_seed": random_seed,
                 "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty}
    for name, value in arguments.items():
        low, high = PARAMETER_RANGES[name]
        if value is not None and not (isinstance(value, (int, float)) and low <= value <= high):
            raise InvalidRequestError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    messages = [_api_message(m) for m in messages]
    if safe_prompt:
        # Mistral prepends the guardrail to the first system message, or adds one.
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "content": f"{SAFE_PROMPT}\n\n{messages[0].get('content') or ''}"}
        else:
            messages.insert(0, {"role": "system", "content": SAFE_PROMPT})
    tools = [_with_parameters(_plain(t)) for t in tools] if tools else None
    allowed = tools
    forced = False
    if tool_choice is not None and not tools and _plain(tool_choice) not in ("none", "auto"):
        raise InvalidRequestError(f"tool_choice {_plain(tool_choice)!r} forces a tool call, but no tools are given")
    if tool_choice is not None and tools:
        choice = _plain(tool_choice)
        if choice == "none":
            tools = allowed = None
        elif choice in ("any", "required"):
            forced = True
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            allowed = [t for t in tools if t.get("function", {}).get("name") == name]
            if not allowed:
                raise InvalidRequestError(f"tool_choice names function {name!r}, which is not among the tools")
            forced = True
        elif choice != "auto":
            raise InvalidRequestError(f"tool_choice must be none, auto, any, required or a function; got {choice!r}")
    request: dict[str, Any] = {"messages": messages}
    if tools:
        request["tools"] = tools
    if isinstance(stop, str):
        stop = [stop]
    params = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens, "temperature": temperature,
              "top_p": top_p, "seed": random_seed, "stop": stop or None, "presence_penalty": presence_penalty,
              "frequency_penalty": frequency_penalty, "repetition_penalty": repetition_penalty}
    plan = ChatPlan(messages_json=json.dumps(request), params=params, forced_tool_call=forced)
    if forced:
        schema = _tool_calls_schema(allowed)
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        plan.guide_type, plan.guide = "json_schema", json.dumps(schema)
    elif response_format:
        kind = _plain(response_format).get("type", "text")
        if kind == "json_object":
            plan.guide_type = "json"
        elif kind == "json_schema":
            schema = _plain(response_format).get("json_schema") or {}
            schema = schema.get("schema", schema.get("schema_")) if isinstance(schema, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequestError("response_format json_schema needs json_schema.schema (an object)")
            plan.guide_type, plan.guide = "json_schema", json.dumps(schema)
        elif kind != "text":
            raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema; got {kind!r}")
    return plan


def _with_parameters(tool: dict) -> dict:
    """A function without `parameters` (or with `{}`, which mistralai's SDK makes one write) takes
    none, as in Mistral's API; chat encodings and forced calls need the schema said."""
    function = tool.get("function")
    if isinstance(function, dict) and function.get("parameters") in (None, {}):
        none = {"type": "object", "properties": {}, "additionalProperties": False}
        return {**tool, "function": {**function, "parameters": none}}
    return tool


def _tool_calls_schema(tools: list[dict]) -> dict:
    calls = []
    for tool in tools:
        function = tool.get("function", {})
        parameters = function.get("parameters") or {"type": "object"}
        calls.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}


def _api_message(message: Any) -> Any:
    """A message as the chat encoding takes it, from a dict or an SDK object (ours, mistralai's):
    what changes nothing is dropped, so that an answer appended to the conversation goes back as
    it came (a tool call's stream `index`, mistralai's `prefix: false`)."""
    message = _plain(message)
    if not isinstance(message, dict):
        return message  # the server names what is wrong with it
    message = dict(message)
    if message.get("prefix") is False:
        del message["prefix"]
    elif message.get("prefix"):
        raise InvalidRequestError("assistant prefixes (prefix: true) are not supported")
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} if isinstance(call, dict) else call
                                 for call in map(_plain, message["tool_calls"])]
    return message


def _plain(value: Any) -> Any:
    """Pydantic objects (e.g. from mistralai's models) as plain JSON data."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True, by_alias=True)
    return value


# -- tool calls ------------------------------------------------------------------------------
def new_tool_call_id() -> str:
    """Mistral's tool call ids: 9 characters from [a-zA-Z0-9]."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def parse_tool_calls(text: str, bare: bool = False) -> list[ToolCall] | None:
    """The calls in a model answer `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or None.

    `bare`: the answer is the JSON list itself (no `[TOOL_CALLS]` token). Accepts one object
    instead of a list, arguments as an object or a JSON string, and text after the JSON
    (ignored). Returns None when the answer is not a well-formed call, so it is kept as text.
    """
    stripped = text.strip()
    if not bare:
        if not stripped.startswith(TOOL_CALLS_TOKEN):
            return None
        stripped = stripped[len(TOOL_CALLS_TOKEN):].strip()
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]):
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        call_id = item.get("id")
        if not (isinstance(call_id, str) and re.fullmatch(r"[a-zA-Z0-9]{9}", call_id)):
            call_id = new_tool_call_id()
        calls.append(ToolCall(id=call_id, index=len(calls),
                              function=FunctionCall(name=item["name"], arguments=json.dumps(arguments))))
    return calls or None


def might_be_tool_call(text: str) -> bool:
    """Whether a streamed answer so far could still turn out to start with `[TOOL_CALLS]`."""
    head = text.lstrip()
    return TOOL_CALLS_TOKEN.startswith(head) or head.startswith(TOOL_CALLS_TOKEN)


def finish_reason(engine_reason: str | None) -> str | None:
    return _FINISH_REASONS.get(engine_reason, engine_reason) if engine_reason else None


# -- responses -------------------------------------------------------------------------------
def completion_id() -> str:
    return uuid.uuid4().hex


class StreamAssembler:
    """Mistral API stream chunks from engine chunks: a role delta, content deltas, then a last
    chunk with the finish reason and usage. An answer that is a tool call is held back and sent
    as one `tool_calls` delta. Shared by the sync and asyncio streams."""

    def __init__(self, model: str, plan: ChatPlan, index: int = 0, answer: tuple[str, int] | None = None):
        """`index`: the choice's; `answer`: the (id, created) its chunks share with the other choices."""
        self.model, self.plan, self.index = model, plan, index
        self.id, self.created = answer or (completion_id(), int(time.time()))
        self.held, self.holding = "", plan.forced_tool_call
        self.last: GenerationChunk | None = None

    def make(self, delta: DeltaMessage, reason: str | None = None, usage: UsageInfo | None = None) -> CompletionChunk:
        choice = CompletionResponseStreamChoice(index=self.index, delta=delta, finish_reason=reason)
        return CompletionChunk(id=self.id, model=self.model, created=self.created, usage=usage, choices=[choice])

    def start(self) -> CompletionChunk:
        return self.make(DeltaMessage(role="assistant", content=""))

    def feed(self, chunk: GenerationChunk) -> CompletionChunk | None:
        self.last = chunk
        if self.holding or might_be_tool_call(self.held + chunk.text):
            self.held += chunk.text
            self.holding = self.holding or self.held.lstrip().startswith(TOOL_CALLS_TOKEN)
            return None
        text, self.held = self.held + chunk.text, ""
        return self.make(DeltaMessage(content=text)) if text else None

    def finish(self) -> CompletionChunk:
        usage = _usage(self.last)
        calls = parse_tool_calls(self.held, bare=self.plan.forced_tool_call) if self.held else None
        if calls:
            return self.make(DeltaMessage(tool_calls=calls), "tool_calls", usage)
        reason = finish_reason(self.last.finish_reason if self.last else None)
        return self.make(DeltaMessage(content=self.held), reason, usage)


def stream_chunks(model: str, plan: ChatPlan, chunks: Iterator[GenerationChunk]) -> Iterator[CompletionChunk]:
    assembler = StreamAssembler(model, plan)
    yield assembler.start()
    for chunk in chunks:
        out = assembler.feed(chunk)
        if out is not None:
            yield out
    yield assembler.finish()


async def stream_chunks_async(model: str, plan: ChatPlan, chunks: AsyncIterator[GenerationChunk], index: int = 0,
                              answer: tuple[str, int] | None = None) -> AsyncIterator[CompletionChunk]:
    assembler = StreamAssembler(model, plan, index, answer)
    yield assembler.start()
    try:
        async for chunk in chunks:
            out = assembler.feed(chunk)
            if out is not None:
                yield out
    finally:
        await chunks.aclose()  # leaving early cancels the request in Triton
    yield assembler.finish()


def completion_response(model: str, plan: ChatPlan, *answers: GenerationChunk) -> ChatCompletionResponse:
    """One choice per answer (several for the API's `n`); the prompt is counted once."""
    choices = []
    for index, answer in enumerate(answers):
        calls = parse_tool_calls(answer.text, bare=plan.forced_tool_call)
        message = AssistantMessage(content="" if calls else answer.text, tool_calls=calls)
        reason = "tool_calls" if calls else finish_reason(answer.finish_reason)
        choices.append(ChatCompletionChoice(index=index, message=message, finish_reason=reason))
    usage = _usage(answers[0])
    usage.completion_tokens = sum(a.num_output_tokens or 0 for a in answers)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return ChatCompletionResponse(id=completion_id(), model=model, created=int(time.time()), choices=choices,
                                  usage=usage)


def _usage(chunk: GenerationChunk | None) -> UsageInfo:
    prompt = (chunk.num_input_tokens or 0) if chunk else 0
    completion = (chunk.num_output_tokens or 0) if chunk else 0
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def embedding_response(model: str, vectors: np.ndarray, counts: list[int], encoding_format: str = "float"
                       ) -> EmbeddingResponse:
    import base64

    _check_encoding_format(encoding_format)
    data = []
    for i, vector in enumerate(vectors):
        if encoding_format == "base64":
            value: list[float] | str = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            value = [float(v) for v in vector]
        data.append(EmbeddingResponseData(embedding=value, index=i))
    total = int(sum(counts))
    return EmbeddingResponse(id=completion_id(), model=model, data=data,
                             usage=UsageInfo(prompt_tokens=total, completion_tokens=0, total_tokens=total))


def _check_encoding_format(encoding_format: str) -> None:
    if encoding_format not in ("float", "base64"):
        raise InvalidRequestError(f"encoding_format must be float or base64, got {encoding_format!r}")


# -- the client ------------------------------------------------------------------------------
class EventStream:
    """What `chat.stream` returns, as in `mistralai`: iterate it for `CompletionEvent`s; `close()`,
    leaving a `with` block or breaking out and dropping it cancels the request in Triton."""

    def __init__(self, model: str, plan: ChatPlan, first: GenerationChunk | None, source: Iterator[GenerationChunk]):
        self._source = source
        self._events = stream_chunks(model, plan, _prepend(first, source))

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> CompletionEvent:
        return CompletionEvent(data=next(self._events))

    def close(self) -> None:
        self._events.close()
        self._source.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if hasattr(self, "_events"):
            self.close()


class EventStreamAsync:
    """What `chat.stream_async` returns: `async for event in stream`; `await stream.close()` (or
    `async with`, or cancelling the task) cancels the request in Triton."""

    def __init__(self, model: str, plan: ChatPlan, first: GenerationChunk | None,
                 source: AsyncIterator[GenerationChunk]):
        self._source = source
        self._events = stream_chunks_async(model, plan, _prepend_async(first, source))

    def __aiter__(self) -> "EventStreamAsync":
        return self

    async def __anext__(self) -> CompletionEvent:
        return CompletionEvent(data=await self._events.__anext__())

    async def close(self) -> None:
        await self._events.aclose()
        await self._source.aclose()

    async def __aenter__(self) -> "EventStreamAsync":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _prepend(first, rest: Iterator) -> Iterator:
    if first is not None:
        yield first
    yield from rest


async def _prepend_async(first, rest: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for item in rest:
        yield item


class Chat:
    """`client.chat`: complete / stream, and their asyncio twins complete_async / stream_async.

    Keyword arguments as Mistral's API: temperature, top_p, max_tokens, stop, random_seed,
    response_format, tools, tool_choice, safe_prompt, presence_penalty, frequency_penalty
    (and repetition_penalty, which the engine also takes)."""

    def __init__(self, client: "PlateformeClient"):
        self._client = client

    def complete(self, *, model: str, messages: list[dict], n: int | None = None, **kwargs) -> ChatCompletionResponse:
        """`n` choices are `n` requests sent together (see ChatPlan.choices)."""
        target, plan = self._client.resolve(model), plan_chat(messages, **_api_kwargs(kwargs))
        transport, plans = self._client.transport, plan.choices(_choices(n))
        if len(plans) == 1:
            chunks = transport.generate(target, plan.tensors(stream=False), stream=False)
            return completion_response(model, plan, join_chunks(chunks))
        # Several choices stream, each in a thread, so that when one fails (or Ctrl-C comes) the
        # others stop at their next chunk, closing their streams, rather than run to their end.
        stop = threading.Event()

        def answer(choice: ChatPlan) -> GenerationChunk:
            chunks = []
            with contextlib.closing(transport.generate(target, choice.tensors(stream=True), stream=True)) as stream:
                for chunk in stream:
                    if stop.is_set():
                        raise _Stopped
                    chunks.append(chunk)
            return join_chunks(chunks)

        with ThreadPoolExecutor(len(plans)) as pool:
            futures = [pool.submit(answer, choice) for choice in plans]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                errors = [future.exception() for future in done if future.exception() is not None]
                if errors:
                    raise errors[0]
                return completion_response(model, plan, *(future.result() for future in futures))
            finally:
                stop.set()

    def stream(self, *, model: str, messages: list[dict], **kwargs) -> EventStream:
        """The request is sent before this returns (its errors raise here), then chunks arrive as
        they are generated."""
        target, plan = self._client.resolve(model), plan_chat(messages, **_api_kwargs(kwargs, streamed=True))
        source = self._client.transport.generate(target, plan.tensors(stream=True), stream=True)
        return EventStream(model, plan, next(source, None), source)

    async def complete_async(self, *, model: str, messages: list[dict], n: int | None = None, **kwargs
                             ) -> ChatCompletionResponse:
        target, plan = self._client.resolve(model), plan_chat(messages, **_api_kwargs(kwargs))
        transport = self._client.async_transport
        chunks = await all_or_none([transport.complete(target, choice.tensors(stream=False))
                                    for choice in plan.choices(_choices(n))])
        return completion_response(model, plan, *chunks)

    async def stream_async(self, *, model: str, messages: list[dict], **kwargs) -> EventStreamAsync:
        """`async for event in await client.chat.stream_async(...)`, as in mistralai."""
        target, plan = self._client.resolve(model), plan_chat(messages, **_api_kwargs(kwargs, streamed=True))
        source = self._client.async_transport.generate(target, plan.tensors(stream=True), stream=True)
        try:
            first = await first_chunk(source)
        except BaseException:
            await source.aclose()
            raise
        return EventStreamAsync(model, plan, first, source)


async def first_chunk(stream: AsyncIterator):
    """The first item of `stream`, None when it has none; awaited before a response starts, so that
    a request's early errors get their own status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class _Stopped(Exception):
    """A choice stopped because another one of its request failed."""


def _api_kwargs(kwargs: dict, streamed: bool = False) -> dict:
    # mistralai passes `stream`; streams of several choices are served by the gateway.
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "stream"}
    if "max_completion_tokens" in kwargs:  # OpenAI's name
        kwargs.setdefault("max_tokens", kwargs.pop("max_completion_tokens"))
    if streamed and kwargs.pop("n", 1) != 1:
        raise InvalidRequestError("a stream carries one choice here (n = 1); the gateway streams several")
    return kwargs


def _choices(n: int | None) -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be an integer in 1..{MAX_CHOICES}, got {n!r}")
    return n


async def all_or_none(coroutines: list) -> list:
    """The results of coroutines run together; when one fails (or this is cancelled) the others are
    cancelled, which stops their requests in Triton, and the first error is raised."""
    tasks = []
    try:
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Embeddings:
    """`client.embeddings`: create / create_async."""

    def __init__(self, client: "PlateformeClient"):
        self._client = client

    def create(self, *, model: str, inputs: str | list[str], encoding_format: str = "float") -> EmbeddingResponse:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        _check_encoding_format(encoding_format)
        vectors, counts = self._client.transport.embed(self._client.resolve(model), texts)
        return embedding_response(model, vectors, counts, encoding_format)

    async def create_async(self, *, model: str, inputs: str | list[str], encoding_format: str = "float"
                           ) -> EmbeddingResponse:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        _check_encoding_format(encoding_format)
        vectors, counts = await self._client.async_transport.embed(self._client.resolve(model), texts)
        return embedding_response(model, vectors, counts, encoding_format)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    type: Literal["base"] = "base"
    created: int = 0
    owned_by: str = "plateforme"
    root: str | None = None
    capabilities: dict[str, bool] = Field(default_factory=dict)
    max_context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Models:
    """`client.models`: list / retrieve (and `_async`): the endpoints the server actually serves."""

    def __init__(self, client: "PlateformeClient"):
        self._client = client

    def list(self) -> ModelList:
        return ModelList(data=[ModelCard(**e.card()) for e in self._client.registry.endpoints()])

    def retrieve(self, *, model_id: str) -> ModelCard:
        endpoint = self._client.registry.get(model_id)
        if endpoint is None:
            raise ModelNotFoundError(f"model {model_id!r} is not served here")
        return ModelCard(**endpoint.card())

    async def list_async(self) -> ModelList:
        return await asyncio.to_thread(self.list)

    async def retrieve_async(self, *, model_id: str) -> ModelCard:
        return await asyncio.to_thread(self.retrieve, model_id=model_id)


class PlateformeClient:
    """`mistralai.Mistral`-shaped client of a Triton server: `.chat.complete`, `.chat.stream`,
    `.embeddings.create` and their `_async` twins (asyncio), over gRPC (default) or HTTP. Public
    names and aliases (open-mistral-7b, ...) resolve to the served Triton models; other names are
    sent as they are. Calls are retried while Triton is unavailable (`retries`), and each waits at
    most `timeout` seconds."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0, retries: int = 2):
        self.transport = Transport(url, protocol, timeout, retries)
        self.async_transport = AsyncTransport(url, protocol, timeout, retries)
        self._registry = None
        self.chat = Chat(self)
        self.embeddings = Embeddings(self)
        self.models = Models(self)

    @property
    def registry(self):
        from plateforme.clients.registry import Registry

        if self._registry is None:
            self._registry = Registry(self.transport.url, self.transport.protocol)
        return self._registry

    def resolve(self, model: str) -> str:
        from plateforme.clients.registry import ALIASES

        return ALIASES.get(model, model)

    def close(self) -> None:
        self.transport.close()

    async def aclose(self) -> None:
        await self.async_transport.close()

    def __enter__(self) -> "PlateformeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "PlateformeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
