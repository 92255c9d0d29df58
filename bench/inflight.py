"""In-flight batching of the PyTorch engine through Triton, against Hugging Face transformers.

Serves the smollm2-mistral demo model as one endpoint (`mistral-tiny`, max_batch_size 16) on a
real tritonserver and measures, in one run:
- P1: aggregate generated tokens/s of N concurrent streaming chat requests through the ensemble
  over gRPC (16 different prompts of 36-45 tokens, greedy, exactly --new-tokens each: end_id -1),
  and of one stream at a time; time to first token at 1 and at N concurrent streams (a burst sent
  at once, and a staggered closed loop: the steady state). Baselines, in process with the same
  weights and dtype: HF `generate()` one request after another (before the server starts), and
  HF `generate()` on one left-padded batch of the same prompts, taken in turns with the engine
  alone in process and with the N streams through the server (its engine idle meanwhile). Where
  the engine runs bfloat16 on a CPU without native bf16 matmuls (AVX512F only: our kernels widen
  the weights), HF is measured in float32 as well, its faster dtype there, and both ratios printed.
- P2: serving overhead: round trip of a 1-token request through the ensemble minus the engine's
  own time for that request (its step time, which the engine model counts on /metrics), on one
  persistent gRPC stream, and with a new stream per request.
The client runs on the same cores as the server. Figures only: no goal is asserted.

    python bench/inflight.py                                  # dtype auto, 16 streams, 128 new tokens
    python bench/inflight.py --dtype bfloat16 --new-tokens 64
    python bench/inflight.py --record                         # and append the figures to bench/RESULTS.md
    python bench/inflight.py --separate-prefill false         # prompts mixed into the decode steps
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc.aio import InferenceServerClient

from plateforme.builders.assets import prepare_assets
from plateforme.builders.repository import SEPARATE_PREFILL_CHOICES, ChatEndpoint, render_repository
from plateforme.python_backend.context import context_length
from plateforme.python_backend.engine import Engine, resolve_dtype
from plateforme.python_backend.model.cpu_kernels import native_bf16
from plateforme.python_backend.sampling import SamplingParams
from plateforme.python_backend.tokenization import Tokenizer, load_tokenizer
from plateforme.server import ServerConfig, TritonServer, free_port

# bench/results.py: bench/ is on sys.path when this file runs as a script.
from results import RESULTS, cpu_facts, record

ENDPOINT = "mistral-tiny"
MAX_BATCH_SIZE = 16
SECTION = "## In-flight batching (PyTorch engine)"
# With SmolLM2's chat template (it adds a default system prompt) these make prompts of 36-45 tokens.
QUESTIONS = (
    "What is the capital of France?",
    "Explain photosynthesis to a ten year old child in simple words.",
    "Write a haiku about autumn leaves.",
    "How do I sort a list of numbers in Python?",
    "Why is the sky blue during the day and red at sunset?",
    "Give me three tips for sleeping better.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How many planets are in the solar system, and which is largest?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "What is a prime number? Give some examples.",
    "Describe how a bicycle works.",
    "Suggest a simple vegetarian recipe for dinner tonight using rice and beans.",
    "What causes earthquakes and tsunamis?",
    "List the steps to make a cup of green tea properly.",
    "Why do cats purr, and what does it usually mean?",
)
P2_PROMPT = "Hi"


@dataclass
class Prompt:
    messages: list[dict]
    ids: list[int]


@dataclass
class Reply:
    ttft: float  # seconds from send to the first chunk with text
    seconds: float  # seconds from send to the chunk that carries the finish reason
    tokens: int
    text: str
    finish_reason: str
    finished: float  # perf_counter() at the chunk that carries the finish reason


# -- client ------------------------------------------------------------------------------------
def _input(name: str, value) -> grpcclient.InferInput:
    if isinstance(value, str):
        array, datatype = np.array([[value.encode()]], dtype=object), "BYTES"
    elif isinstance(value, bool):
        array, datatype = np.array([[value]], dtype=bool), "BOOL"
    elif isinstance(value, int):
        array, datatype = np.array([[value]], dtype=np.int32), "INT32"
    else:
        array, datatype = np.array([[value]], dtype=np.float32), "FP32"
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def request(client, inputs: dict, stream: bool) -> Reply:
    """Send one request on a gRPC stream of its own; time its first text and its end."""
    tensors = [_input(name, value) for name, value in {**inputs, "stream": stream}.items()]

    async def one_request():
        yield {"model_name": ENDPOINT, "inputs": tensors, "request_id": uuid.uuid4().hex}

    start = time.perf_counter()
    ttft = seconds = None
    text, tokens, reason = [], 0, ""
    async for result, error in client.stream_infer(one_request(), stream_timeout=600):
        now = time.perf_counter()
        if error is not None:
            raise RuntimeError(f"the server answered an error: {error}")
        chunk = b"".join(result.as_numpy("text_output").reshape(-1)).decode()
        if chunk and ttft is None:
            ttft = now - start
        text.append(chunk)
        tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
        if reason:
            seconds = now - start
    if seconds is None:
        raise RuntimeError("the stream ended without a finish reason")
    return Reply(ttft if ttft is not None else seconds, seconds, tokens, "".join(text), reason, start + seconds)


def chat_inputs(prompt: Prompt, new_tokens: int) -> dict:
    return {"messages": json.dumps({"messages": prompt.messages}), "max_tokens": new_tokens,
            "end_id": -1, "temperature": 0.0}


async def concurrent(url: str, prompts: list[Prompt], new_tokens: int) -> tuple[float, list[Reply]]:
    """All prompts streamed at once; wall seconds until the last finished."""
    async with InferenceServerClient(url) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(request(client, chat_inputs(p, new_tokens), True) for p in prompts))
        return max(r.finished for r in replies) - start, list(replies)


async def closed_loop(url: str, prompts: list[Prompt], new_tokens: int, rounds: int,
                      stagger: float) -> tuple[list[Reply], list[Reply]]:
    """Steady-state serving: one client per prompt, each sending its next request as soon as its
    previous one finished; client i starts i * stagger seconds late, so arrivals spread over time
    instead of all landing on the same step. Returns the first round's replies (the ramp-up) and
    those of the later rounds (the steady state)."""
    async with InferenceServerClient(url) as client:
        async def one_client(i: int, prompt: Prompt) -> list[Reply]:
            await asyncio.sleep(i * stagger)
            return [await request(client, chat_inputs(prompt, new_tokens), True) for _ in range(rounds)]

        per_client = await asyncio.gather(*(one_client(i, p) for i, p in enumerate(prompts)))
    return [r[0] for r in per_client], [reply for r in per_client for reply in r[1:]]


def model_stats(http_url: str, model: str) -> dict[str, float]:
    """Cumulative inference statistics of one model (Triton's statistics extension): count, and
    queue / compute-input / compute-infer / compute-output nanoseconds."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"][0]["inference_stats"]
    figures = {"count": float(stats["success"]["count"])}
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        figures[part] = float(stats[part]["ns"])
    return figures


