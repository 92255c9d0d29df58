"""Tokenizers for the serving pipeline: one interface over mistral-common tokenizer files and
Hugging Face tokenizers, for raw prompts, chat requests, stop words and decoding."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from plateforme.python_backend.chat import ChatRequestError, uses_tools, validate_chat_request

# mistral-common tokenizer files; their suffix names the tokenizer version.
_SENTENCEPIECE_FILE = re.compile(r".+\.model\.v\d+(m\d+)?")
_TEKKEN_FILE = "tekken.json"
_HF_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Text <-> token ids for one model."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int  # eos_id when the tokenizer has no padding token
    supports_tools: bool  # whether chat requests may carry `tools` (the Mistral API's function calling)

    @abstractmethod
    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of a raw prompt. Control tokens written as text become their ids; a leading BOS
        string stands for the BOS id, which is never doubled."""

    @abstractmethod
    def encode_chat(self, request: dict[str, Any]) -> list[int]:
        """Ids of a Mistral-API-shaped chat request, ready for generation (one BOS). Raises
        `ChatRequestError` for requests that cannot be encoded."""

    @abstractmethod
    def encode_stop_word(self, word: str) -> list[int]:
        """Ids of `word` as they appear in the middle of generated text (no BOS, no prefix space)."""

    def word_spellings(self, word: str) -> list[list[int]]:
        """The token sequences that spell `word` in generated text, as a stop or bad word: as it is
        and, for a word that does not start with a space, after a space. Words are mostly tokens
        with their leading space ("there" is " there" in "Hello there"), and users write them bare,
        as Mistral's API matches `stop` against the text."""
        spellings = [self.encode_stop_word(word)]
        if not word[:1].isspace():
            spaced = self.encode_stop_word(" " + word)
            if spaced not in spellings:
                spellings.append(spaced)
        return spellings

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids. Control tokens are rendered as their text; BOS, EOS and padding
        are not rendered. Ids outside the vocabulary raise ValueError."""

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids


class MistralCommonTokenizer(Tokenizer):
    """A mistral-common tokenizer file: SentencePiece `*.model.v<N>` or `tekken.json`.

    Chat requests go through mistral-common's own encoder; raw text is split on control-token
    strings, as Hugging Face tokenizers do, and each piece is encoded by the underlying
    SentencePiece / Tekken model.
    """

    def __init__(self, path: str | Path):
        # Imported here: endpoints with a Hugging Face tokenizer do not need mistral-common.
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        self.path = Path(path)
        self._mistral = MistralTokenizer.from_file(str(self.path))
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.version = self._mistral.version.value
        self.supports_tools = self.version != "v1"
        self.vocab_size = self._raw.n_words
        self.bos_id = self._raw.bos_id
        self.eos_id = self._raw.eos_id
        self.pad_id = self._raw.pad_id if self._raw.pad_id >= 0 else self.eos_id
        self._hidden = {self.bos_id, self.eos_id, self.pad_id}
        self._special_text = {i: str(self._raw.id_to_piece(i)) for i in self._raw.special_ids}
        self._special_ids = {text: i for i, text in self._special_text.items()}
        longest_first = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first)))
        # SentencePiece puts a "▁" (space) before every encoded string and drops it from the start of
        # every decoded one. Text that follows a control token must not get it, so it is encoded and
        # decoded behind a newline, which no piece of the vocabulary merges with.
        self._glue: list[int] = []
        if isinstance(self._raw, SentencePieceTokenizer):
            if any("\n" in piece for piece in self._raw.vocab()):
                raise ValueError(f"{self.path}: SentencePiece vocabulary with newline pieces is not supported")
            self._glue = self._raw.encode("\n", bos=False, eos=False)

    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._encode(text, at_start=True)
        if add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def encode_chat(self, request: dict[str, Any]) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        request = validate_chat_request(request)
        if not self.supports_tools and uses_tools(request):
            raise ChatRequestError("this model's tokenizer (mistral-common v1) does not support tools")
        try:
            chat = ChatCompletionRequest.model_validate(
                {"messages": request["messages"], "tools": request.get("tools")}
            )
            return list(self._mistral.encode_chat_completion(chat).tokens)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ChatRequestError(f"invalid chat request: {problems}") from e
        except MistralCommonException as e:
            raise ChatRequestError(f"invalid chat request: {e}") from e

    def encode_stop_word(self, word: str) -> list[int]:
        if not word:
            raise ValueError("stop word is empty")
        return self._encode(word, at_start=False)

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        run: list[int] = []  # ordinary tokens since the last control token
        for i in self._check_ids(ids):
            if i in self._hidden:
                continue
            special = self._special_text.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_run(run, at_start=not parts))
                run = []
            parts.append(special)
        if run:
            parts.append(self._decode_run(run, at_start=not parts))
        return "".join(parts)

    def _encode(self, text: str, at_start: bool) -> list[int]:
        """Split `text` on control-token strings; text right at the start (or after BOS) is encoded
        as a sequence start, text after any other token as a continuation."""
        ids: list[int] = []
        pos = 0
        for match in self._special_re.finditer(text):
            ids += self._encode_run(text[pos : match.start()], at_start)
            ids.append(self._special_ids[match.group()])
            at_start = ids == [self.bos_id]
            pos = match.end()
        return ids + self._encode_run(text[pos:], at_start)

    def _encode_run(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start or not self._glue:
            return self._raw.encode(text, bos=False, eos=False)
        return self._raw.encode("\n" + text, bos=False, eos=False)[len(self._glue) :]

    def _decode_run(self, ids: list[int], at_start: bool) -> str:
        if at_start or not self._glue:
            return self._raw.decode(ids)
        return self._raw.decode(self._glue + ids)[len("\n") :]


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer (`tokenizer.json`), with the checkpoint's chat template."""

    def __init__(self, model_dir: str | Path):
        # Imported here: transformers takes seconds to import and Mistral endpoints do not need it.
        from transformers import AutoTokenizer

        self.path = Path(model_dir)
        self._tok = AutoTokenizer.from_pretrained(str(self.path))
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise ValueError(f"{self.path}: the tokenizer defines no EOS token")
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        # BOS is the token the tokenizer itself puts before a sequence; a bos_token it never adds
        # (SmolLM2 names "<|im_start|>") is ordinary text for encoding and decoding.
        bos = self._tok.bos_token_id
        added = self._tok.encode("a", add_special_tokens=True)
        plain = self._tok.encode("a", add_special_tokens=False)
        self.bos_id = bos if bos is not None and added[:1] == [bos] and plain[:1] != [bos] else None
        self._hidden = {self.eos_id, self.pad_id} | ({self.bos_id} if self.bos_id is not None else set())
        self._glue = self._tok.encode("\n", add_special_tokens=False)
        # The Rust tokenizer itself, for plain text: transformers' wrapper adds ~0.1 ms a call
        # around it, paid on every request and every streamed chunk.
        self._rust = self._tok.backend_tokenizer if self._tok.is_fast else None
        self.supports_tools = "tools" in self._template_source()

    def _template_source(self) -> str:
        template = self._tok.chat_template or ""
        return " ".join(template.values()) if isinstance(template, dict) else template

    def _encode_plain(self, text: str) -> list[int]:
        if self._rust is not None:
            return self._rust.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special_tokens=False)

    def encode_text(self, text: str, add_bos: bool = True) -> list[int]:
        explicit_bos = self.bos_id is not None and text.startswith(self._tok.bos_token)
        if explicit_bos:
            text = text[len(self._tok.bos_token) :]
        ids = self._encode_plain(text)
        if self.bos_id is not None and (add_bos or explicit_bos):
            ids.insert(0, self.bos_id)
        return ids

    def encode_chat(self, request: dict[str, Any]) -> list[int]:
        from jinja2 import TemplateError

        request = validate_chat_request(request)
        source = self._template_source()
        if not source:
            raise ChatRequestError("this model has no chat template; send a raw prompt instead")
        messages, tools = request["messages"], request.get("tools")
        if tools and not self.supports_tools:
            raise ChatRequestError("this model's chat template does not support tools")
        if any(m.get("tool_calls") for m in messages) and "tool_calls" not in source:
            raise ChatRequestError("this model's chat template does not support tool calls")
        try:
            ids = self._tok.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (TemplateError, TypeError, ValueError) as e:
            raise ChatRequestError(f"the chat template rejected the conversation: {e}") from e
        ids = list(ids)
        if self.bos_id is None:
            return ids
        # Templates write the BOS text themselves; keep exactly one whatever they do.
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        return [self.bos_id, *ids[start:]]

    def encode_stop_word(self, word: str) -> list[int]:
        if not word:
            raise ValueError("stop word is empty")
        # Encoded behind a newline so that a tokenizer adding a prefix space (Metaspace) does not.
        ids = self._encode_plain("\n" + word)
        if ids[: len(self._glue)] == self._glue:
            return ids[len(self._glue) :]
        # The newline merged with the word (e.g. "\n\n" in byte-level BPE): encode it alone.
        return self._encode_plain(word)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in self._check_ids(ids) if i not in self._hidden]
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a model directory: a mistral-common file (`*.model.v<N>`, `tekken.json`)
    wins over a Hugging Face `tokenizer.json`, as Mistral checkpoints ship both."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    mistral_files = sorted(
        p for p in model_dir.iterdir() if p.name == _TEKKEN_FILE or _SENTENCEPIECE_FILE.fullmatch(p.name)
    )
    if len(mistral_files) > 1:
        names = ", ".join(p.name for p in mistral_files)
        raise ValueError(f"{model_dir} holds several mistral-common tokenizer files ({names}); keep one")
    if mistral_files:
        return MistralCommonTokenizer(mistral_files[0])
    if (model_dir / _HF_FILE).is_file():
        return HuggingFaceTokenizer(model_dir)
    raise ValueError(
        f"no tokenizer in {model_dir}: expected a mistral-common file (tokenizer.model.v<N> or "
        f"{_TEKKEN_FILE}) or a Hugging Face {_HF_FILE}"
    )
