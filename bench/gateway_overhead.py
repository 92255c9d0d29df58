"""P2 gateway overhead: `POST /v1/chat/completions` through the gateway vs a direct tritonclient
gRPC call, for the same 1-token chat request.

    python bench/gateway_overhead.py [--requests 200] [--model tiny|smollm2]

Starts a tritonserver, then `plateforme gateway` as its own process (as a user runs it), and
alternates the calls from this process; the added time is the median of the per-pair differences
(gateway - direct), next to the p50s. A second baseline calls the gateway's own transport
(AsyncTransport, grpc.aio) directly, which isolates HTTP + FastAPI + request mapping. `--model tiny` (default) serves a tiny random
Mistral (v3 tokenizer) so that the engine's time does not drown the gateway's; `smollm2` serves the
demo model (~130 ms per call on 2 cores). Appends the figures to bench/RESULTS.md, "Gateway overhead".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import record  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hi"}]
COMMAND = "python bench/gateway_overhead.py --record"


def direct_call(client, tensors, results: queue.Queue) -> float:
    """One streamed gRPC request to the ensemble, as the gateway sends it; seconds to the final response."""
    start = time.perf_counter()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("mistral-tiny", tensors, request_id=uuid.uuid4().hex, enable_empty_final_response=True)
    while True:
        result, error = results.get(timeout=60)
        if error is not None:
            raise RuntimeError(error)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    # The answer is complete here; closing the stream (which waits for Triton to end the RPC) is not counted.
    elapsed = time.perf_counter() - start
    client.stop_stream()
    return elapsed


def start_gateway(triton_grpc_url: str, port: int, log) -> subprocess.Popen:
    import urllib.request

    process = subprocess.Popen([sys.executable, "-m", "plateforme.cli", "gateway", "--triton-url", triton_grpc_url,
                                "--port", str(port)], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx2 as httpx
    import tritonclient.grpc as grpcclient

    from plateforme.builders.repository import ChatEndpoint, render_repository
    from plateforme.server import ServerConfig, TritonServer, free_port
    from plateforme.clients.triton_client import AsyncTransport, GenerationParams, chat_tensors

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            from plateforme.builders.tiny import TinySpec, make_tiny_checkpoint

            checkpoint, described = make_tiny_checkpoint(Path(tmp) / "tiny", TinySpec("mistral", "v3")), \
                "tiny random Mistral (hidden 64, 2 layers, v3 tokenizer), float32"
        else:
            from plateforme.builders.assets import prepare_assets

            checkpoint, described = prepare_assets(progress=False)["smollm2-mistral"], "SmolLM2-135M-Instruct demo weights"
        repository = render_repository(Path(tmp) / "models", [ChatEndpoint("mistral-tiny", checkpoint, dtype="float32",
                                                                           max_batch_size=4)])
        config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with TritonServer(config) as triton, open(Path(tmp) / "gateway.log", "w") as log:
            port = free_port()
            gateway = start_gateway(triton.grpc_url, port, log)
            try:
                http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
                grpc = grpcclient.InferenceServerClient(triton.grpc_url)
                tensors = []
                inputs = chat_tensors(GenerationParams(max_tokens=1), messages_json=json.dumps({"messages": MESSAGES}))
                for name, (array, datatype) in inputs.items():
                    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
                    tensor.set_data_from_numpy(array)
                    tensors.append(tensor)
                results: queue.Queue = queue.Queue()
                # Second baseline: the gateway's own transport (grpc.aio, one channel) called directly.
                loop = asyncio.new_event_loop()
                transport = AsyncTransport(triton.grpc_url)

                def via_async_transport() -> float:
                    start = time.perf_counter()
                    chunk = loop.run_until_complete(transport.complete("mistral-tiny", inputs))
                    elapsed = time.perf_counter() - start
                    assert chunk.num_output_tokens == 1
                    return elapsed

                body = {"model": "mistral-tiny", "messages": MESSAGES, "max_tokens": 1}

                def via_gateway() -> float:
                    start = time.perf_counter()
                    response = http.post("/v1/chat/completions", json=body)
                    elapsed = time.perf_counter() - start
                    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1
                    return elapsed

                calls = {"direct": lambda: direct_call(grpc, tensors, results), "gateway": via_gateway,
                         "aio": via_async_transport}
                for _ in range(20):  # warm-up: connections, the registry, the engine
                    for call in calls.values():
                        call()
                times: dict[str, list[float]] = {name: [] for name in calls}
                order = list(calls)
                for i in range(args.requests):  # interleaved, in a rotating order
                    for name in order[i % len(order):] + order[:i % len(order)]:
                        times[name].append(calls[name]())
                direct, through, aio = times["direct"], times["gateway"], times.get("aio")
                grpc.close()
                loop.run_until_complete(transport.close())
                loop.close()
            finally:
                gateway.terminate()
                gateway.wait(10)

    def ms(values, q):
        return statistics.quantiles(values, n=100)[q - 1] * 1e3 if q != 50 else statistics.median(values) * 1e3

    paired = [t - d for t, d in zip(through, direct)]
    load = os.getloadavg()
    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} at the end of the run; Python {platform.python_version()}; client, gateway (own process, "
        f"`plateforme gateway`) and tritonserver on the same machine",
        f"- request: mistral-tiny = {described}, messages [user: 'Hi'], max_tokens 1, not streamed; "
        f"{args.requests} of each, interleaved, after 20 warm-up rounds",
        f"- direct tritonclient gRPC (streaming RPC, one client reused): p50 {ms(direct, 50):.2f} ms, "
        f"p99 {ms(direct, 99):.2f} ms",
        f"- gateway POST /v1/chat/completions (httpx, keep-alive): p50 {ms(through, 50):.2f} ms, "
        f"p99 {ms(through, 99):.2f} ms",
        f"- P2 gateway overhead: p50 difference {ms(through, 50) - ms(direct, 50):.2f} ms, median of per-pair "
        f"differences {statistics.median(paired) * 1e3:.2f} ms (goal <= 2 ms)",
    ]
    if aio:
        paired_aio = [t - d for t, d in zip(through, aio)]
        lines += [f"- direct AsyncTransport (the gateway's grpc.aio transport, one channel, in this process): p50 "
                  f"{ms(aio, 50):.2f} ms; gateway minus it (HTTP + FastAPI + request mapping): p50 difference "
                  f"{ms(through, 50) - ms(aio, 50):.2f} ms, median of per-pair differences "
                  f"{statistics.median(paired_aio) * 1e3:.2f} ms"]
    if args.record:
        record("## Gateway overhead", COMMAND, time.strftime("### %Y-%m-%d %H:%M"), lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
