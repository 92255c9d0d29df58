"""A Python client for plateforme endpoints, shaped like Mistral's `mistralai` SDK.

`PlateformeClient(url).chat.complete(model=..., messages=[...])` talks to Triton directly (gRPC by
default, HTTP as an option) and returns pydantic objects with the fields of Mistral's API, so code
written for `mistralai.Mistral` ports by changing the constructor. The request mapping (tools,
tool_choice, JSON mode, safe_prompt) and the parsing of `[TOOL_CALLS]` live here and are shared by
the gateway. No torch, no models: only the wire.
"""
from __future__ import annotations

import json
import queue
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from plateforme.clients.triton_client import (
    DEFAULT_GRPC_URL, DEFAULT_HTTP_URL, EndpointError, GenerationChunk, GenerationParams,
)

SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
# The engine's finish reasons -> the Mistral API's.
_FINISH_REASONS = {"end_id": "stop", "stop": "stop", "length": "length", "model_length": "model_length",
                   "cancelled": "error"}


# -- errors ----------------------------------------------------------------------------------
class PlateformeError(EndpointError):
    """An endpoint call failed; `status_code` is the HTTP status La Plateforme would answer."""

    status_code = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(PlateformeError, ValueError):
    """The request is malformed or does not fit the model (too long, bad guide, ...)."""

    status_code = 400


class ModelNotFoundError(PlateformeError, LookupError):
    status_code = 404


class ServerUnavailableError(PlateformeError):
    """Triton cannot be reached, or it is overloaded (queue full)."""

    status_code = 503


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
        inputs = GenerationParams(**self.params).tensors()
        inputs["messages"] = (np.array([[self.messages_json.encode()]], dtype=object), "BYTES")
        inputs["stream"] = (np.array([[stream]], dtype=bool), "BOOL")
        if self.guide_type:
            inputs["guided_decoding_guide_type"] = (np.array([[self.guide_type.encode()]], dtype=object), "BYTES")
        if self.guide:
            inputs["guided_decoding_guide"] = (np.array([[self.guide.encode()]], dtype=object), "BYTES")
        return inputs


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
    default_max_tokens: int = 256,
) -> ChatPlan:
    """Map Mistral API chat arguments onto the ensemble's `messages` request and tensors.

    tool_choice: "none" hides the tools; "auto" (default) lets the model choose; "any"/"required"
    and {"type": "function", "function": {"name": ...}} force a call by constraining the answer
    to a JSON list of calls to the allowed tools (guided decoding).
    """
    messages = [_plain(m) for m in messages]
    if safe_prompt:
        # Mistral prepends the guardrail to the first system message, or adds one.
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "content": f"{SAFE_PROMPT}\n\n{messages[0].get('content') or ''}"}
        else:
            messages.insert(0, {"role": "system", "content": SAFE_PROMPT})
    tools = [_plain(t) for t in tools] if tools else None
    allowed = tools
    forced = False
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
              "top_p": top_p, "seed": random_seed, "stop": stop or None}
    plan = ChatPlan(messages_json=json.dumps(request), params=params, forced_tool_call=forced)
    if forced:
        plan.guide_type, plan.guide = "json_schema", json.dumps(_tool_calls_schema(allowed))
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


def _tool_calls_schema(tools: list[dict]) -> dict:
    calls = []
    for tool in tools:
        function = tool.get("function", {})
        parameters = function.get("parameters") or {"type": "object"}
        calls.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}


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


