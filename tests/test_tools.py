"""Tools: schemas from signatures, tool-call events, and the tool loop.

The loop is driven by the scripted MockProvider, by a provider scripted chunk by chunk
here, by the OpenAI-compatible provider against the loopback mock upstream and the
recorded ``openai_tool_calls`` body, and by the CLI's ``--tool`` through the real entry
point.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import jiter
import pytest
from _pty import tokenrelay as run_cli
from _upstream import Upstream
from pydantic import BaseModel, Field

import tokenrelay
from tokenrelay import config
from tokenrelay.events import (
    Done,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    ToolResult,
    Usage,
    UsageEvent,
    event_to_dict,
)
from tokenrelay.providers.base import Chunk, Provider, ToolCallChunk
from tokenrelay.providers.mock import MockProvider, tokenize
from tokenrelay.request import Request
from tokenrelay.testing.mock_upstream import MockUpstream
from tokenrelay.tools import Tool, tool_choice_param, tool_spec, tools_of


def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict[str, Any]:
    """The current weather in a city.

    Uses the nearest station.

    Args:
        city: the city name, e.g. "Paris".
        unit: degrees Celsius or Fahrenheit;
            Celsius unless asked otherwise.

    Returns:
        The temperature.
    """
    return {"city": city, "temperature": 21, "unit": unit}


async def get_time(tz: str) -> str:
    """The local time in a time zone."""
    await asyncio.sleep(0)
    return f"12:00 in {tz}"


class Point(BaseModel):
    x: int
    y: int


class Scripted(Provider):
    """Streams the given chunks, one list per round; an exception in a list is raised."""

    name = "scripted"

    def __init__(self, *rounds: list[Chunk | Exception]) -> None:
        self.rounds = list(rounds)
        self.requests: list[Request] = []

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        for chunk in self.rounds[len(self.requests) - 1]:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk


def calls(*calls: tuple[str, str], finish: str = "tool_calls") -> list[Chunk | Exception]:
    """Chunks of parallel calls ``(name, arguments JSON)``, argument pieces interleaved."""
    chunks: list[Chunk | Exception] = [
        Chunk(tool_calls=[ToolCallChunk(i, f"call_{i}", name)]) for i, (name, _) in
        enumerate(calls)]
    for start in range(0, max(len(a) for _, a in calls), 3):
        for i, (_, arguments) in enumerate(calls):
            if arguments[start:start + 3]:
                chunks.append(Chunk(tool_calls=[ToolCallChunk(i, arguments=arguments[
                    start:start + 3])]))
    chunks.append(Chunk(finish_reason=finish, usage=Usage(10, 5)))
    return chunks


def text(answer: str) -> list[Chunk | Exception]:
    return [*(Chunk(text=w) for w in tokenize(answer)), Chunk(finish_reason="stop",
                                                               usage=Usage(20, 3))]


# -- schemas from signatures -------------------------------------------------------------


def test_tool_spec_from_a_function() -> None:
    spec = tool_spec(get_weather)
    assert spec.name == "get_weather"
    assert spec.description == "The current weather in a city.\n\nUses the nearest station."
    assert spec.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": 'the city name, e.g. "Paris".'},
            "unit": {"enum": ["c", "f"], "type": "string", "default": "c",
                     "description": "degrees Celsius or Fahrenheit; Celsius unless asked"
                                    " otherwise."},
        },
        "required": ["city"],
        "additionalProperties": False,
    }


def test_tool_wrapper_and_other_forms() -> None:
    tool = Tool(get_time, name="clock", description="What time is it")
    assert tool.is_async and tool.name == "clock" and tool.description == "What time is it"
    assert not Tool(get_weather).is_async
    openai_dict = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}}, "strict": True}}
    assert tool_spec(openai_dict).name == "f"
    assert tool_spec({"name": "g", "description": "d"}).description == "d"

    def place(point: Point, tags: list[str] | None = None, /) -> str:
        return f"{point.x},{point.y} {tags}"

    params = Tool(place).parameters
    assert params["properties"]["point"] == {"$ref": "#/$defs/Point"}
    assert asyncio.run(Tool(place).arun({"point": {"x": 1, "y": 2}})) == "1,2 None"


@pytest.mark.parametrize(("tool", "needle"), [
    (lambda x: x, "not usable"),
    ("get_weather", "must be a function"),
])
def test_unusable_tools_are_usage_errors(tool: Any, needle: str) -> None:
    with pytest.raises(tokenrelay.UsageError, match=needle):
        tools_of([tool])


def test_underscore_parameters_and_duplicate_names_are_usage_errors() -> None:
    def f(_secret: int) -> None: ...

    with pytest.raises(tokenrelay.UsageError, match="underscore"):
        Tool(f)
    with pytest.raises(tokenrelay.UsageError, match="two tools are named"):
        tools_of([get_weather, Tool(get_time, name="get_weather")])


def test_tool_choice_forms() -> None:
    specs, _ = tools_of([get_weather, get_time])
    assert tool_choice_param("auto", specs) == "auto"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert tool_choice_param("get_time", specs) == named
    assert tool_choice_param(get_time, specs) == named
    with pytest.raises(tokenrelay.UsageError, match="not among the tools"):
        tool_choice_param("nope", specs)


# -- tool-call events --------------------------------------------------------------------


def _check_tool_deltas(events: list[StreamEvent]) -> dict[int, str]:
    """Per index, the snapshot grows by the deltas and ``partial_arguments`` is the
    partial parse of that snapshot. Returns the final snapshots."""
    snapshots: dict[int, str] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            before = snapshots.get(event.index, "")
            assert event.arguments_snapshot == before + event.arguments_delta
            snapshots[event.index] = event.arguments_snapshot
            expected = None
            if event.arguments_snapshot.strip():
                expected = jiter.from_json(event.arguments_snapshot.encode(),
                                           partial_mode="trailing-strings")
            assert event.partial_arguments == expected, event
    return snapshots


def test_parallel_calls_interleave_with_correct_snapshots() -> None:
    provider = MockProvider(parallel_tools=True)
    with tokenrelay.stream("weather and time?", provider=provider,
                           tools=[get_weather, get_time], max_tool_rounds=0) as s:
        events = list(s)  # read after the stream: snapshots must not have changed
    indexes = [e.index for e in events if isinstance(e, ToolCallDelta)]
    assert indexes[:4] == [0, 1, 0, 1]  # interleaved
    snapshots = _check_tool_deltas(events)
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert [(d.index, d.name, d.arguments) for d in done] == [
        (0, "get_weather", {"city": "example", "unit": "c"}),
        (1, "get_time", {"tz": "example"}),
    ]
    assert snapshots == {0: '{"city": "example", "unit": "c"}', 1: '{"tz": "example"}'}
    result = s.result
    assert result.finish_reason == "tool_calls"
    assert [(c.index, c.name) for c in result.tool_calls] == [(0, "get_weather"),
                                                             (1, "get_time")]
    assert event_to_dict(events[2])["partial_arguments"] == {}


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server
    for key in [k for k in config._providers if server.url in k]:
        del config._providers[key]


async def test_recorded_parallel_calls_give_per_index_partial_arguments(
    upstream: Upstream,
) -> None:
    spec = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    async with tokenrelay.astream(
        "weather?", model="fixture:openai_tool_calls", base_url=upstream.url, api_key="k",
        tools=[spec],  # a spec only: the caller runs it, the stream stops at the calls
    ) as s:
        events = [e async for e in s]
    snapshots = _check_tool_deltas(events)
    assert snapshots == {0: '{"city":"Paris","unit":"c"}', 1: '{"tz":"Europe/Paris"}'}
    partial = [e.partial_arguments for e in events
               if isinstance(e, ToolCallDelta) and e.index == 1]
    assert {"tz": "Europe"} in partial  # the string showed while it streamed
    assert s.result.finish_reason == "tool_calls"
    assert not any(isinstance(e, ToolResult) for e in events)
    (record,) = upstream.calls
    assert record.body["tools"] == [{"type": "function", "function": spec}]


# -- the tool loop -----------------------------------------------------------------------


def test_the_loop_runs_a_function_and_streams_on() -> None:
    threads: list[int] = []

    def lookup(city: str) -> dict[str, Any]:
        """Weather."""
        threads.append(threading.get_ident())
        return {"city": city, "temperature": 21}

    provider = Scripted(calls(("lookup", '{"city": "Paris"}')), text("It is 21 degrees."))
    with tokenrelay.stream("weather?", provider=provider, tools=[lookup]) as s:
        events = list(s)
    kinds = [e.type for e in events]
    assert kinds.index("tool_call_done") < kinds.index("tool_result") < kinds.index(
        "text_delta")
    assert kinds.count("done") == 1 and kinds.count("usage") == 1 and kinds[-1] == "done"
    (result_event,) = [e for e in events if isinstance(e, ToolResult)]
    assert result_event.output == '{"city":"Paris","temperature":21}'
    assert result_event.value == {"city": "Paris", "temperature": 21}
    assert not result_event.is_error and result_event.id == "call_0"
    assert threads and threads[0] != threading.main_thread().ident  # a worker thread

    result = s.result
    assert result.text == "It is 21 degrees." and result.finish_reason == "stop"
    assert result.usage == Usage(30, 8)  # summed over both rounds
    assert events[-1] == Done("stop", Usage(30, 8), result.metrics)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas[-1].snapshot == "It is 21 degrees."

    second = provider.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool"]
    assert second[1].tool_calls == ({"id": "call_0", "type": "function", "function": {
        "name": "lookup", "arguments": '{"city": "Paris"}'}},)
    assert second[2].tool_call_id == "call_0" and second[2].content == result_event.output


async def test_parallel_tools_run_concurrently_in_call_order() -> None:
    barrier = threading.Barrier(2, timeout=5)  # passes only if both run at once

    def first(n: int) -> int:
        barrier.wait()
        return n + 1

    async def second(n: int) -> int:
        await asyncio.to_thread(barrier.wait)
        return n + 2

    provider = Scripted(calls(("first", '{"n": 1}'), ("second", '{"n": 1}')), text("ok"))
    async with tokenrelay.astream("go", provider=provider, tools=[first, second]) as s:
        events = [e async for e in s]
    results = [(e.name, e.output) for e in events if isinstance(e, ToolResult)]
    assert results == [("first", "2"), ("second", "3")]
    assert [m.tool_call_id for m in provider.requests[1].messages if m.role == "tool"] == [
        "call_0", "call_1"]


def test_a_tool_exception_is_fed_back_to_the_model() -> None:
    def explode(x: int) -> int:
        """Fails."""
        raise RuntimeError("boom")

    def strict(code: Annotated[str, Field(pattern=r"^\d+$")]) -> str:
        return code

    provider = Scripted(calls(("explode", '{"x": 1}'), ("strict", '{"code": "abc"}')),
                        text("Sorry, that failed."))
    result = tokenrelay.complete("go", provider=provider, tools=[explode, strict])
    assert result.text == "Sorry, that failed." and result.finish_reason == "stop"
    replies = [m.content for m in provider.requests[1].messages if m.role == "tool"]
    assert replies[0] == "Error: explode raised RuntimeError: boom"
    assert replies[1].startswith("Error: invalid arguments for strict: code: String should")


def test_rounds_are_bounded() -> None:
    provider = MockProvider(tool_rounds=100)
    with tokenrelay.stream("loop", provider=provider, tools=[get_weather],
                           max_tool_rounds=2) as s:
        events = list(s)
    assert provider.calls == 3
    assert sum(isinstance(e, ToolResult) for e in events) == 2
    assert s.result.finish_reason == "tool_calls" and s.result.tool_calls[0].name == "get_weather"
    assert s.result.error is None


def test_a_call_of_a_spec_only_tool_ends_the_stream_for_the_caller() -> None:
    spec = {"name": "ask_human", "parameters": {"type": "object", "properties": {
        "question": {"type": "string"}}}}
    provider = MockProvider()
    result = tokenrelay.complete("hi", provider=provider, tools=[spec, get_weather])
    assert provider.calls == 1 and result.finish_reason == "tool_calls"
    assert result.tool_calls[0].name == "ask_human"


def test_forced_tool_choice_is_relaxed_after_a_round() -> None:
    provider = MockProvider()
    tokenrelay.complete("hi", provider=provider, tools=[get_weather, get_time],
                        tool_choice=get_time)
    first, second = provider.requests
    assert first.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    assert second.tool_choice == "auto"
    assert second.messages[-1].content == "12:00 in example"  # a string goes as it is


def test_mock_answers_quoting_the_tool_result() -> None:
    result = tokenrelay.complete("weather?", model="mock", tools=[get_weather])
    assert result.text == ('Mock answer using the tool results: get_weather returned'
                           ' {"city":"example","temperature":21,"unit":"c"}.')


def test_structured_output_after_tools() -> None:
    class Report(BaseModel):
        summary: str

    result = tokenrelay.complete("weather?", model="mock", tools=[get_weather],
                                 response_format=Report)
    assert result.parsed == Report(summary="example")


def test_an_error_in_a_later_round_keeps_all_the_text() -> None:
    provider = Scripted(
        [Chunk(text="Let me check. "), *calls(("get_time", '{"tz": "UTC"}'))],
        [Chunk(text="It is"), tokenrelay.StreamError("gone", code="boom")],
    )
    with tokenrelay.stream("time?", provider=provider, tools=[get_time],
                           raise_errors=False) as s:
        events = list(s)
    assert [e.type for e in events[-2:]] == ["error", "done"]
    assert sum(e.type == "error" for e in events) == 1
    result = s.result
    assert result.finish_reason == "error" and result.text == "Let me check. It is"
    assert result.error is not None and result.error.partial_text == "Let me check. It is"
    assert result.usage.prompt_tokens >= 10


async def test_closing_during_a_tool_cancels_it() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(n: int) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return n

    provider = Scripted(calls(("forever", '{"n": 1}')), text("never"))
    s = tokenrelay.astream("go", provider=provider, tools=[forever])
    async with s:
        async for event in s:
            if isinstance(event, ToolCallDone):
                break
        consume = asyncio.ensure_future(s.__aiter__().__anext__())
        await asyncio.wait_for(started.wait(), 5)
        consume.cancel()
        await asyncio.gather(consume, return_exceptions=True)
    await asyncio.wait_for(cancelled.wait(), 5)
    assert s.result.finish_reason == "cancelled"
    assert len(provider.requests) == 1


async def test_stopping_after_a_result_cancels_the_other_tools() -> None:
    cancelled = asyncio.Event()

    async def quick(n: int) -> int:
        return n

    async def stuck(n: int) -> int:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return n

    provider = Scripted(calls(("quick", '{"n": 1}'), ("stuck", '{"n": 2}')), text("never"))
    async with tokenrelay.astream("go", provider=provider, tools=[quick, stuck]) as s:
        async for event in s:
            if isinstance(event, ToolResult):
                break
    await asyncio.wait_for(cancelled.wait(), 5)
    assert s.result.finish_reason == "cancelled"


@pytest.mark.parametrize("tool_seconds", [0.3, 60])
def test_total_timeout_covers_the_whole_loop(tool_seconds: float) -> None:
    async def slow(n: int) -> int:
        await asyncio.sleep(tool_seconds)
        return n

    provider = Scripted(calls(("slow", '{"n": 1}')), text("late"))
    with pytest.raises(tokenrelay.TimeoutError) as info:
        tokenrelay.complete("go", provider=provider, tools=[slow],
                            timeouts=tokenrelay.Timeouts(total=0.2))
    assert info.value.kind == "total"
    assert len(provider.requests) == 1


def test_events_to_dict() -> None:
    event = ToolResult(0, "call_0", "f", {"a": 1}, "out", True, value=object())
    assert event_to_dict(event) == {"type": "tool_result", "index": 0, "id": "call_0",
                                    "name": "f", "arguments": {"a": 1}, "output": "out",
                                    "is_error": True}


# -- the OpenAI-compatible provider, against the loopback mock upstream ------------------


@pytest.fixture
def mock_upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server
    for key in [k for k in config._providers if server.url in k]:
        del config._providers[key]


def test_loop_over_the_wire(mock_upstream: MockUpstream) -> None:
    with tokenrelay.stream("weather?", model="m", base_url=mock_upstream.url, api_key="k",
                           tools=[get_weather], tool_choice="auto") as s:
        events = list(s)
    first, second = (r.body for r in mock_upstream.chat_requests())
    assert first["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": tool_spec(get_weather).description,
        "parameters": tool_spec(get_weather).parameters}}]
    assert first["tool_choice"] == "auto"
    assistant, reply = second["messages"][1:]
    (call,) = assistant["tool_calls"]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    (tool_result,) = [e for e in events if isinstance(e, ToolResult)]
    assert reply == {"role": "tool", "content": tool_result.output, "tool_call_id": call["id"]}
    assert tool_result.arguments == json.loads(call["function"]["arguments"])
    assert tool_result.value == get_weather(**tool_result.arguments)
    assert s.result.text.startswith("tok0 tok1") and s.result.finish_reason == "stop"
    usage = [e for e in events if isinstance(e, UsageEvent)]
    assert len(usage) == 1 and usage[0].usage == s.result.usage


def test_openai_message_shapes() -> None:
    from tokenrelay.providers.openai_compat import OpenAIProvider

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    request = Request(model="m", messages=(
        tokenrelay.Message(role="user", content="hi", name="ann"),
        tokenrelay.Message(role="assistant", content="", tool_calls=(call,)),
        tokenrelay.Message(role="tool", content="42", tool_call_id="c1", name="f"),
    ), tool_choice="required")
    body = json.loads(OpenAIProvider(base_url="http://127.0.0.1:9/v1")._body(
        request, stream_options=False))
    assert body["messages"] == [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert body["tool_choice"] == "required" and "tools" not in body


# -- the CLI, through the real entry point -------------------------------------------------


@pytest.fixture
def tools_module(tmp_path: Path) -> Path:
    (tmp_path / "clitools.py").write_text(
        "def get_weather(city: str) -> dict:\n"
        '    """The weather in a city."""\n'
        '    return {"city": city, "temperature": 21}\n\n'
        "def broken(x: int) -> int:\n"
        '    raise ValueError("no data")\n'
    )
    return tmp_path


def test_cli_tool_runs_the_loop(tools_module: Path) -> None:
    done = run_cli("-m", "mock", "--tool", "clitools:get_weather", "weather?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('Mock answer using the tool results: get_weather returned'
                           ' {"city":"example","temperature":21}.\n')
    assert done.stderr.splitlines() == [
        '→ get_weather({"city": "example"})',
        '← get_weather: {"city":"example","temperature":21}',
    ]


def test_cli_tool_errors_and_bounded_rounds(tools_module: Path) -> None:
    done = run_cli("-m", "mock:tool_rounds=5", "--tool", "clitools.py:broken",
                   "--max-tool-rounds", "1", "go")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[1] == "← broken: Error: broken raised ValueError: no data"
    assert lines[-1].startswith("warning: stopped after 1 rounds of tool calls")
    assert done.stdout == ""


def test_cli_tool_json_events(tools_module: Path) -> None:
    done = run_cli("-m", "mock", "--tool", "clitools:get_weather", "--json", "weather?")
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["type"] for line in done.stdout.splitlines()]
    assert kinds[0] == "tool_call_delta" and "tool_result" in kinds and kinds[-1] == "done"
    assert done.stderr == ""
