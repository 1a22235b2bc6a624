"""`metrion-report html`: the cost report as one self-contained HTML page, for people who are not at a terminal.

The page has no scripts, fonts or links to fetch: CSS and inline SVG charts only, so it works offline, as an
e-mail attachment and on paper. Every value read from the database goes through `html.escape` (labels are
user-controlled), in text and in attributes alike. The numbers come from html_data.py; machine-readable
copies of them are in `data-*` attributes and ids (see docs/report.md).
"""

from __future__ import annotations

import math
import sys
from html import escape
from pathlib import Path
from typing import Any

from metrion_addon.report.db import EXIT_USAGE, ReportError
from metrion_addon.report.fmt import fmt_int, fmt_ms, fmt_pct, fmt_usd, scope
from metrion_addon.report.html_data import Group, Page, _num, collect
from metrion_addon.report.queries import Options
from metrion_addon.report.views import TOKENS
from metrion_addon.report.when import show_time

# Okabe-Ito: distinguishable with the common colour-vision deficiencies, and still apart in greyscale print.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
OTHER_COLOUR = "#9a9a9a"


def esc(value: Any) -> str:
    """Any value as HTML text or a quoted attribute value."""
    return escape("" if value is None else str(value), quote=True)


def label(value: Any, none: str = "(none)") -> str:
    return esc(value) if value is not None else f'<span class="muted">{none}</span>'


def data_attrs(**values: Any) -> str:
    return "".join(f' data-{k.replace("_", "-")}="{esc(repr(v) if isinstance(v, float) else v)}"'
                   for k, v in values.items())  # fmt: skip


def axis(x: float) -> tuple[float, int]:
    """(step, ticks): the y axis goes to step * ticks >= x in at most 5 round steps (1, 2, 2.5 or 5 x 10^k)."""
    if x <= 0:
        return 0.25, 4
    raw = x / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-12))
    return step, max(1, math.ceil(x / step * (1 - 1e-12)))


def axis_money(x: float, step: float) -> str:
    """A tick label with as many decimals as the step needs: $0 $1 $2, $0 $2.50 $5.00, $0.0000 $0.0002."""
    digits = 0 if step == round(step) else 2 if step >= 0.01 else 4 if step >= 0.0001 else 6
    return f"${x:,.{digits}f}"


Bucket = tuple[str, list[str], str]  # (legend label, the series it sums, colour)


def buckets(page: Page) -> list[Bucket]:
    """The series, most expensive first; past the palette's size the rest share one grey 'other' bucket."""
    shown = [k for k, g in page.series.items() if g.cost or g.unpriced]  # not a $0-only series (errors)
    names = sorted(shown, key=lambda k: (-page.series[k].cost, -page.series[k].requests, k))
    if len(names) > len(PALETTE):
        keep, rest = names[: len(PALETTE) - 1], names[len(PALETTE) - 1 :]
        return [(n, [n], c) for n, c in zip(keep, PALETTE, strict=False)] + [
            (f"{len(rest)} other {page.stack}s", rest, OTHER_COLOUR)
        ]
    return [(n, [n], c) for n, c in zip(names, PALETTE, strict=False)]


