"""Engine: greedy decoding against transformers, sampling, stop handling and request lifecycle."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from plateforme.python_backend.engine import Engine, StepOutput
from plateforme.python_backend.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def mistral(tiny_mistral_dir):
    return Engine(tiny_mistral_dir, dtype="float32")


@pytest.fixture(scope="module")
def mixtral(tiny_mixtral_dir):
    return Engine(tiny_mixtral_dir, dtype="float32")


def prompt(n: int, vocab_size: int = 32768, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[StepOutput]]:
    """Add the requests, step until done; every request's outputs, one per step."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    outputs: dict[str, list[StepOutput]] = {request_id: [] for request_id in requests}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for steps in outputs.values():
        assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]
    return outputs


def generate(engine: Engine, ids: list[int], **params) -> tuple[list[int], StepOutput]:
    """Released tokens and the final output of one request."""
    steps = run(engine, {"r": (ids, SamplingParams(**params))})["r"]
    return [t for s in steps for t in s.token_ids], steps[-1]


@pytest.fixture(scope="module")
def reference(mistral):
    """A greedy continuation of 24 tokens whose token 6 is not among tokens 0..5."""
    ids = prompt(12, seed=3)
    tokens, _ = generate(mistral, ids, max_tokens=24)
    assert tokens[6] not in tokens[:6] and tokens[7] != tokens[6]
    return ids, tokens


# --- greedy decoding against transformers --------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["tiny_mistral_dir", "tiny_mixtral_dir"])
@pytest.mark.parametrize("prompt_len", [10, 40])
def test_greedy_matches_transformers_generate(request, checkpoint, prompt_len):
    model_dir = request.getfixturevalue(checkpoint)
    engine = request.getfixturevalue("mistral" if checkpoint == "tiny_mistral_dir" else "mixtral")
    ids = prompt(prompt_len, engine.vocab_size, seed=prompt_len)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=48, eos_token_id=None, pad_token_id=0)
    expected = hf.generate(torch.tensor([ids]), generation_config=config)[0, prompt_len:].tolist()

    tokens, last = generate(engine, ids, max_tokens=48)
    assert len(set(tokens)) > 10  # a real continuation, not one repeated token
    assert tokens == expected
    assert (last.finish_reason, last.prompt_len, last.generated_len) == ("length", prompt_len, 48)


def test_log_probs_are_those_of_the_model(mistral, reference):
    ids, expected = reference
    steps = run(mistral, {"r": (ids, SamplingParams(max_tokens=8, return_log_probs=True))})["r"]
    assert [len(s.log_probs) for s in steps] == [1] * 8
    log_probs = [lp for s in steps for lp in s.log_probs]
    with torch.inference_mode():
        logits = mistral.model(torch.tensor(ids + expected[:8]))
    wanted = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)[torch.arange(8), torch.tensor(expected[:8])]
    assert log_probs == pytest.approx(wanted.tolist(), abs=1e-5)
    assert run(mistral, {"r": (ids, SamplingParams(max_tokens=2))})["r"][0].log_probs is None


def test_bfloat16_engine_decodes(tiny_mixtral_dir):
    engine = Engine(tiny_mixtral_dir)
    assert engine.model.dtype == torch.bfloat16
    tokens, last = generate(engine, prompt(10, engine.vocab_size), max_tokens=16, return_log_probs=True)
    assert len(tokens) == 16 and all(0 <= t < engine.vocab_size for t in tokens)
    assert last.finish_reason == "length" and math.isfinite(last.log_probs[-1])


# --- sampling ------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(mixtral):
    ids = prompt(10, mixtral.vocab_size)
    sample = dict(max_tokens=16, temperature=1.0, top_p=1.0)
    first, _ = generate(mixtral, ids, seed=7, **sample)
    assert generate(mixtral, ids, seed=7, **sample)[0] == first
    assert generate(mixtral, ids, seed=8, **sample)[0] != first
    assert generate(mixtral, ids, **sample)[0] != generate(mixtral, ids, **sample)[0]  # random seeds


