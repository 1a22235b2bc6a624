"""Budgets across a fleet: each proxy leases a slice of a budget period from PostgreSQL and admits against it.

Tables (a PostgreSQL migration, pgstore.PG_MIGRATIONS):
- `budget_periods` (scope, period, period_start): the limit, `seed` (the spend already in `requests` for that
  period when the row was made, so turning fleet budgets on mid-period forgets nothing) and `granted`, which is
  always `seed + sum(budget_leases.granted)` for the period.
- `budget_leases` (instance, scope, period, period_start): what this proxy instance holds (`granted`), what it
  has spent or reserved (`used`, reported at each sync), `expires_at`, and `wants`: the worst case of a request
  it refused that the fleet's free money could not cover (0: none), for fragment pooling (`_sync_key`).

A grant is one atomic `UPDATE budget_periods SET granted = granted + LEAST(want, GREATEST(0, limit - granted))
... RETURNING`: whatever the proxies do concurrently, the slices granted never add up to more than the limit.
Locally a hard budget admits iff own spend + own reservations + the request's worst case <= this proxy's slice
(budget.py), a dictionary read: no database round trip per request. The thread here (never the event loop)
keeps each slice ahead of demand, heartbeats the lease, returns idle or ended slices and, on a clean stop,
all of them; any proxy reclaims leases that expired (their holder died or lost the database): `granted -= granted
- used`. A proxy admits on a slice only until its lease would expire (TTL - MARGIN after the last sync that
started, by its own monotonic clock), so a slice that others may reclaim is no longer used here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg

from metrion_addon.pgstore import pg_migrate, redacted

if TYPE_CHECKING:
    from metrion_addon.budget import Budgets, Key
    from metrion_addon.budget_settings import Limit

log = logging.getLogger(__name__)

TTL = 30.0  # seconds a lease lives without a sync
MARGIN = 5.0  # a proxy stops admitting on a slice this long before its lease can expire
HEARTBEAT = 3.0  # seconds between syncs of a key that needs nothing
IDLE_RETURN = 30.0  # a slice unused this long gives its headroom back to the fleet
RECLAIM_EVERY = 5.0
WANT_FOR = 60.0  # a proxy goes on asking for what a refused request lacked this long after the last refusal
TURN = 0.5  # the thread's pace when nothing wakes it


def create_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS budget_periods (scope text NOT NULL, period text NOT NULL, "
        "period_start timestamptz NOT NULL, limit_usd numeric NOT NULL, seed numeric NOT NULL, "
        "granted numeric NOT NULL, "
        "last_grant numeric NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (scope, period, period_start))"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS budget_leases (instance text NOT NULL, scope text NOT NULL, period text NOT NULL, "
        "period_start timestamptz NOT NULL, granted numeric NOT NULL, used numeric NOT NULL, "
        "expires_at timestamptz NOT NULL, PRIMARY KEY (instance, scope, period, period_start))"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS budget_leases_period ON budget_leases (scope, period, period_start)")
    conn.execute("CREATE INDEX IF NOT EXISTS budget_leases_expiry ON budget_leases (expires_at)")


def add_wants(conn: psycopg.Connection[Any]) -> None:
    """`wants`: the worst case of a request a proxy refused and the fleet's free money could not cover (0: none),
    so that the others hand back the headroom they are not using (fragment pooling, see LeaseBook._sync_key)."""
    conn.execute("ALTER TABLE budget_leases ADD COLUMN IF NOT EXISTS wants numeric NOT NULL DEFAULT 0")


def scope_text(scope: tuple[str, str | None, bool]) -> str:
    return json.dumps(list(scope))


@dataclass(frozen=True)
class Synced:
    granted: float  # this lease's slice
    total: float  # granted to the whole fleet (seed included)
    consumed: float  # seed + every lease's reported use: fleet-wide spend (and reservations), as of now
    others_live: int  # other live leases with headroom
    got: float  # granted by this sync
    first_wanter: str | None = None  # the live lease with unmet `wants` that comes first (by instance), if any
    first_wants: float = 0.0  # the worst case of the request it refused


def ensure(conn: psycopg.Connection[Any], key: Key, limit: float, end: datetime) -> tuple[float, int]:
    """Create the period's row once, seeded from the rows already recorded for that scope and period. Returns
    what the fleet can still grant and how many live leases hold some of it."""
    (account, user, is_user), period, start = key
    who = ' AND "user" IS NULL' if is_user and user is None else ' AND "user" = %(user)s' if is_user else ""
    conn.execute(
        "INSERT INTO budget_periods (scope, period, period_start, limit_usd, seed, granted) "
        "SELECT %(scope)s, %(period)s, %(start)s, %(limit)s, s, s FROM (SELECT COALESCE(SUM(COALESCE(cost_usd, "
        "budget_usd::numeric)), 0) AS s FROM requests WHERE ts >= %(start)s AND ts < %(end)s "
        f"AND account = %(account)s{who}) x ON CONFLICT DO NOTHING",
        {
            "scope": scope_text(key[0]),
            "period": period,
            "start": start,
            "end": end,
            "limit": limit,
            "account": account,
            "user": user,
        },
    )
    row = conn.execute(
        "SELECT %(limit)s - granted, (SELECT count(*) FROM budget_leases l WHERE l.scope = p.scope AND l.period = "
        "p.period AND l.period_start = p.period_start AND expires_at > now() AND granted > used) FROM budget_periods p "
        "WHERE scope = %(scope)s AND period = %(period)s AND period_start = %(start)s",
        {"scope": scope_text(key[0]), "period": period, "start": start, "limit": limit},
    ).fetchone()
    assert row is not None
    return max(0.0, float(row[0])), int(row[1])


def sync(
    conn: psycopg.Connection[Any],
    instance: str,
    key: Key,
    limit: float,
    used: float,
    want: float = 0.0,
    give_back: float = 0.0,
    ttl: float = TTL,
    need: float = 0.0,
    size: float = 0.0,
) -> Synced:
    """Report `used`, ask for `want` more or give back up to `give_back` of the unspent slice (math.inf: all of
    it), and renew the lease. `need`: what a request of worst case `size` that this proxy refused lacked; if this
    sync cannot grant all of it, `size` is recorded as the lease's `wants`, for the other proxies to see (0:
    nothing is wanted).
    The period row must exist (`ensure`). Spend beyond the slice (a reclaimed lease, a request that cost more than
    it reserved) is added to the fleet's total, so `granted = seed + sum(leases)` holds and others see it."""
    scope, period, start = scope_text(key[0]), key[1], key[2]
    pk = {"instance": instance, "scope": scope, "period": period, "start": start}
    with conn.transaction():
        row = conn.execute(
            "SELECT granted FROM budget_leases WHERE instance = %(instance)s AND scope = %(scope)s "
            "AND period = %(period)s AND period_start = %(start)s FOR UPDATE",
            pk,
        ).fetchone()
        old = float(row[0]) if row else 0.0
        extra = max(0.0, used - old)
        back = min(give_back, max(old, used) - used)
        got_total = conn.execute(
            "UPDATE budget_periods SET last_grant = LEAST(%(want)s, GREATEST(0, %(limit)s - granted - %(extra)s)), "
            "granted = granted + %(extra)s - %(back)s + LEAST(%(want)s, GREATEST(0, %(limit)s - granted - %(extra)s)),"
            " limit_usd = %(limit)s WHERE scope = %(scope)s AND period = %(period)s AND period_start = %(start)s "
            "RETURNING last_grant, granted, seed",
            {**pk, "want": 0.0 if back > 0 else max(0.0, want), "limit": limit, "extra": extra, "back": back},
        ).fetchone()
        if got_total is None:
            raise LookupError("budget period row missing")
        got, total, seed = (float(v) for v in got_total)
        granted = used if back > 0 and back >= max(old, used) - used else old + extra + got - back  # exact at 0
        conn.execute(
            "INSERT INTO budget_leases (instance, scope, period, period_start, granted, used, expires_at, wants) "
            "VALUES (%(instance)s, %(scope)s, %(period)s, %(start)s, %(granted)s, %(used)s, "
            "now() + make_interval(secs => %(ttl)s), %(wants)s) ON CONFLICT (instance, scope, period, period_start) "
            "DO UPDATE SET granted = EXCLUDED.granted, used = EXCLUDED.used, expires_at = EXCLUDED.expires_at, "
            "wants = EXCLUDED.wants",
            {**pk, "granted": granted, "used": used, "ttl": ttl, "wants": max(size, need) if need > got else 0.0},
        )
        # One read of the period's leases: the fleet's use, the others' live leases with headroom, and the first
        # (by instance) live lease that wants more than the fleet could grant (pooling).
        used_all, live, wanter, wants = conn.execute(
            "SELECT COALESCE(SUM(used), 0), count(*) FILTER (WHERE instance <> %(instance)s AND expires_at > now() "
            "AND granted > used), (array_agg(instance ORDER BY instance) FILTER (WHERE expires_at > now() "
            "AND wants > 0))[1], (array_agg(wants ORDER BY instance) FILTER (WHERE expires_at > now() "
            "AND wants > 0))[1] FROM budget_leases WHERE scope = %(scope)s AND period = %(period)s "
            "AND period_start = %(start)s",
            pk,
        ).fetchone()  # type: ignore[misc]
    return Synced(granted, total, seed + float(used_all), int(live), got, wanter, float(wants or 0.0))


