"""The request body of ``POST /v1/responses`` (the OpenAI Responses API), validated at
the edge (pydantic, unknown fields refused) and turned into a core ``Request``.

Input is a string or a list of items: messages (``role`` + a string or ``input_text`` /
``output_text`` parts), ``function_call`` items (a model's earlier calls, sent back) and
``function_call_output`` items (their results). Tools are function tools; ``text.format``
asks for structured output. Options OpenAI accepts that change nothing here (``store``,
``metadata``, ``user``, ...) are accepted and ignored; ``previous_response_id`` is refused:
nothing is stored, so the whole conversation comes in ``input``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from ..request import Message, Request, ResponseFormat, ToolSpec
from .schema import (
    NAME_PATTERN,
    _JSONObjectFormat,
    _TextFormat,
    check_tool_choice,
    to_response_format,
    tool_spec,
)

__all__ = ["ResponsesRequest"]


class _InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text"]
    text: str


class _OutputText(BaseModel):
    """Text of an earlier answer, sent back as part of the conversation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class _Refusal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["refusal"]
    refusal: str


_Part = Annotated[_InputText | _OutputText | _Refusal, Field(discriminator="type")]
_PART_TYPES = ("input_text", "output_text", "refusal")


def _text_only(value: Any) -> Any:
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in _PART_TYPES:
                raise ValueError(f"content parts of type {kind!r} are not supported here"
                                 " (text only: input_text, output_text)")
    return value


def _joined(content: str | list[_InputText | _OutputText | _Refusal]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.refusal if isinstance(p, _Refusal) else p.text for p in content)


class _MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_Part]
    # Present on output messages sent back as they came.
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        return _text_only(value)


class _FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""
    id: str | None = None
    status: str | None = None


class _FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[_Part]
    id: str | None = None
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        return _text_only(value)


def _item_type(value: Any) -> str | None:
    # Easy input messages ({"role", "content"}) have no type.
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", None)
    return kind if kind in ("message", "function_call", "function_call_output") else None


_InputItem = Annotated[
    Annotated[_MessageItem, Tag("message")]
    | Annotated[_FunctionCallItem, Tag("function_call")]
    | Annotated[_FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type, custom_error_type="unsupported_item",
        custom_error_message="input items of this type are not supported here (message,"
                             " function_call and function_call_output are)"),
]


