"""Build profiles -> the exact `trtllm-build` command; run it where TensorRT-LLM is installed.

`trtllm-build` (tensorrt_llm/commands/build.py) turns a TensorRT-LLM checkpoint into one engine per
rank plus a config.json. Plugin options take a dtype or `disable`, feature options `enable` /
`disable`. Plateforme resolves `auto` plugin dtypes to the checkpoint's dtype so the command means
the same to every TensorRT-LLM version that reads it.

The engine directory appears only when complete, with `plateforme-engine.json` (engine_manifest)
beside the engines. Without TensorRT-LLM, `build_engine` says which piece is missing;
`dry_run=True` only returns the command.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plateforme.builders.atomic import atomic_directory, check_replaceable
from plateforme.builders.engine_manifest import (
    ENGINE_CONFIG,
    ENGINE_MANIFEST,
    EngineManifest,
    checkpoint_digest,
    installed_tensorrt_version,
    installed_trtllm_version,
    read_checkpoint_record,
    tokenizer_digest,
    write_engine_manifest,
)
from plateforme.builders.mapping import Mapping

MOE_PLUGINS = ("builtin", "custom", "none")
PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32", "disable")
INSTALL_HINT = (
    "install it where TensorRT-LLM runs (Linux with an NVIDIA GPU, Python 3.10 or 3.12): "
    "pip install 'plateforme[tensorrt-llm]' --extra-index-url https://pypi.nvidia.com, or use NVIDIA's "
    "TensorRT-LLM container; `plateforme build --dry-run` prints the command without running it"
)


class BuildError(ValueError):
    pass


@dataclass(frozen=True)
class BuildProfile:
    """What one endpoint's engine is built for."""

    name: str
    max_batch_size: int = 64
    max_input_len: int = 6144
    max_output_len: int = 2048
    max_num_tokens: int = 8192  # tokens per engine step, all requests together
    max_beam_width: int = 1
    paged_kv_cache: bool = True
    context_fmha: bool = True
    paged_context_fmha: bool = True
    remove_input_padding: bool = True
    gemm_plugin: str = "auto"
    gpt_attention_plugin: str = "auto"
    # builtin: TensorRT-LLM's MoE plugin; custom: plateforme's (builders/moe_plugin.py), through a
    # TensorRT-LLM model class given to trtllm-build; none: TensorRT-LLM's plugin-free MoE layers.
    moe_plugin: str = "builtin"
    workers: int = 1

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    def with_overrides(self, **values: Any) -> BuildProfile:
        """This profile with the given non-None values replaced."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def check(self, checkpoint: dict[str, Any]) -> None:
        """Raise BuildError for settings trtllm-build would reject or the checkpoint cannot serve."""
        for field in ("max_batch_size", "max_input_len", "max_output_len", "max_num_tokens", "max_beam_width",
                      "workers"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BuildError(f"profile {self.name}: {field} must be a positive integer, got {value!r}")
        for field in ("gemm_plugin", "gpt_attention_plugin"):
            if getattr(self, field) not in PLUGIN_DTYPES:
                raise BuildError(f"profile {self.name}: {field} must be one of {', '.join(PLUGIN_DTYPES)}")
        if self.moe_plugin not in MOE_PLUGINS:
            raise BuildError(f"profile {self.name}: moe_plugin must be one of {', '.join(MOE_PLUGINS)}")
        context = checkpoint.get("max_position_embeddings")
        if context and self.max_seq_len > context:
            raise BuildError(
                f"profile {self.name}: max_input_len + max_output_len = {self.max_seq_len} exceeds the model's "
                f"context of {context} tokens (max_position_embeddings); lower --max-input-len/--max-output-len"
            )
        if self.max_num_tokens < self.max_input_len:
            raise BuildError(
                f"profile {self.name}: max_num_tokens ({self.max_num_tokens}) must be at least max_input_len "
                f"({self.max_input_len}): a whole prompt is processed in one engine step"
            )
        if self.gpt_attention_plugin == "disable" and (
            self.paged_kv_cache or self.remove_input_padding or self.context_fmha
        ):
            raise BuildError(
                f"profile {self.name}: paged KV cache, remove_input_padding and context FMHA need the GPT "
                "attention plugin; enable it or disable them"
            )
        if self.paged_context_fmha and not (self.context_fmha and self.paged_kv_cache):
            raise BuildError(f"profile {self.name}: paged context FMHA needs context FMHA and the paged KV cache")
        world = Mapping.from_config(checkpoint.get("mapping") or {}).world_size
        if self.workers > world:
            raise BuildError(f"profile {self.name}: {self.workers} workers for a checkpoint of {world} rank(s)")


# Mistral's La Plateforme endpoints, on the GPUs of their README section.
PROFILES = {
    "mistral-tiny": BuildProfile("mistral-tiny"),  # Mistral 7B Instruct
    "mistral-small": BuildProfile("mistral-small"),  # Mixtral 8x7B Instruct
    "mistral-medium": BuildProfile("mistral-medium", max_batch_size=32),  # Mixtral 8x22B class
}


def default_profile(checkpoint: dict[str, Any]) -> str:
    """The profile of the endpoint such a checkpoint usually serves."""
    return "mistral-small" if _is_moe(checkpoint) else "mistral-tiny"


def _is_moe(checkpoint: dict[str, Any]) -> bool:
    return (checkpoint.get("moe") or {}).get("num_experts", 0) > 1


def _switch(enabled: bool) -> str:
    return "enable" if enabled else "disable"


def trtllm_build_command(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    profile: BuildProfile,
    checkpoint: dict[str, Any],
    executable: str = "trtllm-build",
) -> list[str]:
    """The trtllm-build argv for this profile and checkpoint config."""
    profile.check(checkpoint)

    def plugin(value: str) -> str:
        return checkpoint["dtype"] if value == "auto" else value

    command = [
        executable,
        "--checkpoint_dir", str(Path(checkpoint_dir).absolute()),
        "--output_dir", str(Path(output_dir).absolute()),
        "--max_batch_size", str(profile.max_batch_size),
        "--max_input_len", str(profile.max_input_len),
        "--max_seq_len", str(profile.max_seq_len),
        "--max_num_tokens", str(profile.max_num_tokens),
        "--max_beam_width", str(profile.max_beam_width),
        "--kv_cache_type", "paged" if profile.paged_kv_cache else "continuous",
        "--gpt_attention_plugin", plugin(profile.gpt_attention_plugin),
        "--gemm_plugin", plugin(profile.gemm_plugin),
        "--context_fmha", _switch(profile.context_fmha),
        "--use_paged_context_fmha", _switch(profile.paged_context_fmha),
        "--remove_input_padding", _switch(profile.remove_input_padding),
    ]
    if profile.moe_plugin == "custom" and not _is_moe(checkpoint):
        raise BuildError(f"--moe-plugin custom is for MoE checkpoints; {checkpoint_dir} is a dense one")
    if _is_moe(checkpoint):
        if profile.moe_plugin == "custom":
            command += _custom_moe_args(checkpoint)
        else:
            command += ["--moe_plugin", checkpoint["dtype"] if profile.moe_plugin == "builtin" else "disable"]
    if profile.workers > 1:
        command += ["--workers", str(profile.workers)]
    return command


def _custom_moe_args(checkpoint: dict[str, Any]) -> list[str]:
    """trtllm-build arguments selecting plateforme's MoE plugin, after checking every rank can use it."""
    try:
        from plateforme.builders.moe_plugin import custom_moe_build_args, fields_for_rank
    except ImportError as exc:
        message = f"--moe-plugin custom needs plateforme's MoE plugin, which cannot be loaded here: {exc}"
        raise BuildError(message) from None
    world = Mapping.from_config(checkpoint.get("mapping") or {}).world_size
    try:
        for rank in range(world):
            fields_for_rank(checkpoint, rank)
        return custom_moe_build_args(checkpoint["dtype"])
    except ValueError as exc:
        raise BuildError(f"--moe-plugin custom: {exc}") from None


