"""Render a Triton model repository for a set of endpoints from the templates in model_repository/.

Per chat endpoint (e.g. `mistral-tiny`) five models:
  mistral-tiny                  ensemble: preprocessing -> engine -> postprocessing
  mistral-tiny-preprocessing    tokenizer (python)
  mistral-tiny-engine           PyTorch engine (python) or TensorRT-LLM engine (tensorrtllm)
  mistral-tiny-postprocessing   detokenizer (python)
  mistral-tiny-bls              the same chain driven from Python
and per embedding endpoint (e.g. `mistral-embed`) one python model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from plateforme.builders import engine_manifest
from plateforme.builders.engine_manifest import RENDER_RECORD
from plateforme.builders.atomic import atomic_directory, check_replaceable
from plateforme.builders.fill_template import fill_template
from plateforme.python_backend.context import context_length

ENGINE_KINDS = ("pytorch", "tensorrtllm")
SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tekken.json", "tokenizer.model.v1", "tokenizer.model.v2",
                   "tokenizer.model.v3", "tokenizer.model.v7")
# Triton model names end up in URLs and file names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Outputs the PyTorch engine adds to tensorrt_llm's contract, wired through the ensemble.
_PYTORCH_EXTRA_OUTPUTS = (
    ',\n  { name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }'
)
_PYTORCH_EXTRA_OUTPUT_MAP = (
    '      output_map { key: "finish_reason" value: "finish_reason" }\n'
    '      output_map { key: "prefix_ids" value: "_PREFIX_IDS" }\n'
    '      output_map { key: "engine_request_id" value: "_ENGINE_REQUEST_ID" }'
)
_PYTORCH_POSTPROCESSING_INPUT_MAP = (
    '\n      input_map { key: "PREFIX_IDS" value: "_PREFIX_IDS" }'
    '\n      input_map { key: "ENGINE_REQUEST_ID" value: "_ENGINE_REQUEST_ID" }'
    '\n      input_map { key: "FINISH_REASON" value: "finish_reason" }'
)


SEPARATE_PREFILL_CHOICES = ("auto", "true", "false")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")  # tensorrtllm's batch_scheduler_policy


class RepositoryError(ValueError):
    pass


@dataclass
class ChatEndpoint:
    name: str
    model_dir: Path  # HF checkpoint: weights for the PyTorch engine, and the tokenizer
    engine: str = "pytorch"
    engine_dir: Path | None = None  # TensorRT-LLM engine directory (engine == "tensorrtllm")
    dtype: str = "auto"  # PyTorch engine: bfloat16 where the hardware computes it natively, else float32
    max_batch_size: int = 16  # also the engine's in-flight batch (KV cache slots)
    max_num_tokens: int = 512  # tokens per engine step
    batch_scheduler_policy: str = "guaranteed_no_evict"
    separate_prefill: str = "auto"  # PyTorch engine: auto, true or false (see the engine model's config)
    max_queue_size: int = 0  # 0: unbounded
    max_queue_delay_ms: int = 0  # 0: no limit
    max_seq_len: int = 0  # 0: the model's own context length
    default_max_tokens: int = 0  # max_tokens of requests that give none; 0: the rest of the context
    num_threads: int = 0  # 0: torch's default
    instance_count: int = 1
    max_attention_window_size: int = 0  # TensorRT-LLM: 0 = the engine's sliding window (Mistral), if any
    kv_cache_free_gpu_mem_fraction: float = 0.9  # TensorRT-LLM: GPU memory left after load given to the KV cache


EMBEDDING_RUNTIMES = ("pytorch", "onnx")
EMBEDDING_ONNX_DIR = "onnx"  # where an ONNX embedder is copied, inside the embedding model's version dir


@dataclass
class EmbeddingEndpoint:
    """One embedding model. `runtime` "pytorch" runs the checkpoint in `model_dir`; "onnx" runs an ONNX
    embedder exported by builders/onnx_embedder.py (`onnx_path`: its model.onnx or its directory) with
    ONNX Runtime, copied into the rendered model so the repository is self-contained.

    A TensorRT plan of the same graph (onnx_embedder.build_tensorrt_plan) is not rendered: it would be
    served by Triton's tensorrt backend behind a tokenizer model and an ensemble, see that function."""

    name: str
    model_dir: Path
    max_batch_size: int = 512  # texts per request (Triton's max_batch_size); the embedder computes 32 at a time
    num_threads: int = 0
    runtime: str = "pytorch"
    onnx_path: Path | None = None