def test_top_k_one_and_zero_temperature_are_greedy(mistral, reference):
    ids, expected = reference
    assert generate(mistral, ids, max_tokens=10, temperature=2.0, top_k=1, seed=1)[0] == expected[:10]
    assert generate(mistral, ids, max_tokens=10, temperature=0.0, top_p=0.9, seed=1)[0] == expected[:10]


def sampler(**params) -> Sampler:
    return Sampler(SamplingParams(max_tokens=1, **params), vocab_size=6, prompt_ids=[0])


def draws(s: Sampler, logits: list[float], n: int = 300) -> set[int]:
    return {s(torch.tensor(logits), [])[0] for _ in range(n)}


def test_top_k_and_top_p_restrict_the_candidates():
    logits = [4.0, 3.0, 2.0, 1.0, 0.0, -1.0]
    assert draws(sampler(top_k=2, seed=0), logits) == {0, 1}
    # Probabilities ~ .64 .23 .09 .03 ...: 0.8 needs the first two tokens, 0.9 the first three.
    assert draws(sampler(top_p=0.8, seed=0), logits) == {0, 1}
    assert draws(sampler(top_p=0.9, seed=0), logits) == {0, 1, 2}
    assert draws(sampler(top_p=1.0, seed=0), logits) == set(range(6))


def test_a_seeded_sampler_draws_the_same_tokens_and_a_greedy_one_makes_no_generator():
    logits = torch.zeros(6)
    first, again = sampler(temperature=1.0, seed=7), sampler(temperature=1.0, seed=7)
    assert [first(logits, [])[0] for _ in range(20)] == [again(logits, [])[0] for _ in range(20)]
    greedy = sampler(temperature=0.0)
    greedy(torch.tensor([0.0, 2.0, 1.0, 0, 0, 0]), [])
    assert "generator" not in vars(greedy)  # made on the first draw only


def test_sampled_log_prob_is_of_the_filtered_distribution():
    token, log_prob = sampler(top_k=2, temperature=0.5, seed=0)(torch.tensor([1.0, 0.5, 0.0, 0, 0, 0]), [])
    probs = torch.softmax(torch.tensor([2.0, 1.0]), dim=0)
    assert log_prob == pytest.approx(math.log(probs[token]))


def test_greedy_takes_the_batch_argmax_only_when_nothing_changes_the_logits():
    logits = torch.tensor([0.0, 3.0, 1.0, 5.0, 0.5, 0.0])  # argmax 3
    plain = sampler(temperature=0.0)
    assert plain(logits, [], argmax=3) == (3, 0.0)  # no log probs asked for: none computed
    token, log_prob = sampler(temperature=0.0, return_log_probs=True)(logits, [], argmax=3)
    assert token == 3 and log_prob == pytest.approx(float(torch.log_softmax(logits, dim=0)[3]))
    # Before min_tokens, end_id 3 is banned: the hint is ignored and the next best token wins.
    assert sampler(temperature=0.0, min_tokens=2, end_id=3)(logits, [], argmax=3)[0] == 1
    assert sampler(temperature=0.0, bad_words=[[3]])(logits, [], argmax=3)[0] == 1
    assert sampler(temperature=0.0, repetition_penalty=10.0)(torch.tensor([5.0, 4.9, 0, 0, 0, 0]), [], argmax=0)[0] == 1


def test_penalties_follow_tensorrt_llm():
    # Token 0 seen once and token 1 twice (prompt and generated tokens count alike); temperature comes first.
    s = Sampler(
        SamplingParams(max_tokens=9, temperature=2.0, top_p=1.0, repetition_penalty=2.0,
                       presence_penalty=0.5, frequency_penalty=0.25),
        vocab_size=3, prompt_ids=[0, 1, 1],
    )
    processed = s.process(torch.tensor([4.0, -4.0, 4.0]), [])
    assert processed.tolist() == pytest.approx([2 / 2 - 0.5 - 0.25, -2 * 2 - 0.5 - 0.5, 2.0])
    token, _ = s(torch.tensor([0.0, 0.0, 50.0]), [])
    assert token == 2 and s.process(torch.tensor([4.0, 4.0, 4.0]), [2]).tolist()[2] == pytest.approx(0.25)


