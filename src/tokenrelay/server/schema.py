"""Request bodies of the gateway, validated at the edge (pydantic, unknown fields refused).

The OpenAI wire format: what the official SDK and other OpenAI clients send. Parameters
that OpenAI accepts but the gateway does not act on (``reasoning_effort``, ``user``,
``metadata``, ``store``, ...: :data:`UNUSED_CHAT_PARAMETERS`) are passed on to an
OpenAI-compatible upstream, or ignored with one warning line for a model that cannot use
them, never refused: clients send them by default. Those whose answer the gateway could
not deliver (``logprobs``, ``audio``, ``n`` > 1) are a 400 saying so; anything unknown
is a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..request import Message, ResponseFormat, ToolSpec

__all__ = [
    "JSON_OBJECT_SCHEMA",
    "UNUSED_CHAT_PARAMETERS",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "SimpleChatRequest",
    "StreamOptions",
    "ToolCallIn",
]

#: The schema ``response_format: {"type": "json_object"}`` stands for: any JSON object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
#: OpenAI's rule for function and schema names (the core ``ToolSpec`` enforces it too).
NAME_PATTERN = r"^[A-Za-z0-9_-]+$"


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class _FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""
    #: Sent by the SDK with a message object from ``.parse()`` / ``.stream()``; ignored.
    parsed_arguments: Any = None


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, sent back with the conversation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: _FunctionCallIn
    #: Present when the SDK sends back a message accumulated from a stream.
    index: int | None = None

    def to_core(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name,
                             "arguments": self.function.arguments}}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)
    refusal: str | None = None
    # What the SDK sends when an answer's message object is passed back as it came
    # (``messages.append(completion.choices[0].message)``); ignored.
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: None = None
    parsed: Any = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def to_core(self) -> Message:
        """The core message (``developer`` is a system message there)."""
        return Message(
            role=self.core_role(),  # type: ignore[arg-type]
            content=self.text(),
            tool_calls=(tuple(c.to_core() for c in self.tool_calls)
                        if self.tool_calls else None),
            tool_call_id=self.tool_call_id if self.role == "tool" else None,
            name=self.name,
        )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            texts.append(part.text)
        return "".join(texts)

    def core_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None


class _JSONSchemaIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class _JSONObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class _JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: _JSONSchemaIn


def to_response_format(kind: str, *, name: str = "response",
                       schema: dict[str, Any] | None = None,
                       strict: bool | None = None) -> ResponseFormat | None:
    """The core ``ResponseFormat`` of an OpenAI format: ``text`` is none, ``json_object``
    a permissive object schema, ``json_schema`` the caller's schema."""
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(name="json_object", schema=dict(JSON_OBJECT_SCHEMA), strict=False)
    return ResponseFormat(name=name, schema=schema or dict(JSON_OBJECT_SCHEMA),
                          strict=bool(strict))


class _FunctionDefIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _FunctionDefIn


class _NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)


class _NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _NamedFunction


def check_tool_choice(choice: str | None, named: str | None, tools: list[str] | None) -> None:
    """OpenAI's rules: a required or named tool needs tools, and the named one must exist.

    Raises:
        ValueError: naming what is wrong.
    """
    if named is not None:
        if named not in (tools or []):
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
    elif choice == "required" and not tools:
        raise ValueError("tool_choice 'required' needs tools")


def tool_spec(name: str, description: str | None, parameters: dict[str, Any] | None
              ) -> ToolSpec:
    if parameters is None:
        return ToolSpec(name=name, description=description or "")
    return ToolSpec(name=name, description=description or "", parameters=parameters)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=1)
    response_format: Annotated[_TextFormat | _JSONObjectFormat | _JSONSchemaFormat,
                               Field(discriminator="type")] | None = None
    tools: list[_ToolIn] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    # OpenAI parameters the gateway does not act on (UNUSED_CHAT_PARAMETERS): passed to
    # an OpenAI-compatible upstream, else ignored with a warning. (openai-python's
    # ``chat.completions.create``, 2026.)
    user: str | None = Field(None, max_length=512)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    parallel_tool_calls: bool | None = None
    service_tier: str | None = Field(None, max_length=64)
    reasoning_effort: str | None = Field(None, max_length=64)
    verbosity: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = Field(None, max_length=512)
    prompt_cache_retention: str | None = Field(None, max_length=64)
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    safety_identifier: str | None = Field(None, max_length=512)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = Field(None, max_length=2)
    # OpenAI parameters whose result this gateway cannot deliver: refused by name.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("logprobs", "top_logprobs", "audio", "functions", "function_call")
    @classmethod
    def _nothing_undeliverable(cls, value: Any, info: ValidationInfo) -> Any:
        # Only a value that asks for something: what SDKs send by default (false, null)
        # passes.
        if value in (None, False, 0, [], "none"):
            return value
        named = info.field_name or ""
        hint = " (use tools and tool_choice)" if named.startswith("function") else ""
        raise ValueError(f"not supported by this gateway{hint}")

    def unused_parameters(self) -> dict[str, Any]:
        """The OpenAI parameters set in this request that the gateway does not act on."""
        return {name: value for name in UNUSED_CHAT_PARAMETERS
                if (value := getattr(self, name)) is not None}

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits_the_tools(cls, value: Any, info: ValidationInfo) -> Any:
        # A field validator (not a model one) so that the error names tool_choice;
        # tools is declared before it, so it is validated already.
        tools = [t.function.name for t in info.data.get("tools") or []]
        if isinstance(value, _NamedToolChoice):
            check_tool_choice(None, value.function.name, tools)
        else:
            check_tool_choice(value, None, tools)
        return value

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def core_messages(self) -> tuple[Message, ...]:
        return tuple(m.to_core() for m in self.messages)

    def core_response_format(self) -> ResponseFormat | None:
        fmt = self.response_format
        if isinstance(fmt, _JSONSchemaFormat):
            spec = fmt.json_schema
            return to_response_format("json_schema", name=spec.name, schema=spec.schema_,
                                      strict=spec.strict)
        return None if fmt is None else to_response_format(fmt.type)

    def core_tools(self) -> tuple[ToolSpec, ...] | None:
        if not self.tools:
            return None
        return tuple(tool_spec(t.function.name, t.function.description, t.function.parameters)
                     for t in self.tools)

    def core_tool_choice(self) -> str | dict[str, Any] | None:
        """OpenAI's Chat Completions shape, which is the core's."""
        if isinstance(self.tool_choice, _NamedToolChoice):
            return {"type": "function", "function": {"name": self.tool_choice.function.name}}
        return self.tool_choice


#: Chat Completions parameters that OpenAI accepts and the gateway passes on to an
#: OpenAI-compatible upstream unchanged, or ignores (with one warning) for its own models.
UNUSED_CHAT_PARAMETERS = (
    "user", "metadata", "store", "frequency_penalty", "presence_penalty",
    "parallel_tool_calls", "service_tier", "reasoning_effort", "verbosity",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "moderation",
    "safety_identifier", "logit_bias", "prediction", "web_search_options", "modalities",
)


class SimpleChatRequest(BaseModel):
    """``POST /chat``: the simple endpoint, a prompt in, text events out."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    system: str | None = None
    model: str | None = Field(None, min_length=1, max_length=256)
    history: list[dict[str, str]] | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
