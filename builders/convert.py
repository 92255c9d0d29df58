"""Hugging Face safetensors checkpoint -> TensorRT-LLM checkpoint (`config.json` + `rank{N}.safetensors`).

The layout is TensorRT-LLM's for its LLaMA model class, which serves Mistral, Mixtral and Llama
(`tensorrt_llm/models/llama/convert.py`, `docs/source/architecture/checkpoint.md`):

  transformer.vocab_embedding.weight           first pipeline stage, whole (no parallel embedding)
  transformer.layers.{i}.input_layernorm.weight / post_layernorm.weight
  transformer.layers.{i}.attention.qkv.weight  [q; k; v] of this rank's heads; KV heads copied to
                                               tp / num_kv_heads ranks when there are fewer than tp
  transformer.layers.{i}.attention.dense.weight  o_proj, split on its input dimension
  dense MLP: mlp.fc = gate_proj, mlp.gate = up_proj (split on dim 0), mlp.proj = down_proj (dim 1)
  MoE:       mlp.router.weight (float32, whole), mlp.fc.weight = [w3; w1] per expert stacked over this
             rank's experts [E_local, 2 * inter / moe_tp, hidden], mlp.proj.weight = stacked w2
  transformer.ln_f.weight, lm_head.weight      last pipeline stage; vocab padded to a multiple of tp
Layer indices `{i}` count from 0 within each pipeline stage.

Memory stays bounded whatever the checkpoint size: every output tensor is planned as a list of
slices of source tensors, read in chunks (each read opens the file anew so its memory map is
released) and written straight to its place in the rank file, whose header is computed up front.
The output directory appears only once complete.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from plateforme.builders.atomic import atomic_directory, check_replaceable
from plateforme.builders.engine_manifest import (
    FORMAT_VERSION,
    read_checkpoint_record,
    tokenizer_digest,
    write_checkpoint_record,
)
from plateforme.builders.mapping import Mapping, MappingError

ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_ST_SOURCE_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
DEFAULT_CHUNK_BYTES = 64 << 20


class ConversionError(ValueError):
    pass


# -- the source checkpoint --------------------------------------------------------------------
@dataclass
class SourceCheckpoint:
    """An HF checkpoint: its config and, per tensor, the file that holds it and its shape."""

    model_dir: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_embeddings: bool
    num_experts: int
    top_k: int
    files: dict[str, Path]
    shapes: dict[str, list[int]]
    source_dtypes: dict[str, str]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def expected_tensors(self) -> dict[str, list[int]]:
        """HF on-disk name -> shape, for every tensor the model needs."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        shapes = {"model.embed_tokens.weight": [self.vocab_size, h], "model.norm.weight": [h]}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = [self.vocab_size, h]
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            shapes.update({
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "self_attn.q_proj.weight": [q, h],
                p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h],
                p + "self_attn.o_proj.weight": [h, q],
            })
            if self.is_moe:
                shapes[p + "block_sparse_moe.gate.weight"] = [self.num_experts, h]
                for e in range(self.num_experts):
                    x = f"{p}block_sparse_moe.experts.{e}."
                    shapes.update({x + "w1.weight": [i, h], x + "w3.weight": [i, h], x + "w2.weight": [h, i]})
            else:
                shapes.update({
                    p + "mlp.gate_proj.weight": [i, h],
                    p + "mlp.up_proj.weight": [i, h],
                    p + "mlp.down_proj.weight": [h, i],
                })
        return shapes