def test_min_tokens_and_bad_words_mask_logits():
    s = Sampler(
        SamplingParams(max_tokens=9, end_id=0, min_tokens=2, stop_words=[[3, 4]], bad_words=[[5], [1, 2]]),
        vocab_size=6, prompt_ids=[1],
    )

    def masked(generated):
        return [i for i, x in enumerate(s.process(torch.zeros(6), generated)) if x == -math.inf]

    assert masked([]) == [0, 5]
    assert masked([3]) == [0, 4, 5]
    assert masked([3, 1]) == [2, 5]  # min_tokens reached: end_id and stop words allowed again


def test_bad_words_are_never_generated(mistral, reference):
    ids, expected = reference
    single, _ = generate(mistral, ids, max_tokens=8, bad_words=[[expected[0]]])
    assert single[0] != expected[0] and expected[0] not in single
    # A two-token bad word only bans its last token after its first one.
    pair, _ = generate(mistral, ids, max_tokens=8, bad_words=[[expected[5], expected[6]]])
    assert pair[:6] == expected[:6] and pair[6] != expected[6]


# --- stopping ------------------------------------------------------------------------------------


def test_end_id_stops_and_is_not_released(mistral, reference):
    ids, expected = reference
    tokens, last = generate(mistral, ids, max_tokens=24, end_id=expected[6])
    assert tokens == expected[:6]
    assert (last.finish_reason, last.generated_len) == ("end_id", 7)


def test_min_tokens_suppresses_end_id(mistral, reference):
    ids, expected = reference
    tokens, last = generate(mistral, ids, max_tokens=10, end_id=expected[6], min_tokens=7)
    assert tokens[:6] == expected[:6] and tokens[6] != expected[6]
    assert expected[6] not in tokens[:7]


def test_min_tokens_suppresses_stop_words(mistral, reference):
    ids, expected = reference
    tokens, last = generate(mistral, ids, max_tokens=10, stop_words=[expected[5:7]], min_tokens=7)
    assert tokens[:6] == expected[:6] and tokens[6] != expected[6] and last.finish_reason != "stop"


def test_stop_word_is_held_back_then_stripped(mistral, reference):
    ids, expected = reference
    steps = run(mistral, {"r": (ids, SamplingParams(max_tokens=24, stop_words=[expected[6:8]]))})["r"]
    assert [s.token_ids for s in steps] == [[t] for t in expected[:6]] + [[], []]
    assert (steps[-1].finish_reason, steps[-1].generated_len) == ("stop", 8)


def test_unfinished_stop_word_is_released_late(mistral, reference):
    ids, expected = reference
    other = (expected[7] + 1) % mistral.vocab_size
    params = SamplingParams(max_tokens=9, stop_words=[[expected[6], other], [99, 98, 97]])
    steps = run(mistral, {"r": (ids, params)})["r"]
    released = [s.token_ids for s in steps]
    # Token 6 could start the stop word: withheld for one step, then released with token 7.
    assert released[6] == [] and released[7] == expected[6:8]
    assert [t for r in released for t in r] == expected[:9]
    # A stop-word prefix pending when max_tokens ends generation is released with the last step.
    steps = run(mistral, {"r": (ids, SamplingParams(max_tokens=7, stop_words=[[expected[6], other]]))})["r"]
    assert steps[-1].token_ids == [expected[6]] and steps[-1].finish_reason == "length"


def test_single_token_stop_word(mistral, reference):
    ids, expected = reference
    tokens, last = generate(mistral, ids, max_tokens=24, stop_words=[[expected[6]]], return_log_probs=True)
    assert tokens == expected[:6] and last.finish_reason == "stop"


def test_max_tokens_gives_length(mistral, reference):
    ids, expected = reference
    tokens, last = generate(mistral, ids, max_tokens=5)
    assert tokens == expected[:5] and (last.finish_reason, last.generated_len) == ("length", 5)


