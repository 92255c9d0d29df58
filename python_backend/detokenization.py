"""Incremental detokenization for streamed generation.

Decoding each new token alone is wrong: SentencePiece drops the space of a sequence's first piece,
and a multi-byte character may span several byte tokens. So text is always decoded with the tokens
before it as context, and an incomplete character (decoded as U+FFFD) is withheld until the token
that completes it arrives.
"""
from __future__ import annotations

from typing import Sequence

from plateforme.python_backend.tokenization import Tokenizer

# Already-streamed tokens sent along with each streamed response as decoding context: enough to
# finish a withheld character (at most 3 pending bytes) with room to spare.
STREAM_PREFIX_TOKENS = 16

_REPLACEMENT = "\ufffd"


def complete_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids` without a trailing incomplete character."""
    return tokenizer.decode(ids).rstrip(_REPLACEMENT)


def decode_increment(tokenizer: Tokenizer, prefix_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """Text that `new_ids` add after `prefix_ids` (the last tokens already streamed)."""
    if len(new_ids) == 0:
        return ""
    before = complete_text(tokenizer, prefix_ids)
    after = complete_text(tokenizer, [*prefix_ids, *new_ids])
    if after.startswith(before):
        return after[len(before) :]
    # A tokenizer whose decoding of the context changed with the new tokens: emit what follows
    # the common part rather than fail the stream.
    common = 0
    for a, b in zip(before, after):
        if a != b:
            break
        common += 1
    return after[common:]


class IncrementalDetokenizer:
    """Streams the text of generated tokens pushed one chunk at a time.

    Only the last `window` ids are kept as decoding context, so each push costs the same however
    long the generation.
    """

    def __init__(self, tokenizer: Tokenizer, window: int = STREAM_PREFIX_TOKENS):
        if window < 1:
            raise ValueError(f"detokenization window must be at least 1 token, got {window}")
        self.tokenizer = tokenizer
        self.window = window
        self._context: list[int] = []
        self._parts: list[str] = []

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete."""
        new_ids = [int(i) for i in ids]
        delta = decode_increment(self.tokenizer, self._context, new_ids)
        self._context = (self._context + new_ids)[-self.window :]
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def context(self) -> tuple[int, ...]:
        """The ids kept as decoding context (at most `window`)."""
        return tuple(self._context)

    @property
    def text(self) -> str:
        """All text streamed so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
