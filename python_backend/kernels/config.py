"""Block sizes of the grouped GEMMs, kept as data: one table per device in ``configs/``, keyed by
(local experts E, intermediate size N, hidden size K, dtype), each a list of token-count ranges."""
import json
import re
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_TABLE = CONFIG_DIR / "default.json"

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class KernelConfigError(ValueError):
    pass


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``; only the kernels' dtypes are accepted."""
    name = DTYPES.get(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in DTYPES.values():
        raise KernelConfigError(f"unsupported MoE kernel dtype {dtype}: expected one of {sorted(DTYPES.values())}")
    return name


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


@dataclass(frozen=True)
class MoeKernelConfig:
    """Tile sizes (the grouped GEMMs' M, N, K blocks), M-block grouping and launch options."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        # tl.dot needs tiles of at least 16 in every dimension; tl.arange needs powers of two.
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not _power_of_two(value) or value < 16:
                raise KernelConfigError(f"{name} must be a power of two >= 16, got {value}")
        if self.group_m < 1:
            raise KernelConfigError(f"group_m must be >= 1, got {self.group_m}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise KernelConfigError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise KernelConfigError(f"num_stages must be >= 1, got {self.num_stages}")

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "MoeKernelConfig":
        try:
            return cls(
                block_m=entry["BLOCK_M"],
                block_n=entry["BLOCK_N"],
                block_k=entry["BLOCK_K"],
                group_m=entry.get("GROUP_M", 1),
                num_warps=entry.get("num_warps", 4),
                num_stages=entry.get("num_stages", 3),
            )
        except KeyError as e:
            raise KernelConfigError(f"kernel config entry {entry} lacks {e.args[0]!r}") from None

    def to_json(self) -> dict[str, int]:
        d = asdict(self)
        return {
            "BLOCK_M": d["block_m"],
            "BLOCK_N": d["block_n"],
            "BLOCK_K": d["block_k"],
            "GROUP_M": d["group_m"],
            "num_warps": d["num_warps"],
            "num_stages": d["num_stages"],
        }


def select(m_ranges: list[dict[str, Any]], tokens: int) -> MoeKernelConfig:
    """The entry of the first range with ``tokens <= m_max`` (``m_max`` null: no upper bound)."""
    check_ranges(m_ranges)
    for entry in m_ranges:
        if entry["m_max"] is None or tokens <= entry["m_max"]:
            return MoeKernelConfig.from_json(entry)
    raise AssertionError("unreachable: the last range is unbounded")


def check_ranges(m_ranges: list[dict[str, Any]]) -> None:
    if not m_ranges:
        raise KernelConfigError("a kernel config table needs at least one token range")
    bounds = [e.get("m_max", 0) for e in m_ranges]
    if bounds[-1] is not None or any(b is None for b in bounds[:-1]):
        raise KernelConfigError(f"only the last token range may be unbounded (m_max null), got {bounds}")
    if any(not isinstance(b, int) or b < 1 for b in bounds[:-1]) or bounds[:-1] != sorted(set(bounds[:-1])):
        raise KernelConfigError(f"token range bounds must be increasing positive integers, got {bounds}")
    for entry in m_ranges:
        MoeKernelConfig.from_json(entry)


def shape_key(num_experts: int, inter: int, hidden: int, dtype: torch.dtype | str) -> dict[str, Any]:
    return {"E": num_experts, "N": inter, "K": hidden, "dtype": dtype_name(dtype)}


def device_table_path(device_name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """``configs/NVIDIA_H100_80GB_HBM3.json`` for ``"NVIDIA H100 80GB HBM3"``."""
    return config_dir / (re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json")


@cache
def _load(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KernelConfigError(f"{path} is not valid JSON: {e}") from None
    for shape in table.get("shapes", []):
        check_ranges(shape.get("m_ranges", []))
    if "m_ranges" in table:
        check_ranges(table["m_ranges"])
    return table


@lru_cache(maxsize=1024)  # looked up at every layer of every step
def kernel_config(
    *,
    num_experts: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype | str,
    tokens: int,
    device_name: str | None = None,
    config_dir: Path = CONFIG_DIR,
) -> MoeKernelConfig:
    """Block sizes for ``tokens`` tokens through ``num_experts`` local experts of this shape: the
    device's tuned table when it has the shape, else the untuned default table."""
    key = shape_key(num_experts, inter, hidden, dtype)
    if device_name is not None:
        path = device_table_path(device_name, config_dir)
        if path.exists():
            for shape in _load(path).get("shapes", []):
                if {k: shape.get(k) for k in key} == key:
                    return select(shape["m_ranges"], tokens)
    return select(_load(config_dir / DEFAULT_TABLE.name)["m_ranges"], tokens)


def write_tuned(
    device_name: str,
    key: dict[str, Any],
    m_ranges: list[dict[str, Any]],
    provenance: dict[str, Any],
    config_dir: Path = CONFIG_DIR,
) -> Path:
    """Store tuned ranges for one shape in the device's table (replacing that shape's entry)."""
    check_ranges(m_ranges)
    path = device_table_path(device_name, config_dir)
    table = json.loads(path.read_text()) if path.exists() else {"device": device_name, "shapes": []}
    shapes = [s for s in table["shapes"] if {k: s.get(k) for k in key} != key]
    shapes.append({**key, **provenance, "m_ranges": m_ranges})
    table["shapes"] = sorted(shapes, key=lambda s: (s["E"], s["N"], s["K"], s["dtype"]))
    path.write_text(json.dumps(table, indent=1) + "\n")
    _load.cache_clear()
    kernel_config.cache_clear()
    return path
