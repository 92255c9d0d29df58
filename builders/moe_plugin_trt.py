"""Registration of plateforme's MoE plugins with TensorRT (``tensorrt.plugin``, TensorRT >= 10.9).

Importing this module needs TensorRT; everything it delegates to is in ``moe_plugin``. Annotations
are real objects here (no ``from __future__ import annotations``): ``tensorrt.plugin`` reads them to
tell tensors from attributes.
"""

from plateforme.builders.moe_plugin import (
    PLUGIN_NAMESPACE,
    MoePluginFields,
    MoePluginUnavailable,
    TensorSpec,
    compile_kernel,
    infer_outputs,
    kernel_launch,
)
from plateforme.python_backend.kernels.align import DimOps

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as e:
    raise MoePluginUnavailable(
        f"the custom MoE plugin needs TensorRT >= 10.9 with its Python plugin API (tensorrt.plugin): {e}"
    ) from None
if not hasattr(trtp, "aot_impl"):
    raise MoePluginUnavailable(
        f"the custom MoE plugin needs TensorRT >= 10.9 (tensorrt.plugin.aot_impl); this is TensorRT {trt.__version__}"
    )

_DTYPES = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32"}
_TRT_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def _both_ints(a, b) -> bool:
    return isinstance(a, int) and isinstance(b, int)


# TensorRT's symbolic dims; its helpers refuse two plain ints.
TRT_DIMS = DimOps(
    cdiv=lambda a, b: -(-a // b) if _both_ints(a, b) else trtp.cdiv(a, b),
    min=lambda a, b: min(a, b) if _both_ints(a, b) else trtp.min(a, b),
)


def _dim(expr):
    """A shape expression as an int when TensorRT knows its value (weights), else the expression."""
    if not expr.is_fake and expr.is_constant:
        return expr.constant_value()
    return expr


def _spec(desc: trtp.TensorDesc) -> TensorSpec:
    if desc.dtype not in _DTYPES:
        raise ValueError(f"custom MoE plugin: unsupported tensor type {desc.dtype}")
    return TensorSpec(tuple(_dim(e) for e in desc.shape_expr), _DTYPES[desc.dtype])


def _outputs(op: str, inputs, fields: str):
    specs = infer_outputs(op, MoePluginFields.from_json(fields), [_spec(d) for d in inputs], TRT_DIMS)
    return tuple(trtp.from_shape_expr(tuple(s.shape), dtype=_TRT_DTYPES[s.dtype]) for s in specs)


def _aot(op: str, inputs, fields: str):
    import torch

    launch = kernel_launch(op, MoePluginFields.from_json(fields), [_spec(d) for d in inputs], TRT_DIMS)
    major, minor = torch.cuda.get_device_capability()
    compiled = compile_kernel(launch, capability=10 * major + minor)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x = compiled.num_warps * 32
    params.shared_mem = compiled.shared_memory
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in launch.scalars])
    return compiled.name.encode(), compiled.ptx.encode(), params, scalars


AotResult = tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]
_registered = False


def register_plugins() -> None:
    """Register the five ``plateforme::moe_*`` plugins (once per process)."""
    global _registered
    if _registered:
        return

    @trtp.register(f"{PLUGIN_NAMESPACE}::moe_route")
    def _(router_logits: trtp.TensorDesc, fields: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs("moe_route", [router_logits], fields)

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::moe_route")
    def _(router_logits: trtp.TensorDesc, fields: str, outputs: tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        return _aot("moe_route", [router_logits], fields)

    @trtp.register(f"{PLUGIN_NAMESPACE}::moe_align")
    def _(experts: trtp.TensorDesc, fields: str) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs("moe_align", [experts], fields)

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::moe_align")
    def _(experts: trtp.TensorDesc, fields: str, outputs: tuple[trtp.TensorDesc], tactic: int) -> AotResult:
        return _aot("moe_align", [experts], fields)

    @trtp.register(f"{PLUGIN_NAMESPACE}::moe_gate_up")
    def _(
        hidden_states: trtp.TensorDesc,
        fc_weight: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        block_experts: trtp.TensorDesc,
        num_padded: trtp.TensorDesc,
        fields: str,
    ) -> trtp.TensorDesc:
        return _outputs("moe_gate_up", [hidden_states, fc_weight, sorted_ids, block_experts, num_padded], fields)[0]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::moe_gate_up")
    def _(
        hidden_states: trtp.TensorDesc,
        fc_weight: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        block_experts: trtp.TensorDesc,
        num_padded: trtp.TensorDesc,
        fields: str,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> AotResult:
        return _aot("moe_gate_up", [hidden_states, fc_weight, sorted_ids, block_experts, num_padded], fields)

    @trtp.register(f"{PLUGIN_NAMESPACE}::moe_down")
    def _(
        activations: trtp.TensorDesc,
        proj_weight: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        block_experts: trtp.TensorDesc,
        num_padded: trtp.TensorDesc,
        weights: trtp.TensorDesc,
        fields: str,
    ) -> trtp.TensorDesc:
        inputs = [activations, proj_weight, sorted_ids, block_experts, num_padded, weights]
        return _outputs("moe_down", inputs, fields)[0]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::moe_down")
    def _(
        activations: trtp.TensorDesc,
        proj_weight: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        block_experts: trtp.TensorDesc,
        num_padded: trtp.TensorDesc,
        weights: trtp.TensorDesc,
        fields: str,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> AotResult:
        inputs = [activations, proj_weight, sorted_ids, block_experts, num_padded, weights]
        return _aot("moe_down", inputs, fields)

    @trtp.register(f"{PLUGIN_NAMESPACE}::moe_combine")
    def _(expert_outputs: trtp.TensorDesc, experts: trtp.TensorDesc, fields: str) -> trtp.TensorDesc:
        return _outputs("moe_combine", [expert_outputs, experts], fields)[0]

    @trtp.aot_impl(f"{PLUGIN_NAMESPACE}::moe_combine")
    def _(
        expert_outputs: trtp.TensorDesc,
        experts: trtp.TensorDesc,
        fields: str,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> AotResult:
        return _aot("moe_combine", [expert_outputs, experts], fields)

    _registered = True


def add_moe_layers(
    network: trt.INetworkDefinition,
    hidden_states: trt.ITensor,
    router_logits: trt.ITensor,
    fc_weight: trt.ITensor,
    proj_weight: trt.ITensor,
    fields: MoePluginFields,
) -> trt.ILayer:
    """Append the five plugins computing the MoE layer; the returned layer's output 0 is [T, hidden]."""
    register_plugins()
    ops = getattr(trtp.op, PLUGIN_NAMESPACE)
    attrs = {"fields": fields.to_json()}

    def add(op: str, *inputs: trt.ITensor) -> trt.ILayer:
        layer = network.add_plugin(getattr(ops, op)(*inputs, **attrs), aot=True)
        layer.name = f"{hidden_states.name}/{op}"
        return layer

    route = add("moe_route", router_logits)
    weights, experts = route.get_output(0), route.get_output(1)
    align = add("moe_align", experts)
    sorted_ids, block_experts, num_padded = (align.get_output(i) for i in range(3))
    gate_up = add("moe_gate_up", hidden_states, fc_weight, sorted_ids, block_experts, num_padded)
    down = add("moe_down", gate_up.get_output(0), proj_weight, sorted_ids, block_experts, num_padded, weights)
    return add("moe_combine", down.get_output(0), experts)