# -- transport -------------------------------------------------------------------------------
class Transport:
    """Streams ensemble requests to Triton, with errors classified by HTTP status.

    gRPC clients are pooled: one stream per client at a time, but the channel (a TCP connection)
    outlives the request, which saves its set-up on every call.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0,
                 retries: int = 2, retry_backoff: float = 0.2):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.protocol = protocol
        self.url = url or (DEFAULT_GRPC_URL if protocol == "grpc" else DEFAULT_HTTP_URL)
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._pool: list = []
        self._lock = threading.Lock()

    def generate(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], stream: bool) -> Iterator[GenerationChunk]:
        """Chunks of one request; retried while the server is unavailable and nothing was yielded."""
        for attempt in range(self.retries + 1):
            started = False
            try:
                chunks = self._grpc(model, inputs) if self.protocol == "grpc" else self._http(model, inputs, stream)
                for chunk in chunks:
                    started = True
                    yield chunk
                return
            except ServerUnavailableError:
                if started or attempt == self.retries:
                    raise
                time.sleep(self.retry_backoff * 2 ** attempt)

    def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        if not texts:
            raise InvalidRequestError("input must not be empty")
        array = np.array([[t.encode()] for t in texts], dtype=object)
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException

        client = self._client() if self.protocol == "grpc" else module.InferenceServerClient(self.url)
        tensor = module.InferInput("text_input", list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        try:
            result = client.infer(model, [tensor], client_timeout=self.timeout) if self.protocol == "grpc" \
                else client.infer(model, [tensor])
        except InferenceServerException as exc:
            raise classify(exc) from None
        except OSError as exc:
            raise ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from None
        finally:
            self._release(client) if self.protocol == "grpc" else client.close()
        return result.as_numpy("embedding"), result.as_numpy("num_input_tokens").reshape(-1).tolist()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for client in pool:
            client.close()

    def _client(self):
        import tritonclient.grpc as grpcclient

        with self._lock:
            if self._pool:
                return self._pool.pop()
        return grpcclient.InferenceServerClient(self.url)

    def _release(self, client) -> None:
        with self._lock:
            self._pool.append(client)

    def _grpc(self, model: str, inputs) -> Iterator[GenerationChunk]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        results: queue.Queue = queue.Queue()
        client = self._client()
        tensors = []
        for name, (array, datatype) in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        finished = healthy = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)),
                                stream_timeout=self.timeout)
            try:
                client.async_stream_infer(model, tensors, request_id=uuid.uuid4().hex,
                                          enable_empty_final_response=True)
            except InferenceServerException as exc:
                # A broken stream reports its cause through the callback.
                try:
                    raise classify(results.get(timeout=1.0)[1] or exc) from None
                except queue.Empty:
                    raise classify(exc) from None
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise ServerUnavailableError(f"no response from {model} within {self.timeout:.0f} s") from None
                if error is not None:
                    raise classify(error)
                response = result.get_response()
                if response.outputs:
                    yield _chunk(result.as_numpy)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = healthy = True
                    return
        except InferenceServerException as exc:
            raise classify(exc) from None
        finally:
            # Closing the stream with the request still running cancels it on the server.
            try:
                client.stop_stream(cancel_requests=not finished)
            except Exception:  # a broken channel: drop the client rather than pool it
                healthy = False
            if healthy:
                self._release(client)
            else:
                client.close()

    def _http(self, model: str, inputs, stream: bool) -> Iterator[GenerationChunk]:
        import urllib.error
        import urllib.request

        body = {}
        for name, (array, _) in inputs.items():
            values = [v.decode() if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
            body[name] = values if name == "stop_words" else values[0]
        route = "generate_stream" if stream else "generate"
        request = urllib.request.Request(f"http://{self.url}/v2/models/{model}/{route}",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if not stream:
                    yield _chunk_from_json(json.loads(response.read()))
                    return
                for line in response:
                    line = line.strip()
                    if line.startswith(b"data:"):
                        payload = json.loads(line[5:])
                        if "error" in payload:
                            raise InvalidRequestError(payload["error"])
                        yield _chunk_from_json(payload)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", str(exc))
            except ValueError:
                message = str(exc)
            raise _by_status(exc.code, message) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from None


def classify(error) -> PlateformeError:
    """A tritonclient error as the PlateformeError its status calls for."""
    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    status = str(error.status() if callable(getattr(error, "status", None)) else "")
    if "UNAVAILABLE" in status or "DEADLINE" in status or "unavailable" in message.lower():
        return ServerUnavailableError(message or f"Triton is unavailable ({status})")
    if "NOT_FOUND" in status or re.search(r"unknown model|not found", message or "", re.I):
        return ModelNotFoundError(message)
    return InvalidRequestError(message or str(error))


def _by_status(code: int, message: str) -> PlateformeError:
    if code == 404:
        return ModelNotFoundError(message)
    if code in (502, 503, 504):
        return ServerUnavailableError(message)
    return InvalidRequestError(message)


def _chunk(as_numpy) -> GenerationChunk:
    def first(name, cast):
        value = as_numpy(name)
        return None if value is None or value.size == 0 else cast(value.reshape(-1)[0])

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)

    return GenerationChunk(first("text_output", text) or "", first("finish_reason", text) or None,
                           first("num_input_tokens", int), first("num_output_tokens", int))


def _chunk_from_json(payload: dict) -> GenerationChunk:
    def first(value):
        return value[0] if isinstance(value, list) else value

    return GenerationChunk(first(payload.get("text_output", "")) or "", first(payload.get("finish_reason")) or None,
                           first(payload.get("num_input_tokens")), first(payload.get("num_output_tokens")))


# -- responses -------------------------------------------------------------------------------
def completion_id() -> str:
    return uuid.uuid4().hex


def stream_chunks(model: str, plan: ChatPlan, chunks: Iterator[GenerationChunk]) -> Iterator[CompletionChunk]:
    """Mistral API stream chunks from engine chunks: a role delta, content deltas, then a last
    chunk with the finish reason and usage. An answer that is a tool call is held back and sent
    as one `tool_calls` delta."""
    cid, created = completion_id(), int(time.time())

    def make(delta: DeltaMessage, reason: str | None = None, usage: UsageInfo | None = None) -> CompletionChunk:
        return CompletionChunk(id=cid, model=model, created=created, usage=usage,
                               choices=[CompletionResponseStreamChoice(delta=delta, finish_reason=reason)])

    yield make(DeltaMessage(role="assistant", content=""))
    held, holding = "", plan.forced_tool_call
    last: GenerationChunk | None = None
    for chunk in chunks:
        last = chunk
        if holding or might_be_tool_call(held + chunk.text):
            held += chunk.text
            holding = holding or held.lstrip().startswith(TOOL_CALLS_TOKEN)
            continue
        text, held = held + chunk.text, ""
        if text:
            yield make(DeltaMessage(content=text))
    usage = _usage(last)
    reason = finish_reason(last.finish_reason if last else None)
    calls = parse_tool_calls(held, bare=plan.forced_tool_call) if held else None
    if calls:
        yield make(DeltaMessage(tool_calls=calls), "tool_calls", usage)
        return
    yield make(DeltaMessage(content=held) if held else DeltaMessage(content=""), reason, usage)


def completion_response(model: str, plan: ChatPlan, chunk: GenerationChunk) -> ChatCompletionResponse:
    calls = parse_tool_calls(chunk.text, bare=plan.forced_tool_call)
    message = AssistantMessage(content="" if calls else chunk.text, tool_calls=calls)
    reason = "tool_calls" if calls else finish_reason(chunk.finish_reason)
    return ChatCompletionResponse(id=completion_id(), model=model, created=int(time.time()),
                                  choices=[ChatCompletionChoice(message=message, finish_reason=reason)],
                                  usage=_usage(chunk))


def _usage(chunk: GenerationChunk | None) -> UsageInfo:
    prompt = (chunk.num_input_tokens or 0) if chunk else 0
    completion = (chunk.num_output_tokens or 0) if chunk else 0
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def join_chunks(chunks: Iterator[GenerationChunk]) -> GenerationChunk:
    parts = list(chunks)
    last = parts[-1] if parts else GenerationChunk("")
    return GenerationChunk("".join(p.text for p in parts), last.finish_reason, last.num_input_tokens,
                           last.num_output_tokens)


def embedding_response(model: str, vectors: np.ndarray, counts: list[int], encoding_format: str = "float"
                       ) -> EmbeddingResponse:
    import base64

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


# -- the client ------------------------------------------------------------------------------
class Chat:
    def __init__(self, client: "PlateformeClient"):
        self._client = client

    def complete(self, *, model: str, messages: list[dict], **kwargs) -> ChatCompletionResponse:
        """One answer; kwargs as `plan_chat` (temperature, top_p, max_tokens, stop, random_seed,
        response_format, tools, tool_choice, safe_prompt)."""
        target = self._client.resolve(model)
        plan = plan_chat(messages, **kwargs)
        chunk = join_chunks(self._client.transport.generate(target, plan.tensors(stream=False), stream=False))
        return completion_response(model, plan, chunk)

    def stream(self, *, model: str, messages: list[dict], **kwargs) -> Iterator[CompletionEvent]:
        """Chunks as they are generated; closing the iterator cancels the request on the server."""
        target = self._client.resolve(model)
        plan = plan_chat(messages, **kwargs)
        chunks = self._client.transport.generate(target, plan.tensors(stream=True), stream=True)
        for chunk in stream_chunks(model, plan, chunks):
            yield CompletionEvent(data=chunk)


class Embeddings:
    def __init__(self, client: "PlateformeClient"):
        self._client = client

    def create(self, *, model: str, inputs: str | list[str], encoding_format: str = "float") -> EmbeddingResponse:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        vectors, counts = self._client.transport.embed(self._client.resolve(model), texts)
        return embedding_response(model, vectors, counts, encoding_format)


class PlateformeClient:
    """`mistralai.Mistral`-shaped client of a Triton server: `.chat.complete`, `.chat.stream`,
    `.embeddings.create`. Public names and aliases (open-mistral-7b, ...) resolve to the served
    Triton models; other names are sent as they are."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0, retries: int = 2):
        self.transport = Transport(url, protocol, timeout, retries)
        self.chat = Chat(self)
        self.embeddings = Embeddings(self)

    def resolve(self, model: str) -> str:
        from plateforme.clients.registry import ALIASES

        return ALIASES.get(model, model)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "PlateformeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
