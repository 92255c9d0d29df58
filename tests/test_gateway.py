"""The Mistral-compatible gateway in front of the test server, driven by the official `mistralai`
and `openai` SDKs, raw HTTP, a hypothesis fuzz of its request bodies and 32 concurrent streams."""
from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plateforme.clients.gateway import GatewayConfig, create_app
from plateforme.clients.sdk import SAFE_PROMPT
from plateforme.server import free_port

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
                                          "required": ["city"]}}}


def start_gateway(triton_url: str, api_keys: frozenset[str] = frozenset()):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(GatewayConfig(triton_url, api_keys=api_keys)),
                                          host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gateway(server):
    running, thread, url = start_gateway(server.grpc_url)
    yield url
    running.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=120) as client:
        yield client


# -- official SDKs ---------------------------------------------------------------------------
def test_mistralai_sdk_chat_stream_and_embeddings(gateway):
    from mistralai.client import Mistral

    client = Mistral(api_key="x", server_url=gateway)
    response = client.chat.complete(model="smollm2", messages=QUESTION, temperature=0.0, max_tokens=16)
    assert "Paris" in response.choices[0].message.content
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens > 5
    text = "".join(event.data.choices[0].delta.content or ""
                   for event in client.chat.stream(model="smollm2", messages=QUESTION, temperature=0.0, max_tokens=16))
    assert text == response.choices[0].message.content
    embeddings = client.embeddings.create(model="mistral-embed", inputs=["Paris", "Lyon"])
    assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 384
    assert {"smollm2", "mistral-embed"} <= {card.id for card in client.models.list().data}
    card = client.models.retrieve(model_id="mistral-embed")
    assert card.id == "mistral-embed" and card.type == "base" and not card.capabilities.completion_chat


def test_mistralai_sdk_tool_call(gateway):
    from mistralai.client import Mistral

    client = Mistral(api_key="x", server_url=gateway)
    response = client.chat.complete(model="mistral-tiny", messages=[{"role": "user", "content": "Weather?"}],
                                    tools=[WEATHER_TOOL], tool_choice="any", max_tokens=64, random_seed=0)
    call = response.choices[0].message.tool_calls[0]
    assert response.choices[0].finish_reason == "tool_calls" and len(call.id) == 9
    assert call.function.name == "get_weather"
    # The call and its result go back into the conversation (v3 encoding with ids).
    follow = client.chat.complete(model="mistral-tiny", max_tokens=4, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "name": "get_weather", "tool_call_id": call.id, "content": "sunny"}])
    assert follow.usage.completion_tokens >= 1


