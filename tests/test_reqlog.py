"""The gateway's request log: one writer thread, batched commits, flush and close."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")

from tokenrelay.server.reqlog import RequestLog


def _row(i: int, **extra: Any) -> dict[str, Any]:
    return {"key_id": f"k{i}", "endpoint": "/v1/chat/completions", "model": "mock",
            "status": "ok", "http_status": 200, "prompt_tokens": 3, "completion_tokens": i,
            "usage_estimated": 0, "time_to_first_token": 0.01, "duration": 0.1,
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "answer": f"answer {i}", "error": None} | extra


def test_rows_queued_together_are_written_and_readable_after_flush(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db")
    try:
        for i in range(50):
            log.record(**_row(i))
        assert log.flush(5)
        rows = log.rows(100)
        assert [r["key_id"] for r in rows] == [f"k{i}" for i in reversed(range(50))]
        assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "question 49"}]
        assert rows[0]["answer"] == "answer 49" and rows[0]["created_at"] > 0
        # Types survive the batch's JSON: integers, reals, text and NULL.
        assert isinstance(rows[0]["created_at"], float)
        assert rows[0]["http_status"] == 200 and isinstance(rows[0]["http_status"], int)
        assert rows[0]["time_to_first_token"] == 0.01 and rows[0]["error"] is None
    finally:
        log.close()


def test_a_row_is_committed_within_the_batch_window_without_a_flush(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db")
    try:
        log.record(**_row(1))
        deadline = time.monotonic() + 5
        while not log.rows() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(log.rows()) == 1
        # Visible to another connection too: committed, not only buffered.
        other = sqlite3.connect(tmp_path / "r.db")
        assert other.execute("SELECT count(*) FROM requests").fetchone() == (1,)
        other.close()
    finally:
        log.close()


def test_redaction_stores_neither_prompt_nor_answer(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db", redact=True)
    try:
        log.record(**_row(1))
        log.flush(5)
        (row,) = log.rows()
        assert row["prompt"] is None and row["answer"] is None
        assert row["completion_tokens"] == 1 and row["status"] == "ok"
    finally:
        log.close()


def test_close_writes_what_is_queued_and_stops_the_writer(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db")
    for i in range(20):
        log.record(**_row(i))
    log.close()
    assert not any(t.name == "tokenrelay-reqlog" and t.is_alive()
                   for t in threading.enumerate() if t is log._writer)
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*) FROM requests").fetchone() == (20,)
    db.close()
    log.close()  # twice is harmless
    assert log.flush(0.1)


def test_a_failing_write_is_logged_and_later_rows_still_land(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = RequestLog(tmp_path / "r.db")
    try:
        log.record(**_row(1, status=object()))  # not bindable: this row fails
        assert log.flush(5)
        assert any("not written" in r.getMessage() for r in caplog.records)
        log.record(**_row(2))
        assert log.flush(5)
        assert [r["key_id"] for r in log.rows()] == ["k2"]
    finally:
        log.close()


def test_one_bad_row_in_a_batch_costs_only_itself(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db")
    try:
        log.record(**_row(1))
        log.record(**_row(2, status=object()))
        log.record(**_row(3))
        assert log.flush(5)
        assert [r["key_id"] for r in log.rows()] == ["k3", "k1"]
    finally:
        log.close()


def test_rows_recorded_on_a_loop_are_handed_over_in_one_batch(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "r.db")

    async def main() -> None:
        for i in range(5):
            log.record(**_row(i))
        # Held on the loop until the batch timer (or hand_over) gives them to the writer.
        assert log._pending and log._handover is not None
        assert log.flush(5) and log.rows() == []
        await asyncio.sleep(RequestLog.BATCH_SECONDS + 0.05)
        assert not log._pending and log._handover is None
        assert log.flush(5) and len(log.rows()) == 5
        log.record(**_row(5))
        log.hand_over()  # at once, as Gateway.drain_logs does
        assert log._handover is None
        assert log.flush(5) and len(log.rows()) == 6
        log.record(**_row(6))  # pending when the log closes: close writes it

    try:
        asyncio.run(main())
    finally:
        log.close()
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*) FROM requests").fetchone() == (7,)
    db.close()
