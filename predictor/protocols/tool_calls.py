"""Tool calling for chat completions: tools into the prompt, the model's text back into ``tool_calls``.

The prompt. Tools reach the model through its chat template (``tools=`` in ``apply_chat_template``),
with the conversation in the structure templates expect (an assistant's ``tool_calls`` with
``arguments`` as an object, ``tool`` messages with their ``tool_call_id``). A template that never
mentions ``tools`` gets the documented fallback instead: the tools are described in a system message,
in the Hermes format below, earlier calls are written back as ``<tool_call>`` text and tool results
as user messages in ``<tool_response>`` tags.

The answer, by ``tool_choice``:

- ``auto`` (the default with tools): a parser for the model's own format turns its text into calls:
  ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Qwen 2.5/3, SmolLM3, Hermes,
  and the fallback above) or ``llama3_json`` (the whole answer is ``{"name": ..., "parameters": {...}}``,
  possibly after ``<|python_tag|>``, several separated by ``;``). ``--tool_call_parser auto`` picks
  by the chat template's text.
- ``required``: decoding is constrained (``engine/structured.py``) to a JSON array of
  ``{"name": <one of the tools>, "arguments": <its parameters schema>}`` (one item when
  ``parallel_tool_calls`` is false), parsed by the same JSON parser.
- a named function: decoding is constrained to that function's parameters schema; the text is the
  arguments.

Every parser is incremental (``feed`` text deltas, then ``finish``): streaming sends each call's id and
name as soon as they are known and then the arguments as they grow; text that might still open a call
(a partial ``<tool_call>``) is held back; text outside calls is content. A non-streaming answer is the
same parser fed the whole text at once, so both agree.

Over 400 lines because the prompt side and the answer side share the formats: each parser reads back exactly what the
fallback prompt and the constrained schemas write, and keeping them together keeps the two in step.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..sampling import GrammarSpec
from .schema import ChatMessage, Tool, closed, json_schema_spec

PARSERS = ("hermes", "llama3_json")

FALLBACK_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ---- the prompt ------------------------------------------------------------------------------------


def template_supports_tools(template: str) -> bool:
    """Whether the chat template reads a ``tools`` variable (not merely the word in its text)."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except jinja2.TemplateSyntaxError:  # tags of transformers' own ({% generation %}): fall back to the text
        return re.search(r"\btools\b", template) is not None


def detect_parser(template: str) -> str:
    """``--tool_call_parser auto``: the format the chat template teaches the model."""
    if "<|python_tag|>" in template or ('"parameters"' in template and "<tool_call>" not in template):
        return "llama3_json"
    return "hermes"  # Hermes-style templates, and the fallback prompt for templates without tools


def prompt_messages(messages: list[ChatMessage], tools: list[Tool], template: str) -> tuple[list[dict], list[dict] | None]:
    """The messages (and tools) to render with ``template``: (messages, tools for ``apply_chat_template`` or None)."""
    native = template_supports_tools(template)
    out: list[dict] = []
    for m in messages:
        text = m.text()
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.tool_calls:
            calls = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},  # an object: checked by the schema
                }
                for c in m.tool_calls
            ]
            if native:
                message["tool_calls"] = calls
            else:
                written = "\n".join(
                    f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}\n</tool_call>" for c in calls
                )
                message["content"] = f"{text}\n{written}" if text else written
        if m.role == "tool":
            if native:
                message["tool_call_id"] = m.tool_call_id
                if m.name:
                    message["name"] = m.name
            else:
                message = {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        out.append(message)
    if not tools:
        return out, None
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools]
    if native:
        return out, tool_dicts
    described = FALLBACK_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tool_dicts))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}" if out[0]["content"] else described}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, None


# ---- constrained modes -----------------------------------------------------------------------------


def _parameters(tool: Tool) -> dict:
    """The function's arguments schema; with the function's ``strict: true`` (OpenAI's), its objects closed."""
    parameters = tool.function.parameters or {"type": "object", "properties": {}}
    return closed(parameters) if tool.function.strict else parameters


def required_spec(tools: list[Tool], parallel: bool | None) -> GrammarSpec:
    """``tool_choice: required``: a JSON array of calls of the given tools."""
    item = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if parallel is False:
        schema["maxItems"] = 1
    return json_schema_spec(schema, "tools")


