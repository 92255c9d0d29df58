"""Reading request tensors and building responses inside Triton python models.

Only imported inside the python-backend stub, where `triton_python_backend_utils` exists.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from plateforme.python_backend.errors import EngineBusy


class InputError(ValueError):
    """A client mistake: answered with INVALID_ARG (HTTP 400), the server stays healthy."""


def model_parameters(args: dict) -> dict[str, str]:
    """`parameters` of config.pbtxt as plain strings; unfilled `${...}` placeholders count as unset."""
    config = json.loads(args["model_config"])
    values = {}
    for key, entry in config.get("parameters", {}).items():
        value = entry.get("string_value", "")
        if value and not value.startswith("${"):
            values[key] = value
    return values


def int_parameter(params: dict[str, str], key: str, default: int) -> int:
    raw = params.get(key, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"config parameter {key}={raw!r} is not an integer") from None


def bool_parameter(params: dict[str, str], key: str, default: bool) -> bool:
    raw = params.get(key, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise ValueError(f"config parameter {key}={raw!r} is not true/false")


def input_arrays(request) -> dict[str, np.ndarray]:
    """A request's inputs by name. Every lookup by name walks the request's whole input list
    across the C++ boundary, so a model reading many inputs takes them all at once with this."""
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def optional_array(request, name: str) -> np.ndarray | None:
    """Input `name` of a request (or of its `input_arrays` dict), None when absent."""
    if isinstance(request, dict):
        return request.get(name)
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def batch_size(request, required: str) -> int:
    array = optional_array(request, required)
    return 1 if array is None else array.shape[0]


def scalar(request, name: str, row: int, cast: Callable[[Any], Any], default=None):
    """Row `row` of a [batch, 1] input, or `default` when the input is absent."""
    array = optional_array(request, name)
    if array is None:
        return default
    if array.ndim == 0 or array.shape[0] <= row:
        raise InputError(f"input {name} has shape {list(array.shape)}; expected [batch, 1]")
    value = array[row].reshape(-1)
    if value.size != 1:
        raise InputError(f"input {name} must hold one value per request, got {value.size}")
    return cast(value[0])


def text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("string input is not valid UTF-8") from None
    return str(value)


def strings(request, name: str, row: int) -> list[str]:
    """Row `row` of a [batch, n] STRING input as a list (empty when absent)."""
    array = optional_array(request, name)
    if array is None:
        return []
    return [text(item) for item in np.asarray(array[row]).reshape(-1) if text(item) != ""]


def word_list(words: list[list[int]]) -> np.ndarray:
    """tensorrtllm's [2, n] word-list layout: flat ids, then cumulative end offsets padded with -1."""
    flat = [token for word in words for token in word]
    offsets = np.cumsum([len(word) for word in words]).tolist()
    width = max(len(flat), 1)
    out = np.full((2, width), -1, dtype=np.int32)
    if flat:
        out[0, : len(flat)] = flat
        out[1, : len(offsets)] = offsets
    else:
        out[0, 0] = 0
    return out


def parse_word_list(array: np.ndarray | None) -> list[list[int]]:
    """Inverse of `word_list` for one request ([2, n])."""
    if array is None or array.size == 0:
        return []
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] != 2:
        raise InputError(f"word list must have shape [2, n], got {list(array.shape)}")
    flat, offsets = array[0].tolist(), [o for o in array[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if end <= start or end > len(flat):
            raise InputError(f"word list offsets {offsets} are not increasing within {len(flat)} ids")
        words.append(flat[start:end])
        start = end
    return words


def error_response(exc: BaseException) -> "pb_utils.InferenceResponse":
    """Client mistakes (ValueError) -> INVALID_ARG; a busy engine -> UNAVAILABLE, and said in the
    message: the code is lost on a decoupled model's responses (Triton answers 400), and plateforme's
    clients and gateway read "unavailable" in the message as 503, to retry later."""
    message = str(exc)
    if isinstance(exc, ValueError):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(exc, EngineBusy):
        code, message = pb_utils.TritonError.UNAVAILABLE, f"unavailable, retry later: {exc}"
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def stop_engine_request(engine_model: str, engine_request_id: str) -> None:
    """Stop a running request of the engine model (tensorrtllm's `stop` input, naming it by its
    `engine_request_id`), freeing its slot; returns once the engine has taken the stop."""
    inputs = [
        pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
        pb_utils.Tensor("input_lengths", np.ones((1, 1), dtype=np.int32)),
        pb_utils.Tensor("request_output_len", np.ones((1, 1), dtype=np.int32)),
        pb_utils.Tensor("stop", np.ones((1, 1), dtype=bool)),
    ]
    stop = pb_utils.InferenceRequest(model_name=engine_model, inputs=inputs, request_id=engine_request_id,
                                     requested_output_names=[])
    for _ in stop.exec(decoupled=True):  # the engine answers a stop with an empty final response
        pass


def string_tensor(name: str, values) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array(values, dtype=object))


class TensorCache:
    """Output tensors for values that come back response after response (a length, a count, an end id,
    an empty word list), made once. Making a pb_utils.Tensor costs far more than what it holds: its
    dtype is found by comparing the array's with each numpy type in turn, and right after a model
    step has emptied the CPU caches a tensor took ~20 us to make (~0.2 ms for an engine response).
    A tensor is copied into the stub's shared memory once, by the first response that carries it,
    and the server copies it out of there for each response: one tensor can go out in any number
    of responses. Emptied when full: values that never come back take one entry each until then."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._tensors: dict[tuple, object] = {}

    def tensor(self, name: str, key, make: Callable[[], np.ndarray]) -> "pb_utils.Tensor":
        """Output `name` holding `make()`, a value `key` identifies (None: not cached)."""
        if key is None:
            return pb_utils.Tensor(name, make())
        tensor = self._tensors.get((name, key))
        if tensor is None:
            if len(self._tensors) >= self.max_entries:
                self._tensors.clear()
            tensor = self._tensors[(name, key)] = pb_utils.Tensor(name, make())
        return tensor
