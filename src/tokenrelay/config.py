"""Where models come from: model names → providers, from arguments, env and ``.env``.

Resolution of a model name:

* ``mock`` or ``mock:opt=value,...`` → :class:`~tokenrelay.providers.mock.MockProvider`;
* ``smollm2`` / ``local`` (the embedded SmolLM2-135M-Instruct), ``local:/path/model.gguf``
  or any path ending in ``.gguf`` → the local llama.cpp provider;
* anything else → the OpenAI-compatible provider, which needs a base URL or a key
  (``--base-url``, ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, or the same in ``.env``).

Which kind serves a name is the provider registry's answer
(:func:`~tokenrelay.providers.registry.kind_for_model`), the registry the gateway's routes
use too.

With no model given (:func:`choose_model`): ``TOKENRELAY_MODEL`` if set; else the model
saved with ``tokenrelay models default NAME`` (``default_model.txt`` in the config
directory: ``$TOKENRELAY_HOME``, else the user's config directory); else, with an
OpenAI-compatible endpoint configured, the endpoint's first listed model (asked for when
the first request goes out: ``Provider.default_model()``); else the embedded local model.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from .errors import UsageError
from .providers.base import Provider
from .providers.registry import LOCAL, MOCK, OPENAI, kind_for_model

__all__ = ["LOCAL_MODEL", "ModelChoice", "Settings", "choose_model", "config_dir", "resolve",
           "save_default_model"]

LOCAL_MODEL = "smollm2"
_DEFAULT_FILE = "default_model.txt"


@dataclass(frozen=True, slots=True)
class Settings:
    """Configuration read from the environment and a ``.env`` file (env wins)."""

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    default_model: str | None = None
    gguf_path: str | None = None
    data_dir: Path | None = None
    log_library: bool = False
    #: Saved by ``tokenrelay models default NAME`` (in the config directory).
    saved_model: str | None = None
    #: Seconds a tokenrelay gateway is asked to keep an answer after a break
    #: (``TOKENRELAY_RESUME_GRACE``; 0: none).
    resume_grace: float | None = 30.0

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
        saved = _read_saved_model(Path(data_dir) if data_dir else None)
        return cls(
            openai_api_key=get("OPENAI_API_KEY"),
            openai_base_url=get("OPENAI_BASE_URL"),
            default_model=get("TOKENRELAY_MODEL"),
            gguf_path=get("TOKENRELAY_GGUF"),
            data_dir=Path(data_dir) if data_dir else None,
            log_library=(get("TOKENRELAY_LOG") or "").lower() in ("1", "true", "yes"),
            saved_model=saved,
            resume_grace=_grace(get("TOKENRELAY_RESUME_GRACE")),
        )

    @property
    def remote_configured(self) -> bool:
        return bool(self.openai_api_key or self.openai_base_url)


def _grace(value: str | None) -> float | None:
    if value is None:
        return 30.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise UsageError(f"TOKENRELAY_RESUME_GRACE must be a number of seconds from 0 to"
                         f" 86400 (0: ask for none), not {value!r}")
    return seconds or None


_providers: dict[tuple[str, ...], Provider] = {}
_providers_lock = threading.Lock()


def _cached(key: tuple[str, ...], factory: type[Provider], **kwargs: object) -> Provider:
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = factory(**kwargs)  # type: ignore[call-arg]
        return provider


def config_dir(home: Path | None = None) -> Path:
    """Where the user's settings live: ``$TOKENRELAY_HOME``, else the user config dir."""
    if home is None:
        value = os.environ.get("TOKENRELAY_HOME")
        home = Path(value) if value else None
    if home is not None:
        return home
    import platformdirs

    return Path(platformdirs.user_config_dir("tokenrelay", appauthor=False))


