"""Message Batches through a real mitmdump, driven by the official `anthropic` SDK against the fake upstream:
create is recorded, `results_url` points at the proxy, results are read line by line as they stream to the
client and become one row per result, priced at batch rates, charged to the batch's creator, exactly once."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from metrion_addon import report as metrion_report
from tests.conftest import MANAGED_TOKEN, PASS_TOKEN, Proxy, proc_rss_mb, start_proxy, stop_proxy
from tests.fake_upstream import FakeUpstream

MODEL = "claude-sonnet-5-5"
SONNET_5_5 = (2, 10, 2.5, 4, 0.1)  # USD per MTok: input, output, 5m write, 1h write, read


def batch_cost(inp: int, out: int, w5: int = 0, rd: int = 0) -> float:
    r = SONNET_5_5
    return (inp * r[0] + out * r[1] + w5 * r[2] + rd * r[4]) / 2 / 1e6


def sdk(proxy: Proxy, user: str, prefix: str = "", **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.url + prefix,
        api_key=MANAGED_TOKEN,
        max_retries=0,
        default_headers={"x-metrion-user": user, **headers},
    )


def req(custom_id: str, inp: int = 100, out: int = 20, **usage: int) -> dict:
    u = {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    u.update(usage)
    params = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "fake_usage": u}
    return {"custom_id": custom_id, "params": params}


FOUR = [req("ok-1", 1000, 200), req("errored-2"), req("canceled-3"), req("expired-4")]


def batch_table(proxy: Proxy, batch_id: str) -> dict:
    conn = sqlite3.connect(f"file:{proxy.db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())
    finally:
        conn.close()


def results(client: anthropic.Anthropic, batch_id: str) -> list:
    return list(client.messages.batches.results(batch_id))


def test_create_results_url_and_four_result_types(proxy: Proxy, fake: FakeUpstream) -> None:
    creator = sdk(proxy, "creator")
    created = creator.messages.batches.with_raw_response.create(requests=FOUR)  # type: ignore[arg-type]
    batch = created.parse()
    create_row = proxy.row(created.headers["request-id"])
    assert (create_row["path"], create_row["cost_usd"], create_row["batch_id"]) == ("/v1/messages/batches", 0, None)
    got = creator.messages.batches.retrieve(batch.id)
    assert got.processing_status == "ended"
    assert got.results_url == f"{proxy.url}/v1/messages/batches/{batch.id}/results"  # the proxy, not upstream
    assert all(b.results_url is None or b.results_url.startswith(proxy.url) for b in creator.messages.batches.list())

    fetcher = sdk(proxy, "someone-else")  # results are charged to the batch's creator
    out = results(fetcher, batch.id)
    assert [r.result.type for r in out] == ["succeeded", "errored", "canceled", "expired"]
    rows = proxy.wait_rows("batch_id = ?", (batch.id,), n=4)
    by = {r["custom_id"]: r for r in rows}
    ok = by["ok-1"]
    assert (ok["account"], ok["user"], ok["mode"], ok["batch_result"]) == ("acme", "creator", "managed", "succeeded")
    assert (ok["input_tokens"], ok["output_tokens"], ok["service_tier"]) == (1000, 200, "batch")
    assert ok["cost_usd"] == pytest.approx(batch_cost(1000, 200), abs=1e-12)
    assert ok["price_source"].endswith("+batch") and ok["completed"] == 1
    for cid, kind in (("errored-2", "errored"), ("canceled-3", "canceled"), ("expired-4", "expired")):
        r = by[cid]
        assert (r["batch_result"], r["cost_usd"], r["price_source"], r["error"]) == (
            kind,
            0,
            f"not_billed:{kind}",
            f"batch_{kind}",
        )
        assert (r["account"], r["user"], r["input_tokens"]) == ("acme", "creator", None)
    meta = batch_table(proxy, batch.id)
    assert (meta["account"], meta["user"], meta["request_count"], meta["models"]) == (
        "acme",
        "creator",
        4,
        f'["{MODEL}"]',
    )
    assert meta["upstream_results_url"].startswith(fake.url)

    results(fetcher, batch.id)  # a second download: nothing is counted twice
    sentinel = creator.messages.batches.create(requests=[req("sentinel")])  # type: ignore[arg-type]
    creator.messages.batches.retrieve(sentinel.id)
    results(creator, sentinel.id)
    proxy.wait_rows("batch_id = ?", (sentinel.id,))
    assert len(proxy.rows("batch_id = ?", (batch.id,))) == 4


def test_gzip_results_and_path_prefix(proxy: Proxy, fake: FakeUpstream) -> None:
    c = sdk(proxy, "gz", prefix="/api/proxy", **{"x-fake-encoding": "gzip"})
    batch = c.messages.batches.create(requests=[req("g-1", 300, 30), req("g-2", 5, 5, cache_read_input_tokens=900)])  # type: ignore[list-item]
    got = c.messages.batches.retrieve(batch.id)
    assert got.results_url == f"{proxy.url}/api/proxy/v1/messages/batches/{batch.id}/results"
    assert len(results(c, batch.id)) == 2
    rows = {r["custom_id"]: r for r in proxy.wait_rows("batch_id = ?", (batch.id,), n=2)}
    assert rows["g-1"]["cost_usd"] == pytest.approx(batch_cost(300, 30), abs=1e-12)
    assert rows["g-2"]["cost_usd"] == pytest.approx(batch_cost(5, 5, rd=900), abs=1e-12)
    assert rows["g-2"]["cache_read_input_tokens"] == 900
    url = f"{proxy.url}/api/proxy/v1/messages/batches/{batch.id}/results"
    with httpx.Client(timeout=30) as h, h.stream("GET", url, headers={"x-api-key": MANAGED_TOKEN}) as r:
        wire = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip" and wire == fake.sent[r.headers["request-id"]]  # bytes unchanged


def test_public_url_names_results_behind_a_load_balancer(fake: FakeUpstream, tmp_path: Path) -> None:
    """Behind a load balancer the proxy's own socket is not what clients reach: `public_url` is used instead."""
    public = "https://metrion.example.com/gw"
    proxy = start_proxy(tmp_path, fake.url, extra_config=f"public_url: {public}\n")
    try:
        c = sdk(proxy, "lb")
        batch = c.messages.batches.create(requests=[req("lb-1")])  # type: ignore[list-item]
        assert batch.results_url is None  # not ended yet
        got = c.messages.batches.retrieve(batch.id)
        assert got.results_url == f"{public}/v1/messages/batches/{batch.id}/results"
    finally:
        stop_proxy(proxy)


