"""Fused bfloat16 CPU kernels for the batched step, and its linear layers where the CPU has AVX512F
or AVX2 (cpu_kernels.c), loaded through ctypes. There, a whole stack of dense layers also runs in
one call (DecoderStack).

The C source is compiled once per machine with the system C compiler (``cc``, for this CPU) into
plateforme's cache and loaded from there afterwards. Without a compiler, or with
PLATEFORME_CPU_KERNELS=0, :func:`load` returns None and the model runs its torch ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from plateforme.paths import home

from .packing import RepackedWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fno-math-errno lets sqrtf inline; nothing here needs fast-math (NaN and -inf must survive).
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "pf_rms_norm": [_ptr, _i64, _ptr, _ptr, _i64, _i64, _f32],
    "pf_add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _i64],
    "pf_rotary": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr],
    "pf_silu_mul": [_ptr, _ptr, _i64, _i64, _i64],
    "pf_decode_attention": [_ptr, _i64, _ptr, _ptr, *[_ptr] * 6, *[_i64] * 6, _f32, _ptr, _i64, _ptr],
}
# Built only where the CPU has AVX512F or AVX2; elsewhere the linear layers stay with oneDNN or torch.
_LINEAR_SIGNATURE = ("pf_linear", [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64])
_STACK_SIGNATURE = ("pf_decoder_stack", [_ptr, *[_i64] * 7, *[_ptr] * 9, *[_i64] * 3, _f32, _ptr, _ptr, _ptr, _i64])
# Output blocks of 16, taken two at a time (cpu_kernels.c), and input pairs.
LINEAR_OUT_MULTIPLE, LINEAR_IN_MULTIPLE = 32, 2


# CPU flags with which torch's (oneDNN's) bfloat16 matmuls run natively.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo's "flags" line; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def _machine_key(march: str) -> str:
    """What the compiled library depends on: the source, the flags, the compiler and this CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([f"-march={march}", *FLAGS]).encode())
    digest.update(subprocess.run(["cc", "--version"], capture_output=True, check=True).stdout)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        digest.update(flags.encode())
    return digest.hexdigest()[:16]


def _compile(march: str) -> Path:
    target = home() / "cpu_kernels" / f"cpu_kernels-{_machine_key(march)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: concurrent loaders never see half a library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(["cc", f"-march={march}", *FLAGS, "-o", str(built), str(SOURCE), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"cc failed on {SOURCE.name}: {result.stderr.strip()[:2000]}")
        os.replace(built, target)
    return target


