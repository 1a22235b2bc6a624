"""HeaderView answers exactly as mitmproxy's Headers, for any fields (raw bytes, case variants, repeats)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from metrion_addon.headerview import HeaderView

NAMES = ["x-api-key", "X-Api-Key", "authorization", "AUTHORIZATION", "x-metrion-token", "trailer", "x-metrion-user",
         "user-agent", "x-stainless-retry-count", "idempotency-key", "x-\u00e4", "\u00c4"]  # fmt: skip
raw_name = st.one_of(st.sampled_from(NAMES).map(lambda n: n.encode()), st.binary(min_size=1, max_size=8))
fields = st.lists(st.tuples(raw_name, st.binary(max_size=12)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(fields=fields, probe=st.sampled_from([*NAMES, "absent"]))
def test_the_view_answers_as_headers_do(fields: list[tuple[bytes, bytes]], probe: str) -> None:
    headers, view = http.Headers(fields), HeaderView(fields)
    assert view.get(probe) == headers.get(probe)
    assert view.get(probe, "d") == headers.get(probe, "d")
    assert view.get_all(probe) == headers.get_all(probe)
    assert (probe in view) == (probe in headers)
    assert list(view.items(multi=True)) == list(headers.items(multi=True))
