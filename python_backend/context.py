"""How many tokens (prompt + generated) an endpoint accepts; shared by tokenizer and engine."""
from __future__ import annotations

import json
from pathlib import Path

# Without a configured limit, long-context checkpoints (Mistral 7B v0.2: 32k) are capped so
# that the CPU engine's per-sequence KV cache stays modest.
DEFAULT_CONTEXT_CAP = 8192


def context_length(model_dir: str | Path, configured: int = 0) -> int:
    """`configured` when > 0, else the checkpoint's max_position_embeddings capped at 8192."""
    if configured and configured > 0:
        return int(configured)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(int(config.get("max_position_embeddings", DEFAULT_CONTEXT_CAP)), DEFAULT_CONTEXT_CAP)
