"""What a caller asks for: messages and sampling options, validated at the edge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UsageError

__all__ = [
    "Message",
    "Request",
    "ResponseFormat",
    "RetryPolicy",
    "Timeouts",
    "ToolSpec",
    "build_request",
]

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    """One chat message.

    Assistant messages that called tools carry ``tool_calls`` (OpenAI shape:
    ``{"id", "type": "function", "function": {"name", "arguments"}}``); tool results are
    ``role="tool"`` messages with the ``tool_call_id`` they answer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ToolSpec(BaseModel):
    """A function the model may call: its name, description and JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})


class ResponseFormat(BaseModel):
    """Structured output: the answer must be JSON matching ``schema``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("response", min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool = True


class Timeouts(BaseModel):
    """Deadlines, in seconds. ``None`` disables one.

    Args:
        connect: opening the connection to the provider.
        first_token: from the request to the first generated text.
        idle: the longest gap between two chunks once the stream started.
        total: the whole exchange.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: float | None = Field(10.0, gt=0)
    first_token: float | None = Field(120.0, gt=0)
    idle: float | None = Field(60.0, gt=0)
    total: float | None = Field(None, gt=0)


class RetryPolicy(BaseModel):
    """Retries before the first token (asking again later would duplicate text), and
    resumes after it, where the server keeps the answer (a tokenrelay gateway, OpenAI
    background responses): the stream reconnects and goes on from the last event received.

    Args:
        max_retries: attempts after the first one; also the reconnections in a row of a
            broken answer that bring nothing new (the first at once, the next after the
            backoff).
        backoff: base delay of the exponential backoff (doubled per attempt, with jitter).
        max_backoff: the longest computed delay.
        max_retry_after: the longest ``Retry-After`` honoured; a longer one fails at once.
        max_resumes: the most reconnections of one answer; 0: a break is an error, as
            with a server that cannot resume.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(2, ge=0, le=20)
    backoff: float = Field(0.5, ge=0)
    max_backoff: float = Field(8.0, ge=0)
    max_retry_after: float = Field(30.0, ge=0)
    max_resumes: int = Field(10, ge=0, le=1000)


class Request(BaseModel):
    """A validated generation request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: tuple[Message, ...] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    #: Structured output (JSON schema); ``None`` for free text.
    response_format: ResponseFormat | None = None
    #: Tools the model may call, and OpenAI's ``tool_choice`` ("auto", "none",
    #: "required" or ``{"type": "function", "function": {"name": ...}}``).
    tools: tuple[ToolSpec, ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    #: Provider-specific extras passed through unchanged (e.g. ``{"ignore_eos": True}``).
    extra: dict[str, Any] = Field(default_factory=dict)
    #: An assistant prefix: the answer already begins with this text and the model goes on
    #: after it (the chat template's assistant turn + the prefix; the stream yields only
    #: what follows). Providers that cannot do it refuse the request
    #: (``Provider.can_continue()``); the gateway uses it to finish an answer whose
    #: producing process died (issue 12).
    continue_from: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    def prompt_text(self) -> str:
        """All message contents, for token estimation and logs."""
        return "\n".join(m.content for m in self.messages)

    def last_user_text(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return self.messages[-1].content


def _message(index: int, item: Any) -> Message:
    """``prompt[index]`` as a Message; errors name the index (issue 11)."""
    if isinstance(item, Message):
        return item
    if not isinstance(item, dict):
        raise TypeError(f"prompt[{index}] must be a message dict ({{'role': ...,"
                        f" 'content': ...}}) or a Message, not {type(item).__name__}")
    role = item.get("role")
    if "content" not in item or item["content"] is None:
        if role == "assistant" and item.get("tool_calls"):
            item = {**item, "content": ""}  # a turn that only called tools
        elif role in ("system", "user", "assistant", "tool"):
            raise UsageError(f"invalid messages[{index}]: a {role} message needs 'content'")
    try:
        return Message.model_validate(item)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"invalid messages[{index}]" + (f".{field}" if field else "")
                         + f": {err['msg']}") from exc


def _as_messages(
    prompt: str | Sequence[Message | dict[str, Any]], system: str | None
) -> list[Message]:
    messages: list[Message] = []
    if isinstance(prompt, str):
        if system is not None:
            messages.append(Message(role="system", content=system))
        messages.append(Message(role="user", content=prompt))
        return messages
    if not isinstance(prompt, (list, tuple)):
        raise TypeError("prompt must be a string or a list of messages, not"
                        f" {type(prompt).__name__}")
    for index, item in enumerate(prompt):
        messages.append(_message(index, item))
    if system is not None:
        messages = [m for m in messages if m.role != "system"]
        messages.insert(0, Message(role="system", content=system))
    return messages


def build_request(
    prompt: str | Sequence[Message | dict[str, Any]],
    *,
    model: str | None = None,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
    response_format: ResponseFormat | None = None,
    tools: Sequence[ToolSpec] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
) -> Request:
    """Validate the arguments of ``stream()`` / ``complete()`` into a Request.

    Raises:
        TypeError: ``prompt`` is neither a string nor a list of messages.
        UsageError: naming the first invalid field.
    """
    messages = tuple(_as_messages(prompt, system))
    try:
        return Request(
            messages=messages,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            stop=stop,  # type: ignore[arg-type]
            seed=seed,
            extra=extra or {},
            response_format=response_format,
            tools=tuple(tools) if tools else None,
            tool_choice=tool_choice,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "request"
        raise UsageError(f"invalid {field}: {err['msg']}") from exc
