"""mitmproxy's own error responses (upstream unreachable, timeout, body too large) in Anthropic's JSON shape.

When mitmproxy itself must answer (it could not connect upstream, the request body is over `body_size_limit`,
the request was malformed), it writes an HTML page from its HTTP/1 and HTTP/2 layers before any addon hook can
change it. Anthropic clients expect `{"type":"error","error":{...}}`: the SDKs show the HTML as an unreadable
error and Claude Code prints it raw. No hook or option changes that page, so this replaces the one function per
layer that builds it (same signature, same status, same `Connection: close`), once, when the addon loads. The
request is still recorded by the addon's `error` hook. Checked against mitmproxy 12 (pinned `<13`); a test
asserts the JSON answer, so an upgrade that moves these functions fails loudly instead of silently.
"""

from __future__ import annotations

import json

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2

ERROR_TYPES = {400: "invalid_request_error", 413: "request_too_large", 502: "api_error", 504: "api_error"}


def error_json(status: int, message: str) -> bytes:
    error_type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": error_type, "message": f"metrion proxy: {message}"}}
    return json.dumps(body).encode()


def _http1_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(
        status_code,
        error_json(status_code, message),
        http.Headers(Server=version.MITMPROXY, Connection="close", Content_Type="application/json"),
    )
    return http1.assemble_response(resp)


def _http2_format_error(status_code: int, message: str) -> bytes:
    return error_json(status_code, message)  # HTTP/2 keeps mitmproxy's content-type header (text/html)


def install() -> None:
    """Idempotent: point mitmproxy's error-page builders at the JSON ones."""
    _http1.make_error_response = _http1_error_response
    _http2.format_error = _http2_format_error
