"""Model hyper-parameters, read from a Hugging Face ``config.json``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Per architecture: HF's defaults for keys a config.json may leave out, and whether the
# architecture uses Mistral's sliding-window attention at all.
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "MistralForCausalLM": {"rope_theta": 10_000.0, "norm_eps": 1e-6, "sliding_window": 4096, "moe": False},
    "MixtralForCausalLM": {"rope_theta": 1_000_000.0, "norm_eps": 1e-5, "sliding_window": None, "moe": True},
    # Llama is Mistral without the sliding window.
    "LlamaForCausalLM": {"rope_theta": 10_000.0, "norm_eps": 1e-6, "sliding_window": None, "moe": False},
}


@dataclass
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # A query at position i attends to keys j with i - sliding_window < j <= i; None: full causal.
    sliding_window: int | None = None
    tie_embeddings: bool = False
    moe: MoeArgs | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.moe.num_experts_per_tok}) must be in 1..num_local_experts "
                f"({self.moe.num_experts})"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from a HF config dict (MistralForCausalLM, MixtralForCausalLM or LlamaForCausalLM)."""
        architectures = cfg.get("architectures") or []
        arch = next((a for a in architectures if a in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {architectures!r}: expected one of {sorted(_ARCHITECTURES)}"
            )
        defaults = _ARCHITECTURES[arch]

        def size(key: str, default: int | None = None) -> int:
            """A positive integer setting; required where there is no default."""
            value = cfg.get(key)
            if value is None:
                if default is None:
                    raise ValueError(f"config.json of {arch} lacks {key!r}")
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json of {arch}: {key} must be a positive integer, got {value!r}")
            return value

        hidden_act = cfg.get("hidden_act") or "silu"
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}: only 'silu' (SwiGLU) is implemented")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"unsupported {flag}=true: projections without bias only")

        dim, n_heads = size("hidden_size"), size("num_attention_heads")
        moe = None
        if defaults["moe"]:
            moe = MoeArgs(
                num_experts=size("num_local_experts"), num_experts_per_tok=size("num_experts_per_tok")
            )
        sliding_window = None
        if arch != "LlamaForCausalLM":
            sliding_window = cfg.get("sliding_window", defaults["sliding_window"])
        return cls(
            vocab_size=size("vocab_size"),
            dim=dim,
            n_layers=size("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=size("num_key_value_heads", n_heads),
            head_dim=size("head_dim", dim // n_heads),
            hidden_dim=size("intermediate_size"),
            norm_eps=float(cfg.get("rms_norm_eps") or defaults["norm_eps"]),
            rope_theta=_rope_theta(cfg, defaults["rope_theta"]),
            max_position_embeddings=size("max_position_embeddings"),
            sliding_window=sliding_window,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            moe=moe,
        )


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    """RoPE base; transformers 5 writes ``rope_parameters``, older configs ``rope_theta``/``rope_scaling``."""
    # Same precedence as transformers: rope_scaling, then rope_parameters, then top-level keys.
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"unsupported RoPE scaling {rope_type!r}: only plain RoPE ('default') is implemented"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor {partial}: RoPE must cover the whole head")
    theta = params.get("rope_theta")
    if theta is None:
        theta = cfg.get("rope_theta")
    return float(default if theta is None else theta)
