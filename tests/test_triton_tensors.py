"""TensorCache (python_backend/triton/tensors.py): which output tensors are made once and reused.

The module runs inside Triton's python-backend stub; here its `triton_python_backend_utils` is a
stand-in whose Tensor records what it was made from. The cached tensors going out in real
responses are covered through the server (test_inflight.py, test_pipeline.py)."""
from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest


class _Tensor:
    made = 0

    def __init__(self, name, array):
        self.name, self.array = name, array
        _Tensor.made += 1


@pytest.fixture
def tensors(monkeypatch):
    stand_in = types.ModuleType("triton_python_backend_utils")
    stand_in.Tensor = _Tensor
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in)
    monkeypatch.delitem(sys.modules, "plateforme.python_backend.triton.tensors", raising=False)
    _Tensor.made = 0
    yield importlib.import_module("plateforme.python_backend.triton.tensors")
    sys.modules.pop("plateforme.python_backend.triton.tensors", None)


def _column(value):
    return lambda: np.array([[value]], dtype=np.int32)


def test_a_value_seen_before_reuses_its_tensor_and_a_new_value_gets_its_own(tensors):
    cache = tensors.TensorCache()
    first = cache.tensor("sequence_length", 1, _column(1))
    assert cache.tensor("sequence_length", 1, _column(1)) is first
    other = cache.tensor("sequence_length", 2, _column(2))
    same_key_other_name = cache.tensor("num_output_tokens", 1, _column(1))
    assert other is not first and same_key_other_name is not first
    assert (other.name, other.array.tolist()) == ("sequence_length", [[2]])
    assert same_key_other_name.name == "num_output_tokens"
    assert _Tensor.made == 3


def test_an_uncached_value_is_made_every_time(tensors):
    cache = tensors.TensorCache()
    tensors_made = [cache.tensor("output_ids", None, _column(7)) for _ in range(3)]
    assert len({id(tensor) for tensor in tensors_made}) == 3
    assert _Tensor.made == 3


def test_a_full_cache_is_emptied_and_keeps_answering_with_the_right_values(tensors):
    cache = tensors.TensorCache(max_entries=4)
    made = {value: cache.tensor("num_input_tokens", value, _column(value)) for value in range(4)}
    fifth = cache.tensor("num_input_tokens", 4, _column(4))  # the cache was full: emptied first
    assert fifth.array.tolist() == [[4]]
    again = cache.tensor("num_input_tokens", 0, _column(0))
    assert again is not made[0] and again.array.tolist() == [[0]]
    assert cache.tensor("num_input_tokens", 4, _column(4)) is fifth
    assert _Tensor.made == 6