def test_openai_sdk_chat_stream_and_embeddings(gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway}/v1", api_key="x")
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in response.choices[0].message.content
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == response.choices[0].message.content
    embeddings = client.embeddings.create(model="mistral-embed", input=["Paris", "Lyon"], encoding_format="base64")
    assert np.frombuffer(base64.b64decode(embeddings.data[1].embedding), dtype="<f4").shape == (384,)
    tool = client.chat.completions.create(model="mistral-tiny", messages=[{"role": "user", "content": "Weather?"}],
                                          tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64)
    assert tool.choices[0].finish_reason == "tool_calls"
    assert json.loads(tool.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Paris", "Lyon")


# -- HTTP surface ----------------------------------------------------------------------------
def test_models_health_and_metrics(http):
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert {"mistral-tiny", "mistral-small", "mistral-embed", "open-mistral-7b", "open-mixtral-8x7b"} <= ids
    assert "mistral-medium" not in ids
    assert http.get("/v1/models/open-mixtral-8x7b").json()["root"] == "mistral-small"
    assert http.get("/v1/models/mistral-medium").status_code == 404
    # Function calling is announced where the tokenizer encodes tools: v3 yes, v1 no.
    capabilities = {m["id"]: m["capabilities"] for m in http.get("/v1/models").json()["data"]}
    assert capabilities["open-mistral-7b"] == {"completion_chat": True, "function_calling": True, "embedding": False}
    assert capabilities["mistral-small"]["function_calling"] is False
    assert capabilities["mistral-embed"] == {"completion_chat": False, "function_calling": False, "embedding": True}
    # The context the render wrote (the tiny model's 256, SmolLM2's 8192 capped); none for an embedder.
    contexts = {m["id"]: m.get("max_context_length") for m in http.get("/v1/models").json()["data"]}
    assert contexts["mistral-tiny"] == 256 and contexts["smollm2"] == 8192 and contexts["mistral-embed"] is None
    assert http.get("/health").json()["status"] == "ok"
    http.post("/v1/embeddings", json={"model": "mistral-embed", "input": "hi"})
    # Requests the gateway refuses itself are counted too.
    assert http.post("/v1/chat/completions", json={"model": "nope", "messages": QUESTION}).status_code == 404
    assert http.post("/v1/chat/completions", json={"model": "mistral-tiny", "messages": QUESTION,
                                                   "max_tokens": -1}).status_code == 422
    assert http.post("/v1/embeddings", json={"model": "mistral-tiny", "input": "hi"}).status_code == 400
    metrics = http.get("/metrics").text
    for model, route, status in (("mistral-embed", "embeddings", 200), ("nope", "chat", 404),
                                 ("mistral-tiny", "chat", 422), ("mistral-tiny", "embeddings", 400)):
        assert f'plateforme_gateway_requests_total{{model="{model}",route="{route}",status="{status}"}}' in metrics


def test_many_and_long_embedding_inputs(http):
    texts = [f"text number {i}" for i in range(100)] + ["word " * 2000]
    response = http.post("/v1/embeddings", json={"model": "mistral-embed", "input": texts})
    assert response.status_code == 200, response.text
    assert [item["index"] for item in response.json()["data"]] == list(range(101))
    single = http.post("/v1/embeddings", json={"model": "mistral-embed", "input": texts[7]}).json()
    assert np.allclose(response.json()["data"][7]["embedding"], single["data"][0]["embedding"], atol=1e-5)
    alone = http.post("/v1/embeddings", json={"model": "mistral-embed", "input": texts[-1]}).json()
    assert alone["usage"]["prompt_tokens"] == 256  # truncated to the embedder's trained length


def test_embeddings_base64_equals_float(http):
    body = {"model": "mistral-embed", "input": ["Paris is in France"]}
    floats = http.post("/v1/embeddings", json=body).json()
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats["data"][0]["embedding"]) and floats["object"] == "list"


def test_json_mode_and_safe_prompt(http):
    body = {"model": "mistral-tiny", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 40,
            "response_format": {"type": "json_object"}, "temperature": 1.0, "random_seed": 3}
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)
    plain = http.post("/v1/chat/completions", json={**body, "response_format": None}).json()["usage"]
    safe = http.post("/v1/chat/completions", json={**body, "response_format": None, "safe_prompt": True}).json()
    assert safe["usage"]["prompt_tokens"] > plain["prompt_tokens"] + len(SAFE_PROMPT.split())


@pytest.mark.parametrize("body,status", [
    ({"model": "mistral-tiny"}, 422),
    ({"model": "mistral-tiny", "messages": [{"role": "robot", "content": "x"}]}, 422),
    ({"model": "mistral-tiny", "messages": QUESTION, "max_tokens": 0}, 422),
    ({"model": "mistral-tiny", "messages": QUESTION, "tool_choice": "sometimes"}, 422),
    ({"model": "mistral-nope", "messages": QUESTION}, 404),
    ({"model": "mistral-embed", "messages": QUESTION}, 400),
    ({"model": "mistral-tiny", "messages": [{"role": "user", "content": "x " * 5000}], "max_tokens": 1}, 400),
    ({"model": "mistral-tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400),
    ({"model": "mistral-small", "messages": QUESTION, "tools": [WEATHER_TOOL]}, 400),
    ({"model": "mistral-small", "messages": QUESTION, "tools": [WEATHER_TOOL], "n": 3}, 400),
    ({"model": "mistral-tiny", "messages": QUESTION, "n": 17}, 422),
])
@pytest.mark.parametrize("stream", [False, True])
def test_client_errors_are_mistral_shaped(http, body, status, stream):
    response = http.post("/v1/chat/completions", json={**body, "stream": stream})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["object"] == "error" and error["message"]
    assert not error["message"].startswith("in ensemble")  # Triton's routing is not the caller's business


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"model": "mistral-tiny", "messages": QUESTION, "stop": ["\ud800"], "max_tokens": 2}),
    ("/v1/embeddings", {"model": "mistral-embed", "input": ["ok", "\ud800"]}),
    ("/v1/chat/completions", {"model": "mistral-tiny", "messages": [{"role": "user", "content": "a\ud800"}]}),
])
def test_text_that_is_not_unicode_is_a_400(http, route, body):
    # A lone surrogate: valid JSON ("\ud800"), no valid text.
    response = http.post(route, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "is not valid Unicode text" in response.json()["message"]


def test_a_body_that_is_not_json_is_named_so(http):
    response = http.post("/v1/chat/completions", content=b"garbage", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["message"] == "invalid request: the body is not valid JSON (Expecting value)"


def test_api_keys(server):
    running, thread, url = start_gateway(server.grpc_url, api_keys=frozenset({"k1"}))
    try:
        body = {"model": "mistral-embed", "input": "hi"}
        assert httpx.post(f"{url}/v1/embeddings", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer no"}).status_code == 401
        assert httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        running.should_exit = True
        thread.join(10)


def test_triton_down_is_503():
    running, thread, url = start_gateway(f"127.0.0.1:{free_port()}")
    try:
        for method, path, body in [("POST", "/v1/chat/completions", {"model": "mistral-tiny", "messages": QUESTION}),
                                   ("POST", "/v1/embeddings", {"model": "mistral-embed", "input": "x"}),
                                   ("GET", "/v1/models", None), ("GET", "/health", None)]:
            response = httpx.request(method, f"{url}{path}", json=body, timeout=30)
            assert response.status_code == 503 and response.json()["object"] == "error", path
    finally:
        running.should_exit = True
        thread.join(10)


TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}},
                                       "required": ["tz"]}}}


