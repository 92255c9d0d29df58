"""Embedder over the all-MiniLM-L6-v2 demo asset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from plateforme.builders.assets import prepare_assets
from plateforme.python_backend.embeddings import Embedder

SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
LONG_TEXT = "tokens " * 400


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return prepare_assets(root, names=["minilm-embed"], progress=False)["minilm-embed"]


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    return Embedder(minilm_dir)


def test_unsupported_pooling_is_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ValueError, match="only mean-token pooling"):
        Embedder(tmp_path)


@pytest.mark.slow
def test_shape_dtype_and_unit_norm(embedder):
    assert (embedder.dim, embedder.max_tokens) == (384, 256)
    vectors, counts = embedder.embed(SENTENCES + [""])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert counts[-1] == 2  # [CLS] [SEP]
    assert counts[0] == len(embedder.tokenizer(SENTENCES[0])["input_ids"])


@pytest.mark.slow
def test_similar_sentences_score_higher(embedder):
    vectors, _ = embedder.embed(SENTENCES)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > 0.5 > 0.1 > unrelated


@pytest.mark.slow
def test_matches_sentence_transformers(embedder, minilm_dir):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu")
    texts = SENTENCES + [LONG_TEXT, "Ünïcode, punctuation… and CAPS!"]
    vectors, _ = embedder.embed(texts)
    np.testing.assert_allclose(vectors, reference.encode(texts, convert_to_numpy=True), atol=1e-5)


@pytest.mark.slow
def test_long_inputs_are_truncated(embedder, minilm_dir):
    _, counts = embedder.embed([LONG_TEXT, "short"])
    assert counts == [256, 3]

    short = Embedder(minilm_dir, max_tokens=8)
    vectors, counts = short.embed([LONG_TEXT, "tokens " * 6, "tokens " * 20])
    assert counts == [8, 8, 8]
    # Truncation keeps the first tokens: these three texts are the same 8 tokens to the model.
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


@pytest.mark.slow
def test_batching_does_not_change_vectors(minilm_dir, embedder):
    texts = SENTENCES + [LONG_TEXT, "x"]
    together, counts = embedder.embed(texts)
    one_by_one = Embedder(minilm_dir, batch_size=1)
    separate, separate_counts = one_by_one.embed(texts)
    np.testing.assert_allclose(together, separate, atol=1e-5)
    assert counts == separate_counts


@pytest.mark.slow
def test_bad_input(embedder, minilm_dir):
    with pytest.raises(ValueError, match="must not be empty"):
        embedder.embed([])
    with pytest.raises(ValueError, match="list of strings"):
        embedder.embed("a single string")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        embedder.embed(["fine", 3])
    with pytest.raises(ValueError, match="max_tokens"):
        Embedder(minilm_dir, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        Embedder(minilm_dir, max_tokens=513)