def read_source(model_dir: str | Path) -> SourceCheckpoint:
    """Read and fully check an HF checkpoint's config and tensor headers (no tensor data)."""
    from plateforme.python_backend.model.args import ModelArgs
    from plateforme.python_backend.model.weights import checkpoint_files

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} does not exist or is not a directory")
    if not config_path.is_file():
        raise ConversionError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{config_path} is not valid JSON: {exc}") from None
    architectures = config.get("architectures") or []
    architecture = next((a for a in architectures if a in ARCHITECTURES), None)
    if architecture is None:
        raise ConversionError(
            f"unsupported architecture {architectures or 'none'} in {config_path}: "
            f"plateforme converts {', '.join(ARCHITECTURES)}"
        )
    try:
        args = ModelArgs.from_hf_config(config)
        files = checkpoint_files(model_dir)
    except ValueError as exc:
        raise ConversionError(f"{model_dir}: {exc}") from None

    shapes: dict[str, list[int]] = {}
    source_dtypes: dict[str, str] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        header = _safetensors_header(path)
        for name in names:
            if name not in header:
                raise ConversionError(f"{path.name} does not hold {name}, which its index names")
            shapes[name] = header[name]["shape"]
            source_dtypes[name] = header[name]["dtype"]

    source = SourceCheckpoint(
        model_dir=model_dir,
        architecture=architecture,
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        num_layers=args.n_layers,
        num_heads=args.n_heads,
        num_kv_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.hidden_dim,
        norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position_embeddings,
        sliding_window=args.sliding_window,
        tie_embeddings=args.tie_embeddings,
        num_experts=args.moe.num_experts if args.moe else 0,
        top_k=args.moe.num_experts_per_tok if args.moe else 0,
        files=files,
        shapes=shapes,
        source_dtypes=source_dtypes,
    )
    _check_tensors(source)
    return source


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise ConversionError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ConversionError(f"{path} is not a safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    data_bytes = path.stat().st_size - 8 - length
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ConversionError(f"{path} is not a safetensors file: its header has no valid data_offsets") from None
    if end > data_bytes:
        raise ConversionError(f"{path} is truncated: its header describes {end} bytes of tensors, the file holds "
                              f"{max(data_bytes, 0)}")
    return header


def _check_tensors(source: SourceCheckpoint) -> None:
    expected = source.expected_tensors()
    found = source.shapes

    def listing(names: list[str]) -> str:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return ", ".join(names[:5]) + more

    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(
            f"{source.model_dir} ({source.architecture}) lacks {len(missing)} tensor(s): {listing(missing)}"
        )
    # Old exports store RoPE frequencies; tied checkpoints may still store lm_head.
    ignorable = {n for n in found if n.endswith("rotary_emb.inv_freq")}
    if source.tie_embeddings:
        ignorable.add("lm_head.weight")
    unexpected = sorted(set(found) - set(expected) - ignorable)
    if unexpected:
        raise ConversionError(
            f"{source.model_dir} ({source.architecture}) has {len(unexpected)} unexpected tensor(s): "
            f"{listing(unexpected)}"
        )
    for name, shape in expected.items():
        if list(found[name]) != shape:
            raise ConversionError(f"tensor {name} has shape {list(found[name])}, expected {shape} from config.json")
        if source.source_dtypes[name] not in _ST_SOURCE_DTYPES:
            raise ConversionError(
                f"tensor {name} is stored as {source.source_dtypes[name]}; plateforme converts floating-point "
                f"checkpoints ({', '.join(_ST_SOURCE_DTYPES)}), not quantized ones"
            )


# -- the plan: what each rank file holds, as slices of source tensors --------------------------
@dataclass(frozen=True)
class Piece:
    """Rows [rows) and columns [cols) of a source tensor, or `rows` zero rows (source None)."""

    source: str | None
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None  # None: all columns (or a 1-D tensor)


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pad_vocab(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def plan_rank(source: SourceCheckpoint, mapping: Mapping, rank: int, dtype: torch.dtype) -> list[OutputTensor]:
    """The tensors of `rank{rank}.safetensors`, in file order."""
    pos = mapping.position(rank)
    tp, t = mapping.tp_size, pos.tp_rank
    h, hd, inter = source.hidden_size, source.head_dim, source.intermediate_size
    out: list[OutputTensor] = []

    def whole(name: str, src: str, dt: torch.dtype = dtype) -> None:
        shape = source.shapes[src]
        out.append(OutputTensor(name, dt, tuple(shape), [Piece(src, (0, shape[0]))]))

    def row_block(src: str, n: int, index: int) -> Piece:
        """Block `index` of `n` equal row blocks of `src`."""
        size = source.shapes[src][0] // n
        return Piece(src, (index * size, (index + 1) * size))

    def col_block(src: str, n: int, index: int) -> Piece:
        rows, cols = source.shapes[src]
        size = cols // n
        return Piece(src, (0, rows), (index * size, (index + 1) * size))

    if pos.pp_rank == 0:
        whole("transformer.vocab_embedding.weight", "model.embed_tokens.weight")

    q_local = source.num_heads // tp
    kv_local = max(1, source.num_kv_heads // tp)
    # With fewer KV heads than ranks, rank t uses KV head t // (tp / num_kv_heads).
    kv_head = t * source.num_kv_heads // tp
    for local, layer in enumerate(mapping.pp_layers(source.num_layers, pos.pp_rank)):
        hf, trt = f"model.layers.{layer}.", f"transformer.layers.{local}."
        whole(trt + "input_layernorm.weight", hf + "input_layernorm.weight")
        qkv = [row_block(hf + "self_attn.q_proj.weight", tp, t)]
        for proj in ("k_proj", "v_proj"):
            src = hf + f"self_attn.{proj}.weight"
            if source.num_kv_heads >= tp:
                qkv.append(row_block(src, tp, t))
            else:
                qkv.append(Piece(src, (kv_head * hd, (kv_head + 1) * hd)))
        out.append(OutputTensor(trt + "attention.qkv.weight", dtype, ((q_local + 2 * kv_local) * hd, h), qkv))
        out.append(OutputTensor(trt + "attention.dense.weight", dtype, (h, q_local * hd),
                                [col_block(hf + "self_attn.o_proj.weight", tp, t)]))
        whole(trt + "post_layernorm.weight", hf + "post_attention_layernorm.weight")
        if source.is_moe:
            moe = hf + "block_sparse_moe."
            whole(trt + "mlp.router.weight", moe + "gate.weight", torch.float32)  # never quantized
            experts = mapping.ep_experts(source.num_experts, pos.moe_ep_rank)
            m, mt = mapping.moe_tp_size, pos.moe_tp_rank
            fc, proj = [], []
            for e in experts:
                x = f"{moe}experts.{e}."
                # UP (w3) first, GATE (w1) second: TensorRT-LLM's swiglu applies SiLU to the second half.
                fc += [row_block(x + "w3.weight", m, mt), row_block(x + "w1.weight", m, mt)]
                proj.append(col_block(x + "w2.weight", m, mt))
            out.append(OutputTensor(trt + "mlp.fc.weight", dtype, (len(experts), 2 * inter // m, h), fc))
            out.append(OutputTensor(trt + "mlp.proj.weight", dtype, (len(experts), h, inter // m), proj))
        else:
            out.append(OutputTensor(trt + "mlp.fc.weight", dtype, (inter // tp, h),
                                    [row_block(hf + "mlp.gate_proj.weight", tp, t)]))
            out.append(OutputTensor(trt + "mlp.gate.weight", dtype, (inter // tp, h),
                                    [row_block(hf + "mlp.up_proj.weight", tp, t)]))
            out.append(OutputTensor(trt + "mlp.proj.weight", dtype, (h, inter // tp),
                                    [col_block(hf + "mlp.down_proj.weight", tp, t)]))

    if pos.pp_rank == mapping.pp_size - 1:
        whole("transformer.ln_f.weight", "model.norm.weight")
        head = "model.embed_tokens.weight" if source.tie_embeddings else "lm_head.weight"
        vocab, padded = source.vocab_size, pad_vocab(source.vocab_size, tp)
        rows = padded // tp
        start, stop = t * rows, (t + 1) * rows
        pieces = []
        if start < vocab:
            pieces.append(Piece(head, (start, min(stop, vocab))))
        if stop > vocab:
            pieces.append(Piece(None, (0, stop - max(start, vocab))))  # zero rows: padding
        out.append(OutputTensor("lm_head.weight", dtype, (rows, h), pieces))

    for tensor in out:
        covered = sum(_piece_numel(source, p, tensor.shape) for p in tensor.pieces)
        if covered != math.prod(tensor.shape):  # a planning bug, never bad input
            raise AssertionError(f"{tensor.name}: pieces cover {covered} of {math.prod(tensor.shape)} elements")
    return out


def _piece_numel(source: SourceCheckpoint, piece: Piece, out_shape: tuple[int, ...]) -> int:
    rows = piece.rows[1] - piece.rows[0]
    if piece.source is None:
        return rows * out_shape[-1]
    shape = source.shapes[piece.source]
    if len(shape) == 1:
        return rows
    cols = piece.cols[1] - piece.cols[0] if piece.cols else shape[1]
    return rows * cols


def checkpoint_config(source: SourceCheckpoint, mapping: Mapping, dtype: str) -> dict[str, Any]:
    """The checkpoint's config.json, as TensorRT-LLM's LLaMAConfig reads it."""
    config: dict[str, Any] = {
        "architecture": source.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": source.vocab_size,
        "max_position_embeddings": source.max_position_embeddings,
        "hidden_size": source.hidden_size,
        "num_hidden_layers": source.num_layers,
        "num_attention_heads": source.num_heads,
        "num_key_value_heads": source.num_kv_heads,
        "head_size": source.head_dim,
        "intermediate_size": source.intermediate_size,
        # TensorRT-LLM's MoE layer needs the gated activation named explicitly.
        "hidden_act": "swiglu" if source.is_moe else "silu",
        "norm_epsilon": source.norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": source.rope_theta,
        "rotary_scaling": None,
        "mapping": mapping.to_config(),
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mlp_bias": False,
        "attn_bias": False,
    }
    if source.is_moe:
        # normalization_mode 1 = RENORMALIZE: softmax, top-k, weights renormalised (Mixtral).
        config["moe"] = {"num_experts": source.num_experts, "top_k": source.top_k, "normalization_mode": 1}
    return config


# -- writing ----------------------------------------------------------------------------------
class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, tensor data in chunks.

    The header (names, dtypes, shapes, offsets) goes first, then each tensor's bytes in order;
    the file's SHA-256 is computed on the way.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor]):
        self.path = path
        self._sizes: list[tuple[str, int]] = []
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in tensors:
            if tensor.name in header:
                raise AssertionError(f"tensor {tensor.name} planned twice")
            header[tensor.name] = {
                "dtype": _ST_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            self._sizes.append((tensor.name, tensor.nbytes))
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._sha = hashlib.sha256()
        self._handle = open(path, "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self.size = 8 + len(raw) + offset

    def _emit(self, data) -> None:
        self._handle.write(data)
        self._sha.update(data)

    def write_tensor(self, name: str, chunks: Iterator[torch.Tensor]) -> None:
        expected_name, expected_bytes = self._sizes[self._next]
        if name != expected_name:
            raise AssertionError(f"writing {name}, but {expected_name} comes next")
        written = 0
        for chunk in chunks:
            data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
            self._emit(data)
            written += data.nbytes
        if written != expected_bytes:
            raise AssertionError(f"{name}: wrote {written} bytes, planned {expected_bytes}")
        self._next += 1

    def close(self) -> str:
        """Flush to disk and return the file's SHA-256 (hex)."""
        if self._next != len(self._sizes):
            raise AssertionError(f"{self.path.name}: {len(self._sizes) - self._next} tensor(s) not written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._handle.close()


def _read_chunks(
    source: SourceCheckpoint, piece: Piece, width: int, dtype: torch.dtype, chunk_bytes: int
) -> Iterator[torch.Tensor]:
    """The rows of `piece` converted to `dtype`, a bounded number of rows at a time."""
    first, last = piece.rows
    one_dim = piece.source is not None and len(source.shapes[piece.source]) == 1
    # Up to 8 bytes per element: the source read plus its converted copy.
    step = max(1, chunk_bytes // (8 if one_dim else 8 * width))
    if piece.source is None:
        for start in range(first, last, step):
            yield torch.zeros((min(step, last - start), width), dtype=dtype)
        return
    path = source.files[piece.source]
    for start in range(first, last, step):
        stop = min(start + step, last)
        # A fresh handle per read: the memory map, and the page-cache pages it pins, go with it.
        with safe_open(path, framework="pt") as handle:
            tensor_slice = handle.get_slice(piece.source)
            if piece.cols is None:
                chunk = tensor_slice[start:stop]
            else:
                chunk = tensor_slice[start:stop, piece.cols[0]:piece.cols[1]]
        yield chunk.to(dtype)
        del chunk


# -- the conversion ---------------------------------------------------------------------------
@dataclass
class ConversionResult:
    out_dir: Path
    architecture: str
    dtype: str
    mapping: Mapping
    files: dict[str, int]  # file name -> bytes
    sliding_window: int | None


def _check_out_dir(out_dir: Path, model_dir: Path) -> None:
    if model_dir.resolve() in out_dir.resolve().parents:
        raise ConversionError(f"output directory {out_dir} must not be inside the source checkpoint")
    check_replaceable(out_dir, lambda out: read_checkpoint_record(out) is not None,
                      "checkpoint written by plateforme convert", [model_dir], ConversionError)


def convert_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    mapping: Mapping | None = None,
    progress: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ConversionResult:
    """Convert the HF checkpoint in `model_dir` into a TensorRT-LLM checkpoint in `out_dir`
    (replaced atomically: a failed conversion leaves nothing, or the previous checkpoint)."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    mapping = mapping or Mapping()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source = read_source(model_dir)
    mapping.check_model(
        num_layers=source.num_layers,
        num_heads=source.num_heads,
        num_kv_heads=source.num_kv_heads,
        intermediate_size=source.intermediate_size,
        num_experts=source.num_experts,
        architecture=source.architecture,
    )
    _check_out_dir(out_dir, model_dir)
    torch_dtype = DTYPES[dtype]
    plans = [plan_rank(source, mapping, rank, torch_dtype) for rank in range(mapping.world_size)]
    total = sum(t.nbytes for plan in plans for t in plan)

    files: dict[str, dict[str, Any]] = {}
    with atomic_directory(out_dir) as tmp, _progress(progress, total) as advance:
        for rank, plan in enumerate(plans):
            name = f"rank{rank}.safetensors"
            writer = SafetensorsWriter(tmp / name, plan)
            try:
                for tensor in plan:
                    advance(0, f"{name} {tensor.name}")
                    width = tensor.shape[-1]
                    writer.write_tensor(tensor.name, _tracked(
                        (chunk for piece in tensor.pieces
                         for chunk in _read_chunks(source, piece, width, tensor.dtype, chunk_bytes)),
                        advance,
                    ))
                files[name] = {"size": writer.size, "sha256": writer.close()}
            except BaseException:
                writer.abort()
                raise
        config_text = json.dumps(checkpoint_config(source, mapping, dtype), indent=2) + "\n"
        (tmp / "config.json").write_text(config_text)
        files["config.json"] = {"size": len(config_text.encode()),
                                "sha256": hashlib.sha256(config_text.encode()).hexdigest()}
        write_checkpoint_record(tmp, {
            "format_version": FORMAT_VERSION,
            "source": {
                "dir": str(model_dir.absolute()),
                "architecture": source.architecture,
                "max_position_embeddings": source.max_position_embeddings,
                "sliding_window": source.sliding_window,
            },
            "tokenizer": {"dir": str(model_dir.absolute()), "digest": tokenizer_digest(model_dir)},
            "dtype": dtype,
            "mapping": mapping.to_config(),
            "files": files,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return ConversionResult(
        out_dir=out_dir,
        architecture=source.architecture,
        dtype=dtype,
        mapping=mapping,
        files={name: info["size"] for name, info in files.items()},
        sliding_window=source.sliding_window,
    )


def _tracked(chunks: Iterator[torch.Tensor], advance: Callable[[int, str | None], None]) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        yield chunk
        advance(chunk.numel() * chunk.element_size(), None)


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[int, str | None], None]]:
    """A byte-counting progress bar; `advance(bytes, description)`."""
    if not show:
        yield lambda n, description: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("converting", total=total)

        def advance(n: int, description: str | None) -> None:
            if description is not None:
                bar.update(task, description=description[:60])
            if n:
                bar.update(task, advance=n)

        yield advance


def read_checkpoint_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A TensorRT-LLM checkpoint's config.json, checked for the fields builds rely on."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{checkpoint_dir} has no config.json: not a TensorRT-LLM checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None
    for key in ("architecture", "dtype", "vocab_size", "num_hidden_layers"):
        if key not in config:
            raise ConversionError(f"{path} lacks {key!r}: not a TensorRT-LLM checkpoint config")
    try:
        mapping = Mapping.from_config(config.get("mapping") or {})
    except MappingError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    missing = [f"rank{r}.safetensors" for r in range(mapping.world_size)
               if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise ConversionError(f"{checkpoint_dir} lacks {', '.join(missing)} for world size {mapping.world_size}")
    return config

