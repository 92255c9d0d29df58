"""plateforme's fused MoE kernel: Triton's interpreter against a mistral-inference reference on fresh
random inputs; routing, alignment and block-size tables; the TensorRT plugin up to TensorRT itself.

Run alone or with the suite: this module selects Triton's interpreter (``TRITON_INTERPRET=1``) for the
session, so the checks that need Triton's compiler (PTX for sm_90, a GPU engine) run in subprocesses.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Before anything imports triton: CPU tensors then run under the interpreter.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch
from plateforme.builders import moe_plugin as mp
from plateforme.python_backend.kernels import (
    MoeKernelConfig,
    NormalizationMode,
    align_by_expert,
    fused_moe,
    kernel_config,
    padded_capacity,
    reference_moe,
    route,
)
from plateforme.python_backend.kernels.align import DimOps
from plateforme.python_backend.kernels.config import (
    DEFAULT_TABLE,
    KernelConfigError,
    check_ranges,
    device_table_path,
    dtype_name,
    select,
    write_tuned,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = MoeKernelConfig(block_m=16, block_n=16, block_k=16)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def moe_inputs(tokens, hidden, inter, experts, dtype, seed):
    """Fresh random hidden states, fp32 router logits and TensorRT-LLM-layout weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    w_fc = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype)
    w_proj = (torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    return x, logits, w_fc, w_proj


def subprocess_env() -> dict[str, str]:
    """This environment without the interpreter switch: Triton compiles."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# -- routing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(NormalizationMode))
def test_route_is_softmax_then_top_k(dtype, mode):
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    routing = route(logits, 3, mode)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, 3, dim=-1)
    if mode == NormalizationMode.RENORMALIZE:
        weights = weights / weights.sum(-1, keepdim=True)
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(9))
    assert routing.experts.dtype == torch.int32 and routing.weights.dtype == torch.float32
    assert torch.equal(routing.experts.long(), experts)
    torch.testing.assert_close(routing.weights, weights, rtol=1e-6, atol=1e-6)


def test_route_renormalised_equals_softmax_over_top_k_logits():
    """Mixtral's two formulations (TensorRT-LLM's and mistral-inference's) agree."""
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    top, _ = torch.topk(logits, 2, dim=-1)
    torch.testing.assert_close(route(logits, 2).weights, torch.softmax(top, dim=-1))


def test_route_rejects_bad_arguments():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, 9)
    with pytest.raises(ValueError, match="normalization mode 2"):
        route(logits, 2, 2)
    with pytest.raises(ValueError, match="router logits"):
        route(logits[0], 2)


