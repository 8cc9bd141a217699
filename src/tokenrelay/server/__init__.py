"""The SSE gateway: OpenAI-compatible endpoints over the tokenrelay core (extra ``[server]``)."""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        'the gateway needs the server extra: pip install "tokenrelay[server]"'
    ) from exc

from .app import Gateway, create_app
from .config import ServerConfig, hash_key, load_config

__all__ = ["Gateway", "ServerConfig", "create_app", "hash_key", "load_config"]
