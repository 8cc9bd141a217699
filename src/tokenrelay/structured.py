"""Structured output: ask for JSON matching a schema, watch it fill in, get it validated.

``tokenrelay.stream(..., response_format=Weather)`` takes a Pydantic model class (or any
type Pydantic validates), a JSON-schema dict, or a :class:`~tokenrelay.request.ResponseFormat`.
While the answer streams, each text delta is fed once to an incremental partial-JSON
parser (linear in the answer) and a ``StructuredPartial`` event follows the
``TextDelta`` whenever the value changed. At the end ``result.parsed`` is the validated
model instance (or the JSON value, for a schema dict); an answer that is not JSON, or
does not match, is a :class:`~tokenrelay.errors.StructuredOutputError` that keeps the
raw text.

Example::

    class Weather(BaseModel):
        city: str
        celsius: float

    with tokenrelay.stream("Weather in Paris?", response_format=Weather) as s:
        for event in s:
            if isinstance(event, StructuredPartial):
                print(event.value)
    print(s.result.parsed.celsius)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from ._json_schema import is_strict, strict_schema
from ._partial_json import PartialJSONError, PartialJSONParser
from .errors import StructuredOutputError, UsageError
from .events import StructuredPartial
from .request import ResponseFormat

__all__ = ["ArgumentsParser", "StructuredOutput", "StructuredPartials", "json_schema"]

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_FORMAT_KEYS = {"name", "schema", "strict", "description"}
# What may come before the JSON: whitespace and a Markdown code fence (models without a
# grammar often wrap their JSON in one).
_LEAD = re.compile(r"\s*(?:```[\w+-]*[ \t]*\r?\n\s*)?")
_MAX_LEAD = 64


def _name(raw: object) -> str:
    name = _NAME_CHARS.sub("_", str(raw or "")).strip("_")[:64]
    return name or "response"


def json_schema(model: Any, *, strict: bool = True) -> dict[str, Any]:
    """The JSON schema of a Pydantic model (or any type Pydantic handles).

    Args:
        model: a ``BaseModel`` subclass, a dataclass, a ``TypedDict``, ...
        strict: rewrite it into the form OpenAI's ``"strict": true`` accepts (objects
            closed, every property required).
    """
    if isinstance(model, type) and issubclass(model, BaseModel):
        schema = model.model_json_schema()
    else:
        schema = TypeAdapter(model).json_schema()
    return strict_schema(schema) if strict else schema


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What ``response_format=`` asked for: the schema sent to the provider and how the
    answer is validated.

    Attributes:
        response_format: the schema, name and strictness sent to the provider.
        model: the type the answer is validated into, or ``None`` for a JSON-schema dict
            (then the JSON value is checked against the schema when ``jsonschema_rs`` or
            ``jsonschema`` is installed, and returned as it is).
    """

    response_format: ResponseFormat
    model: Any = None

    @classmethod
    def of(cls, spec: Any) -> StructuredOutput:
        """``spec`` as a StructuredOutput.

        Args:
            spec: a Pydantic model class (or another type Pydantic validates), a JSON
                schema dict, an OpenAI ``{"type": "json_schema", "json_schema": {...}}``
                or ``{"type": "json_object"}`` dict, a ``{"name", "schema", "strict"}``
                dict, or a ``ResponseFormat``.

        Raises:
            UsageError: ``spec`` is none of these.
        """
        if isinstance(spec, StructuredOutput):
            return spec
        if isinstance(spec, ResponseFormat):
            return cls(spec)
        if isinstance(spec, dict):
            return cls(_format_of_dict(spec))
        if spec is None or isinstance(spec, str | bytes | int | float | list | tuple):
            raise UsageError(
                f"response_format must be a Pydantic model class, a JSON schema dict or a"
                f" ResponseFormat, not {type(spec).__name__}"
            )
        try:
            schema = json_schema(spec)
        except Exception as exc:  # pydantic raises several kinds for unusable types
            raise UsageError(
                f"response_format must be a Pydantic model class, a JSON schema dict or"
                f" a ResponseFormat; {spec!r} has no JSON schema: {exc}"
            ) from exc
        name = getattr(spec, "__name__", None) or schema.get("title")
        return cls(ResponseFormat(name=_name(name), schema=schema, strict=True), spec)

    @property
    def is_model(self) -> bool:
        return isinstance(self.model, type) and issubclass(self.model, BaseModel)

    def partials(self) -> StructuredPartials:
        """A fresh incremental parser for one stream."""
        return StructuredPartials(self)

    def validate(self, json_text: str, *, raw_text: str | None = None) -> Any:
        """The validated answer.

        Raises:
            StructuredOutputError: not JSON, or not matching the schema.
        """
        raw = json_text if raw_text is None else raw_text
        name = self.response_format.name
        if self.model is not None:
            try:
                if self.is_model:
                    return self.model.model_validate_json(json_text)
                return TypeAdapter(self.model).validate_json(json_text)
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                first = errors[0] if errors else {"loc": (), "msg": str(exc)}
                where = ".".join(str(p) for p in first["loc"]) or "the answer"
                count = f"{len(errors)} validation error" + ("s" if len(errors) != 1 else "")
                raise StructuredOutputError(
                    f"the answer does not match {name}: {count}, first at {where}:"
                    f" {first['msg']}",
                    raw_text=raw, errors=errors,
                ) from exc
        try:
            value = json.loads(json_text)
        except ValueError as exc:
            raise StructuredOutputError(
                f"the answer is not valid JSON: {exc}", raw_text=raw
            ) from exc
        problems = _schema_errors(self.response_format.schema_, value)
        if problems:
            raise StructuredOutputError(
                f"the answer does not match {name}: {problems[0]}", raw_text=raw,
                errors=problems,
            )
        return value