def named_spec(tool: Tool) -> GrammarSpec:
    """A named function: its arguments object."""
    return json_schema_spec(_parameters(tool), f"tools.{tool.function.name}.function.parameters")


# ---- parsers -----------------------------------------------------------------------------------------


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # with name: the call's first delta
    name: str | None = None
    arguments: str = ""

    def wire(self) -> dict:
        """OpenAI's streamed ``delta.tool_calls`` item."""
        item: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            item.update(id=self.id, type="function")
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        item["function"] = function
        return item


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __iadd__(self, other: ParsedDelta) -> ParsedDelta:
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_WS = " \t\r\n"


def json_value_end(s: str, i: int = 0) -> int | None:
    """Index just past the JSON value starting at ``s[i]`` (after whitespace), or None while incomplete."""
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    if i >= n:
        return None
    c = s[i]
    if c in "{[":
        depth, in_string, escaped = 0, False, False
        for j in range(i, n):
            ch = s[j]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
        return None
    if c == '"':
        escaped = False
        for j in range(i + 1, n):
            if escaped:
                escaped = False
            elif s[j] == "\\":
                escaped = True
            elif s[j] == '"':
                return j + 1
        return None
    j = i
    while j < n and s[j] not in ",}]" + _WS:
        j += 1
    return j if j < n else None


class ToolCallParser:
    """Incremental: ``feed`` text deltas, then ``finish``; each returns content and tool-call deltas."""

    def __init__(self) -> None:
        self.calls = 0  # tool calls started

    def feed(self, text: str) -> ParsedDelta:
        raise NotImplementedError

    def finish(self) -> ParsedDelta:
        raise NotImplementedError


class _CallScanner:
    """One call object ``{"name": ..., "arguments": {...}}`` as its text grows; the header (id, name) as
    soon as the name is known, then the arguments as they are written."""

    def __init__(self, index: int):
        self.index = index
        self.header_sent = False
        self.args_sent = 0

    def scan(self, body: str, out: ParsedDelta) -> tuple[int | None, bool]:
        """``body`` starts at the object's ``{``. Returns (end of the object or None, whether it is a call)."""
        m = _HEADER.match(body)
        if m is not None:
            start = m.end()
            while start < len(body) and body[start] in _WS:
                start += 1
            if start < len(body) and body[start] == "{":
                if not self.header_sent:
                    out.tool_calls.append(ToolCallDelta(self.index, new_call_id(), json.loads(f'"{m.group(1)}"')))
                    self.header_sent = True
                args_end = json_value_end(body, start)
                upto = args_end if args_end is not None else len(body)
                if upto - start > self.args_sent:
                    out.tool_calls.append(ToolCallDelta(self.index, arguments=body[start + self.args_sent : upto]))
                    self.args_sent = upto - start
        end = json_value_end(body, 0)
        if end is None or self.header_sent:
            return end, True
        try:  # the object is complete but not in the streamable shape: a call only if it has the keys
            obj = json.loads(body[:end])
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses: text, not a call
            return end, False
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not ({"arguments", "parameters"} & obj.keys()):
            return end, False
        args = obj.get("arguments", obj.get("parameters"))
        out.tool_calls.append(ToolCallDelta(self.index, new_call_id(), obj["name"], args if isinstance(args, str) else json.dumps(args)))
        self.header_sent = True
        return end, True