# --- context limit -------------------------------------------------------------------------------


def test_context_limit(tiny_mistral_dir):
    engine = Engine(tiny_mistral_dir, dtype="float32", max_seq_len=64)
    assert engine.max_seq_len == 64
    tokens, last = generate(engine, prompt(60), max_tokens=10)
    assert len(tokens) == 4
    assert (last.finish_reason, last.prompt_len, last.generated_len) == ("model_length", 60, 4)
    # max_tokens ending where the context does: the context is what ran out (as without max_tokens).
    tokens, last = generate(engine, prompt(60), max_tokens=4)
    assert len(tokens) == 4 and last.finish_reason == "model_length"
    tokens, last = generate(engine, prompt(60), max_tokens=3)
    assert len(tokens) == 3 and last.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt has 64 tokens but the model's context is 64 tokens"):
        engine.add_request("r", prompt(64), SamplingParams(max_tokens=1))
    assert not engine.has_work()


def test_default_and_invalid_max_seq_len(mistral, tiny_mistral_dir):
    assert mistral.max_seq_len == 256  # the checkpoint's max_position_embeddings, below the 8192 cap
    with pytest.raises(ValueError, match="max_seq_len must be an integer in 2..256"):
        Engine(tiny_mistral_dir, max_seq_len=512)
    with pytest.raises(ValueError, match="unsupported dtype"):
        Engine(tiny_mistral_dir, dtype="int4")


# --- request lifecycle ---------------------------------------------------------------------------


def test_cancel(mistral, reference):
    ids, expected = reference
    mistral.add_request("a", ids, SamplingParams(max_tokens=6))
    mistral.add_request("b", ids, SamplingParams(max_tokens=6))
    first = {o.request_id: o for o in mistral.step()}
    assert first["a"].token_ids == first["b"].token_ids == expected[:1]
    mistral.cancel("a")
    mistral.cancel("unknown")
    second = {o.request_id: o for o in mistral.step()}
    assert second["a"].finished and second["a"].finish_reason == "cancelled" and second["a"].token_ids == []
    assert not second["b"].finished and second["b"].token_ids == expected[1:2]
    rest = []
    while mistral.has_work():
        (out,) = mistral.step()
        rest += out.token_ids
    assert rest == expected[2:6]


def test_interleaved_requests_keep_their_own_state(mistral, mixtral, reference):
    ids, expected = reference
    other_ids = prompt(30, seed=11)
    alone, _ = generate(mistral, other_ids, max_tokens=12)
    outputs = run(mistral, {
        "x": (ids, SamplingParams(max_tokens=20)),
        "y": (other_ids, SamplingParams(max_tokens=12)),
        "z": (ids, SamplingParams(max_tokens=4, stop_words=[[expected[2]]])),
    })
    assert [t for s in outputs["x"] for t in s.token_ids] == expected[:20]
    assert [t for s in outputs["y"] for t in s.token_ids] == alone
    assert [t for s in outputs["z"] for t in s.token_ids] == expected[:2]


@pytest.mark.parametrize("separate", [True, False])
def test_prefill_runs_apart_from_the_decodes_only_when_asked_and_never_twice_in_a_row(mistral, reference, separate):
    ids, expected = reference
    tokens: dict[str, list[int]] = {}

    def step() -> set[str]:
        """Requests with an output this step (their tokens recorded)."""
        outputs = mistral.step()
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return {out.request_id for out in outputs}

    budget, default = mistral.max_num_tokens, mistral.separate_prefill
    mistral.max_num_tokens, mistral.separate_prefill = 16, separate
    try:
        mistral.add_request("a", ids, SamplingParams(max_tokens=20))
        assert step() == {"a"} and step() == {"a"}  # prefill, then a decode
        mistral.add_request("b", prompt(7, seed=20), SamplingParams(max_tokens=20))
        if separate:  # b's prompt alone, then everyone
            assert step() == {"b"}
        assert step() == {"a", "b"}
        # Prompts arriving back to back: a prefill-only step is always followed by the decodes.
        mistral.add_request("c", prompt(5, seed=21), SamplingParams(max_tokens=20))
        assert step() == ({"c"} if separate else {"a", "b", "c"})
        mistral.add_request("d", prompt(5, seed=22), SamplingParams(max_tokens=20))
        assert step() == {"a", "b", "c", "d"}
        # A prompt longer than a step's budget rides along with the decodes, 12 tokens a step (16 - 4
        # decodes); with its remainder fitting in one step, that runs alone.
        mistral.add_request("e", prompt(41, seed=23), SamplingParams(max_tokens=20))
        assert [step() for _ in range(3)] == [{"a", "b", "c", "d"}] * 3
        assert step() == ({"e"} if separate else {"a", "b", "c", "d", "e"})
        while mistral.has_work():
            step()
    finally:
        mistral.max_num_tokens, mistral.separate_prefill = budget, default
    assert tokens["a"] == expected[:20]  # the schedule changes when tokens come, not which


