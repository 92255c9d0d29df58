"""Triton `postprocessing` model: token ids -> text (tensorrtllm_backend names).

A streamed chunk comes with PREFIX_IDS, the tokens streamed just before it: the chunk's text is
what it adds to their decoding, so spaces and multi-byte characters split across tokens come
out exactly as in the full decode.
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from plateforme.python_backend.detokenization import complete_text, decode_increment
from plateforme.python_backend.tokenization import load_tokenizer
from plateforme.python_backend.triton import tensors as t


CACHED_TEXT_BYTES = 32


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.engine_model = params.get("engine_model")
        self.tensors = t.TensorCache()

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = t.input_arrays(request)
            # Asking is an IPC round trip: skipped on a last chunk, whose sequence already ended.
            final = t.scalar(inputs, "FINISH_REASON", 0, t.text, "") != ""
            if not final and request.is_cancelled():
                self._stop_engine(inputs)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)))
                continue
            try:
                responses.append(self._decode(inputs))
            except ValueError as exc:
                responses.append(t.error_response(exc))
        return responses

    def _decode(self, inputs: dict):
        tokens = t.optional_array(inputs, "TOKENS_BATCH")  # [batch, beams, tokens]
        lengths = t.optional_array(inputs, "SEQUENCE_LENGTH")  # [batch, beams]
        prefixes = t.optional_array(inputs, "PREFIX_IDS")  # [batch, beams, <=16] when streaming
        if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
            raise t.InputError(
                f"TOKENS_BATCH {list(tokens.shape)} and SEQUENCE_LENGTH {list(lengths.shape)} do not match"
            )
        texts = np.empty(tokens.shape[:2], dtype=object)
        for row in range(tokens.shape[0]):
            for beam in range(tokens.shape[1]):
                ids = tokens[row, beam, : lengths[row, beam]].tolist()
                if prefixes is not None and prefixes.shape[-1] > 0:
                    prefix = [i for i in prefixes[row, beam].tolist() if i >= 0]
                    text = decode_increment(self.tokenizer, prefix, ids)
                else:
                    text = complete_text(self.tokenizer, ids)
                texts[row, beam] = text.encode("utf-8")
        # A streamed chunk's text (a token or two) comes back often: cached when short.
        short = sum(len(text) for text in texts.flat) <= CACHED_TEXT_BYTES
        key = (texts.shape, *texts.flat) if short else None
        return pb_utils.InferenceResponse(output_tensors=[self.tensors.tensor("OUTPUT", key, lambda: texts)])

    def _stop_engine(self, inputs: dict) -> None:
        """Free the engine's slot of a cancelled stream: the engine itself is never told."""
        engine_id = t.scalar(inputs, "ENGINE_REQUEST_ID", 0, t.text, "")
        if engine_id and self.engine_model:
            t.stop_engine_request(self.engine_model, engine_id)
