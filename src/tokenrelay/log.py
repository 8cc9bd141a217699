"""The exchange log: every exchange of the CLI (and of the library when enabled) in SQLite.

The database lives in the user's data directory (``platformdirs``), or under
``$TOKENRELAY_HOME``. Each row keeps the prompt, the answer (partial on stop or
error), model, usage, timings, finish_reason and error.
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

__all__ = ["ExchangeLog", "LogEntry", "default_log_path"]

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

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


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

    def list(self, limit: int = 20) -> list[LogEntry]:
        """The latest ``limit`` exchanges, newest first."""
        return self._entries("ORDER BY id DESC LIMIT ?", (limit,))

    def get(self, entry_id: int) -> LogEntry | None:
        found = self._entries("WHERE id = ?", (entry_id,))
        return found[0] if found else None