# -- the toolchain ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Toolchain:
    trtllm_build: str
    tensorrt_llm_version: str
    tensorrt_version: str
    gpu: str


def gpu_name() -> str | None:
    """The visible NVIDIA GPUs, e.g. 'NVIDIA H100 80GB HBM3 x2'; None when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not names:
        return None
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{names[0]} x{len(names)}"
    return ", ".join(names)


def detect_toolchain() -> Toolchain:
    """TensorRT-LLM, TensorRT, trtllm-build and a GPU, or a BuildError naming the missing piece."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise BuildError(f"TensorRT-LLM is not installed (the Python package tensorrt_llm cannot be imported): "
                         f"{INSTALL_HINT}")
    trtllm_version = installed_trtllm_version()
    if trtllm_version is None:
        raise BuildError("the tensorrt_llm package has no installed distribution metadata, so the engine's "
                         f"TensorRT-LLM version cannot be recorded: reinstall it; {INSTALL_HINT}")
    tensorrt_version = installed_tensorrt_version()
    if tensorrt_version is None:
        raise BuildError(f"TensorRT (the Python package tensorrt), which TensorRT-LLM {trtllm_version} needs, "
                         f"is not installed: {INSTALL_HINT}")
    executable = shutil.which("trtllm-build")
    if executable is None:
        raise BuildError("the trtllm-build command is not on PATH; it is installed with the tensorrt_llm package "
                         "(add its environment's bin directory to PATH)")
    gpu = gpu_name()
    if gpu is None:
        raise BuildError("no NVIDIA GPU is visible (nvidia-smi is missing or lists none): trtllm-build builds on "
                         "the kind of GPU the engine will run on")
    return Toolchain(executable, trtllm_version, tensorrt_version, gpu)


# -- the build --------------------------------------------------------------------------------
@dataclass
class BuildResult:
    command: list[str]
    engine_dir: Path
    manifest: EngineManifest | None  # None for a dry run


