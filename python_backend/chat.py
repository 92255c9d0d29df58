"""Chat requests: parse and validate Mistral-API-shaped conversations before they are tokenized.

The checks here are the ones both tokenizer kinds (mistral-common and Hugging Face chat templates)
need; mistral-common adds its own on top. Errors are `ChatRequestError`, with messages meant for
the client.
"""
from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# Keys each role may carry besides "role" (the Mistral API rejects unknown ones too).
_MESSAGE_KEYS = {
    "system": {"content"},
    "user": {"content"},
    "assistant": {"content", "tool_calls"},
    "tool": {"content", "tool_call_id", "name"},
}


class ChatRequestError(ValueError):
    """The chat request is malformed; the message says what to fix."""


def parse_chat_request(text: str | bytes) -> dict[str, Any]:
    """Parse the JSON body of a chat request and return it validated (see `validate_chat_request`)."""
    try:
        request = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatRequestError(f"chat request is not valid JSON: {e}") from e
    return validate_chat_request(request)


def validate_chat_request(request: Any) -> dict[str, Any]:
    """Check the shape of `request` and return a copy with normalized messages.

    Content given as a list of text chunks (`[{"type": "text", "text": ...}]`) is joined into one
    string. Keys other than "messages" and "tools" (sampling parameters...) are kept as they are.
    """
    if not isinstance(request, dict):
        raise ChatRequestError(f"chat request must be a JSON object, got {_type_name(request)}")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("chat request needs a non-empty 'messages' list")
    normalized = [_validate_message(i, message) for i, message in enumerate(messages)]
    if normalized[-1]["role"] == "assistant":
        raise ChatRequestError("the last message must come from the user or a tool, not the assistant")
    out = {**request, "messages": normalized}
    if request.get("tools") is not None:
        out["tools"] = _validate_tools(request["tools"])
    return out


def uses_tools(request: dict[str, Any]) -> bool:
    """Whether a validated request declares tools or carries tool calls / tool results."""
    return bool(request.get("tools")) or any(
        m["role"] == "tool" or m.get("tool_calls") for m in request["messages"]
    )


def _validate_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatRequestError(f"{where} must be an object, got {_type_name(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise ChatRequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
    unknown = set(message) - _MESSAGE_KEYS[role] - {"role"}
    if unknown:
        raise ChatRequestError(f"{where}: unexpected key(s) for a {role} message: {', '.join(sorted(unknown))}")

    out: dict[str, Any] = {"role": role}
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        out["tool_calls"] = _validate_tool_calls(where, tool_calls)
    content = message.get("content")
    # An assistant turn that only calls tools has no text.
    if content is None and out.get("tool_calls"):
        out["content"] = None
    else:
        out["content"] = _validate_content(where, content)
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise ChatRequestError(f"{where}.{key} must be a string, got {_type_name(message[key])}")
            out[key] = message[key]
    return out


def _validate_content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return _unicode(f"{where}.content", content)
    if isinstance(content, list):
        texts = []
        for j, chunk in enumerate(content):
            if not (isinstance(chunk, dict) and chunk.get("type") == "text" and isinstance(chunk.get("text"), str)):
                raise ChatRequestError(
                    f"{where}.content[{j}] must be a text chunk {{\"type\": \"text\", \"text\": \"...\"}}"
                )
            texts.append(chunk["text"])
        return _unicode(f"{where}.content", "".join(texts))
    raise ChatRequestError(f"{where}.content must be a string or a list of text chunks, got {_type_name(content)}")


def _unicode(where: str, text: str) -> str:
    """`text`, refused if a lone surrogate (JSON's "\ud800") makes it no text at all."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ChatRequestError(f"{where} is not valid Unicode text ({exc.reason} at {exc.start})") from None
    return text


def _validate_tool_calls(where: str, tool_calls: Any) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise ChatRequestError(f"{where}.tool_calls must be a list, got {_type_name(tool_calls)}")
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ChatRequestError(f"{where}.tool_calls[{j}] must be an object with a 'function' holding a 'name'")
        if not isinstance(function.get("arguments"), (str, dict)):
            raise ChatRequestError(f"{where}.tool_calls[{j}].function.arguments must be a JSON string or an object")
    return tool_calls


def _validate_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ChatRequestError(f"'tools' must be a list, got {_type_name(tools)}")
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ChatRequestError(f"tools[{j}] must be an object with a 'function' holding a 'name'")
    return tools


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _type_name(value: Any) -> str:
    """JSON name of a parsed value's type, as the client wrote it."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)
