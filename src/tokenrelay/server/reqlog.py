"""The gateway's request log: every request to SQLite (by default), written off the loop.

Rows: key id, model, endpoint, status (ok / error / cancelled), HTTP status, usage, time
to first token, duration, the prompt and answer (``redact = true`` stores neither), error.
Keys and upstream secrets are never written.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RequestLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    http_status INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    usage_estimated INTEGER,
    time_to_first_token REAL,
    duration REAL,
    prompt TEXT,
    answer TEXT,
    error TEXT
);
"""

_COLUMNS = ("created_at", "key_id", "endpoint", "model", "status", "http_status",
            "prompt_tokens", "completion_tokens", "usage_estimated", "time_to_first_token",
            "duration", "prompt", "answer", "error")


class RequestLog:
    def __init__(self, path: str | Path, *, redact: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redact = redact
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA journal_mode=WAL")

    def _write(self, row: dict[str, Any]) -> None:
        values = tuple(row.get(c) for c in _COLUMNS)
        with self._lock:
            self._db.execute(
                f"INSERT INTO requests ({', '.join(_COLUMNS)})"
                f" VALUES ({', '.join('?' for _ in _COLUMNS)})", values)
            self._db.commit()

    async def record(self, **row: Any) -> None:
        row.setdefault("created_at", time.time())
        if self.redact:
            row["prompt"] = row["answer"] = None
        elif isinstance(row.get("prompt"), (list, dict)):
            row["prompt"] = json.dumps(row["prompt"])
        await asyncio.to_thread(self._write, row)

    def rows(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                f"SELECT id, {', '.join(_COLUMNS)} FROM requests ORDER BY id DESC LIMIT ?",
                (limit,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()