def reclaim(conn: psycopg.Connection[Any]) -> float:
    """Give the fleet back the unspent part of every expired lease (its holder died or lost the database)."""
    total = 0.0
    with conn.transaction():
        rows = conn.execute(
            "SELECT instance, scope, period, period_start, granted - used FROM budget_leases "
            "WHERE expires_at < now() AND granted > used ORDER BY scope, period, period_start, instance "
            "FOR UPDATE SKIP LOCKED"
        ).fetchall()
        for instance, scope, period, start, amount in rows:
            conn.execute(
                "UPDATE budget_leases SET granted = used WHERE instance = %s AND scope = %s AND period = %s "
                "AND period_start = %s",
                (instance, scope, period, start),
            )
            conn.execute(
                "UPDATE budget_periods SET granted = granted - %s WHERE scope = %s AND period = %s "
                "AND period_start = %s",
                (amount, scope, period, start),
            )
            total += float(amount)
    if rows:
        log.warning("metrion: reclaimed $%.4f of budget from %d expired lease(s)", total, len(rows))
    return total


@dataclass
class _Held:
    granted: float = 0.0
    valid_until: float = 0.0  # monotonic: admit on this slice until then
    others: float = 0.0  # fleet-wide consumption other than this proxy's, as of the last sync
    free: float | None = None  # what the fleet can still grant, as of the last sync (None: never read)
    others_live: int = 0
    synced_at: float = 0.0  # monotonic
    used: float = 0.0  # as reported at the last sync
    active_at: float = 0.0  # monotonic: when `used` last changed