def stacked_chart(page: Page, groups: list[Bucket]) -> str:
    days, n = page.days, max(1, len(page.days))
    width, height, left, bottom, top = 1000, 320, 64, 28, 10
    plot_h = height - bottom - top
    totals = [sum(g.daily.get(d, 0.0) for g in page.series.values()) for d in days]
    step, ticks = axis(max(totals, default=0.0))
    y_max = step * ticks
    slot = (width - left - 8) / n
    bar_w = max(1.0, slot * 0.78)
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-labelledby="chart-title">',
           f'<title id="chart-title">Cost per day by {page.stack}</title>']  # fmt: skip
    for i in range(ticks + 1):
        y = top + plot_h - plot_h * i / ticks
        out.append(f'<line class="grid" x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{esc(axis_money(step * i, step))}</text>")  # fmt: skip
    every = max(1, -(-n // 12))
    for i, (day, total) in enumerate(zip(days, totals, strict=True)):
        x = left + i * slot + (slot - bar_w) / 2
        y = top + plot_h
        out.append(f'<g class="day"{data_attrs(day=day, cost=_num(total))}><title>{esc(day)}: '
                   f"{esc(fmt_usd(_num(total)))}</title>")  # fmt: skip
        for name, members, colour in groups:
            cost = sum(page.series[m].daily.get(day, 0.0) for m in members)
            if cost <= 0:
                continue
            h = plot_h * cost / y_max
            y -= h
            out.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{bar_w:.2f}" height="{h:.2f}" fill="{colour}"'
                       f"{data_attrs(series=name, day=day, cost=_num(cost))}>"
                       f"<title>{esc(day)} · {esc(name)}: {esc(fmt_usd(_num(cost)))}</title></rect>")  # fmt: skip
        out.append("</g>")
        if i % every == 0:
            out.append(f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
                       f"{esc(day[5:] if len(day) == 10 else day)}</text>")  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def sparkline(daily: dict[str, float], days: list[str]) -> str:
    values = [daily.get(d, 0.0) for d in days]
    top = max(values, default=0.0) or 1.0
    n = max(1, len(values) - 1)
    points = " ".join(f"{i * 100 / n:.1f},{22 - 20 * v / top:.1f}" for i, v in enumerate(values))
    return (f'<svg class="spark" viewBox="0 0 100 24" preserveAspectRatio="none" aria-hidden="true">'
            f'<polygon points="0,24 {points} 100,24" class="spark-area"/>'
            f'<polyline points="{points}" class="spark-line"/></svg>')  # fmt: skip


def share_bar(part: float, whole: float, colour: str = "#0072B2") -> str:
    pct = 100 * part / whole if whole > 0 else 0.0
    return (f'<span class="bar"><span style="width:{min(100.0, pct):.1f}%;background:{colour}"></span></span>'
            f' {esc(fmt_pct(pct / 100))}')  # fmt: skip


def _cost(cost: float, unpriced: int) -> str:
    mark = ' <abbr class="warn" title="includes unpriced requests: their cost is unknown">+?</abbr>'
    return esc(fmt_usd(_num(cost))) + (mark if unpriced else "")


def _ordered(groups: dict[Any, Group]) -> list[tuple[Any, Group]]:
    return sorted(groups.items(), key=lambda kv: (-kv[1].cost, -kv[1].requests, str(kv[0])))


# --- the page ------------------------------------------------------------------------------------


def card(key: str, title: str, value: Any, shown: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="k">{title}</div><div class="v" id="total-{key}"'
            f"{data_attrs(value=value)}>{shown}</div><div class=\"sub\">{sub}</div></div>")  # fmt: skip


def totals_section(page: Page) -> str:
    s = page.summary
    errors_share = s["errors"] / s["requests"] if s["requests"] else None
    unpriced = 'cost unknown, not in the total: see <a href="#pricing">Pricing</a>' if s["unpriced_requests"] else ""
    cards = [
        card("cost", "Cost", s["cost_usd"], esc(fmt_usd(s["cost_usd"])),
             f"without caching {esc(fmt_usd(s['cost_uncached_usd']))}"),
        card("requests", "Requests", s["requests"], esc(fmt_int(s["requests"]))),
        card("errors", "Errors", s["errors"], esc(fmt_int(s["errors"])),
             f"{esc(fmt_pct(errors_share))} of requests" if errors_share is not None else ""),
        card("unpriced", "Unpriced", s["unpriced_requests"], esc(fmt_int(s["unpriced_requests"])), unpriced),
        card("cache-hit-ratio", "Cache hit ratio", s["cache_hit_ratio"], esc(fmt_pct(s["cache_hit_ratio"]) or "n/a"),
             "of prompt tokens read from the cache"),
        card("cache-saved", "Saved by caching", s["cache_saved_usd"], esc(fmt_usd(s["cache_saved_usd"])),
             "vs. the same prompts uncached"),
    ]  # fmt: skip
    return f'<section class="cards">{"".join(cards)}</section>'


def _legend_cost(groups: list[Group]) -> str:
    cost, unpriced = sum(g.cost for g in groups), sum(g.unpriced for g in groups)
    return "unpriced" if unpriced and not cost else _cost(cost, unpriced)


def chart_section(page: Page) -> str:
    if not page.days:
        return ""
    groups = buckets(page)
    legend = "".join(f'<li><span class="swatch" style="background:{c}"></span>{label(n)} <span class="muted">'
                     f"{_legend_cost([page.series[m] for m in ms])}</span></li>" for n, ms, c in groups)  # fmt: skip
    return (
        f'<section><h2>Cost per day by {page.stack}</h2><ul class="legend">{legend}</ul>'
        f'<div class="scroll">{stacked_chart(page, groups)}</div></section>'
    )


def people_section(page: Page) -> str:
    total = page.summary["cost_usd"]
    rows = []
    for account, a in _ordered(page.accounts):
        rows.append(_person_row("account", account, None, a, total, page.days))
        users = [(u, g) for (acc, u), g in _ordered(page.people) if acc == account]
        rows += [_person_row("user", account, u, g, total, page.days) for u, g in users]
    head = "<tr><th>account / user</th><th>requests</th><th>errors</th><th>cost</th><th>share</th>" \
           "<th>daily cost</th></tr>"  # fmt: skip
    return (
        f'<section><h2>Who spent it</h2><div class="scroll"><table class="people">{head}{"".join(rows)}'
        "</table></div></section>"
    )


def _person_row(kind: str, account: str | None, user: str | None, g: Group, total: float, days: list[str]) -> str:
    attrs = {"kind": kind} | ({"account": account} if account is not None else {})
    attrs |= {"user": user} if kind == "user" and user is not None else {}
    share = round(g.cost / total, 6) if total else 0.0
    attrs |= {"requests": g.requests, "errors": g.errors, "unpriced": g.unpriced, "cost": _num(g.cost), "share": share}
    name = label(account, "(no account)") if kind == "account" else label(user, "(no user label)")
    return (
        f'<tr class="{kind}"{data_attrs(**attrs)}><td class="name">{name}</td>'
        f'<td class="n">{esc(fmt_int(g.requests))}</td><td class="n">{esc(fmt_int(g.errors))}</td>'
        f'<td class="n">{_cost(g.cost, g.unpriced)}</td><td class="share">{share_bar(g.cost, total)}</td>'
        f"<td>{sparkline(g.daily, days)}</td></tr>"
    )


def top_section(page: Page) -> str:
    if not page.top:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("time", "account", "user", "model", "input", "output", "cache write",
                                            "cache read", "cost", "latency", "status"))  # fmt: skip
    rows = []
    for r in page.top:
        status = esc(r["status"]) + (f" {esc(r['error'])}" if r["error"] else "")
        tokens = "".join(f'<td class="n">{esc(fmt_int(r[k]))}</td>' for k in TOKENS)
        rows.append(f"<tr{data_attrs(id=r['id'], cost=r['cost_usd'])}><td>{esc(show_time(r['ts'], page.opts.utc))}"
                    f"</td><td>{label(r['account'], '')}</td><td>{label(r['user'], '')}</td>"
                    f"<td>{label(r['model'], '')}</td>{tokens}<td class=\"n\">{esc(fmt_usd(r['cost_usd']))}</td>"
                    f'<td class="n">{esc(fmt_ms(r["latency_ms"]))}</td><td>{status}</td></tr>')  # fmt: skip
    return (
        f'<section><h2>The {len(page.top)} most expensive requests</h2><div class="scroll"><table class="wide">'
        f"<tr>{head}</tr>{''.join(rows)}</table></div></section>"
    )


def errors_section(page: Page) -> str:
    rep = page.errors
    if not rep.rows:
        return '<section><h2>Errors</h2><p class="muted">No failed requests in this period.</p></section>'
    rows = "".join(f"<tr{data_attrs(error=r['error'], status=r['status'], requests=r['requests'], cost=r['cost_usd'])}>"
                   f"<td>{label(r['error'])}</td><td>{label(r['status'], '')}</td>"
                   f'<td class="n">{esc(fmt_int(r["requests"]))}</td>'
                   f'<td class="n">{_cost(r["cost_usd"], r["unpriced_requests"])}</td></tr>'
                   for r in rep.rows)  # fmt: skip
    t = rep.total or {}
    total = (f'<tr class="total"><td>Total</td><td></td><td class="n" id="errors-total-requests">'
             f"{esc(fmt_int(t['requests']))}</td><td class=\"n\" id=\"errors-total-cost\""
             f"{data_attrs(value=t['cost_usd'])}>{_cost(t['cost_usd'], t['unpriced_requests'])}</td></tr>")  # fmt: skip
    return (
        f'<section><h2>Errors</h2><p class="muted">Failed requests by error type, and what they still '
        f'cost.</p><div class="scroll"><table><tr><th>error</th><th>status</th><th>requests</th><th>cost</th>'
        f"</tr>{rows}{total}</table></div></section>"
    )


def budgets_section(page: Page) -> str:
    if page.budgets is None:
        return (
            '<section><h2>Budgets</h2><p class="muted">No budgets in the config (see <code>budget:</code> and '
            "<code>user_budget:</code> in config.example.yaml).</p></section>"
        )
    rows = []
    for r in page.budgets.rows:
        colour = "#D55E00" if r["exceeded"] else "#0072B2"
        state = '<strong class="warn">exceeded</strong>' if r["exceeded"] else ""
        attrs = data_attrs(account=r["account"], user=r["user"] or "", period=r["period"],
                           spent=r["spent_usd"], limit=r["limit_usd"])  # fmt: skip
        rows.append(f"<tr{attrs}><td>{label(r['account'])}</td><td>{label(r['user'], '(whole account)')}</td>"
                    f"<td>{esc(r['period'])} ({esc(r['enforce'])})</td>"
                    f'<td class="share">{share_bar(r["spent_usd"], r["limit_usd"], colour)} {state}</td>'
                    f'<td class="n">{esc(fmt_usd(r["spent_usd"]))} of {esc(fmt_usd(r["limit_usd"]))}</td>'
                    f"<td>{esc(r['resets_at'][:16].replace('T', ' '))}</td></tr>")  # fmt: skip
    tz = esc(page.opts.budgets.timezone if page.opts.budgets else "UTC")
    return (
        f'<section><h2>Budgets</h2><p class="muted">Each budget in its current period ({tz} calendar), '
        'whatever the page\'s filters.</p><div class="scroll"><table><tr><th>account</th><th>user</th>'
        f"<th>period</th><th>spent of limit</th><th></th><th>resets</th></tr>{''.join(rows)}</table></div>"
        "</section>"
    )


SOURCE_NOTES = {
    "unknown": "no known price: unpriced",
    "no_usage": "no usage reported (an error before any token): $0",
    "free:count_tokens": "token counting is free",
    "implausible_usage": "usage too large to be real: left unpriced",
}


def _source_note(source: str | None) -> str:
    if source is None:
        return ""
    if source.startswith("override:"):
        return "price override in the config"
    if source.startswith("genai-prices@"):
        return "genai-prices' bundled price table"
    return SOURCE_NOTES.get(source, "")


def pricing_section(page: Page) -> str:
    rows = "".join(f"<tr{data_attrs(source=src, requests=g.requests, cost=_num(g.cost))}><td><code>{label(src)}"
                   f"</code></td><td>{esc(_source_note(src))}</td>"
                   f"<td>{', '.join(esc(m) for m in sorted(page.source_models[src]))}</td>"
                   f'<td class="n">{esc(fmt_int(g.requests))}</td><td class="n">{_cost(g.cost, g.unpriced)}</td></tr>'
                   for src, g in _ordered(page.sources))  # fmt: skip
    out = [f'<section id="pricing"><h2>Pricing</h2><p class="muted">Where each price came from '
           "(<code>price_source</code>).</p><div class=\"scroll\"><table><tr><th>source</th><th></th><th>models</th>"
           f"<th>requests</th><th>cost</th></tr>{rows}</table></div>"]  # fmt: skip
    unpriced = [(m, g) for m, g in _ordered(page.models) if g.unpriced]
    if unpriced:
        items = "".join(f"<li{data_attrs(model=m, unpriced=g.unpriced)}><code>{label(m)}</code>: "
                        f"{esc(fmt_int(g.unpriced))} unpriced request{'s' if g.unpriced != 1 else ''}</li>"
                        for m, g in unpriced)  # fmt: skip
        first = esc(next((m for m, _ in unpriced if m), "model-id"))
        out.append(
            f'<h3 class="warn">Unpriced models</h3><ul>{items}</ul><p>Their cost is unknown, so it is not in '
            "the totals. To price them, add an override to the config (USD per million tokens) and reprice "
            f"the stored rows:</p><pre>pricing:\n  overrides:\n    - prefix: {first}\n      input: 3.0\n"
            "      output: 15.0\n\nmetrion-reprice --config config.yaml --dry-run   # shows the difference\n"
            "metrion-reprice --config config.yaml             # rewrites the stored costs</pre>"
        )
    return "".join(out) + "</section>"


CSS = """
:root{--fg:#1b1f24;--muted:#5b6470;--line:#d9dde3;--bg:#fff;--soft:#f4f6f8}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,sans-serif;-webkit-print-color-adjust:exact;print-color-adjust:exact}
main{max-width:1200px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 10px}h3{font-size:16px;margin:16px 0 6px}
section{margin:0 0 30px}.muted{color:var(--muted)}.warn{color:#b34700}
.scope{color:var(--muted);margin:0 0 20px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:var(--soft)}
.card .k{font-size:13px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:26px;font-weight:650;font-variant-numeric:tabular-nums;margin:2px 0}
.card .sub{font-size:13px;color:var(--muted)}
.legend{list-style:none;padding:0;margin:0 0 8px;display:flex;flex-wrap:wrap;gap:4px 18px;font-size:14px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.chart{width:100%;height:auto;display:block}.chart rect{stroke:#fff;stroke-width:.6}
.grid{stroke:var(--line);stroke-width:1}.axis{font-size:12px;fill:var(--muted)}
.scroll{overflow-x:auto}table.wide td{white-space:nowrap}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th{text-align:left;font-weight:600;color:var(--muted);border-bottom:2px solid var(--line);padding:6px 8px;
 white-space:nowrap}
td{border-bottom:1px solid var(--line);padding:5px 8px;vertical-align:middle}
td.n{text-align:right;white-space:nowrap}td.share{white-space:nowrap;min-width:150px}
tr.account td{font-weight:650;background:var(--soft)}tr.user td.name{padding-left:26px}
tr.total td{font-weight:650;border-top:2px solid var(--line)}
.bar{display:inline-block;width:90px;height:10px;background:#e6e9ed;border-radius:2px;vertical-align:middle;
 overflow:hidden}.bar span{display:block;height:100%}
.spark{width:120px;height:24px;display:block}.spark-line{fill:none;stroke:#0072B2;stroke-width:1.5;
 vector-effect:non-scaling-stroke}.spark-area{fill:#0072B2;opacity:.15}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:10px 12px;overflow-x:auto}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
footer{color:var(--muted);font-size:13px;border-top:1px solid var(--line);padding-top:10px}
@media (max-width:640px){.chart{min-width:600px}main{padding:14px 10px}h1{font-size:21px}.card .v{font-size:21px}
 .spark{width:70px}td.share{min-width:0}.bar{width:48px}}
@media print{body{font-size:10pt}main{max-width:none;padding:0}.scroll{overflow:visible}.chart{min-width:0}
 table{font-size:8pt}table.wide td{white-space:normal}td,th{padding:3px 5px}.card .v{font-size:18pt}
 .cards{grid-template-columns:repeat(3,1fr)}tr,.card,svg,pre{break-inside:avoid}h2,h3{break-after:avoid}
 section{margin-bottom:18px}a{color:inherit;text-decoration:none}}
@page{margin:12mm}
"""


def render(page: Page) -> str:
    s, opts = page.summary, page.opts
    span = (f"{esc(show_time(s['first_ts'], opts.utc))} to {esc(show_time(s['last_ts'], opts.utc))}"
            if s["first_ts"] else "no requests match these filters")  # fmt: skip
    body = [
        f'<h1>Claude API costs</h1><p class="scope"><span id="period"{data_attrs(first=s["first_ts"] or "",
        last=s["last_ts"] or "")}>{span}</span> · {esc(scope(opts))}</p>',
        totals_section(page),
        chart_section(page),
        people_section(page) if page.accounts else "",
        top_section(page),
        errors_section(page),
        budgets_section(page),
        pricing_section(page) if page.sources else "",
        f"<footer>Made by <code>metrion-report html</code> at {esc(page.generated.strftime('%Y-%m-%d %H:%M'))}. "
        "Costs are USD as the proxy priced each request; shares are of the priced total. Times are "
        f"{'UTC' if opts.utc else 'local time'}.</footer>",
    ]  # fmt: skip
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\"><title>Claude API costs</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")  # fmt: skip


def write_report(source: Path | str, opts: Options, stack: str = "model", output: str | None = None) -> Page:
    """Collect (from a SQLite file or a PostgreSQL URL), render and write the page (to stdout when `output` is
    None or '-')."""
    page = collect(source, opts, stack)
    text = render(page)
    if output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ReportError(f"cannot write {output}: {e.strerror or e}", EXIT_USAGE) from None
    return page
