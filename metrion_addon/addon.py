"""The mitmproxy addon: wires mitmproxy's hooks to config, auth, usage, pricing and the store.

Fail closed: everything that decides whether a request may go upstream runs in `requestheaders`, before any
byte of it is forwarded (with `stream_large_bodies`, the body goes upstream before the `request` hook). Until
every check has passed, the flow carries a local error answer, so an exception anywhere in our code (which
mitmproxy would log and otherwise ignore, forwarding the flow as it was) ends in a refusal, never a bypass.
"""

from __future__ import annotations

import json
import logging
import time

from mitmproxy import connection, ctx, exceptions, http

from metrion_addon import mitm_errors, ops, record
from metrion_addon.admission import Gate, Refusal, user_for
from metrion_addon.auth import METRION_HEADER_PREFIX, USER_HEADER, Authenticator, AuthError, error_body
from metrion_addon.batch_hooks import CLIENT_PATH, BatchHooks
from metrion_addon.budget import Budgets, file_clock
from metrion_addon.config import Config, ConfigError, load_config
from metrion_addon.openai_compat import facts_for
from metrion_addon.pricing import Pricer
from metrion_addon.record import Pending, clean_label, finish, iso_ms, model_of, request_json, upstream_path
from metrion_addon.store import Store, connect, open_store, store_name
from metrion_addon.text import is_clean_token
from metrion_addon.usage import JsonTap, StreamTap

log = logging.getLogger(__name__)

# Request headers that carry credentials. They are masked on the flow once the request has gone upstream, so
# that nothing which prints or saves flows later (mitmdump's flow_detail >= 2, `-w`) can show them.
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "x-metrion-token", "cookie")
REDACTED = "<redacted by metrion>"
# A refused request is answered after mitmproxy has read its body. Bodies larger than this (or of unknown size,
# or that mitmproxy streams) are not read for a refusal: the connection is closed instead, so that nobody
# without a token can make the proxy buffer hundreds of MB.
REFUSAL_BODY_MAX = 4 * 1024 * 1024
# Anthropic's own request limit is 32 MB for Messages and 256 MB for Message Batches: the default
# `body_size_limit` when the user sets none (mitmproxy then refuses larger bodies before reading them).
DEFAULT_BODY_SIZE_LIMIT = "256m"


