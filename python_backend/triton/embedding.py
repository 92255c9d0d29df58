"""Triton embedding model (`mistral-embed`): a dynamic batch of texts -> unit vectors.

Config parameter `runtime`: `pytorch` (default) runs the checkpoint in `model_dir`; `onnx` runs the exported
ONNX embedder in `onnx_dir` (relative to the model version directory, where the repository renderer copies
it) with ONNX Runtime. Both answer with the same tensors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from plateforme.python_backend.embeddings import Embedder, OnnxEmbedder
from plateforme.python_backend.triton import tensors as t


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        threads = t.int_parameter(params, "num_threads", 0)
        runtime = params.get("runtime", "pytorch")
        if runtime == "pytorch":
            if threads > 0:
                torch.set_num_threads(threads)
            self.embedder = Embedder(params["model_dir"])
        elif runtime == "onnx":
            if "onnx_dir" not in params:
                raise ValueError("runtime onnx needs the config parameter onnx_dir")
            version_dir = Path(args["model_repository"]) / args["model_version"]
            self.embedder = OnnxEmbedder(version_dir / params["onnx_dir"], num_threads=threads)
        else:
            raise ValueError(f"config parameter runtime={runtime!r}: expected pytorch or onnx")

    def execute(self, requests):
        # Embed every valid text of the dynamic batch in one forward pass.
        texts, owners, responses = [], [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                batch = [t.text(v) for v in t.optional_array(request, "text_input").reshape(-1)]
                if not all(s.strip() for s in batch):
                    raise t.InputError("every input must be non-empty text (not blank)")
            except ValueError as exc:
                responses[index] = t.error_response(exc)
                continue
            owners.append((index, len(texts), len(batch)))
            texts.extend(batch)
        if texts:
            vectors, counts = self.embedder.embed(texts)
            for index, start, size in owners:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("embedding", vectors[start:start + size].astype(np.float32)),
                    pb_utils.Tensor(
                        "num_input_tokens", np.array(counts[start:start + size], dtype=np.int32).reshape(-1, 1)
                    ),
                ])
        return responses
