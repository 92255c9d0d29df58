"""The pipeline manifest: which endpoints to build, from what, and how (YAML, validated with pydantic).

    version: 1
    endpoints:
      mistral-tiny:
        source: smollm2-mistral          # a demo asset, a local directory, or {hub: owner/name}
        engine: pytorch                  # pytorch (CPU runners) | tensorrt_llm (GPU runners)
        dtype: float32
        mapping: {tp: 1, pp: 1}          # moe_tp / moe_ep for mixture-of-experts models
        profile: {max_batch_size: 8, max_input_len: 1024, max_seq_len: 2048, max_num_tokens: 512}
        moe_plugin: builtin              # builtin | custom | none (tensorrt_llm MoE layers)
      mistral-embed:
        source: minilm-embed             # task defaults to embedding for names ending in "embed"

Every error names the endpoint and the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plateforme.builders.assets import ASSET_NAMES
from plateforme.builders.mapping import Mapping, MappingError
from plateforme.builders.repository import NAME_PATTERN

ENGINE_KINDS = ("pytorch", "tensorrt_llm")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ManifestError(ValueError):
    """The manifest cannot be read or is invalid; the message lists every problem."""


# A count: a YAML integer (`tp: true` or `tp: "2"` is refused, not read as 1 or 2).
Count = Annotated[int, Field(strict=True, gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where the endpoint's Hugging Face checkpoint comes from: exactly one of asset, path, hub."""

    asset: Literal[ASSET_NAMES] | None = None  # type: ignore[valid-type]
    path: Path | None = None
    hub: str | None = None
    revision: str | None = None  # hub only

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # A bare string is a demo asset name or a local directory.
        if isinstance(value, str):
            return {"asset": value} if value in ASSET_NAMES else {"path": value}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        given = [name for name in ("asset", "path", "hub") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of asset, path, hub (got {', '.join(given) or 'none'})")
        if self.hub is not None and not HUB_ID.match(self.hub):
            raise ValueError(f"hub must be a model id owner/name, got {self.hub!r}")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision applies to hub sources only")
        return self

    def describe(self) -> str:
        if self.asset:
            return f"demo asset {self.asset}"
        if self.hub:
            return f"hub {self.hub}" + (f"@{self.revision}" if self.revision else "")
        return f"directory {self.path}"


class MappingSpec(_Strict):
    """How the model is split over GPUs (TensorRT-LLM); the PyTorch engine runs on one device."""

    tp: Count = 1
    pp: Count = 1
    moe_tp: Count | None = None
    moe_ep: Count | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MappingSpec:
        try:
            self.to_mapping()
        except MappingError as exc:
            raise ValueError(str(exc)) from None
        return self

    def to_mapping(self) -> Mapping:
        return Mapping.create(self.tp, self.pp, self.moe_tp, self.moe_ep)


class ProfileSpec(_Strict):
    """What the engine is built (TensorRT-LLM) or configured (PyTorch) for. Unset fields take the
    defaults of the endpoint's TensorRT-LLM build profile / the PyTorch engine's repository defaults."""

    max_batch_size: Count | None = None
    max_input_len: Count | None = None
    max_seq_len: Count | None = None
    max_num_tokens: Count | None = None
    max_beam_width: Count | None = None
    workers: Count | None = None

    @model_validator(mode="after")
    def _lengths(self) -> ProfileSpec:
        if self.max_input_len and self.max_seq_len and self.max_input_len >= self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}): "
                             "the difference is the longest answer")
        return self


class EndpointSpec(_Strict):
    source: SourceSpec
    task: Literal["chat", "embedding"] | None = None  # default: embedding for names ending in "embed"
    engine: Literal[ENGINE_KINDS] = "pytorch"  # type: ignore[valid-type]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mapping: MappingSpec = Field(default_factory=MappingSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    moe_plugin: Literal["builtin", "custom", "none"] = "builtin"

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_name(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind {value!r}: use pytorch (the PyTorch engine, any machine) or "
                             "tensorrt_llm (TensorRT-LLM engines, GPU runners)")
        return value


class PipelineManifest(_Strict):
    version: Literal[1] = 1
    endpoints: dict[str, EndpointSpec]

    @field_validator("endpoints")
    @classmethod
    def _names(cls, endpoints: dict[str, EndpointSpec]) -> dict[str, EndpointSpec]:
        if not endpoints:
            raise ValueError("no endpoints")
        for name in endpoints:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"endpoint name {name!r} is not a valid Triton model name "
                                 "(letters, digits, '_', '-', '.')")
        return endpoints

    def task(self, name: str) -> str:
        spec = self.endpoints[name]
        return spec.task or ("embedding" if name.endswith("embed") else "chat")


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    # pydantic reports which alternative of a union or validator failed; users need the field path.
    loc = [part for part in loc if not part.startswith(("function-", "literal[", "constrained-"))]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    if len(loc) >= 2 and loc[0] == "endpoints":
        field = ".".join(loc[2:]) or "(the entry)"
        return f"endpoint {loc[1]}: field {field}: {message}"
    return f"field {'.'.join(loc) or '(top level)'}: {message}"


def parse_manifest(data: Any, base_dir: Path | None = None) -> PipelineManifest:
    """Validate a loaded manifest; relative source paths are taken from `base_dir`."""
    try:
        manifest = PipelineManifest.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(error) for error in exc.errors())
        raise ManifestError(f"invalid manifest:\n  {problems}") from None
    if base_dir is None:
        return manifest
    endpoints = {}
    for name, spec in manifest.endpoints.items():
        path = spec.source.path
        if path is not None and not path.expanduser().is_absolute():
            spec = spec.model_copy(update={"source": spec.source.model_copy(update={"path": base_dir / path})})
        elif path is not None:
            spec = spec.model_copy(update={"source": spec.source.model_copy(update={"path": path.expanduser()})})
        endpoints[name] = spec
    return manifest.model_copy(update={"endpoints": endpoints})


def load_manifest(path: str | Path) -> PipelineManifest:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a mapping with `endpoints:`, got {type(data).__name__}")
    try:
        return parse_manifest(data, base_dir=path.parent.absolute())
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
