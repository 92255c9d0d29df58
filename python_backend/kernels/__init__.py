"""plateforme's fused mixture-of-experts kernel (OpenAI Triton), on TensorRT-LLM's weight layout.

On CUDA tensors the kernels are compiled; on CPU tensors they run under Triton's interpreter, which
must be selected with ``TRITON_INTERPRET=1`` before triton is first imported.
"""
from .align import Alignment, align_by_expert, padded_capacity
from .config import MoeKernelConfig, kernel_config
from .fused_moe import fused_experts, fused_moe
from .reference import reference_moe
from .routing import NormalizationMode, Routing, route

__all__ = [
    "Alignment",
    "MoeKernelConfig",
    "NormalizationMode",
    "Routing",
    "align_by_expert",
    "fused_experts",
    "fused_moe",
    "kernel_config",
    "padded_capacity",
    "reference_moe",
    "route",
]
