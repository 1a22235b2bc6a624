"""What the addon runs on, built from one config: credentials, prices, the store, budget admission, batches.

Built and torn down as one, so the hooks never see half of it: the addon holds one `Runtime` (or none, and
then refuses every request). A new config replaces it in one step, after the old one has closed: its writer
has flushed, so the new budget counters are seeded from every row the old one queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metrion_addon.accountant import Accountant
from metrion_addon.admission import Gate
from metrion_addon.auth import Authenticator
from metrion_addon.batch_hooks import BatchHooks
from metrion_addon.budget import Budgets, file_clock
from metrion_addon.config import Config
from metrion_addon.ops import Service
from metrion_addon.pricing import Pricer
from metrion_addon.store import Store, connect, open_store

if TYPE_CHECKING:  # psycopg (8 MB) loads only for a PostgreSQL database: open_store imports it then
    from metrion_addon.pgstore import PgStore


class StartError(Exception):
    """The runtime could not be built (database, metrics listener): the message says which and why."""


@dataclass
class Runtime:
    config: Config
    auth: Authenticator
    pricer: Pricer
    store: Store | PgStore
    gate: Gate  # budget admission: reservations, alerts (admission.py)
    batches: BatchHooks
    accountant: Accountant  # rows are built and handed to the store on its thread, off the event loop

    @property
    def budgets(self) -> Budgets:
        return self.gate.budgets

    @classmethod
    def open(cls, config: Config, options: Any, ops: Service) -> Runtime:
        """Start everything for `config` with the addon's options (`metrion_*`); StartError on failure."""
        store = open_store(config, max_backlog=max(1, options.metrion_max_backlog))
        try:
            store.start()
        except Exception as e:
            raise StartError(f"cannot open database {config.database}: {e}") from None
        pricer = Pricer(config.price_overrides)
        gate = Gate(config.budgets, pricer, file_clock(options.metrion_test_clock), config.alerts)
        gate.test_clock = bool(options.metrion_test_clock)
        try:
            # seeds this period's spend (a restart neither forgets nor doubles); over PostgreSQL, leases a share of it
            gate.start(config.database, connect, config.database_url)
            ops.configure(options, config, store, gate.budgets, pricer)
        except Exception as e:
            gate.close()
            store.close()
            raise StartError(str(e)) from None
        batches = BatchHooks(config, pricer, ops.observed(store), gate, options.metrion_batch_poll_seconds)
        batches.start()  # batch result rows go through ops.observed: metrics and logs see them too
        accountant = Accountant(pricer, ops.observed(store, inline=True)).start()  # request rows too, observed there
        ops.health.accounting = accountant.pending  # rows still being made count toward health's backlog
        return cls(config, Authenticator(config.accounts), pricer, store, gate, batches, accountant)

    def close(self) -> None:
        self.batches.close()  # its last result rows go to the store before that closes
        self.accountant.close()  # and every request row handed over
        self.store.close()
        self.gate.close()
