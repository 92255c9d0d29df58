"""Batched forward over the slot KV cache equals each sequence's own forward pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plateforme.python_backend.model import Segment, load_model
from plateforme.python_backend.model.batch import BatchPlan, decode_attention


@pytest.fixture(scope="module", params=["tiny_mistral_dir", "tiny_mixtral_dir"])
def model(request):
    return load_model(request.getfixturevalue(request.param), dtype=torch.float32)


def last_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor(ids))[-1]


def test_mixed_prefill_chunks_and_decodes_match_single_sequences(model):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=generator).tolist() for n in (40, 7, 23, 1)]
    cache = model.new_slot_cache(6, 256)
    # Reused memory may hold anything, NaN included: never-written entries must not leak into attention.
    cache.kv.fill_(float("nan"))
    slots = [cache.allocate() for _ in prompts]
    sequences = [list(p) for p in prompts]
    with torch.inference_mode():
        # Step 1: the first 25 tokens of the long prompt, the other prompts whole.
        segments = [Segment(slots[0], 0, 25)] + [Segment(slots[i], 0, len(prompts[i])) for i in (1, 2, 3)]
        tokens = prompts[0][:25] + prompts[1] + prompts[2] + prompts[3]
        out = model.forward_batch(torch.tensor(tokens), segments, cache)
        expected = [last_logits(model, prompts[0][:25])] + [last_logits(model, prompts[i]) for i in (1, 2, 3)]
        torch.testing.assert_close(out, torch.stack(expected), atol=1e-5, rtol=0)
        # Then: the rest of the long prompt beside decode steps, and 30 decode steps for all.
        for step in range(31):
            if step == 0:
                segments = [Segment(slots[0], 25, 15)]
                tokens = prompts[0][25:]
                decoding = (1, 2, 3)
            else:
                segments, tokens, decoding = [], [], (0, 1, 2, 3)
            for i in decoding:
                token = int(out[i].argmax())
                segments.append(Segment(slots[i], len(sequences[i]), 1))
                sequences[i].append(token)
                tokens.append(token)
            out = model.forward_batch(torch.tensor(tokens), segments, cache)
        expected = torch.stack([last_logits(model, s) for s in sequences])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert len(sequences[0]) > 2 * (model.args.sliding_window or 0)  # well past a rolling window


def test_sliding_window_cache_is_bounded_by_the_window(tiny_mistral_dir):
    model = load_model(tiny_mistral_dir, dtype=torch.float32)
    cache = model.new_slot_cache(2, 256)
    assert cache.capacity == model.args.sliding_window == 16
    assert cache.kv.shape[-2] == 16


def test_kernel_plan_takes_prompt_tokens_only_where_their_entries_are_fresh(tiny_mistral_dir):
    model = load_model(tiny_mistral_dir, dtype=torch.float32)
    cache = model.new_slot_cache(3, 64)  # window 16: a rolling buffer of 16 entries
    slots = [cache.allocate() for _ in range(3)]
    segments = [Segment(slots[0], 0, 7), Segment(slots[1], 0, 30), Segment(slots[2], 0, 10)]
    plan = BatchPlan(segments, cache, torch.device("cpu"), kernel_attention=True)
    # 7 and 10 tokens fit the buffer; 30 wrap it and go through SDPA.
    assert plan.kernel_rows.tolist() == [*range(7), *range(37, 47)]
    assert plan.kernel_query_pos.tolist() == [*range(7), *range(10)]
    assert [index for index, *_ in plan.prefill] == [1]
    assert cache.positions[slots[2], :10].tolist() == list(range(10))
    # Next step: a decode, and a chunk that would wrap the buffer (10 + 8 > 16).
    plan = BatchPlan([Segment(slots[0], 7, 1), Segment(slots[2], 10, 8)], cache, torch.device("cpu"),
                     kernel_attention=True)
    assert plan.kernel_rows.tolist() == [0] and plan.kernel_query_pos.tolist() == [7]
    assert [index for index, *_ in plan.prefill] == [1]


def test_kernel_plan_leaves_prompt_tokens_past_its_limit_to_sdpa(tiny_mixtral_dir):
    """The kernels' attention goes token by token: prompt tokens past KERNEL_PROMPT_POSITIONS (256) go
    through SDPA, which multiplies matrices (decode tokens stay on the kernels)."""
    model = load_model(tiny_mixtral_dir, dtype=torch.float32)  # no sliding window
    cache = model.new_slot_cache(2, 1024)
    slots = [cache.allocate() for _ in range(2)]
    plan = BatchPlan([Segment(slots[0], 0, 200), Segment(slots[1], 0, 300)], cache, torch.device("cpu"),
                     kernel_attention=True)
    assert plan.kernel_rows.tolist() == list(range(200))
    assert [index for index, *_ in plan.prefill] == [1]
    # The first prompt's next chunk ends past the limit; the second one decodes.
    plan = BatchPlan([Segment(slots[0], 200, 60), Segment(slots[1], 300, 1)], cache, torch.device("cpu"),
                     kernel_attention=True)
    assert plan.kernel_rows.tolist() == [60] and plan.kernel_query_pos.tolist() == [300]
    assert [index for index, *_ in plan.prefill] == [0]


def test_released_slot_is_reused_cleanly(model):
    cache = model.new_slot_cache(1, 64)
    with torch.inference_mode():
        slot = cache.allocate()
        model.forward_batch(torch.tensor([5, 6, 7, 8, 9]), [Segment(slot, 0, 5)], cache)
        cache.release(slot)
        slot = cache.allocate()
        out = model.forward_batch(torch.tensor([11, 12, 13]), [Segment(slot, 0, 3)], cache)
    torch.testing.assert_close(out[0], last_logits(model, [11, 12, 13]), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="no free"):
        cache.allocate()


def test_decode_tokens_after_a_one_token_prompt_attend_as_alone(model):
    """Decode tokens in slots 0..n-1 that are not the batch's first rows (a one-token prompt comes
    first) are gathered and scattered, not read in place."""
    prompts = [[5, 6, 7], [8, 9]]
    cache = model.new_slot_cache(3, 64)
    slots = [cache.allocate() for _ in range(3)]
    with torch.inference_mode():
        model.forward_batch(torch.tensor(prompts[0] + prompts[1]), [Segment(slots[0], 0, 3), Segment(slots[1], 0, 2)],
                            cache)
        segments = [Segment(slots[2], 0, 1), Segment(slots[0], 3, 1), Segment(slots[1], 2, 1)]
        out = model.forward_batch(torch.tensor([11, 12, 13]), segments, cache)
        expected = torch.stack([last_logits(model, [11]), last_logits(model, prompts[0] + [12]),
                                last_logits(model, prompts[1] + [13])])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_gap_in_positions_is_refused(model):
    cache = model.new_slot_cache(1, 64)
    slot = cache.allocate()
    with pytest.raises(ValueError, match="cannot continue"):
        model.forward_batch(torch.tensor([1, 2]), [Segment(slot, 3, 2)], cache)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_decode_attention_matches_sdpa(dtype, tolerance):
    """One query per slot, grouped-query heads, a key mask per slot (lengths, a window, one key)."""
    g = torch.Generator().manual_seed(3)
    slots, heads, kv_heads, head_dim, n_keys = 5, 6, 2, 16, 30
    q = torch.randn(slots, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(slots, kv_heads, n_keys, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(n_keys)[None, :] < torch.tensor([30, 1, 17, 9, 30])[:, None]
    mask[4, :20] = False  # a sliding window of the last 10 keys
    mask = mask[:, None, None, :]
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    out = decode_attention(q, k, v, bias)
    ref = F.scaled_dot_product_attention(
        q.double()[:, :, None], k.double(), v.double(), attn_mask=mask, enable_gqa=True
    )[:, :, 0]
    assert out.dtype == dtype and out.shape == q.shape
    assert float((out.double() - ref).norm() / ref.norm()) < tolerance
    # Slot 1 sees its first key alone: its output is that key's value, for each query head's group.
    torch.testing.assert_close(out[1].double(), v[1, :, 0].double().repeat_interleave(3, dim=0), atol=1e-6, rtol=0)
