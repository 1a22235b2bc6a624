"""`metrion-reprice`: recompute the cost columns of stored rows after a price change or a new override.

Each row keeps the raw usage object (`usage_json`), its `model`, `ts` and `path`: the price is recomputed from
those with the same code the proxy uses (`usage_from_raw` + `Pricer`), at the row's own timestamp, and all
updates are written in one transaction. Rows without usage (errors before any usage, count_tokens) have
nothing to reprice and are left as they are.

Over PostgreSQL (fleet mode) the rows are read through a server-side cursor and updated in batches of
REPRICE_BATCH rows (one `UPDATE ... FROM unnest(...)` each), all in one transaction: a failure or a dry run
changes nothing, and the proxies keep inserting meanwhile. Money is written as `numeric`, exactly as the
store writes it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from metrion_addon.config import ConfigError, PriceOverride, load_config
from metrion_addon.pricing import Pricer
from metrion_addon.report.when import parse_when
from metrion_addon.schema import COST_COLUMNS, iso_ms, names
from metrion_addon.store import connect
from metrion_addon.usage import usage_from_raw

_READ_COLUMNS = (*names("id", "ts", "model", "response_model", "path", "usage_json"), *COST_COLUMNS)
_UPDATE_SQL = "UPDATE requests SET {} WHERE id = ?".format(", ".join(f"[{c}] = ?" for c in COST_COLUMNS))
REPRICE_BATCH = 5000  # PostgreSQL: rows read per fetch and updated per statement
_PG_UPDATE_SQL = (
    "UPDATE requests r SET {sets} FROM unnest(%s::bigint[], {arrays}) AS v(id, {cols}) WHERE r.id = v.id".format(
        sets=", ".join(f'"{c}" = v."{c}"' for c in COST_COLUMNS),
        arrays=", ".join("%s::numeric[]" if c.startswith("cost_") else "%s::text[]" for c in COST_COLUMNS),
        cols=", ".join(f'"{c}"' for c in COST_COLUMNS),
    )
)


def load_overrides(config_path: str | None) -> tuple[tuple[PriceOverride, ...], Path | str | None]:
    """(price overrides, database: a path or a PostgreSQL URL) from a config file; nothing without one. Secrets
    are not needed (a password in the URL comes from ${VAR}: set it, or use PGPASSWORD / ~/.pgpass)."""
    if not config_path:
        return (), None
    config = load_config(config_path, resolve_secrets=False)
    return config.price_overrides, config.database_url or config.database


def bound(value: str, *, end: bool, utc: bool, now: datetime | None = None) -> str:
    """A --since/--until value in the `ts` column's format, read exactly as metrion-report reads it: local time
    (UTC with --utc), a date covers its whole day (--until 2026-11-30 includes the 30th), spans like 7d."""
    moment = parse_when(value, end=end, now=now or datetime.now(UTC), utc=utc)
    return iso_ms(moment)


@dataclass
class ModelDiff:
    rows: int = 0
    changed: int = 0
    old_usd: float = 0.0
    new_usd: float = 0.0
    old_unknown: int = 0
    new_unknown: int = 0


def reprice_rows(
    rows: Iterable[sqlite3.Row | dict[str, Any]], pricer: Pricer
) -> tuple[list[tuple[Any, ...]], dict[str | None, ModelDiff]]:
    """(UPDATE parameters for the rows whose cost changed, per-model old/new summary)."""
    updates: list[tuple[Any, ...]] = []
    diffs: dict[str | None, ModelDiff] = {}
    for row in rows:
        usage = usage_from_raw(json.loads(row["usage_json"]))
        ts = datetime.fromisoformat(row["ts"])
        billed_model = row["response_model"] or row["model"]  # as record.finish priced it
        new = pricer.price(billed_model, usage, ts, row["path"] or "/v1/messages").columns()
        old = {c: row[c] for c in COST_COLUMNS}
        d = diffs.setdefault(row["model"], ModelDiff())
        d.rows += 1
        for cost, attr in ((old["cost_usd"], "old"), (new["cost_usd"], "new")):
            if cost is None:
                setattr(d, f"{attr}_unknown", getattr(d, f"{attr}_unknown") + 1)
            else:
                setattr(d, f"{attr}_usd", getattr(d, f"{attr}_usd") + cost)
        if not _same(old, new):
            d.changed += 1
            updates.append((*(new[c] for c in COST_COLUMNS), row["id"]))
    return updates, diffs


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    for c in COST_COLUMNS:
        a, b = old[c], new[c]
        if isinstance(a, float) and isinstance(b, float):
            if abs(a - b) > 1e-12:
                return False
        elif a != b:
            return False
    return True


def reprice(
    db: Path, pricer: Pricer, since: str | None = None, until: str | None = None, dry_run: bool = False
) -> dict[str | None, ModelDiff]:
    """Reprice the rows with usage in [since, until) in one transaction (rolled back when dry_run)."""
    where, params = ["usage_json IS NOT NULL"], []
    if since:
        where.append("ts >= ?")
        params.append(since)
    if until:
        where.append("ts < ?")
        params.append(until)
    cols = ", ".join(f"[{c}]" for c in _READ_COLUMNS)
    conn = connect(db)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("BEGIN IMMEDIATE")  # read and write under one lock: the writer thread waits, nothing is lost
        try:
            rows = conn.execute(f"SELECT {cols} FROM requests WHERE {' AND '.join(where)} ORDER BY id", params)
            updates, diffs = reprice_rows(rows, pricer)
            if not dry_run:
                conn.executemany(_UPDATE_SQL, updates)
            conn.execute("ROLLBACK" if dry_run else "COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return diffs


def merge(into: dict[str | None, ModelDiff], more: dict[str | None, ModelDiff]) -> None:
    for model, d in more.items():
        t = into.setdefault(model, ModelDiff())
        for f in ("rows", "changed", "old_usd", "new_usd", "old_unknown", "new_unknown"):
            setattr(t, f, getattr(t, f) + getattr(d, f))


def _pg_row(row: dict[str, Any]) -> dict[str, Any]:
    """A PostgreSQL row as reprice_rows reads SQLite's: `ts` in the stored text format, money as float."""
    out = dict(row)
    out["ts"] = iso_ms(row["ts"])
    for c in COST_COLUMNS:
        if isinstance(row[c], Decimal):
            out[c] = float(row[c])
    return out


