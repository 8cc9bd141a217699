"""Structured output: ``response_format=``, ``StructuredPartial`` events, ``result.parsed``.

With the scripted MockProvider, with the OpenAI-compatible provider against the loopback
mock upstream, and the CLI's ``--schema`` through the real entry point.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jiter
import pytest
from _pty import PtyProcess, cli_env, tokenrelay_argv
from _pty import tokenrelay as run_cli
from pydantic import BaseModel, Field

import tokenrelay
from tokenrelay import config
from tokenrelay._json_schema import example_value, is_strict, strict_schema
from tokenrelay.events import StreamEvent, StructuredPartial, TextDelta
from tokenrelay.providers.mock import MockProvider
from tokenrelay.structured import StructuredOutput, json_schema
from tokenrelay.testing.mock_upstream import MockUpstream


class Address(BaseModel):
    street: str
    zip_code: int


class Person(BaseModel):
    name: str
    age: int = Field(ge=0)
    hobbies: list[str]
    address: Address
    role: Literal["admin", "user"] = "user"
    nickname: str | None = None


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer", "minimum": 1900}},
    "required": ["title", "year"],
    "additionalProperties": False,
}


def _check_partials(events: list[StreamEvent]) -> list[StructuredPartial]:
    """Every partial follows a text delta and equals jiter's partial parse of the text so
    far — read after the whole stream, so later deltas must not have changed it."""
    partials = []
    for before, event in itertools.pairwise(events):
        if isinstance(event, StructuredPartial):
            assert isinstance(before, TextDelta)
            expected = jiter.from_json(before.snapshot.encode(), partial_mode="trailing-strings")
            assert event.value == expected, before.snapshot
            partials.append(event)
    return partials


# -- the library, with the mock provider -------------------------------------------------


def test_partials_grow_and_the_final_model_validates() -> None:
    with tokenrelay.stream("Invent a person", model="mock", response_format=Person) as s:
        events = list(s)  # the sync stream runs ahead of this consumer: snapshots must hold
    partials = _check_partials(events)
    assert len(partials) > 10
    sizes = [len(json.dumps(p.value)) for p in partials]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert ("address", "street") in [p.path for p in partials]
    parsed = s.result.parsed
    assert isinstance(parsed, Person)
    assert parsed == Person.model_validate_json(s.result.text)
    assert partials[-1].value == parsed.model_dump()
    assert isinstance(partials[-1].partial, Person)  # model_construct of the partial dict
    assert partials[0].partial is not None and not hasattr(partials[0].partial, "age")


async def test_async_stream_and_the_request_carries_the_strict_schema() -> None:
    provider = MockProvider(tps=None)
    async with tokenrelay.astream("hi", provider=provider, response_format=Person) as s:
        events = [e async for e in s]
    assert isinstance(s.result.parsed, Person)
    _check_partials(events)
    fmt = provider.requests[-1].response_format
    assert fmt is not None and fmt.name == "Person" and fmt.strict
    assert fmt.schema_["additionalProperties"] is False
    assert fmt.schema_["required"] == list(Person.model_fields)


def test_json_schema_dict_gives_the_json_value() -> None:
    result = tokenrelay.complete("a film", model="mock", response_format=SCHEMA)
    assert result.parsed == {"title": "example", "year": 1900}
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("text", [
    '{"name": "Ann", "age": "old", "hobbies": [], "address": {"street": "x", "zip_code": 1}}',
    '{"name": "Ann", "age": -3, "hobbies": [], "address": {"street": "x", "zip_code": 1}}',
])
def test_a_validation_failure_is_an_error_that_keeps_the_raw_text(text: str) -> None:
    provider = MockProvider(text)
    with pytest.raises(tokenrelay.StructuredOutputError, match=r"does not match Person: 1 "
                       r"validation error, first at age") as info:
        tokenrelay.complete("hi", provider=provider, response_format=Person)
    assert info.value.raw_text == text and info.value.partial_text == text
    assert info.value.errors[0]["loc"] == ("age",)
    assert info.value.code == "structured_output_invalid"


def test_without_raising_the_result_keeps_text_and_error() -> None:
    text = '{"title": "Up", "year": 1800}'
    with tokenrelay.stream("hi", provider=MockProvider(text), response_format=SCHEMA,
                           raise_errors=False) as s:
        events = list(s)
    assert [e.type for e in events[-2:]] == ["error", "done"]
    assert events[-1].finish_reason == "error"  # type: ignore[union-attr]
    result = s.result
    assert result.text == text and result.parsed is None
    assert isinstance(result.error, tokenrelay.StructuredOutputError)
    assert "1800" in result.error.message  # the schema validator says what is wrong


@pytest.mark.parametrize(("text", "needle"), [
    ("Sorry, I cannot do that.", "not valid JSON"),
    ("", "the answer is empty"),
    ('{"title": "Up"} and more', "text after its JSON"),
    ('{"title": "Up", "ye', "incomplete"),
])
def test_broken_answers(text: str, needle: str) -> None:
    with pytest.raises(tokenrelay.StructuredOutputError, match=needle) as info:
        tokenrelay.complete("hi", provider=MockProvider(text), response_format=SCHEMA)
    assert info.value.raw_text == text


def test_max_tokens_cut_json_says_so() -> None:
    with pytest.raises(tokenrelay.StructuredOutputError, match="max_tokens"):
        tokenrelay.complete("hi", model="mock", response_format=Person, max_tokens=5)


def test_a_code_fence_around_the_json_is_tolerated() -> None:
    text = '```json\n{"title": "Up", "year": 2009}\n```\n'
    with tokenrelay.stream("hi", provider=MockProvider(text), response_format=SCHEMA) as s:
        events = list(s)
    assert s.result.parsed == {"title": "Up", "year": 2009}
    values = [e.value for e in events if isinstance(e, StructuredPartial)]
    assert values[0] == {} and values[-1] == {"title": "Up", "year": 2009}


def test_bad_response_format_is_a_usage_error() -> None:
    with pytest.raises(tokenrelay.UsageError, match="response_format"):
        tokenrelay.stream("hi", model="mock", response_format="json")
    with pytest.raises(tokenrelay.UsageError, match="free text"):
        tokenrelay.stream("hi", model="mock", response_format={"type": "text"})


# -- the pieces --------------------------------------------------------------------------


def test_response_format_forms() -> None:
    openai_form = {"type": "json_schema",
                   "json_schema": {"name": "film", "schema": SCHEMA, "strict": True}}
    assert StructuredOutput.of(openai_form).response_format.name == "film"
    plain = StructuredOutput.of({"name": "film", "schema": SCHEMA, "strict": False})
    assert plain.response_format.strict is False and plain.model is None
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert StructuredOutput.of(loose).response_format.strict is False  # would change meaning
    assert StructuredOutput.of(SCHEMA).response_format.strict is True
    fmt = tokenrelay.ResponseFormat(name="x", schema=SCHEMA)
    assert StructuredOutput.of(fmt).response_format is fmt
    assert StructuredOutput.of(list[int]).validate("[1, 2]") == [1, 2]  # any pydantic type


def test_strict_schema_closes_objects_and_requires_every_property() -> None:
    schema = json_schema(Person)
    assert is_strict(schema) and not is_strict(Person.model_json_schema())
    address = schema["$defs"]["Address"]
    assert address["additionalProperties"] is False and address["required"] == ["street",
                                                                                 "zip_code"]
    assert "default" not in schema["properties"]["nickname"]  # default: null is dropped
    mapping = strict_schema({"type": "object", "additionalProperties": {"type": "integer"}})
    assert mapping["additionalProperties"] == {"type": "integer"}  # a dict field stays open


@pytest.mark.parametrize("model", [Person, Tree, Address])
def test_example_values_validate(model: type[BaseModel]) -> None:
    schema = json_schema(model)
    value = example_value(schema)
    model.model_validate(value)
    assert example_value(schema) == value  # deterministic


def test_example_value_keywords() -> None:
    assert example_value({"enum": ["b", "a"]}) == "b"
    assert example_value({"type": "string", "format": "date"}) == "2024-01-01"
    assert example_value({"type": "string", "maxLength": 3}) == "exa"
    assert example_value({"type": "integer", "minimum": 10}) == 10
    assert example_value({"type": "number", "maximum": 0}) == 0
    assert example_value({"type": "array", "items": {"type": "boolean"}, "minItems": 2}) == [
        True, True]
    assert example_value({"anyOf": [{"type": "null"}, {"type": "integer"}]}) == 1
    assert example_value({"type": ["null", "string"]}) == "example"
    assert example_value({"$ref": "#/$defs/A", "$defs": {"A": {"const": 7}}}) == 7


# -- the OpenAI-compatible provider, against the loopback mock upstream ------------------


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server
    for key in [k for k in config._providers if server.url in k]:
        del config._providers[key]


async def test_openai_provider_sends_the_schema_and_parses_the_stream(
    upstream: MockUpstream,
) -> None:
    async with tokenrelay.astream("a person", model="m", base_url=upstream.url, api_key="k",
                                  response_format=Person) as s:
        events = [e async for e in s]
    (record,) = upstream.chat_requests()
    assert record.body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "Person", "schema": json_schema(Person), "strict": True}}
    partials = _check_partials(events)
    assert len(partials) > 3
    assert isinstance(s.result.parsed, Person)
    assert partials[-1].value == json.loads(s.result.text)


def test_json_mode_goes_out_as_json_object(upstream: MockUpstream) -> None:
    result = tokenrelay.complete("any object", model="m", base_url=upstream.url, api_key="k",
                                 response_format={"type": "json_object"})
    (record,) = upstream.chat_requests()
    assert record.body["response_format"] == {"type": "json_object"}
    assert isinstance(result.parsed, dict)


# -- the CLI, through the real entry point -------------------------------------------------


@pytest.fixture
def models_module(tmp_path: Path) -> Path:
    (tmp_path / "climodels.py").write_text(
        "from pydantic import BaseModel\n\n"
        "class Film(BaseModel):\n    title: str\n    year: int\n    genres: list[str]\n"
    )
    return tmp_path


def test_cli_schema_file_prints_the_final_json(tmp_path: Path) -> None:
    path = tmp_path / "film.json"
    path.write_text(json.dumps(SCHEMA))
    done = run_cli("-m", "mock", "--schema", str(path), "a film")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"title": "example", "year": 1900}
    assert done.stdout.startswith("{\n  ")  # pretty-printed
    assert done.stderr == ""


def test_cli_schema_model_and_json_events(models_module: Path) -> None:
    done = run_cli("-m", "mock", "--schema", "climodels:Film", "--json", "a film")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    partials = [e for e in events if e["type"] == "structured_partial"]
    assert len(partials) > 3
    assert partials[-1]["value"] == {"title": "example", "year": 1, "genres": ["example"]}
    assert partials[-1]["path"] == ["genres", 0]
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"


def test_cli_schema_failure_keeps_the_text_and_exits_1(models_module: Path) -> None:
    done = run_cli("-m", "mock:text=not json", "--schema", "climodels:Film", "hi")
    assert done.returncode == 1
    assert done.stdout == "not json\n"
    assert done.stderr.startswith("error: the answer is not valid JSON")


def test_cli_schema_that_cannot_load_is_a_usage_error(tmp_path: Path) -> None:
    done = run_cli("-m", "mock", "--schema", "nosuchmodule:Model", "hi")
    assert done.returncode == 2 and "cannot import nosuchmodule" in done.stderr
    (tmp_path / "bad.json").write_text("{nope")
    done = run_cli("-m", "mock", "--schema", str(tmp_path / "bad.json"), "hi")
    assert done.returncode == 2 and "not valid JSON" in done.stderr


def test_cli_schema_fills_in_live_on_a_terminal(models_module: Path) -> None:
    argv = tokenrelay_argv("-m", "mock:tps=40", "--schema", "climodels:Film",
                           "--stats", "a film")
    with PtyProcess(argv, env=cli_env(), cwd=str(models_module)) as tty:
        tty.expect(r'"title": "example"')  # shown before the end of the stream
        tty.expect(r" · stop")
        assert tty.wait() == 0
    assert '"genres": [' in tty.text and '"year": 1' in tty.text