def stats_per_request(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per request of each part between two model_stats() snapshots."""
    count = after["count"] - before["count"]
    return {part: (after[part] - before[part]) / max(count, 1) / 1e6 for part in after if part != "count"}


async def sequential(url: str, prompts: list[Prompt], new_tokens: int) -> tuple[float, list[Reply]]:
    """One streamed request after another; wall seconds of them all."""
    async with InferenceServerClient(url) as client:
        replies = [await request(client, chat_inputs(p, new_tokens), True) for p in prompts]
        return sum(r.seconds for r in replies), replies


def engine_step_seconds(metrics_url: str) -> float:
    """The engine model's cumulative time inside its steps (forward pass and sampling), from /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf'^plateforme_engine_step_seconds_total{{[^}}]*model="{ENDPOINT}-engine"[^}}]*}} (\S+)$',
                      text, re.M)
    return float(match.group(1)) if match else 0.0


def engine_seconds_since(metrics_url: str, before: float, timeout: float = 2.0) -> float:
    """The engine's step time since `before`: the counter is updated just after the engine
    responds, so it may trail the reply by a moment."""
    deadline = time.monotonic() + timeout
    while (now := engine_step_seconds(metrics_url)) <= before:
        if time.monotonic() > deadline:
            raise RuntimeError("plateforme_engine_step_seconds_total did not advance after a request")
        time.sleep(0.001)
    return now - before