def _money(v: Any) -> Decimal | None:
    return None if v is None else Decimal(repr(v))  # as pgstore writes it: the float's shortest decimal


def reprice_pg(
    url: str, pricer: Pricer, since: str | None = None, until: str | None = None, dry_run: bool = False
) -> dict[str | None, ModelDiff]:
    """`reprice` over PostgreSQL: batched UPDATEs in one transaction (rolled back when dry_run)."""
    import psycopg
    from psycopg.rows import dict_row

    where, params = ["usage_json IS NOT NULL"], []
    for cond, value in (("ts >= %s", since), ("ts < %s", until)):
        if value:
            where.append(cond)
            params.append(value)
    cols = ", ".join(f'"{c}"' for c in _READ_COLUMNS)
    diffs: dict[str | None, ModelDiff] = {}
    with psycopg.connect(url) as conn, conn.transaction(force_rollback=dry_run):
        conn.execute("SELECT pg_advisory_xact_lock(7260418)")  # one reprice at a time
        with conn.cursor(name="metrion_reprice", row_factory=dict_row) as cur, conn.cursor() as upd:
            cur.itersize = REPRICE_BATCH
            cur.execute(f"SELECT {cols} FROM requests WHERE {' AND '.join(where)} ORDER BY id", params)
            while rows := cur.fetchmany(REPRICE_BATCH):
                updates, more = reprice_rows((_pg_row(r) for r in rows), pricer)
                merge(diffs, more)
                if updates and not dry_run:
                    by_column = list(zip(*updates, strict=True))  # COST_COLUMNS..., id
                    arrays = [[_money(v) for v in col] if c.startswith("cost_") else list(col)
                              for c, col in zip(COST_COLUMNS, by_column, strict=False)]  # fmt: skip
                    upd.execute(_PG_UPDATE_SQL, [list(by_column[-1]), *arrays])
    return diffs


