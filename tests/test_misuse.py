"""Misuse of the library is answered in the library's words (issue 11): the argument the
caller got wrong, the function they called, Python spellings rather than CLI flags."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from _pty import tokenrelay as run_cli

import tokenrelay
from tokenrelay.errors import UsageError

SYNC: list[tuple[str, Callable[..., Any]]] = [
    ("complete", tokenrelay.complete),
    ("stream", tokenrelay.stream),
    ("batch", lambda p, **kw: tokenrelay.batch([p], **kw)),
]


@pytest.mark.parametrize("bad", [123, None, 4.5, b"bytes", {"role": "user"}])
def test_a_prompt_of_the_wrong_type_is_a_type_error_naming_prompt(bad: Any) -> None:
    with pytest.raises(TypeError) as info:
        tokenrelay.complete(bad, model="mock")
    text = str(info.value)
    assert "prompt" in text and type(bad).__name__ in text
    assert "a string or a list of messages" in text


def test_a_message_of_the_wrong_type_names_its_index() -> None:
    with pytest.raises(TypeError, match=r"prompt\[1\]"):
        tokenrelay.complete([{"role": "user", "content": "hi"}, 7], model="mock")


def test_a_message_without_content_is_rejected_with_its_index() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user"}]
    with pytest.raises(UsageError) as info:
        tokenrelay.complete(messages, model="mock")
    assert "messages[1]" in info.value.message and "content" in info.value.message
    # An assistant turn that only called tools needs no content.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert tokenrelay.complete(ok, model="mock").text


def test_a_bad_field_of_a_message_names_its_index() -> None:
    with pytest.raises(UsageError, match=r"messages\[0\]\.role"):
        tokenrelay.complete([{"role": "robot", "content": "hi"}], model="mock")


@pytest.mark.parametrize(("name", "call"), SYNC)
def test_an_unknown_keyword_names_the_function_called_and_the_close_match(
        name: str, call: Callable[..., Any]) -> None:
    with pytest.raises(TypeError) as info:
        call("hi", model="mock", max_token=5)
    assert str(info.value) == (f"{name}() got an unexpected keyword argument 'max_token'"
                               "; did you mean 'max_tokens'?")


def test_every_real_keyword_still_passes() -> None:
    assert tokenrelay.complete(prompt="hi", model="mock", max_tokens=2).text == "Mock answer"
    assert [r.text for r in tokenrelay.batch(prompts=["a"], concurrency=1, model="mock")] == [
        "Mock answer to: a"]


def test_an_unknown_keyword_of_the_async_functions() -> None:
    with pytest.raises(TypeError, match=r"^astream\(\) got an unexpected keyword argument "
                                        r"'temprature'; did you mean 'temperature'\?$"):
        tokenrelay.astream("hi", temprature=0)

    async def main() -> None:
        with pytest.raises(TypeError, match=r"^acomplete\(\) .* 'sytem'; did you mean 'system'"):
            await tokenrelay.acomplete("hi", sytem="x")
        with pytest.raises(TypeError, match=r"^abatch\(\) .* 'zzz'$"):
            await tokenrelay.abatch(["hi"], zzz=1)

    asyncio.run(main())


def test_an_unknown_model_from_python_speaks_python(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError) as info:
        tokenrelay.complete("hi", model="gpt-nope")
    assert "base_url=" in info.value.message and "--base-url" not in info.value.message


def test_the_same_error_from_the_cli_speaks_in_flags() -> None:
    done = run_cli("-m", "gpt-nope", "hi")
    assert done.returncode == 2
    assert "--base-url" in done.stderr and "base_url=" not in done.stderr