def test_tool_choice_modes(http):
    base = {"model": "mistral-tiny", "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 64,
            "tools": [WEATHER_TOOL, TIME_TOOL], "random_seed": 0}
    named = http.post("/v1/chat/completions", json={
        **base, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}).json()["choices"][0]
    assert named["finish_reason"] == "tool_calls"
    assert {c["function"]["name"] for c in named["message"]["tool_calls"]} == {"get_time"}
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in named["message"]["tool_calls"])
    single = http.post("/v1/chat/completions", json={**base, "tool_choice": "any", "parallel_tool_calls": False})
    assert len(single.json()["choices"][0]["message"]["tool_calls"]) == 1
    none = http.post("/v1/chat/completions", json={**base, "tool_choice": "none", "max_tokens": 1}).json()
    plain = http.post("/v1/chat/completions", json={**base, "tools": None, "max_tokens": 1}).json()
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]  # the tools are hidden
    auto = http.post("/v1/chat/completions", json={**base, "tool_choice": "auto", "max_tokens": 1}).json()
    assert auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20
    # Streamed, a call comes as one tool_calls delta with finish_reason tool_calls.
    with http.stream("POST", "/v1/chat/completions", json={**base, "tool_choice": "required", "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls" and last["delta"]["tool_calls"][0]["function"]["name"]
    # A function without parameters takes none.
    for function in ({"name": "get_time_now", "description": "The time"}, {"name": "get_time_now", "parameters": {}}):
        called = http.post("/v1/chat/completions", json={**base, "tools": [{"type": "function", "function": function}],
                                                         "tool_choice": "any"})
        assert called.status_code == 200, called.text
        call = called.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_time_now" and json.loads(call["function"]["arguments"]) == {}


def test_penalties_are_forwarded(http):
    body = {"model": "smollm2", "max_tokens": 40, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Write the word 'la' thirty times, separated by spaces."}]}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    penalised = http.post("/v1/chat/completions", json={**body, "frequency_penalty": 2.0}).json()
    assert penalised["choices"][0]["message"]["content"] != plain
    present = http.post("/v1/chat/completions", json={**body, "presence_penalty": 2.0}).json()
    assert present["choices"][0]["message"]["content"] != plain


def test_n_choices_whole_and_streamed(http):
    """`n` answers sampled with seeds seed, seed + 1, ...: streamed they interleave by index and
    concatenate to the whole answers; greedy ones are all the same."""
    body = {"model": "mistral-tiny", "messages": QUESTION, "max_tokens": 12, "temperature": 1.0, "random_seed": 5,
            "n": 3}
    whole = http.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert len(set(texts)) > 1, texts  # three seeds on a random model
    one = http.post("/v1/chat/completions", json={**body, "n": 1, "random_seed": 6}).json()
    assert one["choices"][0]["message"]["content"] == texts[1]
    assert whole["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert whole["usage"]["completion_tokens"] == 3 * 12

    streamed, ids, reasons, usages = {0: "", 1: "", 2: ""}, set(), {}, []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                ids.add((chunk["id"], chunk["created"]))
                choice = chunk["choices"][0]
                streamed[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
                if chunk.get("usage"):
                    usages.append(chunk["usage"])
    assert [streamed[i] for i in range(3)] == texts and len(ids) == 1
    assert reasons == {i: c["finish_reason"] for i, c in enumerate(whole["choices"])}
    assert usages == [whole["usage"]]  # once, on the last chunk: the prompt counted once

    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0.0, "n": 2}).json()
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]


def test_client_leaving_a_stream_cancels_it_in_triton(server, http):
    from test_sdk import wait_for_active, wait_for_idle_engine
    from triton_helpers import metric

    # The demo model, whose long answer outlasts the test's reads (the tiny random one may not).
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1000,
            "temperature": 1.0, "random_seed": 2, "stream": True}
    for _ in range(2):
        before = metric(server, "plateforme_engine_generated_tokens_total", "smollm2-engine")
        with httpx.Client(base_url=str(http.base_url), timeout=60) as client:  # its own connection, to drop
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ") and next(l for l in lines if l.startswith("data: "))
                wait_for_active(server, 1, "smollm2-engine", timeout=5)
        # The connection is gone: the gateway cancels its Triton stream and the engine frees the slot.
        wait_for_idle_engine(server, "smollm2-engine")
        generated = metric(server, "plateforme_engine_generated_tokens_total", "smollm2-engine") - before
        assert generated < 500, f"{generated} of 1000 tokens generated for a client that left"
    done = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}).json()
    assert done["usage"]["completion_tokens"] == 4
    metrics = http.get("/metrics").text
    assert 'plateforme_gateway_requests_total{model="smollm2",route="chat",status="499"}' in metrics