def _format_of_dict(spec: dict[str, Any]) -> ResponseFormat:
    try:
        if spec.get("type") == "json_schema" and isinstance(spec.get("json_schema"), dict):
            return ResponseFormat.model_validate(spec["json_schema"])
        if isinstance(spec.get("schema"), dict) and set(spec) <= _FORMAT_KEYS:
            return ResponseFormat.model_validate({k: v for k, v in spec.items()
                                                  if k != "description"})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"invalid response_format {field}: {err['msg']}") from exc
    if spec.get("type") == "json_object":
        # OpenAI's JSON mode: any object (sent as json_object again by the OpenAI provider).
        return ResponseFormat(name="json_object", schema={"type": "object"}, strict=False)
    if spec.get("type") == "text":
        raise UsageError("response_format {'type': 'text'} is free text: pass none instead")
    # A bare JSON schema: strict only when it already is in strict form, since making it
    # strict would change what it allows.
    return ResponseFormat(name=_name(spec.get("title")), schema=spec, strict=is_strict(spec))


def _schema_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """Where ``value`` breaks ``schema``, with whichever validator is installed (neither is
    a dependency: without one, that the JSON parsed is all that is checked)."""
    try:
        import jsonschema_rs
    except ImportError:
        pass
    else:
        try:
            validator = jsonschema_rs.validator_for(schema)
        except Exception:  # noqa: BLE001 -- a schema it cannot compile is not the answer's fault
            return []
        return [_first_line(str(e)) for e in validator.iter_errors(value)]
    try:
        import jsonschema
    except ImportError:
        return []
    try:
        checker = jsonschema.validators.validator_for(schema)(schema)
        return [e.message for e in checker.iter_errors(value)]
    except jsonschema.SchemaError:
        return []


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _snapshot(value: Any) -> Any:
    """A copy of the parser's live value that later feeds will not change.

    The parser builds containers in place and only ever changes the open ones, which are
    the last member of each open parent: copying that chain (and sharing every finished
    member) is enough, and costs the size of the open containers instead of the document.
    """
    if type(value) is dict:
        copy = dict(value)
        if copy:
            last = next(reversed(copy))
            child = copy[last]
            if type(child) is dict or type(child) is list:
                copy[last] = _snapshot(child)
        return copy
    if type(value) is list:
        items = list(value)
        if items and (type(items[-1]) is dict or type(items[-1]) is list):
            items[-1] = _snapshot(items[-1])
        return items
    return value


