"""Tiny random Mistral / Mixtral checkpoints for tests: real architectures and real Mistral
tokenizers, random weights, made in milliseconds by transformers."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from plateforme.builders.atomic import atomic_directory

# mistral-common ships these files; the suffix tells it the tokenizer version.
MISTRAL_TOKENIZER_FILES = {
    "v1": ("tokenizer.model.v1", 32000),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3", 32768),
}


@dataclass(frozen=True)
class TinySpec:
    architecture: str  # "mistral" | "mixtral"
    tokenizer: str  # "v1" | "v3"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA
    sliding_window: int | None = 16
    max_position_embeddings: int = 256
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    seed: int = 0


def mistral_tokenizer_file(version: str) -> Path:
    import mistral_common

    name, _ = MISTRAL_TOKENIZER_FILES[version]
    return Path(mistral_common.__file__).parent / "data" / name


def make_tiny_checkpoint(out_dir: str | Path, spec: TinySpec) -> Path:
    """Write a random HF checkpoint (float32 safetensors + config) with a Mistral tokenizer file."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    _, vocab_size = MISTRAL_TOKENIZER_FILES[spec.tokenizer]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=spec.sliding_window,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    if spec.architecture == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif spec.architecture == "mixtral":
        config = MixtralConfig(
            **common,
            num_local_experts=spec.num_local_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
        )
        model = MixtralForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {spec.architecture!r} (mistral or mixtral)")
    # Random init is tiny-valued; widen it so greedy decoding is not a run of one token.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
    model = model.to(torch.float32)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        shutil.copy(mistral_tokenizer_file(spec.tokenizer), tmp / f"tokenizer.model.{spec.tokenizer}")
    return out_dir
