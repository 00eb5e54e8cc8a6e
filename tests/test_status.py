"""The control API: JSON status, per-node Prometheus metrics, dashboard, port file, loopback only."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from intellect.node.app.logs import JsonFormatter, LoopLagCanary
from intellect.node.app.status import AveragingOutcome, NodeStatus, StatusServer, fetch_status, read_port


async def _serve(status: NodeStatus, tmp_path: Path) -> tuple[StatusServer, asyncio.Task[None]]:
    server = StatusServer(status, 0, tmp_path / "http.port")
    task = asyncio.create_task(server.run())
    async with asyncio.timeout(10):
        await server.ready.wait()
    return server, task


async def test_status_metrics_dashboard(tmp_path: Path) -> None:
    status = NodeStatus(peer_id="12D3KooWtest", run_id="ab" * 32, run_name="tiny", round=3, loss=4.25)
    status.tokens = 1234
    status.bytes_sent = 999
    status.rejected["BAD_SIGNATURE"] += 2
    status.last_allreduce = AveragingOutcome(round=3, ok=True, seconds=0.5, group_size=3, at=1.0)
    status.loss_history.append((3, 4.25))
    server, task = await _serve(status, tmp_path)
    try:
        assert read_port(tmp_path) == server.port > 0
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}"
            async with http.get(f"{base}/status") as resp:
                body = await resp.json()
            assert body["round"] == 3 and body["loss"] == 4.25 and body["tokens"] == 1234
            assert body["rejected"] == {"BAD_SIGNATURE": 2}
            assert body["last_allreduce"]["ok"] is True and body["loss_history"] == [[3, 4.25]]
            status.round = 4  # the API reads the live record
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            assert 'intellect_round{run="' + "ab" * 8 + '"} 4.0' in text
            assert "intellect_bytes_sent_total" in text
            assert 'intellect_rejected_messages_total{reason="BAD_SIGNATURE"' in text
            assert "intellect_loop_lag_seconds" in text
            # The per-node registry has its own process and platform collectors, and the build info.
            assert "process_cpu_seconds_total" in text and "python_info" in text
            assert text.count("# TYPE process_cpu_seconds_total") == 1
            assert 'intellect_build_info{python="' in text
            async with http.get(f"{base}/") as resp:
                assert "intellect-node" in await resp.text()
        # The blocking client used by `intellect-node status`.
        got = await asyncio.to_thread(fetch_status, tmp_path)
        assert got["round"] == 4 and got["peer_id"] == "12D3KooWtest"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not (tmp_path / "http.port").exists()


async def test_two_nodes_have_separate_registries(tmp_path: Path) -> None:
    a, b = NodeStatus(round=1), NodeStatus(round=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sa, ta = await _serve(a, tmp_path / "a")
    sb, tb = await _serve(b, tmp_path / "b")
    try:
        assert sa.port != sb.port
        got_a = await asyncio.to_thread(fetch_status, tmp_path / "a")
        got_b = await asyncio.to_thread(fetch_status, tmp_path / "b")
        assert (got_a["round"], got_b["round"]) == (1, 2)
    finally:
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)


async def test_loop_lag_canary_sees_a_blocked_loop() -> None:
    canary = LoopLagCanary(interval_s=0.05, warn_s=10.0)
    task = asyncio.create_task(canary.run())
    try:
        async with asyncio.timeout(5):
            await canary.ready.wait()
        import time

        time.sleep(0.3)  # block the loop on purpose
        await asyncio.sleep(0.2)
        assert canary.max_lag_s >= 0.2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("intellect.test", logging.INFO, __file__, 1, "round %d done", (5,), None)
    record.state_hash = "abc"
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "round 5 done" and out["level"] == "INFO" and out["state_hash"] == "abc"
    assert out["logger"] == "intellect.test"


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_status_before_any_attempt_says_none_yet() -> None:
    """#16 finding 10: a fresh node's `status` said "all-reduce round 0: failed" before any attempt."""
    from intellect.node.app.metrics import make_registry
    from intellect.node.cli.daemon import _fmt_status
    from prometheus_client import generate_latest

    fresh = NodeStatus(peer_id="12D3KooWfresh", phase="waiting-for-peers").to_json()
    text = _fmt_status(fresh)
    assert "all-reduce  none yet" in text and "failed in" not in text, text
    assert "last sync   none yet" in text
    metrics = generate_latest(make_registry(NodeStatus())).decode()
    assert "intellect_allreduce_ok" not in metrics  # no attempt: no "last attempt failed" either