class _FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _FunctionToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class _FormatJSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class _TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Annotated[_TextFormat | _JSONObjectFormat | _FormatJSONSchema,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None


#: Responses parameters OpenAI accepts that the gateway passes on to a Responses upstream
#: unchanged, or ignores (with one warning) for its other models.
UNUSED_RESPONSES_PARAMETERS = (
    "store", "metadata", "user", "parallel_tool_calls", "service_tier", "truncation",
    "prompt_cache_key", "safety_identifier", "include", "reasoning", "max_tool_calls",
    "prompt_cache_retention", "prompt_cache_options", "moderation",
)


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    # Discriminated so that a bad item is reported as such, not as "not a string".
    input: Annotated[
        Annotated[str, Tag("text")]
        | Annotated[list[_InputItem], Field(min_length=1, max_length=1024), Tag("items")],
        Discriminator(lambda v: "text" if isinstance(v, str) else "items"),
    ]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[_FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | _FunctionToolChoice | None = None
    text: _TextConfig | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    # OpenAI parameters the gateway does not act on (UNUSED_RESPONSES_PARAMETERS):
    # passed to a Responses upstream, else ignored with a warning (nothing is stored).
    store: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    include: list[str] | None = Field(None, max_length=16)
    reasoning: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    prompt_cache_retention: str | None = Field(None, max_length=64)
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    previous_response_id: str | None = None
    #: Generate detached from the request, kept in the stream log (``background.py``).
    background: bool | None = None
    # OpenAI parameters whose result this gateway cannot deliver: refused by name.
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    context_management: Any = None
    background_options: Any = None
    image: Any = None
    access_programs: Any = None

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        for tool in value if isinstance(value, list) else []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise ValueError(f"tools of type {kind!r} are not supported here"
                                 " (function tools only)")
        return value

    @field_validator("conversation", "prompt", "top_logprobs", "context_management",
                     "background_options", "image", "access_programs")
    @classmethod
    def _nothing_undeliverable(cls, value: Any) -> Any:
        if value in (None, 0, [], {}):  # what SDKs send by default
            return value
        raise ValueError("not supported by this gateway")

    @field_validator("previous_response_id")
    @classmethod
    def _nothing_stored(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported: this gateway stores no responses; send the"
                             " whole conversation in input")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits_the_tools(cls, value: Any, info: ValidationInfo) -> Any:
        # tools is declared first, so it is validated already (or left out as invalid).
        tools = [t.name for t in info.data.get("tools") or []]
        if isinstance(value, _FunctionToolChoice):
            check_tool_choice(None, value.name, tools)
        else:
            check_tool_choice(value, None, tools)
        return value

    # -- to the core ---------------------------------------------------------------

    def core_messages(self) -> tuple[Message, ...]:
        """The conversation as chat messages: ``instructions`` first, as a system message;
        function calls join the assistant message they follow; outputs are tool messages."""
        messages: list[Message] = []
        if self.instructions:
            messages.append(Message(role="system", content=self.instructions))
        if isinstance(self.input, str):
            messages.append(Message(role="user", content=self.input))
            return tuple(messages)
        for item in self.input:
            if isinstance(item, _MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append(Message(role=role, content=_joined(item.content)))
            elif isinstance(item, _FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    calls = (*(last.tool_calls or ()), call)
                    messages[-1] = last.model_copy(update={"tool_calls": calls})
                else:
                    messages.append(Message(role="assistant", tool_calls=(call,)))
            else:
                messages.append(Message(role="tool", content=_joined(item.output),
                                        tool_call_id=item.call_id))
        return tuple(messages)

    def core_response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text else None
        if isinstance(fmt, _FormatJSONSchema):
            return to_response_format("json_schema", name=fmt.name, schema=fmt.schema_,
                                      strict=fmt.strict)
        return None if fmt is None else to_response_format(fmt.type)

    def core_tools(self) -> tuple[ToolSpec, ...] | None:
        if not self.tools:
            return None
        return tuple(tool_spec(t.name, t.description, t.parameters) for t in self.tools)

    def core_tool_choice(self) -> str | dict[str, Any] | None:
        """In the Chat Completions shape, which is the core's."""
        if isinstance(self.tool_choice, _FunctionToolChoice):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice

    def unused_parameters(self) -> dict[str, Any]:
        """The OpenAI parameters set in this request that the gateway does not act on."""
        unused = {name: value for name in UNUSED_RESPONSES_PARAMETERS
                  if (value := getattr(self, name)) is not None}
        if self.background:
            unused.pop("store", None)  # acted on: a background response is kept
        return unused

    def to_core(self, model: str, max_tokens: int | None, *,
                extra: dict[str, Any] | None = None) -> Request:
        return Request(messages=self.core_messages(), model=model,
                       temperature=self.temperature, max_tokens=max_tokens, top_p=self.top_p,
                       response_format=self.core_response_format(), tools=self.core_tools(),
                       tool_choice=self.core_tool_choice(), extra=extra or {})


    def echo(self) -> dict[str, Any]:
        """The request's fields a response object repeats."""
        fmt: dict[str, Any] = {"type": "text"}
        if self.text is not None and self.text.format is not None:
            fmt = self.text.format.model_dump(by_alias=True, exclude_none=True)
        tool_choice: Any = self.tool_choice or "auto"
        if isinstance(tool_choice, _FunctionToolChoice):
            tool_choice = tool_choice.model_dump()
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": (True if self.parallel_tool_calls is None
                                    else self.parallel_tool_calls),
            "previous_response_id": None,
            "store": False,
            "temperature": self.temperature,
            "text": {"format": fmt},
            "tool_choice": tool_choice,
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": bool(t.strict)}
                      for t in self.tools or []],
            "top_p": self.top_p,
            "truncation": self.truncation or "disabled",
            "user": self.user,
        }
