"""Triton engine model running the PyTorch engine, with tensorrtllm_backend's tensor contract.

Decoupled: `execute` only queues requests; one worker thread owns the engine, adds queued
requests between steps, runs `Engine.step()` and sends each request its responses. That keeps
all engine state on one thread and lets the engine batch in-flight requests.
"""
from __future__ import annotations

import gc
import json
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from plateforme.builders.repository import SCHEDULER_POLICIES
from plateforme.python_backend.context import context_length
from plateforme.python_backend.detokenization import STREAM_PREFIX_TOKENS
from plateforme.python_backend.engine import Engine, StepOutput
from plateforme.python_backend.errors import EngineBusy
from plateforme.python_backend.sampling import SamplingParams
from plateforme.python_backend.triton import tensors as t

if TYPE_CHECKING:
    from plateforme.python_backend.guided import Guide

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Every sequence gets a whole KV cache slot before it starts, so no policy ever evicts: both of
# tensorrtllm's policies (SCHEDULER_POLICIES) are accepted and behave as guaranteed_no_evict.
# Asking Triton whether a client went away is an IPC round trip per request, so it is not done
# every step (at 16 streams: 16 round trips a step, plus one per response sent). Streams cancelled
# through the ensemble are stopped at once by a `stop` request; direct clients' disconnections are
# noticed within this delay.
DISCONNECT_POLL_S = 0.05
# Token lists (and their zero log probs) this short are cached as output tensors (a streamed chunk,
# a 1-token answer): longer ones seldom come back, and would hold the stub's shared memory.
CACHED_IDS_MAX = 2
# While the engine is busy, the metrics every step changes are sent at most this often.
METRICS_INTERVAL_S = 0.1


class EngineMetrics:
    """The engine's state on Triton's /metrics (python-backend custom metric families)."""

    def __init__(self, model_name: str):
        labels = {"model": model_name}

        # Triton refuses updates once a family is garbage-collected: keep the families alive.
        self.families = []

        def family(name, description, kind):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels=labels)

        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.active = family("plateforme_engine_active_sequences", "Sequences in the running batch", gauge)
        self.queued = family("plateforme_engine_queued_requests", "Requests waiting for a KV cache slot", gauge)
        self.generated = family("plateforme_engine_generated_tokens_total", "Tokens generated", counter)
        self.kv_usage = family("plateforme_engine_kv_cache_usage_ratio",
                               "Fraction of KV cache entries holding a live key", gauge)
        self.step_seconds = family("plateforme_engine_step_seconds_total",
                                   "Wall seconds spent in engine steps (model forward and sampling)", counter)

        self._last: dict[str, float] = {}
        self._unsent_tokens = 0
        self._last_sent = 0.0

    def update(self, engine: Engine, generated: int) -> None:
        """After a step that generated ``generated`` tokens. Each value sent is an IPC round trip to the
        server, so only changed values are sent; the ones a step always changes (tokens, step time,
        KV cache usage) at most every METRICS_INTERVAL_S while the batch stays the same, and with
        every change of the batch, so that the figures read together agree."""
        stats = engine.stats()
        self._unsent_tokens += generated
        batch = [("active", stats.running), ("queued", stats.queued)]
        batch_changed = any(self._last.get(name) != value for name, value in batch)
        values = []
        now = time.monotonic()
        if batch_changed or now - self._last_sent >= METRICS_INTERVAL_S or not engine.has_work():
            self._last_sent = now
            values.append(("kv_usage", stats.kv_cache_used / stats.kv_cache_capacity))
            if self._unsent_tokens:
                self.generated.increment(self._unsent_tokens)
                self._unsent_tokens = 0
            stepped = stats.step_seconds - self._last.get("step_seconds", 0.0)
            if stepped > 0:
                self.step_seconds.increment(stepped)
                self._last["step_seconds"] = stats.step_seconds
        # The batch last: whoever sees it change (a test waiting for 0 active) sees the rest updated.
        for name, value in values + batch:
            if self._last.get(name) != value:
                getattr(self, name).set(value)
                self._last[name] = value


@dataclass
class _Returned:
    """What one sequence of a request returned so far."""

    sent: list[int] = field(default_factory=list)  # generated tokens
    log_probs: list[float] = field(default_factory=list)


@dataclass
class _Request:
    key: str
    client_id: str
    sender: object
    prompt: list[int]
    params: SamplingParams
    streaming: bool
    exclude_input: bool
    outputs: frozenset[str] = frozenset()  # output tensors the client asked for (empty: all)
    sequences: dict[int, _Returned] = field(default_factory=dict)  # by sequence_index
    unfinished: int = 1  # sequences still generating: the last one's response is the final one
    disconnected: bool = False  # the client cancelled it (as last polled)
    # Compiles params.guide: run by the engine thread (see _loop), as everything that runs torch ops.
    compile_guide: Callable[[], Guide] | None = None


