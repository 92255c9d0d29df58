"""oneDNN-prepacked weights for the linear layers on CPU (float32; bfloat16 where it is native).

A decode step multiplies a few rows by every weight matrix. oneDNN runs such products on a
weight reordered once into its blocked layout about 1.5-2x faster than the plain matmul: float32
on AVX2 (bench/RESULTS.md), and bfloat16 on an AVX512-BF16 EPYC (a 16-row step of SmolLM2's
linears: 20.4 ms against 31.4 ms). The products are the same dot products, summed in another order:
results differ from F.linear in the last bits, as HF's own batched and unbatched runs do.
The packed copy adds the weights' size in memory; the original weights stay (views, ties).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Row count the layout is tuned for (a decode step of a full batch); any count works.
_TUNED_ROWS = 16


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """float32 on any CPU with oneDNN; bfloat16 where oneDNN takes it (AVX512 and up: natively with
    AVX512-BF16 or AMX, emulated and slower than float32 without)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class RepackedWeight:
    """A weight [out, in] reordered for a matmul kernel. It serves the tensor it was made from, not one
    that replaced it (a reload, a move); weights are not meant to be edited in place once loaded
    (inference tensors carry no version counter to notice it)."""

    def __init__(self, weight: torch.Tensor):
        self._source = (weight.data_ptr(), tuple(weight.shape))

    def serves(self, weight: torch.Tensor) -> bool:
        return self._source == (weight.data_ptr(), tuple(weight.shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PackedWeight(RepackedWeight):
    """A weight reordered for oneDNN."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _TUNED_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")


def pack_into(packed: dict[str, RepackedWeight], weights: dict[str, torch.Tensor | None],
              repack: Callable[[torch.Tensor], RepackedWeight | None]) -> None:
    """``packed[name] = repack(weight)`` for each weight there is and that ``repack`` takes."""
    for name, weight in weights.items():
        copy = repack(weight) if weight is not None else None
        if copy is not None:
            packed[name] = copy


def linear(x: torch.Tensor, weight: torch.Tensor, packed: RepackedWeight | None) -> torch.Tensor:
    """x @ weight.T, through the packed copy when there is a current one."""
    if packed is not None and x.dim() == 2 and packed.serves(weight):
        return packed(x)
    return F.linear(x, weight)
