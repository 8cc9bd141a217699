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
allowed_hosts = ["gateway.internal"]  # Host names served besides loopback ones
drain_timeout_s = 10.0    # on SIGTERM, answers in progress get this long to finish

[log]
path = "/var/lib/tokenrelay/requests.db"   # default: the user data dir
redact = false                              # true: prompts and answers are not stored

[redis]                   # shared state of several processes (needs: pip install "tokenrelay[redis]")
url = "redis://127.0.0.1:6379/0"   # or --redis URL; per-key limits and the stream log go there
on_redis_error = "closed" # Redis unreachable: "closed" 503 for keys with limits | "open" admit
timeout_s = 1.0           # one Redis call longer than this counts as Redis failing

[streams]                 # the stream log between producing and delivering (README)
store = "memory"          # "memory" (default: this process) | "redis" (shared, survives it)
redis_url = "redis://127.0.0.1:6379/0"   # needs the redis extra: pip install "tokenrelay[redis]"
retention_s = 600         # a finished stream can be resumed/retrieved this long
max_bytes = 268435456     # memory store: finished streams dropped oldest first above this
max_stream_bytes = 67108864   # one stream's frames; beyond it the stream fails
max_resume_grace_s = 300  # cap on a request's x-tokenrelay-resume-grace

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

__all__ = ["KeyConfig", "LogConfig", "ModelRoute", "RedisConfig", "ServerConfig", "StreamsConfig",
           "hash_key", "load_config"]


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
    #: How the upstream continues a partial answer, if it can (``"vllm"``:
    #: ``continue_final_message``; ``"llama.cpp"``: its server's assistant prefill). With
    #: it, another process finishes a stream whose producing process died (take-over).
    continue_prefix: Literal["vllm", "llama.cpp"] | None = None

    @model_validator(mode="after")
    def _continue_needs_chat(self) -> ModelRoute:
        if self.continue_prefix is not None and self.api != "chat_completions":
            raise ValueError("continue_prefix needs api = \"chat_completions\" (the"
                             " Responses API has no assistant prefill)")
        return self

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


def check_redis_url(value: str) -> str:
    """``value`` if it is a Redis URL redis-py can use, else a ``ValueError`` saying what
    is wrong (never echoing the URL: it may carry a password)."""
    parts = urlsplit(value)
    example = " (e.g. redis://127.0.0.1:6379/0)"
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a Redis URL must start with redis://, rediss:// or unix://" + example)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs the socket's path: unix:///run/redis.sock")
        return value
    if not parts.hostname:
        raise ValueError("the Redis URL has no host" + example)
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in 0-65535)
    except ValueError as exc:
        raise ValueError("the Redis URL's port is not a number in 1-65535" + example) from exc
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError("the Redis URL's database must be a number, as in"
                         " redis://127.0.0.1:6379/0")
    return value


class RedisConfig(BaseModel):
    """``[redis]``: where the processes of one gateway (workers, replicas) share their state:
    per-key limits and, unless ``[streams]`` says otherwise, the stream log."""

    model_config = ConfigDict(extra="forbid")

    #: ``redis://[[user]:password@]host:port/db``, ``rediss://…`` or ``unix:///path``.
    url: str | None = Field(None, repr=False)
    #: Prepended to every Redis key (several gateways on one Redis keep apart by it).
    prefix: str = Field("tokenrelay:", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    #: Redis unreachable, failing or slower than ``timeout_s``: ``"closed"`` answers new
    #: requests of keys with limits 503 (Retry-After); ``"open"`` admits them without the
    #: shared limits (counted in ``tokenrelay_limits_bypassed_total``, a warning a minute).
    on_redis_error: Literal["closed", "open"] = "closed"
    #: One Redis call (an admission, a release) taking longer than this is a failure.
    timeout_s: float = Field(1.0, gt=0, le=30)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value.strip())


