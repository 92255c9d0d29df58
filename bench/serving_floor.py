"""P2's serving overhead against the floor of Triton's python backend on the same machine.

Serves the mistral-tiny endpoint twice on real tritonservers: as rendered (ours), and with the
same config.pbtxt files but stand-in model.py files for preprocessing, engine and postprocessing
that do no work: they answer every request with fixed tensors of the same names and shapes (the
engine from a thread of its own, decoupled, as ours). What the stand-ins cost is what three
python-backend models chained by an ensemble cost here, whatever they compute.

Both servers run at once (an idle one costs nothing); 1-token requests (`text_input` 'Hi',
max_tokens 1, not streamed, one persistent gRPC stream) go to each in turn, in rounds. Ours:
round trip minus the engine's step time for the request (as bench/inflight.py's P2); the floor:
round trip. Figures only: no goal is asserted.

    python bench/serving_floor.py              # 6 rounds of 50 requests on each server
    python bench/serving_floor.py --record     # and append the figures to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from inflight import ENDPOINT, P2_PROMPT, pct, serving_overhead
from plateforme.builders.assets import prepare_assets
from plateforme.builders.repository import ChatEndpoint, render_repository
from plateforme.python_backend.engine import resolve_dtype
from plateforme.server import ServerConfig, TritonServer, free_port
from results import RESULTS, record

SECTION = "## Serving overhead against the python backend's floor"
# The evicting stand-in's step reads as much memory as the demo model's weights (SmolLM2-135M).
DEMO_PARAMETERS = 135_000_000

# Stand-ins: the tensors our models send for a 1-token request, made without any work.
STAND_INS = {
    "preprocessing": '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        column = lambda value: np.array([[value]], dtype=np.int32)
        no_words = np.array([[[0], [-1]]], dtype=np.int32)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_ID", np.array([[1, 22]], dtype=np.int32)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", column(2)), pb_utils.Tensor("REQUEST_OUTPUT_LEN", column(1)),
            pb_utils.Tensor("STOP_WORDS_IDS", no_words), pb_utils.Tensor("BAD_WORDS_IDS", no_words),
            pb_utils.Tensor("OUT_END_ID", column(2)), pb_utils.Tensor("OUT_PAD_ID", column(2)),
        ]) for _ in requests]
''',
    "engine": '''
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUTS = {
    "output_ids": np.array([[[28]]], dtype=np.int32), "sequence_length": np.array([[1]], dtype=np.int32),
    "cum_log_probs": np.zeros((1, 1), dtype=np.float32), "output_log_probs": np.zeros((1, 1, 1), dtype=np.float32),
    "num_input_tokens": np.array([[2]], dtype=np.int32), "num_output_tokens": np.array([[1]], dtype=np.int32),
    "finish_reason": np.array([[b"length"]], dtype=object), "prefix_ids": np.zeros((1, 1, 0), dtype=np.int32),
    "engine_request_id": np.array([[b"0123456789abcdef0123456789abcdef"]], dtype=object),
    "sequence_index": np.zeros((1, 1), dtype=np.int32),
}
SWEEP_BYTES = {sweep_bytes}


class TritonPythonModel:
    def initialize(self, args):
        # The "step": one pass over as many bytes as a model's weights, which leaves the caches as
        # cold as a forward pass does; timed on the engine's own metric, as ours.
        self.memory = np.ones(SWEEP_BYTES // 4, dtype=np.float32)
        self.family = pb_utils.MetricFamily(name="plateforme_engine_step_seconds_total", description="sweep seconds",
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.step_seconds = self.family.Metric(labels={"model": args["model_name"]})
        self.inbox = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def execute(self, requests):
        for request in requests:
            self.inbox.put((request.get_response_sender(), request.requested_output_names()))

    def _loop(self):
        while True:
            sender, wanted = self.inbox.get()
            start = time.perf_counter()
            self.memory.sum()
            swept = time.perf_counter() - start
            tensors = [pb_utils.Tensor(name, value) for name, value in OUTPUTS.items() if not wanted or name in wanted]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.step_seconds.increment(swept)
''',
    "postprocessing": '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", np.array([[b" Hello"]], dtype=object))])
                for _ in requests]
''',
}


def overheads(server: TritonServer, count: int, warmup: int = 0) -> list[float]:
    """Milliseconds per 1-token request on one gRPC stream, minus the engine's step time for it:
    bench/inflight.py's P2 measurement."""
    round_trips, engine_times = asyncio.run(
        serving_overhead(server.grpc_url, server.metrics_url, count, persistent=True, warmup=warmup))
    return [(trip - engine) * 1000 for trip, engine in zip(round_trips, engine_times)]