async def serving_overhead(url: str, metrics_url: str, count: int, persistent: bool,
                           warmup: int = 5) -> tuple[list[float], list[float]]:
    """Round trips of a 1-token request through the ensemble, and the engine's step time for that
    same request (read from /metrics between requests, outside the timed span). `persistent`: all
    requests on one gRPC stream, as a long-lived client sends them; otherwise a stream each."""
    inputs = {"text_input": P2_PROMPT, "max_tokens": 1, "temperature": 0.0}
    tensors = [_input(name, value) for name, value in {**inputs, "stream": False}.items()]
    round_trips, engine_times = [], []
    sends: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await sends.get()) is not None:
            yield item

    async with InferenceServerClient(url) as client:
        replies = client.stream_infer(requests(), stream_timeout=600) if persistent else None
        for i in range(warmup + count):
            before = engine_step_seconds(metrics_url)
            if persistent:
                start = time.perf_counter()
                await sends.put({"model_name": ENDPOINT, "inputs": tensors, "request_id": uuid.uuid4().hex})
                result, error = await replies.__anext__()
                seconds = time.perf_counter() - start
                if error is not None:
                    raise RuntimeError(f"the server answered an error: {error}")
                tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
            else:
                reply = await request(client, inputs, False)
                seconds, tokens = reply.seconds, reply.tokens
            if tokens != 1:
                raise RuntimeError(f"a 1-token request returned {tokens} tokens")
            engine = engine_seconds_since(metrics_url, before)
            if i >= warmup:
                round_trips.append(seconds)
                engine_times.append(engine)
        await sends.put(None)
    return round_trips, engine_times


def checked(replies: list[Reply], new_tokens: int) -> list[Reply]:
    for reply in replies:
        if reply.tokens != new_tokens or reply.finish_reason != "length":
            raise RuntimeError(f"a request returned {reply.tokens} tokens ({reply.finish_reason}), "
                               f"expected exactly {new_tokens}")
    return replies


# -- in-process baselines --------------------------------------------------------------------
def hf_sequential(model, prompts: list[Prompt], new_tokens: int) -> tuple[float, list[list[int]]]:
    outputs, seconds = [], 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt.ids])
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        seconds += time.perf_counter() - start
        outputs.append(out[0, ids.shape[1]:].tolist())
        if len(outputs[-1]) != new_tokens:
            raise RuntimeError(f"HF generate() returned {len(outputs[-1])} tokens, expected {new_tokens}")
    return seconds, outputs


def hf_batch(model, prompts: list[Prompt], new_tokens: int, pad_id: int) -> float:
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[row, width - len(prompt.ids):] = torch.tensor(prompt.ids)
        mask[row, width - len(prompt.ids):] = 1
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    if out.shape[1] - width != new_tokens:
        raise RuntimeError(f"HF batched generate() returned {out.shape[1] - width} tokens, expected {new_tokens}")
    return seconds


def server_engine(model_dir: Path, dtype: torch.dtype, separate_prefill: str = "auto") -> Engine:
    """An Engine configured as the endpoint's engine model configures it."""
    return Engine(model_dir, dtype=dtype, max_seq_len=context_length(model_dir),
                  max_batch_size=MAX_BATCH_SIZE, max_num_tokens=ChatEndpoint.max_num_tokens,
                  separate_prefill=None if separate_prefill == "auto" else separate_prefill == "true")


