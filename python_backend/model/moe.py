"""Sparse mixture-of-experts feed-forward (Mixtral)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .args import MoeArgs


class MoeLayer(nn.Module):
    def __init__(self, experts: Sequence[nn.Module], gate: nn.Module, args: MoeArgs):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, dim]: each token goes through its top-k experts, weighted by the renormalised
        router probabilities."""
        k = self.args.num_experts_per_tok
        # Router softmax in float32, then top-k renormalised to sum to one (as HF Mixtral).
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)

        # Group the (token, slot) pairs by expert so each expert runs once on all its tokens.
        chosen = chosen.flatten()
        order = torch.argsort(chosen, stable=True)
        tokens, weights = order // k, weights.flatten()[order]
        counts = torch.bincount(chosen, minlength=len(self.experts)).tolist()

        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                idx = tokens[start : start + count]
                y = expert(x.index_select(0, idx))
                out.index_add_(0, idx, (y * weights[start : start + count, None]).to(x.dtype))
                start += count
        return out
