"""Budget alerts sent once by the fleet, not once per proxy: the first proxy to claim an alert sends it.

Each proxy decides by itself when a budget crosses a threshold (budget.py), so with N proxies on one PostgreSQL
an alert would come up to N times, and again from a proxy restarted in the same period. Before sending, the alert
thread claims the alert in `budget_alerts` (one row per budget, period and event) with `INSERT ... ON CONFLICT DO
NOTHING RETURNING`: only the proxy whose insert made the row sends it, to every hook. When PostgreSQL cannot be
reached the alert is sent anyway and that is logged: a duplicate is better than silence.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg

from metrion_addon.pgstore import pg_migrate, redacted

log = logging.getLogger(__name__)


def create_table(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS budget_alerts (budget text NOT NULL, period text NOT NULL, "
        "period_start timestamptz NOT NULL, event text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (budget, period, period_start, event))"
    )


def budget_key(body: dict[str, Any]) -> str:
    """The budget an alert is about: its name, account and user (a name alone may repeat across accounts)."""
    return json.dumps([body.get("budget"), body.get("account"), body.get("user")])


class AlertClaims:
    """Called on the alert thread only: `claim(body)` is True when this proxy should send the alert."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def claim(self, body: dict[str, Any]) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, connect_timeout=3, autocommit=True)
                pg_migrate(self._conn)
            row = self._conn.execute(
                "INSERT INTO budget_alerts (budget, period, period_start, event) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (budget_key(body), body["period"], body["period_start"], body["event"]),
            ).fetchone()
        except (psycopg.Error, OSError) as e:
            self.close()
            log.warning(
                "metrion: cannot ask PostgreSQL %s whether another proxy sent the %s alert for %s (%s): sending it",
                redacted(self.url),
                body.get("event"),
                body.get("budget"),
                str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__,
            )
            return True
        if row is None:
            log.info("metrion: budget alert %s for %s was sent by another proxy", body.get("event"), body.get("budget"))
        return row is not None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
