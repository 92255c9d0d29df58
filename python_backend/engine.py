"""Step-based generation engine over the PyTorch model.

Callers add requests, then call :meth:`Engine.step` while :meth:`Engine.has_work`; every step
advances each active request by one token and reports what it may now release. The engine is
not thread-safe: callers serialise ``add_request``, ``cancel`` and ``step`` (e.g. with one lock).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .model import KVCache, Transformer, load_model
from .sampling import Sampler, SamplingParams

FinishReason = Literal["end_id", "stop", "length", "model_length", "cancelled"]

# Longest context served by default, whatever the checkpoint allows: KV caches are preallocated.
DEFAULT_MAX_SEQ_LEN = 8192

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    cache: KVCache
    # Sampled tokens, end_id excepted, and their log-probabilities.
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    # tokens[:released] have been handed out.
    released: int = 0
    # Tokens sampled so far, end_id included.
    generated: int = 0
    cancelled: bool = False


class Engine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | torch.dtype = "bfloat16",
        max_seq_len: int | None = None,
        device: str | torch.device = "cpu",
    ):
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self.model: Transformer = load_model(model_dir, dtype=dtype, device=device)
        limit = self.model.args.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        elif type(max_seq_len) is not int or not 1 < max_seq_len <= limit:
            raise ValueError(
                f"max_seq_len must be an integer in 2..{limit} (max_position_embeddings), got {max_seq_len}"
            )
        self._max_seq_len = max_seq_len
        self._sequences: dict[str, _Sequence] = {}

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    @property
    def max_seq_len(self) -> int:
        """Most tokens, prompt and generated together, of one sequence."""
        return self._max_seq_len

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it produces its first token at the next step."""
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already running")
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
        prompt = list(prompt_ids)
        self._sequences[request_id] = _Sequence(
            request_id=request_id,
            prompt=prompt,
            params=params,
            sampler=Sampler(params, self.vocab_size, prompt),
            cache=self.model.new_cache(min(self.max_seq_len, len(prompt) + params.max_tokens)),
        )

    def cancel(self, request_id: str) -> None:
        """Finish the request at the next step with reason "cancelled".

        Unknown ids (e.g. of requests that finished meanwhile) are ignored."""
        if request_id in self._sequences:
            self._sequences[request_id].cancelled = True

    def has_work(self) -> bool:
        return bool(self._sequences)

    def step(self) -> list[StepOutput]:
        """Advance every active request by one token."""
        outputs = []
        for seq in list(self._sequences.values()):
            out = self._finish(seq, "cancelled", len(seq.tokens)) if seq.cancelled else self._advance(seq)
            if out.finished:
                del self._sequences[seq.request_id]
            outputs.append(out)
        return outputs

    @torch.inference_mode()
    def _advance(self, seq: _Sequence) -> StepOutput:
        if seq.tokens:  # decode: feed the last token
            tokens, start_pos = seq.tokens[-1:], len(seq.prompt) + len(seq.tokens) - 1
        else:  # prefill
            tokens, start_pos = seq.prompt, 0
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        logits = self.model(ids, start_pos, seq.cache, last_only=True)[0]
        token, log_prob = seq.sampler(logits, seq.tokens)
        seq.generated += 1

        params = seq.params
        if params.end_id is not None and token == params.end_id:
            return self._finish(seq, "end_id", len(seq.tokens))
        seq.tokens.append(token)
        seq.log_probs.append(log_prob)
        stop = _matched_stop_len(seq.tokens, params.stop_words)
        if stop:
            return self._finish(seq, "stop", len(seq.tokens) - stop)
        if len(seq.tokens) >= params.max_tokens:
            return self._finish(seq, "length", len(seq.tokens))
        if len(seq.prompt) + len(seq.tokens) >= self.max_seq_len:
            return self._finish(seq, "model_length", len(seq.tokens))
        # Hold back a tail that may still become a stop word.
        return self._release(seq, len(seq.tokens) - _stop_prefix_len(seq.tokens, params.stop_words))

    def _finish(self, seq: _Sequence, reason: FinishReason, upto: int) -> StepOutput:
        out = self._release(seq, upto)
        out.finished, out.finish_reason = True, reason
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
