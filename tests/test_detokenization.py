"""Incremental detokenization: streamed text, however the tokens are chunked, adds up to the text
of the whole generation, on SentencePiece (v1, v3) and byte-level BPE (SmolLM2) tokenizers."""
from __future__ import annotations

import random

import pytest

from plateforme.python_backend.detokenization import (
    STREAM_PREFIX_TOKENS,
    IncrementalDetokenizer,
    complete_text,
    decode_increment,
)

TOKENIZERS = ["v1", "v3", "smollm2"]

TEXTS = [
    "Hello world, how   are you?\n\n  Fine, thanks.\t",
    "accents: héllo wörld, façade, naïve; Ünïcödé",
    "emoji 😀🎉 👨\u200d👩\u200d👧 🇫🇷 and rare ꙮ𝔘𝔫𝔦",
    "中文文本，日本語のテキスト、한국어",
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Zürich"}}]',
    "<|im_start|>assistant\n  indented\n\n\nend<|im_end|>\n",
]


def sequences(tok, rng: random.Random) -> list[list[int]]:
    """Encoded texts, and random ids weighted towards the low ids where control and byte tokens sit."""
    out = [tok.encode_text(text, add_bos=False) for text in TEXTS]
    out.append(tok.encode_text("".join(TEXTS), add_bos=False))
    for _ in range(12):
        n = rng.randint(1, 60)
        out.append([rng.choice((rng.randrange(300), rng.randrange(tok.vocab_size))) for _ in range(n)])
    return out


def chunkings(ids: list[int], rng: random.Random) -> list[list[list[int]]]:
    """Per-token chunks (the worst case), and random chunk sizes."""
    random_chunks, pos = [], 0
    while pos < len(ids):
        size = rng.choice((1, 2, 3, 5, 17))
        random_chunks.append(ids[pos : pos + size])
        pos += size
    return [[[i] for i in ids], random_chunks]


def stream_stateless(tok, chunks: list[list[int]]) -> str:
    """What Triton's postprocessing emits: each response carries its new ids and up to
    STREAM_PREFIX_TOKENS ids streamed before them."""
    streamed: list[int] = []
    parts = []
    for chunk in chunks:
        parts.append(decode_increment(tok, streamed[-STREAM_PREFIX_TOKENS:], chunk))
        streamed += chunk
    return "".join(parts)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_text_adds_up(request, name):
    tok = request.getfixturevalue(name)
    rng = random.Random(sum(map(ord, name)))
    for ids in sequences(tok, rng):
        expected = complete_text(tok, ids)
        for chunks in chunkings(ids, rng):
            assert stream_stateless(tok, chunks) == expected, (ids, chunks)
            detok = IncrementalDetokenizer(tok)
            pushed = "".join(detok.push(chunk) for chunk in chunks)
            assert pushed == detok.text == expected, (ids, chunks)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_text_is_the_text(request, name):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok.encode_text(text, add_bos=False)
        detok = IncrementalDetokenizer(tok)
        for i in ids:
            detok.push([i])
        expected = text.replace("<|im_end|>", "") if name == "smollm2" else text  # EOS is not rendered
        assert detok.text == expected


def test_incomplete_character_is_withheld(v1):
    ids = v1.encode_stop_word("ꙮ")  # three byte-fallback tokens
    assert len(ids) == 3
    assert [complete_text(v1, ids[:k]) for k in range(4)] == ["", "", "", "ꙮ"]
    assert v1.decode(ids[:2]).endswith("\ufffd")
    detok = IncrementalDetokenizer(v1)
    assert [detok.push([i]) for i in ids] == ["", "", "ꙮ"]


def test_space_of_a_new_word_is_kept(v1, v3):
    for tok in (v1, v3):
        prefix = tok.encode_text("Hello", add_bos=False)
        word = tok.encode_stop_word(" world")
        assert tok.decode(word) == "world"  # decoded alone, SentencePiece drops the space
        assert decode_increment(tok, prefix, word) == " world"


def test_decode_increment_edges(v3):
    assert decode_increment(v3, [], []) == ""
    assert decode_increment(v3, v3.encode_text("Hi", add_bos=False), []) == ""
    assert decode_increment(v3, [], [5]) == "[TOOL_CALLS]"
    assert decode_increment(v3, [], [v3.eos_id]) == ""


def test_decode_increment_survives_unstable_context():
    class Shifting:
        """A decoder whose text for the context changes once more tokens follow."""

        def decode(self, ids):
            return "".join("ab"[i] for i in ids) if len(ids) < 3 else "x" + "".join("ab"[i] for i in ids)

    assert decode_increment(Shifting(), [0, 1], [0]) == "xaba"


def test_detokenizer_keeps_a_bounded_context(v3):
    ids = v3.encode_text("word " * 200, add_bos=False)
    detok = IncrementalDetokenizer(v3)
    for i in ids:
        detok.push([i])
        assert len(detok.context) <= STREAM_PREFIX_TOKENS
    assert detok.context == tuple(ids[-STREAM_PREFIX_TOKENS:])
    assert detok.text == ("word " * 200)
    with pytest.raises(ValueError, match="at least 1 token"):
        IncrementalDetokenizer(v3, window=0)
