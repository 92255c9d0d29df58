"""Call plateforme endpoints on a Triton server over gRPC (default) or HTTP, sync or asyncio.

Chat endpoints are decoupled (they stream), so over gRPC every call uses the streaming RPC and
over HTTP the `generate` / `generate_stream` extension; plain `infer` is refused by Triton for
decoupled models. `Transport` (threads, tritonclient) and `AsyncTransport` (asyncio: grpc.aio on
Triton's protobuf service, aiohttp) send the same tensors and raise the same errors; the SDK, the
gateway and the CLI all go through them. This module talks to Triton over the wire only.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

DEFAULT_GRPC_URL = "127.0.0.1:8001"
DEFAULT_HTTP_URL = "127.0.0.1:8000"
Tensors = dict[str, tuple[np.ndarray, str]]


def triton_address(url: str | None, protocol: str = "grpc") -> str:
    """The host:port tritonclient and grpc want, from what a user may write: "host:port", "host"
    (the protocol's default port), "http://host:port/" or "grpc://host:port"."""
    default = DEFAULT_GRPC_URL if protocol == "grpc" else DEFAULT_HTTP_URL
    if not url or not url.strip():
        return default
    written = url.strip()
    parsed = urllib.parse.urlsplit(written if "://" in written else f"//{written}")
    try:
        port = int(default.rsplit(":", 1)[1]) if parsed.port is None else parsed.port
    except ValueError:
        port = 0
    if parsed.scheme and parsed.scheme != protocol:
        raise ValueError(f"Triton address {url!r} is a {parsed.scheme} address, but {protocol} is used")
    if (parsed.path.strip("/") or parsed.query or parsed.fragment or parsed.username or not parsed.hostname
            or not 1 <= port <= 65535):
        raise ValueError(f"Triton address {url!r} is not host:port (like {default})")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{host}:{port}"


# -- errors ----------------------------------------------------------------------------------
class EndpointError(RuntimeError):
    """The server answered with an error (bad input, unknown model, ...)."""


class PlateformeError(EndpointError):
    """An endpoint call failed; `status_code` is the HTTP status La Plateforme would answer."""

    status_code = 500

    def __init__(self, message: str):
        # Triton prefixes the request id and the ensemble a composing model's error went through:
        # the caller knows both.
        message = re.sub(r"^(\[request id: [^\]]*\] )?(in ensemble '[^']*', )?", "", message)
        super().__init__(message)
        self.message = message


class InvalidRequestError(PlateformeError, ValueError):
    """The request is malformed or does not fit the model (too long, bad guide, ...)."""

    status_code = 400


class ModelNotFoundError(PlateformeError, LookupError):
    status_code = 404


class ServerUnavailableError(PlateformeError):
    """Triton cannot be reached, or it is overloaded (queue full), or it did not answer in time."""

    status_code = 503


class AnswerTimeoutError(ServerUnavailableError):
    """No answer within the client's timeout: not retried (the request may still be running)."""


def classify(error) -> PlateformeError:
    """A tritonclient / gRPC error as the PlateformeError its status calls for."""
    message = error.message() if callable(getattr(error, "message", None)) else None
    if message is None and callable(getattr(error, "details", None)):  # grpc.RpcError
        message = error.details()
    message = message or str(error)
    status = error.status() if callable(getattr(error, "status", None)) else None
    if status is None and callable(getattr(error, "code", None)):
        status = error.code()
    status = str(status or "")
    if "DEADLINE" in status:
        return AnswerTimeoutError(message or "no answer within the timeout")
    if "UNAVAILABLE" in status:
        return ServerUnavailableError(message or f"Triton is unavailable ({status})")
    if "NOT_FOUND" in status or re.search(r"unknown model|not found", message or "", re.I):
        return ModelNotFoundError(message)
    return _by_message(message)


def _by_status(code: int, message: str) -> PlateformeError:
    if code == 404:
        return ModelNotFoundError(message)
    if code in (502, 503, 504):
        return ServerUnavailableError(message)
    return _by_message(message)


def _by_message(message: str) -> PlateformeError:
    """An error without a usable status: a busy engine's response, whose code the python backend
    and streamed responses do not carry (Triton answers it as 400), says "unavailable"."""
    if "unavailable" in message.lower():
        return ServerUnavailableError(message)
    return InvalidRequestError(message)


# -- requests and answers ---------------------------------------------------------------------
@dataclass
class GenerationChunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk: stop, length, end_id, ...
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


@dataclass
class GenerationParams:
    max_tokens: int | None = 256  # None: the endpoint's default (by default, the rest of the context)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    min_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None

    def tensors(self) -> Tensors:
        """ensemble input name -> ([1, n] array, Triton datatype) for the parameters that are set."""
        values: Tensors = {}
        if self.max_tokens is not None:
            values["max_tokens"] = (np.array([[self.max_tokens]], dtype=np.int32), "INT32")
        top_p = self.top_p
        if top_p is None and self.top_k is None and (self.temperature or 0) > 0:
            # Mistral's API samples (top_p 1) when only a temperature is given; the engine, like
            # TensorRT-LLM, decodes greedily when neither top_k nor top_p is set.
            top_p = 1.0
        scalars = {"temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
                   "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64),
                   "min_tokens": ("INT32", np.int32), "presence_penalty": ("FP32", np.float32),
                   "frequency_penalty": ("FP32", np.float32), "repetition_penalty": ("FP32", np.float32)}
        for name, (datatype, dtype) in scalars.items():
            value = top_p if name == "top_p" else getattr(self, name)
            if value is not None:
                values[name] = (np.array([[value]], dtype=dtype), datatype)
        if self.stop:
            values["stop_words"] = (np.array([[_utf8(w, "a stop word") for w in self.stop]], dtype=object), "BYTES")
        return values


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate, as JSON's "\ud800" decodes to
        raise InvalidRequestError(f"{what} is not valid Unicode text ({exc.reason} at {exc.start})") from None


def chat_tensors(params: GenerationParams | None = None, prompt: str | None = None,
                 messages_json: str | None = None, stream: bool = False) -> Tensors:
    """The ensemble inputs of one request: raw text or a Mistral-API `messages` request."""
    if (prompt is None) == (messages_json is None):
        raise ValueError("give exactly one of prompt or messages")
    inputs = (params or GenerationParams()).tensors()
    if prompt is not None:
        inputs["text_input"] = (np.array([[_utf8(prompt, "the prompt")]], dtype=object), "BYTES")
    else:
        inputs["messages"] = (np.array([[messages_json.encode()]], dtype=object), "BYTES")
    inputs["stream"] = (np.array([[stream]], dtype=bool), "BOOL")
    return inputs


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


def _json_body(inputs: Tensors) -> dict:
    """Ensemble inputs as the JSON body of Triton's generate extension."""
    body = {}
    for name, (array, _) in inputs.items():
        values = [v.decode() if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
        body[name] = values if name == "stop_words" else values[0]
    return body


def join_chunks(chunks) -> GenerationChunk:
    parts = list(chunks)
    last = parts[-1] if parts else GenerationChunk("")
    return GenerationChunk("".join(p.text for p in parts), last.finish_reason, last.num_input_tokens,
                           last.num_output_tokens)


class _TransportSettings:
    """Where and how both transports reach Triton, and how long they wait between retries."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0,
                 retries: int = 2, retry_backoff: float = 0.2):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.protocol = protocol
        self.url = triton_address(url, protocol)
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff = retry_backoff

    def _retry_delay(self, attempt: int) -> float:
        return self.retry_backoff * 2 ** attempt

    def _tries_again(self, error: Exception, attempt: int) -> bool:
        """Whether attempt `attempt` (from 0) is followed by another: while Triton is unavailable,
        never after a timeout (the request may still be running there)."""
        return (isinstance(error, ServerUnavailableError) and not isinstance(error, AnswerTimeoutError)
                and attempt < self.retries)


# -- sync transport ----------------------------------------------------------------------------
class Transport(_TransportSettings):
    """Streams ensemble requests to Triton from threads (tritonclient), errors classified by status.

    gRPC clients are pooled: one stream per client at a time, but the channel (a TCP connection)
    outlives the request, which saves its set-up on every call.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pool: list = []
        self._lock = threading.Lock()

    def generate(self, model: str, inputs: Tensors, stream: bool) -> Iterator[GenerationChunk]:
        """Chunks of one request; retried while the server is unavailable and nothing was yielded.
        Closing the iterator early cancels the request in Triton (gRPC)."""
        for attempt in range(self.retries + 1):
            started = False
            try:
                chunks = self._grpc(model, inputs) if self.protocol == "grpc" else self._http(model, inputs, stream)
                for chunk in chunks:
                    started = True
                    yield chunk
                return
            except ServerUnavailableError as exc:
                if started or not self._tries_again(exc, attempt):
                    raise
                time.sleep(self._retry_delay(attempt))

    def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        if not texts:
            raise InvalidRequestError("input must not be empty")
        array = np.array([[_utf8(t, "an input")] for t in texts], dtype=object)
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException

        for attempt in range(self.retries + 1):
            client = self._client() if self.protocol == "grpc" else module.InferenceServerClient(self.url)
            tensor = module.InferInput("text_input", list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            try:
                result = client.infer(model, [tensor], client_timeout=self.timeout) if self.protocol == "grpc" \
                    else client.infer(model, [tensor])
                break
            except (InferenceServerException, OSError) as exc:
                error = classify(exc) if isinstance(exc, InferenceServerException) else \
                    ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc}")
                if not self._tries_again(error, attempt):
                    raise error from None
                time.sleep(self._retry_delay(attempt))
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

    def _grpc(self, model: str, inputs: Tensors) -> Iterator[GenerationChunk]:
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
            # No deadline on the stream: `timeout` bounds the wait for each response (below).
            client.start_stream(callback=lambda result, error: results.put((result, error)))
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
                    raise AnswerTimeoutError(f"no response from {model} within {self.timeout:g} s") from None
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

    def _http(self, model: str, inputs: Tensors, stream: bool) -> Iterator[GenerationChunk]:
        import urllib.error
        import urllib.request

        route = "generate_stream" if stream else "generate"
        request = urllib.request.Request(f"http://{self.url}/v2/models/{model}/{route}",
                                         data=json.dumps(_json_body(inputs)).encode(),
                                         headers={"Content-Type": "application/json"})
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
                            raise _by_message(payload["error"])
                        yield _chunk_from_json(payload)
        except urllib.error.HTTPError as exc:
            raise _by_status(exc.code, _http_error_message(exc.read())) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc}") from None


def _http_error_message(body: bytes) -> str:
    """The message of an error body: JSON, or an event stream's `data: {...}` (generate_stream)."""
    text = body.decode(errors="replace").strip()
    try:
        return json.loads(text.removeprefix("data:")).get("error") or text
    except (ValueError, AttributeError):
        return text


# -- asyncio transport ---------------------------------------------------------------------------
def _infer_request(model: str, inputs: Tensors, streamed: bool, request_id: str | None = None):
    """A ModelInferRequest of Triton's gRPC service (what tritonclient builds, without its wrappers)."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model, id=request_id or uuid.uuid4().hex)
    for name, (array, datatype) in inputs.items():
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(array.shape)
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    if streamed:
        # Decoupled models may end with a flag and no response: ask Triton for an empty final one.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def _stream_response(response) -> tuple[GenerationChunk | None, bool]:
    """A ModelStreamInfer response as (its chunk, or None without outputs; whether it is the
    request's last); an error response raises the PlateformeError it calls for."""
    from tritonclient.grpc import InferResult
    from tritonclient.utils import InferenceServerException

    if response.error_message:
        raise classify(InferenceServerException(msg=response.error_message))
    infer = response.infer_response
    chunk = _chunk(InferResult(infer).as_numpy) if infer.outputs else None
    final = infer.parameters.get("triton_final_response")
    return chunk, final is not None and final.bool_param


class _SharedStream:
    """One ModelStreamInfer RPC carrying many requests, their responses told apart by request id:
    no stream set-up per request. A request on it cannot be cancelled alone (gRPC cancels whole
    streams), so only whole answers (`complete`) use it. Idle for `IDLE_CLOSE_S`, it closes its
    sending side: Triton's graceful shutdown waits for every open stream to end."""

    IDLE_CLOSE_S = 1.0

    def __init__(self, stub, url: str):
        self.url = url
        self.broken: PlateformeError | None = None  # set once the stream can take no more requests
        self._call = stub.ModelStreamInfer()
        self._write_lock = asyncio.Lock()  # grpc.aio takes one write at a time
        self._pending: dict[str, asyncio.Queue] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.Future | None = None
        self._reader = asyncio.create_task(self._read())

    def _close_when_idle(self) -> None:
        self._idle_timer = None
        if not self._pending and self.broken is None:
            self.broken = ServerUnavailableError("the shared stream closed when idle")
            self._closing = asyncio.ensure_future(self._done_writing())  # held: tasks are weakly referenced

    async def _done_writing(self) -> None:
        import grpc

        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            async with self._write_lock:
                await self._call.done_writing()

    async def _read(self) -> None:
        import grpc

        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise ServerUnavailableError(f"Triton at {self.url} closed the shared stream")
                answer = self._pending.get(response.infer_response.id)
                if answer is not None:
                    answer.put_nowait(response)
        except grpc.RpcError as exc:
            self._fail(self._ended(exc))
        except PlateformeError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ServerUnavailableError("the shared stream was closed"))
            raise

    def _ended(self, exc) -> ServerUnavailableError:
        # Whatever its status (a server shutting down ends it as INTERNAL), the stream is gone and
        # its requests unanswered: unavailable, to be retried on a new stream.
        return ServerUnavailableError(f"the stream to Triton at {self.url} ended: {exc.details() or exc.code().name}")

    def _fail(self, error: PlateformeError) -> None:
        self.broken = error
        for answer in self._pending.values():
            answer.put_nowait(error)

    async def request(self, model: str, inputs: Tensors, timeout: float,
                      request_id: str | None = None) -> list[GenerationChunk]:
        """Every chunk of one request, up to its final response."""
        import grpc

        if self.broken is not None:
            raise self.broken
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        request = _infer_request(model, inputs, streamed=True, request_id=request_id)
        answer: asyncio.Queue = asyncio.Queue()
        self._pending[request.id] = answer
        chunks = []
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    await self._call.write(request)
                while True:
                    response = await answer.get()
                    if isinstance(response, PlateformeError):
                        raise response
                    chunk, final = _stream_response(response)
                    if chunk is not None:
                        chunks.append(chunk)
                    if final:
                        return chunks
        except TimeoutError:
            # The request runs on in Triton, its responses dropped, unless the caller stops it (complete).
            raise AnswerTimeoutError(f"no answer from {model} within {timeout:g} s") from None
        except grpc.RpcError as exc:  # the RPC ended: so did the stream
            self.broken = self.broken or self._ended(exc)
            raise self.broken from None
        finally:
            del self._pending[request.id]
            if not self._pending and self.broken is None:
                self._idle_timer = asyncio.get_running_loop().call_later(self.IDLE_CLOSE_S, self._close_when_idle)

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class AsyncTransport(_TransportSettings):
    """The asyncio twin of `Transport`: one gRPC channel (grpc.aio, Triton's service stubs) or one
    aiohttp session per event loop, reused by every request. Leaving a `generate` iteration early
    (break, aclose, task cancellation) cancels the request in Triton. Over gRPC, `complete` sends
    its requests on one shared stream (see `_SharedStream`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop = None
        self._channel = self._stub = self._session = self._shared = None
        self._stopping: set[asyncio.Future] = set()

    def _connect(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # channels and sessions belong to the loop that made them
            self._loop, self._channel, self._stub, self._session, self._shared = loop, None, None, None, None
            if self.protocol == "grpc":
                import grpc
                from tritonclient.grpc import service_pb2_grpc
                from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE

                self._channel = grpc.aio.insecure_channel(self.url, options=[
                    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                    # gRPC's default waits up to 2 minutes between reconnections: a long-lived
                    # channel would stay failed that long after Triton comes back.
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)])
                self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
            else:
                import aiohttp

                # Each read waits at most `timeout`, however long a stream lasts.
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout, sock_read=self.timeout))
        return self._stub if self.protocol == "grpc" else self._session

    async def generate(self, model: str, inputs: Tensors, stream: bool) -> AsyncIterator[GenerationChunk]:
        """Chunks of one request; retried while the server is unavailable and nothing was yielded."""
        for attempt in range(self.retries + 1):
            started = False
            chunks = self._grpc(model, inputs) if self.protocol == "grpc" else self._http(model, inputs, stream)
            try:
                async for chunk in chunks:
                    started = True
                    yield chunk
                return
            except ServerUnavailableError as exc:
                if started or not self._tries_again(exc, attempt):
                    raise
            finally:
                await chunks.aclose()
            await asyncio.sleep(self._retry_delay(attempt))

    async def complete(self, model: str, inputs: Tensors, stop_model: str | None = None) -> GenerationChunk:
        """The whole answer of one request; retried while the server is unavailable. Over gRPC, a
        call cancelled or timed out stops the request in `stop_model` (the endpoint's engine model),
        which a request on the shared stream needs: it cannot be cancelled alone."""
        if self.protocol != "grpc":
            return join_chunks([chunk async for chunk in self.generate(model, inputs, stream=False)])

        async def on_shared_stream():
            stub = self._connect()
            if self._shared is None or self._shared.broken is not None:
                self._shared = _SharedStream(stub, self.url)
            request_id = uuid.uuid4().hex
            try:
                return join_chunks(await self._shared.request(model, inputs, self.timeout, request_id))
            except (asyncio.CancelledError, AnswerTimeoutError):
                if stop_model:
                    stopping = asyncio.ensure_future(self.stop(stop_model, request_id))
                    self._stopping.add(stopping)  # held until done: tasks are weakly referenced
                    stopping.add_done_callback(self._stopping.discard)
                raise

        return await self._retried(on_shared_stream)

    async def stop(self, engine_model: str, request_id: str) -> None:
        """tensorrtllm's `stop` input: ends the running request `request_id` of `engine_model` (gRPC)."""
        import grpc

        ones = np.ones((1, 1), dtype=np.int32)
        inputs = {"input_ids": (ones, "INT32"), "input_lengths": (ones, "INT32"), "request_output_len": (ones, "INT32"),
                  "stop": (np.ones((1, 1), dtype=bool), "BOOL")}
        call = self._connect().ModelStreamInfer()
        try:
            async with asyncio.timeout(self.timeout):
                await call.write(_infer_request(engine_model, inputs, streamed=True, request_id=request_id))
                await call.done_writing()
                await call.read()  # the engine answers a stop with an empty final response
        except (grpc.RpcError, TimeoutError):
            pass  # best effort: the request then runs to its end
        finally:
            call.cancel()

    async def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        if not texts:
            raise InvalidRequestError("input must not be empty")
        array = np.array([[_utf8(t, "an input")] for t in texts], dtype=object)
        if self.protocol == "grpc":
            return await self._retried(lambda: self._grpc_infer(model, {"text_input": (array, "BYTES")}))
        return await self._retried(lambda: self._http_infer(model, texts))

    async def _retried(self, call):
        """`await call()`, called again while Triton is unavailable (see `_tries_again`)."""
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except ServerUnavailableError as exc:
                if not self._tries_again(exc, attempt):
                    raise
            await asyncio.sleep(self._retry_delay(attempt))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        channel, session, shared = self._channel, self._session, self._shared
        self._loop = self._channel = self._stub = self._session = self._shared = None
        if shared is not None:
            await shared.close()
        if channel is not None:
            await channel.close()
        if session is not None:
            await session.close()

    async def _grpc(self, model: str, inputs: Tensors) -> AsyncIterator[GenerationChunk]:
        import grpc

        # No deadline on the call: `timeout` bounds the wait for each response, not a long stream.
        call = self._connect().ModelStreamInfer()
        finished = False
        try:
            await call.write(_infer_request(model, inputs, streamed=True))
            # One request per stream: closing the sending side now lets Triton end the RPC with the
            # last response (no closing exchange afterwards); responses still come.
            await call.done_writing()
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        response = await call.read()
                except TimeoutError:
                    raise AnswerTimeoutError(f"no response from {model} within {self.timeout:g} s") from None
                if response is grpc.aio.EOF:
                    raise ServerUnavailableError(f"the stream of {model} ended without a final response")
                chunk, finished = _stream_response(response)
                if chunk is not None:
                    yield chunk
                if finished:
                    return
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.url) from None
        finally:
            # Cancelling the RPC with the request still running cancels it on the server.
            if not finished:
                call.cancel()

    async def _grpc_infer(self, model: str, inputs: Tensors) -> tuple[np.ndarray, list[int]]:
        import grpc
        from tritonclient.grpc import InferResult

        try:
            response = await self._connect().ModelInfer(_infer_request(model, inputs, streamed=False),
                                                        timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.url) from None
        result = InferResult(response)
        return result.as_numpy("embedding"), result.as_numpy("num_input_tokens").reshape(-1).tolist()

    async def _http(self, model: str, inputs: Tensors, stream: bool) -> AsyncIterator[GenerationChunk]:
        import aiohttp

        route = "generate_stream" if stream else "generate"
        try:
            async with self._connect().post(f"http://{self.url}/v2/models/{model}/{route}",
                                            json=_json_body(inputs)) as response:
                if response.status >= 400:
                    raise _by_status(response.status, _http_error_message(await response.read()))
                if not stream:
                    yield _chunk_from_json(json.loads(await response.read()))
                    return
                async for line in response.content:
                    line = line.strip()
                    if line.startswith(b"data:"):
                        payload = json.loads(line[5:])
                        if "error" in payload:
                            raise _by_message(payload["error"])
                        yield _chunk_from_json(payload)
        except aiohttp.SocketTimeoutError:
            raise AnswerTimeoutError(f"no response from {model} within {self.timeout:g} s") from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc!r}") from None

    async def _http_infer(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        import aiohttp

        body = {"inputs": [{"name": "text_input", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}]}
        try:
            async with self._connect().post(f"http://{self.url}/v2/models/{model}/infer", json=body) as response:
                payload = await response.read()
                if response.status >= 400:
                    raise _by_status(response.status, _http_error_message(payload))
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise ServerUnavailableError(f"Triton at {self.url} is unreachable: {exc!r}") from None
        outputs = {o["name"]: o for o in json.loads(payload)["outputs"]}
        vectors = np.array(outputs["embedding"]["data"], dtype=np.float32).reshape(outputs["embedding"]["shape"])
        return vectors, [int(c) for c in outputs["num_input_tokens"]["data"]]


def _rpc_error(exc, url: str) -> PlateformeError:
    import grpc

    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AnswerTimeoutError(f"Triton at {url}: no answer within the timeout ({exc.details() or 'deadline'})")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"Triton at {url}: {exc.details() or exc.code().name}")
    return classify(exc)


# -- plain calls (CLI, demo) ---------------------------------------------------------------------
class TritonEndpoints:
    """Chat and embedding calls against one Triton server, over `Transport`."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0):
        self.transport = Transport(url, protocol, timeout)
        self.protocol, self.url, self.timeout = self.transport.protocol, self.transport.url, timeout

    def generate(self, model: str, prompt: str | None = None, messages: list[dict] | None = None,
                 params: GenerationParams | None = None, stream: bool = False) -> Iterator[GenerationChunk]:
        """Yield the answer's chunks (one chunk when `stream` is False)."""
        messages_json = None if messages is None else json.dumps({"messages": messages})
        inputs = chat_tensors(params, prompt, messages_json, stream)
        return self.transport.generate(model, inputs, stream)

    def complete(self, model: str, prompt: str | None = None, messages: list[dict] | None = None,
                 params: GenerationParams | None = None) -> GenerationChunk:
        return join_chunks(self.generate(model, prompt, messages, params, stream=False))

    def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(vectors [n, dim], token counts) for `texts`."""
        return self.transport.embed(model, texts)
