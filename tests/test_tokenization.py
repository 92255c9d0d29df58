"""Tokenizers: raw prompts, chat requests, stop words and decoding, for mistral-common (v1, v3,
Tekken) and Hugging Face (SmolLM2's byte-level BPE with a ChatML template) tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from plateforme.python_backend.chat import ChatRequestError, parse_chat_request
from plateforme.python_backend.tokenization import (
    HuggingFaceTokenizer,
    MistralCommonTokenizer,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory):
    import mistral_common

    out = tmp_path_factory.mktemp("tekken")
    (out / "tekken.json").symlink_to(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    return out


@pytest.fixture(scope="module")
def tekken(tekken_dir):
    return load_tokenizer(tekken_dir)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def reference_chat(model_dir: Path, request: dict) -> list[int]:
    """mistral-common's own encoding of a chat request."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    (path,) = [p for p in model_dir.iterdir() if p.name.startswith("tokenizer.model.") or p.name == "tekken.json"]
    return MistralTokenizer.from_file(str(path)).encode_chat_completion(ChatCompletionRequest(**request)).tokens


TEXTS = [
    "Hello world",
    "  two leading spaces, three   inside, one trailing ",
    "line one\nline two\n\n\n  indented\tand a tab",
    "accents: héllo wörld, façade, naïve; Ünïcödé",
    "emoji 😀🎉 and a family 👨\u200d👩\u200d👧, rare ꙮ𝔘",
    "中文文本，日本語のテキスト",
]

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Réponds en français 🇮🇹"},
    ]
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOL_CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call00001", "name": "get_weather"},
    ],
    "tools": [WEATHER_TOOL],
}


# --- loading ------------------------------------------------------------------------------------


def test_load_picks_tokenizer_by_files(v1, v3, tekken, smollm2):
    assert isinstance(v1, MistralCommonTokenizer) and v1.version == "v1"
    assert (v1.vocab_size, v1.bos_id, v1.eos_id, v1.pad_id) == (32000, 1, 2, 2)
    assert isinstance(v3, MistralCommonTokenizer) and v3.version == "v3"
    assert (v3.vocab_size, v3.bos_id, v3.eos_id, v3.pad_id) == (32768, 1, 2, 2)
    assert isinstance(tekken, MistralCommonTokenizer)
    assert (tekken.vocab_size, tekken.bos_id, tekken.eos_id, tekken.pad_id) == (131072, 1, 2, 11)
    assert isinstance(smollm2, HuggingFaceTokenizer)
    # SmolLM2 names "<|im_start|>" its BOS but never prepends it: no BOS.
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (49152, None, 2, 2)


def test_mistral_file_wins_over_tokenizer_json(tmp_path, tiny_mistral_dir, smollm2_dir):
    (tmp_path / "tokenizer.model.v3").symlink_to(tiny_mistral_dir / "tokenizer.model.v3")
    (tmp_path / "tokenizer.json").symlink_to(smollm2_dir / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path), MistralCommonTokenizer)


def test_chat_template_inside_tokenizer_config(tmp_path, smollm2_reference, smollm2):
    smollm2_reference.save_pretrained(tmp_path, save_jinja_files=False)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert load_tokenizer(tmp_path).encode_chat(CONVERSATION) == smollm2.encode_chat(CONVERSATION)


def test_load_errors(tmp_path, tiny_mistral_dir, tiny_mixtral_dir):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model.v3").symlink_to(tiny_mistral_dir / "tokenizer.model.v3")
    (tmp_path / "tokenizer.model.v1").symlink_to(tiny_mixtral_dir / "tokenizer.model.v1")
    with pytest.raises(ValueError, match="several mistral-common tokenizer files"):
        load_tokenizer(tmp_path)


# --- raw text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "smollm2"])
def test_text_round_trip(request, name):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok.encode_text(text)
        assert ids.count(tok.bos_id) == (1 if tok.bos_id is not None else 0)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode_text(text, add_bos=False)) == text


@pytest.mark.parametrize("name", ["v1", "v3", "tekken"])
def test_written_bos_is_not_doubled(request, name):
    tok = request.getfixturevalue(name)
    prompt = "[INST] What is 2+2? [/INST]"
    expected = tok.encode_text(prompt)
    assert expected[0] == tok.bos_id and expected.count(tok.bos_id) == 1
    assert tok.encode_text("<s>" + prompt) == expected
    assert tok.encode_text("<s>" + prompt, add_bos=False) == expected
    assert tok.encode_text(prompt, add_bos=False) == expected[1:]


def test_v3_control_tokens_written_as_text(v3, tiny_mistral_dir):
    ids = v3.encode_text("<s>[INST] hi [/INST]")
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert v3.decode(ids) == "[INST] hi [/INST]"
    # Written the way mistral-common lays a user turn out, the prompt is its exact encoding.
    one_turn = {"messages": [{"role": "user", "content": "hi"}]}
    assert v3.encode_text("[INST] hi[/INST]") == reference_chat(tiny_mistral_dir, one_turn)
    assert v3.encode_text("[TOOL_CALLS][AVAILABLE_TOOLS]", add_bos=False) == [5, 6]


