"""Guided decoding: JSON mode, JSON schema, regex and EBNF through the engine's sampling loop, the
tokenizer vocabularies xgrammar sees, and bad guides."""
from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch

from plateforme.builders.tiny import mistral_tokenizer_file
from plateforme.python_backend.engine import Engine
from plateforme.python_backend.guided import GuideCompiler, GuidedDecodingError
from plateforme.python_backend.sampling import SamplingParams
from plateforme.python_backend.tokenization import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["age", "color"],
}


@pytest.fixture(scope="module")
def mistral(tiny_mistral_dir):
    return Engine(tiny_mistral_dir, dtype="float32", max_batch_size=50)


@pytest.fixture(scope="module")
def compiler(tiny_mistral_dir, mistral):
    return GuideCompiler(tiny_mistral_dir, mistral.vocab_size)


@pytest.fixture(scope="module")
def prompt(v3):
    return v3.encode_chat({"messages": [{"role": "user", "content": "Describe a cat in JSON."}]})


def generate(engine: Engine, tokenizer, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple]:
    """(text, finish reason) of each request, run together."""
    for i, (ids, params) in enumerate(requests):
        engine.add_request(str(i), ids, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    reasons: dict[str, str] = {}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [(tokenizer.decode(tokens[str(i)]), reasons[str(i)]) for i in range(len(requests))]


def sampled(compiler, tokenizer, guide_type, guide, max_tokens, seed, budget_rule=True) -> SamplingParams:
    """Sampling at temperature 1 (TensorRT-LLM samples only with top_k or top_p set)."""
    return SamplingParams(
        max_tokens=max_tokens,
        end_id=tokenizer.eos_id,
        temperature=1.0,
        top_p=1.0,
        seed=seed,
        guide=compiler.compile(guide_type, guide, max_tokens=max_tokens if budget_rule else None),
    )


def test_json_mode_sampled_generations_all_parse(mistral, compiler, v3, prompt):
    # Small budgets included: the object is closed in time whatever the random model samples.
    budgets = [2, 5, 9, 16, 32, 64]
    requests = [(prompt, sampled(compiler, v3, "json", None, budgets[i % 6], seed=i)) for i in range(50)]
    results = generate(mistral, v3, requests)
    for text, reason in results:
        assert isinstance(json.loads(text), dict), text
        assert reason == "stop"  # closed by the grammar, not cut at max_tokens
    objects = [text for text, _ in results if text != "{}"]
    assert len(objects) >= 20 and len(set(objects)) == len(objects)


def test_json_mode_without_budget_is_cut_at_max_tokens(mistral, compiler, v3, prompt):
    # A random model hardly ever closes a string by itself: the budget rule is what completes JSON.
    requests = [(prompt, sampled(compiler, v3, "json", None, 24, i, budget_rule=False)) for i in range(6)]
    cut = [text for text, reason in generate(mistral, v3, requests) if reason == "length"]
    assert len(cut) >= 3
    for text in cut:
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_json_schema_instances_validate(mistral, compiler, v3, prompt):
    requests = [(prompt, sampled(compiler, v3, "json_schema", json.dumps(SCHEMA), 48, i)) for i in range(8)]
    results = generate(mistral, v3, requests)
    values = [json.loads(text) for text, _ in results]
    for value in values:
        jsonschema.validate(value, SCHEMA)
    assert {reason for _, reason in results} <= {"stop", "end_id"}
    assert len({v["color"] for v in values}) > 1 and len({v["age"] for v in values}) > 1


def test_regex(mistral, compiler, v3, prompt):
    requests = [(prompt, sampled(compiler, v3, "regex", r"[0-9]{3}-[a-z]{2}", 16, i)) for i in range(5)]
    results = generate(mistral, v3, requests)
    for text, reason in results:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and reason == "stop"
    assert len({text for text, _ in results}) > 1


def test_ebnf_grammar(mistral, compiler, v3, prompt):
    grammar = 'root ::= answer " x" number\nanswer ::= "yes" | "no"\nnumber ::= [1-9] [0-9]?'
    requests = [(prompt, sampled(compiler, v3, "ebnf_grammar", grammar, 16, i)) for i in range(6)]
    results = generate(mistral, v3, requests)
    for text, reason in results:
        assert re.fullmatch(r"(yes|no) x[1-9][0-9]?", text)
        assert reason in ("stop", "end_id")  # EOS may be chosen after one digit


def test_greedy_guided_decoding(mistral, compiler, v3, prompt):
    guide = compiler.compile("json", None, max_tokens=30)
    text, reason = generate(mistral, v3, [(prompt, SamplingParams(max_tokens=30, end_id=v3.eos_id, guide=guide))])[0]
    assert isinstance(json.loads(text), dict) and reason == "stop"


def test_guide_follows_tokens_and_rejects_others(compiler, v3):
    guide = compiler.compile("regex", "ab|cd")
    logits = torch.zeros(compiler.vocab_size)
    guide.mask_logits(logits)
    allowed = {v3.decode([i]) for i in torch.nonzero(logits == 0).flatten().tolist()}
    assert allowed == {"a", "ab", "c", "cd"}
    with pytest.raises(GuidedDecodingError, match="not allowed"):
        guide.accept(v3.encode_stop_word("x")[0])
    (ab,) = v3.encode_stop_word("ab")
    guide.accept(ab)
    assert guide.is_terminated()
    logits = torch.zeros(compiler.vocab_size)
    guide.mask_logits(logits)
    assert torch.nonzero(logits == 0).flatten().tolist() == guide.end_token_ids == [v3.eos_id]


def test_control_tokens_and_vocabulary_padding_are_never_allowed(tiny_mistral_dir, v3):
    compiler = GuideCompiler(tiny_mistral_dir, 32768 + 64)
    guide = compiler.compile("json", None)
    for token in v3.encode_stop_word('{"'):
        guide.accept(token)
    logits = torch.zeros(32768 + 64)
    guide.mask_logits(logits)  # inside a string: every ordinary token may come
    inst = v3.encode_stop_word("[INST]")
    assert len(inst) == 1 and logits[inst[0]] == -torch.inf and logits[v3.bos_id] == -torch.inf
    assert bool((logits[32768:] == -torch.inf).all())
    assert logits[v3.encode_stop_word("cat")[0]] == 0
    # Nor are raw control characters, which JSON strings may not hold (older xgrammar let them in).
    allowed = torch.nonzero(logits == 0).flatten().tolist()
    assert len(allowed) > 30000 and not [i for i in allowed if any(ord(c) < 0x20 for c in v3.decode([i]))]


def test_compiled_guides_are_cached(compiler):
    first = compiler.compile("regex", "[a-z]+")
    size = len(compiler._cache)
    second = compiler.compile("regex", "[a-z]+")
    assert len(compiler._cache) == size and first is not second  # one grammar, two request states
    compiler.compile("regex", "[a-z]*")
    assert len(compiler._cache) == size + 1


@pytest.mark.parametrize(
    "guide_type, guide, message",
    [
        ("xml", "<a/>", "unknown guided decoding guide type 'xml'"),
        ("regex", None, "needs a guide"),
        ("json_schema", "", "needs a guide"),
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", "[1]", "must be a JSON object"),
        ("json_schema", '{"type": 3}', "invalid JSON schema: .*Type should be a string"),
        ("regex", "[0-9", "invalid regex: .*Unclosed"),
        ("ebnf_grammar", "root ::= missing", 'invalid EBNF grammar: .*Rule "missing" is not defined'),
    ],
)
def test_invalid_guides(compiler, guide_type, guide, message):
    with pytest.raises(GuidedDecodingError, match=message):
        compiler.compile(guide_type, guide)


def test_json_mode_budget_must_fit_an_object(compiler):
    with pytest.raises(GuidedDecodingError, match="max_tokens >= 2"):
        compiler.compile("json", None, max_tokens=1)


def random_json(compiler: GuideCompiler, decode, max_tokens: int, seed: int, bias=None) -> str:
    """JSON mode driven by random logits (plus ``bias``), as a random model would."""
    generator = torch.Generator().manual_seed(seed)
    guide = compiler.compile("json", None, max_tokens=max_tokens)
    tokens = []
    while not guide.is_terminated():
        logits = torch.randn(compiler.vocab_size, generator=generator) * 3
        if bias is not None:
            logits += bias
        guide.mask_logits(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        guide.accept(token)
        tokens.append(token)
    assert len(tokens) <= max_tokens
    return decode(tokens)


def test_json_mode_closes_nested_values_escapes_and_characters_in_time(compiler, v3):
    # Favour the tokens that open objects, arrays, literals, numbers, escapes and multi-byte
    # characters (the emoji are byte tokens <0xF0><0x9F>...), not those that close them: the
    # budget runs out in the middle of everything.
    pieces = list('{[,:"-.eE0123456789tfnu\\') + ["true", "null", "é", "中", "😀🦜"]
    bias = torch.zeros(compiler.vocab_size)
    for piece in pieces:
        bias[v3.encode_stop_word(piece)] = 16.0
    texts = [random_json(compiler, v3.decode, n, seed, bias) for seed in range(15) for n in (4, 9, 17, 40)]
    kinds = set()

    def walk(value):
        kinds.add(type(value).__name__)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            walk(item)

    for text in texts:
        walk(json.loads(text))
    assert kinds == {"dict", "list", "str", "int", "float", "bool", "NoneType"}
    assert any("\\" in text for text in texts) and any(ord(c) > 0xFFFF for text in texts for c in text)


def test_tekken_vocabulary(tmp_path):
    shutil.copy(mistral_tokenizer_file("v3").parent / "tekken_240911.json", tmp_path / "tekken.json")
    tokenizer = load_tokenizer(tmp_path)
    compiler = GuideCompiler(tmp_path, tokenizer.vocab_size)
    for seed, budget in enumerate([2, 9, 40]):
        assert isinstance(json.loads(random_json(compiler, tokenizer.decode, budget, seed)), dict)


@pytest.mark.slow
def test_hugging_face_vocabulary_with_the_demo_model(smollm2_dir, smollm2):
    engine = Engine(smollm2_dir, dtype="float32", max_batch_size=1)
    compiler = GuideCompiler(smollm2_dir, engine.vocab_size)
    for seed, budget in enumerate([2, 9, 40]):
        assert isinstance(json.loads(random_json(compiler, smollm2.decode, budget, seed)), dict)
    guide = compiler.compile("json", None)
    for token in smollm2.encode_stop_word('{"'):
        guide.accept(token)
    logits = torch.zeros(engine.vocab_size)
    guide.mask_logits(logits)
    im_start = smollm2.encode_text("<|im_start|>", add_bos=False)
    assert len(im_start) == 1 and logits[im_start[0]] == -torch.inf and logits[smollm2.eos_id] == -torch.inf
    # Greedy: the real model writes an object of its own, closed within the budget.
    ids = smollm2.encode_chat({"messages": [{"role": "user", "content": "Describe a cat as a JSON object."}]})
    params = SamplingParams(max_tokens=40, end_id=smollm2.eos_id, guide=compiler.compile("json", None, max_tokens=40))
    text, reason = generate(engine, smollm2, [(ids, params)])[0]
    value = json.loads(text)
    assert isinstance(value, dict) and value and reason == "stop", text
