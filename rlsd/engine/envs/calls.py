"""The tool-call syntax: how tools are shown to the model, how its calls are read, how results
come back, and how a call's arguments are checked against the tool's schema.

One syntax, the Hermes / Qwen form, plain text that any chat template carries:

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "3 + 4"}}
    </tool_call>

A call is a JSON object with a string `name` and an object `arguments` (may be left out when
the tool takes none) between `<tool_call>` and `</tool_call>`. A turn may hold text before its
calls and several calls; each result comes back in order, each between `<tool_response>` and
`</tool_response>` on its own lines. A turn with no `<tool_call>` at all is the final answer. A
`<tool_call>` left open at the end of the turn, JSON that does not parse, or an object of the
wrong shape is a malformed call: it runs nothing and its error comes back as its result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ...schema.sections import ANSWER_LINE

OPEN, CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_RESPONSE = re.compile(
    re.escape(RESPONSE_OPEN) + r"\n?(.*?)\n?" + re.escape(RESPONSE_CLOSE), re.DOTALL
)
SHOWN = 200  # characters of a malformed call quoted back to the model


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: the tool's name and its arguments (not yet checked)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Malformed:
    """A call that could not be read: why, and what was written (shortened)."""

    reason: str
    text: str


def parse_tool_calls(text: str) -> list[ToolCall | Malformed]:
    """The calls of a model turn, in order ([] when it has none: its final answer)."""
    out: list[ToolCall | Malformed] = []
    end = 0
    for match in _CALL.finditer(text):
        out.append(_read_call(match.group(1)))
        end = match.end()
    if OPEN in text[end:]:  # opened and never closed (the turn was cut off)
        rest = text[text.index(OPEN, end) :]
        out.append(Malformed(f"{OPEN} is not closed with {CLOSE}", rest[:SHOWN]))
    return out


def _read_call(body: str) -> ToolCall | Malformed:
    shown = body.strip()[:SHOWN]
    try:
        value = json.loads(body)
    except ValueError as exc:
        return Malformed(f"the call is not valid JSON ({exc})", shown)
    if not isinstance(value, dict):
        return Malformed(f"the call is a JSON {type(value).__name__}, not an object", shown)
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
        return Malformed('the call has no "name" string', shown)
    if not isinstance(arguments, dict):
        return Malformed('the call\'s "arguments" is not a JSON object', shown)
    return ToolCall(name, arguments)


def render_call(name: str, arguments: dict[str, Any]) -> str:
    """A call written in the syntax (what an expert episode writes)."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CLOSE}"


def render_results(texts: list[str]) -> str:
    """The observation for a turn's calls: each result in its tags, in the calls' order."""
    return "\n".join(f"{RESPONSE_OPEN}\n{text}\n{RESPONSE_CLOSE}" for text in texts)


def response_texts(observation: str) -> list[str]:
    """The results inside an observation's `<tool_response>` tags, in order."""
    return _RESPONSE.findall(observation)


def tool_prompt(schemas: list[dict[str, Any]], answer_line: str = ANSWER_LINE) -> str:
    """What the model is told about the tools (given as the JSON schemas that
    `transformers.utils.get_json_schema` builds) and the syntax, ahead of the task."""
    listed = "\n".join(json.dumps(schema) for schema in schemas)
    example = render_call("<tool name>", {"<argument>": "<value>"})
    return (
        f"You can call these tools:\n<tools>\n{listed}\n</tools>\n\n"
        f"To call a tool, write its name and arguments as JSON between the tags:\n{example}\n"
        f"Each result comes back between {RESPONSE_OPEN} and {RESPONSE_CLOSE}. When you know "
        f"the answer, reply without a tool call. {answer_line}"
    )


# ----------------------------------------------------------------------------- arguments

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def check_arguments(schema: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """What is wrong with a call's arguments for a tool's schema (`get_json_schema`'s form:
    {"function": {"parameters": {...}}}), or None. Checks required names, unknown names, and
    each value's type (string, integer, number, boolean, array with its items, object, null,
    unions, nullable, enum); a bool is not a number."""
    params = schema.get("function", {}).get("parameters", {})
    properties = params.get("properties", {})
    missing = [name for name in params.get("required", []) if name not in arguments]
    if missing:
        return f"missing argument {', '.join(repr(m) for m in missing)}"
    unknown = [name for name in arguments if name not in properties]
    if unknown:
        known = ", ".join(properties) or "none"
        return f"unknown argument {', '.join(repr(u) for u in unknown)} (it takes: {known})"
    for name, value in arguments.items():
        problem = _check_value(properties[name], value)
        if problem is not None:
            return f"argument {name!r}: {problem}"
    return None


def _check_value(spec: dict[str, Any], value: Any) -> str | None:
    if value is None and spec.get("nullable"):
        return None
    if "enum" in spec and value not in spec["enum"]:
        return f"{value!r} is not one of {spec['enum']}"
    kinds = spec.get("type")
    if kinds is None:  # (Any: no constraint)
        return None
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not any(_is(kind, value) for kind in kinds):
        return f"expected {' or '.join(kinds)}, got {_json_type(value)}"
    if isinstance(value, list) and isinstance(spec.get("items"), dict):
        for i, item in enumerate(value):
            problem = _check_value(spec["items"], item)
            if problem is not None:
                return f"item {i}: {problem}"
    return None


def _is(kind: str, value: Any) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES.get(kind, (object,)))


def _json_type(value: Any) -> str:
    for kind in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if _is(kind, value):
            return kind
    return type(value).__name__
