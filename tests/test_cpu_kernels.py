"""The fused bfloat16 CPU kernels against the torch ops they replace, alone and inside the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plateforme.python_backend.engine import resolve_dtype
from plateforme.python_backend.model import Segment, cpu_kernels, load_model, transformer
from plateforme.python_backend.model.batch import decode_attention
from plateforme.python_backend.model.rope import apply_rotary, rope_cos_sin
from plateforme.python_backend.model.transformer import RMSNorm

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def kernels():
    loaded = cpu_kernels.load()
    if loaded is None:
        pytest.skip("the CPU kernels did not compile here (no C compiler)")
    return loaded


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def assert_within_one_bf16_step(actual, expected):
    """Equal, or one bf16 rounding step apart where float32 sums ran in another order."""
    step = expected.float().abs().clamp(min=1e-30) * 2**-7
    assert ((actual.float() - expected.float()).abs() <= step).all()
    assert (actual == expected).float().mean() > 0.98


def test_rms_norm_and_fused_residual_add_match_the_torch_ops(kernels):
    norm = RMSNorm(576, 1e-5).to(BF16)
    norm.weight.data = randn(576, seed=1, scale=0.2) + 1
    x, delta = randn(16, 576, seed=2, scale=3.0), randn(16, 576, seed=3)
    with torch.inference_mode():
        assert_within_one_bf16_step(kernels.rms_norm(x, norm.weight, norm.eps), norm(x))
        hidden = x.clone()
        normed = kernels.add_rms_norm(hidden, delta, norm.weight, norm.eps)
        assert torch.equal(hidden, x + delta)  # one bf16 add: exact
        assert_within_one_bf16_step(normed, norm(x + delta))


def test_rotary_in_place_equals_apply_rotary_bit_for_bit(kernels):
    n_tokens, heads, kv_heads, head_dim = 7, 9, 3, 64
    qkv = randn(n_tokens, (heads + 2 * kv_heads) * head_dim, seed=4)
    cos, sin = rope_cos_sin(torch.arange(100, 100 + n_tokens), head_dim, 10000.0, BF16)
    expected = apply_rotary(qkv.view(n_tokens, -1, head_dim)[:, : heads + kv_heads], cos, sin)
    rotated = qkv.clone()
    kernels.rotary_(rotated, heads + kv_heads, head_dim, cos, sin)
    rotated = rotated.view(n_tokens, -1, head_dim)
    assert torch.equal(rotated[:, : heads + kv_heads], expected)
    assert torch.equal(rotated[:, heads + kv_heads :], qkv.view(n_tokens, -1, head_dim)[:, heads + kv_heads :])


def test_silu_mul_matches_silu_times_up(kernels):
    gate_up = randn(16, 2 * 1536, seed=5, scale=4.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_one_bf16_step(kernels.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 16: the portable path; 64, 128: AVX512 where present
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_writes_the_cache_and_matches_the_reference(kernels, head_dim, window):
    n_slots, heads, kv_heads, capacity = 4, 6, 2, 32
    lengths = [9, 1, 20, 32]  # positions already cached per slot; the last slot's rolling buffer is full
    cache = torch.full((2, n_slots, kv_heads, capacity, head_dim), float("nan"), dtype=BF16)
    positions = torch.full((n_slots, capacity), -1, dtype=torch.long)
    for slot, length in enumerate(lengths):
        kept = torch.arange(max(0, length - capacity), length)
        cache[:, slot, :, kept % capacity] = randn(2, kv_heads, len(kept), head_dim, seed=10 + slot)
        positions[slot, kept % capacity] = kept
    # Decode tokens of slots 2, 0 and 3 (slot 1 idle), in rows 1, 2 and 4 of a 5-row batch.
    rows, slots = torch.tensor([1, 2, 4]), torch.tensor([2, 0, 3])
    query_pos = torch.tensor([lengths[2], lengths[0], lengths[3]])
    positions[slots, query_pos % capacity] = query_pos
    qkv = randn(5, (heads + 2 * kv_heads) * head_dim, seed=6)
    out = torch.zeros(5, heads, head_dim, dtype=BF16)
    keys, values = cache[0].clone(), cache[1].clone()
    kernels.decode_attention(qkv, heads, kv_heads, head_dim, rows, keys, values, positions, slots, query_pos,
                             window, out)

    split = qkv.view(5, -1, head_dim).split([heads, kv_heads, kv_heads], 1)
    for row, slot, pos in zip(rows.tolist(), slots.tolist(), query_pos.tolist()):
        entry = pos % capacity
        assert torch.equal(keys[slot, :, entry], split[1][row]) and torch.equal(values[slot, :, entry], split[2][row])
        seen = (positions[slot] >= 0) & (positions[slot] <= pos)
        if window:
            seen &= positions[slot] > pos - window
        bias = torch.zeros(capacity).masked_fill_(~seen, float("-inf"))
        expected = decode_attention(split[0][row][None].float(), torch.nan_to_num(keys[slot][None].float()),
                                    torch.nan_to_num(values[slot][None].float()), bias[None, None, None])
        torch.testing.assert_close(out[row].float(), expected[0], atol=2e-2, rtol=2e-2)
    assert not out[[0, 3]].any()  # rows that are not decode tokens are left alone
    assert not out.isnan().any()  # never-written (NaN) entries were not read


CPU_FLAGS = cpu_kernels.cpu_flags()


@pytest.fixture(scope="module")
def avx2_kernels():
    """The library as built for an AVX2 CPU (x86-64-v3), where this one has AVX512F and so runs another."""
    if not {"avx2", "fma", "avx512f"} <= CPU_FLAGS:
        pytest.skip("this CPU's own build is its AVX2 build, or it has no AVX2")
    return cpu_kernels.build("x86-64-v3")


@pytest.fixture(params=["native", "avx2"])
def linear_kernels(request, kernels, monkeypatch):
    """This CPU's build, and the AVX2 one where that differs: the models loaded meanwhile use it."""
    built = kernels if request.param == "native" else request.getfixturevalue("avx2_kernels")
    if not built.has_linear:
        pytest.skip("the linear kernel is built only where the CPU has AVX512F or AVX2")
    monkeypatch.setattr(cpu_kernels, "load", lambda: built)
    return built


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 16, 17, 40])  # tiles of 8 rows, and their remainders
@pytest.mark.parametrize("out_features, in_features", [(64, 32), (832, 576), (576, 1536)])
def test_linear_kernel_gives_the_correctly_rounded_product(linear_kernels, rows, out_features, in_features):
    weight = randn(out_features, in_features, seed=6, scale=in_features**-0.5)
    blocked = linear_kernels.blocked_weight(weight)
    assert blocked is not None and blocked.serves(weight)
    wide = randn(rows, in_features + 32, seed=7)  # rows with a stride of their own
    x = wide[:, :in_features]
    expected = (x.float() @ weight.float().t()).to(BF16)  # exact products, float32 sums, one rounding
    out = blocked(x)
    assert out.shape == (rows, out_features) and out.dtype == BF16
    if rows:
        assert_within_one_bf16_step(out, expected)