class BlockedWeight(RepackedWeight):
    """A bfloat16 weight [out, in] in pf_linear's layout, [out / 16][in / 2][16][2]: each 64-byte row
    of it is an input pair for 16 outputs."""

    def __init__(self, weight: torch.Tensor, linear, widens: bool):
        super().__init__(weight)
        out_features, in_features = weight.shape
        self.out_features, self.in_features = out_features, in_features
        self.blocked = (
            weight.detach().view(out_features // 16, 16, in_features // 2, 2).permute(0, 2, 1, 3).contiguous()
        )
        self._linear, self._widens = linear, widens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = x.new_empty(x.shape[0], self.out_features)
        if x.shape[0]:
            wide = _wide_scratch(self._widens, x.shape[0] * self.in_features)
            self._linear(x.data_ptr(), x.stride(0), x.shape[0], self.in_features, self.blocked.data_ptr(),
                         self.out_features, out.data_ptr(), wide.data_ptr(), torch.get_num_threads())
        return out


def _optional_function(library: ctypes.CDLL, name: str, argtypes: list):
    """A function the library has only where the CPU has AVX512F or AVX2; None elsewhere."""
    function = getattr(library, name, None)
    if function is not None:
        function.argtypes, function.restype = argtypes, None
    return function


def _wide_scratch(widens: bool, floats: int) -> torch.Tensor:
    """x widened to float32 for pf_linear, where it is built without AVX512-BF16 (empty elsewhere)."""
    return torch.empty(floats if widens else 0, dtype=torch.float32)


def _attention_scratch(n_heads: int, n_kv_heads: int, capacity: int, threads: int) -> torch.Tensor:
    """pf_decode_attention's per-thread scores and visible-entry lists."""
    return torch.empty(threads * (n_heads // n_kv_heads + 1) * capacity, dtype=torch.float32)


class _Layer(ctypes.Structure):
    """pf_layer in cpu_kernels.c."""

    _fields_ = [("wqkv", _ptr), ("wo", _ptr), ("w13", _ptr), ("w2", _ptr), ("ffn_norm", _ptr), ("next_norm", _ptr),
                ("ffn_eps", _f32), ("next_eps", _f32)]


@dataclass
class StackLayer:
    """What pf_decoder_stack takes of one dense decoder layer."""

    wqkv: BlockedWeight
    wo: BlockedWeight
    w13: BlockedWeight
    w2: BlockedWeight
    ffn_norm: torch.Tensor
    ffn_eps: float
    next_norm: torch.Tensor  # the next layer's attention norm weight, or the final norm's
    next_eps: float


class DecoderStack:
    """Dense decoder layers run by one pf_decoder_stack call a step, instead of nine kernel calls a
    layer from Python. It reads the weights it was built from: ``watched`` names where the model
    holds each of them, (a module's parameter dict or __dict__, key), and ``current`` tells whether
    they are all still there."""

    def __init__(self, function, layers: list[StackLayer], n_heads: int, n_kv_heads: int, head_dim: int,
                 watched: list[tuple[dict, str]], widens: bool):
        self._function, self._widens = function, widens
        self.layers = layers
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dim = layers[0].wqkv.in_features
        self.hidden = layers[0].w2.in_features
        self._structs = (_Layer * len(layers))(*[
            _Layer(l.wqkv.blocked.data_ptr(), l.wo.blocked.data_ptr(), l.w13.blocked.data_ptr(), l.w2.blocked.data_ptr(),
                   l.ffn_norm.data_ptr(), l.next_norm.data_ptr(), l.ffn_eps, l.next_eps)
            for l in layers
        ])
        self._watched = watched
        self._pointers = self._current_pointers()

    def _current_pointers(self) -> list[int]:
        return [holder[key].data_ptr() for holder, key in self._watched]

    def current(self) -> bool:
        """Whether the model still holds the weights the stack was built from (a reload or a
        replaced weight takes the model back to its per-layer path). About 0.1 µs a weight."""
        return self._current_pointers() == self._pointers

    def __call__(self, h: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                 query_pos: torch.Tensor, window: int | None) -> None:
        """Every layer on ``h`` [N, dim] (updated in place) and ``normed`` (the first attention norm of h
        on entry, the final norm's output on return); every token is a kernel token (BatchPlan)."""
        n = h.shape[0]
        qkv_width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        work = h.new_empty(n * (qkv_width + self.n_heads * self.head_dim + self.dim + 3 * self.hidden))
        threads, capacity = torch.get_num_threads(), kv.shape[4]
        scratch = _attention_scratch(self.n_heads, self.n_kv_heads, capacity, threads)
        wide = _wide_scratch(self._widens, n * max(self.dim, self.n_heads * self.head_dim, self.hidden))
        self._function(
            ctypes.addressof(self._structs), len(self.layers), n, self.dim, self.n_heads, self.n_kv_heads,
            self.head_dim, self.hidden, h.data_ptr(), normed.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            kv.data_ptr(), positions.data_ptr(), rows.data_ptr(), slots.data_ptr(), query_pos.data_ptr(),
            kv.shape[2], capacity, window or 0, self.head_dim**-0.5, work.data_ptr(), scratch.data_ptr(),
            wide.data_ptr(), threads,
        )


class CpuKernels:
    """The library's functions on torch tensors (bfloat16, contiguous rows, CPU)."""

    def __init__(self, library: ctypes.CDLL):
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
        self._lib = library
        self._linear = _optional_function(library, *_LINEAR_SIGNATURE)
        self._stack = _optional_function(library, *_STACK_SIGNATURE)
        widens = getattr(library, "pf_linear_widens", None)
        if widens is not None:
            widens.argtypes, widens.restype = [], ctypes.c_int
        # Built without AVX512-BF16, the linear kernel widens x to float32 in a scratch buffer.
        self._widens = bool(widens is not None and widens())

    @property
    def has_linear(self) -> bool:
        """Whether the library has the linear kernel (built where the CPU has AVX512F or AVX2)."""
        return self._linear is not None

    def blocked_weight(self, weight: torch.Tensor) -> BlockedWeight | None:
        """``weight`` [out, in] for the linear kernel; None where that does not run it (no AVX512F/AVX2,
        not bfloat16, or sizes that are not multiples of its blocks)."""
        if not self.has_linear or weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
            return None
        out_features, in_features = weight.shape
        if out_features % LINEAR_OUT_MULTIPLE or in_features % LINEAR_IN_MULTIPLE:
            return None
        return BlockedWeight(weight, self._linear, self._widens)

    def decoder_stack(self, layers: list[StackLayer], n_heads: int, n_kv_heads: int, head_dim: int,
                      watched: list[tuple[dict, str]]) -> DecoderStack | None:
        """The layers as one DecoderStack (see there); None where the library has no linear kernel."""
        if self._stack is None or not layers:
            return None
        return DecoderStack(self._stack, layers, n_heads, n_kv_heads, head_dim, watched, self._widens)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self._lib.pf_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``hidden += delta`` in place; returns the RMS-normed result."""
        out = torch.empty_like(hidden)
        self._lib.pf_add_rms_norm(hidden.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                  hidden.shape[0], hidden.shape[1], eps, torch.get_num_threads())
        return out

    def rotary_(self, rows: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates the first ``heads`` heads of each row of ``rows`` [N, width] in place."""
        self._lib.pf_rotary(rows.data_ptr(), rows.stride(0), rows.shape[0], heads, head_dim, cos.data_ptr(),
                            sin.data_ptr())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        out = gate_up.new_empty(rows, width // 2)
        self._lib.pf_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
        return out

    def decode_attention(self, qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, rows: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                         query_pos: torch.Tensor, window: int | None, out: torch.Tensor) -> None:
        """Writes the keys and values of the tokens in rows ``rows`` of ``qkv`` [N, (H + 2 KV) * D] (decode
        tokens, prompt tokens in fresh entries) to one layer's ``keys``/``values`` [n_slots, KV, capacity, D],
        then their attention output to ``out`` [N, H * D]."""
        capacity, threads = keys.shape[2], torch.get_num_threads()
        scratch = _attention_scratch(n_heads, n_kv_heads, capacity, threads)
        base, item_bytes = qkv.data_ptr(), qkv.element_size()
        k_new = base + n_heads * head_dim * item_bytes
        v_new = k_new + n_kv_heads * head_dim * item_bytes
        self._lib.pf_decode_attention(
            base, qkv.stride(0), k_new, v_new, rows.data_ptr(), keys.data_ptr(), values.data_ptr(),
            positions.data_ptr(), slots.data_ptr(), query_pos.data_ptr(), rows.shape[0], n_heads, n_kv_heads,
            head_dim, capacity, window or 0, head_dim**-0.5, out.data_ptr(), threads, scratch.data_ptr(),
        )


def build(march: str = "native") -> CpuKernels:
    """The kernels compiled for ``march`` (cc's -march: this CPU, or an older instruction set such as
    x86-64-v3, AVX2, to test that build); raises where they cannot be."""
    return CpuKernels(ctypes.CDLL(str(_compile(march))))


@lru_cache(maxsize=1)
def load() -> CpuKernels | None:
    """The kernels for this CPU, compiled on first use; None where they cannot be (reason logged)."""
    if os.environ.get("PLATEFORME_CPU_KERNELS", "1") == "0":
        return None
    if shutil.which("cc") is None:
        log.info("no C compiler (cc): the model runs its torch ops")
        return None
    try:
        return build()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable, the model runs its torch ops: %s", exc)
        return None