def test_failed_rounds_tokens_histograms_phase_and_uptime() -> None:
    """#16 finding 10: tokens of a round whose all-reduce failed are counted apart from the tokens in the
    run's state (they used to be counted as trained); histograms of round and all-reduce durations; the
    phase as a labelled gauge; uptime; build info; process metrics."""
    from intellect.node.app.metrics import make_registry
    from intellect.node.cli.daemon import _fmt_status
    from intellect.node.run import events as ev
    from prometheus_client import generate_latest

    s = NodeStatus(run_id="cd" * 32)
    s.started_at -= 42
    registry = make_registry(s)
    for e in (
        ev.PhaseChanged("training"),
        ev.Trained(1, 10, 1000, 5.0, 100.0),
        ev.PhaseChanged("averaging"),
        ev.Averaged(1, False, 0.3, 0, "deadline", 0, 0),
        ev.PhaseChanged("training"),
        ev.Trained(1, 10, 700, 4.0, 100.0),
    ):
        s.apply(e)
    assert (s.tokens, s.tokens_failed, s.tokens_pending) == (0, 1000, 700)
    for e in (
        ev.PhaseChanged("averaging"),
        ev.Averaged(1, True, 2.0, 2, "", 10, 10),
        ev.PhaseChanged("checkpointing"),
        ev.Committed(1, "ab" * 32, 4.0, 700, 2, 2.0),
        ev.PhaseChanged("training"),
    ):
        s.apply(e)
    assert (s.tokens, s.tokens_failed, s.tokens_pending) == (700, 1000, 0)
    body = s.to_json()
    assert body["tokens"] == 700 and body["tokens_failed"] == 1000 and "round_durations" not in body
    json.dumps(body)  # the status API's body stays plain JSON
    assert "700 averaged, 1000 in failed rounds, 0 this round" in _fmt_status(body)

    text = generate_latest(registry).decode()
    run = "cd" * 8
    assert _metric(text, "intellect_tokens_total", run=run) == 700
    assert _metric(text, "intellect_tokens_failed_total", run=run) == 1000
    assert _metric(text, "intellect_round_duration_seconds_count", run=run) == 2
    assert _metric(text, "intellect_allreduce_duration_seconds_count", run=run, outcome="failed") == 1
    assert _metric(text, "intellect_allreduce_duration_seconds_count", run=run, outcome="ok") == 1
    assert _metric(text, "intellect_allreduce_duration_seconds_sum", run=run, outcome="ok") == 2.0
    assert _metric(text, "intellect_allreduce_duration_seconds_bucket", run=run, outcome="ok", le="2.5") == 1
    assert _metric(text, "intellect_allreduce_duration_seconds_bucket", run=run, outcome="ok", le="1.0") == 0
    assert _metric(text, "intellect_phase", phase="training") == 1
    assert _metric(text, "intellect_phase", phase="averaging") == 0
    assert _metric(text, "intellect_uptime_seconds") >= 42
    assert _metric(text, "intellect_build_info") == 1
    assert _metric(text, "process_start_time_seconds") > 0


async def test_metrics_alone_on_a_configured_address(tmp_path: Path) -> None:
    """#16 finding 10: `metrics_addr` (`--metrics-addr 0.0.0.0:9100`) serves /metrics, and nothing else,
    where Prometheus can scrape a container or pod; the control API stays on 127.0.0.1."""
    import socket

    from intellect.node.app.config import ConfigError, NodeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = NodeStatus(run_id="ef" * 32, round=7)
    server = StatusServer(status, 0, tmp_path / "http.port", metrics_addr=f"0.0.0.0:{port}")
    task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert 'intellect_round{run="' + "ef" * 8 + '"} 7.0' in await resp.text()
            for path in ("/status", "/"):  # the control API is not on the metrics address
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 404
            async with http.get(f"http://127.0.0.1:{server.port}/status") as resp:
                assert resp.status == 200
        # A second node asking for the same address gets an error that names it.
        other = StatusServer(NodeStatus(), 0, None, metrics_addr=f"0.0.0.0:{port}")
        with pytest.raises(OSError, match=rf"cannot serve metrics on 0\.0\.0\.0:{port} \(metrics_addr\)"):
            await other.run()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert NodeConfig(metrics_addr="[::]:9100").metrics_addr == "[::]:9100"
    for bad in ("9100", "0.0.0.0", "0.0.0.0:0", "host:99999", ":9100"):
        with pytest.raises(ConfigError, match="metrics_addr"):
            NodeConfig(metrics_addr=bad)