def test_linear_kernel_takes_only_the_sizes_it_is_built_for(linear_kernels):
    assert linear_kernels.blocked_weight(randn(48, 64)) is None  # outputs in blocks of 32
    assert linear_kernels.blocked_weight(randn(64, 33)) is None  # inputs in pairs
    assert linear_kernels.blocked_weight(torch.randn(64, 64)) is None  # float32


def test_model_linears_run_on_the_kernel_where_it_is_built(kernels, tiny_mistral_dir):
    model = load_model(tiny_mistral_dir, dtype=BF16)
    packed = [model.packed_output, *(w for layer in model.layers for w in layer.attention.packed.values())]
    kinds = {type(w).__name__ for w in packed}
    assert kinds == ({"BlockedWeight"} if kernels.has_linear else {"PackedWeight"})


# Mixtral over one decode step: on random weights its routers have near-ties (top-2 probabilities
# 0.1514 / 0.1509 at step 3 here) that any bf16 rounding difference flips, and then the logits part.
@pytest.mark.parametrize("name, steps", [("tiny_mistral_dir", 40), ("tiny_mixtral_dir", 1)])
def test_model_with_kernels_follows_the_torch_path(request, kernels, name, steps):
    """Prefill chunks and decode steps mixed in one batch, through the rolling window: the fused path
    gives the logits of the torch path, to bf16 precision."""
    fused = load_model(request.getfixturevalue(name), dtype=BF16)
    plain = load_model(request.getfixturevalue(name), dtype=BF16)
    assert fused.cpu_kernels is not None
    plain.cpu_kernels = None
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, fused.args.vocab_size, (n,), generator=generator).tolist() for n in (30, 7, 1)]
    caches = [model.new_slot_cache(4, 256) for model in (fused, plain)]
    for cache in caches:
        cache.kv.fill_(float("nan"))  # never-written entries must not leak into attention
        assert [cache.allocate() for _ in range(4)] == [0, 1, 2, 3]

    def step(tokens, segments):
        outs = [model.forward_batch(torch.tensor(tokens), segments, cache) for model, cache in zip((fused, plain), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=0.05 * outs[1].abs().max().item(), rtol=0)
        assert not outs[0].isnan().any()
        return outs[1].argmax(-1).tolist()

    with torch.inference_mode():
        sequences = [list(p) for p in prompts]  # in slots 0, 1, 2
        next_tokens = step([t for p in prompts for t in p], [Segment(i, 0, len(p)) for i, p in enumerate(prompts)])
        for n in range(steps):
            for sequence, token in zip(sequences, next_tokens):
                sequence.append(token)
            segments = [Segment(i, len(s) - 1, 1) for i, s in enumerate(sequences)]
            tokens = [s[-1] for s in sequences]
            if n == min(3, steps - 1):  # a new prompt joins the running decodes, in slot 3
                sequences.append(prompts[0][:12])
                segments.append(Segment(3, 0, 12))
                tokens += prompts[0][:12]
            next_tokens = step(tokens, segments)
    if steps > 1:
        assert len(sequences[0]) > 2 * fused.args.sliding_window  # past a rolling window


def test_a_layer_without_its_fused_weight_sends_the_model_down_the_torch_path(kernels, tiny_mistral_dir):
    """The kernels need every layer's fused q/k/v weight: once one no longer serves (a weight replaced),
    the whole step runs the torch path, whose plan then carries the torch decode tensors."""
    models = [load_model(tiny_mistral_dir, dtype=BF16) for _ in range(2)]
    for model in models:
        wq = model.layers[1].attention.wq
        wq.weight.data = wq.weight.data.clone()  # same values, no longer a view of the fused weight
    models[1].cpu_kernels = None
    prompt = list(range(5, 17))
    outs = []
    with torch.inference_mode():
        for model in models:
            cache = model.new_slot_cache(1, 64)
            slot = cache.allocate()
            model.forward_batch(torch.tensor(prompt), [Segment(slot, 0, len(prompt))], cache)
            outs.append(model.forward_batch(torch.tensor([7]), [Segment(slot, len(prompt), 1)], cache))
    assert models[0].cpu_kernels is not None
    assert torch.equal(outs[0], outs[1]) and outs[0].isfinite().all()


class _CountingStack:
    """A model's DecoderStack that counts the steps it runs."""

    def __init__(self, stack):
        self.stack, self.calls = stack, 0

    def current(self) -> bool:
        return self.stack.current()

    def __call__(self, *args) -> None:
        self.calls += 1
        self.stack(*args)


def _decode_steps(model, prompts, steps, use_stack: bool) -> tuple[list[torch.Tensor], int]:
    """Logits of each step: the prompts prefilled in fresh entries, then greedy decode steps, a new
    prompt joining at step 2; through the decoder stack or the per-layer kernel calls. Also returns
    how many steps the stack ran."""
    stack = model.decoder_stack
    counting = _CountingStack(stack)
    model.decoder_stack = counting if use_stack else None
    try:
        cache = model.new_slot_cache(len(prompts) + 1, 256)
        cache.kv.fill_(float("nan"))
        slots = [cache.allocate() for _ in range(len(prompts) + 1)]
        sequences = [list(p) for p in prompts]
        segments = [Segment(slot, 0, len(p)) for slot, p in zip(slots, prompts)]
        tokens, outs = [t for p in prompts for t in p], []
        for n in range(steps):
            outs.append(model.forward_batch(torch.tensor(tokens), segments, cache))
            for sequence, token in zip(sequences, outs[-1].argmax(-1).tolist()):
                sequence.append(token)
            segments = [Segment(slot, len(s) - 1, 1) for slot, s in zip(slots, sequences)]
            tokens = [s[-1] for s in sequences]
            if n == 1:
                sequences.append(prompts[0][:5])
                segments.append(Segment(slots[-1], 0, 5))
                tokens += prompts[0][:5]
        return outs, counting.calls
    finally:
        model.decoder_stack = stack


def test_decoder_stack_gives_the_per_layer_kernels_logits_bit_for_bit(linear_kernels, tiny_mistral_dir):
    """One kernel call for all layers runs the same kernels in the same order as the per-layer calls."""
    model = load_model(tiny_mistral_dir, dtype=BF16)
    assert model.decoder_stack is not None and model.cpu_kernels is linear_kernels
    prompts = [list(range(5, 14)), [40, 41, 42]]  # within the window: every token is a kernel token
    with torch.inference_mode():
        stacked, stack_steps = _decode_steps(model, prompts, 6, use_stack=True)
        per_layer, _ = _decode_steps(model, prompts, 6, use_stack=False)
    assert stack_steps == 6
    assert all(torch.equal(a, b) for a, b in zip(stacked, per_layer))
    assert all(out.isfinite().all() for out in stacked)


@pytest.mark.parametrize("replaced", ["ffn_norm", "wo"])
def test_a_replaced_weight_takes_the_model_off_the_decoder_stack(linear_kernels, tiny_mistral_dir, replaced):
    """The stack reads the weights it was built from: once a layer's norm or linear weight is replaced,
    steps run the per-layer calls, which read the new one."""
    models = [load_model(tiny_mistral_dir, dtype=BF16) for _ in range(2)]
    for model in models:
        layer = model.layers[1]
        if replaced == "ffn_norm":
            layer.ffn_norm.weight = torch.nn.Parameter(layer.ffn_norm.weight.detach() * 3, requires_grad=False)
        else:
            layer.attention.wo.weight.data = layer.attention.wo.weight.data.flip(0).contiguous()
    prompts = [list(range(5, 14))]
    with torch.inference_mode():
        assert not models[0].decoder_stack.current()
        stacked, stack_steps = _decode_steps(models[0], prompts, 3, use_stack=True)
        per_layer, _ = _decode_steps(models[1], prompts, 3, use_stack=False)
    assert stack_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(stacked, per_layer))


