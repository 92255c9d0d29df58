"""Router: softmax over the expert logits in float32, top-k, optional renormalisation (Mixtral)."""
from dataclasses import dataclass
from enum import IntEnum

import torch
import triton
import triton.language as tl

from .launch import check_launchable


class NormalizationMode(IntEnum):
    """How the top-k probabilities become weights; values are TensorRT-LLM's
    ``MoeConfig.ExpertScaleNormalizationMode`` (its SPARSE_MIXER mode is not implemented)."""

    NONE = 0  # the softmax probabilities of the chosen experts, as they are
    RENORMALIZE = 1  # rescaled to sum to one (Mixtral)


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, top_k] float32
    experts: torch.Tensor  # [T, top_k] int32, global expert ids, best first


def normalization_mode(value: int) -> NormalizationMode:
    try:
        return NormalizationMode(int(value))
    except ValueError:
        modes = ", ".join(f"{m.value} ({m.name})" for m in NormalizationMode)
        raise ValueError(f"unsupported MoE normalization mode {value}: expected one of {modes}") from None


@triton.jit
def route_kernel(
    logits_ptr,
    n_tokens,
    n_experts,
    weights_ptr,
    experts_ptr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    """BLOCK_T tokens per program: logits [T, n_experts] (any float dtype) -> weights, experts [T, TOP_K]."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tokens.to(tl.int64)[:, None]
    lanes = tl.arange(0, E_PAD)[None, :]
    valid = (tokens < n_tokens)[:, None] & (lanes < n_experts)
    logits = tl.load(logits_ptr + rows * n_experts + lanes, mask=valid, other=float("-inf")).to(tl.float32)
    # Rows past the last token are all -inf; keep them finite so that nothing below turns NaN.
    peak = tl.maximum(tl.max(logits, axis=1), -3.0e38)
    probs = tl.exp(logits - peak[:, None])
    probs = probs / tl.maximum(tl.sum(probs, axis=1), 1e-30)[:, None]
    # Padding lanes (and experts already taken) sit below every probability.
    probs = tl.where(lanes < n_experts, probs, -1.0)
    slots = tl.arange(0, K_PAD)[None, :]
    chosen_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    chosen_e = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)[:, None]
        # Lowest index among equal probabilities, so that the choice is deterministic.
        index = tl.min(tl.where(probs == best, lanes, E_PAD), axis=1)[:, None]
        chosen_w = tl.where(slots == j, best, chosen_w)
        chosen_e = tl.where(slots == j, index, chosen_e)
        probs = tl.where(lanes == index, -1.0, probs)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.maximum(tl.sum(chosen_w, axis=1), 1e-30)[:, None]
    out = rows * TOP_K + slots
    store = (tokens < n_tokens)[:, None] & (slots < TOP_K)
    tl.store(weights_ptr + out, chosen_w, mask=store)
    tl.store(experts_ptr + out, chosen_e, mask=store)


def route(
    logits: torch.Tensor, top_k: int, mode: NormalizationMode | int = NormalizationMode.RENORMALIZE
) -> Routing:
    """Route each token of ``logits`` [T, num_experts] to its ``top_k`` experts."""
    mode = normalization_mode(mode)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"router logits must be a float [tokens, experts] tensor, got {tuple(logits.shape)} {logits.dtype}")
    n_tokens, n_experts = logits.shape
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k ({top_k}) must be in 1..num_experts ({n_experts})")
    check_launchable(route_kernel, logits)
    logits = logits.contiguous()
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(n_tokens, top_k, dtype=torch.int32, device=logits.device)
    if n_tokens:
        constants = route_constants(n_experts, top_k, mode)
        route_kernel[(triton.cdiv(n_tokens, constants["BLOCK_T"]),)](
            logits, n_tokens, n_experts, weights, experts, **constants, num_warps=ROUTE_WARPS
        )
    return Routing(weights, experts)


ROUTE_WARPS = 4


def route_constants(n_experts: int, top_k: int, mode: NormalizationMode) -> dict[str, int | bool]:
    """Compile-time arguments of ``route_kernel``."""
    e_pad = triton.next_power_of_2(max(n_experts, 2))
    return {
        "TOP_K": top_k,
        "K_PAD": triton.next_power_of_2(top_k),
        "E_PAD": e_pad,
        "BLOCK_T": max(1, 2048 // e_pad),  # tiles of about 2048 logits
        "RENORMALIZE": mode == NormalizationMode.RENORMALIZE,
    }
