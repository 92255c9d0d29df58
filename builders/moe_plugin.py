"""plateforme's fused MoE kernel as TensorRT plugins: what `plateforme build --moe-plugin custom` uses.

Choice of mechanism: TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9) with
ahead-of-time implementations. Each Triton kernel is compiled to PTX at engine build and baked into
the engine, so the engine runs in TensorRT's C++ runtime (Triton's tensorrtllm backend) with no
Python and no extra plugin library. TensorRT-LLM's Triton plugin generator (examples/openai_triton)
was the alternative: it emits C++ IPluginV2 sources (an interface TensorRT 10 deprecates) that need
a CMake build against TensorRT-LLM's headers, and it is pinned to an old Triton AOT tool.

An AOT plugin launches exactly one kernel, with the kernel's arguments in the order
(input pointers, int32 scalars, output pointers). The MoE layer is therefore five plugins, in the
``plateforme`` namespace, whose kernels take their arguments in that order:

    moe_route    router_logits [T, E] fp32          -> weights [T, k] fp32, experts [T, k] int32
    moe_align    experts                            -> sorted_ids [C] i32, block_experts [C/BM] i32, num_padded [1] i32
    moe_gate_up  hidden [T, H], fc [E_l, 2I, H], sorted_ids, block_experts, num_padded -> act [T*k, I]
    moe_down     act, proj [E_l, H, I], sorted_ids, block_experts, num_padded, weights -> y [T*k, H]
    moe_combine  y, experts                         -> out [T, H]

All five carry one attribute, ``fields``: the JSON of ``MoePluginFields``. Everything here (fields,
serialization, shape and type inference, kernel arguments, the PTX) runs without TensorRT;
``moe_plugin_trt`` registers the plugins with TensorRT, and ``trtllm_moe_model`` is the
TensorRT-LLM model class (``trtllm-build --model_cls_file``) whose MoE layers use them.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import triton
from plateforme.python_backend.kernels.align import (
    ALIGN_WARPS,
    INT_DIMS,
    DimOps,
    align_constants,
    align_kernel,
    padded_capacity,
)
from plateforme.python_backend.kernels.config import MoeKernelConfig, kernel_config
from plateforme.python_backend.kernels.fused_moe import (
    COMBINE_BLOCK,
    COMBINE_WARPS,
    combine_kernel,
    down_kernel,
    gate_up_kernel,
    gemm_constants,
)
from plateforme.python_backend.kernels.launch import is_compiled
from plateforme.python_backend.kernels.routing import (
    ROUTE_WARPS,
    NormalizationMode,
    normalization_mode,
    route_constants,
    route_kernel,
)

PLUGIN_NAMESPACE = "plateforme"
# Bumped whenever a plugin's inputs, outputs or kernels change meaning: engines record it.
PLUGIN_VERSION = 1
OPS = ("moe_route", "moe_align", "moe_gate_up", "moe_down", "moe_combine")
MODEL_CLASS_FILE = Path(__file__).with_name("trtllm_moe_model.py")
MODEL_CLASS_NAME = "PlateformeMixtralForCausalLM"
# Without opting in, a CUDA kernel gets at most 48 KiB of dynamic shared memory; whether TensorRT
# opts in for AOT plugin kernels is not documented, so stay within it.
MAX_SHARED_MEMORY = 48 * 1024

DTYPES = ("bfloat16", "float16", "float32")
_POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32"}


class MoePluginError(ValueError):
    """Plugin fields, input shapes or dtypes that the custom MoE plugin cannot take."""


class MoePluginUnavailable(RuntimeError):
    """A piece the plugin needs at build time (TensorRT, TensorRT-LLM, Triton's compiler) is missing."""


@dataclass(frozen=True)
class MoePluginFields:
    """What a plugin instance is built for; the same for the five plugins of one MoE layer.

    Expert parallelism as in TensorRT-LLM: rank ``ep_rank`` of ``ep_size`` holds the contiguous experts
    ``[ep_rank * E/ep_size, (ep_rank+1) * E/ep_size)``; ``inter_size`` is the per-rank intermediate size
    (``intermediate_size / moe_tp_size``). ``config_tokens``: the token count whose block sizes are
    compiled in (an engine has one kernel per plugin; decode batches are where MoE time goes).
    """

    num_experts: int
    top_k: int
    normalization_mode: NormalizationMode
    dtype: str
    hidden_size: int
    inter_size: int
    ep_size: int = 1
    ep_rank: int = 0
    config_tokens: int = 16
    version: int = field(default=PLUGIN_VERSION)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "inter_size", "ep_size", "config_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoePluginError(f"MoE plugin field {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise MoePluginError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_experts % self.ep_size:
            raise MoePluginError(f"num_experts ({self.num_experts}) is not a multiple of ep_size ({self.ep_size})")
        if not isinstance(self.ep_rank, int) or not 0 <= self.ep_rank < self.ep_size:
            raise MoePluginError(f"ep_rank must be in 0..{self.ep_size - 1}, got {self.ep_rank!r}")
        if self.dtype not in DTYPES:
            raise MoePluginError(f"MoE plugin dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.version != PLUGIN_VERSION:
            raise MoePluginError(
                f"MoE plugin fields of version {self.version}; this plateforme builds version {PLUGIN_VERSION}: "
                "rebuild the engine"
            )
        try:
            object.__setattr__(self, "normalization_mode", normalization_mode(self.normalization_mode))
        except ValueError as e:
            raise MoePluginError(str(e)) from None

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_start(self) -> int:
        return self.ep_rank * self.experts_per_rank

    def kernel_config(self) -> MoeKernelConfig:
        return kernel_config(
            num_experts=self.experts_per_rank,
            inter=self.inter_size,
            hidden=self.hidden_size,
            dtype=self.dtype,
            tokens=self.config_tokens,
        )

    def to_json(self) -> str:
        """The ``fields`` attribute of every plugin, and the engine record: canonical JSON."""
        d = asdict(self)
        d["normalization_mode"] = int(self.normalization_mode)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> MoePluginFields:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoePluginError(f"MoE plugin fields are not JSON: {e}") from None
        if not isinstance(d, dict):
            raise MoePluginError(f"MoE plugin fields must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MoePluginError(f"unknown MoE plugin fields {unknown}")
        missing = sorted(k for k in known - set(d) if k != "version")
        if missing:
            raise MoePluginError(f"MoE plugin fields lack {missing}")
        d.setdefault("version", 0)
        return cls(**d)


# -- shapes and types ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A plugin input or output: dims are ints, or TensorRT shape expressions when not constant."""

    shape: tuple[Any, ...]
    dtype: str  # "float32", "bfloat16", "float16" or "int32"


INPUTS = {
    "moe_route": ("router_logits",),
    "moe_align": ("experts",),
    "moe_gate_up": ("hidden_states", "fc_weight", "sorted_ids", "block_experts", "num_padded"),
    "moe_down": ("activations", "proj_weight", "sorted_ids", "block_experts", "num_padded", "weights"),
    "moe_combine": ("expert_outputs", "experts"),
}
OUTPUTS = {
    "moe_route": ("weights", "experts"),
    "moe_align": ("sorted_ids", "block_experts", "num_padded"),
    "moe_gate_up": ("activations",),
    "moe_down": ("expert_outputs",),
    "moe_combine": ("output",),
}


def _check_op(op: str, inputs: Sequence[TensorSpec]) -> None:
    if op not in INPUTS:
        raise MoePluginError(f"unknown MoE plugin {op!r}: expected one of {', '.join(OPS)}")
    if len(inputs) != len(INPUTS[op]):
        raise MoePluginError(f"{op} takes {len(INPUTS[op])} inputs ({', '.join(INPUTS[op])}), got {len(inputs)}")


def _expect(op: str, name: str, spec: TensorSpec, dims: Sequence[Any], dtype: str) -> None:
    """Check rank, dtype, and every dim that is both known (an int) and expected (not None)."""
    if len(spec.shape) != len(dims):
        raise MoePluginError(f"{op}: {name} must have {len(dims)} dims, got shape {spec.shape}")
    if spec.dtype != dtype:
        raise MoePluginError(f"{op}: {name} must be {dtype}, got {spec.dtype}")
    for axis, (got, want) in enumerate(zip(spec.shape, dims)):
        if want is not None and isinstance(got, int) and got != want:
            raise MoePluginError(f"{op}: {name} dim {axis} must be {want}, got {got} (shape {spec.shape})")


def infer_outputs(
    op: str, fields: MoePluginFields, inputs: Sequence[TensorSpec], dims: DimOps = INT_DIMS
) -> list[TensorSpec]:
    """Output shapes and dtypes of plugin ``op`` for ``inputs``; raises MoePluginError for inputs that
    do not fit ``fields`` (the tensor layouts of this module's docstring)."""
    _check_op(op, inputs)
    f, k, act = fields, fields.top_k, fields.dtype
    if op == "moe_route":
        _expect(op, "router_logits", inputs[0], (None, f.num_experts), "float32")
        tokens = inputs[0].shape[0]
        return [TensorSpec((tokens, k), "float32"), TensorSpec((tokens, k), "int32")]
    if op == "moe_align":
        _expect(op, "experts", inputs[0], (None, k), "int32")
        bm = f.kernel_config().block_m
        capacity = padded_capacity(inputs[0].shape[0] * k, f.experts_per_rank, bm, dims)
        return [TensorSpec((capacity,), "int32"), TensorSpec((capacity // bm,), "int32"), TensorSpec((1,), "int32")]
    if op == "moe_combine":
        _expect(op, "expert_outputs", inputs[0], (None, f.hidden_size), act)
        _expect(op, "experts", inputs[1], (None, k), "int32")
        return [TensorSpec((inputs[1].shape[0], f.hidden_size), act)]
    for name, spec in zip(("sorted_ids", "block_experts", "num_padded"), inputs[2:5]):
        _expect(op, name, spec, (1,) if name == "num_padded" else (None,), "int32")
    if op == "moe_gate_up":
        _expect(op, "hidden_states", inputs[0], (None, f.hidden_size), act)
        _expect(op, "fc_weight", inputs[1], (f.experts_per_rank, 2 * f.inter_size, f.hidden_size), act)
        return [TensorSpec((inputs[0].shape[0] * k, f.inter_size), act)]
    _expect(op, "activations", inputs[0], (None, f.inter_size), act)
    _expect(op, "proj_weight", inputs[1], (f.experts_per_rank, f.hidden_size, f.inter_size), act)
    _expect(op, "weights", inputs[5], (None, k), "float32")
    return [TensorSpec((inputs[0].shape[0], f.hidden_size), act)]


# -- kernels ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelLaunch:
    """One plugin's kernel: what to compile, and how TensorRT launches it."""

    kernel: Any  # the triton.jit function
    signature: dict[str, str]  # every kernel parameter -> Triton type ("*bf16", "i32", "constexpr")
    constants: dict[str, Any]
    num_warps: int
    num_stages: int
    grid: tuple[Any, Any, Any]
    scalar_params: tuple[str, ...]  # the i32 parameters, between the input and the output pointers
    scalars: tuple[Any, ...]  # their values
    stage_bytes: int = 0  # shared memory of one software-pipeline stage (the GEMMs' operand tiles)


def kernel_launch(
    op: str, fields: MoePluginFields, inputs: Sequence[TensorSpec], dims: DimOps = INT_DIMS
) -> KernelLaunch:
    """The kernel of plugin ``op`` with its compile-time constants, grid and scalar arguments."""
    outputs = infer_outputs(op, fields, inputs, dims)
    f, k = fields, fields.top_k
    config = f.kernel_config()
    tokens = inputs[0].shape[0]
    stages, stage_bytes = 1, 0
    if op == "moe_route":
        kernel, warps = route_kernel, ROUTE_WARPS
        constants = route_constants(f.num_experts, k, f.normalization_mode)
        grid = (dims.cdiv(tokens, constants["BLOCK_T"]), 1, 1)
        scalars = (tokens, f.num_experts)
    elif op == "moe_align":
        kernel, warps, grid = align_kernel, ALIGN_WARPS, (1, 1, 1)
        scalars = (tokens * k, f.expert_start, f.experts_per_rank, outputs[0].shape[0])
        constants = align_constants(f.experts_per_rank, config.block_m)
    elif op in ("moe_gate_up", "moe_down"):
        kernel = gate_up_kernel if op == "moe_gate_up" else down_kernel
        n_out = f.inter_size if op == "moe_gate_up" else f.hidden_size
        blocks_m = inputs[3].shape[0]
        grid = (blocks_m * triton.cdiv(n_out, config.block_n), 1, 1)
        scalars = (outputs[0].shape[0], f.hidden_size, f.inter_size)
        constants = gemm_constants(config, f.dtype, compiled=True)
        if op == "moe_gate_up":
            constants["TOP_K"] = k
        warps, stages = config.num_warps, config.num_stages
        b_tiles = 2 if op == "moe_gate_up" else 1  # up and gate, or down
        itemsize = 4 if f.dtype == "float32" else 2
        stage_bytes = (config.block_m + b_tiles * config.block_n) * config.block_k * itemsize
    else:
        kernel, warps = combine_kernel, COMBINE_WARPS
        grid = (inputs[1].shape[0], triton.cdiv(f.hidden_size, COMBINE_BLOCK), 1)
        scalars = (f.hidden_size, f.expert_start, f.experts_per_rank)
        constants = {"TOP_K": k, "BLOCK_H": COMBINE_BLOCK}

    params = list(kernel.arg_names)
    runtime = [p for p in params if p not in constants]
    if len(runtime) != len(inputs) + len(scalars) + len(outputs):
        raise AssertionError(f"{op}: kernel parameters {runtime} do not follow (inputs, scalars, outputs)")
    scalar_params = tuple(runtime[len(inputs) : len(inputs) + len(scalars)])
    pointer_params = [p for p in runtime if p not in scalar_params]
    signature = {p: "constexpr" for p in params if p in constants}
    signature.update({p: _POINTER_TYPES[t.dtype] for p, t in zip(pointer_params, [*inputs, *outputs])})
    signature.update({p: "i32" for p in scalar_params})
    return KernelLaunch(
        kernel, {p: signature[p] for p in params}, constants, warps, stages, grid, scalar_params, tuple(scalars),
        stage_bytes,
    )  # fmt: skip


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_memory: int  # bytes of dynamic shared memory per block
    num_stages: int


def compile_kernel(
    launch: KernelLaunch, capability: int = 90, max_shared_memory: int = MAX_SHARED_MEMORY
) -> CompiledKernel:
    """PTX of ``launch.kernel`` for compute capability ``capability`` (90: H100), with fewer
    software-pipeline stages than configured if that is what fits ``max_shared_memory``. Needs no GPU."""
    if not is_compiled(launch.kernel):
        raise MoePluginUnavailable(
            "ahead-of-time compilation needs Triton's compiler: unset TRITON_INTERPRET before triton is imported"
        )
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    runtime = [p for p, t in launch.signature.items() if t != "constexpr"]
    # TensorRT's buffers are 256-byte aligned; constant dims that are multiples of 16 say so too.
    hints = {p for p, t in launch.signature.items() if t.startswith("*")}
    hints |= {p for p, v in zip(launch.scalar_params, launch.scalars) if isinstance(v, int) and v % 16 == 0}
    attrs = {(launch.kernel.arg_names.index(p),): [["tt.divisibility", 16]] for p in hints}
    # Triton's pipeline keeps (stages - 1) stages of tiles in shared memory: start from what should fit.
    first = launch.num_stages
    if launch.stage_bytes:
        first = max(1, min(first, 1 + max_shared_memory // launch.stage_bytes))
    for stages in range(first, 0, -1):
        source = triton.compiler.ASTSource(
            fn=launch.kernel, signature=launch.signature, constexprs=launch.constants, attrs=attrs
        )
        compiled = triton.compile(
            source, target=target, options={"num_warps": launch.num_warps, "num_stages": stages}
        )
        if compiled.metadata.shared <= max_shared_memory:
            break
    else:
        raise MoePluginError(
            f"{launch.kernel.__name__} needs {compiled.metadata.shared} bytes of shared memory with one stage, "
            f"over {max_shared_memory}: choose smaller blocks"
        )
    if getattr(compiled.metadata, "global_scratch_size", 0) or getattr(compiled.metadata, "profile_scratch_size", 0):
        raise MoePluginError(f"{launch.kernel.__name__} needs Triton scratch memory, which TensorRT does not provide")
    ptx = strip_unused_params(compiled.asm["ptx"], compiled.metadata.name, len(runtime))
    return CompiledKernel(compiled.metadata.name, ptx, compiled.metadata.num_warps, compiled.metadata.shared, stages)


def strip_unused_params(ptx: str, name: str, keep: int) -> str:
    """Drop the kernel's parameters after the first ``keep``. Triton appends scratch-memory pointers
    that TensorRT's AOT launch does not pass; they are removed only if the code never reads them."""
    entry = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.DOTALL)
    if entry is None:
        raise MoePluginError(f"kernel {name} not found in the PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise MoePluginError(f"kernel {name} has {len(params)} parameters, fewer than its {keep} arguments")
    for extra in params[keep:]:
        param_name = extra.split()[-1]
        if ptx.count(param_name) != 1:
            raise MoePluginError(f"kernel {name} reads its hidden parameter {param_name}: cannot launch it from TensorRT")
    body = ",\n".join("\t" + p for p in params[:keep])
    return ptx[: entry.start(1)] + "\n" + body + "\n" + ptx[entry.end(1) :]


# -- engines ------------------------------------------------------------------------------------
def custom_moe_build_args(dtype: str) -> list[str]:
    """trtllm-build arguments that make TensorRT-LLM's MoE layers use these plugins. TensorRT-LLM's own
    ``--moe_plugin`` must stay enabled: with ``disable`` it swaps every MoE layer for its
    plugin-free version (``use_ootb_moe``), and the plateforme layers with it."""
    if dtype not in DTYPES:
        raise MoePluginError(f"custom MoE plugin dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return ["--moe_plugin", dtype, "--model_cls_file", str(MODEL_CLASS_FILE), "--model_cls_name", MODEL_CLASS_NAME]


def fields_for_rank(checkpoint: dict[str, Any], rank: int = 0, config_tokens: int = 16) -> MoePluginFields:
    """The plugin fields of ``rank`` for a TensorRT-LLM checkpoint ``config.json`` (contracts §2: rank
    arithmetic of ``tensorrt_llm/mapping.py``); raises MoePluginError for what the plugin cannot build."""
    moe = checkpoint.get("moe") or {}
    if moe.get("num_experts", 0) <= 1:
        raise MoePluginError("the custom MoE plugin is for MoE checkpoints (config.json has no moe.num_experts > 1)")
    quant = (checkpoint.get("quantization") or {}).get("quant_algo")
    if quant is not None:
        raise MoePluginError(f"the custom MoE plugin runs unquantized bf16/fp16/fp32 experts, not {quant}")
    mapping = checkpoint.get("mapping") or {}
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    moe_tp, moe_ep = mapping.get("moe_tp_size", tp), mapping.get("moe_ep_size", 1)
    if moe_tp * moe_ep != tp:
        raise MoePluginError(f"moe_tp_size ({moe_tp}) x moe_ep_size ({moe_ep}) must equal tp_size ({tp})")
    if not 0 <= rank < tp * pp:
        raise MoePluginError(f"rank {rank} is not in the checkpoint's {tp * pp} ranks")
    inter = checkpoint["intermediate_size"]
    if inter % moe_tp:
        raise MoePluginError(f"intermediate_size ({inter}) is not a multiple of moe_tp_size ({moe_tp})")
    return MoePluginFields(
        num_experts=moe["num_experts"],
        top_k=moe["top_k"],
        normalization_mode=moe.get("normalization_mode", NormalizationMode.RENORMALIZE),
        dtype=checkpoint["dtype"],
        hidden_size=checkpoint["hidden_size"],
        inter_size=inter // moe_tp,
        ep_size=moe_ep,
        ep_rank=(rank % tp) % moe_ep,
        config_tokens=config_tokens,
    )
