"""The exchange log: every exchange of the CLI (and of the library when enabled) in SQLite.

The database lives in the user's data directory (``platformdirs``), or under
``$TOKENRELAY_HOME``. Each row keeps the prompt, the answer (partial on stop or
error), model, usage, timings, finish_reason and error.

The gateway writes its own ``requests.db`` beside it (``server/reqlog.py``: a writer
thread tuned for the relay's hot path). :class:`LogReader` reads both, the gateway's
read-only, as one list: ``tokenrelay logs`` shows CLI, library and gateway exchanges
together. Gateway rows are ``LogEntry``s with ``source="gateway"`` and a ``g`` before
their id (``g12``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .request import Request

__all__ = ["ExchangeLog", "LogEntry", "LogReader", "default_log_path", "gateway_log_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    source TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    usage_estimated INTEGER,
    time_to_first_token REAL,
    tokens_per_second REAL,
    total_seconds REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS exchanges_created ON exchanges(created_at);
"""


def default_log_path(settings: Settings | None = None) -> Path:
    settings = settings or Settings.load()
    if settings.data_dir is not None:
        base = settings.data_dir
    else:
        import platformdirs

        base = Path(platformdirs.user_data_dir("tokenrelay", appauthor=False))
    return base / "logs.db"


def gateway_log_path(settings: Settings | None = None) -> Path:
    """Where ``tokenrelay serve`` writes its request log unless its config says otherwise."""
    return default_log_path(settings).with_name("requests.db")


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: int
    created_at: float
    source: str
    provider: str
    model: str
    messages: list[dict[str, str]]
    prompt: str
    answer: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_estimated: bool
    time_to_first_token: float | None
    tokens_per_second: float | None
    total_seconds: float | None
    error: str | None

    @property
    def ref(self) -> str:
        """The id as ``logs show`` takes it: ``12``, or ``g12`` for a gateway request."""
        return f"g{self.id}" if self.source == "gateway" else str(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__} | {"ref": self.ref}

    def conversation(self) -> list[dict[str, str]]:
        """The messages and the answer: what ``--continue`` goes on from."""
        turns = [m for m in self.messages if m.get("content") is not None]
        if self.answer:
            turns.append({"role": "assistant", "content": self.answer})
        return turns