class LeaseBook:
    """This proxy's leases and the thread that keeps them. The event loop only reads `slice`/`others`/`free` and
    calls `want`; every database call happens on the thread."""

    def __init__(self, url: str, budgets: Budgets, ttl: float = TTL, idle_return: float = IDLE_RETURN) -> None:
        self.url = url
        self.budgets = budgets
        self.ttl, self.idle_return = ttl, idle_return
        self.margin = min(MARGIN, ttl / 6)  # a short test TTL scales both down
        self.heartbeat = min(HEARTBEAT, (ttl - self.margin) / 3)  # a live slice never lapses between syncs
        self.instance = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._held: dict[Key, _Held] = {}
        self._wanted: dict[Key, tuple[float, float]] = {}  # (shortfall, worst case) of requests refused
        self._sizes: dict[Key, float] = {}  # the worst case of the last request refused with its body read
        self._unmet: dict[Key, tuple[float, float]] = {}  # (worst case, when) of a refused request not yet covered
        self._ensured: set[Key] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrion-leases", daemon=True)
        self._conn: psycopg.Connection[Any] | None = None
        self.failing = False  # the database could not be reached at the last try
        self._reclaimed_at = 0.0
        self._migrated = False
        self.round_trips = 0  # syncs done (each: one transaction), for the logs and the tests

    # -- the event loop's side ------------------------------------------------------------------------

    def slice(self, key: Key) -> float:
        """What this proxy may spend and reserve in the key's period (0: no live slice)."""
        h = self._held.get(key)
        if h is None or time.monotonic() >= h.valid_until:
            return 0.0
        return h.granted

    def others(self, key: Key) -> float:
        h = self._held.get(key)
        return h.others if h is not None else 0.0

    def free(self, key: Key) -> float | None:
        h = self._held.get(key)
        return h.free if h is not None else None

    def want(self, key: Key, shortfall: float, size: float = 0.0) -> None:
        """A request of worst case `size` did not fit this proxy's slice: ask the fleet for at least `shortfall`
        more."""
        if size > 0:
            self._sizes[key] = size
        else:  # refused on its headers (this proxy's slice is used up): about the size of the last one
            size = self._sizes.get(key, 0.0)
        had, had_size = self._wanted.get(key, (0.0, 0.0))
        self._wanted[key] = (max(had, shortfall), max(had_size, size))
        self._wake.set()

    # -- life ---------------------------------------------------------------------------------------------

    def start(self) -> LeaseBook:
        try:
            self._turn()  # pre-lease every statically known budget before the port opens
        except (psycopg.Error, OSError, LookupError) as e:
            self._lost(e)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, then give back every unspent slice (requests still in flight were settled before)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(15)
        try:
            conn = self._connection()
            for key, h in list(self._held.items()):
                lim = self.budgets.limit_of(key)
                if lim is not None:
                    self._give_back(conn, key, lim, h, math.inf)
            self._held.clear()
        except (psycopg.Error, OSError, LookupError) as e:
            log.warning(
                "metrion: could not return budget slices to %s (%s); they come back when the leases expire",
                redacted(self.url),
                str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__,
            )
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        log.info("metrion: budget leases: %d syncs with PostgreSQL in this run", self.round_trips)

    # -- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TURN)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._turn()
            except (psycopg.Error, OSError, LookupError) as e:
                self._lost(e)
                self._stop.wait(1.0)
            except Exception:
                log.exception("metrion: budget lease thread error")
                self._stop.wait(1.0)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, connect_timeout=3, autocommit=True)
            if not self._migrated:
                pg_migrate(self._conn)  # the tables, if this thread is first to the database
                self._migrated = True
        return self._conn

    def _lost(self, e: Exception) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
        if not self.failing:
            self.failing = True
            log.error(
                "metrion: cannot reach PostgreSQL %s for budget leases (%s): admitting within the slices held "
                "until their leases run out, then refusing",
                redacted(self.url),
                str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__,
            )

    def _used(self) -> dict[Key, float]:
        b = self.budgets
        with b.lock:
            used = dict(b._spent)
            for k, v in b._reserved.items():
                used[k] = used.get(k, 0.0) + v
        return used

    def _turn(self) -> None:
        b = self.budgets
        now = b.clock()
        used = self._used()
        keys = dict.fromkeys([*b.known_keys(now), *used, *self._wanted.copy(), *self._held])
        conn = self._connection()
        mono = time.monotonic()
        for key in keys:
            lim = b.limit_of(key)
            if lim is None:
                continue
            end = b.period(key[1], key[2].timestamp())[1]
            u = used.get(key, 0.0)
            h = self._held.get(key)
            if end.timestamp() <= now:  # the period is over: give back what is left once nothing is in flight
                if h is not None and key not in b._reserved:
                    self._give_back(conn, key, lim, h, math.inf)
                    del self._held[key]
                self._wanted.pop(key, None)
                continue
            if key not in self._ensured:
                free, live = ensure(conn, key, lim.usd, end)
                self._ensured.add(key)
                if h is None:
                    h = _Held(free=free, others_live=live)
            self._sync_key(conn, key, lim, u, h, mono)
        if mono - self._reclaimed_at >= RECLAIM_EVERY:
            self._reclaimed_at = mono
            reclaim(conn)
        if self.failing:
            self.failing = False
            log.warning("metrion: PostgreSQL %s reachable again for budget leases", redacted(self.url))

    def _give_back(self, conn: psycopg.Connection[Any], key: Key, lim: Limit, h: _Held, amount: float) -> Synced:
        """Return up to `amount` of the slice's headroom. The slice is lowered here first, under the lock that
        a reservation's check and booking share, so no request is admitted on money already on its way back."""
        b = self.budgets
        with b.lock:
            used = b._spent.get(key, 0.0) + b._reserved.get(key, 0.0)
            amount = min(amount, max(0.0, h.granted - used))
            h.granted -= amount
        s = sync(conn, self.instance, key, lim.usd, used, give_back=amount, ttl=self.ttl)
        self.round_trips += 1
        h.granted, h.used = s.granted, used
        return s

    def _sync_key(
        self, conn: psycopg.Connection[Any], key: Key, lim: Limit, u: float, h: _Held | None, mono: float
    ) -> None:
        new = key not in self._held
        h = h or _Held()
        if new:
            h.active_at = mono
        if u != h.used:
            h.active_at = mono
        wanted = self._wanted.pop(key, None)
        worst, since = self._unmet.get(key, (0.0, mono))  # a refused request's worst case, not yet covered
        if wanted is not None:  # a request was refused since the last turn
            worst, since = max(worst, wanted[1]), mono
        elif mono - since >= WANT_FOR:  # no request asked for a while: its client has given up
            worst = 0.0
        need = max(wanted[0] if wanted else 0.0, worst - (h.granted - u))  # what the slice lacks for it
        want = back = 0.0
        if lim.hard:
            free = lim.usd if h.free is None else h.free
            size = max(free / (2 * (h.others_live + 1)), lim.usd / 100)  # a share of what is left, a floor
            head = h.granted - u
            if need > 0 or head < size / 2:  # low water, or a request that did not fit
                want = max(size, need)
            elif head > size and mono - h.active_at >= self.idle_return:
                back = head - size  # idle: keep one low-water mark's worth, the rest is more use to the others
        if not (new or want > 0 or back > 0 or mono - h.synced_at >= self.heartbeat):
            return
        if back > 0:
            s = self._give_back(conn, key, lim, h, back)
            h.active_at = mono
        else:
            need = need if lim.hard else 0.0
            s = sync(conn, self.instance, key, lim.usd, u, want, ttl=self.ttl, need=need, size=worst)
            self.round_trips += 1
            h.granted, h.used = s.granted, u
        if lim.hard and need - s.got > 0 and back == 0 and s.others_live > 0:  # others hold some: ask them
            self._unmet[key] = (worst, since)
        else:
            self._unmet.pop(key, None)
        head = h.granted - h.used
        if (
            lim.hard
            and s.first_wanter not in (None, self.instance)
            and head > 0
            and (head < s.first_wants or mono - h.active_at >= self.idle_return)
        ):
            # Fragment pooling. Another proxy refused a request that the fleet's free money could not cover, and
            # it comes first among those that did (by instance). If what this proxy holds unused is too small for
            # that request (or it has been idle), it hands all of it back (its requests in flight keep their
            # reservations) and drops its own claim: the fragments left on several proxies, each too small for
            # the request, end up on the one that needs them. A proxy holding enough for such a request keeps it.
            self._unmet.pop(key, None)
            s = self._give_back(conn, key, lim, h, math.inf)
            h.active_at = mono
        h.synced_at = mono
        h.valid_until = mono + self.ttl - self.margin  # started before the server stamped expires_at
        h.others = max(0.0, s.consumed - h.used)
        h.free = max(0.0, lim.usd - s.total)
        h.others_live = s.others_live
        self._held[key] = h
