"""Shared fixtures: tiny random checkpoints, made once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from plateforme.builders.tiny import TinySpec, make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    """Mistral, v3 tokenizer (control tokens, tools), sliding window 16, GQA 4/2."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "mistral-v3", TinySpec("mistral", "v3")
    )


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory):
    """Mixtral, v1 tokenizer, 8 experts top-2, no sliding window."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "mixtral-v1",
        TinySpec("mixtral", "v1", sliding_window=None),
    )


@pytest.fixture(scope="session")
def demo_assets():
    """The demo checkpoints, built once into the default assets dir and reused across runs."""
    from plateforme.builders.assets import prepare_assets

    return prepare_assets(progress=False)


@pytest.fixture(scope="session")
def smollm2_dir(demo_assets):
    """SmolLM2-135M-Instruct as a checkpoint dir: HF byte-level BPE tokenizer with a ChatML template."""
    return demo_assets["smollm2-mistral"]


@pytest.fixture(scope="session")
def v1(tiny_mixtral_dir):
    from plateforme.python_backend.tokenization import load_tokenizer

    return load_tokenizer(tiny_mixtral_dir)


@pytest.fixture(scope="session")
def v3(tiny_mistral_dir):
    from plateforme.python_backend.tokenization import load_tokenizer

    return load_tokenizer(tiny_mistral_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from plateforme.python_backend.tokenization import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_window8_dir(tmp_path_factory):
    """Mistral with a sliding window of 8 tokens."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "mistral-window8", TinySpec("mistral", "v3", sliding_window=8, seed=1)
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_mistral_dir, tiny_mixtral_dir, tiny_window8_dir, demo_assets):
    """A real tritonserver on free loopback ports: tiny Mistral (v3) and Mixtral (v1) endpoints in
    float32, a tiny Mistral with an 8-token window, the SmolLM2 demo model, and the MiniLM
    embedding endpoint."""
    from plateforme.builders.repository import ChatEndpoint, EmbeddingEndpoint, render_repository
    from plateforme.server import ServerConfig, TritonServer, free_port

    repository = render_repository(
        tmp_path_factory.mktemp("repo") / "models",
        chat=[
            ChatEndpoint("mistral-tiny", tiny_mistral_dir, dtype="float32", max_batch_size=16),
            ChatEndpoint("mistral-small", tiny_mixtral_dir, dtype="float32", max_batch_size=8),
            ChatEndpoint("mistral-window8", tiny_window8_dir, dtype="float32", max_batch_size=4,
                         max_num_tokens=16),
            ChatEndpoint("smollm2", demo_assets["smollm2-mistral"], max_batch_size=8),
        ],
        embeddings=[EmbeddingEndpoint("mistral-embed", demo_assets["minilm-embed"])],
    )
    config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with TritonServer(config) as running:
        yield running
