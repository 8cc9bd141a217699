"""Tools: Python functions the model may call, described by JSON schemas of their signatures.

Pass functions as ``tools=`` and the stream runs the tool loop itself: when the model
finishes with tool calls, each call is validated against the function's signature and
run (sync functions in a worker thread, async ones awaited), a ``tool_result`` event
reports it, and the next round streams on in the same event stream::

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict[str, Any]:
        \"\"\"The current weather in a city.

        Args:
            city: the city name, e.g. "Paris".
            unit: degrees Celsius or Fahrenheit.
        \"\"\"
        return {"city": city, "temperature": 21, "unit": unit}

    with tokenrelay.stream("Weather in Paris?", tools=[get_weather]) as s:
        for text in s.text_stream():
            print(text, end="")

The schema comes from the signature (types through Pydantic), the description from the
docstring's summary and the parameter descriptions from its ``Args:`` section. A
:class:`~tokenrelay.request.ToolSpec` (or an OpenAI-style dict) describes a tool without
running it: when the model calls one, the stream ends with ``finish_reason="tool_calls"``
and the calls are in ``result.tool_calls`` for the caller to handle.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import UsageError
from .request import ToolSpec

__all__ = ["Tool", "tool_choice_param", "tool_spec", "tools_of"]

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns|Return|Yields|Raises|"
                      r"Examples?|Notes?|Attributes)\s*:\s*$")
_PARAM = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_CHOICES = ("auto", "none", "required")


def _docstring(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The summary (text before the first section) and ``Args:`` descriptions."""
    doc = inspect.getdoc(func) or ""
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    params_indent = 0
    for line in doc.splitlines():
        header = _SECTION.match(line.strip()) if not line.startswith((" ", "\t")) else None
        if header:
            section, current = header.group(1), None
            continue
        if section is None:
            summary.append(line)
        elif section in ("Args", "Arguments", "Parameters", "Params") and line.strip():
            indent = len(line) - len(line.lstrip())
            match = _PARAM.match(line.strip())
            if match and (current is None or indent <= params_indent):
                current, params_indent = match.group(1).lstrip("*"), indent
                params[current] = match.group(2).strip()
            elif current is not None:
                params[current] = (params[current] + " " + line.strip()).strip()
    return "\n".join(summary).strip(), params


def _callable_name(func: Any) -> str | None:
    name = getattr(func, "__name__", None)
    if name is None and isinstance(func, functools.partial):
        name = getattr(func.func, "__name__", None)
    return name


def _strip_titles(schema: dict[str, Any]) -> dict[str, Any]:
    # Pydantic titles every field after its name: tokens the model does not need.
    schema.pop("title", None)
    for prop in (schema.get("properties") or {}).values():
        if isinstance(prop, dict):
            prop.pop("title", None)
    return schema


