"""The run view (issue #19, item 1) without a swarm: numbers for people, the fold of events into the
run's members, loss curve and timeline, the pages drawn from them, `/run.json` over HTTP, and
`intellect-node watch --once` against a control API that serves a fixed snapshot."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from intellect.crypto.identity import Identity
from intellect.node.app import fmt
from intellect.node.app.pages import NO_DATA, loss_svg, render_dashboard, render_run_page
from intellect.node.app.runview import RunLog, RunPages, snapshot
from intellect.node.app.status import AveragingOutcome, NodeStatus, StatusServer
from intellect.node.cli.main import cli
from intellect.node.cli.watch import render as watch_render
from intellect.node.net.receiptnet import ReceiptLedger
from intellect.node.net.receiptstore import store_receipt
from intellect.node.run import events as ev
from intellect.node.run.peerbook import PeerBook
from intellect.node.run.service import data_root
from intellect.protocol.gossip_messages import Progress
from intellect.protocol.receipts import Receipt
from intellect.protocol.records import MembershipRecord
from rich.console import Console

RUN = "ab" * 32
ME, BOB, CAROL = (Identity.generate().peer_id for _ in range(3))
DIRECT = "/ip4/192.0.2.7/tcp/4001/p2p/" + BOB
CIRCUIT = "/ip4/192.0.2.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit/p2p/" + CAROL


@pytest.mark.parametrize(
    ("value", "text"),
    [(2.364130771160126, "2.364"), (12.3456, "12.35"), (0.004213, "0.004213"), (None, "–")],
)
def test_loss_to_four_significant_digits(value: float | None, text: str) -> None:
    assert fmt.loss(value) == text


def test_bytes_rates_durations_and_peer_ids_for_people() -> None:
    assert [fmt.nbytes(n) for n in (0, 999, 1500, 12_345_678, 1.2e9)] == [
        "0 B",
        "999 B",
        "1.50 KB",
        "12.3 MB",
        "1.20 GB",
    ]
    assert [fmt.rate(r) for r in (0, 850.4, 12_345, 1.2e6)] == [
        "0 tokens/s",
        "850 tokens/s",
        "12.3k tokens/s",
        "1.20M tokens/s",
    ]
    assert [fmt.duration(s) for s in (0.4213, 12.34, 312, 7600, None)] == [
        "0.421 s",
        "12.3 s",
        "5.2 min",
        "2.1 h",
        "–",
    ]
    assert fmt.count(1_234_567) == "1.23M" and fmt.ago(4.2) == "4 s ago" and fmt.ago(None) == "never"
    assert fmt.peer(BOB) == f"12D3…{BOB[-6:]}"
    assert fmt.peer("short") == "short"


def test_the_peer_book_passes_on_sane_progress_and_each_records_reachability() -> None:
    seen: list[ev.Event] = []
    book = PeerBook(ME, RUN, seen.append)
    book.on_progress(BOB, Progress(4, 100, 1000, 2.5, 1234.0, "cd" * 32))
    book.on_progress(BOB, Progress(5, 100, 1000, float("nan"), 1234.0))  # dropped
    book.on_progress(ME, Progress(4, 100, 1000, 2.5, 1.0))  # our own: not a member's claim
    assert [e for e in seen if isinstance(e, ev.PeerProgress)] == [ev.PeerProgress(BOB, 4, 2.5, 1234.0)]
    now = time.time()

    def record(peer: str, maddrs: tuple[str, ...]) -> MembershipRecord:
        return MembershipRecord(RUN, peer, maddrs, "", 4, 99.0, "trainer", "cd" * 32, now, now + 60)

    book.on_members([record(BOB, (DIRECT,)), record(CAROL, (CIRCUIT,)), record(ME, ())])
    got = {e.peer: e.relayed for e in seen if isinstance(e, ev.MemberSeen)}
    assert got == {BOB: False, CAROL: True, ME: None}


def _folded() -> tuple[RunLog, NodeStatus]:
    log = RunLog()
    status = NodeStatus(peer_id=ME, run_id=RUN, run_name="tiny", round=2, loss=3.2109876, tokens_per_s=2500.0)
    status.last_allreduce = AveragingOutcome(round=2, ok=True, seconds=0.8, group_size=3, at=1.0)
    for e in (
        ev.MembersChanged((BOB, CAROL, ME)),
        ev.MemberSeen(BOB, 1, 900.0, False),
        ev.MemberSeen(CAROL, 2, 0.0, True),
        ev.Committed(1, "h1", 3.5, 1000, 3, 0.7),
        ev.PeerProgress(BOB, 1, 3.6, 1100.0),
        ev.PeerProgress(CAROL, 1, 3.4, 12_500.0),
        ev.Averaged(2, False, 5.0, 2, "timeout", 0, 0),
        ev.Averaged(2, True, 0.8, 3, "", 0, 0),
        ev.Committed(2, "h2", 3.25, 1000, 3, 0.8),
        ev.PeerProgress(CAROL, 2, 3.15, 12_000.0),
    ):
        log.apply(e)
    return log, status


def _receipt(round_: int, members: tuple[str, ...]) -> Receipt:
    n = len(members)
    return Receipt(RUN, round_, bytes([round_]) * 16, members, (512.0,) * n, b"\0" * 32, (b"",) * n)


def test_the_log_joins_members_losses_and_rounds() -> None:
    log, status = _folded()
    snap = snapshot(log, status, [_receipt(1, (ME, BOB, CAROL)), _receipt(2, (ME, CAROL))])
    assert snap["member_count"] == 3 and snap["highest_round"] == 2
    rows = {m["peer"]: m for m in snap["members"]}
    assert snap["members"][0]["me"] is True
    assert rows[ME]["loss_text"] == "3.211" and rows[ME]["rate_text"] == "2.50k tokens/s"
    assert rows[BOB]["reachability"] == "public" and rows[CAROL]["reachability"] == "relayed"
    assert rows[CAROL]["loss_text"] == "3.15" and rows[CAROL]["rate_text"] == "12.0k tokens/s"
    assert rows[BOB]["last_averaging"] == "round 1: ok, group of 3 (receipt)"
    assert rows[CAROL]["last_averaging"] == "round 2: ok, group of 2 (receipt)"
    assert rows[ME]["last_averaging"] == "round 2: ok, group of 3, 0.800 s"
    assert [(p["round"], round(p["loss"], 4), p["reports"]) for p in snap["loss_curve"]] == [
        (1, 3.5, 3),
        (2, 3.2, 2),
    ]
    first, second = snap["timeline"]
    assert first["round"] == 2 and first["groups_text"] == "2" and first["failures"] == 1
    assert first["failure_reasons"] == ["timeout"] and first["outcome"] == "ok"
    assert second["round"] == 1 and second["groups"] == [3]
    json.dumps(snap)  # plain data


def test_contributions_come_from_the_verified_ledger_on_the_page_and_in_watch() -> None:
    """The run view lists what the node's ledger of verified receipts credits (the numbers `/metrics`
    exports), not the unverified receipt files it reads for group sizes."""
    log, status = _folded()
    assert snapshot(log, status, [])["contributions"] == []
    assert "no data yet" in render_run_page(snapshot(log, status, []))
    ledger = ReceiptLedger()
    ledger.run_id = RUN
    ledger.add(_receipt(1, (ME, BOB, CAROL)))
    ledger.add(_receipt(2, (ME, CAROL)))
    snap = snapshot(log, status, [], ledger)
    got = {c["peer"]: (c["tokens"], c["rounds"]) for c in snap["contributions"]}
    assert got == {ME: (1024.0, 2), CAROL: (1024.0, 2), BOB: (512.0, 1)}
    assert snap["contributing_peers"] == 3 and snap["contributions"][-1]["peer"] == BOB
    page = render_run_page(snap)
    assert 'id="contributions"' in page and fmt.peer(BOB) in page and "1.02k" in page
    frame = Console(width=200, record=True)
    frame.print(watch_render(snap))
    text = frame.export_text()
    assert "contributions (verified receipts)" in text and fmt.peer(CAROL) in text and "1.02k" in text


def test_a_member_heard_only_by_gossip_is_unknown_until_its_record() -> None:
    log = RunLog()
    log.apply(ev.PeerProgress(BOB, 3, 2.0, 10.0))
    snap = snapshot(log, NodeStatus(peer_id=ME, run_id=RUN), [])
    bob = next(m for m in snap["members"] if m["peer"] == BOB)
    assert bob["reachability"] == "unknown" and bob["last_averaging"] == "unknown" and not bob["member"]
    assert snap["member_count"] == 1


def test_the_loss_chart_has_labelled_axes_and_says_no_data_yet_without_points() -> None:
    assert loss_svg([]) == NO_DATA
    svg = loss_svg([(3, 2.5), (4, 2.25), (9, 1.875)])
    assert svg.startswith("<svg") and ">round</text>" in svg and ">loss</text>" in svg
    assert ">3</text>" in svg and ">9</text>" in svg and "round 9: loss 1.875" in svg
    one = loss_svg([(0, 5.5)])
    assert "<circle" in one and ">0</text>" in one


def test_pages_show_formatted_numbers_and_escape_what_peers_say() -> None:
    log, status = _folded()
    status.run_name = "<script>x</script>"
    page = render_run_page(snapshot(log, status, []))
    assert "<script>x" not in page and "&lt;script&gt;" in page
    assert "3.211" in page and "12.0k tokens/s" in page and ">round</text>" in page
    fresh = NodeStatus(peer_id=ME)
    assert "no data yet" in render_run_page(snapshot(RunLog(), fresh, []))
    dash = render_dashboard(fresh.to_json())
    assert "no data yet" in dash and "<svg" not in dash
    status.bytes_sent, status.loss_history = 12_345_678, type(status.loss_history)([(1, 3.5), (2, 3.25)])
    dash = render_dashboard(status.to_json())
    assert "12.3 MB" in dash and ">loss</text>" in dash and "no data yet" not in dash


async def test_run_json_and_run_page_over_http_read_the_kept_receipts(tmp_path: Path) -> None:
    log, status = _folded()
    store_receipt(data_root(tmp_path, RUN) / "receipts", _receipt(1, (ME, BOB, CAROL)))
    pages = RunPages(log, status, tmp_path)
    server = StatusServer(status, 0, None, routes=pages.routes)
    task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}"
            async with http.get(f"{base}/run.json") as resp:
                data = await resp.json()
            async with http.get(f"{base}/run") as resp:
                page = await resp.text()
                assert resp.content_type == "text/html"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert data["receipts"] == 1 and data["member_count"] == 3
    assert next(m for m in data["members"] if m["peer"] == BOB)["last_averaging"].startswith("round 1: ok")
    assert "members" in page and "3.211" in page


def _serve_json(data_dir: Path, body: dict[str, Any]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            raw = json.dumps(body).encode() if self.path == "/run.json" else b"{}"
            self.send_response(200 if self.path == "/run.json" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "http.port").write_text(f"{server.server_address[1]}\n")
    return server


@pytest.mark.timeout(60)
def test_watch_once_prints_one_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INTELLECT_NODE_")]:
        monkeypatch.delenv(key)
    log, status = _folded()
    server = _serve_json(tmp_path / "node", snapshot(log, status, [_receipt(1, (ME, BOB, CAROL))]))
    try:
        runner = CliRunner()
        args = ["watch", RUN[:12], "--once", "--data-dir", str(tmp_path / "node")]
        got = runner.invoke(cli, args, env={"COLUMNS": "200"})
        other = runner.invoke(cli, ["watch", "cd" * 6, "--once", "--data-dir", str(tmp_path / "node")])
    finally:
        server.shutdown()
        server.server_close()
    assert got.exit_code == 0, got.output
    out = got.output
    assert "3 members" in out and "highest round 2" in out and "latest loss 3.2" in out
    assert fmt.peer(CAROL) in out and "relayed" in out and "12.0k tokens/s" in out and "timeout" in out
    assert other.exit_code != 0 and "not cdcdcdcdcdcd" in other.output
    missing = runner.invoke(cli, ["watch", RUN[:12], "--once", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no node is running" in missing.output
