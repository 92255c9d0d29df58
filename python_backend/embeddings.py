"""Sentence embeddings from a sentence-transformers style BERT checkpoint: mean pooling over
the attention mask, then L2 normalisation (what all-MiniLM-L6-v2 was trained with).

Two runtimes behind one interface (`embed(texts) -> (vectors, token counts)`):
- `Embedder`: the checkpoint run by PyTorch;
- `OnnxEmbedder`: an ONNX export of it (builders/onnx_embedder.py) run by ONNX Runtime. The exported
  graph holds the pooling and the normalisation too, so it maps token ids straight to unit vectors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# The layout of an ONNX embedder directory, shared with builders/onnx_embedder.py (which writes it).
ONNX_MODEL_FILE = "model.onnx"
ONNX_MANIFEST_FILE = "embedder.json"
ONNX_FORMAT = "plateforme-onnx-embedder"
ONNX_INPUTS = ("input_ids", "attention_mask")  # int64 [batch, sequence]
ONNX_OUTPUT = "embedding"  # float32 [batch, dim], unit vectors


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of the unmasked tokens, L2-normalised: (B, T, D), (B, T) -> (B, D) float32."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


class _BatchingEmbedder:
    """Checks the texts and embeds them `batch_size` at a time; subclasses embed one tokenized batch."""

    tokenizer = None
    max_tokens: int
    batch_size: int
    dim: int

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

    def tokenize(self, texts: list[str], tensor_type: str) -> dict:
        """The model's inputs for `texts`: padded to the longest, truncated to `max_tokens`."""
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors=tensor_type
        )

    def _embed_batch(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        raise NotImplementedError


def _check_max_tokens(max_tokens, limit: int) -> None:
    # [CLS] and [SEP] alone take two tokens.
    if not isinstance(max_tokens, int) or not 2 <= max_tokens <= limit:
        raise ValueError(f"max_tokens must be an int in [2, {limit}], got {max_tokens!r}")


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class Embedder(_BatchingEmbedder):
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
        _check_max_tokens(max_tokens, limit)
        _check_batch_size(batch_size)
        self.max_tokens: int = max_tokens
        self.max_position_embeddings: int = limit
        self.batch_size = batch_size
        self.dim: int = config.hidden_size
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, config=config).to(self.device).eval()

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        encoded = self.tokenize(texts, "pt").to(self.device)
        hidden = self.model(**encoded).last_hidden_state
        vectors = mean_pool_normalize(hidden, encoded["attention_mask"])
        return vectors.cpu().numpy(), encoded["attention_mask"].sum(dim=1).tolist()


class OnnxEmbedder(_BatchingEmbedder):
    """Embeds texts with an exported ONNX embedder directory (model.onnx, embedder.json, tokenizer files)
    through ONNX Runtime: the CUDA provider where this onnxruntime has it, else the CPU provider."""

    def __init__(
        self,
        onnx_dir: str | Path,
        max_tokens: int | None = None,
        batch_size: int = 32,
        num_threads: int = 0,
        providers: list[str] | None = None,
    ):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(
                "the ONNX embedder needs onnxruntime: pip install 'plateforme[onnx]'"
            ) from None
        from transformers import AutoTokenizer

        onnx_dir = Path(onnx_dir)
        manifest = read_onnx_manifest(onnx_dir)
        limit = manifest["max_position_embeddings"]
        if max_tokens is None:
            max_tokens = manifest["max_tokens"]
        _check_max_tokens(max_tokens, limit)
        _check_batch_size(batch_size)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.dim = manifest["dim"]
        self.tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
        options = onnxruntime.SessionOptions()
        if num_threads > 0:
            options.intra_op_num_threads = num_threads
        available = onnxruntime.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = onnxruntime.InferenceSession(
            str(onnx_dir / manifest["model"]), sess_options=options, providers=providers
        )
        self.providers: list[str] = self.session.get_providers()
        names = tuple(i.name for i in self.session.get_inputs())
        if sorted(names) != sorted(ONNX_INPUTS) or [o.name for o in self.session.get_outputs()] != [ONNX_OUTPUT]:
            raise ValueError(
                f"{onnx_dir / manifest['model']}: expected inputs {ONNX_INPUTS} and output {ONNX_OUTPUT!r}, "
                f"got inputs {names} and outputs {[o.name for o in self.session.get_outputs()]}"
            )

    def _embed_batch(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        encoded = self.tokenize(texts, "np")
        feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in ONNX_INPUTS}
        (vectors,) = self.session.run([ONNX_OUTPUT], feed)
        return vectors.astype(np.float32, copy=False), feed["attention_mask"].sum(axis=1).tolist()


def read_onnx_manifest(onnx_dir: Path) -> dict:
    """The embedder.json of an exported ONNX embedder directory, with a clear error when it is not one."""
    path = Path(onnx_dir) / ONNX_MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{onnx_dir} is not an exported ONNX embedder (no {ONNX_MANIFEST_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path} does not describe an ONNX embedder (format must be {ONNX_FORMAT!r})")
    missing = [k for k in ("model", "dim", "max_tokens", "max_position_embeddings") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    if not (Path(onnx_dir) / manifest["model"]).is_file():
        raise ValueError(f"{onnx_dir} has no {manifest['model']}")
    return manifest


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
