"""Which public endpoints a Triton server serves, and the Triton model behind each name.

The chat endpoints of a rendered repository are ensembles named like the endpoint, beside their
`-preprocessing`, `-engine`, `-postprocessing` (and `-bls`) models; an embedding endpoint is one
model with an `embedding` output. La Plateforme's later names are aliases of the launch names.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Literal

PUBLIC_ENDPOINTS = ("mistral-tiny", "mistral-small", "mistral-medium", "mistral-embed")
ALIASES = {"open-mistral-7b": "mistral-tiny", "open-mixtral-8x7b": "mistral-small",
           "open-mixtral-8x22b": "mistral-medium"}
_CHAT_PARTS = ("-preprocessing", "-engine", "-postprocessing", "-bls")


@dataclass(frozen=True)
class Endpoint:
    id: str  # the public name clients send
    model: str  # the Triton model it calls
    kind: Literal["chat", "embedding"]
    created: int = 0
    function_calling: bool = False  # a chat endpoint whose tokenizer encodes `tools`
    max_context_length: int | None = None  # a chat endpoint's prompt + answer, in tokens

    def card(self) -> dict:
        """The endpoint as Mistral's API describes a model (GET /v1/models). `type` "base" (not a
        fine-tuned model): Mistral's SDK needs it to tell the two kinds of card apart."""
        chat = self.kind == "chat"
        card = {"id": self.id, "object": "model", "type": "base", "created": self.created, "owned_by": "plateforme",
                "root": self.model, "capabilities": {"completion_chat": chat, "function_calling": self.function_calling,
                                                     "embedding": not chat}}
        if self.max_context_length:
            card["max_context_length"] = self.max_context_length
        return card

    @property
    def engine_model(self) -> str | None:
        """The engine model of a chat endpoint's ensemble (the one that takes tensorrtllm's `stop`)."""
        return f"{self.model}-engine" if self.kind == "chat" else None


@dataclass
class Registry:
    """Endpoints discovered from a server's repository index, refreshed at most every `ttl` seconds."""

    url: str
    protocol: str = "grpc"
    ttl: float = 5.0
    _endpoints: dict[str, Endpoint] = field(default_factory=dict)
    _loaded_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        from plateforme.clients.triton_client import triton_address

        self.url = triton_address(self.url, self.protocol)

    def endpoints(self, refresh: bool = False) -> list[Endpoint]:
        """Served endpoints; raises ServerUnavailableError when Triton cannot be reached."""
        with self._lock:
            if refresh or time.monotonic() - self._loaded_at > self.ttl:
                found = {e.id: e for e in discover(self.url, self.protocol)}
                # An endpoint keeps the time it was first seen serving the same model.
                self._endpoints = {name: replace(e, created=self._endpoints[name].created)
                                   if name in self._endpoints and self._endpoints[name].model == e.model else e
                                   for name, e in found.items()}
                self._loaded_at = time.monotonic()
            return list(self._endpoints.values())

    def cached(self, name: str) -> Endpoint | None:
        """The endpoint called `name` if the last look at the server is fresh and found it; never blocks."""
        if time.monotonic() - self._loaded_at <= self.ttl:
            return self._endpoints.get(name)
        return None

    def get(self, name: str) -> Endpoint | None:
        """The endpoint called `name`, looking again at the server once if it is not known."""
        found = {e.id: e for e in self.endpoints()}.get(name)
        if found is None:
            found = {e.id: e for e in self.endpoints(refresh=True)}.get(name)
        return found


def discover(url: str, protocol: str = "grpc") -> list[Endpoint]:
    """Public names (and aliases) of the ready chat and embedding models, then the other served
    endpoints under their own names."""
    from plateforme.clients.sdk import ServerUnavailableError, classify
    from tritonclient.utils import InferenceServerException

    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    client = module.InferenceServerClient(url)
    try:
        if protocol == "grpc":
            index = [{"name": m.name, "state": m.state} for m in client.get_model_repository_index().models]
        else:
            index = client.get_model_repository_index()
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        kinds: dict[str, str] = {}
        chat_facts: dict[str, dict] = {}
        for name in sorted(ready):
            if name.endswith(_CHAT_PARTS):
                continue
            if f"{name}-preprocessing" in ready and f"{name}-engine" in ready:
                kinds[name] = "chat"
                parameters = _config_parameters(client, name, protocol)
                context = parameters.get("max_context_length", "")
                # Without the parameters (a repository rendered by another tool): tools allowed, context unknown.
                chat_facts[name] = {"function_calling": parameters.get("function_calling") != "false",
                                    "max_context_length": int(context) if context.isdigit() else None}
            elif _has_embedding_output(client, name, protocol):
                kinds[name] = "embedding"
    except InferenceServerException as exc:
        raise classify(exc) from None
    except OSError as exc:
        raise ServerUnavailableError(f"Triton at {url} is unreachable: {exc}") from None
    finally:
        client.close()
    now = int(time.time())
    named = [(name, name) for name in PUBLIC_ENDPOINTS if name in kinds]
    named += [(alias, target) for alias, target in ALIASES.items() if target in kinds]
    named += [(name, name) for name in kinds if name not in PUBLIC_ENDPOINTS]
    return [Endpoint(name, target, kinds[target], now, **chat_facts.get(target, {})) for name, target in named]


def _config_parameters(client, name: str, protocol: str) -> dict[str, str]:
    """The string parameters of a model's config."""
    if protocol == "grpc":
        return {key: value.string_value for key, value in client.get_model_config(name).config.parameters.items()}
    return {key: value.get("string_value", "") for key, value in
            client.get_model_config(name).get("parameters", {}).items()}


def _has_embedding_output(client, name: str, protocol: str) -> bool:
    if protocol == "grpc":
        outputs = [o.name for o in client.get_model_metadata(name).outputs]
    else:
        outputs = [o["name"] for o in client.get_model_metadata(name).get("outputs", [])]
    return "embedding" in outputs