class ExchangeLog:
    """A SQLite log of exchanges; safe to share between threads."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_log_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, request: Request, result: Any, *, source: str = "library") -> int:
        """Store one exchange; returns its id. ``result`` is a :class:`tokenrelay.Result`."""
        error = None
        if result.error is not None:
            error = f"{result.error.code}: {result.error.message}"
        row = (
            time.time(), source, result.provider, result.model or (request.model or ""),
            json.dumps([m.model_dump(exclude_none=True) for m in request.messages]),
            request.last_user_text(), result.text, result.finish_reason,
            result.usage.prompt_tokens, result.usage.completion_tokens,
            int(result.usage.estimated), result.metrics.time_to_first_token,
            result.metrics.tokens_per_second, result.metrics.total_seconds, error,
        )
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO exchanges (created_at, source, provider, model, messages, prompt,"
                " answer, finish_reason, prompt_tokens, completion_tokens, usage_estimated,"
                " time_to_first_token, tokens_per_second, total_seconds, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            self._db.commit()
            return int(cur.lastrowid or 0)

    def _entries(self, sql: str, args: tuple[Any, ...]) -> list[LogEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created_at, source, provider, model, messages, prompt, answer,"
                " finish_reason, prompt_tokens, completion_tokens, usage_estimated,"
                " time_to_first_token, tokens_per_second, total_seconds, error"
                f" FROM exchanges {sql}",
                args,
            ).fetchall()
        return [
            LogEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9],
                     r[10], bool(r[11]), r[12], r[13], r[14], r[15])
            for r in rows
        ]

    def list(self, limit: int = 20, *, query: str | None = None) -> list[LogEntry]:
        """The latest ``limit`` exchanges, newest first; ``query``: only those whose
        messages, answer or model contain it (case-insensitive)."""
        if query:
            like = _like(query)
            return self._entries(
                "WHERE prompt LIKE ? ESCAPE '\\' OR messages LIKE ? ESCAPE '\\'"
                " OR answer LIKE ? ESCAPE '\\' OR model LIKE ? ESCAPE '\\'"
                " ORDER BY id DESC LIMIT ?",
                (like, like, like, like, limit))
        return self._entries("ORDER BY id DESC LIMIT ?", (limit,))

    def get(self, entry_id: int) -> LogEntry | None:
        found = self._entries("WHERE id = ?", (entry_id,))
        return found[0] if found else None


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


#: The gateway logs a status, not the finish reason: "ok" stays "ok".
_GATEWAY_FINISH = {"ok": "ok", "error": "error", "cancelled": "cancelled"}


def _gateway_entry(row: sqlite3.Row) -> LogEntry:
    names = row.keys()

    def get(name: str) -> Any:
        return row[name] if name in names else None

    prompt_field = get("prompt")
    messages: list[dict[str, str]] = []
    prompt = ""
    if isinstance(prompt_field, str):
        try:
            decoded = json.loads(prompt_field)
        except ValueError:
            decoded = prompt_field
        if isinstance(decoded, list):
            messages = [{"role": str(m.get("role", "")), "content": _text_of(m.get("content"))}
                        for m in decoded if isinstance(m, dict)]
            users = [m["content"] for m in messages if m["role"] == "user"]
            prompt = users[-1] if users else (messages[-1]["content"] if messages else "")
        else:
            prompt = _text_of(decoded)
            messages = [{"role": "user", "content": prompt}]
    status = str(get("status") or "")
    endpoint = str(get("endpoint") or "")
    return LogEntry(
        id=int(get("id") or 0), created_at=float(get("created_at") or 0.0),
        source="gateway", provider=endpoint, model=str(get("model") or ""),
        messages=messages, prompt=prompt, answer=str(get("answer") or ""),
        finish_reason=_GATEWAY_FINISH.get(status, status or "-"),
        prompt_tokens=get("prompt_tokens"), completion_tokens=get("completion_tokens"),
        usage_estimated=bool(get("usage_estimated")),
        time_to_first_token=get("time_to_first_token"), tokens_per_second=None,
        total_seconds=get("duration"), error=get("error"),
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


class LogReader:
    """The CLI and library log and the gateway's request log, read as one.

    The gateway's database is opened read-only (``mode=ro``), when it exists: reading
    never creates it, nor takes a write lock from a running gateway.
    """

    def __init__(self, exchanges: str | Path | None = None,
                 gateway: str | Path | None = None) -> None:
        self.exchanges = ExchangeLog(exchanges)
        self.gateway_path = Path(gateway) if gateway is not None else \
            self.exchanges.path.with_name("requests.db")
        #: Why the gateway's log could not be read (shown as a warning), if it could not.
        self.gateway_error: str | None = None

    def close(self) -> None:
        self.exchanges.close()

    def _gateway(self, sql: str, args: tuple[Any, ...]) -> list[LogEntry]:
        if not self.gateway_path.is_file():
            return []
        try:
            db = sqlite3.connect(f"{self.gateway_path.resolve().as_uri()}?mode=ro", uri=True,
                                 timeout=2)
        except sqlite3.Error as exc:
            self.gateway_error = f"{self.gateway_path}: {exc}"
            return []
        try:
            db.row_factory = sqlite3.Row
            return [_gateway_entry(r) for r in db.execute(f"SELECT * FROM requests {sql}", args)]
        except sqlite3.Error as exc:
            self.gateway_error = f"{self.gateway_path}: {exc}"
            return []
        finally:
            db.close()

    def list(self, limit: int = 20, *, query: str | None = None,
             sources: tuple[str, ...] = (), refused: bool = False) -> list[LogEntry]:
        """The latest ``limit`` entries of both logs, newest first (``sources``: only
        these of cli, library, gateway; ``refused``: also the gateway's refusals, 401s
        and 429s that never reached a model)."""
        entries: list[LogEntry] = []
        if not sources or set(sources) - {"gateway"}:
            local = self.exchanges.list(limit if not sources else limit * 4, query=query)
            entries += [e for e in local if not sources or e.source in sources]
        if not sources or "gateway" in sources:
            where = "" if refused else "status != 'refused'"
            args: tuple[Any, ...] = ()
            if query:
                like = _like(query)
                where += (" AND " if where else "") + (
                    "(prompt LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\'"
                    " OR model LIKE ? ESCAPE '\\')")
                args = (like, like, like)
            entries += self._gateway(
                (f"WHERE {where} " if where else "") + "ORDER BY id DESC LIMIT ?",
                (*args, limit))
        entries.sort(key=lambda e: e.created_at, reverse=True)
        return entries[:limit]

    def get(self, ref: str) -> LogEntry | None:
        """The entry ``12`` (CLI / library) or ``g12`` (gateway)."""
        ref = ref.strip().lower()
        if ref.startswith("g") and ref[1:].isdigit():
            found = self._gateway("WHERE id = ?", (int(ref[1:]),))
            return found[0] if found else None
        if ref.isdigit():
            return self.exchanges.get(int(ref))
        return None

    def latest_conversation(self) -> LogEntry | None:
        """The newest CLI or library exchange: what ``--continue`` goes on from."""
        found = self.exchanges.list(1)
        return found[0] if found else None
