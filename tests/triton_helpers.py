"""Calling the endpoints of the test server with tritonclient, as tests need it."""
from __future__ import annotations

import queue
import re
import urllib.request
import uuid

import numpy as np
import tritonclient.grpc as grpcclient

from plateforme.clients.triton_client import EndpointError

def grpc_stream(server, model, inputs: dict, request_id=None, outputs=None):
    """All responses of one streamed gRPC request, as dicts of numpy outputs (`outputs`: the names
    to ask for; all of them when None)."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = []
    for name, array in inputs.items():
        datatype = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                    np.dtype(bool): "BOOL", np.dtype(np.uint64): "UINT64"}[array.dtype]
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(name) for name in outputs]
    client.async_stream_infer(model, tensors, outputs=requested, request_id=request_id or uuid.uuid4().hex,
                              enable_empty_final_response=True)
    responses = []
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise EndpointError(str(error))
            response = result.get_response()
            if response.outputs:
                responses.append({o.name: result.as_numpy(o.name) for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()
        client.close()


def text_of(responses):
    return "".join(r["text_output"].reshape(-1)[0].decode() for r in responses)


def strings(*values):
    return np.array([[v.encode() for v in values]], dtype=object)


def ints(value):
    return np.array([[value]], dtype=np.int32)


def metric(server, name: str, model: str) -> float:
    """The value of one series of Triton's /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.M)
    if match is None:
        raise AssertionError(f"{name} for {model} not on /metrics")
    return float(match.group(1))
