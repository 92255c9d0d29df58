"""Triton `preprocessing` model: text or chat request -> token ids (tensorrtllm_backend names)."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from plateforme.python_backend.chat import parse_chat_request
from plateforme.python_backend.context import context_length
from plateforme.python_backend.tokenization import load_tokenizer
from plateforme.python_backend.triton import tensors as t


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.context = context_length(params["tokenizer_dir"], t.int_parameter(params, "max_seq_len", 0))
        # max_tokens of a request that gives none; 0: the rest of the context (Mistral's API).
        self.default_max_tokens = t.int_parameter(params, "default_max_tokens", 0)
        self.tensors = t.TensorCache()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._encode(t.input_arrays(request)))
            except (ValueError, UnicodeDecodeError) as exc:
                responses.append(t.error_response(exc))
        return responses

    def _encode(self, inputs: dict):
        rows = max(t.batch_size(inputs, "QUERY"), t.batch_size(inputs, "MESSAGES"))
        ids, lengths, out_lens, stops, bads, end_ids, pad_ids = [], [], [], [], [], [], []
        for row in range(rows):
            prompt = self._prompt_ids(inputs, row)
            self._check_prompt_length(len(prompt))
            # Without a default, the rest of the context (no more: TensorRT-LLM refuses prompt +
            # request_output_len beyond its max_seq_len).
            max_tokens = t.scalar(inputs, "REQUEST_OUTPUT_LEN", row, int,
                                  self.default_max_tokens or self.context - len(prompt))
            self._check_max_tokens(max_tokens)
            ids.append(prompt)
            lengths.append(len(prompt))
            out_lens.append(max_tokens)
            stops.append(self._word_lists(t.strings(inputs, "STOP_WORDS_DICT", row), "stop"))
            bads.append(self._word_lists(t.strings(inputs, "BAD_WORDS_DICT", row), "bad"))
            end_ids.append(t.scalar(inputs, "END_ID", row, int, self.tokenizer.eos_id))
            pad_ids.append(t.scalar(inputs, "PAD_ID", row, int, self.tokenizer.pad_id))
        width = max(lengths)
        input_ids = np.full((rows, width), self.tokenizer.pad_id, dtype=np.int32)
        for row, prompt in enumerate(ids):
            input_ids[row, : len(prompt)] = prompt

        def column(name, values):
            return self.tensors.tensor(name, tuple(values), lambda: np.array(values, dtype=np.int32).reshape(rows, 1))

        def words(name, per_row):  # cached when no row has words, the usual case
            return self.tensors.tensor(name, None if any(per_row) else rows, lambda: _stack_word_lists(per_row))

        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("INPUT_ID", input_ids),
            column("REQUEST_INPUT_LEN", lengths),
            column("REQUEST_OUTPUT_LEN", out_lens),
            words("STOP_WORDS_IDS", stops),
            words("BAD_WORDS_IDS", bads),
            column("OUT_END_ID", end_ids),
            column("OUT_PAD_ID", pad_ids),
        ])

    def _prompt_ids(self, inputs: dict, row: int) -> list[int]:
        query = t.scalar(inputs, "QUERY", row, t.text, "")
        messages = t.scalar(inputs, "MESSAGES", row, t.text, "")
        if query and messages:
            raise t.InputError("give either text_input or messages, not both")
        if messages:
            return self.tokenizer.encode_chat(parse_chat_request(messages))
        if not query:
            raise t.InputError("text_input (a prompt) or messages (a chat request) is required and must not be empty")
        return self.tokenizer.encode_text(query)

    def _check_prompt_length(self, prompt_len: int) -> None:
        if prompt_len >= self.context:
            raise t.InputError(
                f"the prompt has {prompt_len} tokens but the model's context is {self.context} tokens"
            )

    def _check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens <= 0:
            raise t.InputError(f"max_tokens must be a positive integer, got {max_tokens}")
        if max_tokens > self.context:
            raise t.InputError(f"max_tokens={max_tokens} exceeds the model's context of {self.context} tokens")

    def _word_lists(self, words: list[str], kind: str) -> list[list[int]]:
        lists = []
        for word in words:
            spellings = self.tokenizer.word_spellings(word)
            if not all(spellings):
                raise t.InputError(f"{kind} word {word!r} encodes to no tokens")
            lists.extend(spellings)
        return lists


def _stack_word_lists(per_row: list[list[list[int]]]) -> np.ndarray:
    """[batch, 2, n] word lists, padded to the widest row."""
    lists = [t.word_list(words) for words in per_row]
    width = max(array.shape[1] for array in lists)
    out = np.full((len(lists), 2, width), -1, dtype=np.int32)
    for row, array in enumerate(lists):
        out[row, :, : array.shape[1]] = array
        out[row, 0, array.shape[1]:] = 0
    return out
