"""Gateway configuration: TOML file + command line, validated before the server starts.

```toml
host = "127.0.0.1"
port = 8000
heartbeat = 15.0          # seconds of silence before an SSE ": ping" comment
send_timeout = 30.0       # a client that stops reading is dropped after this
header_timeout = 10.0     # a connection must send its request headers within this
body_timeout = 30.0       # ... and its request body within this after the headers
keep_alive_timeout = 5.0  # an idle keep-alive connection is closed after this
max_body_bytes = 1048576  # 413 above this, before parsing
cors_origins = ["https://app.example.com"]
cors_credentials = false
metrics_public = false    # true: GET /metrics without a key (else any gateway key)

[log]
path = "/var/lib/tokenrelay/requests.db"   # default: the user data dir
redact = false                              # true: prompts and answers are not stored

[[models]]                # served model name → OpenAI-compatible upstream
name = "qwen"
base_url = "http://10.0.0.5:8000/v1"
upstream_model = "Qwen/Qwen2.5-7B-Instruct"   # default: name
api_key_env = "VLLM_KEY"                      # the key is read from this env var

[[models]]
name = "gpt"
base_url = "https://api.openai.com/v1"
upstream_model = "gpt-4.1-mini"
api = "responses"         # the upstream speaks /v1/responses (default: chat_completions)
api_key_env = "OPENAI_API_KEY"

[[keys]]                  # gateway API keys, stored hashed (tokenrelay hash-key KEY)
id = "alice"
sha256 = "…"
max_concurrent = 4
requests_per_minute = 60
tokens_per_minute = 20000
max_tokens = 1024
```

Upstream base URLs come only from here, never from a request (LiteLLM leaked provider
keys that way, CVE-2024-6587).
"""

from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigurationError

__all__ = ["KeyConfig", "LogConfig", "ModelRoute", "ServerConfig", "hash_key", "load_config"]


def hash_key(key: str) -> str:
    """The stored form of an API key (hex SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ModelRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    upstream_model: str | None = None
    api_key: str | None = Field(None, repr=False)
    api_key_env: str | None = None
    #: Upstream connections of this route; streams beyond it wait for a free one.
    max_connections: int = Field(1024, ge=1, le=65536)
    #: The upstream's wire format: ``/chat/completions`` or ``/responses``.
    api: Literal["chat_completions", "responses"] = "chat_completions"

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("base_url must start with http:// or https://")
        if parts.username or parts.password:
            # Upstream URLs appear in connection error messages and logs; keys must not.
            raise ValueError("credentials in base_url would show in error messages:"
                             " put the upstream key in api_key or api_key_env")
        return value


class KeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    max_concurrent: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)


class LogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    path: str | None = None
    redact: bool = False


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    heartbeat: float = Field(15.0, gt=0)
    send_timeout: float = Field(30.0, gt=0)
    #: A connection must send its complete request headers within this many seconds
    #: (slowloris); uvicorn itself has no such timeout.
    header_timeout: float = Field(10.0, gt=0)
    #: The request body must then arrive within this many seconds (408 otherwise): a
    #: client trickling its body would hold a connection and a key's slot forever.
    body_timeout: float = Field(30.0, gt=0)
    #: An idle keep-alive connection is closed after this many seconds.
    keep_alive_timeout: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_tokens_default: int | None = Field(None, ge=1)
    cors_origins: list[str] = Field(default_factory=list)
    cors_credentials: bool = False
    #: With keys configured, ``GET /metrics`` needs one (model names and traffic are not
    #: for anyone who can reach the port) unless this is set for a scraper without one.
    metrics_public: bool = False
    models: list[ModelRoute] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    log: LogConfig = Field(default_factory=LogConfig)
    #: Serve the embedded local model and the scripted mock besides the routes.
    serve_local: bool = True
    #: None: serve the mock only when listening on loopback.
    serve_mock: bool | None = None
    #: One line per request on the console (``tokenrelay serve``; ``--quiet``: off).
    access_log: bool = True

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if "*" in self.cors_origins and self.cors_credentials:
            raise ValueError(
                "cors_origins '*' together with cors_credentials would let any site use"
                " visitors' credentials; list the allowed origins instead"
            )
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError("model names must be unique")
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            # Limits and log rows are per key id: two keys sharing one would share both.
            raise ValueError("key ids must be unique")
        return self

    @property
    def loopback_only(self) -> bool:
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without API keys."""
        if not self.keys and not self.loopback_only:
            raise ConfigurationError(
                f"refusing to listen on {self.host} without API keys: anyone who can reach"
                " it could use the models. Add [[keys]] to the config (or --api-key), or"
                " bind 127.0.0.1"
            )


def load_config(path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """Read a TOML config (if given) and apply command-line overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigurationError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"bad TOML in {path}: {exc}") from exc
    extra_models = overrides.pop("models", None) or []
    extra_keys = overrides.pop("keys", None) or []
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["models"] = list(data.get("models", [])) + extra_models
    data["keys"] = list(data.get("keys", [])) + extra_keys
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigurationError(f"invalid config {where}: {err['msg']}") from exc