def templates_root() -> Path:
    return Path(str(resources.files("plateforme.model_repository")))


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise RepositoryError(
            f"endpoint name {name!r} is not a valid Triton model name (letters, digits, '_', '-', '.')"
        )


def _check_chat_model_dir(endpoint: ChatEndpoint) -> None:
    model_dir = Path(endpoint.model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise RepositoryError(f"{endpoint.name}: {model_dir} has no config.json (not an HF checkpoint)")
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise RepositoryError(
            f"{endpoint.name}: no tokenizer in {model_dir} (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if endpoint.engine == "pytorch" and not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise RepositoryError(
            f"{endpoint.name}: architecture {architectures} is not supported by the PyTorch engine "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if endpoint.engine not in ENGINE_KINDS:
        raise RepositoryError(f"{endpoint.name}: engine must be one of {ENGINE_KINDS}")
    if endpoint.engine == "tensorrtllm" and not (endpoint.engine_dir and Path(endpoint.engine_dir).is_dir()):
        given = f", not {endpoint.engine_dir}" if endpoint.engine_dir else ""
        raise RepositoryError(f"{endpoint.name}: engine tensorrtllm needs an existing engine directory "
                              f"(--engine-dir {endpoint.name}=DIR){given}")
    if endpoint.separate_prefill not in SEPARATE_PREFILL_CHOICES:
        raise RepositoryError(
            f"{endpoint.name}: separate_prefill must be one of {SEPARATE_PREFILL_CHOICES}, "
            f"got {endpoint.separate_prefill!r}"
        )
    if endpoint.batch_scheduler_policy not in SCHEDULER_POLICIES:
        raise RepositoryError(f"{endpoint.name}: batch_scheduler_policy must be one of {SCHEDULER_POLICIES}, "
                              f"got {endpoint.batch_scheduler_policy!r}")
    _check_minimums(endpoint, max_batch_size=1, max_num_tokens=1, default_max_tokens=0, instance_count=1,
                    max_seq_len=0, max_queue_size=0, max_queue_delay_ms=0, num_threads=0, max_attention_window_size=0)
    context = config.get("max_position_embeddings")
    if endpoint.engine == "pytorch" and isinstance(context, int) and endpoint.max_seq_len > context:
        raise RepositoryError(f"{endpoint.name}: max_seq_len {endpoint.max_seq_len} exceeds the model's context "
                              f"of {context} tokens (max_position_embeddings)")


def _check_minimums(endpoint, **minimums: int) -> None:
    """Integer settings of an endpoint that must be at least the given values (0: none, or a default)."""
    for name, minimum in minimums.items():
        value = getattr(endpoint, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise RepositoryError(f"{endpoint.name}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_encoder_dir(endpoint: EmbeddingEndpoint) -> None:
    """A PyTorch embedding endpoint needs an encoder checkpoint with its weights."""
    model_dir = Path(endpoint.model_dir)
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except ValueError as exc:
        raise RepositoryError(f"{endpoint.name}: {model_dir}/config.json is not valid JSON: {exc}") from None
    if any(a.endswith("ForCausalLM") for a in architectures):
        raise RepositoryError(f"{endpoint.name}: {model_dir} is a causal language model ({', '.join(architectures)}); "
                              "an embedding endpoint serves a sentence-transformers encoder")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise RepositoryError(f"{endpoint.name}: {model_dir} holds no weights (an ONNX export is served with "
                              "EmbeddingEndpoint(..., runtime='onnx', onnx_path=...))")


def _check_onnx_embedder(endpoint: EmbeddingEndpoint) -> Path:
    """The directory of the endpoint's exported ONNX embedder, refusing anything else."""
    from plateforme.python_backend.embeddings import read_onnx_manifest

    if endpoint.onnx_path is None:
        raise RepositoryError(f"{endpoint.name}: runtime onnx needs onnx_path (an exported ONNX embedder)")
    path = Path(endpoint.onnx_path).absolute()
    onnx_dir = path if path.is_dir() else path.parent
    if not path.exists():
        raise RepositoryError(f"{endpoint.name}: {path} does not exist")
    try:
        manifest = read_onnx_manifest(onnx_dir)
    except ValueError as exc:
        raise RepositoryError(f"{endpoint.name}: {exc} (export one with `plateforme export-embedder`)") from None
    if path.is_file() and path.name != manifest["model"]:
        raise RepositoryError(f"{endpoint.name}: {onnx_dir} exports {manifest['model']}, not {path.name}")
    return onnx_dir


def _holds_repository(directory: Path) -> bool:
    """A previous render, or another Triton model repository: every entry a model with its config.pbtxt."""
    entries = [path for path in directory.iterdir() if not path.name.startswith(".") and path.name != RENDER_RECORD]
    return bool(entries) and all((path / "config.pbtxt").is_file() for path in entries)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _check_engine(endpoint: ChatEndpoint) -> engine_manifest.EngineFacts:
    """The TensorRT-LLM engine's facts, refusing one built by another TensorRT-LLM than the installed one
    or whose vocabulary does not match the endpoint's tokenizer."""
    if not 0 < endpoint.kv_cache_free_gpu_mem_fraction <= 1:
        raise RepositoryError(
            f"{endpoint.name}: kv_cache_free_gpu_mem_fraction must be in (0, 1], "
            f"got {endpoint.kv_cache_free_gpu_mem_fraction}"
        )
    try:
        facts = engine_manifest.check_engine(
            endpoint.engine_dir, endpoint.model_dir, engine_manifest.installed_trtllm_version()
        )
    except engine_manifest.EngineCheckError as exc:
        raise RepositoryError(f"{endpoint.name}: {exc}") from None
    if facts.max_batch_size and endpoint.max_batch_size > facts.max_batch_size:
        raise RepositoryError(
            f"{endpoint.name}: max_batch_size {endpoint.max_batch_size} exceeds the {facts.max_batch_size} the "
            f"engine was built for; lower it or rebuild: {facts.rebuild_hint()}"
        )
    return facts


def launch_command(
    repository: str | Path,
    world_size: int,
    engine_models: list[str],
    tritonserver: str = "tritonserver",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
) -> list[str]:
    """The multi-GPU launch the tensorrtllm backend expects: one MPI rank (one tritonserver) per GPU.

    Rank 0 serves every model; the other ranks load only the TensorRT-LLM engine models and take
    part in their computation. Each rank keeps its own python-backend shared-memory prefix.
    (tensorrtllm_backend's scripts/launch_triton_server.py builds the same command.)
    """
    command = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        command += ["-n", "1", tritonserver, f"--model-repository={Path(repository).absolute()}",
                    f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}"]
        if rank:
            command += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in engine_models)]
        command += ["--disable-auto-complete-config",
                    f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank < world_size - 1:
            command.append(":")
    return command


def _render_model(templates: Path, kind: str, out: Path, name: str, values: dict) -> None:
    source = templates / kind
    target = out / name
    (target / "1").mkdir(parents=True)
    text = fill_template((source / "config.pbtxt").read_text(), {"model_name": name, **values})
    (target / "config.pbtxt").write_text(text)
    if (source / "1" / "model.py").exists():
        shutil.copy(source / "1" / "model.py", target / "1" / "model.py")


def _supports_tools(endpoint: ChatEndpoint) -> bool:
    """Whether the endpoint's tokenizer encodes `tools` (loading it also refuses a broken one now
    rather than when Triton loads the preprocessing model)."""
    from plateforme.python_backend.tokenization import load_tokenizer

    try:
        return load_tokenizer(endpoint.model_dir).supports_tools
    except Exception as exc:  # sentencepiece, tokenizers and mistral-common each fail in their own way
        raise RepositoryError(f"{endpoint.name}: the tokenizer in {endpoint.model_dir} cannot be loaded "
                              f"({type(exc).__name__}: {exc})") from None


def _chat_models(
    endpoint: ChatEndpoint, facts: engine_manifest.EngineFacts | None, function_calling: bool
) -> dict[str, tuple[str, dict]]:
    """model name -> (template, placeholder values) for one chat endpoint (`facts`: those of its
    TensorRT-LLM engine; `function_calling`: whether its tokenizer takes tools, told to clients by
    the ensemble's config)."""
    name = endpoint.name
    tokenizer_dir = str(Path(endpoint.model_dir).absolute())
    batch = endpoint.max_batch_size
    pre, engine, post = f"{name}-preprocessing", f"{name}-engine", f"{name}-postprocessing"
    pytorch = endpoint.engine == "pytorch"
    chain = {
        "preprocessing_model": pre,
        "engine_model": engine,
        "triton_max_batch_size": batch,
        "engine_extra_outputs": _PYTORCH_EXTRA_OUTPUTS if pytorch else "",
    }
    models = {
        pre: ("preprocessing", {
            "triton_max_batch_size": batch,
            "tokenizer_dir": tokenizer_dir,
            "max_seq_len": endpoint.max_seq_len,
            "default_max_tokens": endpoint.default_max_tokens,
            "preprocessing_instance_count": endpoint.instance_count,
        }),
        post: ("postprocessing", {
            "triton_max_batch_size": batch,
            "tokenizer_dir": tokenizer_dir,
            "engine_model": engine,
            "postprocessing_instance_count": endpoint.instance_count,
        }),
        name: ("ensemble", {
            **chain,
            "postprocessing_model": post,
            "engine_extra_output_map": _PYTORCH_EXTRA_OUTPUT_MAP if pytorch else "",
            "postprocessing_extra_input_map": _PYTORCH_POSTPROCESSING_INPUT_MAP if pytorch else "",
            "function_calling": "true" if function_calling else "false",
        }),
        f"{name}-bls": ("tensorrt_llm_bls", {
            **chain,
            "tokenizer_dir": tokenizer_dir,
            "bls_instance_count": endpoint.instance_count,
        }),
    }
    if pytorch:
        models[engine] = ("pytorch_llm", {
            "triton_max_batch_size": batch,
            "engine_dir": str(Path(endpoint.model_dir).absolute()),
            "dtype": endpoint.dtype,
            "max_seq_len": endpoint.max_seq_len,
            "exclude_input_in_output": "true",
            "num_threads": endpoint.num_threads,
            "max_num_tokens": endpoint.max_num_tokens,
            "batch_scheduler_policy": endpoint.batch_scheduler_policy,
            "separate_prefill": endpoint.separate_prefill,
            "max_queue_size": endpoint.max_queue_size,
            "max_queue_delay_ms": endpoint.max_queue_delay_ms,
        })
    else:
        values = {
            "triton_max_batch_size": batch,
            "decoupled_mode": "true",
            "engine_dir": str(Path(endpoint.engine_dir).absolute()),
            "batching_strategy": "inflight_fused_batching",
            "max_beam_width": 1,
            "exclude_input_in_output": "true",
            "tokenizer_dir": tokenizer_dir,
            "batch_scheduler_policy": endpoint.batch_scheduler_policy,
            "kv_cache_free_gpu_mem_fraction": str(endpoint.kv_cache_free_gpu_mem_fraction),
        }
        # Mistral's sliding window is a run-time setting of TensorRT-LLM: its KV cache keeps that many tokens.
        window = endpoint.max_attention_window_size or (facts.sliding_window if facts else None)
        if window:
            values["max_attention_window_size"] = window
        if not endpoint.max_seq_len and facts and facts.max_seq_len:
            models[pre][1]["max_seq_len"] = facts.max_seq_len  # prompts longer than the engine's are refused
        models[engine] = ("tensorrt_llm", values)
    models[name][1]["max_context_length"] = context_length(endpoint.model_dir, models[pre][1]["max_seq_len"])
    return models


def render_repository(
    out_dir: str | Path,
    chat: list[ChatEndpoint],
    embeddings: list[EmbeddingEndpoint] = (),
) -> Path:
    """Write the repository atomically: a failed render leaves any previous one untouched."""
    if not chat and not embeddings:
        raise RepositoryError("no endpoints to render")
    names = [e.name for e in chat] + [e.name for e in embeddings]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RepositoryError(f"endpoint name(s) used twice: {sorted(duplicates)}")
    engines: dict[str, engine_manifest.EngineFacts] = {}
    function_calling: dict[str, bool] = {}
    for endpoint in chat:
        _check_name(endpoint.name)
        _check_chat_model_dir(endpoint)
        function_calling[endpoint.name] = _supports_tools(endpoint)
        if endpoint.engine == "tensorrtllm":
            engines[endpoint.name] = _check_engine(endpoint)
    world_sizes = {facts.world_size for facts in engines.values()}
    if len(world_sizes) > 1:
        sizes = ", ".join(f"{name}: {facts.world_size}" for name, facts in engines.items())
        raise RepositoryError(
            f"TensorRT-LLM engines of different world sizes ({sizes}) cannot share one MPI launch; "
            "render them into separate repositories"
        )
    onnx_dirs: dict[str, Path] = {}
    for endpoint in embeddings:
        _check_name(endpoint.name)
        _check_minimums(endpoint, max_batch_size=1, num_threads=0)
        if not (Path(endpoint.model_dir) / "config.json").is_file():
            raise RepositoryError(f"{endpoint.name}: {endpoint.model_dir} has no config.json")
        if endpoint.runtime not in EMBEDDING_RUNTIMES:
            raise RepositoryError(
                f"{endpoint.name}: embedding runtime must be one of {EMBEDDING_RUNTIMES}, got {endpoint.runtime!r}"
            )
        if endpoint.runtime == "pytorch":
            _check_encoder_dir(endpoint)
        if endpoint.runtime == "onnx":
            onnx_dirs[endpoint.name] = _check_onnx_embedder(endpoint)
    inputs = [path for e in chat for path in (e.model_dir, e.engine_dir) if path is not None]
    inputs += [path for e in embeddings for path in (e.model_dir, e.onnx_path) if path is not None]
    check_replaceable(out_dir, _holds_repository, "Triton model repository", inputs, RepositoryError)
    templates = templates_root()
    with atomic_directory(out_dir) as tmp:
        for endpoint in chat:
            models = _chat_models(endpoint, engines.get(endpoint.name), function_calling[endpoint.name])
            for model_name, (kind, values) in models.items():
                _render_model(templates, kind, tmp, model_name, values)
        for endpoint in embeddings:
            onnx_dir = onnx_dirs.get(endpoint.name)
            _render_model(templates, "embedding", tmp, endpoint.name, {
                "triton_max_batch_size": endpoint.max_batch_size,
                "model_dir": str(Path(endpoint.model_dir).absolute()),
                "num_threads": endpoint.num_threads,
                "runtime": endpoint.runtime,
                "onnx_dir": EMBEDDING_ONNX_DIR if onnx_dir else "",
            })
            if onnx_dir:
                # Hard links where the filesystem allows: the graph holds all the weights (~90 MB for MiniLM).
                shutil.copytree(onnx_dir, tmp / endpoint.name / "1" / EMBEDDING_ONNX_DIR, copy_function=_link_or_copy)
        manifest = {
            "chat": {e.name: {"model_dir": str(Path(e.model_dir).absolute()), "engine": e.engine}
                     for e in chat},
            "embeddings": {e.name: {"model_dir": str(Path(e.model_dir).absolute()), "runtime": e.runtime,
                                    **({"onnx_dir": str(onnx_dirs[e.name])} if e.name in onnx_dirs else {})}
                           for e in embeddings},
        }
        for name, facts in engines.items():
            manifest["chat"][name].update(engine_dir=str(Path(facts.engine_dir).absolute()),
                                          world_size=facts.world_size,
                                          tensorrt_llm_version=facts.tensorrt_llm_version)
        if world_sizes and max(world_sizes) > 1:
            manifest["launch"] = launch_command(out_dir, max(world_sizes), [f"{n}-engine" for n in engines])
        (tmp / RENDER_RECORD).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)
