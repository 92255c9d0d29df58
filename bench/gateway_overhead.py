"""P2 gateway overhead: `POST /v1/chat/completions` through the gateway vs a direct tritonclient
gRPC call, for the same 1-token chat request on mistral-tiny (SmolLM2 demo weights).

    python bench/gateway_overhead.py [--requests 50]

Starts a tritonserver on the demo model and the gateway in this process (uvicorn thread), then
alternates the two calls; appends the p50/p99 figures to bench/RESULTS.md, "Gateway overhead".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import record  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hi"}]
COMMAND = "python bench/gateway_overhead.py"


def direct_call(client, results: queue.Queue) -> float:
    """One streamed gRPC request to the ensemble, as the gateway sends it; seconds to the last response."""
    import tritonclient.grpc as grpcclient

    arrays = {"messages": (np.array([[json.dumps({"messages": MESSAGES}).encode()]], dtype=object), "BYTES"),
              "max_tokens": (np.array([[1]], dtype=np.int32), "INT32"),
              "stream": (np.array([[False]], dtype=bool), "BOOL")}
    tensors = []
    for name, (array, datatype) in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    start = time.perf_counter()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("mistral-tiny", tensors, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
    while True:
        result, error = results.get(timeout=60)
        if error is not None:
            raise RuntimeError(error)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx2 as httpx
    import tritonclient.grpc as grpcclient
    import uvicorn

    from plateforme.builders.assets import prepare_assets
    from plateforme.builders.repository import ChatEndpoint, render_repository
    from plateforme.clients.gateway import GatewayConfig, create_app
    from plateforme.server import ServerConfig, TritonServer, free_port

    assets = prepare_assets(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        repository = render_repository(Path(tmp) / "models",
                                       [ChatEndpoint("mistral-tiny", assets["smollm2-mistral"], max_batch_size=4)])
        config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with TritonServer(config) as triton:
            port = free_port()
            gateway = uvicorn.Server(uvicorn.Config(create_app(GatewayConfig(triton.grpc_url)), host="127.0.0.1",
                                                    port=port, log_level="warning"))
            threading.Thread(target=gateway.run, daemon=True).start()
            while not gateway.started:
                time.sleep(0.05)
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            grpc = grpcclient.InferenceServerClient(triton.grpc_url)
            results: queue.Queue = queue.Queue()
            body = {"model": "mistral-tiny", "messages": MESSAGES, "max_tokens": 1}

            def via_gateway() -> float:
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1
                return elapsed

            for _ in range(5):  # warm-up: connections, the registry, the engine
                direct_call(grpc, results), via_gateway()
            direct, through = [], []
            for _ in range(args.requests):
                direct.append(direct_call(grpc, results))
                through.append(via_gateway())
            gateway.should_exit = True
            grpc.close()

    def ms(values, q):
        return statistics.quantiles(values, n=100)[q - 1] * 1e3 if q != 50 else statistics.median(values) * 1e3

    added = ms(through, 50) - ms(direct, 50)
    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}; client, gateway and tritonserver on the same machine",
        "- request: mistral-tiny (SmolLM2-135M-Instruct demo weights), messages [user: 'Hi'], max_tokens 1, "
        f"not streamed; {args.requests} of each, alternating, after 5 warm-up pairs",
        f"- direct tritonclient gRPC (streaming RPC, one client reused): p50 {ms(direct, 50):.2f} ms, "
        f"p99 {ms(direct, 99):.2f} ms",
        f"- gateway POST /v1/chat/completions (httpx, keep-alive): p50 {ms(through, 50):.2f} ms, "
        f"p99 {ms(through, 99):.2f} ms",
        f"- P2 gateway overhead p50: {added:.2f} ms (goal <= 2 ms)",
    ]
    record("## Gateway overhead", COMMAND, time.strftime("### %Y-%m-%d %H:%M"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