# -- alignment ------------------------------------------------------------------------------------
@pytest.mark.parametrize("start,local", [(0, 8), (2, 3)])
def test_alignment_groups_sorts_and_pads_by_expert(start, local):
    experts = torch.randint(0, 8, (37, 2), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    block = 16
    a = align_by_expert(experts, block, num_local_experts=local, expert_start=start)
    flat = experts.flatten()
    n_assign = flat.numel()
    assert a.sorted_ids.numel() == padded_capacity(n_assign, local, block)
    assert a.block_experts.numel() == a.sorted_ids.numel() // block
    row = 0
    for e in range(local):
        ids = torch.nonzero(flat == start + e).flatten().int()
        padded = -(-ids.numel() // block) * block
        group = a.sorted_ids[row : row + padded]
        assert torch.equal(group[: ids.numel()], ids), f"expert {e}: assignments in increasing order"
        assert torch.all(group[ids.numel() :] == n_assign), "padding points past the last assignment"
        assert torch.all(a.block_experts[row // block : (row + padded) // block] == e)
        row += padded
    assert int(a.num_padded) == row
    assert torch.all(a.sorted_ids[row:] == n_assign)
    assert torch.all(a.block_experts[row // block :] == -1)


def test_alignment_of_assignments_all_elsewhere_is_empty():
    experts = torch.full((5, 2), 7, dtype=torch.int32)
    a = align_by_expert(experts, 16, num_local_experts=4, expert_start=0)
    assert int(a.num_padded) == 0
    assert torch.all(a.sorted_ids == 10) and torch.all(a.block_experts == -1)


def test_padded_capacity_is_the_worst_case():
    block = 16

    def worst(n_assign: int, local: int) -> int:
        """Largest padded length over every split of n_assign assignments among local experts."""
        best = [0] + [-1] * n_assign  # best[n]: over the experts seen so far
        for _ in range(local):
            best = [
                max([best[n]] + [best[n - c] + -(-c // block) * block for c in range(1, n + 1) if best[n - c] >= 0])
                for n in range(n_assign + 1)
            ]
        return best[n_assign]

    for n_assign in range(1, 40):
        for local in (1, 3, 8):
            capacity = padded_capacity(n_assign, local, block)
            assert capacity >= worst(n_assign, local) and capacity % block == 0
    assert padded_capacity(2, 8, block) == 32  # a decode step of top-2: two blocks, not eight


def test_alignment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="int32"):
        align_by_expert(torch.zeros(3, 2, dtype=torch.int64), 16, num_local_experts=4)
    with pytest.raises(ValueError, match="power of two"):
        align_by_expert(torch.zeros(3, 2, dtype=torch.int32), 24, num_local_experts=4)


# -- the fused kernel against mistral-inference's semantics -----------------------------------------
CASES = {
    # name: (tokens, hidden, inter, experts, top_k, dtype, logits edit, mode)
    "fp32": (24, 48, 40, 4, 2, torch.float32, None, NormalizationMode.RENORMALIZE),
    "bf16": (24, 48, 40, 4, 2, torch.bfloat16, None, NormalizationMode.RENORMALIZE),
    "fp16": (24, 48, 40, 4, 2, torch.float16, None, NormalizationMode.RENORMALIZE),
    "one token": (1, 48, 40, 8, 2, torch.float32, None, NormalizationMode.RENORMALIZE),
    "one token bf16": (1, 48, 40, 8, 2, torch.bfloat16, None, NormalizationMode.RENORMALIZE),
    "an expert without tokens": (20, 32, 24, 4, 2, torch.float32, "starve 2", NormalizationMode.RENORMALIZE),
    "all tokens on one expert": (20, 32, 24, 4, 1, torch.float32, "favour 1", NormalizationMode.RENORMALIZE),
    "sizes off the blocks": (13, 40, 24, 3, 2, torch.bfloat16, None, NormalizationMode.RENORMALIZE),
    "no renormalisation": (16, 32, 24, 4, 2, torch.float32, None, NormalizationMode.NONE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_moe_matches_reference(case, record_property):
    tokens, hidden, inter, experts, top_k, dtype, edit, mode = CASES[case]
    x, logits, w_fc, w_proj = moe_inputs(tokens, hidden, inter, experts, dtype, seed=list(CASES).index(case))
    if edit:
        what, expert = edit.split()
        logits[:, int(expert)] = -1e4 if what == "starve" else 1e4
    out = fused_moe(x, logits, w_fc, w_proj, top_k, normalization=mode, config=SMALL)
    ref = reference_moe(x, logits, w_fc, w_proj, top_k, normalization=mode)
    err = rel_err(out, ref)
    record_property("rel_err", err)
    print(f"{case}: ||out - ref|| / ||ref|| = {err:.2e}")
    assert out.dtype == dtype and out.shape == x.shape
    assert err < TOLERANCE[dtype], f"{case}: relative error {err:.2e}"
    if edit == "starve 2":
        assert not (route(logits, top_k).experts == 2).any()
    if edit == "favour 1":
        assert (route(logits, top_k).experts == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_parallel_slices_sum_to_the_whole_layer(dtype, record_property):
    x, logits, w_fc, w_proj = moe_inputs(11, 32, 24, 8, dtype, seed=5)
    ref = reference_moe(x, logits, w_fc, w_proj, 2)
    chosen = route(logits, 2).experts
    parts = []
    for start in (0, 2, 4, 6):  # four ranks of two experts
        part = fused_moe(
            x, logits, w_fc[start : start + 2].contiguous(), w_proj[start : start + 2].contiguous(), 2,
            expert_start=start, config=SMALL,
        )  # fmt: skip
        # Tokens routed only to other ranks' experts contribute exactly zero here.
        elsewhere = ~((chosen >= start) & (chosen < start + 2)).any(dim=1)
        assert elsewhere.any() and torch.all(part[elsewhere] == 0)
        parts.append(part.float())
    err = rel_err(sum(parts), ref)
    record_property("rel_err", err)
    print(f"expert-parallel {dtype}: ||sum(ranks) - ref|| / ||ref|| = {err:.2e}")
    assert err < TOLERANCE[dtype]


def test_fused_moe_rejects_mismatched_weights():
    x, logits, w_fc, w_proj = moe_inputs(4, 32, 24, 4, torch.float32, seed=6)
    with pytest.raises(ValueError, match="do not match hidden size"):
        fused_moe(x, logits, w_fc[:, :, :16].contiguous(), w_proj, 2)
    with pytest.raises(ValueError, match="dtype mismatch"):
        fused_moe(x.bfloat16(), logits, w_fc, w_proj, 2)
    with pytest.raises(ValueError, match="not within the router"):
        fused_moe(x, logits, w_fc, w_proj, 2, expert_start=1)


def test_engine_moe_layer_runs_the_kernel_on_tensorrt_llm_layout():
    """The engine's MoeLayer: its fused path (what CUDA tensors take) equals its per-expert loop."""
    from plateforme.python_backend.model.args import MoeArgs
    from plateforme.python_backend.model.moe import MoeLayer
    from plateforme.python_backend.model.transformer import FeedForward
    from torch import nn

    torch.manual_seed(7)
    layer = MoeLayer([FeedForward(32, 24) for _ in range(4)], nn.Linear(32, 4, bias=False), MoeArgs(4, 2))
    x = torch.randn(9, 32)
    with torch.no_grad():
        loop = layer(x)  # CPU: the loop
        w_fc, w_proj = layer._fused_layout()
        e = layer.experts[3]
        assert torch.equal(w_fc[3], torch.cat([e.w3.weight, e.w1.weight])) and torch.equal(w_proj[3], e.w2.weight)
        # One copy of the weights: the experts now view the fused tensors.
        assert e.w1.weight.data_ptr() == w_fc[3, 24:].data_ptr()
        assert layer._fused_layout()[0] is w_fc
        fused = layer._fused_forward(x)
    assert rel_err(fused, loop) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_logits_with_and_without_the_kernel_on_gpu(tiny_mixtral_dir):
    script = textwrap.dedent(
        f"""
        import torch
        from plateforme.python_backend.model import load_model
        from plateforme.python_backend.model.moe import MoeLayer
        model = load_model({str(tiny_mixtral_dir)!r}, dtype=torch.bfloat16, device="cuda")
        tokens = torch.randint(3, model.args.vocab_size, (40,), device="cuda")
        with torch.no_grad():
            MoeLayer.use_fused_kernel = False
            plain = model(tokens)
            MoeLayer.use_fused_kernel = True
            fused = model(tokens)
        print(float((fused - plain).norm() / plain.norm()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    err = float(result.stdout.split()[-1])
    print(f"engine logits, fused vs loop (bf16, GPU): {err:.2e}")
    assert err < 2e-2


GPU_CASES = {
    **{name: [tokens, hidden, inter, experts, top_k, str(dtype).removeprefix("torch."), edit, int(mode)]
       for name, (tokens, hidden, inter, experts, top_k, dtype, edit, mode) in CASES.items()},
    # Blocks of 64 and 128 rows (the table's choice at this M): the tensor-core paths of larger M.
    "many tokens bf16": [1000, 512, 768, 8, 2, "bfloat16", None, 1],
    "many tokens fp16": [1000, 512, 768, 8, 2, "float16", None, 1],
    "many tokens fp32": [600, 256, 384, 8, 2, "float32", None, 1],
}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_matches_reference_on_gpu():
    """Compiled on CUDA: every case above with small blocks and with the device table's blocks, and
    four expert-parallel ranks, against the reference in float64 on fresh inputs. Freed memory is
    filled with NaN before each call, so an output element the kernels never wrote shows up."""
    script = textwrap.dedent(
        f"""
        import json, torch
        from plateforme.python_backend.kernels import MoeKernelConfig, fused_moe, reference_moe
        cases = json.loads({json.dumps(json.dumps(GPU_CASES))})
        small = MoeKernelConfig(block_m=16, block_n=16, block_k=16)
        g = torch.Generator(device="cuda").manual_seed(20261130)

        def poisoned(fn):
            torch.full((1 << 26,), float("nan"), device="cuda")  # freed at once, then reused
            out = fn()
            torch.cuda.synchronize()
            return out

        def err(out, ref):
            return float((out.double() - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("nan")

        report = {{}}
        for name, (tokens, hidden, inter, experts, top_k, dtype, edit, mode) in cases.items():
            dtype = getattr(torch, dtype)
            x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
            logits = torch.randn(tokens, experts, device="cuda", generator=g)
            if edit:
                what, expert = edit.split()
                logits[:, int(expert)] = -1e4 if what == "starve" else 1e4
            w_fc = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=g) * hidden**-0.5).to(dtype)
            w_proj = (torch.randn(experts, hidden, inter, device="cuda", generator=g) * inter**-0.5).to(dtype)
            ref = reference_moe(x.double(), logits, w_fc.double(), w_proj.double(), top_k, normalization=mode)
            for label, config in (("small blocks", small), ("table", None)):
                out = poisoned(lambda: fused_moe(x, logits, w_fc, w_proj, top_k, normalization=mode, config=config))
                report[f"{{name}}, {{label}}"] = [str(dtype), err(out, ref)]
            if experts == 8:  # four ranks of two experts each
                ranks = [
                    poisoned(lambda s=s: fused_moe(x, logits, w_fc[s:s + 2].contiguous(), w_proj[s:s + 2].contiguous(),
                                                   top_k, normalization=mode, expert_start=s))
                    for s in (0, 2, 4, 6)
                ]
                report[f"{{name}}, expert-parallel"] = [str(dtype), err(sum(r.double() for r in ranks), ref)]
        print(json.dumps(report))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    tolerance = {str(dtype): limit for dtype, limit in TOLERANCE.items()}
    for case, (dtype, err) in report.items():
        print(f"GPU {case} ({dtype}): ||out - ref|| / ||ref|| = {err:.2e}")
    failed = {case: err for case, (dtype, err) in report.items() if not err < tolerance[dtype]}
    assert not failed, f"relative errors over the tolerance (nan: an element not written): {failed}"
    assert len(report) == 2 * len(GPU_CASES) + sum(case[3] == 8 for case in GPU_CASES.values())


# -- block-size tables ------------------------------------------------------------------------------
def test_default_table_covers_every_token_count():
    table = json.loads(DEFAULT_TABLE.read_text())
    check_ranges(table["m_ranges"])
    small = kernel_config(num_experts=8, inter=14336, hidden=4096, dtype=torch.bfloat16, tokens=1)
    large = kernel_config(num_experts=8, inter=14336, hidden=4096, dtype="bfloat16", tokens=10**6)
    assert small == select(table["m_ranges"], 16) and small.block_m == 16
    assert large == select(table["m_ranges"], 10**6) and large.block_m >= small.block_m


def test_tuned_table_is_used_for_its_device_and_shape(tmp_path):
    (tmp_path / DEFAULT_TABLE.name).write_text(DEFAULT_TABLE.read_text())
    key = {"E": 8, "N": 14336, "K": 4096, "dtype": "bfloat16"}
    ranges = [
        {"m_max": 4, **MoeKernelConfig(16, 32, 256, 1, 4, 5).to_json()},
        {"m_max": None, **MoeKernelConfig(64, 128, 64, 8, 8, 3).to_json()},
    ]
    path = write_tuned("NVIDIA H100 80GB HBM3", key, ranges, {"triton": "3.9.0"}, config_dir=tmp_path)
    assert path == tmp_path / "NVIDIA_H100_80GB_HBM3.json" == device_table_path("NVIDIA H100 80GB HBM3", tmp_path)

    def lookup(tokens, device="NVIDIA H100 80GB HBM3", inter=14336):
        return kernel_config(
            num_experts=8, inter=inter, hidden=4096, dtype=torch.bfloat16, tokens=tokens,
            device_name=device, config_dir=tmp_path,
        )  # fmt: skip

    assert lookup(1) == MoeKernelConfig(16, 32, 256, 1, 4, 5)
    assert lookup(5) == MoeKernelConfig(64, 128, 64, 8, 8, 3)
    default = select(json.loads(DEFAULT_TABLE.read_text())["m_ranges"], 1)
    assert lookup(1, device="NVIDIA A100-SXM4-80GB") == default  # no table for that device
    assert lookup(1, inter=7168) == default  # no entry for that shape
    # Re-tuning a shape replaces its entry.
    write_tuned("NVIDIA H100 80GB HBM3", key, ranges[1:], {}, config_dir=tmp_path)
    assert len(json.loads(path.read_text())["shapes"]) == 1 and lookup(1).block_m == 64


@pytest.mark.parametrize(
    "ranges,match",
    [
        ([], "at least one"),
        ([{"m_max": 16, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}], "unbounded"),
        ([{"m_max": 8, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}] * 2 + [{"m_max": None, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}], "increasing"),
        ([{"m_max": None, "BLOCK_M": 24, "BLOCK_N": 16, "BLOCK_K": 16}], "power of two"),
        ([{"m_max": None, "BLOCK_M": 16, "BLOCK_N": 16}], "BLOCK_K"),
    ],
)
def test_bad_tables_are_rejected(ranges, match):
    with pytest.raises(KernelConfigError, match=match):
        check_ranges(ranges)


def test_config_rejects_bad_values():
    with pytest.raises(KernelConfigError, match="num_warps"):
        MoeKernelConfig(16, 16, 16, num_warps=3)
    with pytest.raises(KernelConfigError, match="int8"):
        dtype_name(torch.int8)


# -- the TensorRT plugin, up to TensorRT ------------------------------------------------------------
def mixtral_fields(**overrides) -> mp.MoePluginFields:
    values = {"num_experts": 8, "top_k": 2, "normalization_mode": 1, "dtype": "bfloat16", "hidden_size": 4096, "inter_size": 14336}
    return mp.MoePluginFields(**{**values, **overrides})


def plugin_inputs(fields: mp.MoePluginFields, tokens) -> dict[str, list[mp.TensorSpec]]:
    """Every plugin's inputs for ``tokens`` tokens, chaining infer_outputs like the network does."""
    f, act = fields, fields.dtype

    def infer(op, inputs):
        return mp.infer_outputs(op, f, inputs, dims=DIMS if not isinstance(tokens, int) else mp.INT_DIMS)

    fc = mp.TensorSpec((f.experts_per_rank, 2 * f.inter_size, f.hidden_size), act)
    proj = mp.TensorSpec((f.experts_per_rank, f.hidden_size, f.inter_size), act)
    inputs = {"moe_route": [mp.TensorSpec((tokens, f.num_experts), "float32")]}
    weights, experts = infer("moe_route", inputs["moe_route"])
    inputs["moe_align"] = [experts]
    alignment = infer("moe_align", [experts])
    inputs["moe_gate_up"] = [mp.TensorSpec((tokens, f.hidden_size), act), fc, *alignment]
    (activations,) = infer("moe_gate_up", inputs["moe_gate_up"])
    inputs["moe_down"] = [activations, proj, *alignment, weights]
    (y,) = infer("moe_down", inputs["moe_down"])
    inputs["moe_combine"] = [y, experts]
    inputs["output"] = infer("moe_combine", inputs["moe_combine"])
    return inputs


class Sym:
    """A symbolic dimension like TensorRT's: + * // with ints, no Python int conversion."""

    def __init__(self, fn):
        self.fn = fn

    def _op(self, other, op):
        return Sym(lambda t: op(self.fn(t), other.fn(t) if isinstance(other, Sym) else other))

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)


DIMS = DimOps(
    cdiv=lambda a, b: Sym(lambda t: -(-a.fn(t) // b)),
    min=lambda a, b: Sym(lambda t: min(a.fn(t), b)),
)


def test_plugin_fields_round_trip_through_their_json():
    f = mixtral_fields(ep_size=4, ep_rank=3, normalization_mode=0, dtype="float16", config_tokens=64)
    assert mp.MoePluginFields.from_json(f.to_json()) == f
    assert json.loads(f.to_json())["normalization_mode"] == 0
    assert (f.experts_per_rank, f.expert_start) == (2, 6)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"top_k": 9}, "exceeds num_experts"),
        ({"ep_size": 3}, "multiple of ep_size"),
        ({"ep_size": 2, "ep_rank": 2}, "ep_rank"),
        ({"dtype": "int8"}, "dtype"),
        ({"normalization_mode": 2}, "normalization mode 2"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"version": 0}, "rebuild the engine"),
    ],
)
def test_plugin_fields_are_validated(overrides, match):
    with pytest.raises(mp.MoePluginError, match=match):
        mixtral_fields(**overrides)


def test_plugin_fields_json_errors_name_the_problem():
    good = json.loads(mixtral_fields().to_json())
    with pytest.raises(mp.MoePluginError, match="unknown MoE plugin fields"):
        mp.MoePluginFields.from_json(json.dumps({**good, "bias": 1}))
    with pytest.raises(mp.MoePluginError, match="lack"):
        mp.MoePluginFields.from_json(json.dumps({k: v for k, v in good.items() if k != "top_k"}))
    with pytest.raises(mp.MoePluginError, match="not JSON"):
        mp.MoePluginFields.from_json("{")


def test_plugin_shape_inference_chains_and_matches_the_kernels():
    f = mixtral_fields(hidden_size=48, inter_size=40, num_experts=4, dtype="float32")
    inputs = plugin_inputs(f, 24)
    assert inputs["output"] == [mp.TensorSpec((24, 48), "float32")]
    assert inputs["moe_down"][0] == mp.TensorSpec((48, 40), "float32")
    sorted_ids, block_experts, num_padded = inputs["moe_gate_up"][2:]
    # The very buffers the kernels produce for these fields.
    _, logits, _, _ = moe_inputs(24, 48, 40, 4, torch.float32, seed=8)
    a = align_by_expert(route(logits, 2).experts, f.kernel_config().block_m, num_local_experts=4)
    assert sorted_ids.shape == tuple(a.sorted_ids.shape) and block_experts.shape == tuple(a.block_experts.shape)
    assert num_padded == mp.TensorSpec((1,), "int32")


def test_plugin_shape_inference_on_symbolic_token_counts():
    f = mixtral_fields(ep_size=2, ep_rank=1)
    tokens = Sym(lambda t: t)
    symbolic = plugin_inputs(f, tokens)
    for t in (1, 7, 300):
        concrete = plugin_inputs(f, t)
        for op in [*mp.OPS, "output"]:
            for s, c in zip(symbolic[op], concrete[op]):
                assert tuple(d.fn(t) if isinstance(d, Sym) else d for d in s.shape) == c.shape, op


@pytest.mark.parametrize(
    "op,index,spec,match",
    [
        ("moe_route", 0, mp.TensorSpec((5, 8), "bfloat16"), "must be float32"),
        ("moe_route", 0, mp.TensorSpec((5, 6), "float32"), "dim 1 must be 8"),
        ("moe_gate_up", 0, mp.TensorSpec((5, 1024), "bfloat16"), "hidden_states dim 1 must be 4096"),
        ("moe_gate_up", 1, mp.TensorSpec((4, 28672, 4096), "bfloat16"), "fc_weight dim 0 must be 8"),
        ("moe_down", 1, mp.TensorSpec((8, 4096, 14336), "float16"), "proj_weight must be bfloat16"),
        ("moe_down", 5, mp.TensorSpec((5, 3), "float32"), "weights dim 1 must be 2"),
        ("moe_combine", 1, mp.TensorSpec((5, 2, 1), "int32"), "must have 2 dims"),
    ],
)
def test_plugin_shape_inference_rejects_bad_inputs(op, index, spec, match):
    inputs = plugin_inputs(mixtral_fields(), 5)[op]
    inputs[index] = spec
    with pytest.raises(mp.MoePluginError, match=match):
        mp.infer_outputs(op, mixtral_fields(), inputs)


def test_plugin_rejects_unknown_ops_and_input_counts():
    with pytest.raises(mp.MoePluginError, match="unknown MoE plugin"):
        mp.infer_outputs("moe_softmax", mixtral_fields(), [])
    with pytest.raises(mp.MoePluginError, match="takes 5 inputs"):
        mp.infer_outputs("moe_gate_up", mixtral_fields(), plugin_inputs(mixtral_fields(), 5)["moe_gate_up"][:3])


def test_plugin_kernels_take_inputs_then_scalars_then_outputs():
    """TensorRT's AOT launch passes (input pointers, int32 scalars, output pointers)."""
    f = mixtral_fields(ep_size=4, ep_rank=1)
    inputs = plugin_inputs(f, 37)
    expected_scalars = {
        "moe_route": (37, 8),
        "moe_align": (74, 2, 2, padded_capacity(74, 2, f.kernel_config().block_m)),
        "moe_gate_up": (74, 4096, 14336),
        "moe_down": (74, 4096, 14336),
        "moe_combine": (4096, 2, 2),
    }
    for op in mp.OPS:
        launch = mp.kernel_launch(op, f, inputs[op])
        kinds = [t for t in launch.signature.values() if t != "constexpr"]
        n_in, n_out = len(mp.INPUTS[op]), len(mp.OUTPUTS[op])
        assert all(k.startswith("*") for k in kinds[:n_in] + kinds[len(kinds) - n_out :]), op
        assert kinds[n_in : len(kinds) - n_out] == ["i32"] * len(launch.scalars), op
        assert launch.scalars == expected_scalars[op], op
    gate_up = mp.kernel_launch("moe_gate_up", f, inputs["moe_gate_up"])
    assert gate_up.grid[0] == inputs["moe_gate_up"][3].shape[0] * -(-14336 // f.kernel_config().block_n)
    assert gate_up.constants["DOT_FP32"] is False and gate_up.constants["TOP_K"] == 2


def test_fields_for_rank_follow_tensorrt_llm_rank_arithmetic():
    checkpoint = {
        "dtype": "bfloat16", "hidden_size": 4096, "intermediate_size": 14336,
        "moe": {"num_experts": 8, "top_k": 2, "normalization_mode": 1},
        "mapping": {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 2},
        "quantization": {"quant_algo": None},
    }  # fmt: skip
    ranks = [mp.fields_for_rank(checkpoint, r) for r in range(4)]
    assert [(f.ep_rank, f.expert_start, f.inter_size) for f in ranks] == [(0, 0, 7168), (1, 4, 7168)] * 2
    with pytest.raises(mp.MoePluginError, match="W4A16"):
        mp.fields_for_rank({**checkpoint, "quantization": {"quant_algo": "W4A16"}})
    with pytest.raises(mp.MoePluginError, match="must equal tp_size"):
        mp.fields_for_rank({**checkpoint, "mapping": {**checkpoint["mapping"], "moe_ep_size": 1}})
    with pytest.raises(mp.MoePluginError, match="MoE checkpoints"):
        mp.fields_for_rank({**checkpoint, "moe": {"num_experts": 0, "top_k": 0}})


def test_custom_moe_build_args_keep_tensorrt_llm_moe_layers():
    args = mp.custom_moe_build_args("bfloat16")
    assert args[:2] == ["--moe_plugin", "bfloat16"]  # "disable" would swap the layers out
    model_file = Path(args[args.index("--model_cls_file") + 1])
    assert model_file.is_file() and f"class {args[args.index('--model_cls_name') + 1]}(" in model_file.read_text()
    with pytest.raises(mp.MoePluginError, match="dtype"):
        mp.custom_moe_build_args("fp8")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_registration_without_tensorrt_names_what_is_missing():
    with pytest.raises(mp.MoePluginUnavailable, match=r"TensorRT >= 10.9.*tensorrt.plugin"):
        import plateforme.builders.moe_plugin_trt  # noqa: F401


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_model_class_without_tensorrt_llm_names_what_is_missing():
    with pytest.raises(mp.MoePluginUnavailable, match="tensorrt_llm"):
        import plateforme.builders.trtllm_moe_model  # noqa: F401


def test_strip_unused_params_keeps_the_launch_arguments():
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}"
    stripped = mp.strip_unused_params(ptx, "k", 2)
    assert "k_param_2" not in stripped and "k_param_1" in stripped and stripped.endswith(ptx[ptx.index(")") :])
    with pytest.raises(mp.MoePluginError, match="reads its hidden parameter"):
        mp.strip_unused_params(ptx, "k", 1)


def test_plugin_kernels_compile_to_ptx_for_h100():
    """Triton's compiler (no GPU needed) turns every plugin kernel into PTX for sm_90 whose parameters
    are exactly the AOT launch's, within the shared-memory budget, the GEMMs on tensor cores."""
    script = textwrap.dedent(
        """
        import json, re
        from plateforme.builders import moe_plugin as mp
        f = mp.MoePluginFields(num_experts=8, top_k=2, normalization_mode=1, dtype="bfloat16",
                               hidden_size=4096, inter_size=14336)
        specs = {"moe_route": [mp.TensorSpec((37, 8), "float32")]}
        weights, experts = mp.infer_outputs("moe_route", f, specs["moe_route"])
        alignment = mp.infer_outputs("moe_align", f, [experts])
        specs["moe_align"] = [experts]
        specs["moe_gate_up"] = [mp.TensorSpec((37, 4096), "bfloat16"),
                                mp.TensorSpec((8, 28672, 4096), "bfloat16"), *alignment]
        (act,) = mp.infer_outputs("moe_gate_up", f, specs["moe_gate_up"])
        specs["moe_down"] = [act, mp.TensorSpec((8, 4096, 14336), "bfloat16"), *alignment, weights]
        (y,) = mp.infer_outputs("moe_down", f, specs["moe_down"])
        specs["moe_combine"] = [y, experts]
        report = {}
        for op in mp.OPS:
            launch = mp.kernel_launch(op, f, specs[op])
            k = mp.compile_kernel(launch, capability=90)
            entry = re.search(r"\\.entry \\w+\\((.*?)\\)", k.ptx, re.S).group(1)
            report[op] = {"params": entry.count(".param"),
                          "args": sum(t != "constexpr" for t in launch.signature.values()),
                          "shared": k.shared_memory, "mma": "mma" in k.ptx}
        print(json.dumps(report))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == set(mp.OPS)
    for op, r in report.items():
        assert r["params"] == r["args"], f"{op}: PTX parameters {r['params']} != launch arguments {r['args']}"
        assert r["shared"] <= mp.MAX_SHARED_MEMORY, op
    assert report["moe_gate_up"]["mma"] and report["moe_down"]["mma"]


# -- the benchmark's baseline ---------------------------------------------------------------------
def test_benchmark_padded_bmm_baseline_matches_reference():
    spec = importlib.util.spec_from_file_location("moe_bench", REPO / "bench" / "moe_kernel.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    x, logits, w_fc, w_proj = moe_inputs(10, 32, 24, 4, torch.float32, seed=9)
    out = bench.padded_bmm_moe(x, logits, w_fc, w_proj, 2)
    assert rel_err(out, reference_moe(x, logits, w_fc, w_proj, 2)) < 1e-5
