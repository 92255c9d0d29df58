"""What an engine was built from and with, and the checks that keep a mismatched engine from being served.

Two records:
- `plateforme-checkpoint.json`, written by `plateforme convert` beside a TensorRT-LLM checkpoint:
  its source, the digests of its files and of the source's tokenizer, Mistral's sliding window.
- `plateforme-engine.json`, written by `plateforme build` beside an engine: TensorRT-LLM and
  TensorRT versions, the trtllm-build command and flags, checkpoint and tokenizer digests, GPU name.

TensorRT engines only load in the TensorRT-LLM version that built them, and an engine knows nothing
of the tokenizer in front of it: `check_engine` refuses both mismatches at render and serve time,
naming what to rebuild.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from plateforme.builders.atomic import atomic_write_text

CHECKPOINT_RECORD = "plateforme-checkpoint.json"
# Written by `plateforme repo` beside the models: what was rendered from where (and the MPI launch).
RENDER_RECORD = "plateforme.json"
ENGINE_MANIFEST = "plateforme-engine.json"
ENGINE_CONFIG = "config.json"  # written by trtllm-build
FORMAT_VERSION = 1
# Files that define a tokenizer's vocabulary (not its chat template or other settings).
_VOCABULARY_FILE = re.compile(
    r"(tokenizer\.json|tokenizer\.model|.+\.model\.v\d+(m\d+)?|tekken\.json|vocab\.json|merges\.txt|vocab\.txt)"
)
_CHUNK = 16 << 20


class EngineCheckError(ValueError):
    """The engine cannot be served as asked; the message says what to rebuild."""


# -- digests ----------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _combine(entries: dict[str, str]) -> str:
    """One digest for a set of named file digests, independent of listing order."""
    text = "\n".join(f"{name} {entries[name]}" for name in sorted(entries))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def tokenizer_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_file() and _VOCABULARY_FILE.fullmatch(p.name))


def tokenizer_digest(model_dir: str | Path) -> str | None:
    """Digest of the vocabulary files in `model_dir`; None when it holds none."""
    files = tokenizer_files(model_dir)
    return _combine({p.name: sha256_file(p) for p in files}) if files else None


def checkpoint_digest(checkpoint_dir: str | Path) -> str:
    """Digest of a TensorRT-LLM checkpoint (config.json and rank files).

    Uses the file digests `plateforme convert` recorded while writing when the files still have the
    recorded sizes; hashes the files otherwise (checkpoints written by other tools).
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = [checkpoint_dir / "config.json", *sorted(checkpoint_dir.glob("rank*.safetensors"))]
    record = read_checkpoint_record(checkpoint_dir)
    recorded = (record or {}).get("files", {})
    entries = {}
    for path in files:
        known = recorded.get(path.name)
        if isinstance(known, dict) and known.get("size") == path.stat().st_size and known.get("sha256"):
            entries[path.name] = known["sha256"]
        else:
            entries[path.name] = sha256_file(path)
    return _combine(entries)


# -- checkpoint record ------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def write_checkpoint_record(checkpoint_dir: str | Path, record: dict[str, Any]) -> None:
    _write_json(Path(checkpoint_dir) / CHECKPOINT_RECORD, record)


