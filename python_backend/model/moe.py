"""Sparse mixture-of-experts feed-forward (Mixtral)."""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .args import MoeArgs

if TYPE_CHECKING:
    from .cpu_kernels import CpuKernels


class MoeLayer(nn.Module):
    # On CUDA tensors, run plateforme's fused Triton kernel when the `triton` package is installed.
    use_fused_kernel = True

    def __init__(self, experts: Sequence[nn.Module], gate: nn.Module, args: MoeArgs):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.args = args
        self._fused_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, kernels: CpuKernels | None = None) -> torch.Tensor:
        """``x`` [T, dim]: each token goes through its top-k experts, weighted by the renormalised
        router probabilities. ``kernels``: the CPU kernels, for the experts' SwiGLU."""
        if x.is_cuda and self.use_fused_kernel and _fused_moe_available():
            return self._fused_forward(x)
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
                y = expert(x.index_select(0, idx), kernels)
                out.index_add_(0, idx, (y * weights[start : start + count, None]).to(x.dtype))
                start += count
        return out

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import fused_moe

        w_fc, w_proj = self._fused_layout()
        # Same router as the loop above: logits in the activation dtype, softmax in float32.
        return fused_moe(x, self.gate(x), w_fc, w_proj, self.args.num_experts_per_tok)

    def _fused_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' weights as TensorRT-LLM's fc [E, 2*inter, dim] = [w3; w1] and proj [E, dim, inter] = w2.

        Built once; the experts' own weights then become views into them, so the model holds one copy.
        Rebuilt if the weights were replaced since (a new load, a move to another device)."""
        first = self.experts[0]
        if self._fused_weights is not None and first.w3.weight.data_ptr() == self._fused_weights[0].data_ptr():
            return self._fused_weights
        with torch.no_grad():
            w_fc = torch.stack([torch.cat([e.w3.weight, e.w1.weight]) for e in self.experts])
            w_proj = torch.stack([e.w2.weight for e in self.experts])
        inter = w_fc.shape[1] // 2
        for i, e in enumerate(self.experts):
            e.w3.weight.data, e.w1.weight.data, e.w2.weight.data = w_fc[i, :inter], w_fc[i, inter:], w_proj[i]
        self._fused_weights = (w_fc, w_proj)
        return self._fused_weights


@functools.cache
def _fused_moe_available() -> bool:
    return importlib.util.find_spec("triton") is not None