def test_partial_download_counts_what_it_read_then_completes(proxy: Proxy, fake: FakeUpstream) -> None:
    c = sdk(proxy, "partial")
    reqs = [req(f"p-{i}", 10 + i, 1) for i in range(6)]
    batch = c.messages.batches.create(requests=reqs, extra_headers={"x-fake-cut-results": "2"})  # type: ignore[arg-type]
    c.messages.batches.retrieve(batch.id)
    with pytest.raises(Exception, match="incomplete|closed|chunk"):
        results(c, batch.id)  # the upstream cuts the file after 2 lines
    assert {r["custom_id"] for r in proxy.wait_rows("batch_id = ?", (batch.id,), n=2)} == {"p-0", "p-1"}
    assert len(results(c, batch.id)) == 6
    rows = proxy.wait_rows("batch_id = ?", (batch.id,), n=6)
    assert sorted(r["input_tokens"] for r in rows) == [10, 11, 12, 13, 14, 15]
    assert batch_table(proxy, batch.id)["metered_at"] is not None


def test_passthrough_batch_charged_to_creator(proxy: Proxy, fake: FakeUpstream) -> None:
    c = anthropic.Anthropic(
        base_url=proxy.url,
        api_key="sk-ant-own-key",
        max_retries=0,
        default_headers={"x-metrion-token": PASS_TOKEN, "x-metrion-user": "lab-user"},
    )
    batch = c.messages.batches.create(requests=[req("pt-1", 50, 5)])  # type: ignore[list-item]
    c.messages.batches.retrieve(batch.id)
    results(c, batch.id)
    row = proxy.wait_rows("batch_id = ?", (batch.id,))[0]
    assert (row["account"], row["user"], row["mode"]) == ("labs", "lab-user", "passthrough")