def read_checkpoint_record(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / CHECKPOINT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise EngineCheckError(f"{path} is not valid JSON: {exc}") from None
    return record if isinstance(record, dict) else None


# -- engine manifest --------------------------------------------------------------------------
@dataclass
class EngineManifest:
    tensorrt_llm_version: str
    tensorrt_version: str
    gpu: str
    command: list[str]  # the trtllm-build command line
    flags: dict[str, Any]  # the build profile, overrides applied
    checkpoint: dict[str, Any]  # dir, digest, architecture, dtype, vocab_size, mapping, ...
    tokenizer: dict[str, Any]  # dir and digest of the tokenizer the checkpoint came with (may be null)
    sliding_window: int | None
    created: str
    engine_dir: str  # where it was built
    format_version: int = FORMAT_VERSION

    def rebuild_hint(self) -> str:
        """The `plateforme build` command that rebuilds this engine with the same settings."""
        args = ["plateforme", "build", str(self.checkpoint.get("dir")), self.engine_dir]
        for flag in ("profile", "max_batch_size", "max_input_len", "max_output_len", "max_num_tokens"):
            if self.flags.get(flag) is not None:
                args += ["--" + flag.replace("_", "-"), str(self.flags[flag])]
        return shlex.join(args)


def write_engine_manifest(engine_dir: str | Path, manifest: EngineManifest) -> Path:
    return _write_json(Path(engine_dir) / ENGINE_MANIFEST, asdict(manifest))


def read_engine_manifest(engine_dir: str | Path) -> EngineManifest | None:
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EngineCheckError(f"{path} is not valid JSON ({exc}): rebuild the engine") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise EngineCheckError(f"{path} has format_version {version!r}; this plateforme reads {FORMAT_VERSION}: "
                               "rebuild the engine with `plateforme build`")
    try:
        return EngineManifest(**data)
    except TypeError as exc:
        raise EngineCheckError(f"{path} is not a valid build manifest ({exc}): rebuild the engine") from None


# -- installed toolchain ----------------------------------------------------------------------
def installed_version(*distributions: str) -> str | None:
    """Version of the first installed distribution among `distributions`, without importing it."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_trtllm_version() -> str | None:
    return installed_version("tensorrt_llm", "tensorrt-llm")


def installed_tensorrt_version() -> str | None:
    # NVIDIA ships the TensorRT Python bindings under several distribution names.
    return installed_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings",
                             "tensorrt-cu13-bindings")


# -- what an engine directory says about itself -----------------------------------------------
@dataclass(frozen=True)
class EngineFacts:
    engine_dir: Path
    tensorrt_llm_version: str | None
    vocab_size: int
    world_size: int
    sliding_window: int | None
    max_batch_size: int | None
    max_seq_len: int | None
    tokenizer_digest: str | None
    manifest: EngineManifest | None

    def rebuild_hint(self) -> str:
        return self.manifest.rebuild_hint() if self.manifest is not None else _rebuild_from_scratch(self.engine_dir)


def _rebuild_from_scratch(engine_dir: Path) -> str:
    return f"plateforme convert HF_DIR CHECKPOINT_DIR && plateforme build CHECKPOINT_DIR {engine_dir}"


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_engine(engine_dir: str | Path) -> EngineFacts:
    """Facts of an engine directory: from plateforme's build manifest and trtllm-build's config.json
    (an engine built without plateforme has only the latter)."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineCheckError(f"engine directory {engine_dir} does not exist")
    manifest = read_engine_manifest(engine_dir)
    engine_config: dict[str, Any] = {}
    config_path = engine_dir / ENGINE_CONFIG
    if config_path.is_file():
        try:
            engine_config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise EngineCheckError(f"{config_path} is not valid JSON: {exc}") from None
    if manifest is None and not engine_config:
        raise EngineCheckError(
            f"{engine_dir} is not a TensorRT-LLM engine directory: it has neither {ENGINE_MANIFEST} "
            f"(plateforme build) nor {ENGINE_CONFIG} (trtllm-build)"
        )
    pretrained = engine_config.get("pretrained_config") or {}
    build = engine_config.get("build_config") or {}
    engine_version = engine_config.get("version")
    if manifest is not None:
        if engine_version and engine_version != manifest.tensorrt_llm_version:
            raise EngineCheckError(
                f"{engine_dir}: {ENGINE_CONFIG} says TensorRT-LLM {engine_version} but {ENGINE_MANIFEST} says "
                f"{manifest.tensorrt_llm_version}: the directory mixes two builds; rebuild it: "
                f"{manifest.rebuild_hint()}"
            )
        checkpoint, flags = manifest.checkpoint, manifest.flags
        vocab_size = checkpoint.get("vocab_size")
        world_size = (checkpoint.get("mapping") or {}).get("world_size", 1)
        _check_rank_engines(engine_dir, world_size, manifest.rebuild_hint())
        return EngineFacts(
            engine_dir=engine_dir,
            tensorrt_llm_version=manifest.tensorrt_llm_version,
            vocab_size=vocab_size,
            world_size=world_size,
            sliding_window=_positive_int(manifest.sliding_window),
            max_batch_size=_positive_int(flags.get("max_batch_size")),
            max_seq_len=_positive_int(flags.get("max_seq_len")),
            tokenizer_digest=(manifest.tokenizer or {}).get("digest"),
            manifest=manifest,
        )
    mapping = pretrained.get("mapping") or {}
    vocab_size = pretrained.get("vocab_size")
    if not _positive_int(vocab_size):
        raise EngineCheckError(f"{config_path} has no pretrained_config.vocab_size: not a trtllm-build engine config")
    world_size = _positive_int(mapping.get("world_size")) or 1
    _check_rank_engines(engine_dir, world_size, _rebuild_from_scratch(engine_dir))
    return EngineFacts(
        engine_dir=engine_dir,
        tensorrt_llm_version=engine_version,
        vocab_size=vocab_size,
        world_size=world_size,
        sliding_window=None,
        max_batch_size=_positive_int(build.get("max_batch_size")),
        max_seq_len=_positive_int(build.get("max_seq_len")),
        tokenizer_digest=None,
        manifest=None,
    )


def _check_rank_engines(engine_dir: Path, world_size: int, rebuild: str) -> None:
    missing = [f"rank{r}.engine" for r in range(world_size) if not (engine_dir / f"rank{r}.engine").is_file()]
    if missing:
        raise EngineCheckError(
            f"{engine_dir} lacks {', '.join(missing)} of its {world_size} rank(s): an incomplete engine; rebuild it: "
            f"{rebuild}"
        )


def check_engine(
    engine_dir: str | Path, tokenizer_dir: str | Path, trtllm_version: str | None
) -> EngineFacts:
    """Refuse an engine built by another TensorRT-LLM than `trtllm_version` (None: not installed
    here, nothing to compare), or whose vocabulary does not match the tokenizer in `tokenizer_dir`."""
    facts = read_engine(engine_dir)
    if trtllm_version is not None and facts.tensorrt_llm_version != trtllm_version:
        built = facts.tensorrt_llm_version or "an unrecorded version"
        raise EngineCheckError(
            f"engine {facts.engine_dir} was built by TensorRT-LLM {built}, but TensorRT-LLM {trtllm_version} is "
            f"installed; TensorRT engines only load in the version that built them. Rebuild the engine with "
            f"the installed TensorRT-LLM: {facts.rebuild_hint()}"
        )
    from plateforme.python_backend.tokenization import load_tokenizer

    tokenizer_vocab = load_tokenizer(tokenizer_dir).vocab_size
    if tokenizer_vocab > facts.vocab_size:
        raise EngineCheckError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer_vocab} tokens but engine {facts.engine_dir} has a "
            f"vocabulary of {facts.vocab_size}: they come from different models. Serve the tokenizer of the "
            f"checkpoint the engine was converted from, or rebuild the engine from this one: "
            f"{facts.rebuild_hint()}"
        )
    if facts.tokenizer_digest is not None:
        found = tokenizer_digest(tokenizer_dir)
        if found != facts.tokenizer_digest:
            source = (facts.manifest.tokenizer or {}).get("dir") if facts.manifest else None
            raise EngineCheckError(
                f"the tokenizer in {tokenizer_dir} is not the one engine {facts.engine_dir} was converted with "
                f"({source or 'recorded digest'}: {facts.tokenizer_digest}, here: {found}). Serve that tokenizer, "
                f"or convert and rebuild from {tokenizer_dir}: plateforme convert {tokenizer_dir} CHECKPOINT_DIR "
                f"&& {facts.rebuild_hint()}"
            )
    return facts


def check_repository_engines(repository: str | Path, trtllm_version: str | None = None) -> list[EngineFacts]:
    """Serve-time check of every TensorRT-LLM endpoint of a rendered repository against the
    TensorRT-LLM installed here (or `trtllm_version`)."""
    path = Path(repository) / RENDER_RECORD
    if not path.is_file():
        return []  # not rendered by plateforme: nothing recorded to check
    manifest = json.loads(path.read_text())
    version = trtllm_version if trtllm_version is not None else installed_trtllm_version()
    checked = []
    for name, endpoint in (manifest.get("chat") or {}).items():
        if endpoint.get("engine") != "tensorrtllm":
            continue
        if "engine_dir" not in endpoint:
            raise EngineCheckError(f"endpoint {name}: {path} does not record its engine directory; render the "
                                   "repository again with plateforme repo")
        try:
            checked.append(check_engine(endpoint["engine_dir"], endpoint["model_dir"], version))
        except EngineCheckError as exc:
            raise EngineCheckError(f"endpoint {name}: {exc}") from None
    return checked
