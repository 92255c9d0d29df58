"""Sampling parameters and next-token choice, with TensorRT-LLM's semantics."""
from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # guided decoding pulls in xgrammar, which unguided serving does not need
    from .guided import Guide


@dataclass
class SamplingParams:
    """Per-request decoding settings (names and defaults of TensorRT-LLM's sampling config).

    Decoding is greedy when temperature <= 0, top_k == 1, or top_k == 0 and top_p == 0 (TensorRT-LLM's
    default); otherwise tokens are sampled. top_k 0 and top_p 0 or 1 switch those filters off.
    """

    max_tokens: int
    end_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    # Generated tokens before end_id or a stop word may complete.
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Token sequences that end generation; they are not part of the output.
    stop_words: list[list[int]] = field(default_factory=list)
    # Token sequences that are never generated.
    bad_words: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False
    # Grammar the generated text must follow; stateful, one per request.
    guide: Guide | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first nonsensical setting; token ids must be below ``vocab_size``."""
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("top_k", self.top_k, minimum=0)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**64:
                raise ValueError(f"seed must be below 2**64, got {self.seed}")
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check_float("presence_penalty", self.presence_penalty)
        _check_float("frequency_penalty", self.frequency_penalty)
        if self.end_id is not None:
            _check_token("end_id", self.end_id, vocab_size)
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            if not isinstance(words, (list, tuple)):
                raise ValueError(f"{name} must be a list of token id lists, got {type(words).__name__}")
            for word in words:
                if not isinstance(word, (list, tuple)) or not word:
                    raise ValueError(f"{name} entries must be non-empty lists of token ids, got {word!r}")
                for token in word:
                    _check_token(name, token, vocab_size)
        if not isinstance(self.return_log_probs, bool):
            raise ValueError(f"return_log_probs must be a bool, got {self.return_log_probs!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_token(name: str, token: object, vocab_size: int | None) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise ValueError(f"{name} holds {token!r}, which is not a token id")
    if vocab_size is not None and token >= vocab_size:
        raise ValueError(f"{name} holds token {token}, outside the vocabulary of {vocab_size}")


def completing_tokens(words: Sequence[Sequence[int]], generated: Sequence[int]) -> list[int]:
    """Tokens that would complete one of ``words`` right after ``generated``."""
    out = []
    for word in words:
        prefix = list(word[:-1])
        if len(generated) >= len(prefix) and list(generated[len(generated) - len(prefix) :]) == prefix:
            out.append(word[-1])
    return out


class Sampler:
    """Chooses the tokens of one sequence from its logits.

    Order as in TensorRT-LLM: temperature, then repetition / presence / frequency penalties over the
    prompt and the generated tokens, then the end_id / stop-word ban before min_tokens, the bad-words
    ban, the guide's mask, then top-k and top-p. The log-probability returned is the chosen token's
    under the distribution it was drawn from (greedy: the softmax of the processed logits).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int], seed: int | None = None):
        """``seed`` overrides ``params.seed`` (several sequences of one request each draw their own)."""
        self.params = params
        self._seed = seed if seed is not None else params.seed
        self.counts: torch.Tensor | None = None
        if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
            prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
            self.counts = torch.bincount(prompt, minlength=vocab_size)

    @cached_property
    def generator(self) -> torch.Generator:
        """Made on the first draw: a greedy sequence never needs one."""
        return torch.Generator().manual_seed(self._seed if self._seed is not None else secrets.randbits(64))

    def __call__(self, logits: torch.Tensor, generated: Sequence[int], argmax: int | None = None) -> tuple[int, float]:
        """Pick the token after ``generated`` from ``logits`` [vocab]; returns (token, log-prob). The
        log-prob is 0.0 unless the request asked for log probs. ``argmax``, when given, is
        ``logits.argmax()`` (the engine takes it for the whole batch at once); it decides the token when
        nothing changes the logits this step."""
        if argmax is not None and self.plain_greedy(generated):
            token, log_prob = argmax, 0.0
            if self.params.return_log_probs:
                log_prob = float(torch.log_softmax(logits.float(), dim=-1)[token])
            return token, log_prob
        logits = self.process(logits, generated)
        if self.params.greedy:
            token = int(logits.argmax())
            log_prob = float(torch.log_softmax(logits, dim=-1)[token]) if self.params.return_log_probs else 0.0
        else:
            probs = torch.softmax(self._filter(logits), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
            log_prob = math.log(float(probs[token]))
        if self.counts is not None:
            self.counts[token] += 1
        if self.params.guide is not None:
            self.params.guide.accept(token)
        return token, log_prob

    def plain_greedy(self, generated: Sequence[int]) -> bool:
        """Greedy, and nothing in :meth:`process` changes the logits after ``generated``."""
        p = self.params
        bans_stops = len(generated) < p.min_tokens and (p.stop_words or p.end_id is not None)
        return p.greedy and self.counts is None and p.guide is None and not p.bad_words and not bans_stops

    def process(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        """Float32 CPU copy of ``logits`` after temperature, penalties, bans and the guide's mask
        (before top-k / top-p). :meth:`plain_greedy` names when none of them applies: keep the two
        in step."""
        p = self.params
        logits = logits.detach().to("cpu", torch.float32, copy=True)
        if not p.greedy and p.temperature != 1:
            logits /= p.temperature
        if self.counts is not None:
            seen = self.counts > 0
            if p.repetition_penalty != 1:
                rp = p.repetition_penalty
                penalised = torch.where(logits < 0, logits * rp, logits / rp)
                logits = torch.where(seen, penalised, logits)
            logits -= p.presence_penalty * seen + p.frequency_penalty * self.counts
        banned = completing_tokens(p.bad_words, generated)
        if len(generated) < p.min_tokens:
            banned += completing_tokens(p.stop_words, generated)
            if p.end_id is not None:
                banned.append(p.end_id)
        if banned:
            logits[banned] = -math.inf
        if p.guide is not None:
            p.guide.mask_logits(logits)
        return logits

    def _filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the top_k most likely tokens, then the smallest set reaching top_p probability."""
        top_k, top_p = self.params.top_k, self.params.top_p
        if 0 < top_k < logits.shape[0]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if 0 < top_p < 1:
            probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
            # Drop a token when the more likely ones already reach top_p; the first always stays.
            drop = (probs.cumsum(0) - probs) >= top_p
            logits = logits.index_fill(0, order[drop], -math.inf)
        return logits