def stand_in_repository(ours: Path, target: Path, sweep_bytes: int) -> Path:
    """A copy of `ours` whose three python models are the stand-ins (configs unchanged), the engine's
    step a pass over `sweep_bytes` of memory."""
    shutil.copytree(ours, target)
    for model, source in STAND_INS.items():
        source = source.replace("{sweep_bytes}", str(sweep_bytes))
        (target / f"{ENDPOINT}-{model}" / "1" / "model.py").write_text(source.lstrip())
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=50, help="requests per round on each server")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = prepare_assets(names=["smollm2-mistral"], progress=False)["smollm2-mistral"]
    load_before = os.getloadavg()
    names = ("ours", "floor", "floor, evicting")
    figures: dict[str, list[float]] = {name: [] for name in names}
    # The engine's dtype here (auto: bfloat16 with AVX512-BF16, or with AVX512F for our kernels; else float32).
    dtype = resolve_dtype("auto")
    sweep_bytes = DEMO_PARAMETERS * dtype.itemsize
    with tempfile.TemporaryDirectory(prefix="plateforme-floor-") as tmp:
        ours = render_repository(Path(tmp) / "ours", [ChatEndpoint(ENDPOINT, model_dir, max_batch_size=16)])
        repositories = [ours, stand_in_repository(ours, Path(tmp) / "floor", 0),
                        stand_in_repository(ours, Path(tmp) / "floor-evicting", sweep_bytes)]
        servers = [TritonServer(ServerConfig(repo, http_port=free_port(), grpc_port=free_port(),
                                             metrics_port=free_port(), log_file=Path(tmp) / f"{repo.name}.log"))
                   for repo in repositories]
        try:
            for server in servers:
                server.start()
            for server in servers:
                overheads(server, 0, warmup=5)
            for r in range(args.rounds):
                for name, server in zip(names, servers):
                    figures[name] += overheads(server, args.requests)
                print(f"round {r + 1}: " + ", ".join(
                    f"{name} p50 {statistics.median(values[-args.requests:]):.2f} ms" for name, values in figures.items()),
                    flush=True)
        finally:
            for server in servers:
                server.stop()
    load_after = os.getloadavg()
    p50 = {name: statistics.median(values) for name, values in figures.items()}

    def spread(name: str) -> str:
        values = figures[name]
        return f"p10 / p50 / p90 {pct(values, 10):.2f} / {p50[name]:.2f} / {pct(values, 90):.2f} ms"

    lines = [
        f"- command: `python bench/serving_floor.py{' --record' if args.record else ''}`",
        f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- {args.rounds} rounds of {args.requests} requests on each of three servers, taken in turns; 1-token "
        f"request (`text_input` {P2_PROMPT!r}, max_tokens 1, not streamed) on one gRPC stream; each figure is the "
        "round trip minus the engine's step time for the request (its /metrics counter)",
        f"- ours (P2, the demo model's {str(dtype).removeprefix('torch.')} step): {spread('ours')}",
        f"- floor, stand-in models, a step that does nothing: {spread('floor')}",
        f"- floor, stand-in models, a step that reads {sweep_bytes / 2**20:.0f} MiB (about the demo model's "
        f"weights in that dtype, so the caches are as cold as after a forward pass): {spread('floor, evicting')}",
        f"- ours - floor: {p50['ours'] - p50['floor']:.2f} ms p50; ours - evicting floor: "
        f"{p50['ours'] - p50['floor, evicting']:.2f} ms p50",
    ]
    print("\n".join(lines))
    if args.record:
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        record(SECTION, "python bench/serving_floor.py --record", f"### {when}", lines)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
