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
            # Only our metrics: the per-node registry holds no process/platform collectors of the global one.
            assert "process_cpu_seconds_total" not in text
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
