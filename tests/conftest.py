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
