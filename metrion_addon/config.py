"""YAML configuration -> typed, validated settings.

Every problem is reported as one `ConfigError` naming the field (``accounts[1].tokens[0]``) and, where YAML
knows it, the line. Secrets (tokens, keys) never appear in a message.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metrion_addon.alerts import AlertHook, parse_alerts
from metrion_addon.budget_settings import PERIODS, AccountBudgets, BudgetSettings, Limit
from metrion_addon.labels import LabelError, required_label_key
from metrion_addon.yamlcheck import ConfigError, Ctx, Node, parse_yaml

TOKEN_PREFIX = "sk-metrion-"
_SHA256_RE = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_ENV_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read", "web_search_per_1000")


@dataclass(frozen=True)
class Account:
    name: str
    token_hashes: tuple[bytes, ...]
    anthropic_api_key: str | None = field(default=None, repr=False)
    allow_passthrough: bool = True
    token_users: tuple[str | None, ...] = ()  # per token (same order as token_hashes): the user it is bound to


@dataclass(frozen=True)
class PriceOverride:
    """Per-million-token prices (web search: per 1000 searches) for model ids starting with `prefix`."""

    prefix: str
    input: Decimal
    output: Decimal
    cache_write_5m: Decimal | None = None
    cache_write_1h: Decimal | None = None
    cache_read: Decimal | None = None
    web_search_per_1000: Decimal | None = None


@dataclass(frozen=True)
class ReconcileSettings:
    """`reconcile:` — the Admin API key (a secret: never logged or stored) and where the Admin API is.

    The key is kept as written (a literal or `${VAR}`) and resolved only by `admin_key()`, so the proxy, which
    never needs it, starts without the variable set.
    """

    admin_api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None  # None: the config's `upstream`

    def admin_key(self, env: dict[str, str]) -> str | None:
        """The key itself: the literal, or the named environment variable (ConfigError if that is unset)."""
        if self.admin_api_key is None:
            return None
        m = _ENV_RE.match(self.admin_api_key)
        if not m:
            return self.admin_api_key
        value = env.get(m.group(1))
        if not value:
            raise ConfigError(f"reconcile.admin_api_key: environment variable {m.group(1)} is not set (or empty)")
        return value


@dataclass(frozen=True)
class Config:
    path: Path
    upstream: str = "https://api.anthropic.com"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    path_prefix: str = ""
    public_url: str = ""  # the proxy's base URL as clients reach it (behind a load balancer); "": as connected to
    database: Path = Path("metrion.db")  # the SQLite file; with database_url, the local spool
    database_url: str | None = None  # postgresql://... (fleet mode); secrets in it come from ${ENV}
    accounts: tuple[Account, ...] = ()
    price_overrides: tuple[PriceOverride, ...] = ()
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    metrics_listen: tuple[str, int] | None = None  # (host, port) of the Prometheus listener; None: off
    metrics_users: tuple[str, ...] = ()  # user labels that get their own metrics label; all others are `other`
    bound_user_header: str = "refuse"  # a token-bound user and a different x-metrion-user: refuse (403) | ignore
    alerts: tuple[AlertHook, ...] = ()


def hash_token(token: str) -> bytes:
    """The form in which proxy tokens are kept in memory and compared."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _expand_env(ctx: Ctx, node: Node, where: str, env: dict[str, str] | None) -> str:
    """A secret's value: the literal, or the named environment variable. With `env=None` (secrets not
    resolved) a `${VAR}` reference is returned as written."""
    raw = ctx.string(node, where, secret=True)
    m = _ENV_RE.match(raw)
    if not m:
        if "${" in raw:
            raise ctx.fail(where, node, "use exactly '${VAR_NAME}' to read a secret from the environment")
        return raw
    if env is None:
        return raw
    value = env.get(m.group(1))
    if not value:
        raise ctx.fail(where, node, f"environment variable {m.group(1)} is not set (or empty)")
    return value


def _expand_url(ctx: Ctx, node: Node, env: dict[str, str] | None) -> str:
    """A database URL with any `${VAR}` in it replaced from the environment (kept as written without env)."""
    raw = ctx.string(node, "database", secret=True)
    if env is None:
        return raw

    def value(m: re.Match[str]) -> str:
        v = env.get(m.group(1))
        if not v:
            raise ctx.fail("database", node, f"environment variable {m.group(1)} is not set (or empty)")
        return quote(v, safe="")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value, raw)