class StructuredPartials:
    """Pure state: the text deltas of one answer in, ``StructuredPartial`` events out.

    Leading whitespace and a Markdown code fence before the JSON, and whitespace and a
    closing fence after it, are tolerated; anything else makes the final validation fail
    (and no more partials are emitted once the text stops being JSON).
    """

    __slots__ = ("_end", "_failure", "_lead", "_model", "_output", "_parser", "_pos",
                 "_start")

    def __init__(self, output: StructuredOutput) -> None:
        self._output = output
        self._model = output.model if output.is_model else None
        self._parser = PartialJSONParser()
        self._lead = ""  # text before the JSON starts, while it may still be a fence
        self._start: int | None = None  # offset of the JSON in the text
        self._end: int | None = None  # offset where text after the JSON began
        self._failure: PartialJSONError | None = None
        self._pos = 0

    def feed(self, delta: str) -> StructuredPartial | None:
        """The event for one text delta, or ``None`` when the value did not change."""
        at = self._pos
        self._pos += len(delta)
        if self._failure is not None or self._end is not None or not delta:
            return None
        if self._start is None:
            self._lead += delta
            lead = _LEAD.match(self._lead)
            assert lead is not None  # the pattern matches the empty string
            rest = self._lead[lead.end():]
            if not rest or (rest.startswith("`") and "\n" not in rest
                            and len(self._lead) < _MAX_LEAD):
                return None  # still whitespace or a fence that is not finished
            self._start = at + len(delta) - len(rest)
            delta, self._lead = rest, ""
            at = self._start
        parser = self._parser
        try:
            parser.feed(delta)
        except PartialJSONError as exc:
            if parser.done:  # text after a complete value: the JSON ends there
                self._end = self._start + exc.offset
            else:
                self._failure = exc
            return None
        path = parser.changed_path
        if path is None:
            return None
        return StructuredPartial(_snapshot(parser.value), path, self._model)

    def finish(self, text: str) -> Any:
        """The validated answer, ``text`` being everything the deltas carried.

        Raises:
            StructuredOutputError: no JSON, broken JSON, text around it, or a mismatch.
        """
        if self._start is None:
            what = "has no JSON in it" if text.strip() else "is empty"
            raise StructuredOutputError(
                f"the answer {what}; expected JSON matching {self._output.response_format.name}",
                raw_text=text,
            )
        if self._failure is not None:
            raise StructuredOutputError(
                f"the answer is not valid JSON: {self._failure}", raw_text=text
            ) from self._failure
        end = len(text) if self._end is None else self._end
        trailing = text[end:].strip()
        if trailing and trailing != "```":
            raise StructuredOutputError(
                f"the answer has text after its JSON: {trailing[:80]!r}", raw_text=text
            )
        if not self._parser.done:
            try:
                self._parser.finish()
            except PartialJSONError as exc:
                raise StructuredOutputError(
                    f"the answer's JSON is incomplete ({exc}); was it cut off by max_tokens?",
                    raw_text=text,
                ) from exc
        return self._output.validate(text[self._start:end], raw_text=text)


class ArgumentsParser:
    """One tool call's arguments JSON, parsed as its pieces stream in.

    ``feed`` returns the arguments so far (a snapshot), ``None`` before anything can be
    shown or once the text stopped being JSON (``ToolCallDone`` then reports the error).
    """

    __slots__ = ("_parser", "_value")

    def __init__(self) -> None:
        self._parser: PartialJSONParser | None = PartialJSONParser()
        self._value: Any = None

    def feed(self, delta: str) -> Any:
        parser = self._parser
        if parser is None or not delta:
            return self._value
        try:
            parser.feed(delta)
        except PartialJSONError:
            self._parser = self._value = None
            return None
        if parser.changed_path is not None:
            self._value = _snapshot(parser.value)
        return self._value
