"""One spelling of the mock's options: model ``mock:...``, ``mock-upstream`` and
``MockProvider`` read the same names; the old spellings are refused, naming the new one."""

from __future__ import annotations

import pytest
from _pty import tokenrelay as run_cli

import tokenrelay
from tokenrelay import StreamError
from tokenrelay.errors import UsageError
from tokenrelay.providers.mock import MockProvider, parse_mock_options, tokenize
from tokenrelay.testing._mock_spec import parse_spec
from tokenrelay.testing.mock_upstream import Behaviour, MockUpstream

SPEC = "tokens=8,delay=0.01,tps=500,fault=error,after=3,times=2,retry_after=1"


def test_both_mocks_read_the_same_string() -> None:
    provider = MockProvider(**parse_mock_options(SPEC))
    assert (provider.tokens, provider.delay, provider.tps, provider.fault, provider.after,
            provider.times, provider.retry_after) == (8, 0.01, 500, "error", 3, 2, 1.0)
    behaviour = Behaviour.parse(SPEC)
    assert (behaviour.tokens, behaviour.first_token_delay, behaviour.tokens_per_second,
            behaviour.fault, behaviour.fault_after, behaviour.fault_times,
            behaviour.retry_after) == (8, 0.01, 500, "error", 3, 2, "1")


@pytest.mark.parametrize(("old", "new"), [
    ("error_after=5", "fault=error,after=N"),
    ("tokens_per_second=20", "tps=R"),
    ("first_token_delay=1", "delay=S"),
    ("stall_after=2", "fault=stall,after=N"),
    ("truncate_after=2", "fault=close,after=N"),
    ("fail_before_first=429", "fault=STATUS"),
    ("fault_after=3", "after=N"),
])
def test_old_spellings_name_the_new_one(old: str, new: str) -> None:
    for parse in (parse_mock_options, Behaviour.parse):
        with pytest.raises(UsageError) as info:
            parse(old)
        assert f"is spelled {new} now" in info.value.message
    with pytest.raises(TypeError, match="spelled"):
        MockProvider(**{old.partition("=")[0]: 1})


def test_the_cli_refuses_an_old_spelling_in_one_line() -> None:
    done = run_cli("-m", "mock:error_after=5", "hi")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: mock option 'error_after' is spelled fault=error,after=N now")


def test_provider_only_options_are_refused_by_the_upstream_with_a_reason() -> None:
    with pytest.raises(UsageError, match="for model mock: only"):
        Behaviour.parse("text=hello")


@pytest.mark.parametrize("tokens", [1, 25, 26, 27, 30, 53, 100])
def test_tokens_n_streams_exactly_n_tokens(tokens: int) -> None:
    # It streamed 29 for tokens=30: the filler's trailing space was a token of its own.
    with tokenrelay.stream("hi", model=f"mock:tokens={tokens}") as s:
        deltas = [t for t in s.text_stream()]
    assert len(deltas) == tokens
    assert s.result.usage.completion_tokens == tokens
    assert len(tokenize(s.result.text)) == tokens


@pytest.mark.parametrize(("fault", "code"), [("error", "mock_error"), ("reset", "connection_lost"),
                                             ("malformed", "malformed_chunk"),
                                             ("close", "truncated")])
def test_mid_stream_faults_of_the_provider_match_the_upstream(fault: str, code: str) -> None:
    spec = f"tokens=6,fault={fault},after=2"
    with pytest.raises(StreamError) as local:
        tokenrelay.complete("hi", model=f"mock:{spec}")
    assert local.value.code == code and local.value.partial_text == "Streaming shows"
    with MockUpstream() as upstream, pytest.raises(StreamError) as remote:
        tokenrelay.complete("hi", model=spec, base_url=upstream.url,
                            retry=tokenrelay.RetryPolicy(max_retries=0))
    expected = "mock_error" if fault == "error" else code
    assert remote.value.code in (expected, "upstream_error", "server_error")
    assert remote.value.partial_text == "tok0 tok1"


def test_times_counts_calls_for_every_fault() -> None:
    provider = MockProvider(tokens=3, fault=503, times=1, retry_after=0)
    result = tokenrelay.complete("hi", provider=provider,
                                 retry=tokenrelay.RetryPolicy(max_retries=1, backoff=0))
    assert result.text == "Streaming shows each" and provider.calls == 2


def test_semicolons_separate_too_and_model_names_are_ignored_upstream() -> None:
    assert parse_spec("tokens=3;tps=5") == {"tokens": 3, "tps": 5.0}
    assert Behaviour.parse("gpt-x;fault=reset;after=3").fault == "reset"
