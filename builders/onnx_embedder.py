"""The embedding endpoint's ONNX path: export, checks, and a TensorRT plan for GPU runners.

    export_embedder_onnx(model_dir, out_dir)        sentence-transformers BERT checkpoint -> ONNX embedder dir
    check_embedder_onnx(onnx_path, model_dir)       polygraphy: ONNX Runtime vs PyTorch, and `check lint`
    build_tensorrt_plan(onnx_path, out_path, ...)   TensorRT engine (needs TensorRT and a GPU)

What the graph holds. The encoder AND the mean pooling over the attention mask AND the L2
normalisation: `input_ids`, `attention_mask` (int64 [batch, sequence]) -> `embedding` (float32
[batch, dim], unit vectors). A graph that ends at the encoder's hidden states would leave every
runtime (the python model, a TensorRT plan under Triton's tensorrt backend, another team's client)
to re-implement the pooling, and would move [batch, sequence, dim] floats instead of [batch, dim]
across each boundary; with the pooling inside, the served graph is self-contained and is checked
against the PyTorch endpoint as a whole. `token_type_ids` is not an input: single-sentence
embedding always uses segment 0, which BERT supplies itself when it is absent.

Exporter. `torch.onnx.export(..., dynamo=False)`, the TorchScript exporter: it needs no extra
package (the torch.export-based exporter needs onnxscript), and it exports this BERT (attention,
GELU, LayerNorm) to plain opset-17 operators that ONNX Runtime and TensorRT both take. It traces, so
a Python branch on tensor values would be frozen at the sample's value: the export therefore traces
a padded batch, and `check_embedder_onnx` compares batches of 1..6 texts, padded and unpadded, up to
the model's `max_tokens`, against the PyTorch `Embedder`.

The export directory (read by python_backend.embeddings.OnnxEmbedder):
    model.onnx       the graph above, weights inside (all-MiniLM-L6-v2: ~90 MB)
    embedder.json    format, inputs/output, dim, max_tokens, pooling, normalisation, opset, versions
    tokenizer files  copied verbatim from the checkpoint, so tokenization is byte-for-byte the same
    config.json, sentence_bert_config.json, 1_Pooling/config.json   the checkpoint's own records
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from plateforme.builders.atomic import atomic_directory, atomic_write_bytes, check_replaceable
from plateforme.python_backend.embeddings import (
    ONNX_FORMAT,
    ONNX_INPUTS,
    ONNX_MANIFEST_FILE,
    ONNX_MODEL_FILE,
    ONNX_OUTPUT,
    Embedder,
    mean_pool_normalize,
)

OPSET = 17  # LayerNormalization is a native operator from 17 on (TensorRT 8.6+ parses it)
# Files copied from the checkpoint into the export: the tokenizer's and the sentence-transformers records.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
    "sentence_bert_config.json",
    "modules.json",
    "1_Pooling/config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # at least one must be there

# Tolerances of the ONNX Runtime vs PyTorch comparison. The vectors are unit vectors (components
# ~0.05); float32 ONNX Runtime and PyTorch kernels sum in different orders and differ by ~1e-7.
# A pass is |onnx - torch| <= atol + rtol * |torch| elementwise (polygraphy's SimpleCompareFunc).
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-3
MIN_COSINE = 0.9999

# The fixed inputs of the check: single text, a ragged padded batch, unpadded equal lengths, and a
# text truncated at max_tokens beside a two-token one (the longest and the most padded rows).
_SENTENCES = (
    "The capital of France is Paris.",
    "Paris is the capital and largest city of France.",
    "A cat sat on the mat.",
    "Quarterly revenue grew by 12% while operating costs fell.",
    "Les modèles Mistral sont servis par Triton.",
    "ok",
)
_LONG_TEXT = " ".join(
    "Embeddings map text to vectors so that texts of similar meaning lie close together." for _ in range(40)
)
CHECK_BATCHES: tuple[tuple[str, ...], ...] = (
    (_SENTENCES[0],),
    _SENTENCES,
    ("one two three", "four five six"),
    (_LONG_TEXT, "?"),
)


class OnnxExportError(ValueError):
    """The checkpoint cannot be exported (not a mean-pooled BERT-like sentence-transformers model, ...)."""


class OnnxCheckError(ValueError):
    """The ONNX embedder failed a check; the message says which and by how much."""


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or a GPU for it) is not available here: no plan can be built."""


