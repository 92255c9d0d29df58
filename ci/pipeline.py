"""The engine-build pipeline: a manifest of endpoints -> engines and a model repository a deployment
can trust. Stages, in order:

  convert   tensorrt_llm: HF checkpoint -> TensorRT-LLM checkpoint (builders.convert);
            pytorch: the HF checkpoint staged into the cache, every safetensors file checked.
            Embedding endpoints: staged and checked the same way.
  build     tensorrt_llm: trtllm-build (builders.trtllm_build); pytorch: the endpoint's repository
            entry rendered. Embedding endpoints: ONNX export (+ a TensorRT plan on tensorrt_llm runners).
  validate  artifacts vs manifest, tokenizer vs embedding table, TensorRT-LLM versions, logits parity
            (ci.validate); embedding endpoints: the ONNX graph against PyTorch with polygraphy.
  smoke     tritonserver on the repository of all endpoints: chat, streamed chat, embeddings.
  publish   the output directory (ci.publish), only when every endpoint validated and smoke passed.

Per-endpoint stages run stage by stage over all endpoints; an endpoint that fails skips its later
stages, and any failure skips smoke and publish. Completed stages are cached by content key (ci.cache).
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plateforme.builders.atomic import atomic_directory, check_replaceable
from plateforme.builders.assets import quiet_transformers
from plateforme.builders.engine_manifest import sha256_file
from plateforme.ci import cache as cache_mod
from plateforme.ci.integrity import check_checkpoint_files
from plateforme.ci.manifest import EndpointSpec, PipelineManifest
from plateforme.ci.sources import DigestMemo, resolve_source, source_digests, source_files

STAGES = ("convert", "build", "validate", "smoke", "publish")
ENDPOINT_STAGES = STAGES[:3]
OK, CACHED, SKIPPED, FAILED = "ok", "cached", "skipped", "FAILED"
# A served TensorRT-LLM endpoint still reads its HF checkpoint's config and tokenizer files (among
# them mistral-common's `*.model.v3`), not its weights.
_WEIGHT_SUFFIX = ".safetensors"


class StageError(RuntimeError):
    """A stage cannot run or failed; the message is shown as is."""


@dataclass
class StageResult:
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class EndpointRun:
    name: str
    spec: EndpointSpec
    task: str
    results: dict[str, StageResult] = field(default_factory=dict)
    source_dir: Path | None = None
    digests: dict[str, str] = field(default_factory=dict)
    entry: cache_mod.CacheEntry | None = None
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(r.status == FAILED for r in self.results.values())

    @property
    def chat(self) -> bool:
        return self.task == "chat"

    @property
    def trtllm(self) -> bool:
        return self.spec.engine == "tensorrt_llm"

    @property
    def dtype(self) -> str:
        """TensorRT-LLM needs a concrete dtype; `auto` means bfloat16 there."""
        return "bfloat16" if self.trtllm and self.spec.dtype == "auto" else self.spec.dtype


@dataclass
class PipelineReport:
    endpoints: list[EndpointRun]
    global_results: dict[str, StageResult]
    out: Path
    run_key: str | None

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        found = [(run.name, stage, result.detail) for run in self.endpoints
                 for stage, result in run.results.items() if result.status == FAILED]
        found += [(None, stage, result.detail) for stage, result in self.global_results.items()
                  if result.status == FAILED]
        return found

    @property
    def ok(self) -> bool:
        return not self.failures

    def status(self, name: str, stage: str) -> str:
        run = next(r for r in self.endpoints if r.name == name)
        result = run.results.get(stage) or self.global_results.get(stage)
        return result.status if result else SKIPPED

    def failure_message(self) -> str:
        return "; ".join(f"endpoint {name}, stage {stage}: {detail}" if name else f"stage {stage} (all endpoints): "
                         f"{detail}" for name, stage, detail in self.failures)


def parse_stages(text: str | None) -> tuple[str, ...]:
    if not text:
        return STAGES
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage(s) {unknown or text!r}; stages are {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def default_out_dir(manifest_path: Path) -> Path:
    from plateforme.paths import home

    return home() / "published" / Path(manifest_path).stem


class Pipeline:
    def __init__(self, manifest: PipelineManifest, out: Path, stages: tuple[str, ...] = STAGES,
                 cache_dir: Path | None = None, console=None):
        from rich.console import Console

        self.manifest = manifest
        self.out = Path(out).absolute()
        self.stages = stages
        self.cache_dir = Path(cache_dir or cache_mod.default_cache_dir()).absolute()
        self.console = console or Console(stderr=True)
        self.runs = [EndpointRun(name, spec, manifest.task(name)) for name, spec in manifest.endpoints.items()]
        self.global_results: dict[str, StageResult] = {}
        self.memo = DigestMemo(self.cache_dir / "digests.json")

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> PipelineReport:
        with quiet_transformers():
            for stage in ENDPOINT_STAGES:
                for run in self.runs:
                    run.results[stage] = self._endpoint_stage(run, stage)
            if any(stage in self.stages for stage in ("smoke", "publish")):
                self._prepare_remaining()
            run_key = self._run_key()
            for stage in ("smoke", "publish"):
                self.global_results[stage] = self._global_stage(stage, run_key)
        self.memo.save()
        return PipelineReport(self.runs, self.global_results, self.out, run_key)

    def _endpoint_stage(self, run: EndpointRun, stage: str) -> StageResult:
        if stage not in self.stages:
            return StageResult(SKIPPED, detail="not requested")
        if run.failed:
            return StageResult(SKIPPED, detail="an earlier stage failed")
        start = time.monotonic()
        with self.console.status(f"[bold]{run.name}[/]: {stage}..."):
            try:
                if run.entry is None:
                    self._prepare(run)
                with run.entry.lock():
                    record = run.entry.record(stage)
                    if record is not None:
                        run.records[stage] = record
                        result = StageResult(CACHED, time.monotonic() - start, record.get("summary", ""))
                    else:
                        self._require(run, stage)
                        record = getattr(self, f"_{stage}")(run)
                        run.records[stage] = record
                        result = StageResult(OK, time.monotonic() - start, record.get("summary", ""))
            except Exception as exc:  # every failure is reported against its endpoint and stage
                result = StageResult(FAILED, time.monotonic() - start, _message(exc))
        self._print(run.name, stage, result)
        return result

    def _global_stage(self, stage: str, run_key: str | None) -> StageResult:
        if stage not in self.stages:
            return StageResult(SKIPPED, detail="not requested")
        if any(run.failed for run in self.runs) or any(r.status == FAILED for r in self.global_results.values()):
            return StageResult(SKIPPED, detail="an earlier stage failed")
        start = time.monotonic()
        with self.console.status(f"[bold]all endpoints[/]: {stage}..."):
            try:
                cached, summary = getattr(self, f"_{stage}")(run_key)
                result = StageResult(CACHED if cached else OK, time.monotonic() - start, summary)
            except Exception as exc:
                result = StageResult(FAILED, time.monotonic() - start, _message(exc))
        self._print("all endpoints", stage, result)
        return result

    def _print(self, who: str, stage: str, result: StageResult) -> None:
        style = {OK: "green", CACHED: "cyan", SKIPPED: "dim", FAILED: "bold red"}[result.status]
        from rich.markup import escape

        detail = f" - {escape(result.detail)}" if result.detail else ""
        # soft_wrap: one line per result whatever the width (CI logs are read with grep).
        self.console.print(f"[{style}]{result.status:>7}[/] {who}: {stage} ({result.seconds:.1f} s){detail}",
                           highlight=False, soft_wrap=True)

    # -- inputs and keys -------------------------------------------------------------------
    def _prepare(self, run: EndpointRun) -> None:
        """Resolve the source and compute the endpoint's cache key."""
        from plateforme.builders.engine_manifest import installed_trtllm_version

        run.source_dir = resolve_source(run.spec.source, self.cache_dir)
        run.digests = source_digests(run.source_dir, self.memo)
        payload = {
            "plateforme": cache_mod.plateforme_version(),
            "endpoint": run.name,
            "task": run.task,
            # Where the source lives is not part of the key: its files' digests are.
            "spec": run.spec.model_dump(mode="json", exclude={"source"}),
            "source": run.digests,
        }
        if run.trtllm:
            payload["tensorrt_llm"] = installed_trtllm_version()
        run.entry = cache_mod.CacheEntry(self.cache_dir, run.name, cache_mod.content_key(payload))

    def _prepare_remaining(self) -> None:
        """Keys of endpoints none of whose own stages ran (e.g. --stages publish)."""
        stage = next(s for s in ("smoke", "publish") if s in self.stages)
        for run in self.runs:
            if run.entry is None and not run.failed:
                start = time.monotonic()
                try:
                    self._prepare(run)
                except Exception as exc:
                    run.results[stage] = StageResult(FAILED, time.monotonic() - start, _message(exc))
                    self._print(run.name, stage, run.results[stage])

    def _run_key(self) -> str | None:
        if any(run.entry is None or run.failed for run in self.runs):
            return None
        return cache_mod.content_key({run.name: run.entry.key for run in self.runs})

    def _require(self, run: EndpointRun, stage: str) -> None:
        for earlier in ENDPOINT_STAGES[:ENDPOINT_STAGES.index(stage)]:
            if earlier not in run.records:
                run.records[earlier] = run.entry.record(earlier)
            if run.records[earlier] is None:
                raise StageError(f"{earlier} has not completed for these inputs; include it in --stages")

    # -- convert ---------------------------------------------------------------------------
    def _convert(self, run: EndpointRun) -> dict:
        source = run.source_dir
        reports = check_checkpoint_files(source)
        mapping = run.spec.mapping.to_mapping()
        if run.chat:
            from plateforme.builders.convert import read_source

            checkpoint = read_source(source)  # config and every tensor's name and shape
            mapping.check_model(num_layers=checkpoint.num_layers, num_heads=checkpoint.num_heads,
                                num_kv_heads=checkpoint.num_kv_heads,
                                intermediate_size=checkpoint.intermediate_size,
                                num_experts=checkpoint.num_experts, architecture=checkpoint.architecture)
        if not run.trtllm and mapping.world_size > 1:
            raise StageError(f"mapping {mapping.describe()}: the PyTorch engine runs on one device; "
                             "tp and pp apply to the tensorrt_llm engine kind")
        entry = run.entry
        # The weights are staged for the PyTorch engine; TensorRT-LLM endpoints keep config and tokenizer.
        weights = not (run.chat and run.trtllm)
        staged = self._stage_copy(source, entry.path("hf"), weights, run.digests)
        summary = f"{len(reports)} safetensors file(s) checked, {sum(r.tensors for r in reports)} tensors"
        outputs, extra = ["hf"], {}
        if run.chat and run.trtllm:
            from plateforme.builders.convert import convert_checkpoint

            result = convert_checkpoint(source, entry.path("trtllm-checkpoint"), dtype=run.dtype,
                                        mapping=mapping, progress=False)
            outputs.append("trtllm-checkpoint")
            summary += f"; TensorRT-LLM checkpoint {result.dtype}, {mapping.describe(moe=True)}"
            # The build profile is checked against the checkpoint now, not after a long wait for the build.
            from plateforme.builders.trtllm_build import build_engine

            plan = build_engine(entry.path("trtllm-checkpoint"), entry.path("engine"), self._build_profile(run),
                                dry_run=True)
            extra["trtllm_build_plan"] = plan.command
        return entry.complete("convert", {"summary": summary, "staged": staged,
                                          "safetensors": [r.__dict__ for r in reports], **extra}, outputs)

    def _stage_copy(self, source: Path, target: Path, weights: bool, digests: dict[str, str]) -> dict[str, str]:
        """Copy the checkpoint's files into the cache and check each copy's digest against the source's."""
        staged = {}
        with atomic_directory(target) as tmp:
            for path in source_files(source):
                relpath = path.relative_to(source).as_posix()
                if not weights and path.suffix == _WEIGHT_SUFFIX:
                    continue
                (tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp / relpath)
                copied = sha256_file(tmp / relpath)
                if copied != digests[relpath]:
                    raise StageError(f"{path} changed while it was being staged; run again")
                (tmp / relpath).chmod(0o444)  # cache files are linked into publications: never edited
                staged[relpath] = copied
        return staged

    # -- build -----------------------------------------------------------------------------
    def _build(self, run: EndpointRun) -> dict:
        entry = run.entry
        if not run.chat:
            try:
                import onnx  # noqa: F401
                import polygraphy  # noqa: F401

                from plateforme.builders.onnx_embedder import build_tensorrt_plan, export_embedder_onnx
            except ImportError as exc:
                raise StageError(f"embedding endpoints are exported to ONNX, which needs the onnx extra "
                                 f"(pip install 'plateforme[onnx]'): {exc}") from None

            onnx_path = export_embedder_onnx(entry.path("hf"), entry.path("onnx"))
            outputs, summary = ["onnx"], f"ONNX embedder exported ({onnx_path.stat().st_size / 1e6:.0f} MB)"
            if run.trtllm:
                build_tensorrt_plan(onnx_path, entry.path("plan", "model.plan"))
                outputs.append("plan")
                summary += ", TensorRT plan built"
            return entry.complete("build", {"summary": summary}, outputs)
        if run.trtllm:
            from plateforme.builders.trtllm_build import build_engine

            result = build_engine(entry.path("trtllm-checkpoint"), entry.path("engine"), self._build_profile(run),
                                  tokenizer_dir=entry.path("hf"))
            manifest = result.manifest
            return entry.complete("build", {
                "summary": f"engine built by TensorRT-LLM {manifest.tensorrt_llm_version} on {manifest.gpu}",
                "command": result.command}, ["engine"])
        from plateforme.builders.repository import render_repository

        render_repository(entry.path("repository"), [self._chat_endpoint(run, entry.path("hf"))])
        return entry.complete("build", {"summary": "PyTorch engine: nothing to compile; repository entry rendered"},
                              ["repository"])

    def _build_profile(self, run: EndpointRun):
        from plateforme.builders.trtllm_build import PROFILES, BuildProfile

        base = PROFILES.get(run.name, BuildProfile(run.name))
        p = run.spec.profile
        input_len = p.max_input_len or base.max_input_len
        return base.with_overrides(
            max_batch_size=p.max_batch_size, max_input_len=p.max_input_len,
            max_output_len=(p.max_seq_len - input_len) if p.max_seq_len else None,
            max_num_tokens=p.max_num_tokens, max_beam_width=p.max_beam_width, workers=p.workers,
            moe_plugin=run.spec.moe_plugin)

    def _chat_endpoint(self, run: EndpointRun, model_dir: Path, engine_dir: Path | None = None):
        from plateforme.builders.repository import ChatEndpoint

        p = run.spec.profile
        values = {k: v for k, v in {"max_batch_size": p.max_batch_size, "max_num_tokens": p.max_num_tokens,
                                    "max_seq_len": p.max_seq_len}.items() if v is not None}
        if run.trtllm:
            return ChatEndpoint(run.name, model_dir, engine="tensorrtllm", engine_dir=engine_dir,
                                **{k: v for k, v in values.items() if k == "max_batch_size"})
        return ChatEndpoint(run.name, model_dir, dtype=run.dtype, **values)

    # -- validate --------------------------------------------------------------------------
    def _validate(self, run: EndpointRun) -> dict:
        from plateforme.ci import validate as checks

        entry = run.entry
        hf = entry.path("hf")
        staged = run.records["convert"]["staged"]
        missing = [name for name in run.digests if name in staged and not (hf / name).is_file()]
        if missing:
            raise checks.ValidationError(f"staged files missing: {', '.join(missing)}")
        report: dict[str, Any] = {}
        if not run.chat:
            report["tokenizer"] = checks.check_embedding_tokenizer(hf)
            from plateforme.builders.onnx_embedder import check_embedder_onnx

            check = check_embedder_onnx(entry.path("onnx", "model.onnx"), hf)
            report["onnx"] = check.to_dict()
            summary = (f"ONNX vs PyTorch on {check.texts} texts: max |diff| {check.max_abs_diff:.2g} "
                       f"(atol {check.atol:g}, rtol {check.rtol:g}), min cosine {check.min_cosine:.6f}")
            return entry.complete("validate", {"summary": summary, "report": report})
        config = checks.read_config(hf)
        architectures = config.get("architectures") or []
        report["config"] = {"architectures": architectures, "vocab_size": config["vocab_size"],
                            "dtype": run.dtype, "mapping": run.spec.mapping.to_mapping().to_config()}
        report["tokenizer"] = checks.check_tokenizer(hf, int(config["vocab_size"]))
        if run.trtllm:
            report.update(self._validate_engine(run, config))
            parity = checks.tensorrt_llm_parity(entry.path("engine"), run.source_dir)
            summary = (f"engine log-probs within {parity['logprob_atol']} of transformers "
                       f"(max {parity['max_logprob_diff']:.3g})")
        else:
            p = run.spec.profile
            expected = {"dtype": run.dtype, "engine_dir": str(hf.absolute())}
            expected.update({k: str(v) for k, v in (("max_num_tokens", p.max_num_tokens),
                                                     ("max_seq_len", p.max_seq_len)) if v is not None})
            report["engine"] = checks.check_rendered_engine(entry.path("repository"), run.name, expected,
                                                            p.max_batch_size)
            report["config"]["stored_dtypes"] = sorted({d for f in run.records["convert"]["safetensors"]
                                                        for d in f["dtypes"]})
            parity = checks.pytorch_logits_parity(hf)
            summary = (f"logits vs transformers (float32): max |diff| {parity['max_abs_diff']:.2g} over "
                       f"{parity['positions']} positions, tolerance {parity['atol']:g} + {parity['rtol']:g}"
                       f"x|logit|; argmax identical")
        report["parity"] = parity
        return entry.complete("validate", {"summary": summary, "report": report})

    def _validate_engine(self, run: EndpointRun, hf_config: dict) -> dict:
        """TensorRT-LLM artifacts against the manifest and the installed TensorRT-LLM."""
        from plateforme.builders.convert import read_checkpoint_config
        from plateforme.builders.engine_manifest import check_engine, installed_trtllm_version
        from plateforme.ci.validate import ValidationError

        entry = run.entry
        checkpoint = read_checkpoint_config(entry.path("trtllm-checkpoint"))
        expected = run.spec.mapping.to_mapping().to_config()
        if checkpoint["dtype"] != run.dtype:
            raise ValidationError(f"the TensorRT-LLM checkpoint is {checkpoint['dtype']}, the manifest says {run.dtype}")
        if checkpoint.get("mapping") != expected:
            raise ValidationError(f"the TensorRT-LLM checkpoint's mapping {checkpoint.get('mapping')} is not the "
                                  f"manifest's {expected}")
        if checkpoint["vocab_size"] != hf_config["vocab_size"]:
            raise ValidationError(f"the TensorRT-LLM checkpoint has vocab_size {checkpoint['vocab_size']}, the "
                                  f"source {hf_config['vocab_size']}")
        facts = check_engine(entry.path("engine"), entry.path("hf"), installed_trtllm_version())
        if facts.world_size != run.spec.mapping.to_mapping().world_size:
            raise ValidationError(f"the engine has world size {facts.world_size}, the manifest's mapping "
                                  f"{run.spec.mapping.to_mapping().world_size}")
        return {"engine": {"tensorrt_llm": facts.tensorrt_llm_version, "world_size": facts.world_size,
                           "max_batch_size": facts.max_batch_size, "max_seq_len": facts.max_seq_len}}

    # -- smoke -----------------------------------------------------------------------------
    def _render(self, root: Path, models: Callable[[EndpointRun], Path],
                engines: Callable[[EndpointRun], Path]) -> Path:
        """Render the repository of every endpoint into root/repository."""
        from plateforme.builders.repository import EmbeddingEndpoint, render_repository

        chat, embeddings = [], []
        for run in self.runs:
            if run.chat:
                chat.append(self._chat_endpoint(run, models(run), engines(run) if run.trtllm else None))
            else:
                p = run.spec.profile
                embeddings.append(EmbeddingEndpoint(run.name, models(run), runtime="onnx", onnx_path=engines(run),
                                                    **({"max_batch_size": p.max_batch_size} if p.max_batch_size
                                                       else {})))
        return render_repository(root / "repository", chat, embeddings)

    def _smoke(self, run_key: str) -> tuple[bool, str]:
        from plateforme.ci.smoke import smoke_test
        from plateforme.ci.validate import read_config

        record_path = self.cache_dir / "smoke" / f"{run_key}.json"
        if record_path.is_file():
            return True, "passed before with these exact inputs"
        self._require_all("smoke")
        work = self.cache_dir / "runs" / run_key[:20]
        repository = self._render(work, lambda r: r.entry.path("hf"),
                                  lambda r: r.entry.path("engine" if r.chat else "onnx"))
        embeddings = {r.name: int(read_config(r.entry.path("hf"))["hidden_size"]) for r in self.runs if not r.chat}
        report = smoke_test(repository, [r.name for r in self.runs if r.chat], embeddings, work / "tritonserver.log")
        from plateforme.builders.atomic import atomic_write_text

        atomic_write_text(record_path, json.dumps(report, indent=2) + "\n")
        answers = ", ".join(f"{name}: {value['answer']!r}" for name, value in report.items() if "answer" in value)
        return False, f"chat, streamed chat and embeddings answered through tritonserver; {answers}"

    def _require_all(self, stage: str) -> None:
        for run in self.runs:
            for earlier in ENDPOINT_STAGES:
                if run.records.get(earlier) is None and run.entry.record(earlier) is None:
                    raise StageError(f"endpoint {run.name}: {earlier} has not passed for these inputs; {stage} "
                                     f"needs {', '.join(ENDPOINT_STAGES)} (include them in --stages)")

    # -- publish ---------------------------------------------------------------------------
    def _publish(self, run_key: str) -> tuple[bool, str]:
        from plateforme.ci.publish import link_tree, publish, published_run_key

        self._require_all("publish")
        if not (self.cache_dir / "smoke" / f"{run_key}.json").is_file():
            raise StageError("smoke has not passed for these inputs: publish only serves what was smoke-tested "
                             "(include smoke in --stages)")
        if published_run_key(self.out) == run_key:
            return True, f"{self.out} already holds this publication"
        for run in self.runs:
            run.records.update({s: run.records.get(s) or run.entry.record(s) for s in ENDPOINT_STAGES})

        def stage_tree(tmp: Path) -> None:
            for run in self.runs:
                link_tree(run.entry.path("hf"), tmp / "models" / run.name)
                if run.chat and run.trtllm:
                    link_tree(run.entry.path("trtllm-checkpoint"), tmp / "checkpoints" / run.name)
                    link_tree(run.entry.path("engine"), tmp / "engines" / run.name)
                elif not run.chat:
                    link_tree(run.entry.path("onnx"), tmp / "engines" / run.name / "onnx")
                    if run.entry.path("plan").is_dir():
                        link_tree(run.entry.path("plan"), tmp / "engines" / run.name / "plan")
                (tmp / "manifests").mkdir(exist_ok=True)
                (tmp / "manifests" / f"{run.name}.json").write_text(json.dumps(self._build_manifest(run), indent=2)
                                                                     + "\n")

        def render(tmp: Path) -> None:
            self._render(tmp, lambda r: tmp / "models" / r.name,
                         lambda r: tmp / "engines" / r.name / ("onnx" if not r.chat else ""))

        run_record = {
            "run_key": run_key,
            "plateforme": cache_mod.plateforme_version(),
            "endpoints": {r.name: {"key": r.entry.key, "task": r.task, "spec": r.spec.model_dump(mode="json")}
                          for r in self.runs},
        }
        expected = {f"models/{r.name}": r.records["convert"]["staged"] for r in self.runs}
        result = publish(self.out, stage_tree, render, run_record, expected)
        return False, f"{result['files']} files published to {self.out} (SHA256SUMS)"

    def _build_manifest(self, run: EndpointRun) -> dict:
        import torch
        import transformers

        from plateforme.builders.engine_manifest import installed_trtllm_version

        return {
            "endpoint": run.name,
            "task": run.task,
            "engine": run.spec.engine,
            "key": run.entry.key,
            "spec": run.spec.model_dump(mode="json"),
            "source": {"description": run.spec.source.describe(), "dir": str(run.source_dir),
                       "files": run.digests},
            "stages": {stage: {"status": result.status, "seconds": round(result.seconds, 2),
                               "detail": result.detail} for stage, result in run.results.items()},
            "records": {stage: {k: v for k, v in (run.records.get(stage) or {}).items() if k != "files"}
                        for stage in ENDPOINT_STAGES},
            "versions": {"plateforme": cache_mod.plateforme_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tensorrt_llm": installed_trtllm_version()},
        }


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Errors plateforme raises on purpose are self-explanatory; anything else gets its type and origin.
    if isinstance(exc, (ValueError, RuntimeError, OSError)) and type(exc).__module__.startswith(("plateforme", "builtins")):
        return text
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {text}{where}"


def summary_table(report: PipelineReport):
    from rich.table import Table

    table = Table(title="pipeline summary")
    table.add_column("endpoint", no_wrap=True)
    for stage in STAGES:
        table.add_column(stage, no_wrap=True)
    style = {OK: "green", CACHED: "cyan", SKIPPED: "dim", FAILED: "bold red"}
    for run in report.endpoints:
        cells = []
        for stage in STAGES:
            result = run.results.get(stage) or report.global_results.get(stage) or StageResult(SKIPPED)
            seconds = f" {result.seconds:.1f}s" if result.status in (OK, FAILED) else ""
            cells.append(f"[{style[result.status]}]{result.status}{seconds}[/]")
        table.add_row(run.name, *cells)
    return table


def run_pipeline(manifest_path: Path, stages: str | None = None, out: Path | None = None,
                 cache_dir: Path | None = None, console=None) -> PipelineReport:
    """Load the manifest, run the stages, print the summary table; returns the report (check `.ok`)."""
    from plateforme.ci.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    pipeline = Pipeline(manifest, out or default_out_dir(manifest_path), parse_stages(stages), cache_dir, console)
    if "publish" in pipeline.stages:  # refused now, not after the builds
        from plateforme.ci.publish import RUN_FILE

        inputs = [pipeline.cache_dir, Path(manifest_path)]
        inputs += [spec.source.path for spec in manifest.endpoints.values() if spec.source.path is not None]
        check_replaceable(pipeline.out, lambda out: (out / RUN_FILE).is_file(), "pipeline publication", inputs)
    report = pipeline.run()
    pipeline.console.print(summary_table(report))
    return report
