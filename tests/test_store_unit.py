"""Schema migrations and the writer's batching, without mitmproxy."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from metrion_addon import store


def test_a_v1_database_is_migrated_in_place_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    v1 = store.MIGRATIONS[:1]
    original = store.MIGRATIONS[:]
    try:
        store.MIGRATIONS[:] = v1  # a database made by the first release
        store.migrate(db)
    finally:
        store.MIGRATIONS[:] = original
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO requests (ts, model) VALUES ('2026-01-01T00:00:00.000Z', 'claude-x')")
        assert "response_model" not in {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    conn.close()
    store.migrate(db)
    store.migrate(db)  # idempotent
    with sqlite3.connect(db) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        applied = [r[0] for r in conn.execute("SELECT name FROM _metrion_migrations ORDER BY rowid")]
        kept = conn.execute("SELECT model, response_model FROM requests").fetchall()
    conn.close()
    assert cols == list(store.COLUMNS)
    assert applied == [m.__name__ for m in store.MIGRATIONS]
    assert kept == [("claude-x", None)]


def test_a_deep_queue_is_written_in_full_when_the_database_is_writable(tmp_path: Path) -> None:
    """The backlog bound is for failing writes only: a burst larger than it must not drop rows."""
    s = store.Store(tmp_path / "m.db", max_backlog=50)
    for i in range(1000):
        s.put({"ts": f"2026-01-01T00:00:00.{i % 1000:03d}Z"})
    s.start()
    s.close()
    assert (s.written, s.dropped) == (1000, 0)


def test_rows_that_arrive_within_a_flush_interval_of_the_first_share_its_transaction(tmp_path: Path) -> None:
    """At light load the writer, woken by a row, waits one flush interval before it writes, so that the rows
    behind it (the accounting thread hands them over in bursts) share the commit; close() cuts the wait short."""
    import threading

    class Pause(threading.Event):  # the writer's pause, telling the test when the writer has entered it
        entered = threading.Event()

        def wait(self, timeout: float | None = None) -> bool:
            self.entered.set()
            return super().wait(timeout)

    batches: list[list[str]] = []
    s = store.Store(
        tmp_path / "m.db", flush_interval=3600.0, on_written=lambda b: batches.append([r["user"] for r in b])
    )
    s._closing = pause = Pause()
    s.start()
    s.put({"ts": "2026-12-02T00:00:00.000Z", "user": "first"})
    assert pause.entered.wait(30), "the writer takes the first row, then waits for more"
    s.put({"ts": "2026-12-02T00:00:00.001Z", "user": "second"})
    s.put({"ts": "2026-12-02T00:00:00.002Z", "user": "third"})
    assert batches == [] and s.pending() == 3
    s.close(timeout=30)
    assert batches == [["first", "second", "third"]] and s.written == 3 and s.pending() == 0
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert [r[0] for r in conn.execute("SELECT user FROM requests ORDER BY id")] == ["first", "second", "third"]