def test_second_proxy_on_same_db_counts_nothing_twice(proxy: Proxy, fake: FakeUpstream, tmp_path: Path) -> None:
    c = sdk(proxy, "twice")
    batch = c.messages.batches.create(requests=[req("t-1"), req("t-2")])  # type: ignore[list-item]
    c.messages.batches.retrieve(batch.id)
    results(c, batch.id)
    proxy.wait_rows("batch_id = ?", (batch.id,), n=2)
    other = start_proxy(tmp_path, fake.url, db=proxy.db)
    try:
        c2 = sdk(other, "twice")
        assert len(results(c2, batch.id)) == 2
        sentinel = c2.messages.batches.create(requests=[req("s-1")])  # type: ignore[list-item]
        c2.messages.batches.retrieve(sentinel.id)
        results(c2, sentinel.id)
        other.wait_rows("batch_id = ?", (sentinel.id,))
    finally:
        stop_proxy(other)
    assert len(proxy.rows("batch_id = ?", (batch.id,))) == 2


def test_ten_thousand_results_flat_memory(fake: FakeUpstream, tmp_path: Path) -> None:
    """10,000 results (about 40 MB of JSONL) stream through; the proxy's peak RSS does not grow with the file."""
    proxy = start_proxy(tmp_path, fake.url)
    try:
        c = sdk(proxy, "big")
        fake.batches.text = "x" * 4000
        reqs = [req(f"r-{i:05d}", 100, 10) for i in range(10_000)]
        batch = c.messages.batches.create(requests=reqs, timeout=120)  # type: ignore[arg-type]
        c.messages.batches.retrieve(batch.id)
        warm = c.messages.batches.create(requests=reqs[:50])  # type: ignore[arg-type]
        c.messages.batches.retrieve(warm.id)
        results(c, warm.id)
        proxy.wait_rows("batch_id = ?", (warm.id,), n=50)
        Path(f"/proc/{proxy.proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = proc_rss_mb(proxy.proc.pid)
        size = 0
        with (
            httpx.Client(timeout=120) as h,
            h.stream(
                "GET",
                f"{proxy.url}/v1/messages/batches/{batch.id}/results",
                headers={"x-api-key": MANAGED_TOKEN},
            ) as r,
        ):
            for piece in r.iter_raw():
                size += len(piece)
        peak = _peak_rss_mb(proxy.proc.pid)
        rows = proxy.wait_rows("batch_id = ?", (batch.id,), n=10_000, timeout=120)
        after = proc_rss_mb(proxy.proc.pid)
        print(
            f"\n10,000 results, {size / 1e6:.1f} MB JSONL: proxy RSS {before:.1f} MiB before, "
            f"{after:.1f} after, peak {peak:.1f}"
        )
        assert len(rows) == 10_000 and size > 40_000_000
        assert sum(r["input_tokens"] for r in rows) == 1_000_000
        assert peak - before < size / 2**20 / 2  # the file was never held whole
    finally:
        fake.batches.text = None
        stop_proxy(proxy)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_managed_proxy_meters_batches_itself_across_restart(fake: FakeUpstream, tmp_path: Path) -> None:
    """A managed batch whose results the client never downloads: the proxy polls and meters it, and the
    polling survives a restart (the first proxy does not poll; the second finds the batch in the table)."""
    first = start_proxy(tmp_path, fake.url, extra_args=("--set", "metrion_batch_poll_seconds=0"))
    try:
        c = sdk(first, "poll-me")
        batch = c.messages.batches.create(requests=[req("m-1", 400, 40), req("errored-m-2")])  # type: ignore[list-item]
        passthrough = anthropic.Anthropic(
            base_url=first.url, api_key="sk-ant-own", max_retries=0, default_headers={"x-metrion-token": PASS_TOKEN}
        ).messages.batches.create(requests=[req("pt-never")])  # type: ignore[list-item]
    finally:
        stop_proxy(first)
    fake.batches.polls_to_end = 2  # the first poll finds it in progress, the next one ended
    second = start_proxy(tmp_path, fake.url, db=first.db, extra_args=("--set", "metrion_batch_poll_seconds=1"))
    try:
        rows = {r["custom_id"]: r for r in second.wait_rows("batch_id = ?", (batch.id,), n=2, timeout=30)}
        assert (rows["m-1"]["user"], rows["m-1"]["mode"], rows["m-1"]["input_tokens"]) == ("poll-me", "managed", 400)
        assert rows["m-1"]["cost_usd"] == pytest.approx(batch_cost(400, 40), abs=1e-12)
        assert rows["errored-m-2"]["cost_usd"] == 0
        c2 = sdk(second, "poll-me")
        assert len(results(c2, batch.id)) == 2  # the client downloads too: nothing counted twice
        sentinel = c2.messages.batches.create(requests=[req("s")])  # type: ignore[list-item]
        c2.messages.batches.retrieve(sentinel.id)
        results(c2, sentinel.id)
        second.wait_rows("batch_id = ?", (sentinel.id,))
        assert len(second.rows("batch_id = ?", (batch.id,))) == 2
        assert batch_table(second, batch.id)["metered_at"] is not None
        assert batch_table(second, passthrough.id)["metered_at"] is None  # no key: metered when fetched
    finally:
        fake.batches.polls_to_end = 1
        stop_proxy(second)


def wait_for_batch(proxy: Proxy, batch_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(proxy.db, timeout=30)) as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone():
                return
        assert time.monotonic() < deadline, f"batch {batch_id} never recorded"
        time.sleep(0.05)


def test_report_by_batch_top_errors_and_summary(
    proxy: Proxy, fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    c = sdk(proxy, "reported")
    batch = c.messages.batches.create(requests=[req("big", 90_000, 9_000), *FOUR[1:]])  # type: ignore[arg-type]
    c.messages.batches.retrieve(batch.id)
    results(c, batch.id)
    proxy.wait_rows("batch_id = ?", (batch.id,), n=4)
    lab = anthropic.Anthropic(
        base_url=proxy.url, api_key="sk-ant-own", max_retries=0, default_headers={"x-metrion-token": PASS_TOKEN}
    )
    never = lab.messages.batches.create(requests=[req("never-fetched")])  # type: ignore[list-item]  # not polled
    wait_for_batch(proxy, never.id)  # the batches table is written off the event loop: wait until it is in

    def report(*argv: str) -> dict:
        assert metrion_report.main([*argv, "--db", str(proxy.db), "--utc", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    by = {r["batch"]: r for r in report("--by", "batch")["rows"]}
    assert by[batch.id]["requests"] == 4 and by[batch.id]["errors"] == 3
    assert by[batch.id]["cost_usd"] == pytest.approx(batch_cost(90_000, 9_000), abs=1e-9)
    top = report("top", "--limit", "1", "--user", "reported")["rows"][0]
    assert (top["batch_id"], top["cost_usd"]) == (batch.id, pytest.approx(batch_cost(90_000, 9_000), abs=1e-9))
    errors = report("errors")["rows"]
    assert {(e["error"], e["batch"]) for e in errors} >= {("batch_errored", 1), ("batch_expired", 1)}
    summary = report()["rows"][0]
    assert summary["batch_results"] >= 4 and summary["batch_cost_usd"] >= batch_cost(90_000, 9_000) - 1e-9
    assert metrion_report.main(["--db", str(proxy.db), "--utc"]) == 0
    text = capsys.readouterr().out
    assert "Batch results" in text and "created but not metered yet" in text
    assert metrion_report.main(["top", "--db", str(proxy.db), "--utc", "--limit", "1", "--user", "reported"]) == 0
    assert "[batch]" in capsys.readouterr().out
