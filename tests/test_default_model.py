"""The model used when none is named (issue 11): with an endpoint set, asking it for
``gpt-4o-mini`` was a 404. Now: ``TOKENRELAY_MODEL``, else ``tokenrelay models default``,
else the endpoint's first listed model; the footer says which."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pty import cli_env, tokenrelay, tokenrelay_argv

import tokenrelay as lib
from tokenrelay.config import Settings, choose_model
from tokenrelay.testing.mock_upstream import MockUpstream


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(models=("qwen2.5-0.5b", "llama-3.2-1b")) as server:
        yield server


def _models_asked(server: MockUpstream) -> list[str | None]:
    return [r.model for r in server.chat_requests()]


def test_an_endpoint_in_dotenv_uses_its_first_listed_model(upstream: MockUpstream,
                                                           tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={upstream.url}\n")
    done = subprocess.run(tokenrelay_argv("--stats", "Hi"), cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tok0")
    assert _models_asked(upstream) == ["qwen2.5-0.5b"]
    assert done.stderr.startswith("qwen2.5-0.5b (the endpoint's first model) · ")


def test_tokenrelay_model_wins_and_the_footer_says_so(upstream: MockUpstream) -> None:
    env = cli_env(OPENAI_BASE_URL=upstream.url, TOKENRELAY_MODEL="llama-3.2-1b")
    done = tokenrelay("--stats", "Hi", env=env)
    assert done.returncode == 0, done.stderr
    assert _models_asked(upstream) == ["llama-3.2-1b"]
    assert done.stderr.startswith("llama-3.2-1b (from TOKENRELAY_MODEL) · ")


def test_models_default_is_saved_used_and_cleared(upstream: MockUpstream) -> None:
    env = cli_env(OPENAI_BASE_URL=upstream.url)
    saved = tokenrelay("models", "default", "llama-3.2-1b", env=env)
    assert saved.returncode == 0, saved.stderr
    home = Path(os.environ["TOKENRELAY_HOME"])
    assert (home / "default_model.txt").read_text().strip() == "llama-3.2-1b"
    shown = tokenrelay("models", "default", env=env)
    assert shown.stdout.startswith("llama-3.2-1b (set with `tokenrelay models default`)")

    done = tokenrelay("--stats", "Hi", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("llama-3.2-1b (set with `tokenrelay models default`) · ")
    # -m still wins, and says nothing about why.
    named = tokenrelay("--stats", "-m", "qwen2.5-0.5b", "Hi", env=env)
    assert named.stderr.startswith("qwen2.5-0.5b · ")
    # TOKENRELAY_MODEL wins over the saved default.
    env_wins = tokenrelay("--stats", "Hi", env={**env, "TOKENRELAY_MODEL": "qwen2.5-0.5b"})
    assert env_wins.stderr.startswith("qwen2.5-0.5b (from TOKENRELAY_MODEL) · ")
    assert _models_asked(upstream) == ["llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-0.5b"]

    listing = json.loads(tokenrelay("models", "--json", env=env).stdout)
    assert (listing["default"], listing["default_source"]) == ("llama-3.2-1b",
                                                               "models default")

    cleared = tokenrelay("models", "default", "--clear", env=env)
    assert cleared.returncode == 0 and not (home / "default_model.txt").exists()
    listing = json.loads(tokenrelay("models", "--json", env=env).stdout)
    assert (listing["default"], listing["default_source"]) == ("qwen2.5-0.5b", "endpoint")
    assert [m["name"] for m in listing["models"] if m["default"]] == ["qwen2.5-0.5b"]


def test_the_saved_default_applies_without_an_endpoint_too() -> None:
    assert tokenrelay("models", "default", "mock").returncode == 0
    done = tokenrelay("--stats", "hi")
    assert done.stdout == "Mock answer to: hi\n"
    assert done.stderr.startswith("mock (set with `tokenrelay models default`) · ")


def test_the_library_asks_the_endpoint_once(upstream: MockUpstream) -> None:
    results = [lib.complete("hi", base_url=upstream.url) for _ in range(2)]
    assert [r.model for r in results] == ["qwen2.5-0.5b"] * 2
    listed = [r for r in upstream.requests if r.path.endswith("/models")]
    assert len(listed) == 1  # cached per provider


def test_an_endpoint_listing_no_model_is_a_clear_error() -> None:
    with MockUpstream(models=()) as server:
        with pytest.raises(lib.UsageError, match="lists none: pass model= or set"
                                                 " TOKENRELAY_MODEL"):
            lib.complete("hi", base_url=server.url)
        done = tokenrelay("hi", env=cli_env(OPENAI_BASE_URL=server.url))
    assert done.returncode == 2
    assert done.stderr.startswith("error: no model named, and ")


def test_choose_model_order() -> None:
    remote = Settings(openai_base_url="http://127.0.0.1:9/v1")
    assert choose_model(None, remote).source == "endpoint"
    assert choose_model(None, Settings()).name == "smollm2"
    saved = Settings(openai_base_url="http://127.0.0.1:9/v1", saved_model="a")
    assert (choose_model(None, saved).name, choose_model("b", saved).name) == ("a", "b")
    both = Settings(saved_model="a", default_model="c")
    assert choose_model(None, both).name == "c"
