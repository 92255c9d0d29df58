"""Key/value cache of one sequence."""
from __future__ import annotations

import torch

from .args import ModelArgs


class KVCache:
    """Keys and values of every layer for positions ``0 .. max_len - 1`` of one sequence.

    Preallocated as [n_layers, 2, n_kv_heads, max_len, head_dim] and filled at positions, so
    that attention reads a plain slice. It keeps every position, also beyond a sliding window.
    """

    def __init__(self, args: ModelArgs, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if max_len <= 0:
            raise ValueError(f"KV cache length must be positive, got {max_len}")
        self.max_len = max_len
        self.kv = torch.empty(
            args.n_layers, 2, args.n_kv_heads, max_len, args.head_dim, dtype=dtype, device=device
        )
        # Positions 0 .. length - 1 hold valid entries.
        self.length = 0

    def check_write(self, start_pos: int, n_tokens: int) -> None:
        """Raise unless ``n_tokens`` positions can be written from ``start_pos`` on."""
        if start_pos > self.length:
            raise ValueError(f"cache holds {self.length} positions: cannot continue at position {start_pos}")
        if start_pos + n_tokens > self.max_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + n_tokens - 1} exceed "
                f"the cache's {self.max_len} positions"
            )

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor, key_start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [T, n_kv_heads, head_dim] at ``start_pos``; return the keys and values
        [n_kv_heads, L, head_dim] of positions ``key_start .. start_pos + T - 1``."""
        end = start_pos + k.shape[0]
        self.kv[layer, 0, :, start_pos:end] = k.transpose(0, 1)
        self.kv[layer, 1, :, start_pos:end] = v.transpose(0, 1)
        self.length = end
        return self.kv[layer, 0, :, key_start:end], self.kv[layer, 1, :, key_start:end]
