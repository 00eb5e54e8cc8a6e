"""The control API's two pages, drawn on the server: the node's dashboard (`/`) and the run view (`/run`).

Pure functions from plain data (the `/status` record, the `/run.json` snapshot) to HTML: no script, no
external file, so a page works offline and shows the same thing in any browser; each reloads itself
every few seconds (`<meta http-equiv="refresh">`). The loss curve is inline SVG with labelled axes and
round numbers; with no point to draw it says "no data yet". Every string from the node or its peers is
escaped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from intellect.node.app import fmt

#: Seconds between reloads of a page.
REFRESH_S = 3
NO_DATA = '<p class="empty">no data yet</p>'

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:72em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}table{border-collapse:collapse}
td,th{padding:.25em .9em;text-align:left;border-bottom:1px solid #eee}th{background:#f6f6f6}
td.n{text-align:right;font-variant-numeric:tabular-nums}.me{font-weight:bold}.bad{color:#b00}
.empty{color:#777;font-style:italic;padding:1em 0}svg text{font-size:12px;fill:#444}
.muted{color:#777}"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta http-equiv="refresh" content="{REFRESH_S}"><style>{_STYLE}</style></head>\n'
        f"<body>{body}</body></html>\n"
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells are escaped here, columns in `numeric` right-aligned."""
    num = set(numeric)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in num else ''}>{escape(c)}</td>" for i, c in enumerate(r))
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _ticks(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _round_ticks(r0: int, r1: int) -> list[int]:
    step = max(1, math.ceil((r1 - r0) / 6))
    return list(range(r0, r1 + 1, step))


def loss_svg(points: Sequence[tuple[int, float]], width: int = 640, height: int = 260) -> str:
    """The loss per round as an SVG line chart with labelled axes; "no data yet" without a point."""
    pts = [(r, v) for r, v in points if math.isfinite(v)]
    if not pts:
        return NO_DATA
    left, right, top, bottom = 64, 16, 12, 44
    w, h = width - left - right, height - top - bottom
    r0, r1 = min(r for r, _ in pts), max(r for r, _ in pts)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    pad = (hi - lo) * 0.08 or max(abs(lo) * 0.05, 0.05)
    lo, hi = lo - pad, hi + pad
    span_r = (r1 - r0) or 1

    def x(r: float) -> float:
        return left + (w * (r - r0) / span_r if r1 > r0 else w / 2)

    def y(v: float) -> float:
        return top + h * (hi - v) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fcfcfc" stroke="#ccc"/>')
    for v in _ticks(lo + pad, hi - pad, 4) if hi - lo > 2 * pad else [lo + pad]:
        out.append(f'<line x1="{left - 4}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{fmt.loss(v)}</text>')
    for r in _round_ticks(r0, r1) if r1 > r0 else [r0]:
        out.append(f'<line x1="{x(r):.1f}" x2="{x(r):.1f}" y1="{top + h}" y2="{top + h + 4}" stroke="#888"/>')
        out.append(f'<text x="{x(r):.1f}" y="{top + h + 17}" text-anchor="middle">{r}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">round</text>')
    out.append(
        f'<text x="14" y="{top + h / 2}" text-anchor="middle" transform="rotate(-90 14 {top + h / 2})">'
        "loss</text>"
    )
    line = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in pts)
    out.append(f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{line}"/>')
    for r, v in pts[-200:]:
        out.append(
            f'<circle cx="{x(r):.1f}" cy="{y(v):.1f}" r="3" fill="#2563eb">'
            f"<title>round {r}: loss {fmt.loss(v)}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


def _last_allreduce(ar: dict[str, Any]) -> str:
    if not ar.get("at"):
        return "none yet"
    how = f"ok, group of {ar['group_size']}" if ar["ok"] else f"FAILED ({ar.get('reason') or 'no reason'})"
    return f"round {ar['round']}: {how}, {fmt.duration(ar['seconds'])}"


def dashboard_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The dashboard's rows from the `/status` record, numbers formatted."""
    sync = s["last_sync"]
    return [
        ("peer", fmt.peer(s["peer_id"]) or "–"),
        ("run", f"{s['run_name']} {s['run_id'][:16]}".strip() or "not joined yet"),
        ("phase", s["phase"]),
        ("paused", "; ".join(s["pause_reasons"].values()) if s["paused"] else "no"),
        ("limits", ", ".join(f"{k}={v}" for k, v in s["limits"].items()) or "none"),
        ("round", str(s["round"])),
        ("loss", fmt.loss(s["loss"])),
        (
            "tokens",
            f"{fmt.count(s['tokens'])} averaged, {fmt.count(s['tokens_failed'])} in failed rounds, "
            f"{fmt.count(s['tokens_pending'])} this round",
        ),
        ("throughput", fmt.rate(s["tokens_per_s"])),
        ("members", f"{s['peers']} (run view: /run)"),
        ("state hash", s["state_hash"][:16] or "–"),
        ("last all-reduce", _last_allreduce(s["last_allreduce"])),
        ("last sync", f"round {sync['round']} from {sync['source']}" if sync.get("at") else "none yet"),
        ("sent / received", f"{fmt.nbytes(s['bytes_sent'])} / {fmt.nbytes(s['bytes_received'])}"),
        ("rejected", ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "none"),
        ("loop lag", f"{fmt.duration(s['loop_lag_s'])} (max {fmt.duration(s['max_loop_lag_s'])})"),
        ("uptime", fmt.duration(s.get("uptime_s"))),
    ]


def render_dashboard(s: dict[str, Any]) -> str:
    """The node's own dashboard from its `/status` record."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in dashboard_rows(s))
    chart = loss_svg([(int(r), float(v)) for r, v in s["loss_history"]])
    body = (
        f'<h1>intellect-node <span class="muted">{escape(fmt.peer(s["peer_id"]))}</span></h1>'
        f'<table id="status">{rows}</table><h2>loss per round</h2><div id="chart">{chart}</div>'
        '<p><a href="/run">the whole run</a> · <a href="/status">status JSON</a> · '
        '<a href="/metrics">metrics</a></p>'
    )
    return _page("intellect-node", body)


def _contributions(d: dict[str, Any]) -> str:
    rows = d.get("contributions") or []
    if not rows:
        return NO_DATA
    table = _table(
        ("peer", "tokens", "rounds"),
        ((c["peer_text"], c["tokens_text"], str(c["rounds"])) for c in rows),
        numeric=(1, 2),
    )
    more = d.get("contributing_peers", 0) - len(rows)
    return table + (f'<p class="muted">and {more} more peers</p>' if more > 0 else "")


def render_run_page(d: dict[str, Any]) -> str:
    """The run view from the `/run.json` snapshot."""
    name = f"{d['run_name']} {d['run_id'][:16]}".strip() or "no run joined yet"
    summary = [
        ("members", str(d["member_count"])),
        ("highest round", fmt.UNKNOWN if d["highest_round"] is None else str(d["highest_round"])),
        ("latest loss", d["latest_loss_text"]),
        ("this node", f"{fmt.peer(d['me'])}, {d['phase']}, round {d['round']}"),
        ("receipts held", str(d["receipts"])),
    ]
    members = _table(
        ("member", "round", "loss", "throughput", "reachability", "last averaging", "heard"),
        (
            (
                m["peer_text"] + (" (this node)" if m["me"] else "" if m["member"] else " (not listed)"),
                fmt.UNKNOWN if m["round"] is None else str(m["round"]),
                m["loss_text"],
                m["rate_text"],
                m["reachability"],
                m["last_averaging"],
                m["heard_text"],
            )
            for m in d["members"]
        ),
        numeric=(1, 2, 3),
    )
    chart = loss_svg([(p["round"], p["loss"]) for p in d["loss_curve"]])
    steps = d["timeline"]
    timeline = (
        _table(
            ("round", "groups (sizes)", "outcome", "failed attempts", "all-reduce", "losses reported"),
            (
                (
                    str(t["round"]),
                    t["groups_text"],
                    t["outcome"],
                    f"{t['failures']} ({', '.join(t['failure_reasons'])})" if t["failures"] else "0",
                    t["allreduce_text"],
                    str(t["losses"]),
                )
                for t in steps
            ),
            numeric=(0, 3, 5),
        )
        if steps
        else NO_DATA
    )
    body = (
        f"<h1>run {escape(name)}</h1>"
        + _table(("", ""), summary).replace("<tr><th></th><th></th></tr>", "", 1)
        + f'<h2>members</h2><div id="members">{members}</div>'
        + f'<h2>mean loss per round (as members report it)</h2><div id="chart">{chart}</div>'
        + f'<h2>rounds</h2><div id="timeline">{timeline}</div>'
        + f'<h2>contributions (verified receipts)</h2><div id="contributions">{_contributions(d)}</div>'
        + '<p class="muted">groups from the contribution receipts this node holds; failed attempts are '
        "this node's own; a member's loss, round and throughput are its own signed claims. "
        '<a href="/run.json">data</a> · <a href="/">this node</a></p>'
    )
    return _page(f"run {name}", body)
