"""Integrity of a checkpoint's safetensors files, checked before anything is built from them.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor) and the tensor bytes. A truncated download, a file cut by a full disk or a
damaged header shows up here as a header that does not parse, byte ranges that overlap, leave gaps
or run past the end of the file, or sizes that do not match dtype x shape. Weights are then read
tensor by tensor: NaN or infinite values in a released checkpoint mean damaged bytes.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 << 20


class IntegrityError(ValueError):
    """A checkpoint file is damaged; the message names the file and what is wrong."""


@dataclass(frozen=True)
class FileReport:
    name: str
    size: int
    tensors: int
    dtypes: tuple[str, ...]


def check_safetensors(path: Path, check_values: bool = True) -> FileReport:
    """Check one file's header against its size, then (check_values) that every float is finite."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise IntegrityError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise IntegrityError(f"{path}: header length {length} does not fit in the file's {size} bytes "
                                 "(truncated or not a safetensors file)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            raise IntegrityError(f"{path}: the safetensors header is not valid JSON ({exc}): the file is damaged")
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: the safetensors header is not a JSON object: the file is damaged")
    header.pop("__metadata__", None)
    ranges = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{path}: tensor {name!r} has no dtype/shape/data_offsets: the header is damaged")
        if dtype not in ITEM_SIZES:
            raise IntegrityError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * ITEM_SIZES[dtype]
        if end - start != expected:
            raise IntegrityError(f"{path}: tensor {name!r} ({dtype} {shape}) spans {end - start} bytes, "
                                 f"expected {expected}")
        ranges.append((start, end, name))
    position = 0
    for start, end, name in sorted(ranges):
        if start != position:
            raise IntegrityError(f"{path}: tensor {name!r} starts at byte {start}, expected {position} "
                                 "(overlapping or missing data): the header is damaged")
        position = end
    data_size = size - 8 - length
    if position != data_size:
        state = "truncated" if data_size < position else "longer than its header says"
        raise IntegrityError(f"{path}: the header declares {position} bytes of tensor data but the file holds "
                             f"{data_size}: the file is {state}")
    if check_values:
        _check_finite(path, [name for _, _, name in sorted(ranges) if header[name]["dtype"] in FLOAT_DTYPES])
    return FileReport(path.name, size, len(ranges), tuple(sorted({header[n]["dtype"] for _, _, n in ranges})))


def _check_finite(path: Path, names: list[str]) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        for name in names:
            tensor = handle.get_tensor(name)
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise IntegrityError(f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s): "
                                     "the weights are damaged")


def check_checkpoint_files(model_dir: Path, check_values: bool = True) -> list[FileReport]:
    """Every safetensors file of an HF checkpoint directory; the index, when there is one, must name
    only files that exist and tensors they hold."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise IntegrityError(f"{model_dir} holds no .safetensors file (plateforme builds from safetensors "
                             "checkpoints only)")
    reports = [check_safetensors(path, check_values) for path in files]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{index}: not a valid safetensors index ({exc})") from None
        missing = sorted({shard for shard in weight_map.values() if not (model_dir / shard).is_file()})
        if missing:
            raise IntegrityError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    return reports
