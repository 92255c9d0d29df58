"""Clients of plateforme endpoints: tritonclient wrappers, a `mistralai`-shaped SDK, the gateway."""
from plateforme.clients.registry import ALIASES, PUBLIC_ENDPOINTS, Endpoint, Registry
from plateforme.clients.sdk import (
    SAFE_PROMPT, ChatCompletionResponse, CompletionChunk, CompletionEvent, EmbeddingResponse, InvalidRequestError,
    ModelNotFoundError, PlateformeClient, PlateformeError, ServerUnavailableError, ToolCall, parse_tool_calls,
)
from plateforme.clients.triton_client import (
    AnswerTimeoutError, AsyncTransport, EndpointError, GenerationChunk, GenerationParams, Transport, TritonEndpoints,
)

__all__ = [
    "ALIASES", "AnswerTimeoutError", "AsyncTransport", "PUBLIC_ENDPOINTS", "SAFE_PROMPT", "ChatCompletionResponse", "CompletionChunk", "CompletionEvent",
    "EmbeddingResponse", "Endpoint", "EndpointError", "GenerationChunk", "GenerationParams", "InvalidRequestError",
    "ModelNotFoundError", "PlateformeClient", "PlateformeError", "Registry", "ServerUnavailableError", "ToolCall",
    "Transport", "TritonEndpoints", "parse_tool_calls",
]
