"""metrion-report html: the page's numbers against the JSON report, escaping, and a real browser.

The browser tests run Debian's `chromium` headless (no network, nothing listening) and skip when it is absent,
except under CI=true where its absence fails. `METRION_HTML_SCREENSHOT=docs/report-html.png` makes the
screenshot test keep its picture there (that is how the README's screenshot is made).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from metrion_addon import report, store
from metrion_addon.report import html_data as report_html_data

MODELS = {  # $ per million tokens: input, output
    "claude-opus-5-5": (5.0, 25.0),
    "claude-sonnet-5-5": (3.0, 15.0),
    "claude-haiku-5-5": (1.0, 5.0),
    "claude-experimental-x": None,  # no known price: unpriced
}
PEOPLE = {  # account -> users (8 users; None is a request without a user label)
    "platform": ["alice", "bob", "chen"],
    "research": ["dana", "erik", "farah"],
    "support-bot": ["gus", None],
}
START = datetime(2026, 11, 1, tzinfo=UTC)


def demo_rows(start: datetime = START, days: int = 30, seed: int = 15) -> list[dict[str, Any]]:
    """Rows as the proxy writes them: weekdays busier, a slow rise, errors (some still billed), an unpriced
    model, cache reads and writes."""
    rnd = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for day in range(days):
        weekday = (start + timedelta(days=day)).weekday() < 5
        for _ in range(int((50 if weekday else 15) * (1 + day / 40))):
            account = rnd.choice(list(PEOPLE))
            user = rnd.choice(PEOPLE[account])
            model = rnd.choices(list(MODELS), weights=[3, 6, 4, 0.3])[0]
            ts = start + timedelta(days=day, seconds=rnd.randrange(86_400), milliseconds=rnd.randrange(1000))
            row: dict[str, Any] = {"ts": report.iso_z(ts), "account": account, "user": user, "model": model}
            row |= {"method": "POST", "path": "/v1/messages", "client": "claude-cli/2.1.3", "status": 200}
            row |= {"latency_ms": round(rnd.uniform(300, 20_000), 1), "request_id": f"req_{len(rows):06d}"}
            roll = rnd.random()
            if roll < 0.03:
                rows.append(row | {"status": 529, "error": "overloaded_error", "price_source": "no_usage",
                                   "cost_usd": 0.0, "input_tokens": 0, "output_tokens": 0})  # fmt: skip
                continue
            inp, out = rnd.randint(10, 4_000), rnd.randint(20, 3_000)
            write, read = (rnd.randint(1_000, 20_000), 0) if rnd.random() < 0.15 else (0, rnd.randint(0, 90_000))
            row |= {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": write}
            row |= {"cache_creation_5m_input_tokens": write, "cache_creation_1h_input_tokens": 0}
            row |= {"cache_read_input_tokens": read, "web_search_requests": 0}
            if roll < 0.045:
                row |= {"error": "client_disconnect", "completed": 0}
            if MODELS[model] is None:
                rows.append(row | {"price_source": "unknown"})
                continue
            rate_in, rate_out = (r / 1e6 for r in MODELS[model])
            parts = {"input": inp * rate_in, "output": out * rate_out, "cache_write": write * rate_in * 1.25,
                     "cache_read": read * rate_in * 0.1, "tools": 0.0}  # fmt: skip
            source = f"genai-prices@0.0.40:{model}"
            costs = {f"cost_{k}_usd": v for k, v in parts.items()} | {"cost_usd": sum(parts.values())}
            rows.append(row | costs | {"price_source": source})
    return rows


def write_db(path: Path, rows: list[dict[str, Any]]) -> Path:
    s = store.Store(path)
    s.start()
    for r in rows:
        s.put(r)
    s.close()
    assert s.written == len(rows)
    return path


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_db(tmp_path_factory.mktemp("html") / "metrion.db", demo_rows())


class Page(HTMLParser):
    """Every start tag with its attributes (unescaped, as a browser reads them), and the text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, **want: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.tags if all(a.get(k.replace("_", "-")) == v for k, v in want.items())]

    def by_id(self, id_: str) -> dict[str, str | None]:
        (found,) = self.find(id=id_)
        return found


def num(value: str | None) -> float | None:
    return None if value in (None, "", "None") else float(value)