@dataclass
class _Cancel:
    request_id: str  # the client's id of the request, or its engine_request_id


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        model_dir = params["engine_dir"]
        threads = t.int_parameter(params, "num_threads", 0)
        self.exclude_input_default = t.bool_parameter(params, "exclude_input_in_output", True)
        policy = params.get("batch_scheduler_policy", "guaranteed_no_evict")
        if policy not in SCHEDULER_POLICIES:
            raise ValueError(f"batch_scheduler_policy must be one of {SCHEDULER_POLICIES}, got {policy!r}")
        separate_prefill = params.get("separate_prefill", "auto").strip().lower()
        separate = None if separate_prefill in ("", "auto") else t.bool_parameter(params, "separate_prefill", False)
        config = json.loads(args["model_config"])

        def build_engine() -> Engine:
            if threads > 0:
                torch.set_num_threads(threads)
            return Engine(
                model_dir,
                dtype=params.get("dtype", "auto"),
                max_seq_len=context_length(model_dir, t.int_parameter(params, "max_seq_len", 0)),
                max_batch_size=max(1, int(config.get("max_batch_size", 16))),
                max_num_tokens=t.int_parameter(params, "max_num_tokens", 512),
                max_queue_size=t.int_parameter(params, "max_queue_size", 0),
                queue_timeout_s=t.int_parameter(params, "max_queue_delay_ms", 0) / 1000,
                separate_prefill=separate,
            )

        self.metrics = EngineMetrics(args["model_name"])
        # Made by the engine thread, and by execute() for engine_request_id (dict operations are
        # atomic: a race makes a tensor twice at worst).
        self.tensors = t.TensorCache()
        self.model_dir = model_dir
        self._guides = None  # built on the first guided request: xgrammar's tables take a moment
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict[str, _Request] = {}
        self._last_disconnect_poll = 0.0
        self.running = True
        built: Future = Future()
        self.worker = threading.Thread(target=self._loop, args=(build_engine, built), name="engine", daemon=True)
        self.worker.start()
        built.result()  # a loading failure is raised here, and fails the model's load

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = t.input_arrays(request)
                if t.scalar(inputs, "stop", 0, bool, False):
                    self.inbox.put(_Cancel(request.request_id()))
                    sender.send(flags=FINAL)
                else:
                    self.inbox.put(self._parse(request, inputs, sender))
            except ValueError as exc:
                sender.send(t.error_response(exc), flags=FINAL)
        return None

    def finalize(self):
        self.running = False
        self.inbox.put(None)
        self.worker.join(timeout=30)
        if not self.worker.is_alive():
            # Metric families freed now, while the stub's shared memory is still there: left to the
            # stub's own teardown, their destructors wrote to it after it was gone (a segfault in
            # the log on shutdown).
            self.metrics = None
            gc.collect()

    # -- request parsing ---------------------------------------------------------------
    def _parse(self, request, inputs: dict, sender) -> _Request:
        input_ids = t.optional_array(inputs, "input_ids")
        if input_ids is None or input_ids.ndim != 2:
            raise t.InputError("input_ids is required with shape [1, tokens]")
        if input_ids.shape[0] != 1:
            raise t.InputError(f"the PyTorch engine takes one sequence per request, got a batch of {input_ids.shape[0]}")
        length = t.scalar(inputs, "input_lengths", 0, int, input_ids.shape[1])
        if not 0 < length <= input_ids.shape[1]:
            raise t.InputError(f"input_lengths={length} does not fit input_ids of {input_ids.shape[1]} tokens")
        beam_width = t.scalar(inputs, "beam_width", 0, int, 1)
        if beam_width != 1:
            raise t.InputError(f"beam_width={beam_width}: the PyTorch engine decodes one beam")
        num_sequences = t.scalar(inputs, "num_return_sequences", 0, int, 1)
        if num_sequences < 1:
            raise t.InputError(f"num_return_sequences must be >= 1, got {num_sequences}")
        params = SamplingParams(
            max_tokens=t.scalar(inputs, "request_output_len", 0, int, None),
            end_id=t.scalar(inputs, "end_id", 0, int, None),
            temperature=t.scalar(inputs, "temperature", 0, float, 1.0),
            top_k=t.scalar(inputs, "runtime_top_k", 0, int, 0),
            top_p=t.scalar(inputs, "runtime_top_p", 0, float, 0.0),
            seed=t.scalar(inputs, "seed", 0, int, None),
            min_tokens=t.scalar(inputs, "min_tokens", 0, int, 0),
            repetition_penalty=t.scalar(inputs, "repetition_penalty", 0, float, 1.0),
            presence_penalty=t.scalar(inputs, "presence_penalty", 0, float, 0.0),
            frequency_penalty=t.scalar(inputs, "frequency_penalty", 0, float, 0.0),
            stop_words=t.parse_word_list(_first_row(t.optional_array(inputs, "stop_words_list"))),
            bad_words=t.parse_word_list(_first_row(t.optional_array(inputs, "bad_words_list"))),
            return_log_probs=t.scalar(inputs, "return_log_probs", 0, bool, False),
        )
        if params.end_id is not None and params.end_id < 0:
            params.end_id = None  # tensorrtllm convention: a negative end_id never ends generation
        if params.max_tokens is None:
            raise t.InputError("request_output_len (max_tokens) is required")
        guide_type = t.scalar(inputs, "guided_decoding_guide_type", 0, t.text, "")
        guide = t.scalar(inputs, "guided_decoding_guide", 0, t.text, None)
        if guide and not guide_type:
            raise t.InputError("guided_decoding_guide needs guided_decoding_guide_type "
                               "(json, json_schema, regex or ebnf_grammar)")
        compile_guide = None
        if guide_type:
            budget = max(min(params.max_tokens, self.engine.max_seq_len - length), 2)
            compile_guide = partial(self._compile_guide, guide_type, guide, budget)
        parsed = _Request(
            key=uuid.uuid4().hex,
            client_id=request.request_id(),
            sender=sender,
            prompt=input_ids[0, :length].tolist(),
            params=params,
            streaming=t.scalar(inputs, "streaming", 0, bool, False),
            exclude_input=t.scalar(inputs, "exclude_input_in_output", 0, bool, self.exclude_input_default),
            outputs=frozenset(request.requested_output_names()),
            sequences={i: _Returned() for i in range(num_sequences)},
            unfinished=num_sequences,
            compile_guide=compile_guide,
        )
        # The one output tensor no other request shares: made now rather than after the model step,
        # which leaves every CPU cache cold.
        self.tensors.tensor("engine_request_id", parsed.key, lambda: _request_id_array(parsed.key))
        return parsed

    def _compile_guide(self, guide_type: str, guide: str | None, max_tokens: int) -> Guide:
        if self._guides is None:
            from plateforme.python_backend.guided import GuideCompiler

            self._guides = GuideCompiler(self.model_dir, self.engine.vocab_size)
        return self._guides.compile(guide_type, guide, max_tokens=max_tokens)

    # -- the engine thread -------------------------------------------------------------
    def _loop(self, build_engine, built: Future):
        # The engine is built, and runs, on this thread alone: no other thread of this process starts
        # an OpenMP team. With more OpenMP threads than CPUs, libgomp cuts its workers' spin-wait
        # short and each parallel region pays a wake-up: a second team, made by loading the model
        # on the main thread, slowed decode steps by about 1.4x (306 -> 221 tok/s in process), and
        # so did compiling a guide (torch ops) in execute(), from the first guided request on.
        try:
            self.engine = build_engine()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        while self.running:
            try:
                self._iteration()
            except Exception as exc:  # the worker must outlive any failure, or every request hangs
                pb_utils.Logger.log_error(f"engine step failed: {traceback.format_exc()}")
                self._fail_all(exc)

    def _iteration(self) -> None:
        idle = not self.engine.has_work()
        self._drain_inbox(block=idle)
        if idle:  # requests that just arrived have no disconnection worth an IPC round trip yet
            self._last_disconnect_poll = time.monotonic()
        self._cancel_disconnected()
        outputs = self.engine.step() if self.engine.has_work() else []
        for output in outputs:
            self._respond(output)
        # After the responses, which need not wait for metrics.
        self.metrics.update(self.engine, sum(len(o.token_ids) for o in outputs))

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, _Cancel):
                # `stop` names a request by the id its client gave it, or by its engine_request_id.
                for request in self.active.values():
                    if item.request_id and item.request_id in (request.client_id, request.key):
                        self.engine.cancel(request.key)
                continue
            try:
                if item.compile_guide is not None:
                    item.params.guide = item.compile_guide()
                self.engine.add_request(item.key, item.prompt, item.params, num_sequences=len(item.sequences))
            except (ValueError, EngineBusy) as exc:
                item.sender.send(t.error_response(exc), flags=FINAL)
                continue
            self.active[item.key] = item

    def _cancel_disconnected(self) -> None:
        now = time.monotonic()
        if now - self._last_disconnect_poll < DISCONNECT_POLL_S:
            return
        self._last_disconnect_poll = now
        for request in self.active.values():
            if not request.disconnected and request.sender.is_cancelled():
                request.disconnected = True
                self.engine.cancel(request.key)

    def _fail_all(self, exc: Exception) -> None:
        for key, request in list(self.active.items()):
            self.engine.cancel(key)
            request.sender.send(t.error_response(RuntimeError(f"engine failure: {exc}")), flags=FINAL)
        self.active.clear()
        # Let the engine drop the cancelled sequences.
        try:
            while self.engine.has_work():
                self.engine.step()
        except Exception:
            pb_utils.Logger.log_error(f"engine could not recover: {traceback.format_exc()}")

    def _respond(self, output: StepOutput) -> None:
        request = self.active.get(output.request_id)
        if request is None:
            return
        if output.error:
            # One failed sequence fails the request: the others are stopped, their outputs dropped.
            del self.active[output.request_id]
            self.engine.cancel(output.request_id)
            request.sender.send(t.error_response(output.error), flags=FINAL)
            return
        returned = request.sequences[output.sequence_index]
        prefix = returned.sent[-STREAM_PREFIX_TOKENS:]
        returned.sent.extend(output.token_ids)
        if output.log_probs:
            returned.log_probs.extend(output.log_probs)
        last = False
        if output.finished:
            request.unfinished -= 1
            last = request.unfinished == 0
            if last:
                del self.active[output.request_id]
        if request.disconnected:
            if last:
                request.sender.send(flags=FINAL)
            return
        if request.streaming:
            if output.token_ids or output.finished:
                tokens = output.token_ids
                log_probs = output.log_probs or [0.0] * len(tokens)
                response = self._response(request, returned, tokens, log_probs, prefix, output)
                request.sender.send(response, flags=FINAL if last else 0)
        elif output.finished:
            tokens = returned.sent if request.exclude_input else request.prompt + returned.sent
            log_probs = returned.log_probs or [0.0] * len(returned.sent)
            response = self._response(request, returned, tokens, log_probs, [], output)
            request.sender.send(response, flags=FINAL if last else 0)

    def _response(self, request: _Request, returned: _Returned, tokens, log_probs, prefix, output: StepOutput):
        def ints(values, shape):
            return np.array(values, dtype=np.int32).reshape(shape)

        def ids_key(ids):
            return tuple(ids) if len(ids) <= CACHED_IDS_MAX else None

        # name: (key of the value for the tensor cache, or None; the value). Built only when asked
        # for: a response is made every step for every stream.
        zeros = not request.params.return_log_probs  # log probs not asked for: sent as zeros
        outputs = {
            "output_ids": (ids_key(tokens), lambda: ints(tokens, (1, 1, len(tokens)))),
            "sequence_length": (len(tokens), lambda: ints([len(tokens)], (1, 1))),
            "cum_log_probs": (0 if zeros else None,
                              lambda: np.array([[sum(returned.log_probs)]], dtype=np.float32)),
            "output_log_probs": (len(log_probs) if zeros and len(log_probs) <= CACHED_IDS_MAX else None,
                                 lambda: np.array(log_probs, dtype=np.float32).reshape(1, 1, -1)),
            "num_input_tokens": (len(request.prompt), lambda: ints([len(request.prompt)], (1, 1))),
            "num_output_tokens": (len(returned.sent), lambda: ints([len(returned.sent)], (1, 1))),
            "finish_reason": (output.finish_reason or "",
                              lambda: np.array([[(output.finish_reason or "").encode()]], dtype=object)),
            "prefix_ids": (ids_key(prefix), lambda: ints(prefix, (1, 1, len(prefix)))),
            "engine_request_id": (request.key, lambda: _request_id_array(request.key)),
            "sequence_index": (output.sequence_index, lambda: ints([output.sequence_index], (1, 1))),
        }
        wanted = request.outputs or outputs.keys()
        return pb_utils.InferenceResponse(output_tensors=[
            self.tensors.tensor(name, key, make) for name, (key, make) in outputs.items() if name in wanted
        ])


def _request_id_array(key: str) -> np.ndarray:
    return np.array([[key.encode()]], dtype=object)


def _first_row(array):
    """Word lists arrive as [batch, 2, n]; the engine takes one request per batch."""
    if array is None:
        return None
    return array[0] if array.ndim == 3 else array
