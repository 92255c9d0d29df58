"""Where our Triton kernels can run: compiled on CUDA tensors, interpreted on CPU tensors."""
import torch
from triton.runtime.jit import JITFunction


def is_compiled(kernel: object) -> bool:
    """True for a kernel that Triton compiles for a GPU; False under the interpreter
    (``TRITON_INTERPRET=1`` when triton was imported), where kernels run as Python on CPU tensors."""
    return isinstance(kernel, JITFunction)


def check_launchable(kernel: object, *tensors: torch.Tensor) -> torch.device:
    """The device that ``kernel`` will run on for ``tensors``, or a ValueError saying why it cannot."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"MoE kernel inputs must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return device
    if device.type == "cpu" and not is_compiled(kernel):
        return device
    if device.type == "cpu":
        raise ValueError(
            "Triton kernels run on CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    raise ValueError(f"Triton kernels run on CUDA tensors (or CPU under the interpreter), not {device.type!r}")
