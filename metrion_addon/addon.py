"""The mitmproxy addon: wires mitmproxy's hooks to config, auth, usage, pricing and the store."""

from __future__ import annotations

import json
import logging
import time

from mitmproxy import ctx, exceptions, http

from metrion_addon.auth import METRION_HEADER_PREFIX, USER_HEADER, Authenticator, AuthError, error_body
from metrion_addon.budget import Budgets, file_clock, response_headers
from metrion_addon.config import Config, ConfigError, load_config
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, clean_label, finish, iso_ms, request_model, upstream_path
from metrion_addon.store import Store, connect
from metrion_addon.usage import StreamTap

log = logging.getLogger(__name__)

# Request headers that carry credentials. They are masked on the flow once the request has gone upstream, so
# that nothing which prints or saves flows later (mitmdump's flow_detail >= 2, `-w`) can show them.
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "x-metrion-token", "cookie")
REDACTED = "<redacted by metrion>"


def redact_credentials(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers:
            headers[name] = REDACTED


def classify_error(msg: str, response_started: bool) -> str:
    """mitmproxy's flow.error message -> a short error type for the record."""
    m = msg.lower()
    if "client disconnected" in m:
        return "client_disconnect"
    if "timed out" in m or "timeout" in m:
        return "upstream_timeout"
    if response_started:
        return "upstream_disconnect"
    if "connect" in m or "refused" in m or "resolve" in m or "unreachable" in m:
        return "upstream_unreachable"
    return "proxy_error"


class Metrion:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.auth: Authenticator | None = None
        self.pricer: Pricer | None = None
        self.store: Store | None = None
        self.budgets: Budgets | None = None
        self._pending: dict[str, Pending] = {}

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "metrion_config",
            str,
            "",
            "Path to the metrion YAML config (accounts, tokens, database, price overrides).",
        )
        loader.add_option(
            "metrion_max_backlog",
            int,
            100_000,
            "Request rows kept in memory while the database cannot be written; beyond it the oldest are dropped.",
        )
        loader.add_option(
            "metrion_test_clock",
            str,
            "",
            "Testing only: a file holding the current time (epoch seconds) for budget periods.",
        )

    def configure(self, updated: set[str]) -> None:
        if "metrion_config" not in updated:
            return
        if not ctx.options.metrion_config:
            raise exceptions.OptionsError("metrion: set the config file with --set metrion_config=PATH")
        try:
            config = load_config(ctx.options.metrion_config)
        except ConfigError as e:
            raise exceptions.OptionsError(f"metrion: {e}") from None
        store = Store(config.database, max_backlog=max(1, ctx.options.metrion_max_backlog))
        try:
            store.start()
        except Exception as e:
            raise exceptions.OptionsError(f"metrion: cannot open database {config.database}: {e}") from None
        budgets = Budgets(config.budgets, clock=file_clock(ctx.options.metrion_test_clock))
        if config.budgets.any:
            conn = connect(config.database)
            try:
                budgets.seed(conn)  # a restart neither forgets nor double-counts this period's spend
            finally:
                conn.close()
        if self.store is not None:
            self.store.close()
        self.config, self.store, self.budgets = config, store, budgets
        self.auth = Authenticator(config.accounts)
        self.pricer = Pricer(config.price_overrides)
        log.info(
            "metrion: %d account(s) from %s, recording to %s",
            len(config.accounts),
            config.path,
            config.database,
        )

    def done(self) -> None:
        if self._pending:
            # Requests still in flight at shutdown get no response/error hook: record what is known of them.
            log.warning("metrion: %d request(s) in flight at shutdown, recorded as proxy_shutdown", len(self._pending))
            for p in self._pending.values():
                self._store(
                    p, status=None, request_id=None, headers_at=None, ended_at=time.time(), error="proxy_shutdown"
                )
            self._pending.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    # -- request side ------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if self.auth is None or self.config is None or flow.response is not None:
            return
        req = flow.request
        req.path = upstream_path(req.path, self.config.path_prefix)
        p = Pending(
            started=req.timestamp_start,
            method=req.method,
            path=req.path.partition("?")[0],
            client=clean_label(req.headers.get("user-agent")),
            session_id=clean_label(req.headers.get("x-claude-code-session-id")),
            user=clean_label(req.headers.get(USER_HEADER)),
        )
        p.model = request_model(req.raw_content or b"", req.headers.get("content-type", ""))
        self._pending[flow.id] = p

        decision = self.auth.authenticate(req.headers)
        for name in [n for n in req.headers if n.lower().startswith(METRION_HEADER_PREFIX)]:
            del req.headers[name]
        if isinstance(decision, AuthError):
            self._answer(flow, p, decision.status, decision.error_type, decision.message)
            return
        p.account, p.mode = decision.account.name, decision.mode
        if not self._within_limits(flow, p):
            return
        for name in decision.remove_headers:
            req.headers.pop(name, None)
        for name, value in decision.set_headers.items():
            req.headers[name] = value

    def _within_limits(self, flow: http.HTTPFlow, p: Pending) -> bool:
        """Budgets and the unknown-model policy, checked before anything is forwarded."""
        assert self.config is not None and self.budgets is not None and self.pricer is not None
        if self.config.budgets.block_unknown_models and p.model and not self.pricer.knows(p.model, p.started):
            msg = f"model {p.model!r} has no known price, and this metrion proxy refuses unpriced models"
            self._answer(flow, p, 403, "permission_error", msg, record_as="unknown_model_blocked")
            return False
        assert p.account is not None
        check = self.budgets.check(p.account, p.user)
        if check.blocked is not None:
            retry = str(self.budgets.retry_after(check.blocked))
            msg = check.blocked.message()
            self._answer(flow, p, 429, "rate_limit_error", msg, record_as="budget_exceeded", retry_after=retry)
            return False
        flow.metadata["metrion_budget_headers"] = response_headers(check)
        return True

    def _answer(
        self,
        flow: http.HTTPFlow,
        p: Pending,
        status: int,
        error_type: str,
        message: str,
        record_as: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Answer locally in Anthropic's error shape; the upstream is never contacted."""
        p.local_error, p.local_message = record_as or error_type, message
        headers = {"content-type": "application/json"}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        flow.response = http.Response.make(status, json.dumps(error_body(error_type, message)), headers)

    # -- response side -----------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        p = self._pending.get(flow.id)
        if p is None or p.local_error is not None or flow.response is None:
            return
        flow.response.headers.update(flow.metadata.get("metrion_budget_headers", {}))
        ctype = flow.response.headers.get("content-type", "").lower()
        if ctype.startswith("text/event-stream"):
            p.streamed = True
            p.tap = StreamTap(p.facts, flow.response.headers.get("content-encoding"))
            flow.response.stream = p.tap
        elif "json" not in ctype:
            flow.response.stream = True  # not ours to read (e.g. batch results): pass it straight through

    def response(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow.request.headers)  # the request has been sent (or answered locally)
        p = self._pending.pop(flow.id, None)
        if p is None or flow.response is None:
            return
        resp = flow.response
        if not p.streamed and p.local_error is None and resp.stream is False:
            try:
                body = resp.content
            except ValueError:  # undecodable content-encoding: forwarded as is, not readable
                body = None
                p.facts.parse_errors += 1
            if body:
                p.facts.from_json_body(body)
        self._record(
            flow,
            p,
            status=resp.status_code,
            headers_at=resp.timestamp_start,
            ended_at=resp.timestamp_end or time.time(),
        )

    def error(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow.request.headers)
        p = self._pending.pop(flow.id, None)
        if p is None:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        started = flow.response is not None
        kind = classify_error(msg, started)
        status = flow.response.status_code if flow.response is not None else None
        if status is None and kind in ("upstream_unreachable", "upstream_timeout", "proxy_error"):
            status = 502  # mitmproxy answers the client with a 502 when the upstream cannot be reached
        self._record(
            flow,
            p,
            status=status,
            headers_at=flow.response.timestamp_start if flow.response is not None else None,
            ended_at=time.time(),
            error=kind,
            error_message=msg,
        )

    def _record(self, flow: http.HTTPFlow, p: Pending, **kw) -> None:  # type: ignore[no-untyped-def]
        request_id = flow.response.headers.get("request-id") if flow.response is not None else None
        self._store(p, request_id=request_id, **kw)

    def _store(self, p: Pending, **kw) -> None:  # type: ignore[no-untyped-def]
        """Build the row, queue it for the writer, and count its cost toward budgets."""
        if self.pricer is None or self.store is None:
            return
        try:
            row = finish(p, pricer=self.pricer, **kw)
        except Exception:  # never lose the row over a bug in accounting: keep what is certain
            log.exception("metrion: failed to account a request; recording it without usage")
            row = {
                "ts": iso_ms(p.started),
                "account": p.account,
                "user": p.user,
                "mode": p.mode,
                "method": p.method,
                "path": p.path,
                "model": p.model,
                "stream": int(p.streamed),
                "status": kw.get("status"),
                "completed": 0,
                "error": "metrion_internal_error",
            }
        self.store.put(row)
        if self.budgets is not None:
            self.budgets.add(row.get("account"), row.get("user"), row.get("cost_usd"))
