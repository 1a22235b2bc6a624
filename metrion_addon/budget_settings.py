"""Budget settings as the config states them: limits per account, per user, and their defaults. No behaviour
(budget.py keeps spend against them)."""

from __future__ import annotations

from dataclasses import dataclass, field

PERIODS = ("daily", "monthly")


@dataclass(frozen=True)
class Limit:
    period: str  # daily | monthly
    usd: float
    hard: bool = True


@dataclass(frozen=True)
class AccountBudgets:
    account: tuple[Limit, ...] = ()
    user_default: tuple[Limit, ...] = ()  # for every user (and for requests without a user label)
    users: dict[str, tuple[Limit, ...]] = field(default_factory=dict)  # keys are label keys (labels.label_key)


@dataclass(frozen=True)
class BudgetSettings:
    timezone: str = "UTC"
    block_unknown_models: bool = False
    accounts: dict[str, AccountBudgets] = field(default_factory=dict)
    unknown_model: str = "max_rate"  # under a hard limit: reserve at the most expensive known rate, or "refuse"

    @property
    def any(self) -> bool:
        return any(a.account or a.user_default or a.users for a in self.accounts.values())