def _read_saved_model(home: Path | None) -> str | None:
    try:
        name = (config_dir(home) / _DEFAULT_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name or None


def save_default_model(name: str | None, home: Path | None = None) -> Path:
    """Save ``name`` as the default model (``None`` forgets it); returns the file."""
    path = config_dir(home) / _DEFAULT_FILE
    if name is None:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(name.strip() + "\n", encoding="utf-8")
    return path


ModelSource = Literal["argument", "TOKENRELAY_MODEL", "models default", "endpoint",
                      "embedded"]

#: How each source reads in a footer: ``gpt-x (endpoint's first model)``.
SOURCE_NOTES: dict[str, str] = {
    "TOKENRELAY_MODEL": "from TOKENRELAY_MODEL",
    "models default": "set with `tokenrelay models default`",
    "endpoint": "the endpoint's first model",
}


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """Which model a request uses and why. ``name`` is ``None`` for the endpoint's
    first listed model, known once the endpoint was asked."""

    name: str | None
    source: ModelSource

    @property
    def note(self) -> str | None:
        """Why this model, for a footer; ``None`` when the user named it (or nothing
        is configured and it is the embedded model)."""
        return SOURCE_NOTES.get(self.source)


def choose_model(model: str | None, settings: Settings,
                 base_url: str | None = None, api_key: str | None = None) -> ModelChoice:
    """The model for a request that names ``model`` (or none); see the module docstring."""
    if model:
        return ModelChoice(model, "argument")
    if settings.default_model:
        return ModelChoice(settings.default_model, "TOKENRELAY_MODEL")
    if settings.saved_model:
        return ModelChoice(settings.saved_model, "models default")
    if base_url or api_key or settings.remote_configured:
        return ModelChoice(None, "endpoint")
    return ModelChoice(LOCAL_MODEL, "embedded")


@overload
def resolve(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    settings: Settings | None = None,
    connect_timeout: float | None = 10.0,
) -> tuple[Provider, str]: ...


@overload
def resolve(
    model: str | None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    settings: Settings | None = None,
    connect_timeout: float | None = 10.0,
) -> tuple[Provider, str | None]: ...


def resolve(
    model: str | None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    settings: Settings | None = None,
    connect_timeout: float | None = 10.0,
) -> tuple[Provider, str | None]:
    """The provider for ``model`` and the model name to send it (``None``: the endpoint's
    first listed model, which the provider looks up when the first request goes out).

    ``connect_timeout`` (``Timeouts.connect``) configures the HTTP provider's connection
    timeout; providers are cached per endpoint, key and connect timeout.

    Raises:
        UsageError: the model is unknown and no OpenAI-compatible endpoint is configured.
    """
    settings = settings or Settings.load()
    name = choose_model(model, settings, base_url, api_key).name
    if name is None:
        return _openai(None, base_url, api_key, settings, connect_timeout), None

    kind = kind_for_model(name)  # the one registry (providers/registry.py)
    if kind is MOCK:
        from .providers.mock import parse_mock_options

        options = parse_mock_options(name[5:]) if name.startswith("mock:") else {}
        if options:
            return MOCK.create(**options), "mock"  # options make it a fresh script
        return _cached(("mock",), MOCK.load()), "mock"

    if kind is LOCAL:
        path = name[6:] if name.startswith("local:") else None
        if path is None and name.endswith(".gguf"):
            path = name
        path = path or settings.gguf_path
        provider = _cached(("local", path or ""), LOCAL.load(), model_path=path)
        return provider, LOCAL_MODEL if path is None else Path(path).stem

    return _openai(name, base_url, api_key, settings, connect_timeout), name


def _openai(name: str | None, base_url: str | None, api_key: str | None, settings: Settings,
            connect_timeout: float | None) -> Provider:
    url = base_url or settings.openai_base_url
    key = api_key or settings.openai_api_key
    if not url and not key:
        raise UsageError(
            f"unknown model {name!r}: no OpenAI-compatible endpoint is configured."
            f" Set OPENAI_BASE_URL / OPENAI_API_KEY (or pass base_url=), or use"
            f" {LOCAL_MODEL!r} (embedded) or 'mock'"
        )
    url = url or "https://api.openai.com/v1"
    grace = settings.resume_grace
    return _cached(("openai", url, key or "", str(connect_timeout), str(grace)), OPENAI.load(),
                   base_url=url, api_key=key, connect_timeout=connect_timeout,
                   resume_grace=grace)