def test_client_leaving_a_whole_answer_stops_it_in_triton(server, http):
    """Not streamed: the gateway notices the disconnection while it waits, and stops the request."""
    from test_sdk import wait_for_idle_engine
    from triton_helpers import metric

    def generated():
        return metric(server, "plateforme_engine_generated_tokens_total", "smollm2-engine")

    before = generated()
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1500,
            "stream": False}
    with httpx.Client(base_url=str(http.base_url), timeout=1.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=body)  # gives up after 1.5 s and closes its connection
    wait_for_idle_engine(server, "smollm2-engine")
    assert generated() - before < 750, f"{generated() - before} of 1500 tokens generated for a client that left"


# -- fuzz and load ---------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                                 optional={"content": _json | st.text(max_size=20), "tool_calls": _json})
_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["mistral-tiny", "mistral-embed", "unknown", ""]),
     "messages": st.lists(_message, max_size=3) | _json},
    optional={"max_tokens": st.integers(-3, 4) | _json, "temperature": st.floats(-1, 3) | _json,
              "top_p": _json, "stop": _json, "random_seed": st.integers(-5, 2**64) | _json,
              "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}]) | _json,
              "tools": st.just([WEATHER_TOOL]) | _json, "tool_choice": _json | st.sampled_from(["any", "none"]),
              "stream": st.booleans(), "safe_prompt": _json, "n": _json})
_embed = st.fixed_dictionaries({"model": st.sampled_from(["mistral-embed", "mistral-tiny"])},
                               optional={"input": _json | st.lists(st.text(max_size=10), max_size=3),
                                         "encoding_format": _json})


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]), chat=_chat, embed=_embed)
def test_fuzzed_requests_never_get_a_5xx(http, route, chat, embed):
    body = chat if route.endswith("completions") else embed
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)
    elif route.endswith("completions"):
        body["max_tokens"] = 2
    response = http.post(route, json=body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["object"] == "error"


def test_32_concurrent_streams_stay_apart(http):
    def run(i):
        body = {"model": "mistral-tiny", "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": 12,
                "temperature": 1.0, "random_seed": i, "stream": True}
        ids, text = set(), ""
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            text += chunk["choices"][0]["delta"].get("content") or ""
        last = json.loads(lines[-2][6:])
        return ids, text, last["choices"][0]["finish_reason"], last["usage"]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    assert all(len(ids) == 1 for ids, _, _, _ in results)
    assert len({next(iter(ids)) for ids, _, _, _ in results}) == 32  # no chunk crossed into another stream
    assert all(reason in ("stop", "length") and usage["completion_tokens"] >= 1 for _, _, reason, usage in results)
    assert len({text for _, text, _, _ in results}) > 16  # different seeds and prompts, different answers
    # Each stream's text is the answer to its own request: replay some without streaming.
    for i in (0, 7, 19, 31):
        replay = http.post("/v1/chat/completions", json={
            "model": "mistral-tiny", "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": 12,
            "temperature": 1.0, "random_seed": i}).json()
        assert replay["choices"][0]["message"]["content"] == results[i][1]
