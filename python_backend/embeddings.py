"""Sentence embeddings from a sentence-transformers style BERT checkpoint: mean pooling over
the attention mask, then L2 normalisation (what all-MiniLM-L6-v2 was trained with)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class Embedder:
    """Embeds texts with a BERT-like encoder; inputs longer than `max_tokens` are truncated."""

    def __init__(
        self,
        model_dir: str | Path,
        max_tokens: int | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        _check_pooling(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        limit = config.max_position_embeddings
        if max_tokens is None:
            max_tokens = _trained_length(model_dir) or limit
        # [CLS] and [SEP] alone take two tokens.
        if not isinstance(max_tokens, int) or not 2 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be an int in [2, {limit}], got {max_tokens!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_tokens: int = max_tokens
        self.batch_size = batch_size
        self.dim: int = config.hidden_size
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, config=config).to(self.device).eval()

    def embed(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(float32 array (N, dim) of unit vectors, tokens the model read per text, specials included)."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts must not be empty")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}")
        vectors, counts = [], []
        for start in range(0, len(texts), self.batch_size):
            batch_vectors, batch_counts = self._embed_batch(list(texts[start : start + self.batch_size]))
            vectors.append(batch_vectors)
            counts.extend(batch_counts)
        return np.concatenate(vectors), counts

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        return vectors.cpu().numpy(), encoded["attention_mask"].sum(dim=1).tolist()


def _check_pooling(model_dir: Path) -> None:
    """Refuse checkpoints pooled some other way than mean tokens: their vectors would be wrong."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    enabled = sorted(key for key, value in config.items() if key.startswith("pooling_mode") and value)
    if enabled != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{model_dir} uses pooling {enabled}; only mean-token pooling is supported")


def _trained_length(model_dir: Path) -> int | None:
    """The sequence length the sentence-transformers model was trained with, if recorded."""
    path = model_dir / "sentence_bert_config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("max_seq_length")
