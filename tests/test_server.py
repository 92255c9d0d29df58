"""End to end through a real tritonserver on loopback: ensemble, BLS, engine contract, embeddings,
bad input. The `server` fixture (conftest.py) starts one tritonserver for the whole session."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from plateforme.clients.triton_client import EndpointError, GenerationParams, TritonEndpoints
from plateforme.python_backend.tokenization import load_tokenizer
from triton_helpers import grpc_stream, ints, strings, text_of

pytestmark = pytest.mark.server

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def hf_greedy_text(model_dir, prompt_ids, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


# -- the endpoint's contract ----------------------------------------------------------------
def test_every_model_is_ready(server):
    client = httpclient.InferenceServerClient(server.http_url)
    names = {m["name"] for m in client.get_model_repository_index()}
    for endpoint in ("mistral-tiny", "mistral-small", "smollm2"):
        for suffix in ("", "-preprocessing", "-engine", "-postprocessing", "-bls"):
            assert f"{endpoint}{suffix}" in names
            assert client.is_model_ready(f"{endpoint}{suffix}")
    assert client.is_model_ready("mistral-embed")


@pytest.mark.parametrize("endpoint,fixture", [("mistral-tiny", "tiny_mistral_dir"), ("mistral-small", "tiny_mixtral_dir")])
def test_ensemble_greedy_equals_hf_generate(server, request, endpoint, fixture):
    model_dir = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.encode_text(PROMPT)
    expected = hf_greedy_text(model_dir, prompt_ids, 24)
    responses = grpc_stream(server, endpoint, {"text_input": strings(PROMPT), "max_tokens": ints(24),
                                               "end_id": ints(-1)})
    assert len(responses) == 1
    assert text_of(responses) == tokenizer.decode(expected).rstrip("\ufffd")
    assert int(responses[0]["num_input_tokens"].reshape(-1)[0]) == len(prompt_ids)
    assert int(responses[0]["num_output_tokens"].reshape(-1)[0]) == 24
    assert responses[0]["finish_reason"].reshape(-1)[0].decode() == "length"


@pytest.mark.parametrize("model", ["mistral-tiny", "mistral-tiny-bls", "mistral-small", "smollm2", "smollm2-bls"])
def test_streamed_chunks_concatenate_to_the_full_answer(server, model):
    inputs = {"text_input": strings(PROMPT), "max_tokens": ints(40)}
    full = grpc_stream(server, model, inputs)
    chunks = grpc_stream(server, model, {**inputs, "stream": np.array([[True]])})
    assert len(full) == 1 and len(chunks) > 5
    assert text_of(chunks) == text_of(full)
    assert text_of(full)
    # Every chunk carries the request's own figures; only the last one a finish reason.
    def scalar(response, name):
        return response[name].reshape(-1)[0]
    assert {int(scalar(c, "num_input_tokens")) for c in chunks} == {int(scalar(full[0], "num_input_tokens"))}
    assert [scalar(c, "finish_reason").decode() for c in chunks] == [""] * (len(chunks) - 1) + [
        scalar(full[0], "finish_reason").decode()]
    counts = [int(scalar(c, "num_output_tokens")) for c in chunks]
    assert counts == sorted(counts) and counts[-1] == int(scalar(full[0], "num_output_tokens"))


def test_bls_answers_like_the_ensemble(server):
    inputs = {"text_input": strings(PROMPT), "max_tokens": ints(30)}
    assert text_of(grpc_stream(server, "mistral-tiny-bls", inputs)) == text_of(grpc_stream(server, "mistral-tiny", inputs))


def test_http_generate_and_generate_stream(server):
    def post(route, body):
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/smollm2/{route}",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read().decode()

    body = {"text_input": "Once upon a time", "max_tokens": 20, "temperature": 0.0}
    full = json.loads(post("generate", body))["text_output"]
    events = [json.loads(line[5:]) for line in post("generate_stream", {**body, "stream": True}).splitlines()
              if line.startswith("data:")]
    assert len(events) > 3
    assert "".join(e["text_output"] for e in events) == full


def test_demo_model_answers_the_capital_of_france(server):
    client = TritonEndpoints(server.grpc_url)
    answer = client.complete("smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                             params=GenerationParams(max_tokens=32, temperature=0))
    assert "Paris" in answer.text
    assert answer.finish_reason in ("end_id", "stop")
    assert answer.num_output_tokens < 32


def test_messages_use_the_mistral_chat_encoding(server, tiny_mistral_dir):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}
    tokenizer = load_tokenizer(tiny_mistral_dir)
    prompt_ids = tokenizer.encode_chat(chat)
    assert prompt_ids[0] == tokenizer.bos_id and prompt_ids[1] != tokenizer.bos_id  # one BOS
    responses = grpc_stream(server, "mistral-tiny", {"messages": strings(json.dumps(chat)), "max_tokens": ints(5)})
    assert int(responses[0]["num_input_tokens"].reshape(-1)[0]) == len(prompt_ids)


def test_stop_words_end_generation_and_are_not_returned(server, smollm2):
    inputs = {"text_input": strings(PROMPT), "max_tokens": ints(40)}
    full = text_of(grpc_stream(server, "smollm2", inputs))
    # A word from the middle of the answer whose tokens, as a stop word, occur in the answer's tokens.
    answer_ids = smollm2.encode_text(full, add_bos=False)

    def occurs(ids):
        return any(answer_ids[i:i + len(ids)] == ids for i in range(len(answer_ids)))

    words = full.split()
    stop = next(" " + w for w in words[len(words) // 3:] if w.isalpha() and occurs(smollm2.encode_stop_word(" " + w)))
    stopped = grpc_stream(server, "smollm2", {**inputs, "stop_words": strings(stop)})
    text = text_of(stopped)
    assert stopped[-1]["finish_reason"].reshape(-1)[0].decode() == "stop"
    assert full.startswith(text) and len(text) < len(full)
    assert full[len(text):].startswith(stop)  # cut right before the stop word, which is not returned
    # Written bare, as users of Mistral's API write `stop`, the word still stops the answer there (or
    # earlier, where its tokens occur without the space).
    bare = grpc_stream(server, "smollm2", {**inputs, "stop_words": strings(stop.strip())})
    assert bare[-1]["finish_reason"].reshape(-1)[0].decode() == "stop"
    assert text.startswith(text_of(bare))


def test_sampling_with_a_seed_is_reproducible(server):
    inputs = {"text_input": strings(PROMPT), "max_tokens": ints(20), "temperature": np.array([[1.0]], dtype=np.float32),
              "top_p": np.array([[1.0]], dtype=np.float32), "seed": np.array([[7]], dtype=np.uint64)}
    first = text_of(grpc_stream(server, "mistral-tiny", inputs))
    assert first == text_of(grpc_stream(server, "mistral-tiny", inputs))
    other = text_of(grpc_stream(server, "mistral-tiny", {**inputs, "seed": np.array([[8]], dtype=np.uint64)}))
    assert other != first


def test_without_max_tokens_an_answer_may_fill_the_context(server, tiny_mistral_dir):
    """As in Mistral's API: no max_tokens, no cap but the model's context (256 for the tiny model)."""
    responses = grpc_stream(server, "mistral-tiny", {"text_input": strings(PROMPT), "end_id": ints(-1)})
    last = responses[-1]
    prompt_tokens = int(last["num_input_tokens"].reshape(-1)[0])
    assert prompt_tokens + int(last["num_output_tokens"].reshape(-1)[0]) == 256
    assert last["finish_reason"].reshape(-1)[0].decode() == "model_length"


def test_prompt_is_echoed_only_when_asked(server, tiny_mistral_dir):
    inputs = {"text_input": strings(PROMPT), "max_tokens": ints(5)}
    plain = text_of(grpc_stream(server, "mistral-tiny", inputs))
    echoed = text_of(grpc_stream(server, "mistral-tiny", {**inputs, "exclude_input_in_output": np.array([[False]])}))
    assert not plain.startswith(PROMPT)
    assert echoed.startswith(PROMPT) and echoed.endswith(plain)


# -- embeddings -------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_embeddings_rank_similar_sentences_higher(server, protocol):
    client = TritonEndpoints(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)
    vectors, counts = client.embed("mistral-embed", ["A man is playing a guitar.", "Someone plays an instrument.",
                                                     "The stock market fell sharply today."])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > unrelated + 0.3
    assert all(c > 3 for c in counts)


# -- bad input: a clear error, and the server keeps serving ------------------------------------
BAD_INPUTS = {
    "no text": ({"max_tokens": ints(5)}, "text_input"),
    "empty text": ({"text_input": strings(""), "max_tokens": ints(5)}, "text_input"),
    "zero max_tokens": ({"text_input": strings("hi"), "max_tokens": ints(0)}, "max_tokens"),
    "negative max_tokens": ({"text_input": strings("hi"), "max_tokens": ints(-3)}, "max_tokens"),
    "absurd max_tokens": ({"text_input": strings("hi"), "max_tokens": ints(10**9)}, "max_tokens"),
    "prompt over context": ({"text_input": strings("hello " * 400), "max_tokens": ints(5)}, "context"),
    "invalid messages json": ({"messages": strings("{not json"), "max_tokens": ints(5)}, "JSON"),
    "unknown role": ({"messages": strings(json.dumps({"messages": [{"role": "wizard", "content": "x"}]})),
                      "max_tokens": ints(5)}, "role"),
    "both text and messages": ({"text_input": strings("hi"), "max_tokens": ints(5),
                                "messages": strings(json.dumps({"messages": [{"role": "user", "content": "x"}]}))},
                               "either"),
    "negative temperature": ({"text_input": strings("hi"), "max_tokens": ints(5),
                              "temperature": np.array([[-1.0]], dtype=np.float32)}, "temperature"),
}


@pytest.mark.parametrize("model", ["mistral-tiny", "mistral-tiny-bls"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(server, model, case):
    inputs, expected_word = BAD_INPUTS[case]
    with pytest.raises(EndpointError, match=f"(?i){expected_word}"):
        grpc_stream(server, model, inputs)


def test_wrong_dtype_is_rejected_by_triton(server):
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("text_input", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data.?type|dtype|expected"):
        client.infer("mistral-embed", [tensor])


def test_http_bad_input_is_a_400_and_server_stays_healthy(server):
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/mistral-tiny/generate",
                                     data=json.dumps({"text_input": "hi", "max_tokens": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    assert raised.value.code == 400
    assert "max_tokens" in raised.value.read().decode()
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready()
    assert text_of(grpc_stream(server, "mistral-tiny", {"text_input": strings("hi"), "max_tokens": ints(3)}))


def test_empty_embedding_text_is_an_error(server):
    with pytest.raises(EndpointError, match="non-empty"):
        TritonEndpoints(server.grpc_url).embed("mistral-embed", [""])


def test_postprocessing_decodes_a_token_by_token_stream_exactly(server, demo_assets):
    """Each chunk with the tokens before it as PREFIX_IDS: the pieces add up to the full decode."""
    tokenizer = load_tokenizer(demo_assets["smollm2-mistral"])
    text = "Café au lait 😀🇫🇷, 北京欢迎你 —  two  spaces\n\tand <|im_start|> kept"
    ids = tokenizer.encode_text(text, add_bos=False)
    client = httpclient.InferenceServerClient(server.http_url)
    pieces = []
    for index in range(len(ids)):
        prefix = ids[max(0, index - 16):index]
        inputs = []
        for name, array in (("TOKENS_BATCH", [[ids[index:index + 1]]]), ("SEQUENCE_LENGTH", [[1]]),
                            ("PREFIX_IDS", [[prefix]])):
            array = np.array(array, dtype=np.int32)
            tensor = httpclient.InferInput(name, list(array.shape), "INT32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("smollm2-postprocessing", inputs)
        pieces.append(result.as_numpy("OUTPUT").reshape(-1)[0].decode())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert any(piece == "" for piece in pieces)  # partial characters were withheld, not garbled
