from __future__ import annotations

import pytest

import tokenrelay
from tokenrelay.config import LOCAL_MODEL, Settings, resolve
from tokenrelay.providers.mock import MockProvider


def test_default_is_the_embedded_model_without_configuration() -> None:
    provider, name = resolve(None, settings=Settings())
    assert (provider.name, name) == ("local", LOCAL_MODEL)


def test_remote_configuration_changes_the_default() -> None:
    # No model named: the endpoint's first listed one, asked for by the provider when the
    # first request goes out (tests/test_default_model.py), not a hard-coded gpt-4o-mini.
    provider, name = resolve(None, settings=Settings(openai_base_url="http://127.0.0.1:9/v1"))
    assert provider.name == "openai" and name is None


def test_mock_options_make_a_fresh_script() -> None:
    provider, name = resolve("mock:tokens=3", settings=Settings())
    assert isinstance(provider, MockProvider) and provider.tokens == 3 and name == "mock"


def test_timeouts_connect_reaches_the_http_provider() -> None:
    url = "http://127.0.0.1:9/v1"
    s = tokenrelay.astream("x", model="m", base_url=url,
                           timeouts=tokenrelay.Timeouts(connect=1.5))
    assert s.provider.connect_timeout == 1.5  # type: ignore[attr-defined]
    default = tokenrelay.astream("x", model="m", base_url=url)
    assert default.provider.connect_timeout == 10.0  # type: ignore[attr-defined]


def test_env_file_is_read_and_env_wins(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    env = tmp_path / ".env"
    env.write_text("OPENAI_BASE_URL=http://from-file/v1\nTOKENRELAY_MODEL=mock\n")
    monkeypatch.setenv("TOKENRELAY_MODEL", "smollm2")
    settings = Settings.load(env)
    assert settings.openai_base_url == "http://from-file/v1"
    assert settings.default_model == "smollm2"


def test_unknown_model_without_endpoint_is_a_usage_error() -> None:
    with pytest.raises(tokenrelay.UsageError, match="unknown model 'gpt-x'"):
        resolve("gpt-x", settings=Settings())