def test_v1_classic_prompt_is_mistral_common_encoding(v1, tiny_mixtral_dir):
    # v1 has no [INST] control tokens: the markers are plain text.
    one_turn = {"messages": [{"role": "user", "content": "hi"}]}
    assert v1.encode_text("<s>[INST] hi [/INST]") == reference_chat(tiny_mixtral_dir, one_turn)


def test_hf_control_tokens_written_as_text(smollm2, smollm2_reference):
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.encode_text(text)
    assert ids == smollm2_reference.encode(text, add_special_tokens=False)
    assert ids[0] == smollm2_reference.convert_tokens_to_ids("<|im_start|>") and smollm2.eos_id in ids


@pytest.mark.parametrize("text", ["Hello, world!", "  leading spaces\n\ttabs and  doubles  ", "naïve café — 日本語 🙂",
                                  "x = [1, 2]  # code\n\n\nend", "<|im_end|> mid <|endoftext|> text"])
def test_hf_text_matches_transformers(smollm2, smollm2_reference, text):
    """Plain text goes straight to the Rust tokenizer: same ids and text as transformers' wrapper."""
    ids = smollm2.encode_text(text)
    assert ids == smollm2_reference.encode(text, add_special_tokens=False)
    visible = [i for i in ids if i != smollm2.eos_id]
    assert smollm2.decode(ids) == smollm2_reference.decode(visible, skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False)


# --- chat ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dir_name", [("v1", "tiny_mixtral_dir"), ("v3", "tiny_mistral_dir"), ("tekken", "tekken_dir")]
)
def test_chat_is_mistral_common_encoding(request, name, dir_name):
    tok, model_dir = request.getfixturevalue(name), request.getfixturevalue(dir_name)
    ids = tok.encode_chat(CONVERSATION)
    assert ids == reference_chat(model_dir, CONVERSATION)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("name, dir_name", [("v3", "tiny_mistral_dir"), ("tekken", "tekken_dir")])
def test_tool_conversation_is_mistral_common_encoding(request, name, dir_name):
    tok, model_dir = request.getfixturevalue(name), request.getfixturevalue(dir_name)
    ids = tok.encode_chat(TOOL_CONVERSATION)
    assert ids == reference_chat(model_dir, TOOL_CONVERSATION)
    text = tok.decode(ids)
    for marker in ("[AVAILABLE_TOOLS]", "[INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]"):
        assert marker in text
    assert '"get_weather"' in text and "call00001" in text


def test_v1_refuses_tools(v1):
    with pytest.raises(ChatRequestError, match="v1.*does not support tools"):
        v1.encode_chat(TOOL_CONVERSATION)
    with pytest.raises(ChatRequestError, match="does not support tools"):
        v1.encode_chat({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]})


def test_hf_chat_is_apply_chat_template(smollm2, smollm2_reference):
    one_turn = [{"role": "user", "content": "hi"}]
    for messages in (CONVERSATION["messages"], one_turn):
        expected = smollm2_reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert smollm2.encode_chat({"messages": messages}) == list(expected)
    ids = smollm2.encode_chat({"messages": one_turn})
    assert smollm2.decode(ids).endswith("<|im_start|>user\nhi\n<|im_start|>assistant\n")  # <|im_end|> is EOS


def test_text_chunks_equal_string_content(v3, smollm2):
    chunks = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    chunked = {"messages": [{"role": "user", "content": chunks}]}
    plain = {"messages": [{"role": "user", "content": "Hello there"}]}
    assert v3.encode_chat(chunked) == v3.encode_chat(plain)
    assert smollm2.encode_chat(chunked) == smollm2.encode_chat(plain)