class Tool:
    """A Python function the model can call, with the JSON schema of its arguments.

    Args:
        func: the function (sync or async). Its parameters need JSON-able types
            (``str``, numbers, ``Literal``, lists, Pydantic models, ...).
        name: the name the model sees (default: the function's name).
        description: what the tool does (default: the docstring's summary).

    Example::

        weather = Tool(get_weather, description="Current weather; use for any city.")
        tokenrelay.complete("Weather in Paris?", tools=[weather])
    """

    __slots__ = ("_positional", "arguments_model", "func", "is_async", "spec")

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> None:
        if not callable(func):
            raise UsageError(f"a tool must be a function, not {type(func).__name__}")
        name = name or _callable_name(func)
        if not name or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise UsageError(
                f"tool name {name!r} is not usable: the model needs 1-64 letters, digits, _"
                " or -; pass Tool(func, name=...)"
            )
        summary, param_docs = _docstring(func)
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"tool {name!r}: cannot read the function's signature") from exc
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception:  # noqa: BLE001 -- unresolvable annotations: fall back to raw ones
            hints = {}
        fields: dict[str, Any] = {}
        positional: list[str] = []
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue  # *args / **kwargs have no place in a JSON object of arguments
            if param.name.startswith("_"):
                raise UsageError(
                    f"tool {name!r}: parameter {param.name!r} starts with an underscore;"
                    " rename it or give it through functools.partial"
                )
            annotation = hints.get(param.name, param.annotation)
            if annotation is param.empty:
                annotation = Any
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (annotation, Field(default, description=param_docs.get(
                param.name)))
            if param.kind is param.POSITIONAL_ONLY:
                positional.append(param.name)
        try:
            # __module__: annotations left as strings resolve in the function's module.
            model = create_model(
                f"{name}_arguments", __config__=ConfigDict(extra="forbid"),
                __module__=getattr(func, "__module__", None) or __name__, **fields,
            )
            parameters = _strip_titles(model.model_json_schema())
        except Exception as exc:  # pydantic: a type it cannot describe
            raise UsageError(f"tool {name!r}: its arguments have no JSON schema: {exc}") from exc
        self.func = func
        self.arguments_model: type[BaseModel] = model
        self._positional = tuple(positional)
        target = func.func if isinstance(func, functools.partial) else func
        # An object whose __call__ is async counts as async too.
        self.is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            type(target).__call__)
        self.spec = ToolSpec(name=name, description=description if description is not None
                             else summary, parameters=parameters)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def parameters(self) -> dict[str, Any]:
        return self.spec.parameters

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def validate(self, arguments: Mapping[str, Any]) -> BaseModel:
        """The arguments checked against the signature.

        Raises:
            pydantic.ValidationError: they do not fit.
        """
        return self.arguments_model.model_validate(dict(arguments))

    async def arun(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments`` and call the function: sync ones in a worker thread (the
        event loop keeps streaming), async ones awaited.

        Raises:
            pydantic.ValidationError: bad arguments; anything the function raises.
        """
        values = self.validate(arguments)
        kwargs = {name: getattr(values, name) for name in type(values).model_fields}
        args = [kwargs.pop(name) for name in self._positional]
        if self.is_async:
            result = await self.func(*args, **kwargs)
        else:
            result = await asyncio.to_thread(self.func, *args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


def tool_spec(tool: Any) -> ToolSpec:
    """The :class:`~tokenrelay.request.ToolSpec` of a function, a :class:`Tool`, a ToolSpec,
    or a dict (``{"name", "description", "parameters"}`` or OpenAI's
    ``{"type": "function", "function": {...}}``).

    Raises:
        UsageError: none of these, or an invalid one.
    """
    if isinstance(tool, ToolSpec):
        return tool
    if isinstance(tool, Tool):
        return tool.spec
    if isinstance(tool, Mapping):
        data = tool.get("function") if tool.get("type") == "function" else tool
        try:
            return ToolSpec.model_validate(
                {k: v for k, v in dict(data or {}).items() if k != "strict"})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "tool"
            raise UsageError(f"invalid tool {field}: {err['msg']}") from exc
    if callable(tool):
        return Tool(tool).spec
    raise UsageError(f"a tool must be a function, a Tool, a ToolSpec or a dict, not {tool!r}")


def tools_of(tools: Iterable[Any]) -> tuple[tuple[ToolSpec, ...], dict[str, Tool]]:
    """The specs of ``tools`` for the request, and the runnable ones by name.

    Raises:
        UsageError: an unusable tool, or two with one name.
    """
    if isinstance(tools, str | bytes | Mapping) or callable(tools):
        tools = [tools]
    specs: list[ToolSpec] = []
    runnable: dict[str, Tool] = {}
    for item in tools:
        if callable(item) and not isinstance(item, Tool | ToolSpec):
            item = Tool(item)
        spec = tool_spec(item)
        if any(s.name == spec.name for s in specs):
            raise UsageError(f"two tools are named {spec.name!r}; pass Tool(func, name=...)")
        specs.append(spec)
        if isinstance(item, Tool):
            runnable[spec.name] = item
    return tuple(specs), runnable


def tool_choice_param(choice: Any, specs: Iterable[ToolSpec] = ()) -> str | dict[str, Any] | None:
    """``tool_choice=`` as OpenAI's parameter: ``"auto"``, ``"none"``, ``"required"``, or
    ``{"type": "function", "function": {"name": ...}}`` for a tool name, a function or a
    :class:`Tool`.

    Raises:
        UsageError: a tool that is not among ``specs`` (when some are given).
    """
    if choice is None or choice in _CHOICES:
        return choice  # type: ignore[no-any-return]
    if isinstance(choice, Mapping):
        return dict(choice)
    if isinstance(choice, Tool):
        name: str | None = choice.name
    elif isinstance(choice, ToolSpec):
        name = choice.name
    elif isinstance(choice, str):
        name = choice
    elif callable(choice):
        name = _callable_name(choice)
    else:
        raise UsageError(f"tool_choice must be auto, none, required or a tool, not {choice!r}")
    names = [s.name for s in specs]
    if names and name not in names:
        raise UsageError(f"tool_choice names {name!r}, which is not among the tools: "
                         + ", ".join(names))
    return {"type": "function", "function": {"name": name}}
