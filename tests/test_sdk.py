"""The mistralai-shaped client (clients/sdk.py) and the endpoint registry, against the test server;
the `[TOOL_CALLS]` parser and the request mapping as units."""
from __future__ import annotations

import json
import re
import time

import pytest

from plateforme.clients.registry import Registry
from plateforme.clients.triton_client import triton_address
from plateforme.clients.sdk import (
    SAFE_PROMPT, AnswerTimeoutError, InvalidRequestError, ModelNotFoundError, PlateformeClient, ServerUnavailableError,
    parse_tool_calls, plan_chat,
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# -- units -----------------------------------------------------------------------------------
def test_parse_tool_calls_parallel_calls_with_nine_character_ids():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
           '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}]'
    calls = parse_tool_calls(text)
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"tz": "CET"}]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", c.id) for c in calls) and calls[0].id != calls[1].id
    assert [c.index for c in calls] == [0, 1]


@pytest.mark.parametrize("text,names", [
    (' [TOOL_CALLS] {"name": "f", "arguments": {}} trailing text', ["f"]),  # one object, text after it
    ('[TOOL_CALLS][{"name": "f", "arguments": {"a": [1, {"b": null}]}, "id": "abcDEF123"}]', ["f"]),
    ("Paris is the capital.", None),
    ("[TOOL_CALLS]not json", None),
    ('[TOOL_CALLS][{"arguments": {}}]', None),  # no name
    ('[TOOL_CALLS][{"name": "f", "arguments": "not json"}]', None),
    ('[TOOL_CALLS][{"name": "f", "arguments": [1]}]', None),
    ("[TOOL_CALLS][]", None),
])
def test_parse_tool_calls_is_robust(text, names):
    calls = parse_tool_calls(text)
    assert (None if calls is None else [c.function.name for c in calls]) == names


def test_parse_tool_calls_keeps_a_valid_id():
    calls = parse_tool_calls('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abcDEF123"}]')
    assert calls[0].id == "abcDEF123"


@pytest.mark.parametrize("written,protocol,address", [
    (None, "grpc", "127.0.0.1:8001"), ("example", "http", "example:8000"),
    ("http://10.0.0.1:9000/", "http", "10.0.0.1:9000"),
    ("grpc://host:9001", "grpc", "host:9001"), ("[::1]:8001", "grpc", "[::1]:8001"),
])
def test_a_triton_address_is_read_as_users_write_it(written, protocol, address):
    assert triton_address(written, protocol) == address
    assert Registry(written, protocol).url == address


@pytest.mark.parametrize("written", ["https://host:8000", "host:http", "host:99999", "host:0", "host:8000/v2", "::1",
                                     "user@host:8001", "host:8001?x=1", "host:8001#top"])
def test_a_triton_address_that_is_not_host_port_is_refused(written):
    with pytest.raises(ValueError, match="is not host:port|is a https address"):
        triton_address(written)
    with pytest.raises(ValueError, match="is a grpc address, but http is used"):
        triton_address("grpc://host:8001", "http")
    assert triton_address("  host:8001 ") == "host:8001"