def _token_hash(ctx: Ctx, node: Node, where: str) -> bytes:
    raw = ctx.string(node, where, secret=True)
    m = _SHA256_RE.match(raw)
    if m:
        return bytes.fromhex(m.group(1))
    if raw.startswith("sha256:"):
        raise ctx.fail(where, node, "a hashed token must be 'sha256:' followed by 64 hex digits")
    if not raw.startswith(TOKEN_PREFIX) or len(raw) < len(TOKEN_PREFIX) + 8:
        raise ctx.fail(
            where, node, f"a proxy token must start with '{TOKEN_PREFIX}' and have at least 8 more characters"
        )
    return hash_token(raw)


# --- the loader -------------------------------------------------------------------------------------

_TOP_KEYS = (
    "upstream",
    "listen_host",
    "listen_port",
    "path_prefix",
    "public_url",
    "database",
    "accounts",
    "pricing",
    "budget_timezone",
    "block_unknown_models",
    "reconcile",
    "metrics_listen",
    "metrics_users",
    "bound_user_header",
    "unknown_model_budget",
    "alerts",
)
_ACCOUNT_KEYS = ("name", "tokens", "anthropic_api_key", "allow_passthrough", "budget", "user_budget", "user_budgets")
_LIMIT_KEYS = ("usd", "enforce")
_PRICING_KEYS = ("overrides",)
_OVERRIDE_KEYS = ("prefix", *_PRICE_FIELDS)
_RECONCILE_KEYS = ("admin_api_key", "base_url")
_URL_RE = re.compile(r"^https?://[^/\s]+$")
_PUBLIC_URL_RE = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~\-/]*[A-Za-z0-9._~\-])?$")


def _limits(ctx: Ctx, node: Node, where: str) -> tuple[Limit, ...]:
    """{daily: 50, monthly: {usd: 1000, enforce: soft}}: a number is a hard limit in USD."""
    limits = []
    for period, lim_node in ctx.mapping(node, where, PERIODS).items():
        lw = f"{where}.{period}"
        if isinstance(lim_node.value, dict):
            lim = ctx.mapping(lim_node, lw, _LIMIT_KEYS)
            if "usd" not in lim:
                raise ctx.fail(f"{lw}.usd", lim_node, "required")
            usd = ctx.price(lim["usd"], f"{lw}.usd")
            enforce = ctx.string(lim["enforce"], f"{lw}.enforce") if "enforce" in lim else "hard"
            if enforce not in ("hard", "soft"):
                raise ctx.fail(f"{lw}.enforce", lim["enforce"], "must be 'hard' (block) or 'soft' (warn)")
        else:
            usd, enforce = ctx.price(lim_node, lw), "hard"
        limits.append(Limit(period=period, usd=float(usd), hard=enforce == "hard"))
    return tuple(limits)


def _user_key(ctx: Ctx, node: Node, where: str, label: object) -> str:
    try:  # as budgets compare it
        return required_label_key(label)
    except LabelError as e:
        raise ctx.fail(where, node, str(e)) from None


def _token(ctx: Ctx, node: Node, where: str) -> tuple[bytes, str | None]:
    """A token: a plain string, or {token: ..., user: alice} for a token bound to its user."""
    if not isinstance(node.value, dict):
        return _token_hash(ctx, node, where), None
    tok = ctx.mapping(node, where, ("token", "user"))
    if "token" not in tok:
        raise ctx.fail(f"{where}.token", node, "required")
    user = _user_key(ctx, tok["user"], f"{where}.user", tok["user"].value) if "user" in tok else None
    return _token_hash(ctx, tok["token"], f"{where}.token"), user


def _account_budgets(ctx: Ctx, acc: dict[str, Node], where: str) -> AccountBudgets | None:
    if not any(k in acc for k in ("budget", "user_budget", "user_budgets")):
        return None
    users: dict[str, tuple[Limit, ...]] = {}
    if "user_budgets" in acc:
        node = acc["user_budgets"]
        if not isinstance(node.value, dict):
            raise ctx.fail(f"{where}.user_budgets", node, "must be a mapping of user label -> limits")
        for u, n in node.value.items():
            uw = f"{where}.user_budgets.{u}"
            key = _user_key(ctx, n, uw, u)
            if key in users:
                raise ctx.fail(uw, n, f"is the same user as another entry (labels compare as {key!r})")
            users[key] = _limits(ctx, n, uw)
    return AccountBudgets(
        account=_limits(ctx, acc["budget"], f"{where}.budget") if "budget" in acc else (),
        user_default=_limits(ctx, acc["user_budget"], f"{where}.user_budget") if "user_budget" in acc else (),
        users=users,
    )