class StreamsConfig(BaseModel):
    """``[streams]``: where streams are kept so that they outlive their connection."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["memory", "redis"] = "memory"
    #: ``redis://[[user]:password@]host:port/db``, ``rediss://…`` or ``unix:///path``.
    redis_url: str | None = Field(None, repr=False)
    #: Prepended to every Redis key and channel (several gateways on one Redis).
    redis_prefix: str = Field("tokenrelay:", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    #: A finished stream stays readable (resume, retrieve) this many seconds.
    retention_s: float = Field(600.0, gt=0, le=7 * 86400)
    #: Memory store: above this total, finished streams are dropped oldest first; when
    #: live streams alone fill it, new streams are refused (503).
    max_bytes: int = Field(256 << 20, ge=1 << 20)
    #: One stream's frames; an append beyond it fails that stream (``stream_too_large``).
    max_stream_bytes: int = Field(64 << 20, ge=64 << 10)
    #: Upper bound on the resume grace a request may ask for.
    max_resume_grace_s: float = Field(300.0, ge=0, le=86400)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _url_for_redis(self) -> StreamsConfig:
        if self.store == "redis" and not self.redis_url:
            raise ValueError('store = "redis" needs redis_url')
        return self


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
    #: Host header names served besides the loopback ones (``localhost``, 127.0.0.0/8,
    #: ``[::1]``); ``"*.example.com"`` matches its sub-domains, ``"*"`` any name.
    #: Without keys only these are served (a web page cannot reach the gateway through
    #: DNS rebinding); with keys, when set, too.
    allowed_hosts: list[str] = Field(default_factory=list)
    #: On SIGTERM, answers in progress get this many seconds to finish; then each gets
    #: one error (``"code": "server_shutdown"``) and its end, and the server exits.
    drain_timeout_s: float = Field(10.0, ge=0, le=3600)
    models: list[ModelRoute] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    log: LogConfig = Field(default_factory=LogConfig)
    #: Shared state in Redis (before ``streams``: a bad URL is reported as ``redis.url``).
    redis: RedisConfig = Field(default_factory=RedisConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    #: Processes serving the port (``tokenrelay serve --workers N``).
    workers: int = Field(1, ge=1, le=256)
    #: Serve the embedded local model and the scripted mock besides the routes.
    serve_local: bool = True
    #: None: serve the mock only when listening on loopback.
    serve_mock: bool | None = None
    #: One line per request on the console (``tokenrelay serve``; ``--quiet``: off).
    access_log: bool = True

    @model_validator(mode="before")
    @classmethod
    def _streams_in_redis(cls, data: Any) -> Any:
        """With ``[redis] url`` the stream log lives there too (same URL), unless
        ``[streams]`` names its own store."""
        if not isinstance(data, dict):
            return data
        redis = data.get("redis")
        url = redis.get("url") if isinstance(redis, dict) else getattr(redis, "url", None)
        streams = data.get("streams", {})
        if isinstance(url, str) and url.strip() and isinstance(streams, dict):
            streams = dict(streams)
            streams.setdefault("store", "redis")
            if streams["store"] == "redis":
                streams.setdefault("redis_url", url.strip())
            data = {**data, "streams": streams}
        return data

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

    def check_shared_limits(self, workers: int | None = None) -> None:
        """Refuse several processes with per-key limits but no shared state: each would
        count alone, and every limit would be multiplied by the number of processes."""
        workers = self.workers if workers is None else workers
        if workers <= 1 or self.redis.url:
            return
        for key in self.keys:
            limits = [name for name in ("max_concurrent", "requests_per_minute",
                                        "tokens_per_minute") if getattr(key, name) is not None]
            if limits:
                raise ConfigurationError(
                    f"refusing to start {workers} workers with per-key limits (key"
                    f" {key.id!r}: {', '.join(limits)}) and no shared state: each worker"
                    f" would count on its own, so every limit would be {workers} times what"
                    " is configured. Share them in Redis: --redis redis://HOST:6379/0 (or"
                    " [redis] url in the config), or run one worker")

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
    redis_url = overrides.pop("redis_url", None)
    extra_models = overrides.pop("models", None) or []
    extra_keys = overrides.pop("keys", None) or []
    data.update({k: v for k, v in overrides.items() if v is not None})
    if redis_url is not None:  # --redis URL: the other [redis] settings stay
        section = data.get("redis")
        data["redis"] = {**(section if isinstance(section, dict) else {}), "url": redis_url}
    data["models"] = list(data.get("models", [])) + extra_models
    data["keys"] = list(data.get("keys", [])) + extra_keys
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigurationError(f"invalid config {where}: {err['msg']}") from exc
