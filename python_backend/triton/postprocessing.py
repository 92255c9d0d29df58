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


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._decode(request))
            except ValueError as exc:
                responses.append(t.error_response(exc))
        return responses

    def _decode(self, request):
        tokens = t.optional_array(request, "TOKENS_BATCH")  # [batch, beams, tokens]
        lengths = t.optional_array(request, "SEQUENCE_LENGTH")  # [batch, beams]
        prefixes = t.optional_array(request, "PREFIX_IDS")  # [batch, beams, <=16] when streaming
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
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", texts)])
