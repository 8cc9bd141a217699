"""``tokenrelay serve``: the SSE gateway; ``tokenrelay hash-key``: a key's stored form.

Raw API keys are hashed the moment they are read and never kept, printed or logged;
the configuration only ever holds their SHA-256. Upstream keys come from the config
file or the environment, never from requests.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import queue
import re
import sys
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from ..server.config import ServerConfig

__all__ = ["hash_key_command", "route_key_env", "serve", "server_config"]

_ROUTE = re.compile(r"^(?P<name>[^=\s]+)=(?P<url>https?://\S+)$")
_SHORT_KEY = 16


def route_key_env(name: str) -> str:
    """The environment variable holding the upstream key of a ``--route NAME=...``."""
    return "TOKENRELAY_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_API_KEY"


def _routes(specs: tuple[str, ...]) -> list[dict[str, Any]]:
    routes = []
    for spec in specs:
        match = _ROUTE.match(spec.strip())
        if match is None:
            raise UsageError(f"--route expects NAME=BASE_URL with an http(s) URL, got {spec!r}"
                             " (e.g. --route qwen=http://10.0.0.5:8000/v1)")
        name = match["name"]
        routes.append({"name": name, "base_url": match["url"],
                       "api_key_env": route_key_env(name)})
    return routes


def _hashed_keys(raw_keys: tuple[str, ...], taken: set[str]) -> list[dict[str, Any]]:
    from ..server.config import hash_key

    keys: list[dict[str, Any]] = []
    n = 0
    for raw in raw_keys:
        if not raw or raw != raw.strip():
            # Presented keys are stripped, so such a key could never match.
            raise UsageError("--api-key must not be empty or start/end with whitespace")
        n += 1
        while f"key{n}" in taken:
            n += 1
        key_id = f"key{n}"
        if len(raw) < _SHORT_KEY:
            click.echo(f"warning: API key {key_id} is short; use a long random key"
                       " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                       err=True)
        keys.append({"id": key_id, "sha256": hash_key(raw)})
    return keys


def server_config(config_file: str | None = None, *, host: str | None = None,
                  port: int | None = None, routes: tuple[str, ...] = (),
                  api_keys: tuple[str, ...] = (), heartbeat: float | None = None,
                  log_enabled: bool | None = None,
                  cors_origins: tuple[str, ...] = (), quiet: bool = False,
                  redis_url: str | None = None) -> ServerConfig:
    """The gateway configuration of ``tokenrelay serve``: the file, then the options.

    API keys are hashed here; the result holds only their SHA-256.
    """
    from ..server.config import load_config

    overrides: dict[str, Any] = {
        "host": host, "port": port, "heartbeat": heartbeat,
        "cors_origins": list(cors_origins) or None, "redis_url": redis_url,
    }
    extra_models = _routes(routes)
    config = load_config(config_file, **overrides, models=extra_models)
    if api_keys:
        keys = _hashed_keys(api_keys, {k.id for k in config.keys})
        config = load_config(config_file, **overrides, models=extra_models, keys=keys)
    if log_enabled is not None:
        config.log.enabled = log_enabled
    if quiet:
        config.access_log = False
    return config


def banner(config: ServerConfig, gateway: Any, base: str) -> list[str]:
    """What ``serve`` prints when it starts: where to point a browser and a client, what
    it serves, where requests are logged, who may use it."""
    from urllib.parse import urlsplit

    models = []
    for name, (provider, upstream) in gateway.models.items():
        route = gateway.route_of.get(name)
        if route is not None:
            models.append(f"{name} → {urlsplit(route.base_url).netloc}"
                          + (f" as {upstream}" if upstream != name else ""))
        else:
            kind = {"local": "embedded", "mock": "scripted"}.get(provider.name, provider.name)
            models.append(f"{name} ({kind})")
    lines = [
        f"tokenrelay: serving on {base}",
        f"  chat page:   {base}/",
        f"  OpenAI API:  {base}/v1  (described at /openapi.json)",
        "  models:      " + (", ".join(models) or "none"),
    ]
    if gateway.reqlog is not None:
        lines.append(f"  request log: {gateway.reqlog.path}"
                     + ("  (prompts and answers redacted)" if config.log.redact else ""))
    else:
        lines.append("  request log: off")
    lines.append("  access log:  " + ("this console, a line per request (--quiet: off)"
                                      if config.access_log else "off"))
    if gateway.redis is not None:
        shared = "limits and streams" if config.streams.store == "redis" else "limits"
        lines.append(f"  shared:      {shared} in {gateway.redis.where}"
                     f" (on_redis_error = {config.redis.on_redis_error})")
    if config.keys:
        lines.append(f"  API keys:    {len(config.keys)}; clients send"
                     " Authorization: Bearer <key>")
    else:
        lines.append("  API keys:    none: listening on loopback only, without authentication")
    return lines


#: Access lines waiting for a console that is not reading, before new ones are dropped.
_ACCESS_BACKLOG = 10_000


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: with the backlog full (the console not reading) a line is dropped."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def _console_access_log() -> logging.handlers.QueueListener:
    """The access lines (``tokenrelay.access``) to stderr, with a timestamp, written by a
    thread: a console that stops reading (a paused terminal, a full pipe) must not stall
    the event loop, and every stream on it, in a ``write()``. Stop the listener to flush."""
    from ..server.access import ACCESS_LOGGER

    lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=_ACCESS_BACKLOG)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    listener = logging.handlers.QueueListener(lines, console)
    listener.start()
    ACCESS_LOGGER.handlers[:] = [_DroppingQueueHandler(lines)]
    ACCESS_LOGGER.setLevel(logging.INFO)
    ACCESS_LOGGER.propagate = False
    return listener


@click.command()
@click.option("--host", default=None,
              help="Address to listen on.  [default: 127.0.0.1, or the config's]")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on (0: any free port).  [default: 8000]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config: models, keys, limits, log. Every setting, commented:"
                   " examples/gateway.toml in the source tree.")
@click.option("--route", "routes", multiple=True, metavar="NAME=BASE_URL",
              help="Serve model NAME from an OpenAI-compatible BASE_URL (repeatable); its key"
                   " is read from TOKENRELAY_<NAME>_API_KEY.")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              envvar="TOKENRELAY_API_KEYS",
              help="Require this API key (repeatable; env TOKENRELAY_API_KEYS, space-"
                   "separated, keeps keys out of `ps`). Stored hashed only.")
@click.option("--heartbeat", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of silence before an SSE ': ping' comment.  [default: 15]")
@click.option("--log/--no-log", "log_enabled", default=None,
              help="Record requests to SQLite.  [default: on]")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Allow browser pages from ORIGIN (repeatable; replaces the config's list).")
@click.option("--quiet", "-q", is_flag=True,
              help="No access line per request on the console (warnings still show).")
@click.option("--redis", "redis_url", metavar="URL",
              help="Share per-key limits and the stream log with the other processes"
                   " (workers, replicas) in this Redis: redis://HOST:6379/0, rediss://,"
                   " unix:// ([redis] url).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Processes serving the one port (a process relays on one core);"
                   " SIGTERM to this one drains them all (default: the config's"
                   " workers, 1).")
def serve(host: str | None, port: int | None, config_file: str | None,
          routes: tuple[str, ...], api_keys: tuple[str, ...], heartbeat: float | None,
          log_enabled: bool | None, cors_origins: tuple[str, ...], quiet: bool,
          redis_url: str | None, workers: int | None) -> None:
    """Run the OpenAI-compatible SSE gateway.

    \b
    tokenrelay serve                                   mock + embedded model on 127.0.0.1:8000
    tokenrelay serve --route qwen=http://gpu:8000/v1   add an upstream model
    tokenrelay serve --host 0.0.0.0 --config gw.toml   exposed: the config must have [[keys]]

    Without API keys it refuses to listen beyond loopback. Every config setting, with
    a comment: examples/gateway.toml (in the source tree and the README).
    """
    try:
        from ..server.app import create_app
        from ..server.run import bind, build_server, url
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from None

    config = server_config(config_file, host=host, port=port, routes=routes,
                           api_keys=api_keys, heartbeat=heartbeat, log_enabled=log_enabled,
                           cors_origins=cors_origins, quiet=quiet, redis_url=redis_url)
    config.check_exposure()
    workers = workers or config.workers
    config.check_shared_limits(workers)

    app = create_app(config)  # a bad route fails here, before binding
    if workers > 1:
        sys.exit(_serve_workers(config, app, workers))
    sock = bind(config)
    server = build_server(config, app)
    for line in banner(config, app.state.gateway, url(sock)):
        click.echo(line, err=True)
    if not _run(server, sock, config):
        sys.exit(1)


def _serve_workers(config: ServerConfig, app: Any, workers: int) -> int:
    """``--workers N``: this process supervises N that serve (``server/workers.py``)."""
    import asyncio

    from ..server.run import GRACEFUL_SHUTDOWN_MARGIN, url
    from ..server.workers import Supervisor, reserve

    reserved = reserve(config.host, config.port)
    lines = banner(config, app.state.gateway, url(reserved))
    asyncio.run(app.state.gateway.aclose())  # the workers build their own
    address = (reserved.family, reserved.getsockname())
    supervisor = Supervisor(_worker, (config, address), workers,
                            stop_timeout=config.drain_timeout_s + GRACEFUL_SHUTDOWN_MARGIN + 5)
    lines.insert(1, f"  workers:     {workers} processes on this port (SIGTERM here drains"
                    " them all)")
    for line in lines:
        click.echo(line, err=True)
    try:
        return supervisor.run()
    finally:
        reserved.close()


def _worker(config: ServerConfig, address: tuple[int, Any]) -> None:
    """One worker of ``--workers N`` (a fresh process: ``Supervisor`` pickles this by
    name), on its own listening socket on the reserved address."""
    from ..server.app import create_app
    from ..server.run import BACKLOG, build_server
    from ..server.workers import STARTUP_FAILURE, listener

    sock = listener(*address, BACKLOG)
    server = build_server(config, create_app(config))
    if not _run(server, sock, config):
        sys.exit(STARTUP_FAILURE)


def _run(server: Any, sock: Any, config: ServerConfig) -> bool:
    """Serve until shutdown; whether the server started (uvicorn logged why not)."""
    listener = _console_access_log() if config.access_log else None
    # Everything imported and built so far lives as long as the process: move it out of
    # the collector's reach, so a full collection under load walks only what requests
    # made (measured: a 34 ms gen-2 pause at 256 streams otherwise, 15 ms at idle).
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        if listener is not None:
            listener.stop()  # the last lines out
    return bool(server.started)  # False: the app's startup failed; uvicorn logged why


@click.command("hash-key")
@click.argument("key")
def hash_key_command(key: str) -> None:
    """Print the SHA-256 of KEY for a config's [[keys]] sha256 ("-": read it from stdin).

    \b
    tokenrelay hash-key - < key.txt
    """
    from ..server.config import hash_key

    if key == "-":
        key = sys.stdin.readline().rstrip("\r\n")
    if not key or key != key.strip():
        raise UsageError("the key must not be empty or start/end with whitespace")
    click.echo(hash_key(key))
