"""The `metrion-reconcile` command: arguments, the provider and meter reads, and the table / JSON / CSV output.

Exit codes: 0 every row within the tolerance, 1 a difference beyond it, 2 usage or config error, 3/4 database
missing or too old (as metrion-report), 6 the Admin API could not be read. See docs/reconcile.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from metrion_addon.admin_api import AdminClient, AdminError
from metrion_addon.config import ConfigError, load_config
from metrion_addon.reconcile import (
    EXIT_ADMIN_API,
    EXIT_DRIFT,
    FIELDS,
    KeyMap,
    ReconcileError,
    Row,
    Tolerance,
    compare,
    match_keys,
    meter_usage,
    passthrough_usage,
)
from metrion_addon.report.db import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ReportError, open_db
from metrion_addon.report.fmt import fmt_int
from metrion_addon.report.terminal import print_unsqueezed, table
from metrion_addon.report.when import parse_when
from metrion_addon.schema import iso_ms

PROG = "metrion-reconcile"
APIS = ("auto", "analytics", "legacy")


def parse_tolerance(text: str) -> Decimal:
    t = text.strip()
    try:
        value = Decimal(t[:-1]) / 100 if t.endswith("%") else Decimal(t)
    except InvalidOperation:
        raise ReconcileError(f"--tolerance: cannot read {text!r} (e.g. 0.5% or 0.005)", EXIT_USAGE) from None
    if not value.is_finite() or not 0 <= value < 1:
        raise ReconcileError("--tolerance must be between 0% and 100%", EXIT_USAGE)
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Compare the meter with Anthropic's own usage and cost reports (Admin API), per UTC day, "
        "API key, model and service tier.",
        epilog="Exit codes: 0 all within tolerance, 1 a difference beyond it, 2 usage/config error, 3 no or "
        "unreadable database, 4 older schema, 6 the Admin API could not be read. See docs/reconcile.md.",
    )
    ap.add_argument("--since", default="7d", help="from this UTC day (default 7d: 2026-11-01, 7d, this-month...)")
    ap.add_argument("--until", help="to this UTC day, inclusive (default: today)")
    ap.add_argument("--account", action="append", default=[], help="only this managed account (repeatable)")
    ap.add_argument("-c", "--config", help="config file (default: ./config.yaml)")
    ap.add_argument("--db", help="database file (default: the config's `database`)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    ap.add_argument("--tolerance", default="0.5%", help="relative difference allowed per row (default 0.5%%)")
    ap.add_argument("--floor-usd", default="0.01", help="absolute cost difference always allowed (default 0.01)")
    ap.add_argument("--api", choices=APIS, default="auto", help="analytics, legacy, or auto (analytics, else legacy)")
    ap.add_argument("--list-price", action="store_true", help="compare with list prices (analytics `list_amount`)")
    ap.add_argument("--ignore-key", action="append", default=[], help="an Admin API key id to report but not alert on")
    return ap


@dataclass
class Result:
    api: str
    since: datetime
    until: datetime
    tol: Tolerance
    rows: list[Row]
    keys: KeyMap
    passthrough: tuple[int, float]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def fetch_provider(
    client: AdminClient, api: str, since: datetime, until: datetime, list_price: bool
) -> tuple[str, dict, dict | None, bool, list[str]]:
    """(api used, usage, cost, cost complete per key, notes). `auto` falls back to the legacy reports when the
    analytics API is refused (not enabled, HIPAA-ready organisation, an older deployment)."""
    notes: list[str] = []
    if api in ("auto", "analytics"):
        try:
            usage = client.analytics_usage(since, until)
            cost = client.analytics_cost(since, until, list_price)
            return "analytics", usage, cost, True, notes
        except AdminError as e:
            if api == "analytics" or e.status not in (400, 403, 404):
                raise
            notes.append(f"The analytics API was refused ({e.message}); used the legacy reports instead.")
    usage = client.legacy_usage(since, until)
    by_cell = client.legacy_cost(since, until)
    keys_per_cell: dict[tuple[str, str, str], list[Any]] = {}
    for day, kid, model, tier in usage:
        keys_per_cell.setdefault((day, model, tier), []).append(kid)
    cost = {}
    for (day, model, tier), kids in keys_per_cell.items():
        if len(kids) == 1 and tier != "priority" and (day, model, tier) in by_cell:
            cost[(day, kids[0], model, tier)] = {"total": by_cell[(day, model, tier)]}
    notes.append(
        "Legacy cost report: it has no cost per API key and leaves out Priority Tier, so cost is compared only "
        "where one key had all of a day's usage of a model and tier; other rows compare tokens only."
    )
    return "legacy", usage, cost, False, notes


def run(args: argparse.Namespace, env: dict[str, str], now: datetime) -> Result:
    tol = Tolerance(parse_tolerance(args.tolerance), _floor(args))
    path = args.config or "config.yaml"
    if not Path(path).is_file():
        raise ReconcileError(f"no config at {path}: pass -c CONFIG (reconcile needs the accounts' keys)", EXIT_USAGE)
    try:
        config = load_config(path, env=env)
        admin_key = config.reconcile.admin_key(env) or env.get("ANTHROPIC_ADMIN_KEY") or None
    except ConfigError as e:
        raise ReconcileError(f"config error: {e}", EXIT_USAGE) from None
    if not admin_key:
        raise ReconcileError(
            "no Admin API key: set ANTHROPIC_ADMIN_KEY, or reconcile.admin_api_key in the config", EXIT_USAGE
        )
    managed = {a.name: a.anthropic_api_key for a in config.accounts if a.anthropic_api_key}
    unknown = [a for a in args.account if a not in {acc.name for acc in config.accounts}]
    if unknown:
        raise ReconcileError(f"--account: no account named {', '.join(map(repr, unknown))} in {path}", EXIT_USAGE)
    if args.account:
        managed = {n: k for n, k in managed.items() if n in args.account}
    try:
        since = _day_floor(parse_when(args.since, end=False, now=now, utc=True))
        until = _day_ceil(parse_when(args.until, end=True, now=now, utc=True) if args.until else now)
    except ValueError as e:
        raise ReconcileError(str(e), EXIT_USAGE) from None
    if until <= since:
        raise ReconcileError("--until must be after --since", EXIT_USAGE)

    db = Path(args.db).expanduser() if args.db else config.database
    conn = open_db(db)
    try:
        client = AdminClient(config.reconcile.base_url or config.upstream, admin_key)
        keys = match_keys(sorted(managed.items()), client.api_keys())
        api, usage, cost, complete, notes = fetch_provider(client, args.api, since, until, args.list_price)
        lo, hi = iso_ms(since), iso_ms(until)
        meter = meter_usage(conn, lo, hi, sorted(managed))
        passthrough = passthrough_usage(conn, lo, hi, args.account)
    finally:
        conn.close()
    only = frozenset(keys.id_by_account.values()) if args.account else None
    rows = compare(usage, cost, meter, keys, tol, frozenset(args.ignore_key), only, complete)
    result = Result(api, since, until, tol, rows, keys, passthrough, notes)
    _add_notes(result, client, now)
    return result


def _floor(args: argparse.Namespace) -> Decimal:
    try:
        value = Decimal(args.floor_usd)
    except InvalidOperation:
        raise ReconcileError(f"--floor-usd: cannot read {args.floor_usd!r}", EXIT_USAGE) from None
    if not value.is_finite() or value < 0:
        raise ReconcileError("--floor-usd must be a non-negative number of dollars", EXIT_USAGE)
    return value


def _day_floor(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _day_ceil(t: datetime) -> datetime:
    floor = _day_floor(t)
    return floor if floor == t else floor + timedelta(days=1)


def _add_notes(result: Result, client: AdminClient, now: datetime) -> None:
    n = result.notes
    if result.keys.unmatched:
        n.append(
            "Not compared: the organisation lists no key matching the Anthropic key of "
            f"{', '.join(result.keys.unmatched)} (a key of another organisation, or deleted)."
        )
    count, cost = result.passthrough
    if count:
        n.append(
            f"Out of scope: {count:,} pass-through request(s) (${cost:,.4f} metered) used clients' own keys, which the "
            "meter never sees: their usage shows up under the clients' key ids as not behind this proxy."
        )
    if result.until > now - timedelta(hours=1):
        fresh = f" (data refreshed at {client.data_refreshed_at})" if client.data_refreshed_at else ""
        n.append(
            "The provider's reports lag: usage typically appears within about 5 minutes, so the most recent hours "
            f"may still be incomplete on the provider side{fresh}. Rerun later before trusting today's rows."
        )


# --- output -------------------------------------------------------------------------------------------


def _money(x: Decimal | None) -> str:
    """Four decimals everywhere (a reconciliation compares columns), six for amounts under a hundredth of a cent."""
    if x is None:
        return "n/a"
    a = abs(x)
    return ("-" if x < 0 else "") + (f"${a:,.4f}" if a >= Decimal("0.0001") or not a else f"${a:.6f}")


def _diff_money(x: Decimal | None) -> str:
    return "n/a" if x is None else ("+" if x > 0 else "") + _money(x)


def to_dict(r: Result) -> dict[str, Any]:
    return {
        "api": r.api,
        "since": iso_ms(r.since),
        "until": iso_ms(r.until),
        "tolerance": str(r.tol.relative),
        "floor_usd": str(r.tol.floor_usd),
        "ok": r.ok,
        "rows": [row.as_dict() for row in r.rows],
        "unmatched_accounts": r.keys.unmatched,
        "passthrough_requests": r.passthrough[0],
        "notes": r.notes,
    }


def to_csv(r: Result) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(row.as_dict() for row in r.rows)
    return buf.getvalue()


STYLE = {"ok": "green", "not behind this proxy": "magenta", "price drift": "yellow"}


def render(r: Result, console: Console) -> None:
    api = "Usage and Cost Analytics API" if r.api == "analytics" else "legacy Usage and Cost API reports"
    days = (r.until - r.since).days
    title = (
        f"Meter vs bill · {api} · {r.since:%Y-%m-%d} to {(r.until - timedelta(days=1)):%Y-%m-%d} UTC ({days} day"
        f"{'s' if days != 1 else ''}) · tolerance {(r.tol.relative * 100).normalize():f}% + ${r.tol.floor_usd}"
    )
    cols = ["day", "key", "accounts", "model", "tier", "tokens billed", "tokens metered", "Δ tokens"]
    t = table(title, [*cols, "cost billed", "cost metered", "Δ cost", "cause"], 5)
    t.columns[-1].justify = "left"
    t.columns[-1].no_wrap = False
    t.columns[-1].max_width = 56
    for row in r.rows:
        key = row.key_name or row.api_key_id or "(no key)"
        cause = Text(row.cause, style=STYLE.get(row.cause, "bold red"))
        if row.detail and row.cause != "ok":
            cause.append(f"\n{row.detail}", style="dim")
        t.add_row(
            row.day, key, "+".join(row.accounts) or "—", row.model, row.service_tier,
            fmt_int(sum(row.provider.values())), fmt_int(sum(row.meter.values())), f"{row.token_diff:+,}",
            _money(row.provider_cost), _money(row.meter_cost), _diff_money(row.cost_diff), cause,
        )  # fmt: skip
    print_unsqueezed(console, t)
    if not r.rows:
        console.print(Text("Nothing to compare: no usage on either side in this period.", style="dim"))
    bad = [row for row in r.rows if not row.ok]
    verdict = (
        Text("✔ every row is within the tolerance", style="bold green")
        if not bad
        else Text(f"✘ {len(bad)} row(s) beyond the tolerance", style="bold red")
    )
    console.print(verdict)
    for note in r.notes:
        console.print(Text(f"• {note}", style="dim"))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    env = dict(os.environ)
    try:
        result = run(args, env, datetime.now(UTC))
    except ReconcileError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.code
    except ReportError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.code
    except AdminError as e:
        print(f"{PROG}: Admin API: {e.message}", file=sys.stderr)
        return EXIT_ADMIN_API
    except sqlite3.Error as e:
        print(f"{PROG}: database error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(json.dumps(to_dict(result), indent=2) + "\n")
    elif args.csv:
        sys.stdout.write(to_csv(result))
    else:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200)
        render(result, console)
    return EXIT_OK if result.ok else EXIT_DRIFT


if __name__ == "__main__":
    sys.exit(main())
