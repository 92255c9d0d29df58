"""Plain PyTorch MoE with mistral-inference's semantics, on TensorRT-LLM-layout weights: the oracle
of the kernel tests and the per-expert-loop baseline of the benchmark."""
import torch
import torch.nn.functional as F

from .routing import NormalizationMode, normalization_mode


def reference_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_fc: torch.Tensor,
    w_proj: torch.Tensor,
    top_k: int,
    *,
    normalization: NormalizationMode | int = NormalizationMode.RENORMALIZE,
    expert_start: int = 0,
) -> torch.Tensor:
    """mistral-inference's ``MoeLayer.forward``: top-k of the logits, softmax over the k in float32,
    weights cast to the activation dtype, then each local expert ``w2(silu(w1 x) * w3 x)`` on its
    tokens, accumulated in the activation dtype. Experts outside this rank's slice contribute zero."""
    logits = router_logits.float()
    if normalization_mode(normalization) == NormalizationMode.RENORMALIZE:
        weights, selected = torch.topk(logits, top_k, dim=-1)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32)
    else:
        weights, selected = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    weights = weights.to(x.dtype)
    inter = w_fc.shape[1] // 2
    out = torch.zeros_like(x)
    for local in range(w_fc.shape[0]):
        batch_idx, nth = torch.where(selected == expert_start + local)
        if batch_idx.numel() == 0:
            continue
        w3, w1, w2 = w_fc[local, :inter], w_fc[local, inter:], w_proj[local]
        xe = x[batch_idx]
        y = (F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T
        out[batch_idx] += weights[batch_idx, nth, None] * y
    return out
