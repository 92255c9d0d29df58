"""Triton BLS model: the endpoint's chain (tokenize -> engine) driven from Python.

It takes the ensemble's inputs and returns its outputs, but detokenizes the engine's stream with
state of its own, so streamed text is exact whichever engine runs behind it (the TensorRT-LLM
backend sends no decoding context with its streamed tokens).
"""
from __future__ import annotations

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from plateforme.python_backend.detokenization import IncrementalDetokenizer
from plateforme.python_backend.tokenization import load_tokenizer
from plateforme.python_backend.triton import tensors as t

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

# endpoint input -> preprocessing input
PREPROCESSING_INPUTS = {
    "text_input": "QUERY", "messages": "MESSAGES", "max_tokens": "REQUEST_OUTPUT_LEN",
    "bad_words": "BAD_WORDS_DICT", "stop_words": "STOP_WORDS_DICT", "end_id": "END_ID", "pad_id": "PAD_ID",
}
# preprocessing output -> engine input
TOKENIZED_INPUTS = {
    "INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths", "REQUEST_OUTPUT_LEN": "request_output_len",
    "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id", "STOP_WORDS_IDS": "stop_words_list",
    "BAD_WORDS_IDS": "bad_words_list",
}
# endpoint input -> engine input
ENGINE_INPUTS = {
    "top_k": "runtime_top_k", "top_p": "runtime_top_p", "temperature": "temperature",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens", "seed": "seed",
    "return_log_probs": "return_log_probs", "exclude_input_in_output": "exclude_input_in_output",
    "beam_width": "beam_width", "num_return_sequences": "num_return_sequences", "stream": "streaming",
    "guided_decoding_guide_type": "guided_decoding_guide_type", "guided_decoding_guide": "guided_decoding_guide",
}
PASSED_THROUGH = ("cum_log_probs", "output_log_probs", "num_input_tokens", "num_output_tokens", "finish_reason")


class TritonPythonModel:
    def initialize(self, args):
        params = t.model_parameters(args)
        self.preprocessing = params["preprocessing_model"]
        self.engine = params["engine_model"]
        self.tokenizer = load_tokenizer(params["tokenizer_dir"])
        self.threads: set[threading.Thread] = set()

    def execute(self, requests):
        for request in requests:
            worker = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.threads.add(worker)
            worker.start()
        return None

    def finalize(self):
        for worker in list(self.threads):
            worker.join(timeout=30)

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except _DownstreamError as exc:  # the composing model's own error, code and all
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=exc.error), flags=FINAL)
        except Exception as exc:  # every request gets an answer, whatever failed
            sender.send(t.error_response(exc), flags=FINAL)
        finally:
            self.threads.discard(threading.current_thread())

    def _generate(self, request, sender):
        tokenized = self._call(self.preprocessing, _inputs(request, PREPROCESSING_INPUTS))
        engine_inputs = [
            pb_utils.Tensor(engine_name, pb_utils.get_output_tensor_by_name(tokenized, name).as_numpy())
            for name, engine_name in TOKENIZED_INPUTS.items()
        ] + _inputs(request, ENGINE_INPUTS)
        streaming = bool(t.scalar(request, "stream", 0, bool, False))
        responses = pb_utils.InferenceRequest(
            model_name=self.engine, inputs=engine_inputs, requested_output_names=[]
        ).exec(decoupled=True)
        # One detokenizer and last response per sequence (num_return_sequences), by sequence_index.
        detokenizers: dict[int, IncrementalDetokenizer] = {}
        lasts: dict[int, object] = {}
        for response in responses:
            if sender.is_cancelled():
                # Stopped by its id: the python backend of Triton 2.51 cannot cancel a BLS request.
                engine_id = pb_utils.get_output_tensor_by_name(response, "engine_request_id")
                if engine_id is not None:
                    t.stop_engine_request(self.engine, t.text(engine_id.as_numpy().reshape(-1)[0]))
                break
            if response.has_error():
                raise _DownstreamError(response.error())
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:  # an empty final response
                continue
            lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()
            tokens = ids.as_numpy()[0, 0, : int(lengths[0, 0])].tolist()
            index = _sequence_index(response)
            detokenizer = detokenizers.setdefault(index, IncrementalDetokenizer(self.tokenizer))
            text = detokenizer.push(tokens)
            lasts[index] = response
            if streaming:
                sender.send(_response(text, response, index))
        if streaming or not lasts:
            sender.send(flags=FINAL)
        else:
            indices = sorted(lasts)
            for index in indices:
                flags = FINAL if index == indices[-1] else 0
                sender.send(_response(detokenizers[index].text, lasts[index], index), flags=flags)

    def _call(self, model_name, inputs):
        response = pb_utils.InferenceRequest(
            model_name=model_name, inputs=inputs, requested_output_names=list(TOKENIZED_INPUTS)
        ).exec()
        if response.has_error():
            raise _DownstreamError(response.error())
        return response


class _DownstreamError(Exception):
    def __init__(self, error):
        super().__init__(error.message())
        self.error = error


def _inputs(request, mapping: dict[str, str]) -> list:
    tensors = []
    for source, target in mapping.items():
        array = t.optional_array(request, source)
        if array is not None:
            tensors.append(pb_utils.Tensor(target, array))
    return tensors


def _sequence_index(engine_response) -> int:
    """Which sequence of the request a response belongs to (0 from engines that do not say)."""
    tensor = pb_utils.get_output_tensor_by_name(engine_response, "sequence_index")
    return 0 if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


def _response(text: str, engine_response, index: int):
    outputs = [t.string_tensor("text_output", [[text.encode("utf-8")]]),
               pb_utils.Tensor("sequence_index", np.array([[index]], dtype=np.int32))]
    for name in PASSED_THROUGH:
        tensor = pb_utils.get_output_tensor_by_name(engine_response, name)
        if tensor is not None:
            outputs.append(pb_utils.Tensor(name, tensor.as_numpy()))
    return pb_utils.InferenceResponse(output_tensors=outputs)
