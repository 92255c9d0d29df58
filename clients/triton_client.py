"""Call plateforme endpoints on a Triton server over gRPC (default) or HTTP.

Chat endpoints are decoupled (they stream), so over gRPC every call uses the streaming RPC and
over HTTP the `generate` / `generate_stream` extension; plain `infer` is refused by Triton for
decoupled models. This module talks to Triton over the wire only: no torch, no models.
"""
from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

DEFAULT_GRPC_URL = "127.0.0.1:8001"
DEFAULT_HTTP_URL = "127.0.0.1:8000"


class EndpointError(RuntimeError):
    """The server answered with an error (bad input, unknown model, ...)."""


@dataclass
class GenerationChunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk: stop, length, end_id, ...
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    min_tokens: int | None = None

    def tensors(self) -> dict[str, tuple[np.ndarray, str]]:
        """ensemble input name -> ([1, n] array, Triton datatype) for the parameters that are set."""
        values: dict[str, tuple[np.ndarray, str]] = {
            "max_tokens": (np.array([[self.max_tokens]], dtype=np.int32), "INT32"),
        }
        scalars = {"temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
                   "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64),
                   "min_tokens": ("INT32", np.int32)}
        for name, (datatype, dtype) in scalars.items():
            value = getattr(self, name)
            if value is not None:
                values[name] = (np.array([[value]], dtype=dtype), datatype)
        if self.stop:
            values["stop_words"] = (np.array([[w.encode() for w in self.stop]], dtype=object), "BYTES")
        return values


class TritonEndpoints:
    """Chat and embedding calls against one Triton server."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = 300.0):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.protocol = protocol
        self.url = url or (DEFAULT_GRPC_URL if protocol == "grpc" else DEFAULT_HTTP_URL)
        self.timeout = timeout

    # -- chat ----------------------------------------------------------------------------
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        params: GenerationParams | None = None,
        stream: bool = False,
    ) -> Iterator[GenerationChunk]:
        """Yield the answer's chunks (one chunk when `stream` is False)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        inputs = (params or GenerationParams()).tensors()
        if prompt is not None:
            inputs["text_input"] = (np.array([[prompt.encode()]], dtype=object), "BYTES")
        else:
            inputs["messages"] = (np.array([[json.dumps({"messages": messages}).encode()]], dtype=object), "BYTES")
        inputs["stream"] = (np.array([[stream]], dtype=bool), "BOOL")
        if self.protocol == "grpc":
            yield from self._grpc_stream(model, inputs)
        else:
            yield from self._http_generate(model, inputs, stream)

    def complete(self, model: str, prompt: str | None = None, messages: list[dict] | None = None,
                 params: GenerationParams | None = None) -> GenerationChunk:
        chunks = list(self.generate(model, prompt, messages, params, stream=False))
        return GenerationChunk(
            text="".join(c.text for c in chunks),
            finish_reason=chunks[-1].finish_reason if chunks else None,
            num_input_tokens=chunks[-1].num_input_tokens if chunks else None,
            num_output_tokens=chunks[-1].num_output_tokens if chunks else None,
        )

    def _grpc_stream(self, model: str, inputs) -> Iterator[GenerationChunk]:
        import tritonclient.grpc as grpcclient

        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        tensors = []
        for name, (array, datatype) in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            stream_timeout=self.timeout)
        finished = False
        try:
            client.async_stream_infer(model, tensors, request_id=uuid.uuid4().hex,
                                      enable_empty_final_response=True)
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise EndpointError(f"no response from {model} within {self.timeout:.0f} s") from None
                if error is not None:
                    raise EndpointError(_message(error))
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    yield _chunk(result.as_numpy)
                if final is not None and final.bool_param:
                    finished = True
                    return
        finally:
            # Closing the stream with a request still running cancels it on the server.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    def _http_generate(self, model: str, inputs, stream: bool) -> Iterator[GenerationChunk]:
        import urllib.error
        import urllib.request

        body = {}
        for name, (array, _) in inputs.items():
            values = [v.decode() if isinstance(v, bytes) else v.item() for v in array.reshape(-1)]
            body[name] = values if name == "stop_words" else values[0]
        route = "generate_stream" if stream else "generate"
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{model}/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
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
                            raise EndpointError(payload["error"])
                        yield _chunk_from_json(payload)
        except urllib.error.HTTPError as exc:
            raise EndpointError(_http_error_message(exc)) from None

    # -- embeddings ------------------------------------------------------------------------
    def embed(self, model: str, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(vectors [n, dim], token counts) for `texts`."""
        if not texts:
            raise ValueError("texts must not be empty")
        array = np.array([[t.encode()] for t in texts], dtype=object)
        if self.protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module
        from tritonclient.utils import InferenceServerException

        client = client_module.InferenceServerClient(self.url)
        tensor = client_module.InferInput("text_input", list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        try:
            result = client.infer(model, [tensor])
        except InferenceServerException as exc:
            raise EndpointError(_message(exc)) from None
        finally:
            client.close()
        return result.as_numpy("embedding"), result.as_numpy("num_input_tokens").reshape(-1).tolist()


def _chunk(as_numpy) -> GenerationChunk:
    def first(name, cast):
        value = as_numpy(name)
        return None if value is None or value.size == 0 else cast(value.reshape(-1)[0])

    text = first("text_output", lambda v: v.decode() if isinstance(v, bytes) else str(v)) or ""
    reason = first("finish_reason", lambda v: v.decode() if isinstance(v, bytes) else str(v))
    return GenerationChunk(text, reason or None, first("num_input_tokens", int), first("num_output_tokens", int))


def _chunk_from_json(payload: dict) -> GenerationChunk:
    def first(value):
        return value[0] if isinstance(value, list) else value

    return GenerationChunk(
        text=first(payload.get("text_output", "")) or "",
        finish_reason=first(payload.get("finish_reason")) or None,
        num_input_tokens=first(payload.get("num_input_tokens")),
        num_output_tokens=first(payload.get("num_output_tokens")),
    )


def _message(error) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return message or str(error)


def _http_error_message(exc) -> str:
    try:
        return json.loads(exc.read()).get("error", str(exc))
    except (ValueError, AttributeError):
        return str(exc)
