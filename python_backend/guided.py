"""Guided decoding: generated text constrained to a JSON schema, a regex or a grammar, with xgrammar.

The guide types and their names are TensorRT-LLM's (``guided_decoding_guide_type``):

- ``json``: any JSON object (La Plateforme's ``response_format`` ``json_object``); the guide is ignored.
- ``json_schema``: an instance of the JSON schema given as text (no properties beyond the schema's).
- ``regex``: text matching the regular expression.
- ``ebnf_grammar``: text of the GBNF / EBNF grammar, whose start rule is ``root``.

JSON comes on one line with json.dumps's separators (", " and ": "): free whitespace is where
sampled JSON goes astray, as a model may pad it without end.

A :class:`GuideCompiler` per model compiles guides (once per distinct guide); a :class:`Guide` per
request masks the logits of each step and follows the sampled tokens.

JSON mode always returns JSON that parses, even from a model that never chooses to close a string:
the guide follows a text that would close the object and keeps it within the tokens left of the
request's budget (see :class:`_JsonCloser`), letting through only tokens that cannot push it past
the end. The other guide types end with the budget like unguided text: closing them can need
arbitrary text (required properties, the rest of a pattern).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
import xgrammar as xgr

from .tokenization import HuggingFaceTokenizer, MistralCommonTokenizer, Tokenizer, load_tokenizer

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
_GUIDE_NAMES = {"json_schema": "JSON schema", "regex": "regex", "ebnf_grammar": "EBNF grammar"}

# Distinct guides kept compiled per model; requests usually repeat a few schemas.
_CACHE_SIZE = 256
# xgrammar prefixes its messages with a time stamp and a C++ source location.
_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s*\S+:\d+:\s*")


class GuidedDecodingError(ValueError):
    """A guide that cannot be compiled, or a token the guide does not allow."""


class GuideCompiler:
    """Compiles guides for the model whose tokenizer lies in ``tokenizer_dir``.

    ``vocab_size`` is the model's (the width of its logits), which may exceed the tokenizer's when
    the embedding is padded: the padding ids are never allowed. Thread-safe.
    """

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        tokenizer = load_tokenizer(tokenizer_dir)
        self.vocab_size = vocab_size
        self.end_token_ids = [tokenizer.eos_id]
        info = _tokenizer_info(tokenizer, vocab_size)
        # The cache below is ours: bounded by entries, where xgrammar's is unbounded by default.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str | None], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        hidden = set(info.special_token_ids) | set(info.stop_token_ids)
        self._json_tables = _JsonTables(info.decoded_vocab, hidden, vocab_size)

    def compile(self, guide_type: str, guide: str | None, max_tokens: int | None = None) -> Guide:
        """A fresh :class:`Guide` for one request.

        ``max_tokens`` is the most tokens the request may generate (its ``max_tokens``, capped by
        the room left in the model's context); JSON mode then closes the object within it. Without
        it, JSON mode text is cut wherever the budget ends, like the other types.
        """
        if guide_type not in GUIDE_TYPES:
            raise GuidedDecodingError(
                f"unknown guided decoding guide type {guide_type!r}: expected one of {', '.join(GUIDE_TYPES)}"
            )
        if guide_type == "json":
            guide = None
        elif not isinstance(guide, str) or not guide.strip():
            raise GuidedDecodingError(f"guide type {guide_type!r} needs a guide (guided_decoding_guide)")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise GuidedDecodingError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        closer = None
        if guide_type == "json" and max_tokens is not None:
            if max_tokens < len(_JsonCloser.EMPTY):
                raise GuidedDecodingError(
                    f"JSON mode needs max_tokens >= {len(_JsonCloser.EMPTY)} to close the object, "
                    f"got {max_tokens}"
                )
            if self._json_tables.missing:
                raise GuidedDecodingError(
                    "JSON mode cannot bound this model's output: its vocabulary has no token for the "
                    f"bytes {self._json_tables.missing!r}"
                )
            closer = _JsonCloser(self._json_tables)
        with self._lock:
            compiled = self._cache.get((guide_type, guide))
            if compiled is None:
                compiled = self._compile(guide_type, guide)
                self._cache[(guide_type, guide)] = compiled
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end((guide_type, guide))
        return Guide(compiled, self.vocab_size, self.end_token_ids, closer, max_tokens)

    def _compile(self, guide_type: str, guide: str | None) -> xgr.CompiledGrammar:
        try:
            if guide_type == "json":
                # Any properties, any values; the root is an object.
                return self._compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if guide_type == "json_schema":
                try:
                    schema = json.loads(guide)
                except json.JSONDecodeError as e:
                    raise GuidedDecodingError(f"the JSON schema is not valid JSON: {e}") from e
                if not isinstance(schema, dict):
                    raise GuidedDecodingError("the JSON schema must be a JSON object")
                return self._compiler.compile_json_schema(guide, any_whitespace=False)
            if guide_type == "regex":
                return self._compiler.compile_regex(guide)
            return self._compiler.compile_grammar(guide)
        except RuntimeError as e:
            message = _XGRAMMAR_PREFIX.sub("", str(e)).strip()
            raise GuidedDecodingError(f"invalid {_GUIDE_NAMES[guide_type]}: {message}") from e


class Guide:
    """The grammar state of one request: :meth:`mask_logits` before each choice, :meth:`accept` after.

    Built by :meth:`GuideCompiler.compile`. ``end_token_ids`` end the text (EOS): they are allowed
    exactly when the grammar is complete.
    """

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        vocab_size: int,
        end_token_ids: list[int],
        closer: _JsonCloser | None = None,
        max_tokens: int | None = None,
    ):
        self.end_token_ids = list(end_token_ids)
        self.vocab_size = vocab_size
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bitmask_fresh = False  # the bitmask describes the current state
        # Bits of the end tokens in the packed bitmask layout (32 token ids per int32 word).
        self._end_bits = torch.zeros_like(self._bitmask[0])
        for token in self.end_token_ids:
            self._end_bits[token // 32] |= _bit(token % 32)
        self._closer = closer
        self._remaining = max_tokens

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of the tokens the guide does not allow next to -inf, in place."""
        if logits.dim() != 1 or logits.shape[0] != self.vocab_size:
            raise ValueError(f"expected logits of shape [{self.vocab_size}], got {list(logits.shape)}")
        if self._matcher.is_terminated():
            raise GuidedDecodingError("the guided text is complete: no token may follow")
        self._fill()
        xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device), vocab_size=self.vocab_size)
        if self._closer is not None:
            keep = self._closer.allowed(self._remaining)
            if keep is not None:
                logits.masked_fill_(~keep.to(logits.device), -torch.inf)
        if not bool((logits > -torch.inf).any()):
            raise GuidedDecodingError(
                "no token is allowed by both the guide and the other sampling settings"
            )

    def accept(self, token: int) -> None:
        """Advance past ``token``; raises GuidedDecodingError if the guide does not allow it."""
        if not self._matcher.accept_token(token):
            raise GuidedDecodingError(f"token {token} is not allowed by the guide here")
        self._bitmask_fresh = False
        if self._remaining is not None:
            self._remaining -= 1
        if self._closer is not None:
            self._closer.feed(token)

    def is_terminated(self) -> bool:
        """The text is complete: an end token was accepted, or only end tokens may follow."""
        if self._matcher.is_terminated():
            return True
        self._fill()
        words = self._bitmask[0]
        return bool((words & self._end_bits).any()) and not bool((words & ~self._end_bits).any())

    def _fill(self) -> None:
        if not self._bitmask_fresh:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            self._bitmask_fresh = True


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as a signed value (bit 31 is the sign)."""
    return (1 << i) - (1 << 32) * (i == 31)


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """The vocabulary as xgrammar sees it. Control tokens get empty text so that no guide allows
    them (inside a JSON string, "[INST]" would otherwise be fine text); EOS ends the text."""
    stop = [tokenizer.eos_id]
    if isinstance(tokenizer, MistralCommonTokenizer):
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        raw = tokenizer._raw
        n = min(raw.n_words, vocab_size)
        if isinstance(raw, Tekkenizer):
            # Tiktoken ranks are raw bytes; special tokens come out empty.
            vocab: list[str] | list[bytes] = [raw.id_to_byte_piece(i) for i in range(n)]
            return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop)
        # SentencePiece: "▁" is a space and "<0xAB>" a byte; it puts a space before the text.
        hidden = set(raw.special_ids) | {raw.unk_id}
        vocab = ["" if i in hidden else piece for i, piece in enumerate(raw.vocab()[:n])]
        return xgr.TokenizerInfo(
            vocab,
            xgr.VocabType.BYTE_FALLBACK,
            vocab_size=vocab_size,
            stop_token_ids=stop,
            add_prefix_space=True,
        )
    if isinstance(tokenizer, HuggingFaceTokenizer):
        tok = tokenizer._tok
        # xgrammar reads the vocabulary type from the tokenizer; special tokens are then hidden.
        detected = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stop)
        hidden = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        vocab = [""] * vocab_size
        for piece, i in tok.get_vocab().items():
            if i < vocab_size and i not in hidden:
                vocab[i] = piece
        return xgr.TokenizerInfo(
            vocab,
            detected.vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=stop,
            add_prefix_space=detected.add_prefix_space,
        )
    raise TypeError(f"guided decoding does not support {type(tokenizer).__name__}")


# How much one byte can lengthen the shortest closing text of a JSON prefix, in any state (see
# _JsonCloser.closing): "," after an object member needs ' "": 0' more, '"' opening a key '": 0',
# "f" opening a value in an array "alse", "u" after "\\" four hex digits instead of one escape
# character, ...; a UTF-8 lead byte needs its continuation bytes. Other bytes shorten it or
# leave it alone.
_GROWTH = [0] * 256
for _char, _growth in {
    ",": 6, '"': 4, "f": 4, "t": 3, "n": 3, "u": 3, "{": 1, "[": 1, "-": 1, "\\": 1, ".": 1, "e": 1, "E": 1
}.items():
    _GROWTH[ord(_char)] = _growth
for _byte in range(0xC0, 0x100):
    _GROWTH[_byte] = 1 if _byte < 0xE0 else 2 if _byte < 0xF0 else 3


# Every byte of a closing text: brackets, the rest of a literal, "0" values, hex digits and
# escapes, the smallest UTF-8 continuation bytes.
_CLOSING_BYTES = b'{}[]": 0nrueals\x80\x90\xa0'


class _JsonTables:
    """Per-vocabulary tables of JSON mode's budget rule."""

    def __init__(self, decoded_vocab: list[bytes], hidden: set[int], vocab_size: int):
        # Text of every token; none for special and end tokens.
        self.token_bytes = [b"" if i in hidden else piece for i, piece in enumerate(decoded_vocab)]
        # Bound on how much each token can lengthen the closing text.
        self.growth = torch.zeros(vocab_size, dtype=torch.int32)
        self.growth[: len(self.token_bytes)] = torch.tensor(
            [sum(_GROWTH[b] for b in piece) for piece in self.token_bytes], dtype=torch.int32
        )
        self.max_growth = int(self.growth.max())
        self.by_bytes: dict[bytes, list[int]] = {}
        for i, piece in enumerate(self.token_bytes):
            if piece:
                self.by_bytes.setdefault(piece, []).append(i)
        self.longest = max(map(len, self.by_bytes), default=1)
        # Bytes a closing text may need one token each for.
        self.missing = bytes(b for b in _CLOSING_BYTES if bytes([b]) not in self.by_bytes)


