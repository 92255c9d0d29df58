"""Step-based generation engine over the PyTorch model, with in-flight batching.

Callers add requests, then call :meth:`Engine.step` while :meth:`Engine.has_work`. Each step:
cancelled and expired requests leave; queued requests join while KV cache slots are free; then
ONE forward pass runs every running sequence's next token together with prefill chunks of newly
joined ones, under a budget of `max_num_tokens` tokens per step (chunked prefill, so a long
prompt never stalls the decoding of the others); with ``separate_prefill``, a step that can finish
every admitted prompt runs them alone and the decodes follow. Each request keeps its own sampling
state.
A request may ask for several sequences (num_return_sequences): its prompt is prefilled once, then
its KV cache entries are copied into the other sequences' slots and each samples on its own.
The engine is not thread-safe: callers serialise ``add_request``, ``cancel`` and ``step``.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .errors import EngineBusy
from .model import Segment, Transformer, cpu_kernels, load_model
from .sampling import Sampler, SamplingParams

FinishReason = Literal["end_id", "stop", "length", "model_length", "cancelled", "error"]

# Longest context served by default, whatever the checkpoint allows.
DEFAULT_MAX_SEQ_LEN = 8192

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name, or "auto": bfloat16 where it computes fast (CUDA; x86 CPUs with AVX512-BF16 / AMX;
    CPUs with AVX512F where our CPU kernels compile: their linear reads bfloat16 weights and widens
    them in registers), float32 elsewhere: there torch's bf16 matmuls of more than one row run
    several times slower than float32 (measured on AVX2 and on AVX512F without BF16)."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unsupported dtype {name!r}: expected auto or one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if cpu_kernels.native_bf16():
        return torch.bfloat16
    # With AVX2 alone the kernels' bf16 linears win at decode but lose at prefill (measured): float32.
    kernels = cpu_kernels.load() if "avx512f" in cpu_kernels.cpu_flags() else None
    return torch.bfloat16 if kernels is not None and kernels.has_linear else torch.float32


@dataclass
class StepOutput:
    request_id: str
    # Tokens released for this request by this step (possibly none).
    token_ids: list[int]
    # Log-probabilities of token_ids when the request asked for them.
    log_probs: list[float] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_len: int
    # Tokens the model generated so far, end_id and stop-word tokens included.
    generated_len: int
    # Why the request failed (finish_reason "error"): EngineBusy (retry later) or ValueError.
    error: Exception | None = None
    # Which of the request's sequences this is (0 .. num_sequences - 1).
    sequence_index: int = 0


@dataclass
class EngineStats:
    running: int
    queued: int
    kv_cache_used: int  # cache entries holding a live key
    kv_cache_capacity: int
    step_seconds: float  # wall time spent inside step() since the engine started


@dataclass(eq=False)  # one object per sequence: compared by identity
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    arrival: float
    slot: int | None = None
    # Prompt tokens already run through the model.
    prefilled: int = 0
    # Sampled tokens, end_id excepted, and their log-probabilities.
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    # tokens[:released] have been handed out.
    released: int = 0
    # Tokens sampled so far, end_id included.
    generated: int = 0
    cancelled: bool = False
    index: int = 0  # sequence_index within its request
    # The request's other sequences: they get slots with this one and start from its prefilled prompt.
    forks: list[_Sequence] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return self.request_id, self.index


class Engine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        max_seq_len: int | None = None,
        device: str | torch.device = "cpu",
        max_batch_size: int = 16,
        max_num_tokens: int = 512,
        max_queue_size: int = 0,
        queue_timeout_s: float = 0.0,
        separate_prefill: bool | None = None,
    ):
        """``max_batch_size`` sequences run at once (KV cache slots); ``max_num_tokens`` bounds the
        tokens of one step; ``max_queue_size`` (0: unbounded) requests may wait for a slot, each at most
        ``queue_timeout_s`` seconds (0: no limit).

        ``separate_prefill``: when the admitted prompts' remaining tokens fit in one step, that step
        runs them without the decodes, which run next (never two such steps in a row, so that short
        requests arriving back to back cannot starve the decodes). Where a step's time grows with its
        tokens, as on CPU (compute-bound from about 16 rows), a new request's first token then does not
        wait for the decodes' work, and the decodes wait no longer than in a mixed step. Where a decode
        step costs a pass over the weights whatever its rows, as on a GPU, mixing saves that pass.
        None (default): separate on CPU, mixed elsewhere."""
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, device)
        for name, value, minimum in (("max_batch_size", max_batch_size, 1), ("max_num_tokens", max_num_tokens, 1),
                                     ("max_queue_size", max_queue_size, 0)):
            if type(value) is not int or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.model: Transformer = load_model(model_dir, dtype=dtype, device=device)
        limit = self.model.args.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        elif type(max_seq_len) is not int or not 1 < max_seq_len <= limit:
            raise ValueError(
                f"max_seq_len must be an integer in 2..{limit} (max_position_embeddings), got {max_seq_len}"
            )
        self._max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens
        self.separate_prefill = self.model.device.type == "cpu" if separate_prefill is None else separate_prefill
        self._last_step_prefill_only = False
        self.max_queue_size = max_queue_size
        self.queue_timeout_s = queue_timeout_s
        self.cache = self.model.new_slot_cache(max_batch_size, max_seq_len)
        self._sequences: dict[tuple[str, int], _Sequence] = {}
        self._requests: dict[str, list[_Sequence]] = {}  # live sequences of each request
        self._fork_outputs: list[StepOutput] = []  # forks finished with their head outside a step's flow
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._step_seconds = 0.0

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def max_seq_len(self) -> int:
        """Most tokens, prompt and generated together, of one sequence."""
        return self._max_seq_len

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    num_sequences: int = 1) -> None:
        """Queue a request; it joins the running batch at the next step with free slots (one per sequence).

        With ``num_sequences`` > 1 the outputs of sequence i carry ``sequence_index`` i; sequence i > 0
        samples with seed ``params.seed + i`` when a seed is given."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already running")
        if type(num_sequences) is not int or not 1 <= num_sequences <= self.cache.n_slots:
            raise ValueError(
                f"num_return_sequences must be an integer in 1..{self.cache.n_slots} (max_batch_size), "
                f"got {num_sequences!r}"
            )
        if num_sequences > 1 and params.guide is not None:
            raise ValueError("num_return_sequences > 1 cannot be combined with guided decoding")
        if not prompt_ids:
            raise ValueError("prompt is empty")
        for token in prompt_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"prompt holds {token!r}, not a token id of the {self.vocab_size}-token vocabulary"
                )
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but the model's context is {self.max_seq_len} tokens"
            )
        params.validate(self.vocab_size)
        if self.max_queue_size and len(self._waiting) >= self.max_queue_size:
            raise EngineBusy(f"the engine is busy: {len(self._waiting)} requests are already queued")
        prompt = list(prompt_ids)
        arrival = time.monotonic()
        sequences = []
        for index in range(num_sequences):
            seed = None if params.seed is None or index == 0 else (params.seed + index) % 2**64
            sampler = Sampler(params, self.vocab_size, prompt, seed=seed)
            sequences.append(_Sequence(request_id, prompt, params, sampler, arrival, index=index))
        head = sequences[0]
        head.forks = sequences[1:]
        for seq in sequences:
            self._sequences[seq.key] = seq
        self._requests[request_id] = sequences
        self._waiting.append(head)

    def cancel(self, request_id: str) -> None:
        """Finish the request at the next step with reason "cancelled", freeing its slot.

        Unknown ids (e.g. of requests that finished meanwhile) are ignored."""
        for seq in self._requests.get(request_id, ()):
            seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self._sequences)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            queued=len(self._waiting),
            kv_cache_used=self.cache.used_entries(),
            kv_cache_capacity=self.cache.n_slots * self.cache.capacity,
            step_seconds=self._step_seconds,
        )

    def step(self) -> list[StepOutput]:
        """Advance every running request by one token (or one prefill chunk)."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self._step_seconds += time.perf_counter() - start

    def _step(self) -> list[StepOutput]:
        outputs = self._retire_waiting()
        for seq in [s for s in self._running if s.cancelled]:
            outputs.append(self._finish(seq, "cancelled", len(seq.tokens)))
        # First come, first served: a request needing several slots holds back those behind it.
        while self._waiting and self.cache.free_slots > len(self._waiting[0].forks):
            seq = self._waiting.popleft()
            seq.slot = self.cache.allocate()
            for fork in seq.forks:
                fork.slot = self.cache.allocate()
            self._running.append(seq)
        if self._running:
            outputs.extend(self._forward())
        outputs.extend(self._fork_outputs)
        self._fork_outputs = []
        return outputs

    def _retire_waiting(self) -> list[StepOutput]:
        outputs = []
        now = time.monotonic()
        for seq in list(self._waiting):
            if seq.cancelled:
                outputs.append(self._finish(seq, "cancelled", 0))
            elif self.queue_timeout_s and now - seq.arrival > self.queue_timeout_s:
                busy = EngineBusy(
                    f"the request waited {now - seq.arrival:.1f} s for a free slot (limit {self.queue_timeout_s} s)"
                )
                outputs.append(self._finish(seq, "error", 0, busy))
        return outputs

    @torch.inference_mode()
    def _forward(self) -> list[StepOutput]:
        segments, tokens, owners = [], [], []
        budget = self.max_num_tokens
        decoding = [seq for seq in self._running if seq.prefilled == len(seq.prompt)]
        unprefilled = sum(len(seq.prompt) - seq.prefilled for seq in self._running)
        # See separate_prefill in __init__.
        prefill_only = bool(self.separate_prefill and decoding and not self._last_step_prefill_only
                            and 0 < unprefilled <= budget)
        self._last_step_prefill_only = prefill_only
        # Otherwise decode steps first: a running sequence waits for at most one prefill-only step.
        for seq in [] if prefill_only else decoding:
            position = len(seq.prompt) + len(seq.tokens) - 1
            segments.append(Segment(seq.slot, position, 1))
            tokens.append(seq.tokens[-1])
            owners.append(seq)
            budget -= 1
        for seq in self._running:  # then prefill chunks, oldest first, within the budget
            remaining = len(seq.prompt) - seq.prefilled
            if remaining and budget > 0:
                chunk = min(remaining, budget)
                segments.append(Segment(seq.slot, seq.prefilled, chunk))
                tokens.extend(seq.prompt[seq.prefilled : seq.prefilled + chunk])
                seq.prefilled += chunk
                owners.append(seq)
                budget -= chunk
        if not segments:
            return []
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        logits = self.model.forward_batch(ids, segments, self.cache)
        # One argmax over the batch serves every greedy row (one op, not one per sequence).
        argmaxes = logits.argmax(dim=-1).tolist()
        outputs = []
        for row, seq in enumerate(owners):
            if seq.prefilled == len(seq.prompt):  # a decode step, or the prompt's last chunk
                for member in [seq, *self._start_forks(seq)]:
                    try:
                        outputs.append(self._advance(member, logits[row], argmaxes[row]))
                    except ValueError as exc:  # e.g. a grammar that no allowed token can continue
                        outputs.append(self._finish(member, "error", len(member.tokens), exc))
        return outputs

    def _start_forks(self, head: _Sequence) -> list[_Sequence]:
        """The head's prompt is prefilled: its other sequences start from a copy of its KV cache."""
        forks, head.forks = head.forks, []
        for fork in forks:
            self.cache.copy_slot(head.slot, fork.slot)
            fork.prefilled = len(fork.prompt)
            self._running.append(fork)
        return forks

    def _advance(self, seq: _Sequence, logits: torch.Tensor, argmax: int) -> StepOutput:
        token, log_prob = seq.sampler(logits, seq.tokens, argmax)
        seq.generated += 1

        params = seq.params
        if params.end_id is not None and token == params.end_id:
            return self._finish(seq, "end_id", len(seq.tokens))
        seq.tokens.append(token)
        seq.log_probs.append(log_prob)
        stop = _matched_stop_len(seq.tokens, params.stop_words)
        if stop:
            return self._finish(seq, "stop", len(seq.tokens) - stop)
        if params.guide is not None and params.guide.is_terminated():
            return self._finish(seq, "stop", len(seq.tokens))
        # A full context says so even where max_tokens ends there too (its default: the rest of the context).
        if len(seq.prompt) + len(seq.tokens) >= self.max_seq_len:
            return self._finish(seq, "model_length", len(seq.tokens))
        if len(seq.tokens) >= params.max_tokens:
            return self._finish(seq, "length", len(seq.tokens))
        # Hold back a tail that may still become a stop word.
        return self._release(seq, len(seq.tokens) - _stop_prefix_len(seq.tokens, params.stop_words))

    def _finish(self, seq: _Sequence, reason: FinishReason, upto: int, error: Exception | None = None) -> StepOutput:
        out = self._release(seq, upto)
        out.finished, out.finish_reason, out.error = True, reason, error
        del self._sequences[seq.key]
        siblings = self._requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
            del self._requests[seq.request_id]
        if seq in self._running:
            self._running.remove(seq)
        elif seq.index == 0 and seq.slot is None:
            self._waiting.remove(seq)
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        # Sequences that never started end with the one whose prompt they were waiting for.
        forks, seq.forks = seq.forks, []
        for fork in forks:
            self._fork_outputs.append(self._finish(fork, reason, 0, error))
        return out

    def _release(self, seq: _Sequence, upto: int) -> StepOutput:
        """Hand out tokens[released:upto]."""
        start, seq.released = seq.released, max(seq.released, upto)
        return StepOutput(
            request_id=seq.request_id,
            token_ids=seq.tokens[start : seq.released],
            log_probs=seq.log_probs[start : seq.released] if seq.params.return_log_probs else None,
            finished=False,
            finish_reason=None,
            prompt_len=len(seq.prompt),
            generated_len=seq.generated,
            sequence_index=seq.index,
        )


def _matched_stop_len(tokens: list[int], stop_words: list[list[int]]) -> int:
    """Length of the longest stop word ``tokens`` ends with; 0 if none."""
    matched = (len(w) for w in stop_words if len(w) <= len(tokens) and tokens[-len(w) :] == list(w))
    return max(matched, default=0)


def _stop_prefix_len(tokens: list[int], stop_words: list[list[int]]) -> int:
    """Length of the longest tail of ``tokens`` that begins some stop word without completing it."""
    longest = 0
    for word in stop_words:
        for n in range(min(len(word) - 1, len(tokens)), longest, -1):
            if tokens[-n:] == list(word[:n]):
                longest = n
                break
    return longest