def _check_engine_dir(engine_dir: Path, inputs: list[Path]) -> None:
    """`inputs`: the checkpoint directory first, then any other directory the build reads."""
    if inputs[0].resolve() in engine_dir.resolve().parents:
        raise BuildError(f"engine directory {engine_dir} must not be inside the checkpoint directory")
    check_replaceable(engine_dir, _holds_engine, "TensorRT-LLM engine", inputs, BuildError)


def _check_recorded_sizes(checkpoint_dir: Path, record: dict) -> None:
    """The files `plateforme convert` wrote are all there with their sizes (a cheap check of a copy)."""
    for name, entry in (record.get("files") or {}).items():
        path = checkpoint_dir / name
        size = path.stat().st_size if path.is_file() else None
        if isinstance(entry, dict) and entry.get("size") != size:
            found = "is missing" if size is None else f"has {size} bytes"
            raise BuildError(f"{path} {found}; plateforme convert wrote {entry.get('size')}: the checkpoint changed "
                             "since it was converted, convert it again")


def _holds_engine(directory: Path) -> bool:
    """A previous build: ours (with its manifest) or trtllm-build's own (its config and rank engines)."""
    return (directory / ENGINE_MANIFEST).is_file() or (
        (directory / ENGINE_CONFIG).is_file() and any(directory.glob("rank*.engine")))


def build_engine(
    checkpoint_dir: str | Path,
    engine_dir: str | Path,
    profile: BuildProfile,
    tokenizer_dir: str | Path | None = None,
    dry_run: bool = False,
    run: Callable[[Sequence[str]], int] | None = None,
) -> BuildResult:
    """Build the engine for `checkpoint_dir` into `engine_dir` (replaced atomically on success)."""
    from plateforme.builders.convert import read_checkpoint_config

    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    checkpoint = read_checkpoint_config(checkpoint_dir)
    command = trtllm_build_command(checkpoint_dir, engine_dir, profile, checkpoint)
    _check_engine_dir(engine_dir, [checkpoint_dir] + ([Path(tokenizer_dir)] if tokenizer_dir is not None else []))
    record = read_checkpoint_record(checkpoint_dir) or {}
    _check_recorded_sizes(checkpoint_dir, record)
    if dry_run:
        return BuildResult(command, engine_dir, None)
    toolchain = detect_toolchain()
    if tokenizer_dir is not None:
        tokenizer = {"dir": str(Path(tokenizer_dir).absolute()), "digest": tokenizer_digest(tokenizer_dir)}
        if tokenizer["digest"] is None:
            raise BuildError(f"no tokenizer files in {tokenizer_dir}")
    else:
        tokenizer = record.get("tokenizer") or {"dir": None, "digest": None}
    digest = checkpoint_digest(checkpoint_dir)
    mapping = Mapping.from_config(checkpoint["mapping"])
    run = run or (lambda argv: subprocess.run(list(argv)).returncode)

    with atomic_directory(engine_dir) as tmp:
        argv = trtllm_build_command(checkpoint_dir, tmp, profile, checkpoint, executable=toolchain.trtllm_build)
        status = run(argv)
        if status != 0:
            raise BuildError(f"trtllm-build failed with exit status {status}; {engine_dir} was left as it was")
        engines = [tmp / f"rank{r}.engine" for r in range(mapping.world_size)]
        missing = [p.name for p in engines if not p.is_file()]
        if missing or not (tmp / ENGINE_CONFIG).is_file():
            raise BuildError(f"trtllm-build exited successfully but did not write {ENGINE_CONFIG} and "
                             f"{', '.join(p.name for p in engines)} (missing: {', '.join(missing) or ENGINE_CONFIG})")
        built_by = json.loads((tmp / ENGINE_CONFIG).read_text()).get("version")
        if built_by != toolchain.tensorrt_llm_version:
            raise BuildError(f"trtllm-build reports TensorRT-LLM {built_by}, but the installed package is "
                             f"{toolchain.tensorrt_llm_version}: PATH and the Python environment disagree")
        manifest = EngineManifest(
            tensorrt_llm_version=toolchain.tensorrt_llm_version,
            tensorrt_version=toolchain.tensorrt_version,
            gpu=toolchain.gpu,
            command=command,
            flags={"profile": profile.name, **{k: v for k, v in dataclasses.asdict(profile).items() if k != "name"},
                   "max_seq_len": profile.max_seq_len},
            checkpoint={
                "dir": str(checkpoint_dir.absolute()),
                "digest": digest,
                "architecture": checkpoint["architecture"],
                "dtype": checkpoint["dtype"],
                "vocab_size": checkpoint["vocab_size"],
                "max_position_embeddings": checkpoint.get("max_position_embeddings"),
                "mapping": mapping.to_config(),
            },
            tokenizer=tokenizer,
            sliding_window=(record.get("source") or {}).get("sliding_window"),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            engine_dir=str(engine_dir.absolute()),
        )
        write_engine_manifest(tmp, manifest)
    return BuildResult(command, engine_dir, manifest)