# --- several sequences per request (num_return_sequences) ------------------------------------------


def run_sequences(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams, int]]):
    """Add requests of several sequences each, step until done: {(request_id, sequence_index): outputs}."""
    for request_id, (ids, params, n) in requests.items():
        engine.add_request(request_id, ids, params, num_sequences=n)
    outputs: dict[tuple[str, int], list[StepOutput]] = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault((out.request_id, out.sequence_index), []).append(out)
    for steps in outputs.values():
        assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]
    return outputs


def tokens_of(steps: list[StepOutput]) -> list[int]:
    return [t for s in steps for t in s.token_ids]


def test_greedy_sequences_of_one_request_are_all_the_greedy_answer(mistral, reference):
    ids, expected = reference
    outputs = run_sequences(mistral, {"n": (ids, SamplingParams(max_tokens=10), 3)})
    assert sorted(outputs) == [("n", 0), ("n", 1), ("n", 2)]
    for steps in outputs.values():
        assert tokens_of(steps) == expected[:10] and steps[-1].finish_reason == "length"
    assert mistral.cache.free_slots == mistral.cache.n_slots


def test_sampled_sequences_match_separate_requests_seeded_in_turn(mixtral):
    ids = prompt(20, seed=5)
    params = dict(max_tokens=12, temperature=1.0, top_k=50)
    together = run_sequences(mixtral, {"n": (ids, SamplingParams(seed=7, **params), 3)})
    apart = run(mixtral, {f"s{i}": (ids, SamplingParams(seed=7 + i, **params)) for i in range(3)})
    answers = [tokens_of(together[("n", i)]) for i in range(3)]
    assert answers == [tokens_of(apart[f"s{i}"]) for i in range(3)]
    assert len(set(map(tuple, answers))) > 1  # the sequences did sample differently


def test_the_prompt_is_prefilled_once_for_all_sequences(mistral, monkeypatch):
    ids = prompt(17, seed=8)
    forwarded = []
    forward_batch = mistral.model.forward_batch

    def counting(tokens, segments, cache):
        forwarded.append(tokens.shape[0])
        return forward_batch(tokens, segments, cache)

    monkeypatch.setattr(mistral.model, "forward_batch", counting)
    outputs = run_sequences(mistral, {"n": (ids, SamplingParams(max_tokens=3), 4)})
    assert forwarded == [17, 4, 4]  # the prompt once, then one decode token per sequence
    assert {k: len(tokens_of(v)) for k, v in outputs.items()} == {("n", i): 3 for i in range(4)}


def test_cancelling_a_request_ends_all_its_sequences(mistral):
    ids = prompt(30, seed=9)
    budget, mistral.max_num_tokens = mistral.max_num_tokens, 8
    try:
        mistral.add_request("c", ids, SamplingParams(max_tokens=5), num_sequences=3)
        assert mistral.step() == []  # the first prefill chunk: the other two sequences wait for it
        mistral.cancel("c")
        outputs = mistral.step()
    finally:
        mistral.max_num_tokens = budget
    assert sorted((o.sequence_index, o.finish_reason, o.token_ids) for o in outputs) == [
        (i, "cancelled", []) for i in range(3)]
    assert not mistral.has_work() and mistral.cache.free_slots == mistral.cache.n_slots