def load_config(
    path: str | os.PathLike[str], env: dict[str, str] | None = None, *, resolve_secrets: bool = True
) -> Config:
    """Read and validate the config file; raise ConfigError with one clear message on any problem.

    `resolve_secrets=False` is for the commands that read the config but never use its secrets (report,
    reprice): `${VAR}` references stay as written and need not be set."""
    if not resolve_secrets:
        env = None
    elif env is None:
        env = dict(os.environ)
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config file: {e.__class__.__name__}: {e}") from None
    return parse_config(text, p.resolve(), env)


def parse_config(text: str, path: Path, env: dict[str, str] | None) -> Config:
    ctx = Ctx(str(path))
    root = parse_yaml(text, str(path))
    if root is None:
        raise ConfigError(f"{path}: the config file is empty")
    top = ctx.mapping(root, "", _TOP_KEYS)
    kw: dict[str, Any] = {}

    if "upstream" in top:
        up = ctx.string(top["upstream"], "upstream").rstrip("/")
        if not _URL_RE.match(up):
            raise ctx.fail("upstream", top["upstream"], "must be a URL like https://api.anthropic.com (no path)")
        kw["upstream"] = up
    if "listen_host" in top:
        kw["listen_host"] = ctx.string(top["listen_host"], "listen_host")
    if "listen_port" in top:
        kw["listen_port"] = ctx.integer(top["listen_port"], "listen_port", 1, 65535)
    if "path_prefix" in top:
        prefix = top["path_prefix"]
        value = "" if prefix.value in (None, "") else ctx.string(prefix, "path_prefix")
        if value and (not value.startswith("/") or value.endswith("/") or "?" in value):
            raise ctx.fail("path_prefix", prefix, "must start with '/' and not end with '/' (e.g. /api/proxy)")
        kw["path_prefix"] = value
    if "public_url" in top:
        public = ctx.string(top["public_url"], "public_url")
        if not _PUBLIC_URL_RE.match(public):
            raise ctx.fail(
                "public_url", top["public_url"], "must be a URL like https://metrion.example.com or "
                "https://gw.example.com/api/proxy (scheme, host, optional port and path; no query, no trailing '/')"
            )
        kw["public_url"] = public
    db_value = ctx.string(top["database"], "database") if "database" in top else "metrion.db"
    if db_value.startswith(("postgresql://", "postgres://")):
        # PostgreSQL: the password comes from ${VAR} in the URL, or libpq's PGPASSWORD / .pgpass. Rows that
        # cannot reach the server wait in a SQLite spool beside the config.
        kw["database_url"] = _expand_url(ctx, top["database"], env)
        db_value = "metrion-spool.db"
    db = Path(db_value)
    kw["database"] = db if db.is_absolute() else path.parent / db

    if "accounts" not in top:
        raise ConfigError(f"{path}: field 'accounts': required (a list of accounts with tokens)")
    accounts: list[Account] = []
    budgets: dict[str, AccountBudgets] = {}
    seen_tokens: dict[bytes, str] = {}
    seen_names: set[str] = set()
    for i, acc_node in enumerate(ctx.sequence(top["accounts"], "accounts")):
        where = f"accounts[{i}]"
        acc = ctx.mapping(acc_node, where, _ACCOUNT_KEYS)
        if "name" not in acc:
            raise ctx.fail(f"{where}.name", acc_node, "required")
        name = ctx.string(acc["name"], f"{where}.name")
        if name in seen_names:
            raise ctx.fail(f"{where}.name", acc["name"], f"account name {name!r} is used twice")
        seen_names.add(name)
        if "tokens" not in acc:
            raise ctx.fail(f"{where}.tokens", acc_node, "required (a list of proxy tokens)")
        hashes: list[bytes] = []
        token_users: list[str | None] = []
        for j, tok_node in enumerate(ctx.sequence(acc["tokens"], f"{where}.tokens")):
            tw = f"{where}.tokens[{j}]"
            h, bound = _token(ctx, tok_node, tw)
            if h in seen_tokens:
                raise ctx.fail(tw, tok_node, f"duplicate token (already used at {seen_tokens[h]})")
            seen_tokens[h] = tw
            hashes.append(h)
            token_users.append(bound)
        if not hashes:
            raise ctx.fail(f"{where}.tokens", acc["tokens"], "must hold at least one token")
        key = None
        if "anthropic_api_key" in acc and acc["anthropic_api_key"].value is not None:
            key = _expand_env(ctx, acc["anthropic_api_key"], f"{where}.anthropic_api_key", env)
        passthrough = (
            ctx.boolean(acc["allow_passthrough"], f"{where}.allow_passthrough") if "allow_passthrough" in acc else True
        )
        if key is None and not passthrough:
            raise ctx.fail(
                where, acc_node, "needs anthropic_api_key (managed mode) or allow_passthrough: true, or both"
            )
        accounts.append(Account(name, tuple(hashes), key, passthrough, tuple(token_users)))
        spec = _account_budgets(ctx, acc, where)
        if spec is not None:
            budgets[name] = spec
    if not accounts:
        raise ctx.fail("accounts", top["accounts"], "must hold at least one account")
    kw["accounts"] = tuple(accounts)

    tz = "UTC"
    if "budget_timezone" in top:
        tz = ctx.string(top["budget_timezone"], "budget_timezone")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ctx.fail("budget_timezone", top["budget_timezone"], f"unknown time zone {tz!r}") from None
    block = ctx.boolean(top["block_unknown_models"], "block_unknown_models") if "block_unknown_models" in top else False
    for key, allowed in (("unknown_model_budget", ("max_rate", "refuse")), ("bound_user_header", ("refuse", "ignore"))):
        if key in top and ctx.string(top[key], key) not in allowed:
            raise ctx.fail(key, top[key], f"must be {' or '.join(map(repr, allowed))}")
    unknown = top["unknown_model_budget"].value if "unknown_model_budget" in top else "max_rate"
    kw["budgets"] = BudgetSettings(timezone=tz, block_unknown_models=block, accounts=budgets, unknown_model=unknown)
    if "bound_user_header" in top:
        kw["bound_user_header"] = top["bound_user_header"].value
    if "alerts" in top:
        kw["alerts"] = parse_alerts(ctx, top["alerts"])

    if "pricing" in top:
        pricing = ctx.mapping(top["pricing"], "pricing", _PRICING_KEYS)
        overrides: list[PriceOverride] = []
        seen_prefixes: set[str] = set()
        for i, o_node in enumerate(ctx.sequence(pricing.get("overrides", Node([], 0)), "pricing.overrides")):
            where = f"pricing.overrides[{i}]"
            o = ctx.mapping(o_node, where, _OVERRIDE_KEYS)
            for required in ("prefix", "input", "output"):
                if required not in o:
                    raise ctx.fail(f"{where}.{required}", o_node, "required")
            prefix = ctx.string(o["prefix"], f"{where}.prefix")
            if prefix in seen_prefixes:
                raise ctx.fail(f"{where}.prefix", o["prefix"], f"prefix {prefix!r} is listed twice")
            seen_prefixes.add(prefix)
            prices = {f: ctx.price(o[f], f"{where}.{f}") for f in _PRICE_FIELDS if f in o}
            overrides.append(PriceOverride(prefix=prefix, **prices))
        kw["price_overrides"] = tuple(overrides)

    if "reconcile" in top:
        rec = ctx.mapping(top["reconcile"], "reconcile", _RECONCILE_KEYS)
        admin_key = None
        if "admin_api_key" in rec and rec["admin_api_key"].value is not None:
            admin_key = ctx.string(rec["admin_api_key"], "reconcile.admin_api_key", secret=True)
            if "${" in admin_key and not _ENV_RE.match(admin_key):
                message = "use exactly '${VAR_NAME}' to read it from the environment"
                raise ctx.fail("reconcile.admin_api_key", rec["admin_api_key"], message)
        base_url = None
        if "base_url" in rec:
            base_url = ctx.string(rec["base_url"], "reconcile.base_url").rstrip("/")
            if not _URL_RE.match(base_url):
                raise ctx.fail("reconcile.base_url", rec["base_url"], "must be a URL like https://api.anthropic.com")
        kw["reconcile"] = ReconcileSettings(admin_api_key=admin_key, base_url=base_url)

    _metrics(ctx, top, kw)
    return Config(path=path, **kw)


_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})$")


def _metrics(ctx: Ctx, top: dict[str, Node], kw: dict[str, Any]) -> None:
    """`metrics_listen: 127.0.0.1:9464` (off when absent) and `metrics_users: [alice, bob]`."""
    if "metrics_listen" in top and top["metrics_listen"].value is not None:
        node = top["metrics_listen"]
        m = _LISTEN_RE.match(ctx.string(node, "metrics_listen"))
        port = int(m.group("port")) if m else 0
        if m is None or not 1 <= port <= 65535:
            raise ctx.fail("metrics_listen", node, "must be HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464")
        if port == kw.get("listen_port", 8080):
            raise ctx.fail("metrics_listen", node, "must not be the proxy's port (metrics have their own listener)")
        kw["metrics_listen"] = (m.group("v6") or m.group("host"), port)
    if "metrics_users" in top:
        nodes = ctx.sequence(top["metrics_users"], "metrics_users")
        kw["metrics_users"] = tuple(ctx.string(u, f"metrics_users[{i}]") for i, u in enumerate(nodes))
