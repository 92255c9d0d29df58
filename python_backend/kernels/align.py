"""Dispatch without per-token loops: token->expert assignments sorted by expert, each expert's group
padded to the GEMM's block height, so that every M-block of the grouped GEMMs has a single expert."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .launch import check_launchable


@dataclass(frozen=True)
class DimOps:
    """Integer operations on dimensions: plain ints here, TensorRT's symbolic shapes in the plugin."""

    cdiv: Callable[[Any, Any], Any]
    min: Callable[[Any, Any], Any]


INT_DIMS = DimOps(cdiv=lambda a, b: -(-a // b), min=min)


def padded_capacity(n_assign: Any, n_local: int, block_m: int, dims: DimOps = INT_DIMS) -> Any:
    """Length of ``sorted_ids`` for ``n_assign`` assignments: each non-empty expert adds fewer than
    ``block_m`` padding rows, and at most ``min(n_assign, n_local)`` experts are non-empty."""
    return dims.cdiv(n_assign + dims.min(n_assign, n_local) * (block_m - 1), block_m) * block_m


@dataclass(frozen=True)
class Alignment:
    """Assignment ``a = token * top_k + slot`` of the routing, grouped by expert.

    ``sorted_ids[:num_padded]`` lists each local expert's assignments in increasing order, the group
    padded to a multiple of ``block_m`` with ``n_assign`` (one past the last assignment); the rest of
    ``sorted_ids`` holds padding too. ``block_experts[b]`` is the local expert of rows
    ``b*block_m .. (b+1)*block_m``, -1 past ``num_padded``. Assignments to experts outside this rank's
    slice appear nowhere.
    """

    sorted_ids: torch.Tensor  # [capacity] int32
    block_experts: torch.Tensor  # [capacity // block_m] int32
    num_padded: torch.Tensor  # [1] int32, on the device: the GEMMs read it, the host never waits for it
    block_m: int


@triton.jit
def align_kernel(
    experts_ptr,
    n_assign,
    expert_start,
    n_local,
    capacity,
    sorted_ptr,
    block_experts_ptr,
    num_padded_ptr,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """A single program: histogram, padded offsets, block owners, then a stable scatter."""
    local = tl.arange(0, E_PAD)
    lanes = tl.arange(0, CHUNK)
    is_local = local < n_local

    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, n_assign, CHUNK):
        idx = start + lanes
        expert = tl.load(experts_ptr + idx, mask=idx < n_assign, other=-1) - expert_start
        hit = (expert[:, None] == local[None, :]) & (idx < n_assign)[:, None] & is_local[None, :]
        counts += tl.sum(hit.to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)

    for start in range(0, capacity, CHUNK):
        idx = start + lanes
        tl.store(sorted_ptr + idx, tl.zeros([CHUNK], dtype=tl.int32) + n_assign, mask=idx < capacity)
    n_blocks = capacity // BLOCK_M
    for start in range(0, n_blocks, CHUNK):
        block = start + lanes
        row = block * BLOCK_M
        # The owner of a block is the number of expert groups that end at or before its first row.
        owner = tl.sum(((ends[None, :] <= row[:, None]) & is_local[None, :]).to(tl.int32), axis=1)
        owner = tl.where(row < total, owner, -1)
        tl.store(block_experts_ptr + block, owner, mask=block < n_blocks)
    # The scatter below overwrites padding written above, possibly by other threads.
    tl.debug_barrier()

    cursor = ends - padded
    for start in range(0, n_assign, CHUNK):
        idx = start + lanes
        expert = tl.load(experts_ptr + idx, mask=idx < n_assign, other=-1) - expert_start
        hit = ((expert[:, None] == local[None, :]) & (idx < n_assign)[:, None] & is_local[None, :]).to(tl.int32)
        # Earlier assignments of the same expert in this chunk come first: a stable sort.
        earlier = tl.cumsum(hit, axis=0) - hit
        slot = tl.sum(hit * (cursor[None, :] + earlier), axis=1)
        tl.store(sorted_ptr + slot, idx, mask=tl.sum(hit, axis=1) > 0)
        cursor += tl.sum(hit, axis=0)


# A single program handles every assignment.
ALIGN_WARPS = 4


def align_constants(n_local: int, block_m: int) -> dict[str, int]:
    """Compile-time arguments of ``align_kernel``."""
    e_pad = triton.next_power_of_2(max(n_local, 2))
    # Chunks of [CHUNK, E_PAD] one-hot tiles: about 4096 elements, whatever the number of experts.
    return {"BLOCK_M": block_m, "E_PAD": e_pad, "CHUNK": max(16, min(256, 4096 // e_pad))}


def align_by_expert(
    experts: torch.Tensor, block_m: int, *, num_local_experts: int, expert_start: int = 0
) -> Alignment:
    """Group the assignments of ``experts`` [T, top_k] (global ids) by local expert: this rank owns
    experts ``expert_start .. expert_start + num_local_experts`` and ignores the others."""
    if experts.dim() != 2 or experts.dtype != torch.int32:
        raise ValueError(f"experts must be an int32 [tokens, top_k] tensor, got {tuple(experts.shape)} {experts.dtype}")
    if block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if num_local_experts <= 0 or expert_start < 0:
        raise ValueError(
            f"invalid expert slice: start {expert_start}, {num_local_experts} local experts"
        )
    device = check_launchable(align_kernel, experts)
    n_assign = experts.numel()
    capacity = padded_capacity(n_assign, num_local_experts, block_m)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    block_experts = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    if n_assign:
        align_kernel[(1,)](
            experts.contiguous(),
            n_assign,
            expert_start,
            num_local_experts,
            capacity,
            sorted_ids,
            block_experts,
            num_padded,
            **align_constants(num_local_experts, block_m),
            num_warps=ALIGN_WARPS,
        )
    return Alignment(sorted_ids, block_experts, num_padded, block_m)
