"""The validate stage's checks: artifacts against the manifest, tokenizer against the model, and the
built engine's logits against a reference.

Logits parity (PyTorch engine): plateforme's PyTorch model (python_backend.model) and Hugging Face
transformers, both in float32, run the same fixed prompts; every logit must agree within
PARITY_ATOL + PARITY_RTOL * |reference| and the next-token argmax must be the same at every position.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARITY_PROMPTS = (
    "The capital of France is",
    "Mixture-of-experts layers route each token to two of eight experts, so",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Triton Inference Server serves models over HTTP and gRPC.",
)
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3
# TensorRT-LLM engines run in bf16/fp16: their log-probabilities are compared to fp32 HF ones.
ENGINE_LOGPROB_ATOL = 0.15
ENGINE_PARITY_TOKENS = 8


class ValidationError(ValueError):
    """The artifacts do not match the manifest or the reference; the message says how."""


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def check_tokenizer(model_dir: Path, embedding_rows: int) -> dict[str, Any]:
    """The tokenizer in `model_dir` must fit the model's embedding table: every id it can produce,
    BOS/EOS/padding included, must be a row of the table."""
    from plateforme.python_backend.tokenization import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
    except ValueError as exc:
        raise ValidationError(f"the tokenizer cannot be loaded: {exc}") from None
    if tokenizer.vocab_size > embedding_rows:
        raise ValidationError(
            f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the model's embedding table has "
            f"{embedding_rows} rows (vocab_size): tokenizer and weights come from different models")
    special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    for role, token in special.items():
        if token is not None and not 0 <= token < embedding_rows:
            raise ValidationError(f"the tokenizer's {role} id {token} is outside the embedding table "
                                  f"[0, {embedding_rows})")
    config = read_config(model_dir)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for token in _ids(config.get(key)):
            if not 0 <= token < tokenizer.vocab_size:
                raise ValidationError(f"config.json {key} {token} is outside the tokenizer's vocabulary "
                                      f"[0, {tokenizer.vocab_size})")
    return {"tokenizer": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
            "embedding_rows": embedding_rows, **{f"{k}_id": v for k, v in special.items()}}


def check_embedding_tokenizer(model_dir: Path) -> dict[str, Any]:
    """A BERT-style embedder's tokenizer must fit its word-embedding table."""
    from transformers import AutoTokenizer

    rows = int(read_config(model_dir)["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if len(tokenizer) > rows:
        raise ValidationError(f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the encoder's "
                              f"embedding table has {rows} rows: tokenizer and weights come from different models")
    for role in ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id"):
        token = getattr(tokenizer, role)
        if token is not None and not 0 <= token < rows:
            raise ValidationError(f"the tokenizer's {role} {token} is outside the embedding table [0, {rows})")
    return {"vocab_size": len(tokenizer), "embedding_rows": rows}


def check_rendered_engine(repository: Path, name: str, expected: dict[str, str], max_batch_size: int | None) -> dict:
    """The endpoint's rendered engine model (Triton's ModelConfig protobuf) must carry the manifest's
    settings: `expected` parameter values and max_batch_size."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / f"{name}-engine" / "config.pbtxt"
    try:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ValidationError(f"the rendered engine model {path} cannot be read as a Triton model config: {exc}")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    for key, value in expected.items():
        if parameters.get(key) != value:
            raise ValidationError(f"{path}: parameter {key} is {parameters.get(key)!r}, the manifest asks {value!r}")
    if max_batch_size is not None and config.max_batch_size != max_batch_size:
        raise ValidationError(f"{path}: max_batch_size {config.max_batch_size}, the manifest asks {max_batch_size}")
    return {"backend": config.backend, "max_batch_size": config.max_batch_size,
            **{key: parameters[key] for key in expected}}


def pytorch_logits_parity(model_dir: Path) -> dict[str, Any]:
    """plateforme's PyTorch model vs HF transformers, float32, on PARITY_PROMPTS (see module doc)."""
    import torch
    from transformers import AutoModelForCausalLM

    from plateforme.python_backend.model import load_model
    from plateforme.python_backend.tokenization import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ours = load_model(model_dir, dtype=torch.float32)
    # Eager experts: the reference computes each expert plainly.
    reference = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, experts_implementation="eager").eval()
    worst_abs = worst_excess = 0.0
    tokens = mismatched = 0
    with torch.inference_mode():
        for prompt in PARITY_PROMPTS:
            ids = torch.tensor(tokenizer.encode_text(prompt), dtype=torch.long)
            got = ours(ids)
            want = reference(ids[None]).logits[0].float()
            diff = (got - want).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            worst_excess = max(worst_excess, float((diff - PARITY_ATOL - PARITY_RTOL * want.abs()).max()))
            mismatched += int((got.argmax(-1) != want.argmax(-1)).sum())
            tokens += len(ids)
    report = {"reference": "transformers AutoModelForCausalLM, float32", "engine": "plateforme PyTorch, float32",
              "prompts": len(PARITY_PROMPTS), "positions": tokens, "atol": PARITY_ATOL, "rtol": PARITY_RTOL,
              "max_abs_diff": worst_abs, "argmax_mismatches": mismatched}
    if worst_excess > 0 or mismatched:
        raise ValidationError(
            f"logits differ from transformers: max |diff| {worst_abs:.3g} over {tokens} positions "
            f"(tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g} x |logit|), {mismatched} argmax mismatch(es)")
    return report


def tensorrt_llm_parity(engine_dir: Path, hf_dir: Path) -> dict[str, Any]:  # pragma: no cover - needs a GPU
    """The built engine, through TensorRT-LLM's runtime, against HF transformers (float32) on the
    fixed prompts: greedy tokens must agree and each token's log-probability must be within
    ENGINE_LOGPROB_ATOL. Written against ModelRunnerCpp's documented interface; not executed in
    this repository's CI (TensorRT-LLM cannot be installed there)."""
    import torch
    from tensorrt_llm.runtime import ModelRunnerCpp
    from transformers import AutoModelForCausalLM

    from plateforme.python_backend.tokenization import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)
    runner = ModelRunnerCpp.from_dir(str(engine_dir), rank=0)
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, device_map="auto").eval()
    worst = 0.0
    for prompt in PARITY_PROMPTS:
        ids = tokenizer.encode_text(prompt)
        out = runner.generate(
            batch_input_ids=[torch.tensor(ids, dtype=torch.int32)], max_new_tokens=ENGINE_PARITY_TOKENS,
            end_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, top_k=1, output_log_probs=True, return_dict=True)
        generated = out["output_ids"][0][0][len(ids):len(ids) + ENGINE_PARITY_TOKENS].tolist()
        engine_logprobs = out["log_probs"][0][0][:len(generated)].float().cpu()
        with torch.inference_mode():
            sequence = torch.tensor([ids + generated], device=reference.device)
            logits = reference(sequence).logits[0, len(ids) - 1:-1].float().cpu()
        expected = logits.argmax(-1).tolist()[:len(generated)]
        if generated != expected:
            raise ValidationError(f"engine greedy tokens {generated} differ from transformers' {expected} "
                                  f"for prompt {prompt!r}")
        reference_logprobs = torch.log_softmax(logits, -1)[torch.arange(len(generated)), generated]
        worst = max(worst, float((engine_logprobs - reference_logprobs).abs().max()))
    if worst > ENGINE_LOGPROB_ATOL:
        raise ValidationError(f"engine log-probabilities differ from transformers' by up to {worst:.3g} "
                              f"(tolerance {ENGINE_LOGPROB_ATOL})")
    return {"reference": "transformers float32", "engine": str(engine_dir), "prompts": len(PARITY_PROMPTS),
            "tokens_per_prompt": ENGINE_PARITY_TOKENS, "logprob_atol": ENGINE_LOGPROB_ATOL,
            "max_logprob_diff": worst}
