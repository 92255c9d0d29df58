"""In-flight batching: one forward pass over many sequences' new tokens.

Every running sequence owns a slot of a shared KV cache. A step's tokens are flattened into
one [N, dim] tensor so the linear layers (and the MoE experts) run once for all sequences;
attention is per kind of segment:
- decode tokens (one per sequence) attend together, in one call, over the slot range in use;
- prefill chunks attend one sequence at a time over that sequence's cache plus the chunk.

Slots hold `capacity` positions. With a sliding window the slot is a rolling buffer of the
window's size (position p lives at p % capacity), so memory is bounded by the window, not by
the sequence length. Keys are stored rotated, so their order in the buffer does not matter;
each entry's absolute position is kept for the masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .args import ModelArgs
from .cpu_kernels import CpuKernels


class SlotKVCache:
    """Keys and values of up to `n_slots` sequences: [n_layers, 2, n_slots, n_kv_heads, capacity, head_dim].

    The tensor is allocated empty: the operating system backs its pages only once they are
    written, so unused slots and positions cost address space, not memory.
    """

    def __init__(self, args: ModelArgs, n_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if n_slots < 1:
            raise ValueError(f"the KV cache needs at least one slot, got {n_slots}")
        self.window = args.sliding_window
        self.capacity = min(max_seq_len, self.window) if self.window else max_seq_len
        self.kv = torch.empty(args.n_layers, 2, n_slots, args.n_kv_heads, self.capacity, args.head_dim,
                              dtype=dtype, device=device)
        # Absolute position held by each entry; -1 = empty.
        self.positions = torch.full((n_slots, self.capacity), -1, dtype=torch.long, device=device)
        self.lengths = [0] * n_slots  # positions written so far, per slot
        # Entries [0, initialized) of a slot hold finite numbers. Attention multiplies masked-out
        # values by 0, and 0 * NaN from never-written memory would poison the output.
        self.initialized = [0] * n_slots
        self._free = list(range(n_slots))

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def used_entries(self) -> int:
        """Cache entries holding a live key (for the usage metric)."""
        return sum(min(length, self.capacity) for length in self.lengths)

    def allocate(self) -> int:
        """The lowest free slot: keeping used slots low keeps the decode range tight."""
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        self._free.sort()
        return self._free.pop(0)

    def ensure_initialized(self, slot_range: int, length: int) -> None:
        """Zero never-written entries [.., :length] of slots [0, slot_range) before attention reads them."""
        for slot in range(slot_range):
            start = max(self.initialized[slot], min(self.lengths[slot], self.capacity))
            if start < length:
                self.kv[:, :, slot, :, start:length].zero_()
                self.initialized[slot] = length

    def copy_slot(self, source: int, target: int) -> None:
        """Make ``target`` hold the same positions, keys and values as ``source`` (a forked sequence)."""
        written = min(self.lengths[source], self.capacity)
        self.kv[:, :, target, :, :written].copy_(self.kv[:, :, source, :, :written])
        self.positions[target].copy_(self.positions[source])
        self.lengths[target] = self.lengths[source]
        self.initialized[target] = max(self.initialized[target], written)

    def release(self, slot: int) -> None:
        self.positions[slot].fill_(-1)
        self.lengths[slot] = 0
        self._free.append(slot)


@dataclass
class Segment:
    """New tokens of one sequence in a step: `n_tokens` from position `start_pos` in `slot`."""

    slot: int
    start_pos: int
    n_tokens: int


# Prompt tokens at positions past this go through SDPA, not the kernels' attention: that attends
# token by token, quadratic in the prompt, where SDPA multiplies matrices. In bf16 on an AVX512F
# Xeon a 2000-token prompt prefilled in 7.2 s all through the kernels, 2.9 s with this at 256
# (float32: 3.0 s); 40-token prompts were unchanged, 500-token ones 0.74 -> 0.57 s.
KERNEL_PROMPT_POSITIONS = 256


class BatchPlan:
    """Where each segment's tokens sit in the flattened batch, and the attention masks of the step.

    Built once per step (the masks are the same for every layer) before any key is written.
    """

    def __init__(self, segments: list[Segment], cache: SlotKVCache, device: torch.device,
                 kernel_attention: bool = False):
        """``kernel_attention``: the CPU kernels attend the decode tokens, and the prompt tokens whose
        cache entries are fresh (the slot's buffer has not wrapped: no token overwrites an entry
        another one sees), all in one call: ``kernel_rows`` / ``kernel_slots`` / ``kernel_query_pos``.
        Otherwise the plan holds what the torch decode attention needs (flat KV rows, the score
        bias, zeroed never-written entries) and every prompt chunk goes through SDPA."""
        self.segments = segments
        self.cache = cache
        window = cache.window
        capacity = cache.capacity
        offsets, total = [], 0
        for seg in segments:
            offsets.append(total)
            total += seg.n_tokens
        self.n_tokens = total
        self.offsets = offsets
        positions = [torch.arange(s.start_pos, s.start_pos + s.n_tokens) for s in segments]
        self.token_positions = torch.cat(positions).to(device)
        # Rows of the last token of every segment: their logits are the step's output.
        self.last_rows = torch.tensor([o + s.n_tokens - 1 for o, s in zip(offsets, segments)], device=device)

        decode = [i for i, s in enumerate(segments) if s.n_tokens == 1 and s.start_pos > 0]
        self.decode = decode
        kernel_tokens: list[tuple[int, int, int]] = []  # (row, slot, position)
        if decode:
            # Advanced indexing (x[idx], x[idx] = y) goes through TensorIterator and its thread pool:
            # with every core busy, each such op waits for a scheduler slice (~ms). index_select and
            # index_copy_ on flattened views do the same work serially, so all of them are used here.
            slots = [segments[i].slot for i in decode]
            query_pos = torch.tensor([segments[i].start_pos for i in decode], device=device)
            self.decode_slots = torch.tensor(slots, device=device)
            self.decode_query_pos = query_pos
            write_index = query_pos % capacity
            # Record the new positions first: each decode query also attends to its own key.
            cache.positions.view(-1).index_copy_(0, self.decode_slots * capacity + write_index, query_pos)
            if kernel_attention:
                kernel_tokens += [(offsets[i], segments[i].slot, segments[i].start_pos) for i in decode]
            else:
                self._plan_torch_decode(decode, [offsets[i] for i in decode], slots, write_index)
            for i in decode:
                cache.lengths[segments[i].slot] = segments[i].start_pos + 1

        self.prefill = []  # (segment index, cached length, mask [T, cached + T], write slice)
        for i, seg in enumerate(segments):
            if i in decode:
                continue
            if seg.start_pos != cache.lengths[seg.slot]:
                raise ValueError(
                    f"slot {seg.slot} holds {cache.lengths[seg.slot]} positions; cannot continue at {seg.start_pos}"
                )
            end = seg.start_pos + seg.n_tokens
            if kernel_attention and end <= min(capacity, KERNEL_PROMPT_POSITIONS):  # fresh: position p in entry p
                cache.positions[seg.slot, seg.start_pos : end] = torch.arange(seg.start_pos, end, device=device)
                kernel_tokens += [(offsets[i] + j, seg.slot, seg.start_pos + j) for j in range(seg.n_tokens)]
                cache.lengths[seg.slot] = end
                continue
            cached = min(seg.start_pos, capacity)
            key_pos = torch.cat([cache.positions[seg.slot, :cached],
                                 torch.arange(seg.start_pos, seg.start_pos + seg.n_tokens, device=device)])
            q = torch.arange(seg.start_pos, seg.start_pos + seg.n_tokens, device=device)[:, None]
            mask = (key_pos[None, :] >= 0) & (key_pos[None, :] <= q)
            if window:
                mask &= key_pos[None, :] > q - window
            # Only the last `capacity` new keys survive in a rolling buffer.
            keep = min(seg.n_tokens, capacity)
            kept_pos = torch.arange(seg.start_pos + seg.n_tokens - keep, seg.start_pos + seg.n_tokens, device=device)
            self.prefill.append((i, cached, mask, seg.n_tokens - keep, kept_pos % capacity))
            cache.positions[seg.slot].index_copy_(0, kept_pos % capacity, kept_pos)
            cache.lengths[seg.slot] = seg.start_pos + seg.n_tokens
        self.kernel_rows = self.kernel_slots = self.kernel_query_pos = None
        # Every token goes through the kernels' attention (none through SDPA).
        self.all_kernel_tokens = len(kernel_tokens) == total > 0
        if kernel_tokens:
            rows, slots, query_pos = zip(*kernel_tokens)
            self.kernel_rows = torch.tensor(rows, device=device)
            self.kernel_slots = torch.tensor(slots, device=device)
            self.kernel_query_pos = torch.tensor(query_pos, device=device)

    def _plan_torch_decode(self, decode: list[int], rows: list[int], slots: list[int],
                           write_index: torch.Tensor) -> None:
        cache, capacity, device = self.cache, self.cache.capacity, self.decode_slots.device
        query_pos = self.decode_query_pos
        self.decode_rows = torch.tensor(rows, device=device)
        self.slot_range = max(slots) + 1
        self.decode_len = min(capacity, int(query_pos.max()) + 1)
        # Rows of a layer's key (or value) cache viewed as [n_slots * n_kv_heads * capacity, head_dim]
        # where each decode token's heads go: (slot, head, write_index) -> one flat row each.
        n_kv = cache.kv.shape[3]
        heads = torch.arange(n_kv, device=device)
        self.decode_kv_rows = ((self.decode_slots[:, None] * n_kv + heads) * capacity + write_index[:, None]).reshape(-1)
        keys = cache.positions[: self.slot_range, : self.decode_len]
        q = torch.zeros(self.slot_range, dtype=torch.long, device=device)
        q.index_copy_(0, self.decode_slots, query_pos)
        mask = (keys >= 0) & (keys <= q[:, None])
        if cache.window:
            mask &= keys > q[:, None] - cache.window
        # Slots without a decode token this step get a harmless query; their output is dropped.
        idle = torch.ones(self.slot_range, dtype=torch.bool, device=device)
        idle.index_fill_(0, self.decode_slots, False)
        mask[:, 0] |= idle
        # Added to the scores: 0 where a key is seen, -inf where it is not (one tensor per step).
        bias = torch.zeros(mask.shape, dtype=cache.kv.dtype, device=device)
        self.decode_bias = bias.masked_fill_(~mask, float("-inf"))[:, None, None, :]
        # In steady state the decode tokens are the batch's first segments (so rows 0..n-1), in slots
        # 0..n-1: attention then reads and writes them in place, without gathering and scattering.
        first_n = list(range(len(decode)))
        self.decode_in_place = decode == first_n and slots == first_n
        cache.ensure_initialized(self.slot_range, self.decode_len)


def decode_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One query per slot: queries [S, H, D] against keys, values [S, KV, L, D], plus ``bias`` [S, 1, 1, L]
    (0 where a key is seen, -inf where not). Two batched matmuls over the slots' KV-head groups,
    softmax in float32 (as HF's eager attention). For a single query row, CPU SDPA is no faster in
    float32 and about 6x slower in bfloat16 (measured at 16 slots, 9/3 heads, 170 keys)."""
    n_slots, n_heads, head_dim = queries.shape
    grouped = (queries * head_dim**-0.5).view(n_slots, keys.shape[1], n_heads // keys.shape[1], head_dim)
    if keys.dtype != torch.float32:
        # Reduced-precision batched matmuls copy strided operands anyway, and a transposed one
        # slowly: copying the slot range's rows first costs about half (float32 reads them in place).
        keys, values = keys.contiguous(), values.contiguous()
    scores = torch.matmul(grouped, keys.transpose(-1, -2))  # [S, KV, G, L]
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(probs, values).view(n_slots, n_heads, head_dim)


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BatchPlan, layer: int,
                      fused: tuple[CpuKernels, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention output [N, n_heads, head_dim] for rotated q [N, H, D], k and v [N, KV, D]; writes k, v.

    ``fused``: the CPU kernels and the [N, (H + 2 KV) * D] rows q, k and v are views of, for a plan
    built with ``kernel_attention``: its kernel tokens (decode tokens, prompt tokens in fresh entries)
    then go through the kernels' attention, the other prompt chunks through SDPA."""
    cache = plan.cache
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if plan.kernel_rows is not None:
        if fused is None:
            raise RuntimeError("this step's plan was built for the CPU kernels' attention")
        kernels, qkv = fused
        kernels.decode_attention(qkv, q.shape[1], k.shape[1], q.shape[2], plan.kernel_rows, cache.kv[layer, 0],
                                 cache.kv[layer, 1], cache.positions, plan.kernel_slots, plan.kernel_query_pos,
                                 cache.window, out)
    elif plan.decode:
        rows, slots, n_decode = plan.decode_rows, plan.decode_slots, len(plan.decode)
        head_dim = k.shape[-1]
        for kind, new in ((0, k), (1, v)):
            new_rows = new[:n_decode] if plan.decode_in_place else new.index_select(0, rows)
            cache.kv[layer, kind].view(-1, head_dim).index_copy_(0, plan.decode_kv_rows, new_rows.reshape(-1, head_dim))
        keys = cache.kv[layer, 0, : plan.slot_range, :, : plan.decode_len]
        values = cache.kv[layer, 1, : plan.slot_range, :, : plan.decode_len]
        if plan.decode_in_place:
            attended = decode_attention(q[:n_decode], keys, values, plan.decode_bias)
            if not plan.prefill:
                return attended  # the decode tokens are the whole batch
            out[:n_decode] = attended
        else:
            queries = q.new_zeros(plan.slot_range, q.shape[1], q.shape[2])
            queries.index_copy_(0, slots, q.index_select(0, rows))
            attended = decode_attention(queries, keys, values, plan.decode_bias)
            out.index_copy_(0, rows, attended.index_select(0, slots))
    for index, cached, mask, first_kept, write_index in plan.prefill:
        seg, start = plan.segments[index], plan.offsets[index]
        rows = slice(start, start + seg.n_tokens)
        new_k, new_v = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [KV, T, D]
        keys = torch.cat([cache.kv[layer, 0, seg.slot, :, :cached], new_k], dim=1)
        values = torch.cat([cache.kv[layer, 1, seg.slot, :, :cached], new_v], dim=1)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )
        out[rows] = attended[0].transpose(0, 1)
        cache.kv[layer, 0, seg.slot].index_copy_(1, write_index, new_k[:, first_kept:])
        cache.kv[layer, 1, seg.slot].index_copy_(1, write_index, new_v[:, first_kept:])
    return out