@dataclass
class OnnxCheck:
    """The figures of a passed check."""

    onnx_path: str
    opset: int
    inputs: list[str]
    output: str
    dim: int
    cases: int  # batches compared
    texts: int  # texts compared, over all batches
    max_sequence: int  # the longest tokenized batch compared
    atol: float
    rtol: float
    max_abs_diff: float
    max_rel_diff: float  # |onnx - torch| / |torch| over components with |torch| > atol
    min_cosine: float  # lowest cosine between an ONNX and a PyTorch vector of the same text
    lint_nodes_passing: int
    lint_warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class PooledEncoder(torch.nn.Module):
    """The exported module: encoder, then mean pooling over the attention mask and L2 normalisation."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool_normalize(hidden, attention_mask)


def _check_checkpoint(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise OnnxExportError(f"{model_dir} has no config.json (not an HF checkpoint)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise OnnxExportError(f"{config_path} is not valid JSON: {exc}") from None
    architectures = config.get("architectures") or []
    if config.get("model_type") != "bert" and not any("Bert" in a for a in architectures):
        raise OnnxExportError(
            f"{model_dir} is a {config.get('model_type') or architectures} model; the ONNX embedder export "
            "handles BERT-like sentence-transformers encoders"
        )
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise OnnxExportError(f"{model_dir} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return config


def _check_out_dir(out_dir: Path, model_dir: Path) -> None:
    check_replaceable(out_dir, lambda out: (out / ONNX_MANIFEST_FILE).is_file(), "previous ONNX embedder export",
                      [model_dir], OnnxExportError)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_embedder_onnx(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Export the checkpoint's encoder + mean pooling + L2 normalisation to `out_dir`/model.onnx, with the
    tokenizer files and embedder.json beside it. Atomic: `out_dir` appears complete or not at all (an
    existing export there is replaced only by a complete new one). Returns the path of model.onnx."""
    import transformers

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if not model_dir.is_dir():
        raise OnnxExportError(f"{model_dir} is not a directory")
    _check_checkpoint(model_dir)
    _check_out_dir(out_dir, model_dir)
    try:
        embedder = Embedder(model_dir)
    except (OSError, ValueError) as exc:  # no weights, or pooled otherwise than by mean tokens
        raise OnnxExportError(f"cannot load {model_dir}: {exc}") from None
    module = PooledEncoder(embedder.model).eval()
    # A padded batch: the trace then goes through the masking path with real padding.
    sample = embedder.tokenize(list(CHECK_BATCHES[1][:3]), "pt")
    with atomic_directory(out_dir) as tmp:
        onnx_path = tmp / ONNX_MODEL_FILE
        with warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation and each traced shape comparison.
            warnings.simplefilter("ignore")
            with torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(
                    module,
                    (sample["input_ids"], sample["attention_mask"]),
                    str(onnx_path),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=list(ONNX_INPUTS),
                    output_names=[ONNX_OUTPUT],
                    dynamic_axes={
                        "input_ids": {0: "batch", 1: "sequence"},
                        "attention_mask": {0: "batch", 1: "sequence"},
                        ONNX_OUTPUT: {0: "batch"},
                    },
                    do_constant_folding=True,
                )
        _fix_output_width(onnx_path, embedder.dim)
        for name in COPIED_FILES:
            source = model_dir / name
            if source.is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
        import onnx

        manifest = {
            "format": ONNX_FORMAT,
            "format_version": 1,
            "model": ONNX_MODEL_FILE,
            "model_sha256": _sha256(onnx_path),
            "inputs": {name: {"dtype": "int64", "shape": ["batch", "sequence"]} for name in ONNX_INPUTS},
            "output": {"name": ONNX_OUTPUT, "dtype": "float32", "shape": ["batch", embedder.dim]},
            "dim": embedder.dim,
            "max_tokens": embedder.max_tokens,
            "max_position_embeddings": embedder.max_position_embeddings,
            "pooling": "mean",  # over the tokens of attention_mask, specials included (sentence-transformers)
            "normalization": "l2",
            "opset": OPSET,
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "onnx": onnx.__version__},
            "source_model_dir": str(model_dir.absolute()),
        }
        (tmp / ONNX_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir / ONNX_MODEL_FILE


def _fix_output_width(onnx_path: Path, dim: int) -> None:
    """The tracer names the output's width symbolically; make it the fixed `dim` it is, so that consumers
    (Triton configs, TensorRT) see [batch, dim]."""
    import onnx

    model = onnx.load(str(onnx_path))
    width = model.graph.output[0].type.tensor_type.shape.dim[1]
    width.Clear()
    width.dim_value = dim
    onnx.save(model, str(onnx_path))


def _load_onnx(onnx_path: Path):
    import onnx

    if not onnx_path.is_file():
        raise OnnxCheckError(f"{onnx_path} does not exist")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise OnnxCheckError(f"{onnx_path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise OnnxCheckError(f"{onnx_path} is not a valid ONNX model: {exc}") from None
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if sorted(inputs) != sorted(ONNX_INPUTS) or outputs != [ONNX_OUTPUT]:
        raise OnnxCheckError(
            f"{onnx_path}: expected inputs {list(ONNX_INPUTS)} and output [{ONNX_OUTPUT!r}], "
            f"got inputs {inputs} and outputs {outputs}"
        )
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return model, opset


def _lint(onnx_path: Path, feed: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """`polygraphy check lint` on real inputs: (nodes passing, warnings); OnnxCheckError on any error."""
    from polygraphy.json import save_json

    with tempfile.TemporaryDirectory(prefix="plateforme-lint-") as work:
        inputs_path = Path(work) / "inputs.json"
        report_path = Path(work) / "lint.json"
        save_json([feed], str(inputs_path))
        command = [sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
                   "check", "lint", str(onnx_path), "--load-inputs", str(inputs_path), "-o", str(report_path)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise OnnxCheckError(f"polygraphy check lint {onnx_path} did not finish within 600 s") from None
        if not report_path.is_file():
            tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
            raise OnnxCheckError(
                f"polygraphy check lint {onnx_path} failed (exit {run.returncode}) without a report: "
                + " | ".join(tail)
            )
        report = json.loads(report_path.read_text())
    entries = report.get("lint_entries") or []
    errors = [e for e in entries if e.get("level") != "warning"]
    warnings_ = [e.get("message", "").strip() for e in entries if e.get("level") == "warning"]
    failing = (report.get("summary") or {}).get("failing") or []
    if errors or failing or run.returncode != 0:
        details = "; ".join(
            f"{e.get('source', '?')}: {' '.join(str(e.get('message', '')).split())[:300]}"
            + (f" (nodes {', '.join(e['nodes'][:5])})" if e.get("nodes") else "")
            for e in errors[:3]
        ) or f"exit {run.returncode}, failing nodes {failing[:5]}"
        raise OnnxCheckError(f"polygraphy check lint found {len(errors)} error(s) in {onnx_path}: {details}")
    passing = len((report.get("summary") or {}).get("passing") or [])
    return passing, warnings_


def check_embedder_onnx(
    onnx_path: str | Path,
    model_dir: str | Path,
    atol: float = CHECK_ATOL,
    rtol: float = CHECK_RTOL,
) -> OnnxCheck:
    """Check an exported embedder against the PyTorch `Embedder` of `model_dir`.

    1. the file loads and passes onnx.checker, with the expected inputs and output;
    2. polygraphy runs it with ONNX Runtime (CPU) on the fixed batches `CHECK_BATCHES`, tokenized as
       serving tokenizes them, and compares each output to the PyTorch Embedder's vectors for the same
       texts (`SimpleCompareFunc(atol, rtol)`: |onnx - torch| <= atol + rtol * |torch| elementwise);
       every vector must also have a cosine >= MIN_COSINE with its PyTorch twin;
    3. `polygraphy check lint` (onnx.checker + ONNX Runtime node by node) reports no error.
    Raises OnnxCheckError saying which step failed and by how much.
    """
    import onnxruntime
    import polygraphy
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    onnx_path = Path(onnx_path)
    model_dir = Path(model_dir)
    _model, opset = _load_onnx(onnx_path)
    try:
        reference = Embedder(model_dir)
    except (OSError, ValueError) as exc:
        raise OnnxCheckError(f"cannot load the PyTorch reference from {model_dir}: {exc}") from None

    feeds, expected = [], []
    for texts in CHECK_BATCHES:
        encoded = reference.tokenize(list(texts), "np")
        feeds.append({name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in ONNX_INPUTS})
        vectors, _ = reference.embed(list(texts))
        expected.append(vectors)

    runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxrt")
    # polygraphy logs every step and reports failures by raising after a CRITICAL log: keep it quiet
    # and turn its exceptions into this check's error.
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        try:
            results = Comparator.run([runner], data_loader=feeds)
        except Exception as exc:
            raise OnnxCheckError(f"ONNX Runtime could not run {onnx_path}: {exc}") from None
        torch_results = [IterationResult({ONNX_OUTPUT: vectors}, runner_name="pytorch") for vectors in expected]
        results.append(("pytorch", torch_results))
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
        )
    actual = [iteration[ONNX_OUTPUT] for iteration in results[0][1]]

    max_abs = max_rel = 0.0
    min_cos = 1.0
    for texts, got, want in zip(CHECK_BATCHES, actual, expected):
        if got.shape != want.shape:
            raise OnnxCheckError(
                f"{onnx_path}: output shape {got.shape} for {len(texts)} text(s), PyTorch gives {want.shape}"
            )
        diff = np.abs(got.astype(np.float64) - want)
        max_abs = max(max_abs, float(diff.max()))
        significant = np.abs(want) > atol
        if significant.any():
            max_rel = max(max_rel, float((diff[significant] / np.abs(want[significant])).max()))
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cosines = (got * want).sum(axis=1) / np.maximum(norms, 1e-12)
        min_cos = min(min_cos, float(cosines.min()))
    if not bool(accuracy) or min_cos < MIN_COSINE:
        raise OnnxCheckError(
            f"{onnx_path} disagrees with PyTorch on the check inputs: max |diff| {max_abs:.3g} "
            f"(atol {atol:g}, rtol {rtol:g}), max relative diff {max_rel:.3g}, lowest cosine {min_cos:.6f} "
            f"(must be >= {MIN_COSINE})"
        )
    lint_passing, lint_warnings = _lint(onnx_path, feeds[1])
    return OnnxCheck(
        onnx_path=str(onnx_path),
        opset=opset,
        inputs=list(ONNX_INPUTS),
        output=ONNX_OUTPUT,
        dim=int(expected[0].shape[1]),
        cases=len(feeds),
        texts=sum(len(texts) for texts in CHECK_BATCHES),
        max_sequence=max(feed["input_ids"].shape[1] for feed in feeds),
        atol=atol,
        rtol=rtol,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        min_cosine=min_cos,
        lint_nodes_passing=lint_passing,
        lint_warnings=lint_warnings,
        versions={"onnxruntime": onnxruntime.__version__, "polygraphy": polygraphy.__version__},
    )


@dataclass
class PlanProfile:
    """The optimization profile of a TensorRT plan: the batch and sequence ranges it accepts (both
    inputs share them), and the shapes TensorRT tunes its kernels for."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    min_sequence: int = 1
    opt_sequence: int = 128
    max_sequence: int = 256

    def validate(self) -> None:
        for axis in ("batch", "sequence"):
            low, opt, high = (getattr(self, f"{kind}_{axis}") for kind in ("min", "opt", "max"))
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, opt, high)):
                raise ValueError(f"the {axis} profile must be ints, got min {low!r}, opt {opt!r}, max {high!r}")
            if not 1 <= low <= opt <= high:
                raise ValueError(f"the {axis} profile needs 1 <= min <= opt <= max, got {low}, {opt}, {high}")


def _tensorrt_version() -> str:
    """The installed TensorRT's version, or TensorRTUnavailableError saying what is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailableError(
            "TensorRT is not installed: building a plan needs the `tensorrt` Python package (NVIDIA's TensorRT "
            "or Triton containers, or `pip install tensorrt` from NVIDIA's index) and an NVIDIA GPU. "
            "The ONNX embedder itself runs without it (runtime onnx, ONNX Runtime)."
        )
    try:
        import tensorrt
    except Exception as exc:  # a wheel without its CUDA libraries fails at import
        raise TensorRTUnavailableError(f"TensorRT is installed but does not load: {exc}") from None
    return tensorrt.__version__


def build_tensorrt_plan(
    onnx_path: str | Path,
    out_path: str | Path,
    profile: PlanProfile | None = None,
    fp16: bool = False,
    workspace_bytes: int | None = None,
) -> Path:
    """Build a TensorRT engine ("plan") of the ONNX embedder with one optimization profile over batch and
    sequence, through polygraphy's TensorRT loaders (the API behind `polygraphy convert --convert-to trt
    --trt-min-shapes/--trt-opt-shapes/--trt-max-shapes`). Needs TensorRT and an NVIDIA GPU: without them it
    raises TensorRTUnavailableError and writes nothing. The plan and a JSON record beside it
    (`<plan>.json`: profile, precision, TensorRT version, source ONNX) are written atomically.

    `profile.max_sequence` defaults to the export's max_tokens. fp16=False keeps float32, the precision
    check_embedder_onnx checked; fp16=True halves memory traffic at a cosine cost to be measured on the GPU.

    A plan only loads in the TensorRT version that built it, on the GPU model it was built on: build it
    on the serving machine's kind of GPU, inside the Triton container's TensorRT version.

    Serving it (not done by `render_repository`, and not run here): Triton's tensorrt backend
    cannot tokenize, so the embedding endpoint `<name>` would become three models with the same outside
    contract (`text_input` -> `embedding`, `num_input_tokens`):
      - `<name>-tokenizer`: backend "python", `text_input` TYPE_STRING [1] -> `input_ids`,
        `attention_mask` TYPE_INT64 [-1], `num_input_tokens` TYPE_INT32 [1] (the export's tokenizer files,
        truncation at max_tokens; a batch of texts padded to its longest);
      - `<name>-encoder`: `platform: "tensorrt_plan"` with the plan as `1/model.plan`,
        `max_batch_size` <= profile.max_batch, inputs `input_ids`, `attention_mask` TYPE_INT64 dims [-1],
        output `embedding` TYPE_FP32 dims [dim], `instance_group [{ kind: KIND_GPU }]`,
        dynamic batching (Triton batches requests of equal sequence length together);
      - `<name>`: `platform: "ensemble"` wiring tokenizer -> encoder, outputs `embedding` and
        `num_input_tokens`.
    The inputs stay int64 as exported (TensorRT 10 declares INT64 network inputs; 8.x parsers cast
    int64 to int32), so the encoder config says TYPE_INT64. None of this has run here: no TensorRT and no
    GPU were available, so the build itself, the plan's accuracy and its serving are unverified.
    """
    onnx_path = Path(onnx_path)
    out_path = Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist")
    if profile is None:
        manifest_path = onnx_path.parent / ONNX_MANIFEST_FILE
        max_tokens = json.loads(manifest_path.read_text()).get("max_tokens") if manifest_path.is_file() else None
        profile = PlanProfile(max_sequence=max_tokens or PlanProfile.max_sequence)
        profile.opt_sequence = min(profile.opt_sequence, profile.max_sequence)
    profile.validate()
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
    trt_version = _tensorrt_version()

    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.logger import G_LOGGER

    shapes = Profile()
    for name in ONNX_INPUTS:
        shapes.add(
            name,
            min=(profile.min_batch, profile.min_sequence),
            opt=(profile.opt_batch, profile.opt_sequence),
            max=(profile.max_batch, profile.max_sequence),
        )
    config = CreateConfig(
        fp16=fp16,
        profiles=[shapes],
        memory_pool_limits=None if workspace_bytes is None else {trt.MemoryPoolType.WORKSPACE: workspace_bytes},
    )
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            plan = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()
    except Exception as exc:  # no GPU / CUDA driver, an unsupported operator, out of memory...
        raise TensorRTUnavailableError(f"TensorRT {trt_version} could not build a plan from {onnx_path}: {exc}") from None
    record = {
        "plan": out_path.name,
        "onnx": str(onnx_path.absolute()),
        "onnx_sha256": _sha256(onnx_path),
        "tensorrt_version": trt_version,
        "precision": "fp16" if fp16 else "fp32",
        "profile": asdict(profile),
        "inputs": list(ONNX_INPUTS),
        "output": ONNX_OUTPUT,
    }
    atomic_write_bytes(out_path, bytes(plan))
    atomic_write_bytes(out_path.with_name(out_path.name + ".json"), (json.dumps(record, indent=2) + "\n").encode())
    return out_path