class _JsonCloser:
    """Follows a JSON object byte by byte and keeps it closable within the token budget.

    ``closing()`` is a short text that completes the JSON so far: the pending part of an
    escape, a multi-byte character or a literal, a closing quote, ``: 0`` after a key, ``0`` where
    a value or a digit is due, ``"": 0`` after a comma in an object, then the closing brackets;
    separators are json.dumps's (", " and ": "), as the compact grammar requires them. Every
    byte of it has a token of its own (the compiler checks the vocabulary), so it takes at most
    ``len(closing())`` tokens. Before each step with ``remaining`` tokens left the
    guide allows only (a) tokens whose growth bound keeps ``len(closing()) <= remaining - 1`` after
    them and (b) tokens that spell the start of ``closing()``, which shorten it. The invariant
    ``len(closing()) <= remaining`` holds from the start (``{}`` needs 2 tokens) to the end, where
    the text is therefore complete JSON. Far from the end nothing is filtered.
    """

    EMPTY = b"{}"
    _CLOSE = {ord("{"): b"}", ord("["): b"]"}
    _LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
    _WHITESPACE = frozenset(b" \t\n\r")
    _DIGITS = frozenset(b"0123456789")
    _HEX = frozenset(b"0123456789abcdefABCDEF")
    _CONTINUATION = frozenset(range(0x80, 0xC0))

    def __init__(self, tables: _JsonTables):
        self._tables = tables
        self._stack = bytearray()  # open "{" and "["
        # start | open_obj | open_arr | key | colon | value | string | literal | after | done, or in
        # a number: sign | int | dot | frac | exp | exp_sign | exp_int
        self._mode = "start"
        self._key = False  # the string is an object key
        self._sub = ""  # in a string: "" | escape | hex | utf8
        self._pending = b""  # bytes due in the escape / character / literal
        self._space_due = False  # after a separator's ":" or ","

    def closing(self) -> bytes:
        tail = b"".join(self._CLOSE[c] for c in reversed(self._stack))
        mode = self._mode
        if mode == "start":
            return self.EMPTY
        space = b" " if self._space_due else b""
        if mode in ("value", "sign", "dot", "exp", "exp_sign"):
            return space + b"0" + tail
        if mode == "key":
            return space + b'"": 0' + tail
        if mode == "colon":
            return b": 0" + tail
        if mode == "string":
            return self._pending + b'"' + (b": 0" if self._key else b"") + tail
        if mode == "literal":
            return self._pending + tail
        return tail

    def allowed(self, remaining: int) -> torch.Tensor | None:
        """Tokens that keep the object closable with ``remaining`` tokens left (this one included);
        None when any token does."""
        closing = self.closing()
        slack = remaining - 1 - len(closing)
        if slack >= self._tables.max_growth:
            return None
        keep = self._tables.growth <= slack
        for n in range(1, min(len(closing), self._tables.longest) + 1):
            keep[self._tables.by_bytes.get(closing[:n], [])] = True
        return keep

    def feed(self, token: int) -> None:
        for byte in self._tables.token_bytes[token]:
            self._feed_byte(byte)

    def _feed_byte(self, c: int) -> None:
        if self._space_due:
            self._space_due = False
            if c in self._WHITESPACE:
                return
        mode = self._mode
        if mode == "string":
            self._string_byte(c)
        elif mode in ("int", "frac", "exp_int"):
            self._number_byte(c)
        elif mode in ("sign", "dot", "exp", "exp_sign"):
            if c in self._DIGITS:
                self._mode = "exp_int" if mode.startswith("exp") else "frac" if mode == "dot" else "int"
            elif mode == "exp" and c in b"+-":
                self._mode = "exp_sign"
            else:
                self._lost(c)
        elif mode == "literal":
            if c != self._pending[0]:
                self._lost(c)
            self._pending = self._pending[1:]
            if not self._pending:
                self._mode = "after"
        elif mode == "start":
            if c != ord("{"):
                self._lost(c)
            self._open(c)
        elif c in self._WHITESPACE:
            pass
        elif mode in ("open_obj", "key") and c == ord('"'):
            self._mode, self._key, self._sub = "string", True, ""
        elif mode in ("open_obj", "open_arr", "after") and c in b"}]":
            self._close(c)
        elif mode in ("value", "open_arr"):
            self._value(c)
        elif mode == "colon" and c == ord(":"):
            self._mode, self._space_due = "value", True
        elif mode == "after" and c == ord(","):
            self._mode, self._space_due = ("key" if self._stack[-1] == ord("{") else "value"), True
        else:
            self._lost(c)

    def _string_byte(self, c: int) -> None:
        if self._sub == "escape":
            self._sub, self._pending = ("hex", b"0000") if c == ord("u") else ("", b"")
        elif self._sub:  # hex digits of "\u", or continuation bytes of a character
            if c not in (self._HEX if self._sub == "hex" else self._CONTINUATION):
                self._lost(c)
            self._pending = self._pending[1:]
            if not self._pending:
                self._sub = ""
        elif c == ord('"'):
            self._mode = "colon" if self._key else "after"
        elif c == ord("\\"):
            self._sub, self._pending = "escape", b"n"
        elif c >= 0xC0:
            # The smallest valid continuation: E0 needs A0.., F0 needs 90.., the others 80...
            first = {0xE0: 0xA0, 0xF0: 0x90}.get(c, 0x80)
            self._sub, self._pending = "utf8", bytes([first] + [0x80] * ((c >= 0xE0) + (c >= 0xF0)))

    def _number_byte(self, c: int) -> None:
        """A byte after a complete number: more of it, or the byte after it."""
        if c in self._DIGITS:
            return
        if c == ord(".") and self._mode == "int":
            self._mode = "dot"
        elif c in b"eE" and self._mode != "exp_int":
            self._mode = "exp"
        else:
            self._mode = "after"
            self._feed_byte(c)

    def _value(self, c: int) -> None:
        if c in b"{[":
            self._open(c)
        elif c == ord('"'):
            self._mode, self._key, self._sub = "string", False, ""
        elif c == ord("-"):
            self._mode = "sign"
        elif c in self._DIGITS:
            self._mode = "int"
        elif c in self._LITERALS:
            self._mode, self._pending = "literal", self._LITERALS[c]
        else:
            self._lost(c)

    def _open(self, c: int) -> None:
        self._stack.append(c)
        self._mode = "open_obj" if c == ord("{") else "open_arr"

    def _close(self, c: int) -> None:
        if not self._stack or self._CLOSE[self._stack[-1]][0] != c:
            self._lost(c)
        self._stack.pop()
        self._mode = "after" if self._stack else "done"

    def _lost(self, c: int) -> None:
        # The grammar accepted the byte, so this is a disagreement between it and this tracker.
        raise GuidedDecodingError(
            f"JSON mode lost track of the text at byte {bytes([c])!r} (state {self._mode})"
        )