def engine_throughput(engine: Engine, prompts: list[Prompt], new_tokens: int, tag: str) -> float:
    """Generated tokens/s of the engine alone running all prompts at once (no Triton, no client)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt.ids, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    start, generated = time.perf_counter(), 0
    while engine.has_work():
        generated += sum(len(out.token_ids) for out in engine.step())
    seconds = time.perf_counter() - start
    if generated != len(prompts) * new_tokens:
        raise RuntimeError(f"the engine generated {generated} tokens, expected {len(prompts) * new_tokens}")
    return generated / seconds


# -- figures ---------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto", help="auto (what the server picks), float32, bfloat16")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (prompts repeat past 16)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each throughput figure (median)")
    parser.add_argument("--single", type=int, default=3, help="requests of each one-at-a-time measurement")
    parser.add_argument("--p2-requests", type=int, default=200,
                        help="1-token requests for P2, each way (a median of more is steadier on a noisy host)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="requests per client in the steady-state (closed loop) measurement; the first is ramp-up")
    parser.add_argument("--separate-prefill", default="auto", choices=SEPARATE_PREFILL_CHOICES,
                        help="the engine's separate_prefill (auto: on for CPU); false mixes prompts into the "
                             "decode steps")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    load_before = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", flush=True)

    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    model_dir = prepare_assets(names=["smollm2-mistral"], progress=False)["smollm2-mistral"]
    tokenizer: Tokenizer = load_tokenizer(model_dir)
    base = [Prompt(m := [{"role": "user", "content": q}], tokenizer.encode_chat({"messages": m})) for q in QUESTIONS]
    prompts = [base[i % len(base)] for i in range(args.streams)]
    singles = base[: args.single]
    lengths = [len(p.ids) for p in prompts]
    p2_ids = tokenizer.encode_text(P2_PROMPT)
    n = args.new_tokens

    # Baselines first, alone on the cores.
    from transformers import AutoModelForCausalLM

    log(f"HF transformers baselines ({dtype_name})")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        hf_sequential(model, base[:1], 4)  # warm-up
        hf_seq_runs, hf_texts = [], []
        for _ in range(args.repeats):
            seconds, outputs = hf_sequential(model, singles, n)
            hf_seq_runs.append(len(singles) * n / seconds)
            hf_texts = [tokenizer.decode(o) for o in outputs]
            log(f"  HF sequential: {hf_seq_runs[-1]:.1f} tok/s")
        hf_batch(model, prompts, 4, tokenizer.pad_id)  # warm-up
    # HF's bf16 matmuls without native bf16 run slower than float32: then float32 too, HF's best here.
    model32, hf32_seq_runs, hf32_batch_runs = None, [], []
    if dtype == torch.bfloat16 and not native_bf16():
        log("HF transformers baselines (float32, the faster dtype for HF on this CPU)")
        model32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            hf_sequential(model32, base[:1], 4)  # warm-up
            for _ in range(args.repeats):
                hf32_seq_runs.append(len(singles) * n / hf_sequential(model32, singles, n)[0])
                log(f"  HF sequential, float32: {hf32_seq_runs[-1]:.1f} tok/s")
            hf_batch(model32, prompts, 4, tokenizer.pad_id)  # warm-up
    torch_threads = torch.get_num_threads()

    # The engine alone: where the serving path's tokens/s stand against the engine's own.
    engine = server_engine(model_dir, dtype, args.separate_prefill)
    engine_throughput(engine, prompts[:2], 4, "warm-up")

    with tempfile.TemporaryDirectory(prefix="plateforme-inflight-") as tmp:
        endpoint = ChatEndpoint(ENDPOINT, model_dir, dtype=dtype_name, max_batch_size=MAX_BATCH_SIZE,
                                separate_prefill=args.separate_prefill)
        repository = render_repository(Path(tmp) / "repository", [endpoint])
        config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                              log_file=Path(tmp) / "tritonserver.log")
        log("starting tritonserver")
        with TritonServer(config) as server:
            url = server.grpc_url
            asyncio.run(concurrent(url, prompts[:2], 4))  # warm-up
            # The three 16-sequence figures are taken in turns (the idle server costs nothing): other
            # work on the machine then weighs on each of them alike, and their ratios hold.
            ours_runs, ttft_n, concurrent_texts, hf_batch_runs, engine_runs = [], [], {}, [], []
            for r in range(args.repeats):
                with torch.inference_mode():
                    hf_batch_runs.append(len(prompts) * n / hf_batch(model, prompts, n, tokenizer.pad_id))
                log(f"  HF batch of {len(prompts)}: {hf_batch_runs[-1]:.1f} tok/s")
                if model32 is not None:
                    with torch.inference_mode():
                        hf32_batch_runs.append(len(prompts) * n / hf_batch(model32, prompts, n, tokenizer.pad_id))
                    log(f"  HF batch of {len(prompts)}, float32: {hf32_batch_runs[-1]:.1f} tok/s")
                engine_runs.append(engine_throughput(engine, prompts, n, f"run{r}"))
                log(f"  engine alone in process, {len(prompts)} sequences: {engine_runs[-1]:.1f} tok/s")
                wall, replies = asyncio.run(concurrent(url, prompts, n))
                checked(replies, n)
                ours_runs.append(len(prompts) * n / wall)
                ttft_n += [r.ttft for r in replies]
                concurrent_texts = {i: r.text for i, r in enumerate(replies[: len(base)])}
                log(f"  ours, {len(prompts)} concurrent streams: {ours_runs[-1]:.1f} tok/s")
            del model, model32
            gc.collect()
            # Steady state: staggered starts spread over one request's duration at full load.
            stagger = statistics.median(len(prompts) * n / r for r in ours_runs) / len(prompts)
            log(f"  ours, closed loop of {len(prompts)} clients x {args.rounds} requests, starts {stagger:.2f} s apart")
            loop_start = time.perf_counter()
            _, steady = asyncio.run(closed_loop(url, prompts, n, args.rounds, stagger))
            loop_seconds = time.perf_counter() - loop_start
            checked(steady, n)
            ttft_steady = [r.ttft for r in steady]
            ours_single_runs, ttft_1, single_texts = [], [], []
            for _ in range(args.repeats):
                seconds, replies = asyncio.run(sequential(url, singles, n))
                checked(replies, n)
                ours_single_runs.append(len(singles) * n / seconds)
                ttft_1 += [r.ttft for r in replies]
                single_texts = [r.text for r in replies]
                log(f"  ours, 1 stream: {ours_single_runs[-1]:.1f} tok/s")
            # More first-token samples at 1 stream: every prompt alone, a few tokens each.
            for _ in range(args.repeats):
                _, replies = asyncio.run(sequential(url, base, 2))
                ttft_1 += [r.ttft for r in replies]
            log("  1-token requests: round trips and the engine's step time for each")
            names = {"ensemble": ENDPOINT, **{part: f"{ENDPOINT}-{part}" for part in
                                               ("preprocessing", "engine", "postprocessing")}}
            stats_before = {part: model_stats(server.http_url, name) for part, name in names.items()}
            round_trips, engine_times = asyncio.run(
                serving_overhead(url, server.metrics_url, args.p2_requests, persistent=True))
            p2_stats = {part: stats_per_request(stats_before[part], model_stats(server.http_url, name))
                        for part, name in names.items()}
            new_stream_trips, new_stream_engine = asyncio.run(
                serving_overhead(url, server.metrics_url, args.p2_requests, persistent=False))
    load_after = os.getloadavg()

    ours, ours_single = statistics.median(ours_runs), statistics.median(ours_single_runs)
    hf_seq, hf_bat = statistics.median(hf_seq_runs), statistics.median(hf_batch_runs)
    # Each round trip minus the engine's time for that very request: no pairing across requests.
    overheads = [a - b for a, b in zip(round_trips, engine_times)]
    new_stream_overheads = [a - b for a, b in zip(new_stream_trips, new_stream_engine)]
    overhead = pct(overheads, 50)
    ttft_ratio = pct(ttft_n, 50) / pct(ttft_1, 50)
    ttft_steady_ratio = pct(ttft_steady, 50) / pct(ttft_1, 50)
    hf_agree = [common_prefix(a, b) for a, b in zip(single_texts, hf_texts)]
    batch_agree = [common_prefix(single_texts[i], concurrent_texts[i]) for i in range(len(single_texts))]
    cpu_model, flags = cpu_facts()
    k = args.streams
    rows = [
        ("ours: Triton ensemble over gRPC, streaming", f"{ours_single:.1f} tok/s", f"{ours:.1f} tok/s",
         f"{ms(pct(ttft_1, 50))} / {ms(pct(ttft_n, 50))}", f"{ms(pct(ttft_1, 99))} / {ms(pct(ttft_n, 99))}"),
        ("HF generate(), one request after another", f"{hf_seq:.1f} tok/s", "–", "", ""),
        (f"HF generate(), one left-padded batch of {k}", "–", f"{hf_bat:.1f} tok/s", "", ""),
        *([("HF generate(), one request after another, float32", f"{statistics.median(hf32_seq_runs):.1f} tok/s",
            "–", "", ""),
           (f"HF generate(), one left-padded batch of {k}, float32", "–",
            f"{statistics.median(hf32_batch_runs):.1f} tok/s", "", "")] if hf32_batch_runs else []),
        ("(engine alone in process: no Triton, no client)", "–", f"{statistics.median(engine_runs):.1f} tok/s",
         "", ""),
    ]
    lines = [
        f"- command: `{shlex.join(['python', 'bench/inflight.py', *sys.argv[1:]])}`",
        f"- machine: {cpu_model}, {os.cpu_count()} cores ({flags}); torch {torch.__version__}, "
        f"{torch_threads} torch threads (server: num_threads 0 = the same default); {platform.platform()}",
        f"- load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- workload: {ENDPOINT} = smollm2-mistral (SmolLM2-135M-Instruct weights), dtype {dtype_name} "
        f"(--dtype {args.dtype}), max_batch_size {MAX_BATCH_SIZE}, max_num_tokens {endpoint.max_num_tokens}, "
        f"separate_prefill {endpoint.separate_prefill}; "
        f"{k} chat prompts of {min(lengths)}-{max(lengths)} tokens, greedy, exactly {n} new tokens each "
        f"(end_id -1); median of {args.repeats} runs; 1 stream = {len(singles)} requests one after another; "
        f"the client (asyncio, one gRPC stream per request) shares the cores",
        "",
        f"| engine | 1 stream | {k} concurrent streams | TTFT p50 (1 / {k}) | TTFT p99 (1 / {k}) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"- runs, tok/s: ours {k} streams {[round(x, 1) for x in ours_runs]}, ours 1 stream "
        f"{[round(x, 1) for x in ours_single_runs]}, HF sequential {[round(x, 1) for x in hf_seq_runs]}, "
        f"HF batch {[round(x, 1) for x in hf_batch_runs]}, engine alone {[round(x, 1) for x in engine_runs]}"
        + (f", HF float32 sequential {[round(x, 1) for x in hf32_seq_runs]}, HF float32 batch "
           f"{[round(x, 1) for x in hf32_batch_runs]}" if hf32_batch_runs else ""),
        f"- TTFT samples: {len(ttft_1)} at 1 stream (the 1-stream requests and each prompt alone), "
        f"{len(ttft_n)} at {k} (every stream of every run); time from send to the first chunk with text",
        f"- TTFT at {k} streams, burst (the table's column): all {k} requests sent at the same instant, so the "
        f"median one waits for about {k // 2} prompt prefills on compute-bound cores whatever the scheduler",
        f"- TTFT at {k} streams, steady state: a closed loop of {k} clients, each sending its next request when "
        f"its previous one finished, starts staggered {stagger:.2f} s apart; the {len(ttft_steady)} requests after "
        f"each client's first: p50 {ms(pct(ttft_steady, 50))}, p99 {ms(pct(ttft_steady, 99))} "
        f"({k * args.rounds * n / loop_seconds:.1f} tok/s over the whole loop, ramp-up and drain included)",
        f"- P2: 1-token request (`text_input` {P2_PROMPT!r}, {len(p2_ids)} prompt token, max_tokens 1, "
        f"not streamed), {len(round_trips)} one after another on one gRPC stream: round trip p50 "
        f"{ms(pct(round_trips, 50))} (p99 {ms(pct(round_trips, 99))}); the engine's step time for the same "
        f"request (plateforme_engine_step_seconds_total on /metrics, read between requests) p50 "
        f"{ms(pct(engine_times, 50))}; overhead = round trip - engine time, per request: p10 / p50 / p90 "
        f"{ms(pct(overheads, 10))} / {ms(pct(overheads, 50))} / {ms(pct(overheads, 90))}",
        f"- P2 with a new gRPC stream per request (stream set-up included): round trip p50 "
        f"{ms(pct(new_stream_trips, 50))}, overhead p50 {ms(pct(new_stream_overheads, 50))}",
        "- P2, Triton's statistics per request, ms (queue / compute input / infer / output): " + "; ".join(
            f"{part} {v['queue']:.2f} / {v['compute_input']:.2f} / {v['compute_infer']:.2f} / "
            f"{v['compute_output']:.2f}" for part, v in p2_stats.items())
        + " (the engine model is decoupled: its infer time is execute() handing the request to its thread)",
        f"- same text: ours 1 stream vs HF sequential, characters in common from the start: {hf_agree}; "
        f"ours 1 stream vs the same prompts among {k} concurrent streams: {batch_agree} "
        f"(of {[len(t) for t in single_texts]}); HF's min_new_tokens bans EOS while end_id -1 only "
        f"ignores it, so texts part at the first EOS the model emits",
        "",
        f"- ratio P1 ours/HF-sequential: {ours / hf_seq:.2f}x (goal >= 5x)",
        f"- ratio P1 ours/HF-batch: {ours / hf_bat:.2f}x (goal >= 1.5x); run by run, each pair taken back to "
        f"back: {[round(a / b, 2) for a, b in zip(ours_runs, hf_batch_runs)]}",
        *([f"- ratio P1 ours/HF-sequential in float32 (HF's faster dtype on this CPU): "
           f"{ours / statistics.median(hf32_seq_runs):.2f}x",
           f"- ratio P1 ours/HF-batch in float32 (HF's faster dtype on this CPU): "
           f"{ours / statistics.median(hf32_batch_runs):.2f}x; run by run: "
           f"{[round(a / b, 2) for a, b in zip(ours_runs, hf32_batch_runs)]}"] if hf32_batch_runs else []),
        f"- ratio TTFT{k}/TTFT1 p50, steady state: {ttft_steady_ratio:.2f}x (goal <= 2x, judged here)",
        f"- ratio TTFT{k}/TTFT1 p50, burst of {k} at once: {ttft_ratio:.2f}x (reported, not the goal)",
        f"- P2 serving overhead p50: {overhead * 1000:.2f} ms (goal <= 3 ms)",
        f"- bench wall time: {time.perf_counter() - began:.0f} s",
    ]
    print("\n".join(lines))
    if args.record:
        record(SECTION, "python bench/inflight.py --record", f"### {datetime.date.today().isoformat()}, {dtype_name}, {k} streams, {n} new tokens", lines)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