def render(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> str:
    assert report.main(["html", "--db", str(db), *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def as_json(capsys: pytest.CaptureFixture[str], db: Path, *argv: str) -> dict[str, Any]:
    assert report.main([*argv, "--db", str(db), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_numbers(capsys: pytest.CaptureFixture[str], db: Path, *filters: str) -> Page:
    """Every number on the page equals the JSON report's for the same filters. Totals are the summary view's
    own; per-group costs are sums of the same SQL sums in another order (equal to 1e-9 dollars)."""
    page = Page(render(capsys, db, *filters))
    summary = as_json(capsys, db, *filters)["rows"][0]
    for key, field in (("cost", "cost_usd"), ("requests", "requests"), ("errors", "errors"),
                       ("unpriced", "unpriced_requests"), ("cache-hit-ratio", "cache_hit_ratio"),
                       ("cache-saved", "cache_saved_usd")):  # fmt: skip
        assert num(page.by_id(f"total-{key}")["data-value"]) == summary[field], key
    assert page.by_id("period")["data-first"] == (summary["first_ts"] or "")

    by_user = {(r["account"], r["user"]): r for r in as_json(capsys, db, "--by", "account,user", *filters)["rows"]}
    got = {(a.get("data-account"), a.get("data-user")): a for a in page.find(data_kind="user")}
    assert set(got) == set(by_user)
    for key, row in by_user.items():
        a = got[key]
        assert [int(a[f"data-{k}"] or 0) for k in ("requests", "errors", "unpriced")] == [
            row["requests"], row["errors"], row["unpriced_requests"]]  # fmt: skip
        assert num(a["data-cost"]) == pytest.approx(row["cost_usd"], abs=1e-9)
        assert num(a["data-share"]) == pytest.approx(row["cost_share"], abs=2e-6)
    by_account = {r["account"]: r for r in as_json(capsys, db, "--by", "account", *filters)["rows"]}
    got_accounts = {a.get("data-account"): a for a in page.find(data_kind="account")}
    assert set(got_accounts) == set(by_account)
    for key, row in by_account.items():
        assert int(got_accounts[key]["data-requests"] or 0) == row["requests"]
        assert num(got_accounts[key]["data-cost"]) == pytest.approx(row["cost_usd"], abs=1e-9)

    chart = as_json(capsys, db, "chart", *filters)["rows"]
    days = [(a["data-day"], num(a["data-cost"])) for t, a in page.tags if t == "g" and "data-day" in a]
    assert [d for d, _ in days] == [r["period"] for r in chart]
    assert [c for _, c in days] == pytest.approx([r["cost_usd"] for r in chart], abs=1e-9)

    top = as_json(capsys, db, "top", "--limit", "20", *filters)["rows"]
    got_top = [(int(a["data-id"] or 0), num(a["data-cost"])) for a in page.find() if "data-id" in a]
    assert got_top == [(r["id"], r["cost_usd"]) for r in top]

    errors = as_json(capsys, db, "errors", *filters)
    got_errors = [(a["data-error"], a["data-status"], int(a["data-requests"] or 0), num(a["data-cost"]))
                  for a in page.find() if "data-error" in a]  # fmt: skip
    assert got_errors == [(r["error"], str(r["status"]), r["requests"], r["cost_usd"]) for r in errors["rows"]]
    if errors["rows"]:
        assert num(page.by_id("errors-total-cost")["data-value"]) == errors["total"]["cost_usd"]
    return page


def test_numbers_match_the_json_report(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    page = check_numbers(capsys, db, "--utc")
    assert len(page.find(data_kind="user")) == 8 and len(page.find(data_kind="account")) == 3
    days = [a for t, a in page.tags if t == "g" and "data-day" in a]
    assert len(days) == 30 and days[0]["data-day"] == "2026-11-01"
    assert len([a for a in page.find() if "data-id" in a]) == 20
    series = {a["data-series"] for t, a in page.tags if t == "rect"}
    assert series == set(MODELS) - {"claude-experimental-x"}  # unpriced: no cost to stack
    assert [a["data-model"] for a in page.find() if "data-model" in a] == ["claude-experimental-x"]


def test_pricing_sources_match_the_database(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    page = Page(render(capsys, db, "--utc"))
    import sqlite3

    with sqlite3.connect(db) as conn:
        want = {src: (n, cost) for src, n, cost in conn.execute(
            "SELECT price_source, COUNT(*), TOTAL(cost_usd) FROM requests GROUP BY price_source")}  # fmt: skip
    got = {a["data-source"]: (int(a["data-requests"] or 0), num(a["data-cost"]))
           for a in page.find() if "data-source" in a}  # fmt: skip
    assert got.keys() == want.keys() == {f"genai-prices@0.0.40:{m}" for m in list(MODELS)[:3]} | {"unknown", "no_usage"}
    for src, (n, cost) in want.items():
        assert got[src][0] == n and got[src][1] == pytest.approx(cost, abs=1e-9)
    text = "".join(page.text)
    assert "metrion-reprice --config config.yaml" in text and "prefix: claude-experimental-x" in text


@pytest.mark.parametrize(
    "filters",
    [
        ["--utc", "--since", "2026-11-10", "--until", "2026-11-20"],
        ["--utc", "--account", "research", "--model", "claude-s"],
        ["--utc", "--user", "alice", "--user", "gus"],
        ["--since", "2026-11-05T12:00", "--until", "2026-11-25"],  # local time: the same day bounds as the report
    ],
)
def test_filters_match_the_json_report(capsys: pytest.CaptureFixture[str], db: Path, filters: list[str]) -> None:
    check_numbers(capsys, db, *filters)


def test_local_time_across_a_dst_change(
    capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New York leaves summer time on 2026-11-01: a 25-hour day, and every day boundary at 05:00Z after it."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        page = check_numbers(capsys, db)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [a["data-day"] for t, a in page.tags if t == "g"][:2] == ["2026-10-31", "2026-11-01"]


def test_top_requests_without_the_shortcut(
    capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With too many candidate groups (ties) the page falls back to one plain scan: the same 20 rows."""
    monkeypatch.setattr(report_html_data, "_MAX_CANDIDATE_GROUPS", 0)
    check_numbers(capsys, db, "--utc")


def test_stack_by_account(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    page = Page(render(capsys, db, "--utc", "--stack", "account"))
    by = as_json(capsys, db, "--by", "account,day", "--utc")["rows"]
    got = {(a["data-series"], a["data-day"]): num(a["data-cost"]) for _, a in page.tags if "data-series" in a}
    for (series, _), cost in got.items():
        assert series in PEOPLE and cost is not None and cost > 0
    want = {(r["account"], r["day"]): r["cost_usd"] for r in by if r["cost_usd"] > 0}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], abs=1e-9) for k in want)


def test_empty_selection_still_makes_a_page(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    page = Page(render(capsys, db, "--utc", "--account", "nobody"))
    assert page.by_id("total-requests")["data-value"] == "0"
    assert "no requests match these filters" in "".join(page.text)


def test_writes_a_file_and_refuses_other_formats(capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path) -> None:
    out = tmp_path / "costs.html"
    assert report.main(["html", "--db", str(db), "-o", str(out)]) == 0
    assert capsys.readouterr().out == "" and out.read_text().startswith("<!DOCTYPE html>")
    for argv, message in ((["html", "--json"], "no --json"),
        (["html", "--period", "week"], "--period"), (["--stack", "model"], "html view only"),
                          (["top", "-o", "x.html"], "html view only"),
                          (["html", "-o", str(tmp_path / "no" / "such" / "dir.html")], "cannot write")):  # fmt: skip
        assert report.main([*argv, "--db", str(db)]) == report.EXIT_USAGE
        assert message in capsys.readouterr().err
    assert report.main(["html", "--db", str(tmp_path / "absent.db")]) == report.EXIT_NO_DB
    store.migrate(tmp_path / "empty.db")
    assert report.main(["html", "--db", str(tmp_path / "empty.db")]) == report.EXIT_EMPTY


def test_self_contained(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    text = render(capsys, db, "--utc")
    for needle in ("http://", "https://", "<script", "<link", "@import", "url(", " src=", "<iframe", "<img"):
        assert needle not in text.lower(), needle
    assert "@media print" in text and 'name="viewport"' in text


HOSTILE = {
    "account": "<script>alert('account')</script>",
    "user": '"><svg onload=alert(1)>',
    "model": "</svg></title><script>alert(2)</script>",
    "client": "<img src=x onerror=alert(3)>",
    "error": "</td></tr></table><script>alert(4)</script>",
    "price_source": "override:'\"><b>x</b>",
}


def hostile_db(tmp_path: Path) -> Path:
    rows = []
    for i in range(3):
        row = {"ts": report.iso_z(START + timedelta(hours=i)), "status": 500 if i else 200, "latency_ms": 1.0}
        row |= {"input_tokens": 10, "output_tokens": 10, "cost_usd": 0.5 + i, "cost_input_usd": 0.5 + i}
        rows.append(row | HOSTILE | ({} if i else {"error": None}))
    rows.append({"ts": report.iso_z(START), "account": HOSTILE["account"], "user": "&amp; plain",
                 "model": HOSTILE["model"], "price_source": "unknown", "input_tokens": 5})  # fmt: skip
    return write_db(tmp_path / "hostile.db", rows)


def test_hostile_labels_are_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = render(capsys, hostile_db(tmp_path), "--utc")
    assert "<script" not in text and "<svg onload" not in text and "<img" not in text and "<b>" not in text
    page = Page(text)
    assert {t for t, _ in page.tags} <= {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3",
                                         "p", "span", "section", "div", "ul", "li", "svg", "line", "text", "g",
                                         "rect", "table", "tr", "th", "td", "abbr", "code", "pre", "a", "strong",
                                         "polygon", "polyline", "footer"}  # fmt: skip
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]
    # the values survive as data (a browser reads back exactly what was stored) and as visible text
    assert {a.get("data-account") for a in page.find(data_kind="account")} == {HOSTILE["account"]}
    assert {a.get("data-user") for a in page.find(data_kind="user")} == {HOSTILE["user"], "&amp; plain"}
    assert {a.get("data-series") for _, a in page.tags if "data-series" in a} == {HOSTILE["model"]}
    assert [a["data-error"] for a in page.find() if "data-error" in a] == [HOSTILE["error"]]
    assert HOSTILE["price_source"] in {a.get("data-source") for a in page.find()}
    shown = "".join(page.text)
    for key in ("account", "user", "model", "error", "price_source"):
        assert HOSTILE[key] in shown, key
    assert "&amp;amp; plain" in text  # escaped once, shown as typed
    assert page.find(data_model=HOSTILE["model"])  # the unpriced model, and its override snippet, as text


# --- a real browser ------------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI=true requires the browser test (.ci/run installs it)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI=true makes this a failure")
    return found


def run_chromium(page: Path, tmp: Path, *args: str) -> tuple[str, str]:
    """Headless, no network, a throwaway profile; its own process group, stopped whatever happens. Returns
    (stdout, stderr); console messages are on stderr as ':CONSOLE' lines (--enable-logging=stderr)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--disable-default-apps", "--no-default-browser-check", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND", *args, page.resolve().as_uri()]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any helper process it left behind
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return out, err


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_console_check_sees_errors(tmp_path: Path) -> None:
    """The check below would see a broken page: console.error and an uncaught exception both show up."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); notDefined();</script>")
    _, err = run_chromium(bad, tmp_path, "--dump-dom")
    found = console_messages(err)
    assert any("boom" in m for m in found) and any("Uncaught ReferenceError" in m for m in found)


def test_chromium_renders_without_console_errors(tmp_path: Path) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    db = write_db(tmp_path / "metrion.db", demo_rows(today - timedelta(days=29), 30))  # budgets: this period
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database: {db}\naccounts:\n  - name: platform\n    tokens: [sk-metrion-aaaaaaaaaaaaaaaa]\n"
                   "    budget: {monthly: 2000}\n    user_budget: {daily: 40}\n")  # fmt: skip
    page = tmp_path / "costs.html"
    assert report.main(["html", "-c", str(cfg), "--utc", "-o", str(page)]) == 0
    shot = tmp_path / "shot.png"
    _, err = run_chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
    assert console_messages(err) == []
    assert png_size(shot) == (1280, 1600)
    dom, err = run_chromium(page, tmp_path, "--dump-dom")
    assert console_messages(err) == []
    assert 'id="total-cost"' in dom and dom.count("<rect") == page.read_text().count("<rect") > 30
    if keep := os.environ.get("METRION_HTML_SCREENSHOT"):
        shutil.copyfile(shot, keep)


def test_chromium_keeps_hostile_labels_as_text(tmp_path: Path) -> None:
    page = tmp_path / "hostile.html"
    assert report.main(["html", "--db", str(hostile_db(tmp_path)), "--utc", "-o", str(page)]) == 0
    dom, err = run_chromium(page, tmp_path, "--dump-dom")
    assert console_messages(err) == []
    parsed = Page(dom)  # the DOM the browser built: no element or handler came from a label
    assert not {t for t, _ in parsed.tags} & {"script", "img", "b", "iframe"}
    assert not [a for _, a in parsed.tags if any(k.startswith("on") for k in a)]
    assert HOSTILE["account"] in "".join(parsed.text)


def test_more_series_than_colours_share_an_other_bucket() -> None:
    from types import SimpleNamespace

    from metrion_addon.report.html import OTHER_COLOUR, PALETTE, buckets
    from metrion_addon.report.html_data import Group

    series = {f"m{i}": Group(requests=1, cost=float(i)) for i in range(10)} | {"free": Group(requests=5)}
    got = buckets(SimpleNamespace(series=series, stack="model"))  # type: ignore[arg-type]
    # m0 and "free" cost nothing and price nothing: not drawn, not in the legend
    assert [name for name, _, _ in got] == ["m9", "m8", "m7", "m6", "m5", "m4", "m3", "2 other models"]
    assert got[-1][1] == ["m2", "m1"] and got[-1][2] == OTHER_COLOUR
    assert [c for _, _, c in got[:-1]] == list(PALETTE[:7])
