"""Grouped-query attention with optional Mistral sliding window."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batch import BatchPlan, batched_attention
from .cache import KVCache
from .cpu_kernels import CpuKernels
from .packing import RepackedWeight, linear, pack_into
from .rope import apply_rotary


def key_start(start_pos: int, window: int | None) -> int:
    """First key position any query from ``start_pos`` on may see."""
    return 0 if window is None else max(0, start_pos - window + 1)


def attention_mask(
    start_pos: int, n_tokens: int, first_key: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [T, L] (True = attend) for queries at ``start_pos ..`` over keys at ``first_key ..``.

    Same rule as transformers' sliding-window causal mask: query i sees key j iff
    j <= i and (no window or j > i - window). None when every key is visible.
    """
    if n_tokens == 1:
        # One query at the last position: every key in [first_key, start_pos] is visible.
        return None
    q = torch.arange(start_pos, start_pos + n_tokens, device=device)[:, None]
    k = torch.arange(first_key, start_pos + n_tokens, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        # [wq; wk; wv] in one tensor once fuse() ran; the three weights are then views into it.
        self.wqkv: torch.Tensor | None = None
        self.packed: dict[str, RepackedWeight] = {}  # "wqkv", "wo": see pack()

    def fuse(self) -> None:
        """One matmul for q, k and v instead of three: the same dot products, fewer passes over x."""
        with torch.no_grad():
            fused = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        q, kv = self.wq.weight.shape[0], self.wk.weight.shape[0]
        self.wq.weight.data, self.wk.weight.data, self.wv.weight.data = fused[:q], fused[q : q + kv], fused[q + kv :]
        self.wqkv = fused

    def pack(self, repack: Callable[[torch.Tensor], RepackedWeight | None]) -> None:
        """Repacked copies (see Transformer.pack_weights) of the fused q/k/v weight and of wo, where
        ``repack`` makes one."""
        pack_into(self.packed, {"wqkv": self.wqkv, "wo": self.wo.weight}, repack)

    def _out(self, attended: torch.Tensor) -> torch.Tensor:
        return linear(attended, self.wo.weight, self.packed.get("wo"))

    def fused_weight_current(self) -> bool:
        """Whether the fused q/k/v weight serves: only while wq still points into it (not after a
        reload or a move)."""
        return self.wqkv is not None and self.wqkv.data_ptr() == self.wq.weight.data_ptr()

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n_tokens = x.shape[0]
        if self.fused_weight_current():
            qkv = linear(x, self.wqkv, self.packed.get("wqkv")).view(n_tokens, -1, self.head_dim)
            # q and k rotate together: one set of elementwise ops for both.
            qk = apply_rotary(qkv[:, : self.n_heads + self.n_kv_heads], cos, sin)
            return qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv_heads :]
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(n_tokens, self.n_heads, self.head_dim)
        k = k.view(n_tokens, self.n_kv_heads, self.head_dim)
        v = v.view(n_tokens, self.n_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: BatchPlan,
                      layer: int, kernels: CpuKernels | None = None) -> torch.Tensor:
        """``x`` [N, dim]: the step's tokens of every sequence in ``plan``, flattened."""
        n_tokens = x.shape[0]
        if kernels is not None:  # the model checked fused_weight_current()
            qkv = linear(x, self.wqkv, self.packed.get("wqkv"))
            kernels.rotary_(qkv, self.n_heads + self.n_kv_heads, self.head_dim, cos, sin)
            q, k, v = qkv.view(n_tokens, -1, self.head_dim).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 1)
            out = batched_attention(q, k, v, plan, layer, (kernels, qkv))
        else:
            out = batched_attention(*self._qkv(x, cos, sin), plan, layer)
        return self._out(out.reshape(n_tokens, self.n_heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        start_pos: int,
        first_key: int,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """``x`` [T, dim] at positions ``start_pos ..``; attends over cached keys from ``first_key`` on."""
        n_tokens = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)

        if cache is None:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            keys, values = cache.update(layer, start_pos, k, v, first_key)

        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )
        return self._out(out[0].transpose(0, 1).reshape(n_tokens, self.n_heads * self.head_dim))