def test_hf_template_without_tools(smollm2):
    with pytest.raises(ChatRequestError, match="chat template does not support tools"):
        smollm2.encode_chat({"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]})
    with pytest.raises(ChatRequestError, match="does not support tool calls"):
        smollm2.encode_chat({"messages": TOOL_CONVERSATION["messages"]})


USER = {"role": "user", "content": "hi"}
BAD_REQUESTS = [
    (["hi"], "must be a JSON object, got array"),
    ({}, "non-empty 'messages'"),
    ({"messages": []}, "non-empty 'messages'"),
    ({"messages": "hi"}, "non-empty 'messages'"),
    ({"messages": ["hi"]}, r"messages\[0\] must be an object, got string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\].role must be one of"),
    ({"messages": [{"content": "hi"}]}, r"role must be one of .*got None"),
    ({"messages": [{"role": "user", "content": 42}]}, r"messages\[0\].content must be a string .*got number"),
    ({"messages": [{"role": "user"}]}, "content must be a string or a list of text chunks, got null"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, r"content\[0\] must be a text chunk"),
    ({"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "unexpected key.*weight"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "all"}, "'tools' must be a list"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, r"tools\[0\]"),
    (
        {"messages": [USER, {"role": "assistant", "tool_calls": {}}, USER]},
        r"messages\[1\].tool_calls must be a list",
    ),
    (
        {"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}, USER]},
        "arguments must be a JSON string or an object",
    ),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, "tool_call_id must be a string"),
]


@pytest.mark.parametrize("name", ["v3", "smollm2"])
@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_chat_request_errors(request, name, bad, message):
    tok = request.getfixturevalue(name)
    with pytest.raises(ChatRequestError, match=message):
        tok.encode_chat(bad)


def test_mistral_common_validation_errors(v3):
    bad_id = json.loads(json.dumps(TOOL_CONVERSATION).replace("call00001", "bad"))
    with pytest.raises(ChatRequestError, match="invalid chat request: Tool call id was bad"):
        v3.encode_chat(bad_id)
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": "none"}}
    bad_schema = {"messages": [{"role": "user", "content": "hi"}], "tools": [bad_tool]}
    with pytest.raises(ChatRequestError, match="invalid chat request: tools.0.function.parameters"):
        v3.encode_chat(bad_schema)
    assert issubclass(ChatRequestError, ValueError)


def test_parse_chat_request():
    with pytest.raises(ChatRequestError, match="not valid JSON"):
        parse_chat_request('{"messages": [')
    with pytest.raises(ChatRequestError, match="last message"):
        parse_chat_request(b'{"messages": [{"role": "assistant", "content": "hi"}]}')
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "temperature": 0.3}
    assert parse_chat_request(json.dumps(body)) == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.3}


# --- stop words ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "smollm2"])
def test_stop_word_ids_as_generated(request, name):
    tok = request.getfixturevalue(name)
    # (generated text before the word, stop word)
    for before, word in [("Yes", "\n\n"), ("ok\n", "User:"), ("Sure,", " hello"), ("ok\n", "Observation")]:
        stop = tok.encode_stop_word(word)
        assert stop and tok.bos_id not in stop
        assert tok.encode_text(before + word, add_bos=False)[-len(stop) :] == stop, word
        assert tok.decode([*tok.encode_text("a", add_bos=False), *stop]) == "a" + word
    with pytest.raises(ValueError, match="stop word is empty"):
        tok.encode_stop_word("")


def test_sentencepiece_stop_word_has_no_prefix_space(v1, v3):
    for tok in (v1, v3):
        alone = tok.encode_text("\n\n", add_bos=False)
        # SentencePiece encodes a lone prefix space before the newlines; generation never has it.
        assert len(alone) == 3 and tok.decode(alone[:1]) == ""
        assert tok.encode_stop_word("\n\n") == alone[1:]


def test_control_token_stop_words(v3, tekken, smollm2):
    assert v3.encode_stop_word("[/INST]") == [4]
    assert tekken.encode_stop_word("[TOOL_CALLS]") == [9]
    assert smollm2.encode_stop_word("<|im_end|>") == [2]


def test_a_bare_stop_word_is_also_spelled_after_a_space(v3, tekken, smollm2):
    for tok in (v3, tekken, smollm2):
        spellings = tok.word_spellings("there")
        assert spellings[0] == tok.encode_stop_word("there") and tok.decode(spellings[0]) == "there"
        assert spellings[1:] == [tok.encode_stop_word(" there")] and spellings[1] != spellings[0]
        assert tok.word_spellings(" there") == [tok.encode_stop_word(" there")]


# --- decoding -----------------------------------------------------------------------------------


def test_control_tokens_survive_decode(v3, tekken, smollm2):
    call = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert v3.decode([5, *v3.encode_stop_word(call)]) == "[TOOL_CALLS]" + call
    assert tekken.decode([9, *tekken.encode_stop_word(call)]) == "[TOOL_CALLS]" + call
    im_start = smollm2.encode_stop_word("<|im_start|>")
    assert smollm2.decode([*im_start, *smollm2.encode_stop_word("user")]) == "<|im_start|>user"


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "smollm2"])
def test_decode_hides_bos_eos_pad(request, name):
    tok = request.getfixturevalue(name)
    ids = tok.encode_text("Bonjour à tous", add_bos=False)
    framed = [*([tok.bos_id] if tok.bos_id is not None else []), *ids, tok.eos_id, tok.pad_id]
    assert tok.decode(framed) == tok.decode(ids) == "Bonjour à tous"
    assert tok.decode(np.array(framed, dtype=np.int32)) == "Bonjour à tous"


@pytest.mark.parametrize("name", ["v1", "v3", "tekken", "smollm2"])
def test_decode_rejects_out_of_range_ids(request, name):
    tok = request.getfixturevalue(name)
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            tok.decode([5, bad])