class HermesParser(ToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the text, any number of times."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.gap = ""
        self.call: _CallScanner | None = None  # inside <tool_call>

    def feed(self, text: str) -> ParsedDelta:
        self.buf += text
        out = ParsedDelta()
        while True:
            if self.call is None:
                i = self.buf.find(self.START)
                if i >= 0:
                    before = self.buf[:i].rstrip()
                    out.content += before
                    self.gap = self.buf[len(before) : i]  # whitespace before the tag: dropped if a call follows
                    self.buf = self.buf[i + len(self.START) :]
                    self.call = _CallScanner(self.calls)
                    continue
                # trailing whitespace waits: it may only separate text from a call
                ready = self.buf[: len(self.buf) - _partial_suffix(self.buf, self.START)].rstrip()
                out.content += ready
                self.buf = self.buf[len(ready) :]
                return out
            body = self.buf.lstrip()
            if not body:
                return out
            if body[0] != "{":  # not JSON: wait for the closing tag and pass the block through as content
                j = self.buf.find(self.END)
                if j < 0:
                    return out
                out.content += self.gap + self.START + self.buf[: j + len(self.END)]
                self.buf, self.call = self.buf[j + len(self.END) :], None
                continue
            end, is_call = self.call.scan(body, out)
            if end is None:
                return out
            rest = body[end:].lstrip()
            if not is_call:
                out.content += self.gap + self.START + self.buf[: len(self.buf) - len(body) + end]
                self.buf, self.call = body[end:], None
                continue
            if rest.startswith(self.END):
                self.buf = rest[len(self.END) :]
            elif self.END.startswith(rest):
                return out  # the closing tag may still come
            else:
                self.buf = body[end:]
            self.call = None
            self.calls += 1

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.call is not None:
            if self.call.header_sent:  # cut inside the arguments: the call ends as it is
                self.calls += 1
            else:
                out.content += self.gap + self.START + self.buf
        elif self.buf.strip() or not self.calls:
            out.content += self.buf
        self.buf, self.call = "", None
        return out


class JsonCallsParser(ToolCallParser):
    """An answer that is JSON calls: ``{"name": ..., "parameters"|"arguments": {...}}``, optionally after
    ``<|python_tag|>``, several separated by ``;`` or in a ``[...]`` list (Llama 3.x's JSON tool calls, and
    the constrained ``tool_choice: required`` output). An answer that does not start with ``{`` or ``[``
    is content."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.raw = ""  # everything fed, for an answer that turns out not to be calls
        self.buf = ""
        self.state = "start"  # start → calls → text, or start → text
        self.call: _CallScanner | None = None

    def feed(self, text: str) -> ParsedDelta:
        self.raw += text
        self.buf += text
        out = ParsedDelta()
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(self.PYTHON_TAG):
                head = head[len(self.PYTHON_TAG) :].lstrip()
            if not head or self.PYTHON_TAG.startswith(head):
                return out
            if head[0] in "{[":
                self.state, self.buf = "calls", head
            else:
                self.state = "text"
        if self.state == "text":
            out.content += self.buf
            self.buf = ""
            return out
        while True:
            self.buf = self.buf.lstrip(_WS + ";,[]")
            if not self.buf:
                return out
            if self.buf[0] != "{":
                return self._to_text(out)
            if self.call is None:
                self.call = _CallScanner(self.calls)
            end, is_call = self.call.scan(self.buf, out)
            if end is None:
                return out
            if not is_call:
                return self._to_text(out)
            self.buf, self.call = self.buf[end:], None
            self.calls += 1

    def _to_text(self, out: ParsedDelta) -> ParsedDelta:
        """What remains is not calls: content from here on (all of it if no call was found)."""
        out.content += self.buf if self.calls else self.raw
        self.state, self.buf = "text", ""
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.call is not None and self.call.header_sent:
            self.calls += 1
        elif self.state == "start" or (self.state == "calls" and self.buf.strip()):
            out.content += self.buf if self.calls else self.raw
        self.buf, self.call = "", None
        return out


class NamedCallParser(ToolCallParser):
    """``tool_choice`` naming a function: the whole (constrained) answer is that call's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if not self.calls:
            out.tool_calls.append(ToolCallDelta(0, new_call_id(), self.name))
            self.calls = 1
        if text:
            out.tool_calls.append(ToolCallDelta(0, arguments=text))
        return out

    def finish(self) -> ParsedDelta:
        return self.feed("") if not self.calls else ParsedDelta()


def make_parser(kind: str) -> ToolCallParser:
    if kind == "hermes":
        return HermesParser()
    if kind == "llama3_json":
        return JsonCallsParser()
    raise ValueError(f"unknown tool call parser {kind!r}; choose from {', '.join(PARSERS)}")


def parse_text(parser: ToolCallParser, text: str) -> tuple[str | None, list[dict]]:
    """A whole answer: (content, OpenAI ``tool_calls``); content is None when it is only whitespace around calls."""
    delta = parser.feed(text)
    delta += parser.finish()
    return collect(delta)


def collect(delta: ParsedDelta) -> tuple[str | None, list[dict]]:
    calls: dict[int, dict] = {}
    for d in delta.tool_calls:
        call = calls.setdefault(d.index, {"id": d.id, "type": "function", "function": {"name": d.name, "arguments": ""}})
        call["function"]["arguments"] += d.arguments
    content: str | None = delta.content
    if calls and not content.strip():
        content = None
    return content, [calls[i] for i in sorted(calls)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