def test_switched_off_the_model_runs_its_torch_ops(monkeypatch, tiny_mistral_dir):
    monkeypatch.setenv("PLATEFORME_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        model = load_model(tiny_mistral_dir, dtype=BF16)
        assert model.cpu_kernels is None and not model.use_cpu_kernels()
        cache = model.new_slot_cache(1, 64)
        with torch.inference_mode():
            out = model.forward_batch(torch.tensor([5, 6, 7]), [Segment(cache.allocate(), 0, 3)], cache)
        assert out.shape == (1, model.args.vocab_size) and out.isfinite().all()
        # dtype auto: bfloat16 without the kernels only where the CPU multiplies it natively.
        assert resolve_dtype("auto") == (BF16 if cpu_kernels.native_bf16() else torch.float32)
    finally:
        cpu_kernels.load.cache_clear()


def test_dtype_auto_is_bfloat16_where_the_linear_kernel_runs_on_avx512(kernels):
    if not (kernels.has_linear and "avx512f" in CPU_FLAGS):
        pytest.skip("auto picks bfloat16 for the kernels only on AVX512F CPUs")
    assert resolve_dtype("auto") == BF16


def test_mixtral_experts_run_on_the_linear_kernel_and_match_their_torch_matmuls(linear_kernels, tiny_mixtral_dir):
    """On CPU each expert's gate/up is fused and, in bfloat16, blocked for the linear kernel (half the
    bytes of float32, where torch's bf16 matmuls may be slow): the MoE layer's output is that of the
    experts' plain torch matmuls, to bf16 precision."""
    model = load_model(tiny_mixtral_dir, dtype=BF16)
    moe = model.layers[0].feed_forward
    assert all(expert.fused_weight_current() for expert in moe.experts)
    assert {type(w).__name__ for expert in moe.experts for w in expert.packed.values()} == {"BlockedWeight"}
    x = randn(24, model.args.dim, seed=8)
    with torch.inference_mode():
        on_kernel = moe(x, linear_kernels)
        for expert in moe.experts:
            expert.packed.clear()
        with_torch = moe(x)
    assert not on_kernel.isnan().any()
    torch.testing.assert_close(on_kernel, with_torch, atol=0.02 * with_torch.abs().max().item(), rtol=0)


def test_without_onednn_bfloat16_the_linears_still_run_on_the_kernel(linear_kernels, tiny_mistral_dir, monkeypatch):
    """An AVX2 CPU has the kernel's linear but not oneDNN's bfloat16: the weights are blocked all the same."""
    monkeypatch.setattr(transformer, "packing_available", lambda dtype, device: False)
    model = load_model(tiny_mistral_dir, dtype=BF16)
    assert model.decoder_stack is not None and isinstance(model.packed_output, cpu_kernels.BlockedWeight)
