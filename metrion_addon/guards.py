"""What the request hook checks and answers before a request is admitted (addon.py wires them).

- `placeholder_refusal`: the local error answer every request carries until every check has passed, so that an
  exception anywhere leaves a refusal in place, never a forwarded request.
- `malformed_headers`: headers no request may carry (obs-fold, trailers, credentials that are not printable
  ASCII).
- `redact_credentials`: credential headers masked on the flow once the request has gone upstream.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http

from metrion_addon.auth import error_body
from metrion_addon.headerview import HeaderView
from metrion_addon.text import REDACTED, is_clean_token

# Request headers that carry credentials. They are masked on the flow once the request has gone upstream, so
# that nothing which prints or saves flows later (mitmdump's flow_detail >= 2, `-w`) can show them.
CREDENTIAL_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "x-metrion-token", "cookie")
_CREDENTIALS = frozenset(name.encode() for name in CREDENTIAL_HEADERS)
_REDACTED = REDACTED.encode()


def redact_credentials(headers: http.Headers) -> None:
    """Mask every credential header's value, in one pass over the fields (3 µs; a lookup per name cost 12)."""
    fields = headers.fields
    for name, _ in fields:
        if name.lower() in _CREDENTIALS:
            headers.fields = tuple((n, _REDACTED) if n.lower() in _CREDENTIALS else (n, v) for n, v in fields)
            return


# The answer every request carries until it is admitted (see the module's docstring), made for every request:
# a copy of a template's data (2 µs). Response.make parses a dict of headers and runs the body through its
# encoder, and Response() type-checks each field of its data (56 and 21 µs). test_addon_hooks compares the copy
# with a Response built the documented way, so a mitmproxy that changes Response's layout fails loudly.
_PLACEHOLDER_BODY = json.dumps(error_body("api_error", "metrion proxy error")).encode()
_PLACEHOLDER_FIELDS = ((b"content-type", b"application/json"), (b"content-length", b"%d" % len(_PLACEHOLDER_BODY)))
_PLACEHOLDER_DATA = vars(
    http.Response(b"HTTP/1.1", 500, b"Internal Server Error", _PLACEHOLDER_FIELDS, _PLACEHOLDER_BODY, None, 0, 0).data
)


def placeholder_refusal() -> http.Response:
    data = object.__new__(http.ResponseData)
    vars(data).update(_PLACEHOLDER_DATA)
    data.headers = http.Headers(_PLACEHOLDER_FIELDS)  # its own: a flow may change its response's headers
    data.timestamp_start = data.timestamp_end = time.time()
    response = object.__new__(http.Response)
    response.data = data
    return response


def malformed_headers(headers: http.Headers | HeaderView) -> tuple[int, str, str] | None:
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
