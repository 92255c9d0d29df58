"""The smoke stage: a real tritonserver on the rendered repository, a chat, a streamed chat and
embeddings through it, then a clean stop."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SMOKE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
SMOKE_MAX_TOKENS = 16
SMOKE_TEXTS = ["Paris is the capital of France.", "The French capital is Paris."]


class SmokeError(RuntimeError):
    """The served repository did not answer as it must; the message names the endpoint."""


def _server(config):
    """A tritonserver for the repository: one process, or one MPI rank per GPU when its TensorRT-LLM
    engines span several GPUs (the launch `plateforme repo` records in plateforme.json)."""
    import json

    from plateforme.builders.engine_manifest import RENDER_RECORD
    from plateforme.builders.repository import launch_command
    from plateforme.server import TritonServer

    rendered = json.loads((Path(config.model_repository) / RENDER_RECORD).read_text())
    if "launch" not in rendered:
        return TritonServer(config)
    world_size = max(e.get("world_size", 1) for e in rendered["chat"].values())
    engine_models = [f"{name}-engine" for name, e in rendered["chat"].items() if e.get("engine") == "tensorrtllm"]

    class MpiTritonServer(TritonServer):  # pragma: no cover - needs GPUs and TensorRT-LLM
        def command(self) -> list[str]:
            return launch_command(self.config.model_repository, world_size, engine_models,
                                  tritonserver=str(self.install.binary), http_port=self.config.http_port,
                                  grpc_port=self.config.grpc_port, metrics_port=self.config.metrics_port)

    return MpiTritonServer(config)


def smoke_test(repository: Path, chat: list[str], embeddings: dict[str, int], log_file: Path) -> dict[str, Any]:
    """Serve `repository` and call every endpoint: `chat` names, `embeddings` name -> expected dimension.
    Greedy decoding makes the streamed answer comparable with the unstreamed one: they must be equal."""
    from plateforme.clients.triton_client import EndpointError, GenerationParams, TritonEndpoints
    from plateforme.server import ServerConfig, free_port

    config = ServerConfig(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=log_file)
    report: dict[str, Any] = {}
    server = _server(config)
    with server:
        client = TritonEndpoints(server.grpc_url)
        params = GenerationParams(max_tokens=SMOKE_MAX_TOKENS, temperature=0.0)
        for name in chat:
            try:
                whole = client.complete(name, messages=SMOKE_MESSAGES, params=params)
                chunks = list(client.generate(name, messages=SMOKE_MESSAGES, params=params, stream=True))
            except EndpointError as exc:
                raise SmokeError(f"endpoint {name}: {exc}") from None
            streamed = "".join(chunk.text for chunk in chunks)
            if not whole.text.strip() or not whole.num_output_tokens:
                raise SmokeError(f"endpoint {name}: an empty answer ({whole})")
            if streamed != whole.text:
                raise SmokeError(f"endpoint {name}: the streamed answer {streamed!r} differs from the unstreamed "
                                 f"one {whole.text!r} (greedy decoding)")
            report[name] = {"answer": whole.text, "chunks": len(chunks), "output_tokens": whole.num_output_tokens,
                            "finish_reason": whole.finish_reason}
        for name, dim in embeddings.items():
            try:
                vectors, counts = client.embed(name, SMOKE_TEXTS)
            except EndpointError as exc:
                raise SmokeError(f"endpoint {name}: {exc}") from None
            norms = np.linalg.norm(vectors, axis=1)
            if vectors.shape != (len(SMOKE_TEXTS), dim) or not np.allclose(norms, 1.0, atol=1e-3):
                raise SmokeError(f"endpoint {name}: expected {len(SMOKE_TEXTS)} unit vectors of {dim} dimensions, "
                                 f"got shape {vectors.shape}, norms {norms.round(4).tolist()}")
            report[name] = {"dim": dim, "tokens": list(counts), "cosine": float(vectors[0] @ vectors[1])}
    return report
