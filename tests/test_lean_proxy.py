"""`metrion-proxy`'s lean mitmproxy master, end to end: the official SDK through it, an HTTPS upstream, HTTP/2
clients over TLS, graceful shutdown, and options of addons it does not load refused with a clear message."""

from __future__ import annotations

import ipaddress
import json
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs

from tests.conftest import BIN, MANAGED_TOKEN, REAL_KEY, Proxy, config_text, free_port, wait_port
from tests.fake_upstream import FakeUpstream
from tests.netutil import stop_process
from tests.test_ops import until

MODEL = "claude-sonnet-5-5"


def start_lean(tmp: Path, upstream: str, *extra: str) -> Proxy:
    db = tmp / "metrion.db"
    cfg = tmp / "config.yaml"
    cfg.write_text(config_text(db).replace("upstream: http://127.0.0.1:1", f"upstream: {upstream}"))
    port = free_port()
    log = tmp / "proxy.log"
    cmd = [str(BIN / "metrion-proxy"), "-c", str(cfg), "--listen-port", str(port), "--", "--set", f"confdir={tmp}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *extra], stdout=out, stderr=subprocess.STDOUT, env={"METRION_TEST_REAL_KEY": REAL_KEY}, cwd=tmp
        )
    try:
        wait_port(port, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"metrion-proxy did not start:\n{log.read_text()}") from None
    return Proxy(url=f"http://127.0.0.1:{port}", port=port, db=db, log=log, proc=proc)


@pytest.fixture(scope="module")
def lean(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_lean(tmp_path_factory.mktemp("lean"), fake.url)
    yield p
    stop_process(p.proc)


def logged(proxy: Proxy, fragment: str, n: int) -> list[str]:
    lines = [line for line in proxy.log.read_text(errors="replace").splitlines() if fragment in line]
    return lines if len(lines) >= n else []


def test_sdk_through_the_lean_proxy(lean: Proxy, fake: FakeUpstream) -> None:
    client = anthropic.Anthropic(base_url=lean.url, api_key=MANAGED_TOKEN, default_headers={"x-metrion-user": "lean"})
    msg = client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with client.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    rows = lean.wait_rows("user = 'lean'", n=2)
    # one log line per request, written on the accounting thread (TermLog; mitmproxy's add_log relay is removed)
    lines = until(lambda: logged(lean, "metrion: acme/lean POST /v1/messages", 2), what="two request log lines")
    assert len(lines) == 2
    assert [(r["stream"], r["completed"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (0, 1, 25, 12),
        (1, 1, 25, 12),
    ]
    assert rows[0]["message_id"] == msg.id and rows[1]["message_id"] == final.id
    sent = fake.received[rows[0]["request_id"]].headers
    assert sent["x-api-key"] == REAL_KEY and not any(k.startswith("x-metrion-") for k in sent)


@pytest.mark.parametrize("offer_h2", [False, True], ids=["http1-client", "h2-capable-client"])
def test_tls_clients_with_keep_alive(lean: Proxy, offer_h2: bool) -> None:
    """mitmproxy terminates TLS from clients that start it and picks the protocol by ALPN: the fake upstream
    speaks HTTP/1.1 only, so an HTTP/2-capable client is answered over HTTP/1.1, as bare mitmdump does (neither
    supports HTTP/2 with prior knowledge on cleartext). Two requests share each connection."""
    url = lean.url.replace("http://", "https://") + "/v1/messages"
    body = {"model": MODEL, "max_tokens": 5, "messages": []}
    label = f"tls-client-{offer_h2}"
    with httpx.Client(http2=offer_h2, verify=False, timeout=30) as c:
        responses = [
            c.post(url, json=body, headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": label}) for _ in "ab"
        ]
    assert [r.status_code for r in responses] == [200, 200]
    assert len(lean.wait_rows("user = ?", (label.casefold(),), n=2)) == 2  # labels are stored case-folded


@pytest.fixture(scope="module")
def tls_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    tmp = tmp_path_factory.mktemp("tls")
    entry = certs.CertStore.from_store(tmp, "fake-ca", 2048).get_cert(
        "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    (tmp / "cert.pem").write_bytes(entry.cert.to_pem())
    key = entry.privatekey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    (tmp / "key.pem").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    f = FakeUpstream()
    f.server.socket = ctx.wrap_socket(f.server.socket, server_side=True)
    f.url = f.url.replace("http://", "https://")
    f.start()
    yield f
    f.stop()


def test_https_upstream(tls_fake: FakeUpstream, tmp_path: Path) -> None:
    p = start_lean(tmp_path, tls_fake.url, "--set", "ssl_insecure=true")  # the fake's certificate is self-signed
    try:
        r = httpx.post(
            p.url + "/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": []},
            headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "tls"},
            timeout=30,
        )
        assert r.status_code == 200
        assert tls_fake.received[r.headers["request-id"]].headers["x-api-key"] == REAL_KEY
        assert p.wait_rows("user = 'tls'")[0]["input_tokens"] == 25
    finally:
        stop_process(p.proc)


def test_sigterm_flushes_and_exits_cleanly(fake: FakeUpstream, tmp_path: Path) -> None:
    p = start_lean(tmp_path, fake.url)
    for _ in range(20):
        httpx.post(
            p.url + "/v1/messages",
            content=json.dumps({"model": MODEL, "max_tokens": 5, "messages": []}),
            headers={"x-api-key": MANAGED_TOKEN, "x-metrion-user": "term"},
            timeout=30,
        )
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(30) == 0
    assert len(p.rows("user = 'term'")) == 20


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--set", "flow_detail=2"), "unknown option(s) flow_detail"),
        (("--set", "save_stream_file=x"), "unknown option(s) save_stream_file"),
        (("-s", "script.py"), "'-s' is not supported here"),
    ],
)
def test_options_of_addons_not_loaded_are_refused(tmp_path: Path, extra: tuple[str, ...], fragment: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(tmp_path / "m.db"))
    r = subprocess.run(
        [str(BIN / "metrion-proxy"), "-c", str(cfg), "--listen-port", str(free_port()), "--", *extra],
        capture_output=True,
        text=True,
        env={"METRION_TEST_REAL_KEY": REAL_KEY},
        timeout=60,
    )
    assert r.returncode == 2
    assert fragment in r.stderr and "metrion-proxy --full" in r.stderr
    assert "listening" not in r.stderr


def test_the_lean_master_has_no_add_log_relay_and_keeps_its_log() -> None:
    """mitmproxy's Master relays every log record to the deprecated `add_log` hook through the event loop; the
    lean master removes that handler (no addon it loads implements the hook), and only that one."""
    import logging

    from mitmproxy import log
    from mitmproxy.addons.termlog import TermLogHandler

    from metrion_addon.proxy import without_legacy_log_events

    root = logging.getLogger()
    relay, term = log.LegacyLogEvents(master=None), TermLogHandler()  # type: ignore[arg-type]
    relay.install()
    term.install()
    try:
        without_legacy_log_events()
        assert relay not in root.handlers and term in root.handlers
        assert not any(isinstance(h, log.LegacyLogEvents) for h in root.handlers)
    finally:
        root.removeHandler(relay)
        term.uninstall()
