"""Where models come from: model names → providers, from arguments, env and ``.env``.

Resolution of a model name:

* ``mock`` or ``mock:opt=value,...`` → :class:`~tokenrelay.providers.mock.MockProvider`;
* ``smollm2`` / ``local`` (the embedded SmolLM2-135M-Instruct), ``local:/path/model.gguf``
  or any path ending in ``.gguf`` → the local llama.cpp provider;
* anything else → the OpenAI-compatible provider, which needs a base URL or a key
  (``--base-url``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, or the same in ``.env``).

With no model given: ``TOKENRELAY_MODEL`` if set; else the OpenAI-compatible default
model when a key or base URL is configured; else the embedded local model.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .providers.base import Provider

__all__ = ["DEFAULT_OPENAI_MODEL", "LOCAL_MODEL", "Settings", "resolve"]

LOCAL_MODEL = "smollm2"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
_LOCAL_ALIASES = {"smollm2", "local", "smollm2-135m-instruct"}


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration read from the environment and a ``.env`` file (env wins)."""

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    default_model: str | None = None
    gguf_path: str | None = None
    data_dir: Path | None = None
    log_library: bool = False

    @classmethod
    def load(cls, env_file: str | os.PathLike[str] | None = ".env") -> Settings:
        values: dict[str, str | None] = {}
        if env_file is not None and Path(env_file).is_file():
            from dotenv import dotenv_values

            values.update(dotenv_values(env_file))
        values.update(os.environ)

        def get(name: str) -> str | None:
            value = values.get(name)
            return value if value else None

        data_dir = get("TOKENRELAY_HOME")
        return cls(
            openai_api_key=get("OPENAI_API_KEY"),
            openai_base_url=get("OPENAI_BASE_URL"),
            default_model=get("TOKENRELAY_MODEL"),
            gguf_path=get("TOKENRELAY_GGUF"),
            data_dir=Path(data_dir) if data_dir else None,
            log_library=(get("TOKENRELAY_LOG") or "").lower() in ("1", "true", "yes"),
        )

    @property
    def remote_configured(self) -> bool:
        return bool(self.openai_api_key or self.openai_base_url)


_providers: dict[tuple[str, ...], Provider] = {}
_providers_lock = threading.Lock()


def _cached(key: tuple[str, ...], factory: type[Provider], **kwargs: object) -> Provider:
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = factory(**kwargs)  # type: ignore[call-arg]
        return provider


def default_model(settings: Settings, base_url: str | None = None) -> str:
    if settings.default_model:
        return settings.default_model
    if base_url or settings.remote_configured:
        return DEFAULT_OPENAI_MODEL
    return LOCAL_MODEL


def resolve(
    model: str | None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    settings: Settings | None = None,
    connect_timeout: float | None = 10.0,
) -> tuple[Provider, str]:
    """The provider for ``model`` and the model name to send it.

    ``connect_timeout`` (``Timeouts.connect``) configures the HTTP provider's connection
    timeout; providers are cached per endpoint, key and connect timeout.

    Raises:
        UsageError: the model is unknown and no OpenAI-compatible endpoint is configured.
    """
    settings = settings or Settings.load()
    name = model or default_model(settings, base_url)

    if name == "mock" or name.startswith("mock:"):
        from .providers.mock import MockProvider, parse_mock_options

        options = parse_mock_options(name[5:]) if name.startswith("mock:") else {}
        if options:
            return MockProvider(**options), "mock"  # options make it a fresh script
        return _cached(("mock",), MockProvider), "mock"

    if name in _LOCAL_ALIASES or name.startswith("local:") or name.endswith(".gguf"):
        from .providers.local import LocalProvider

        path = name[6:] if name.startswith("local:") else None
        if path is None and name.endswith(".gguf"):
            path = name
        path = path or settings.gguf_path
        provider = _cached(("local", path or ""), LocalProvider, model_path=path)
        return provider, LOCAL_MODEL if path is None else Path(path).stem

    url = base_url or settings.openai_base_url
    key = api_key or settings.openai_api_key
    if not url and not key:
        raise UsageError(
            f"unknown model {name!r}: no OpenAI-compatible endpoint is configured."
            f" Set OPENAI_BASE_URL / OPENAI_API_KEY (or pass base_url=), or use"
            f" {LOCAL_MODEL!r} (embedded) or 'mock'"
        )
    from .providers.openai_compat import OpenAIProvider

    url = url or "https://api.openai.com/v1"
    provider = _cached(("openai", url, key or "", str(connect_timeout)), OpenAIProvider,
                       base_url=url, api_key=key, connect_timeout=connect_timeout)
    return provider, name
