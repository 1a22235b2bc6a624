"""The mitmproxy addon: wires mitmproxy's hooks to config, auth, usage, pricing and the store.

Fail closed: everything that decides whether a request may go upstream runs in `requestheaders`, before any
byte of it is forwarded (with `stream_large_bodies`, the body goes upstream before the `request` hook). Until
every check has passed, the flow carries a local error answer, so an exception anywhere in our code (which
mitmproxy would log and otherwise ignore, forwarding the flow as it was) ends in a refusal, never a bypass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from mitmproxy import connection, ctx, exceptions, http

from metrion_addon import logrelay, mitm_errors, ops, record
from metrion_addon.accountant import Finished, account
from metrion_addon.admission import Refusal, user_for
from metrion_addon.auth import METRION_HEADER_PREFIX, USER_HEADER, AuthError, error_body
from metrion_addon.batch_hooks import CLIENT_PATH
from metrion_addon.config import ConfigError, load_config
from metrion_addon.guards import malformed_headers, placeholder_refusal, redact_credentials
from metrion_addon.headerview import HeaderView
from metrion_addon.openai_compat import facts_for
from metrion_addon.record import Pending, clean_label, model_of, request_json, request_model, upstream_path
from metrion_addon.reqtap import RequestTap
from metrion_addon.runtime import Runtime, StartError
from metrion_addon.store import store_name
from metrion_addon.usage import JsonTap, StreamTap

log = logging.getLogger(__name__)

# A refused request is answered after mitmproxy has read its body. Bodies larger than this (or of unknown size,
# or that mitmproxy streams) are not read for a refusal: the connection is closed instead, so that nobody
# without a token can make the proxy buffer hundreds of MB.
REFUSAL_BODY_MAX = 4 * 1024 * 1024
# Anthropic's own request limit is 32 MB for Messages and 256 MB for Message Batches: the default
# `body_size_limit` when the user sets none (mitmproxy then refuses larger bodies before reading them).
DEFAULT_BODY_SIZE_LIMIT = "256m"
# Request bodies at least this large go upstream as they arrive (reqtap.py reads the model on the side), unless
# something must read the whole body before forwarding: a hard budget's estimate, or the unknown-model refusal.
STREAM_BODY_MIN = 16 * 1024
# The endpoints whose body names a model and nothing else the proxy reads (a batch create's is read whole).
STREAMED_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions"})
# The addon's options that the runtime is built from: a change to any of them rebuilds it.
RUNTIME_OPTIONS = frozenset(
    {"metrion_config", "metrion_max_backlog", "metrion_test_clock", "metrion_batch_poll_seconds"}
)


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
        self.rt: Runtime | None = None  # None until a config is loaded (and then every request is refused)
        self._pending: dict[str, Pending] = {}
        self._client_of: dict[str, str] = {}  # flow id -> client connection id, for flows mitmproxy drops
        self.ops = ops.Service()  # health, probes, metrics, request logs
        self._relay: logrelay.LoopRelay | None = None  # with mitmdump's flow lines: our lines printed on the loop

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
        if not updated & RUNTIME_OPTIONS:
            return
        if not ctx.options.metrion_config:
            raise exceptions.OptionsError("metrion: set the config file with --set metrion_config=PATH")
        try:
            config = load_config(ctx.options.metrion_config)
        except ConfigError as e:
            raise exceptions.OptionsError(f"metrion: {e}") from None
        if self.rt is not None:  # closed first: its writer flushes, so the new budgets are seeded from every row
            self.rt.close()
            self.rt = None
        try:
            self.rt = Runtime.open(config, ctx.options, self.ops)
        except StartError as e:
            raise exceptions.OptionsError(f"metrion: {e}") from None
        log.info(
            "metrion: %d account(s) from %s, recording to %s", len(config.accounts), config.path, store_name(config)
        )

    def running(self) -> None:
        if ctx.master.addons.get("dumper") is not None and self._relay is None:
            self._relay = logrelay.install(asyncio.get_running_loop())
        if self.rt is not None:
            self.rt.batches.running()

    def done(self) -> None:
        if self._pending:
            # Requests still in flight at shutdown get no response/error hook: record what is known of them.
            # A stream whose end (message_stop) had already passed through is complete, not cut off.
            cut = sum(not p.facts.completed for p in self._pending.values())
            log.warning(
                "metrion: %d request(s) in flight at shutdown, %d cut off (proxy_shutdown)", len(self._pending), cut
            )
            for p in self._pending.values():
                error = None if p.facts.completed else "proxy_shutdown"
                self._store(p, p.status, p.request_id, p.headers_at, time.time(), error)
            self._pending.clear()
        if self.rt is not None:
            self.rt.close()
            self.rt = None
        self.ops.close()
        if self._relay is not None:
            logrelay.uninstall(self._relay)
            self._relay = None

    def client_disconnected(self, client: connection.Client) -> None:
        """Flows of this client that got neither `response` nor `error`: mitmproxy gave up on the connection
        (for example on HTTP/1 request trailers, which it cannot parse). They still leave their row."""
        orphans = [fid for fid, cid in self._client_of.items() if cid == client.id]
        for fid in orphans:
            del self._client_of[fid]
            p = self._pending.pop(fid, None)
            if p is not None:
                msg = "the proxy could not process this request (malformed HTTP); the connection was closed"
                self._store(p, None, None, None, time.time(), p.local_error or "client_protocol_error", msg)

    # -- request side ------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # another addon answered it
        # Refused until admitted: if anything below raises, this answer stands and nothing goes upstream.
        flow.response = placeholder_refusal()
        if self.rt is None:  # no config loaded (a reload failed): nothing can be checked, so nothing passes
            flow.response = http.Response.make(503, json.dumps(error_body("api_error", "metrion proxy: no config")))
            return
        try:
            if self.ops.answer_probe(flow):  # exactly GET|HEAD / and /-/health: answered here, never recorded
                return
            self._admit(flow, self.rt)
        except Exception:
            log.exception("metrion: error while checking a request; it was refused, not forwarded")
            self._refuse_internal(flow, self._pending.get(flow.id) or self._track(flow))

    def _refuse_internal(self, flow: http.HTTPFlow, p: Pending) -> None:
        msg = "internal error in the metrion proxy; the request was not forwarded"
        self._answer(flow, p, 500, "api_error", msg, record_as="metrion_internal_error")

    def _track(self, flow: http.HTTPFlow) -> Pending:
        req = flow.request
        p = Pending(started=req.timestamp_start + self._shift(), method=clean_label(req.method) or "?", path="?")
        self._pending[flow.id] = p
        self._client_of[flow.id] = flow.client_conn.id
        return p

    def _admit(self, flow: http.HTTPFlow, rt: Runtime) -> None:
        req = flow.request
        p = self._track(flow)
        flow.metadata[CLIENT_PATH] = req.path  # as the client sent it (for the batch results_url rewrite)
        req.path = upstream_path(req.path, rt.config.path_prefix)
        p.path = clean_label(req.path.partition("?")[0]) or "/"
        headers = HeaderView(req.headers.fields)  # as the client sent them: every read below, one index
        p.client = clean_label(headers.get("user-agent"))
        p.session_id = clean_label(headers.get("x-claude-code-session-id"))
        p.user = clean_label(asserted_user := headers.get(USER_HEADER))
        if ops.reserved(p.path):
            msg = f"{p.path[:64]!r}: paths under {ops.RESERVED_PREFIX} are the proxy's own (see {ops.HEALTH_PATH})"
            self._answer(flow, p, 404, "not_found_error", msg)
            return
        p.retry_count, p.request_key = record.attempt_headers(headers)

        bad = malformed_headers(headers)
        decision = rt.auth.authenticate(headers) if bad is None else AuthError(bad[2], bad[0], bad[1])
        for name in [n for n in req.headers if n.lower().startswith(METRION_HEADER_PREFIX)]:
            del req.headers[name]
        if isinstance(decision, AuthError):
            self._answer(flow, p, decision.status, decision.error_type, decision.message)
            return
        p.account, p.mode = decision.account.name, decision.mode
        p.user, refusal = user_for(decision.user, asserted_user, rt.config.bound_user_header)
        if refusal is not None:
            return self._refuse(flow, p, refusal)
        if not self._within_limits(flow, p, rt):
            return
        for name in decision.remove_headers:
            req.headers.pop(name, None)
        for name in {n for n, v in req.headers.items(multi=True) if decision.proxy_token and decision.proxy_token in v}:
            del req.headers[name]  # a client that copied its proxy token into another header: it stays here
        for name, value in decision.set_headers.items():
            req.headers[name] = value
        if _streams_body(req, p, rt):  # last: nothing refuses the request after this
            p.body_tap = req.stream = RequestTap(req.headers.get("content-type", ""))
        flow.response = None  # admitted

    def request(self, flow: http.HTTPFlow) -> None:
        """The body has been read (unless mitmproxy streams it): the model, and the unknown-model policy."""
        p = self._pending.get(flow.id)
        if p is None or flow.request.stream or self.rt is None:
            return
        rt = self.rt
        try:
            raw = flow.request.raw_content or b""
            ctype = flow.request.headers.get("content-type", "")
            if rt.gate.reads_body(p.method, p.path, p.account, p.user):
                body = request_json(raw, ctype)  # parsed once: the model and the budget estimate read it
                p.model = model_of(body)
            else:  # the model alone (record.request_model): the rest is not built as Python objects
                body = None
                p.model = request_model(raw, ctype)
            if p.local_error is not None or flow.response is not None:
                return  # refused already; the model is only for the record
            if rt.config.budgets.block_unknown_models and p.model and not rt.pricer.knows(p.model, p.started):
                msg = f"model {p.model!r} has no known price, and this metrion proxy refuses unpriced models"
                self._answer(flow, p, 403, "permission_error", msg, record_as="unknown_model_blocked")
                return
            if p.account is not None:
                refusal, headers = rt.gate.at_body(
                    id(p), p.account, p.user, p.path, p.started, len(raw), body, p.method
                )
                if refusal is not None:
                    self._refuse(flow, p, refusal)
                elif headers is not None:
                    flow.metadata["metrion_budget_headers"] = headers
        except Exception:
            log.exception("metrion: error while reading a request body; it was refused, not forwarded")
            self._refuse_internal(flow, p)

    def _within_limits(self, flow: http.HTTPFlow, p: Pending, rt: Runtime) -> bool:
        """Budgets, checked before anything is forwarded."""
        assert p.account is not None
        if rt.config.budgets.block_unknown_models and flow.request.stream:
            msg = (
                "this metrion proxy refuses unpriced models, and reads the model from the body before "
                "forwarding: this body is over stream_large_bodies, so its model cannot be checked"
            )
            self._answer(flow, p, 413, "request_too_large", msg, record_as="unknown_model_blocked")
            return False
        req = flow.request
        refusal, headers = rt.gate.at_headers(
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
        return self.rt.gate.shift() if self.rt is not None else 0.0

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
        tap = self.rt.batches.results_tap(p, resp.status_code, encoding) if self.rt is not None else None
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
        body = None  # a buffered answer: read (usage, count_tokens' count) on the accounting side, off the loop
        if not p.streamed and p.local_error is None and resp.stream is False:
            body = resp.raw_content or None  # as received: batches.response may rewrite what the client gets
        if p.local_error is None and self.rt is not None:
            self.rt.batches.response(flow, p)  # batch objects: kept, and results_url pointed at this proxy
        ended = resp.timestamp_end or time.time()
        encoding = resp.headers.get("content-encoding") if body else None
        self._record(flow, p, resp.status_code, resp.timestamp_start, ended, body=body, encoding=encoding)

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
        self._record(flow, p, status, p.headers_at, time.time(), kind, msg)

    def _record(
        self,
        flow: http.HTTPFlow,
        p: Pending,
        status: int | None,
        headers_at: float | None,
        ended_at: float,
        error: str | None = None,
        error_message: str | None = None,
        body: bytes | None = None,
        encoding: str | None = None,
    ) -> None:
        if self.rt is not None:
            self.rt.batches.fetch_ended(p)
        request_id = flow.response.headers.get("request-id") if flow.response is not None else None
        self._store(p, status, request_id, headers_at, ended_at, error, error_message, body, encoding)

    def _store(
        self,
        p: Pending,
        status: int | None,
        request_id: str | None,
        headers_at: float | None,
        ended_at: float,
        error: str | None = None,
        error_message: str | None = None,
        body: bytes | None = None,
        encoding: str | None = None,
    ) -> None:
        """Hand the request over for its row (accountant.py). Under a budget the row is built here, on the loop:
        its real cost replaces its reservation before the client sees the end of the answer (mitmproxy sends the
        last bytes after this hook), so a client's next request is checked against what this one cost. Elsewhere
        usage, price and row are made on the accounting thread."""
        rt = self.rt
        if rt is None:
            return
        if shift := self._shift():
            ended_at += shift
            headers_at = headers_at + shift if headers_at is not None else None
        job = Finished(p, status, request_id, headers_at, ended_at, error, error_message, body, encoding)
        if p.account is not None and rt.budgets.applies(p.account, p.user):
            row = account(job, rt.pricer)
            rt.gate.settle_row(id(p), row, p.started)  # the real cost replaces the reservation (id(p): alive)
            rt.accountant.submit(row)
        else:
            rt.accountant.submit(job)


def _streams_body(req: http.Request, p: Pending, rt: Runtime) -> bool:
    """Whether an admitted request's body goes upstream as it arrives, its model read on the side (reqtap.py).
    Only with a Content-Length (mitmproxy has checked it against body_size_limit), and only where nothing needs
    the whole body before forwarding."""
    if req.stream is True:  # mitmproxy streams it anyway (over stream_large_bodies): the model is read too
        return True
    if req.stream or p.method != "POST" or p.path not in STREAMED_PATHS or "transfer-encoding" in req.headers:
        return False
    if rt.config.budgets.block_unknown_models or rt.gate.reads_body(p.method, p.path, p.account, p.user):
        return False
    length = req.headers.get("content-length", "")
    return length.isascii() and length.isdigit() and int(length) >= STREAM_BODY_MIN


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