def test_a_request_waits_until_all_its_sequences_have_slots(tiny_mistral_dir):
    engine = Engine(tiny_mistral_dir, dtype="float32", max_batch_size=3)
    engine.add_request("one", prompt(5), SamplingParams(max_tokens=4))
    engine.add_request("three", prompt(6, seed=1), SamplingParams(max_tokens=2), num_sequences=3)
    engine.step()
    assert engine.stats().running == 1 and engine.stats().queued == 1
    outputs = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault((out.request_id, out.sequence_index), []).append(out)
    assert sorted(outputs) == [("one", 0), ("three", 0), ("three", 1), ("three", 2)]
    with pytest.raises(ValueError, match=r"num_return_sequences must be an integer in 1\.\.3"):
        engine.add_request("four", prompt(5), SamplingParams(max_tokens=1), num_sequences=4)
    with pytest.raises(ValueError, match="num_return_sequences must be"):
        engine.add_request("zero", prompt(5), SamplingParams(max_tokens=1), num_sequences=0)
    assert not engine.has_work()


@pytest.mark.parametrize(
    "ids, params, message",
    [
        ([], SamplingParams(max_tokens=1), "prompt is empty"),
        ([1, 32768], SamplingParams(max_tokens=1), "prompt holds 32768"),
        ([1, -1], SamplingParams(max_tokens=1), "prompt holds -1"),
        ([1], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        ([1], SamplingParams(max_tokens=1.5), "max_tokens must be an integer"),
        ([1], SamplingParams(max_tokens=1, top_p=1.5), r"top_p must be in \[0, 1\]"),
        ([1], SamplingParams(max_tokens=1, top_k=-1), "top_k must be >= 0"),
        ([1], SamplingParams(max_tokens=1, temperature=-0.5), "temperature must be >= 0"),
        ([1], SamplingParams(max_tokens=1, temperature=float("nan")), "temperature must be a finite number"),
        ([1], SamplingParams(max_tokens=1, repetition_penalty=0), "repetition_penalty must be > 0"),
        ([1], SamplingParams(max_tokens=1, min_tokens=-1), "min_tokens must be >= 0"),
        ([1], SamplingParams(max_tokens=1, seed=-3), "seed must be >= 0"),
        ([1], SamplingParams(max_tokens=1, end_id=40000), "end_id holds token 40000"),
        ([1], SamplingParams(max_tokens=1, stop_words=[[]]), "stop_words entries must be non-empty"),
        ([1], SamplingParams(max_tokens=1, bad_words=[[5, "x"]]), "bad_words holds 'x'"),
    ],
)
def test_bad_requests_are_rejected(mistral, ids, params, message):
    with pytest.raises(ValueError, match=message):
        mistral.add_request("bad", ids, params)
    assert not mistral.has_work()


def test_duplicate_request_id(mistral):
    mistral.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already running"):
        mistral.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    (out,) = mistral.step()
    assert out.finished and not mistral.has_work()


@pytest.mark.slow
@pytest.mark.parametrize("asset", ["smollm2-mistral", "smollm2-mixtral"])
def test_greedy_matches_transformers_on_the_demo_models(demo_assets, asset):
    """The real SmolLM2 weights, dense and upcycled to a Mixtral: the same tokens as HF, in float32."""
    from plateforme.python_backend.tokenization import load_tokenizer

    model_dir = demo_assets[asset]
    tokenizer = load_tokenizer(model_dir)
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    ids = tokenizer.encode_chat(chat)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=tokenizer.eos_id, pad_token_id=0)
    expected = hf.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    del hf

    tokens, last = generate(Engine(model_dir, dtype="float32"), ids, max_tokens=32, end_id=tokenizer.eos_id)
    assert last.finish_reason == "end_id" and expected[-1] == tokenizer.eos_id  # the engine drops end_id
    assert tokens == expected[:-1]
    assert "Paris" in tokenizer.decode(tokens)
