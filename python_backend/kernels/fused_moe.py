"""Fused mixture-of-experts on TensorRT-LLM's checkpoint layout, in Triton.

Weights: ``w_fc`` [E_local, 2*inter, hidden] = per expert [w3 (up); w1 (gate)], ``w_proj``
[E_local, hidden, inter] = w2 (down), exactly as ``mlp.fc.weight`` / ``mlp.proj.weight`` are stored,
so nothing is re-laid out at run time. Pipeline: route -> align -> gate/up GEMM with SiLU(gate) * up
-> down GEMM scaled by the routing weight -> sum over the top-k.
"""
import functools

import torch
import triton
import triton.language as tl

from .align import align_by_expert
from .config import MoeKernelConfig, dtype_name, kernel_config
from .launch import check_launchable, is_compiled
from .routing import NormalizationMode, Routing, route


@triton.jit
def gate_up_kernel(
    x_ptr,
    w_ptr,
    sorted_ptr,
    block_experts_ptr,
    num_padded_ptr,
    n_assign,
    hidden,
    inter,
    out_ptr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[a, n] = SiLU(x[a // TOP_K] . gate[e, n]) * (x[a // TOP_K] . up[e, n]) for the assignments a
    of one M-block (one expert e) and one N-block of the intermediate dimension."""
    pid = tl.program_id(0)
    blocks_m = tl.load(num_padded_ptr) // BLOCK_M
    blocks_n = tl.cdiv(inter, BLOCK_N)
    # The grid covers the worst-case padding; blocks past the actual groups have nothing to do.
    if pid >= blocks_m * blocks_n:
        return
    # GROUP_M consecutive M-blocks (mostly one expert) sweep the N-blocks together: weight tiles are
    # re-read from L2 rather than from memory.
    width = GROUP_M * blocks_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    assign = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = assign < n_assign
    token = (assign // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * hidden + ks[None, :]
    # [BLOCK_K, BLOCK_N] tiles of up^T and gate^T: rows n and inter + n of the expert's fc matrix.
    up_ptrs = w_ptr + expert * (2 * inter) * hidden + cols[None, :] * hidden + ks[:, None]
    gate_ptrs = up_ptrs + inter * hidden
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(tl.cdiv(hidden, BLOCK_K)):
        k_ok = ks < hidden - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            up = up.to(tl.float32)
            gate = gate.to(tl.float32)
        acc_up = tl.dot(a, up, acc_up, input_precision=PRECISION)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K

    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    out_ptrs = out_ptr + assign.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    h_ptr,
    w_ptr,
    sorted_ptr,
    block_experts_ptr,
    num_padded_ptr,
    weights_ptr,
    n_assign,
    hidden,
    inter,
    out_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[a, n] = weight[a] * (h[a] . down[e, n]) for the assignments a of one M-block (one expert e)
    and one N-block of the hidden dimension."""
    pid = tl.program_id(0)
    blocks_m = tl.load(num_padded_ptr) // BLOCK_M
    blocks_n = tl.cdiv(hidden, BLOCK_N)
    if pid >= blocks_m * blocks_n:
        return
    width = GROUP_M * blocks_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    assign = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = assign < n_assign
    rows = assign.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + rows[:, None] * inter + ks[None, :]
    # [BLOCK_K, BLOCK_N] tile of down^T: the expert's proj matrix is [hidden, inter].
    w_ptrs = w_ptr + expert * hidden * inter + cols[None, :] * inter + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(tl.cdiv(inter, BLOCK_K)):
        k_ok = ks < inter - k * BLOCK_K
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    acc = acc * tl.load(weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * hidden + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_kernel(
    y_ptr,
    experts_ptr,
    hidden,
    expert_start,
    n_local,
    out_ptr,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over the token's TOP_K assignments routed to this rank's experts of y[t*TOP_K + j];
    assignments to other ranks' experts contribute zero (their rows of y were never written)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        # The expert id broadcast over the lanes: a vector mask, as the interpreter wants.
        local = tl.zeros([BLOCK_H], dtype=tl.int32) + tl.load(experts_ptr + token * TOP_K + j) - expert_start
        owned = (local >= 0) & (local < n_local)
        y = tl.load(y_ptr + (token * TOP_K + j) * hidden + cols, mask=col_ok & owned, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


COMBINE_BLOCK = 1024
COMBINE_WARPS = 4


def gemm_constants(config: MoeKernelConfig, dtype: torch.dtype | str, compiled: bool) -> dict[str, object]:
    """Compile-time arguments shared by ``gate_up_kernel`` and ``down_kernel``."""
    name = dtype_name(dtype)
    return {
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "GROUP_M": config.group_m,
        # Triton's interpreter multiplies bfloat16 as raw bits (it has no bf16 arithmetic); there the
        # tiles are widened to fp32 first, exact for products of bf16 values.
        "DOT_FP32": name == "bfloat16" and not compiled,
        # fp32 weights get fp32 products, not TF32's 10-bit mantissa; other dtypes ignore it.
        "PRECISION": "ieee" if name == "float32" else "tf32",
    }


def check_weights(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[int, int, int]:
    """(local experts, hidden, inter) of TensorRT-LLM-layout weights matching ``x`` [T, hidden]."""
    if x.dim() != 2:
        raise ValueError(f"hidden states must be [tokens, hidden], got {tuple(x.shape)}")
    if w_fc.dim() != 3 or w_proj.dim() != 3:
        raise ValueError(
            f"expected fc [E, 2*inter, hidden] and proj [E, hidden, inter], got {tuple(w_fc.shape)} and {tuple(w_proj.shape)}"
        )
    n_local, two_inter, hidden = w_fc.shape
    inter = two_inter // 2
    if two_inter % 2 or hidden != x.shape[1] or tuple(w_proj.shape) != (n_local, hidden, inter):
        raise ValueError(
            f"weights do not match hidden size {x.shape[1]}: fc {tuple(w_fc.shape)} must be "
            f"[E, 2*inter, {x.shape[1]}] and proj {tuple(w_proj.shape)} must be [E, {x.shape[1]}, inter]"
        )
    if not (x.dtype == w_fc.dtype == w_proj.dtype):
        raise ValueError(f"dtype mismatch: x {x.dtype}, fc {w_fc.dtype}, proj {w_proj.dtype}")
    dtype_name(x.dtype)
    if not (w_fc.is_contiguous() and w_proj.is_contiguous()):
        raise ValueError("expert weights must be contiguous (TensorRT-LLM's row-major layout)")
    return n_local, hidden, inter


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def fused_experts(
    x: torch.Tensor,
    routing: Routing,
    w_fc: torch.Tensor,
    w_proj: torch.Tensor,
    *,
    expert_start: int = 0,
    config: MoeKernelConfig | None = None,
) -> torch.Tensor:
    """Experts' output for ``x`` [T, hidden] routed by ``routing``, through this rank's experts
    ``expert_start .. expert_start + E_local`` (``w_fc``, ``w_proj`` in TensorRT-LLM's layout)."""
    n_local, hidden, inter = check_weights(x, w_fc, w_proj)
    n_tokens, top_k = routing.experts.shape
    if n_tokens != x.shape[0] or tuple(routing.weights.shape) != (n_tokens, top_k):
        raise ValueError(
            f"routing for {n_tokens} tokens ({tuple(routing.weights.shape)} weights) does not match {x.shape[0]} tokens"
        )
    device = check_launchable(gate_up_kernel, x, w_fc, w_proj, routing.weights, routing.experts)
    out = torch.empty_like(x)
    if n_tokens == 0:
        return out
    if config is None:
        device_name = _device_name(device.index) if device.type == "cuda" else None
        config = kernel_config(
            num_experts=n_local, inter=inter, hidden=hidden, dtype=x.dtype, tokens=n_tokens, device_name=device_name
        )
    x = x.contiguous()
    alignment = align_by_expert(
        routing.experts, config.block_m, num_local_experts=n_local, expert_start=expert_start
    )
    n_assign = n_tokens * top_k
    blocks_m = alignment.sorted_ids.numel() // config.block_m
    constants = gemm_constants(config, x.dtype, is_compiled(gate_up_kernel))
    launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}

    h = torch.empty(n_assign, inter, dtype=x.dtype, device=device)
    gate_up_kernel[(blocks_m * triton.cdiv(inter, config.block_n),)](
        x, w_fc, alignment.sorted_ids, alignment.block_experts, alignment.num_padded,
        n_assign, hidden, inter, h, TOP_K=top_k, **constants, **launch,
    )  # fmt: skip
    y = torch.empty(n_assign, hidden, dtype=x.dtype, device=device)
    down_kernel[(blocks_m * triton.cdiv(hidden, config.block_n),)](
        h, w_proj, alignment.sorted_ids, alignment.block_experts, alignment.num_padded,
        routing.weights.contiguous(), n_assign, hidden, inter, y, **constants, **launch,
    )  # fmt: skip
    combine_kernel[(n_tokens, triton.cdiv(hidden, COMBINE_BLOCK))](
        y, routing.experts.contiguous(), hidden, expert_start, n_local, out,
        TOP_K=top_k, BLOCK_H=COMBINE_BLOCK, num_warps=COMBINE_WARPS,
    )  # fmt: skip
    return out


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_fc: torch.Tensor,
    w_proj: torch.Tensor,
    top_k: int,
    *,
    normalization: NormalizationMode | int = NormalizationMode.RENORMALIZE,
    expert_start: int = 0,
    config: MoeKernelConfig | None = None,
) -> torch.Tensor:
    """The MoE layer's output for ``x`` [T, hidden]: ``router_logits`` [T, num_experts] over all
    experts, of which this rank holds ``w_fc``/``w_proj`` for ``expert_start ..``; tokens routed to
    other ranks' experts contribute zero here (the ranks' outputs are meant to be summed)."""
    if router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"router logits {tuple(router_logits.shape)} do not match {x.shape[0]} tokens")
    num_experts = router_logits.shape[1]
    if not 0 <= expert_start <= num_experts - w_fc.shape[0]:
        raise ValueError(
            f"experts {expert_start}..{expert_start + w_fc.shape[0] - 1} are not within the router's {num_experts}"
        )
    return fused_experts(
        x, route(router_logits, top_k, normalization), w_fc, w_proj, expert_start=expert_start, config=config
    )