def test_plan_maps_mistral_arguments_onto_ensemble_inputs():
    plan = plan_chat([{"role": "system", "content": "Be brief."}] + QUESTION, safe_prompt=True, stop="\n",
                     random_seed=7, max_tokens=5, tools=[WEATHER_TOOL], response_format={"type": "json_object"})
    request = json.loads(plan.messages_json)
    assert request["messages"][0] == {"role": "system", "content": f"{SAFE_PROMPT}\n\nBe brief."}
    assert request["tools"] == [WEATHER_TOOL]
    inputs = plan.tensors(stream=False)
    assert inputs["stop_words"][0].tolist() == [[b"\n"]] and inputs["seed"][0].item() == 7
    assert inputs["guided_decoding_guide_type"][0].item() == b"json"
    assert "tools" not in json.loads(plan_chat(QUESTION, tools=[WEATHER_TOOL], tool_choice="none").messages_json)
    forced = plan_chat(QUESTION, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.forced_tool_call and forced.guide_type == "json_schema"
    assert json.loads(forced.guide)["items"]["properties"]["name"] == {"const": "get_weather"}
    with pytest.raises(InvalidRequestError, match="forces a tool call, but no tools are given"):
        plan_chat(QUESTION, tool_choice="any")
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        plan_chat(QUESTION, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    plan = plan_chat(QUESTION, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert (plan.guide_type, json.loads(plan.guide)) == ("json_schema", schema)


@pytest.mark.parametrize("arguments,message", [
    ({"temperature": 5}, r"temperature must be a number in \[0.0, 2.0\], got 5"),
    ({"random_seed": -1}, "random_seed must be a number in"), ({"random_seed": 2**64}, "random_seed must be"),
    ({"top_p": "high"}, "top_p must be a number"), ({"max_tokens": 0}, "max_tokens must be a positive integer"),
])
def test_arguments_out_of_range_are_refused_as_the_gateway_does(arguments, message):
    with pytest.raises(InvalidRequestError, match=message):
        plan_chat([{"role": "user", "content": "hi"}], **arguments)


def test_a_temperature_alone_samples_as_in_mistrals_api():
    from plateforme.clients.triton_client import GenerationParams

    def top_p(**params):
        value = GenerationParams(**params).tensors().get("top_p")
        return None if value is None else value[0].item()

    # The engine (as TensorRT-LLM) is greedy without top_k/top_p: a temperature alone sends top_p 1.
    assert top_p(temperature=0.7) == 1.0
    assert top_p(temperature=0.7, top_p=0.5) == 0.5
    assert top_p(temperature=0.7, top_k=40) is None
    assert top_p(temperature=0.0) is None and top_p() is None


# -- against the server ----------------------------------------------------------------------
needs_server = pytest.mark.server


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request, server):
    url = server.grpc_url if request.param == "grpc" else server.http_url
    with PlateformeClient(url, protocol=request.param) as client:
        yield client


@needs_server
def test_chat_complete_answers_with_usage(client):
    response = client.chat.complete(model="smollm2", messages=QUESTION, temperature=0.0, max_tokens=16)
    assert "Paris" in response.choices[0].message.content
    assert response.object == "chat.completion" and response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@needs_server
def test_n_choices_sync_and_async(client):
    import asyncio

    kwargs = dict(model="mistral-tiny", messages=QUESTION, temperature=1.0, max_tokens=8, random_seed=11)
    many = client.chat.complete(n=3, **kwargs)
    texts = [choice.message.content for choice in many.choices]
    assert [choice.index for choice in many.choices] == [0, 1, 2] and len(set(texts)) > 1, texts
    assert client.chat.complete(**{**kwargs, "random_seed": 13}).choices[0].message.content == texts[2]
    assert many.usage.completion_tokens == 3 * 8
    del kwargs["max_tokens"]  # OpenAI's name for it is taken too
    assert client.chat.complete(max_completion_tokens=3, **kwargs).usage.completion_tokens == 3
    kwargs["max_tokens"] = 8
    again = asyncio.run(client.chat.complete_async(n=3, **kwargs))
    assert [choice.message.content for choice in again.choices] == texts
    with pytest.raises(InvalidRequestError, match="n must be an integer in 1..16"):
        client.chat.complete(n=0, **kwargs)
    with pytest.raises(InvalidRequestError, match="a stream carries one choice"):
        client.chat.stream(n=2, **kwargs)


@needs_server
def test_chat_stream_concatenates_to_the_answer(client):
    kwargs = dict(model="smollm2", messages=QUESTION, temperature=0.0, max_tokens=12)
    full = client.chat.complete(**kwargs).choices[0].message.content
    events = list(client.chat.stream(**kwargs))
    assert events[0].data.choices[0].delta.role == "assistant"
    assert "".join(e.data.choices[0].delta.content or "" for e in events) == full
    assert events[-1].data.choices[0].finish_reason in ("stop", "length") and events[-1].data.usage.completion_tokens


@needs_server
def test_embeddings_create(client):
    response = client.embeddings.create(model="mistral-embed", inputs=["Paris", "Lyon is in France"])
    assert [d.index for d in response.data] == [0, 1] and len(response.data[0].embedding) == 384
    assert response.usage.prompt_tokens > 2


@needs_server
def test_forced_tool_call_on_the_random_model(server):
    client = PlateformeClient(server.grpc_url)
    response = client.chat.complete(model="open-mistral-7b", messages=[{"role": "user", "content": "Weather?"}],
                                    tools=[WEATHER_TOOL], tool_choice="any", max_tokens=64, random_seed=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Lyon")


@needs_server
def test_tools_reach_the_v3_chat_encoding(server):
    client = PlateformeClient(server.grpc_url)
    messages = [{"role": "user", "content": "Weather?"}]
    plain = client.chat.complete(model="mistral-tiny", messages=messages, max_tokens=1)
    with_tools = client.chat.complete(model="mistral-tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=1)
    # [AVAILABLE_TOOLS] ... the tool's JSON ... [/AVAILABLE_TOOLS] precede the last user message.
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    with pytest.raises(InvalidRequestError, match="does not support tools"):
        client.chat.complete(model="mistral-small", messages=messages, tools=[WEATHER_TOOL], max_tokens=1)


@needs_server
def test_the_tool_loop_sends_answers_back_as_they_came(server):
    """Mistral's pattern: append the assistant's answer (an SDK object) and the tool's result, ask again."""
    from mistralai.client import models as mistral_models

    client = PlateformeClient(server.grpc_url)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    called = client.chat.complete(model="mistral-tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="any",
                                  parallel_tool_calls=False, max_tokens=60).choices[0].message
    assert called.tool_calls
    messages += [called, {"role": "tool", "name": "get_weather", "content": "sunny",
                          "tool_call_id": called.tool_calls[0].id}]
    answer = client.chat.complete(model="mistral-tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=4)
    assert answer.usage.completion_tokens > 0
    # mistralai's own message objects carry `prefix: false`.
    history = [mistral_models.UserMessage(content="Hi"), mistral_models.AssistantMessage(content="Hello"),
               mistral_models.UserMessage(content="Weather?")]
    assert client.chat.complete(model="mistral-tiny", messages=history, max_tokens=2).usage.completion_tokens > 0
    with pytest.raises(InvalidRequestError, match="prefix"):
        client.chat.complete(model="mistral-tiny", messages=[*messages, {"role": "assistant", "content": "It",
                                                                         "prefix": True}], max_tokens=2)


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_stream_may_outlast_the_timeout_while_chunks_keep_coming(server, protocol):
    """The timeout bounds the wait for each chunk, not the stream (a long answer on a busy CPU)."""
    import asyncio

    from plateforme.clients.triton_client import AsyncTransport, GenerationParams, Transport, chat_tensors

    url = server.grpc_url if protocol == "grpc" else server.http_url
    inputs = chat_tensors(GenerationParams(max_tokens=400, min_tokens=400, temperature=0.0), prompt="Tell a story.",
                          stream=True)
    timeout = 2.0

    async def streamed() -> tuple[int, float]:
        transport = AsyncTransport(url, protocol, timeout=timeout)
        started, count = time.monotonic(), 0
        async for _ in transport.generate("smollm2", inputs, stream=True):
            count += 1
        await transport.close()
        return count, time.monotonic() - started

    count, seconds = asyncio.run(streamed())
    assert seconds > timeout and count >= 100, (count, seconds)  # longer than the timeout, and whole
    if protocol == "grpc":  # the threaded transport too
        started = time.monotonic()
        assert sum(1 for _ in Transport(url, protocol, timeout=timeout).generate("smollm2", inputs, stream=True)) >= 100
        assert time.monotonic() - started > timeout


@needs_server
def test_errors_are_classified(server):
    client = PlateformeClient(server.grpc_url)
    with pytest.raises(ModelNotFoundError):
        client.chat.complete(model="no-such-model", messages=QUESTION, max_tokens=1)
    with pytest.raises(InvalidRequestError):
        client.chat.complete(model="mistral-tiny", messages=[{"role": "user", "content": "x " * 5000}], max_tokens=1)
    down = PlateformeClient("127.0.0.1:1", retries=1, timeout=5)
    with pytest.raises(ServerUnavailableError):
        down.chat.complete(model="mistral-tiny", messages=QUESTION)


@needs_server
def test_registry_lists_only_served_endpoints(server):
    endpoints = {e.id: e for e in Registry(server.grpc_url).endpoints()}
    assert endpoints["mistral-tiny"].kind == "chat" and endpoints["mistral-embed"].kind == "embedding"
    assert endpoints["open-mistral-7b"].model == "mistral-tiny" and endpoints["open-mixtral-8x7b"].model == "mistral-small"
    assert "mistral-medium" not in endpoints and "open-mixtral-8x22b" not in endpoints
    assert "smollm2" in endpoints and not any(name.endswith(("-engine", "-bls", "-preprocessing")) for name in endpoints)
    # Read from the ensembles' configs: the v3 tokenizer encodes tools, v1 and SmolLM2's template do not.
    assert {name for name, e in endpoints.items() if e.function_calling} == {"mistral-tiny", "open-mistral-7b",
                                                                               "mistral-window8"}
    def facts(found):
        return {(e.id, e.model, e.kind, e.function_calling) for e in found}
    assert facts(Registry(server.http_url, protocol="http").endpoints()) == facts(endpoints.values())
    # client.models, as in mistralai
    client = PlateformeClient(server.grpc_url)
    assert {m.id for m in client.models.list().data} == set(endpoints)
    card = client.models.retrieve(model_id="open-mistral-7b")
    assert card.root == "mistral-tiny" and card.capabilities["function_calling"] and card.max_context_length == 256
    # A card's creation time is when the endpoint was first seen, not the last look at the server.
    fresh = Registry(server.grpc_url, ttl=0)
    first = {e.id: e.created for e in fresh.endpoints()}
    time.sleep(1.1)
    assert {e.id: e.created for e in fresh.endpoints()} == first
    with pytest.raises(ModelNotFoundError):
        client.models.retrieve(model_id="mistral-medium")


# -- asyncio, penalties, cancellation --------------------------------------------------------
@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_matches_the_sync_one(server, protocol):
    import asyncio

    url = server.grpc_url if protocol == "grpc" else server.http_url
    kwargs = dict(model="smollm2", messages=QUESTION, temperature=0.0, max_tokens=12)
    with PlateformeClient(url, protocol=protocol) as sync:
        expected = sync.chat.complete(**kwargs).choices[0].message.content
        expected_vectors = [d.embedding for d in sync.embeddings.create(model="mistral-embed", inputs=["a", "b"]).data]

    async def run():
        async with PlateformeClient(url, protocol=protocol) as client:
            # Concurrent calls on one channel / session.
            answers = await asyncio.gather(*[client.chat.complete_async(**kwargs) for _ in range(3)])
            stream = await client.chat.stream_async(**kwargs)
            events = [event async for event in stream]
            embedded = await client.embeddings.create_async(model="mistral-embed", inputs=["a", "b"])
            with pytest.raises(ModelNotFoundError):  # raised when the stream is opened, as mistralai does
                await client.chat.stream_async(model="no-such-model", messages=QUESTION)
            return answers, events, embedded

    answers, events, embedded = asyncio.run(run())
    assert [a.choices[0].message.content for a in answers] == [expected] * 3
    assert answers[0].usage.completion_tokens > 0
    assert "".join(e.data.choices[0].delta.content or "" for e in events) == expected
    assert events[-1].data.usage.completion_tokens == answers[0].usage.completion_tokens
    assert all(abs(x - y) < 1e-5 for got, want in zip([d.embedding for d in embedded.data], expected_vectors)
               for x, y in zip(got, want))


@needs_server
def test_seeds_give_different_samples_with_a_temperature_alone(server):
    client = PlateformeClient(server.grpc_url)
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Name an animal."}], max_tokens=12,
                  temperature=1.0)
    answers = [client.chat.complete(**kwargs, random_seed=seed).choices[0].message.content for seed in (1, 2, 3, 1)]
    assert len(set(answers[:3])) == 3 and answers[3] == answers[0], answers


@needs_server
def test_penalties_reach_the_engine(server):
    client = PlateformeClient(server.grpc_url)
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Write the word 'la' thirty times, "
                                                                       "separated by spaces."}],
                  temperature=0.0, max_tokens=40)
    plain = client.chat.complete(**kwargs).choices[0].message.content
    penalised = client.chat.complete(**kwargs, frequency_penalty=2.0).choices[0].message.content
    present = client.chat.complete(**kwargs, presence_penalty=2.0).choices[0].message.content
    assert penalised != plain and present != plain

    def repeated_share(text):  # the share of words that came before
        words = re.findall(r"\w+", text.lower())
        return 1 - len(set(words)) / max(len(words), 1)

    assert repeated_share(plain) > 0.5, plain  # greedy decoding repeats itself here
    assert repeated_share(penalised) < repeated_share(plain) - 0.2, (plain, penalised)


def _gauge(server, model="mistral-tiny-engine"):
    from triton_helpers import metric

    return metric(server, "plateforme_engine_active_sequences", model)


def wait_for_idle_engine(server, model="mistral-tiny-engine", timeout=30.0):
    wait_for_active(server, 0, model, timeout)


def wait_for_active(server, count: int, model="mistral-tiny-engine", timeout=30.0):
    """Until the engine reports `count` active sequences (it does so after the step whose
    responses may already have reached the client)."""

    deadline = time.monotonic() + timeout
    while _gauge(server, model) != count:
        assert time.monotonic() < deadline, f"{model} has {_gauge(server, model)} active sequences, not {count}"
        time.sleep(0.02)


@needs_server
def test_leaving_a_stream_cancels_it_in_triton(server):
    import asyncio

    # The demo model, whose long answer outlasts the test's reads (the tiny random one may not).
    long = dict(model="smollm2", messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=1000,
                temperature=1.0, random_seed=1)
    engine = "smollm2-engine"
    with PlateformeClient(server.grpc_url) as client:
        for i, event in enumerate(client.chat.stream(**long)):  # sync: break out of the loop
            if i == 3:
                wait_for_active(server, 1, engine, timeout=5)
                break
        wait_for_idle_engine(server, engine)
        with client.chat.stream(**long) as events:  # sync: leave a with block
            next(events), next(events)
        wait_for_idle_engine(server, engine)

        async def leave_async():
            async with PlateformeClient(server.grpc_url) as aclient:
                stream = await aclient.chat.stream_async(**long)
                async for _ in stream:
                    break
                wait_for_active(server, 1, engine, timeout=5)
                await stream.close()
                await asyncio.sleep(0)
                wait_for_idle_engine(server, engine)
                task = asyncio.ensure_future(_drain(await aclient.chat.stream_async(**long)))  # task cancelled
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(leave_async())
        wait_for_idle_engine(server, engine)
        after = client.chat.complete(**{**long, "max_tokens": 5})
        assert after.usage.completion_tokens == 5 and after.choices[0].finish_reason == "length"


async def _drain(stream):
    async for _ in stream:
        pass


@needs_server
def test_whole_answers_share_one_stream_without_cross_talk(server):
    """AsyncTransport.complete sends its requests on one gRPC stream: concurrent answers, an error
    among them and a request given up on do not disturb one another."""
    import asyncio

    from plateforme.clients.triton_client import AsyncTransport, GenerationParams, chat_tensors

    def inputs(text, **params):
        return chat_tensors(GenerationParams(**{"max_tokens": 8, "temperature": 0.0, **params}),
                            messages_json=json.dumps({"messages": [{"role": "user", "content": text}]}))

    prompts = [f"Tell me about the number {i}." for i in range(10)]

    async def run():
        transport = AsyncTransport(server.grpc_url)
        alone = [await transport.complete("mistral-tiny", inputs(p)) for p in prompts]
        stream = transport._shared
        together = await asyncio.gather(
            *[transport.complete("mistral-tiny", inputs(p)) for p in prompts],
            transport.complete("mistral-tiny", chat_tensors(messages_json="{not json")),
            transport.complete("no-such-model", inputs("hi")), return_exceptions=True)
        transport.timeout = 0.05
        with pytest.raises(AnswerTimeoutError, match="no answer from mistral-tiny within"):
            await transport.complete("mistral-tiny", inputs("Talk.", max_tokens=200, min_tokens=200))
        transport.timeout = 60
        wait_for_idle_engine(server)  # the request given up on runs to its end in Triton, once: not retried
        finished.append(_answered(server, "mistral-tiny", at_least=finished[0][0] + 21))
        after = await transport.complete("mistral-tiny", inputs(prompts[0]))
        same_stream = transport._shared is stream
        await transport.close()
        return alone, together, after, same_stream

    finished = [_answered(server, "mistral-tiny")]
    alone, together, after, same_stream = asyncio.run(run())
    assert [c.text for c in together[:10]] == [c.text for c in alone]
    assert all(c.num_output_tokens == 8 for c in alone)
    assert isinstance(together[10], InvalidRequestError) and "not valid JSON" in str(together[10])
    assert isinstance(together[11], ModelNotFoundError)
    assert after.text == alone[0].text and same_stream
    (succeeded, failed), (succeeded_after, failed_after) = finished
    # 10 alone, 10 together and the timed-out one once (not retried); the invalid one failed.
    assert succeeded_after - succeeded == 21 and failed_after > failed


def _answered(server, model: str, at_least: int = 0) -> tuple[int, int]:
    """(succeeded, failed) request counts of `model` in Triton's statistics extension, once at
    least `at_least` succeeded (a request is counted when its last response has gone out)."""
    import urllib.request

    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as reply:
            stats = json.load(reply)["model_stats"][0]["inference_stats"]
        counts = int(stats["success"]["count"]), int(stats["fail"]["count"])
        if counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


@needs_server
def test_shared_stream_recovers_when_triton_restarts(tmp_path, tiny_mistral_dir):
    """Triton killed under a pending request: that request fails as unavailable (503), and once
    Triton is back the next one opens a new stream. An idle shared stream closes itself, so that
    Triton's graceful shutdown (which waits for open streams) does not wait for the client."""
    import asyncio

    from plateforme.builders.repository import ChatEndpoint, render_repository
    from plateforme.clients.triton_client import AsyncTransport, GenerationParams, _SharedStream, chat_tensors
    from plateforme.server import ServerConfig, TritonServer, free_port
    from triton_helpers import metric

    repository = render_repository(tmp_path / "models", chat=[ChatEndpoint("mistral-tiny", tiny_mistral_dir,
                                                                           dtype="float32", max_batch_size=2)])
    config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    short = chat_tensors(GenerationParams(max_tokens=4, temperature=0.0), prompt="hello")
    long = chat_tensors(GenerationParams(max_tokens=200, min_tokens=200, temperature=0.0), prompt="hello")

    async def run():
        # Retries span ~3 s: the channel reconnects within 1 s of Triton being back.
        transport = AsyncTransport(f"127.0.0.1:{config.grpc_port}", retries=4, retry_backoff=0.2)
        server = TritonServer(config).start()
        try:
            before = await transport.complete("mistral-tiny", short)
            first_stream = transport._shared
            pending = asyncio.ensure_future(transport.complete("mistral-tiny", long))
            while metric(server, "plateforme_engine_active_sequences", "mistral-tiny-engine") == 0:
                await asyncio.sleep(0.01)
            server.process.kill()
            with pytest.raises(ServerUnavailableError):
                await pending
        finally:
            server.stop()
        with TritonServer(config) as server:
            after = await transport.complete("mistral-tiny", short)
            second_stream = transport._shared
            await asyncio.sleep(_SharedStream.IDLE_CLOSE_S + 0.5)
            started = time.monotonic()
            await asyncio.to_thread(server.stop)
            stop_seconds = time.monotonic() - started
        await transport.close()
        return before, after, second_stream is not first_stream, second_stream.broken, stop_seconds

    before, after, new_stream, idle_closed, stop_seconds = asyncio.run(run())
    assert before.text == after.text and before.num_output_tokens == 4 and new_stream
    assert idle_closed is not None and stop_seconds < 15  # Triton's launcher kills it after 30 s