def redact_credentials(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers:
            headers[name] = REDACTED


def classify_error(msg: str, response_started: bool) -> str:
    """mitmproxy's flow.error message -> a short error type for the record."""
    m = msg.lower()
    if "client disconnected" in m:
        return "client_disconnect"
    if "body_size_limit" in m:
        return "request_too_large" if m.startswith("request") else "response_too_large"
    if "timed out" in m or "timeout" in m:
        return "upstream_timeout"
    if response_started:
        return "upstream_disconnect"
    if "connect" in m or "refused" in m or "resolve" in m or "unreachable" in m:
        return "upstream_unreachable"
    return "proxy_error"


def malformed_headers(headers: http.Headers) -> tuple[int, str, str] | None:
    """(status, error type, message) for headers no request may carry, else None.

    A line break inside a value is an obs-fold continuation line (mitmproxy keeps it in the previous header's
    value and would forward it: a strict upstream reads it as a header of its own). A credential can only be
    printable ASCII: raw bytes or control characters in one mean a malformed or hostile request.
    """
    if "trailer" in headers:  # mitmproxy 12 cannot parse HTTP/1 request trailers: refuse before reading the body
        return 400, "invalid_request_error", "request trailers are not supported by this proxy"
    for name, value in headers.items(multi=True):
        if "\r" in value or "\n" in value:
            return 400, "invalid_request_error", f"header {name[:64]!r} is folded over several lines (obs-fold)"
    for name in ("x-api-key", "authorization", "x-metrion-token"):
        for value in headers.get_all(name):
            if not is_clean_token(value):
                return 401, "authentication_error", f"the {name} header holds characters no credential has"
    return None


def _chain(first, tap):  # type: ignore[no-untyped-def]
    """Another addon's stream callable, then our tap on what it returns (its output reaches the client)."""

    def both(chunk: bytes):  # type: ignore[no-untyped-def]
        out = first(chunk)
        data = out if isinstance(out, bytes) else b"".join(out)
        if data:
            tap(data)
        if not chunk:
            tap(b"")
        return out

    return both


class Metrion:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.auth: Authenticator | None = None
        self.pricer: Pricer | None = None
        self.store: Store | None = None
        self.budgets: Budgets | None = None
        self.gate: Gate | None = None  # budget admission: reservations, alerts (admission.py)
        self.batches: BatchHooks | None = None
        self._pending: dict[str, Pending] = {}
        self._client_of: dict[str, str] = {}  # flow id -> client connection id, for flows mitmproxy drops
        self.ops = ops.Service()  # health, probes, metrics, request logs

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
            "Testing only: a file holding the current time (epoch seconds) for budget periods and row times.",
        )
        loader.add_option(
            "metrion_batch_poll_seconds",
            int,
            60,
            "Managed mode: seconds between polls of one batch the proxy created (at least; backs off). 0: off.",
        )
        ops.Service.add_options(loader)
        mitm_errors.install()

    def configure(self, updated: set[str]) -> None:
        if "body_size_limit" in updated and ctx.options.body_size_limit is None:
            ctx.options.update(body_size_limit=DEFAULT_BODY_SIZE_LIMIT)
        self.ops.update(ctx.options)  # log format, summary interval, health threshold: applied whenever set
        if "metrion_config" not in updated:
            return
        if not ctx.options.metrion_config:
            raise exceptions.OptionsError("metrion: set the config file with --set metrion_config=PATH")
        try:
            config = load_config(ctx.options.metrion_config)
        except ConfigError as e:
            raise exceptions.OptionsError(f"metrion: {e}") from None
        store = open_store(config, max_backlog=max(1, ctx.options.metrion_max_backlog))
        try:
            store.start()
        except Exception as e:
            raise exceptions.OptionsError(f"metrion: cannot open database {config.database}: {e}") from None
        pricer = Pricer(config.price_overrides)
        gate = Gate(config.budgets, pricer, file_clock(ctx.options.metrion_test_clock), config.alerts)
        gate.test_clock = bool(ctx.options.metrion_test_clock)
        gate.start(config.database, connect)  # seeds this period's spend: a restart neither forgets nor double-counts
        if self.batches is not None:
            self.batches.close()
        if self.store is not None:
            self.store.close()
        if self.gate is not None:
            self.gate.close()
        self.config, self.store, self.budgets, self.gate = config, store, gate.budgets, gate
        self.auth = Authenticator(config.accounts)
        self.pricer = pricer
        try:
            self.ops.configure(ctx.options, config, store, gate.budgets, self.pricer)
        except ValueError as e:
            raise exceptions.OptionsError(f"metrion: {e}") from None
        observed = self.ops.observed(store)  # batch result rows reach the metrics and logs too
        self.batches = BatchHooks(config, pricer, observed, gate, ctx.options.metrion_batch_poll_seconds)
        self.batches.start()
        log.info(
            "metrion: %d account(s) from %s, recording to %s",
            len(config.accounts),
            config.path,
            store_name(config),
        )

    def running(self) -> None:
        if self.batches is not None:
            self.batches.running()

    def done(self) -> None:
        if self._pending:
            # Requests still in flight at shutdown get no response/error hook: record what is known of them.
            # A stream whose end (message_stop) had already passed through is complete, not cut off.
            cut = sum(not p.facts.completed for p in self._pending.values())
            log.warning(
                "metrion: %d request(s) in flight at shutdown, %d cut off (proxy_shutdown)", len(self._pending), cut
            )
            for p in self._pending.values():
                self._store(
                    p,
                    status=p.status,
                    request_id=p.request_id,
                    headers_at=p.headers_at,
                    ended_at=time.time(),
                    error=None if p.facts.completed else "proxy_shutdown",
                )
            self._pending.clear()
        if self.batches is not None:
            self.batches.close()  # its last result rows go to the store before that closes
            self.batches = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.gate is not None:
            self.gate.close()
        self.ops.close()

    def client_disconnected(self, client: connection.Client) -> None:
        """Flows of this client that got neither `response` nor `error`: mitmproxy gave up on the connection
        (for example on HTTP/1 request trailers, which it cannot parse). They still leave their row."""
        orphans = [fid for fid, cid in self._client_of.items() if cid == client.id]
        for fid in orphans:
            del self._client_of[fid]
            p = self._pending.pop(fid, None)
            if p is not None:
                msg = "the proxy could not process this request (malformed HTTP); the connection was closed"
                self._store(
                    p,
                    status=None,
                    request_id=None,
                    headers_at=None,
                    ended_at=time.time(),
                    error=p.local_error or "client_protocol_error",
                    error_message=msg,
                )

    # -- request side ------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.auth is None:
            return
        # Refused until admitted: if anything below raises, this answer stands and nothing goes upstream.
        flow.response = http.Response.make(500, json.dumps(error_body("api_error", "metrion proxy error")))
        try:
            if self.ops.answer_probe(flow):  # exactly GET|HEAD / and /-/health: answered here, never recorded
                return
            self._admit(flow)
        except Exception:
            log.exception("metrion: error while checking a request; it was refused, not forwarded")
            p = self._pending.get(flow.id) or self._track(flow)
            self._answer(
                flow,
                p,
                500,
                "api_error",
                "internal error in the metrion proxy; the request was not forwarded",
                record_as="metrion_internal_error",
            )

    def _track(self, flow: http.HTTPFlow) -> Pending:
        req = flow.request
        p = Pending(started=req.timestamp_start + self._shift(), method=clean_label(req.method) or "?", path="?")
        self._pending[flow.id] = p
        self._client_of[flow.id] = flow.client_conn.id
        return p

    def _admit(self, flow: http.HTTPFlow) -> None:
        assert self.auth is not None and self.config is not None
        req = flow.request
        p = self._track(flow)
        flow.metadata[CLIENT_PATH] = req.path  # as the client sent it (for the batch results_url rewrite)
        req.path = upstream_path(req.path, self.config.path_prefix)
        p.path = clean_label(req.path.partition("?")[0]) or "/"
        p.client = clean_label(req.headers.get("user-agent"))
        p.session_id = clean_label(req.headers.get("x-claude-code-session-id"))
        p.user = clean_label(asserted_user := req.headers.get(USER_HEADER))
        if ops.reserved(p.path):
            msg = f"{p.path[:64]!r}: paths under {ops.RESERVED_PREFIX} are the proxy's own (see {ops.HEALTH_PATH})"
            self._answer(flow, p, 404, "not_found_error", msg)
            return
        p.retry_count, p.request_key = record.attempt_headers(req.headers)

        bad = malformed_headers(req.headers)
        decision = self.auth.authenticate(req.headers) if bad is None else AuthError(bad[2], bad[0], bad[1])
        for name in [n for n in req.headers if n.lower().startswith(METRION_HEADER_PREFIX)]:
            del req.headers[name]
        if isinstance(decision, AuthError):
            self._answer(flow, p, decision.status, decision.error_type, decision.message)
            return
        p.account, p.mode = decision.account.name, decision.mode
        p.user, refusal = user_for(decision.user, asserted_user, self.config.bound_user_header)
        if refusal is not None:
            return self._refuse(flow, p, refusal)
        if not self._within_limits(flow, p):
            return
        for name in decision.remove_headers:
            req.headers.pop(name, None)
        for name in {n for n, v in req.headers.items(multi=True) if decision.proxy_token and decision.proxy_token in v}:
            del req.headers[name]  # a client that copied its proxy token into another header: it stays here
        for name, value in decision.set_headers.items():
            req.headers[name] = value
        flow.response = None  # admitted

    def request(self, flow: http.HTTPFlow) -> None:
        """The body has been read (unless mitmproxy streams it): the model, and the unknown-model policy."""
        p = self._pending.get(flow.id)
        if p is None or flow.request.stream:
            return
        try:
            raw = flow.request.raw_content or b""
            body = request_json(raw, flow.request.headers.get("content-type", ""))  # parsed once, used twice
            p.model = model_of(body)
            if p.local_error is not None or flow.response is not None:
                return  # refused already; the model is only for the record
            assert self.config is not None and self.pricer is not None and self.gate is not None
            if self.config.budgets.block_unknown_models and p.model and not self.pricer.knows(p.model, p.started):
                msg = f"model {p.model!r} has no known price, and this metrion proxy refuses unpriced models"
                self._answer(flow, p, 403, "permission_error", msg, record_as="unknown_model_blocked")
                return
            if p.account is not None:
                refusal, headers = self.gate.at_body(
                    id(p), p.account, p.user, p.path, p.started, len(raw), body, p.method
                )
                if refusal is not None:
                    self._refuse(flow, p, refusal)
                elif headers is not None:
                    flow.metadata["metrion_budget_headers"] = headers
        except Exception:
            log.exception("metrion: error while reading a request body; it was refused, not forwarded")
            self._answer(
                flow,
                p,
                500,
                "api_error",
                "internal error in the metrion proxy; the request was not forwarded",
                record_as="metrion_internal_error",
            )

    def _within_limits(self, flow: http.HTTPFlow, p: Pending) -> bool:
        """Budgets, checked before anything is forwarded."""
        assert self.config is not None and self.budgets is not None and p.account is not None
        if self.config.budgets.block_unknown_models and flow.request.stream:
            msg = (
                "this metrion proxy refuses unpriced models, and reads the model from the body before "
                "forwarding: this body is over stream_large_bodies, so its model cannot be checked"
            )
            self._answer(flow, p, 413, "request_too_large", msg, record_as="unknown_model_blocked")
            return False
        assert self.gate is not None
        req = flow.request
        refusal, headers = self.gate.at_headers(
            id(p), p.account, p.user, p.path, p.started, bool(req.stream), req.headers.get("content-length"), p.method
        )
        if refusal is not None:
            self._refuse(flow, p, refusal)
            return False
        flow.metadata["metrion_budget_headers"] = headers
        return True

    def _refuse(self, flow: http.HTTPFlow, p: Pending, r: Refusal) -> None:
        self._answer(flow, p, r.status, r.error_type, r.message, record_as=r.record_as, retry_after=r.retry_after)

    def _shift(self) -> float:  # metrion_test_clock only: how far the test clock is from the real one
        return self.gate.shift() if self.gate is not None else 0.0

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
        """Answer locally in Anthropic's error shape; the upstream is never contacted.

        A body that mitmproxy streams, or that is large or of unknown size, is not read for a refusal: the
        connection is closed instead (the `error` hook records the request).
        """
        p.local_error, p.local_message = record_as or error_type, message
        headers = {"content-type": "application/json"}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        flow.response = http.Response.make(status, json.dumps(error_body(error_type, message)), headers)
        if flow.request.data.content is None and _large_or_unknown_body(flow.request):
            p.local_message = f"{message} (body not read: connection closed)"
            flow.kill()

    # -- response side -----------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        p = self._pending.get(flow.id)
        if p is None or p.local_error is not None or flow.response is None:
            return
        resp = flow.response
        p.status, p.request_id, p.headers_at = resp.status_code, resp.headers.get("request-id"), resp.timestamp_start
        resp.headers.update(flow.metadata.get("metrion_budget_headers", {}))
        p.facts = facts_for(p.method, p.path) or p.facts  # an endpoint with its own wire format
        ctype = resp.headers.get("content-type", "").lower()
        encoding = resp.headers.get("content-encoding")
        tap = self.batches.results_tap(p, resp.status_code, encoding) if self.batches is not None else None
        if tap is not None:
            pass  # batch results (JSONL): read line by line, never buffered
        elif ctype.startswith("text/event-stream"):
            p.streamed = True
            tap = StreamTap(p.facts, encoding)
        elif "json" in ctype:
            if resp.stream:  # mitmproxy streams it (stream_large_bodies), or another addon does: read on the side
                tap = JsonTap(p.facts, encoding)
        elif not resp.stream:
            resp.stream = True  # not ours to read (e.g. batch results): pass it straight through
        if tap is not None:
            resp.stream = _chain(resp.stream, tap) if callable(resp.stream) else tap
            p.tap = tap

    def response(self, flow: http.HTTPFlow) -> None:
        redact_credentials(flow.request.headers)  # the request has been sent (or answered locally)
        p = self._pending.pop(flow.id, None)
        self._client_of.pop(flow.id, None)
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
                p.counted_tokens = record.counted_tokens(p.path, resp.status_code, body)
        if p.local_error is None and self.batches is not None:
            self.batches.response(flow, p)  # batch objects: kept, and results_url pointed at this proxy
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
        self._client_of.pop(flow.id, None)
        if p is None:
            return
        msg: str | None = flow.error.msg if flow.error else "unknown error"
        started = flow.response is not None and p.status is not None
        kind: str | None = classify_error(msg or "", started)
        if p.streamed and p.facts.completed:
            kind = msg = None  # the stream had ended (message_stop): a hang-up or shutdown after it cut nothing
        status = p.status
        if flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE:
            status = None  # killed by us: the refusal was not sent (the connection was closed)
        elif status is None:
            status = {
                "upstream_unreachable": 502,
                "upstream_timeout": 502,
                "proxy_error": 502,
                "request_too_large": 413,
            }.get(kind)  # what mitmproxy answered the client
        self._record(
            flow,
            p,
            status=status,
            headers_at=p.headers_at,
            ended_at=time.time(),
            error=kind,
            error_message=msg,
        )

    def _record(self, flow: http.HTTPFlow, p: Pending, **kw) -> None:  # type: ignore[no-untyped-def]
        if self.batches is not None:
            self.batches.fetch_ended(p)
        request_id = flow.response.headers.get("request-id") if flow.response is not None else None
        self._store(p, request_id=request_id, **kw)

    def _store(self, p: Pending, **kw) -> None:  # type: ignore[no-untyped-def]
        """Build the row, queue it for the writer, and count its cost toward budgets."""
        if self.pricer is None or self.store is None:
            return
        if shift := self._shift():
            kw["ended_at"] += shift
            kw["headers_at"] = kw["headers_at"] + shift if kw.get("headers_at") is not None else None
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
        if self.gate is not None:  # the real cost replaces the reservation (the ticket: id(p), alive till now)
            self.gate.settle_row(id(p), row, p.started)
        self.store.put(row)
        self.ops.observe(row)  # metrics and the request log, on the observer thread


def _large_or_unknown_body(req: http.Request) -> bool:
    if req.stream:
        return True
    length = req.headers.get("content-length")
    if length is None:
        return "chunked" in req.headers.get("transfer-encoding", "").lower()
    try:
        return int(length) > REFUSAL_BODY_MAX
    except ValueError:
        return True