def render(diffs: dict[str | None, ModelDiff], dry_run: bool) -> None:
    from rich.console import Console

    from metrion_addon.report.terminal import LiteralTable  # models come from requests: shown literally

    table = LiteralTable(title="metrion-reprice" + (" (dry run: nothing written)" if dry_run else ""))
    for name in ("model", "rows", "changed", "old USD", "new USD", "difference USD"):
        table.add_column(name, justify="left" if name == "model" else "right")

    def usd(value: float, unknown: int) -> str:
        return f"{value:.6f}" + (f" (+{unknown} unknown)" if unknown else "")

    total = ModelDiff()
    for model, d in sorted(diffs.items(), key=lambda kv: kv[0] or ""):
        table.add_row(
            model or "<none>",
            str(d.rows),
            str(d.changed),
            usd(d.old_usd, d.old_unknown),
            usd(d.new_usd, d.new_unknown),
            f"{d.new_usd - d.old_usd:+.6f}",
        )
        for f in ("rows", "changed", "old_usd", "new_usd", "old_unknown", "new_unknown"):
            setattr(total, f, getattr(total, f) + getattr(d, f))
    table.add_section()
    table.add_row(
        "total",
        str(total.rows),
        str(total.changed),
        usd(total.old_usd, total.old_unknown),
        usd(total.new_usd, total.new_unknown),
        f"{total.new_usd - total.old_usd:+.6f}",
    )
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="metrion-reprice",
        description="Recompute cost columns and price_source of stored rows (after a price change or new override).",
    )
    ap.add_argument("--db", help="the metrion SQLite file or PostgreSQL URL (default: the config's database)")
    ap.add_argument("-c", "--config", help="the metrion YAML config whose pricing.overrides to apply")
    ap.add_argument("--since", help="from (inclusive), as in metrion-report: 2026-11-01, 2026-11-01T09:00, 7d...")
    ap.add_argument("--until", help="to (exclusive; a date or named period includes its whole span), as in the report")
    ap.add_argument("--utc", action="store_true", help="read --since/--until in UTC instead of local time")
    ap.add_argument("--dry-run", action="store_true", help="show per-model old vs new cost; write nothing")
    args = ap.parse_args(argv)
    try:
        overrides, config_db = load_overrides(args.config)
        since = bound(args.since, end=False, utc=args.utc) if args.since else None
        until = bound(args.until, end=True, utc=args.utc) if args.until else None
    except (ConfigError, ValueError) as e:
        print(f"metrion-reprice: {e}", file=sys.stderr)
        return 2
    db: Path | str | None = args.db or config_db
    if db is None:
        ap.error("give --db (or --config, to use its database)")
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        return _main_pg(db, overrides, since, until, args.dry_run)
    db = Path(db).expanduser()
    if not db.exists():
        print(f"metrion-reprice: {db}: no such database", file=sys.stderr)
        return 2
    try:
        diffs = reprice(db, Pricer(overrides), since, until, args.dry_run)
    except sqlite3.Error as e:
        print(f"metrion-reprice: {db}: {e}", file=sys.stderr)
        return 1
    render(diffs, args.dry_run)
    return 0


def _main_pg(
    url: str, overrides: tuple[PriceOverride, ...], since: str | None, until: str | None, dry_run: bool
) -> int:
    import psycopg

    from metrion_addon.pgstore import redacted

    try:
        diffs = reprice_pg(url, Pricer(overrides), since, until, dry_run)
    except psycopg.Error as e:  # one line, never the password
        msg = (str(e).strip().splitlines() or [e.__class__.__name__])[0].replace(url, redacted(url))
        print(f"metrion-reprice: {redacted(url)}: {msg}", file=sys.stderr)
        return 1
    render(diffs, dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
