"""Pausing a volunteer node at run time (#16, finding 2): `intellect-node pause|resume|limits` and the
control API's POST /pause, POST /resume, GET /limits. A paused node leaves the run (leaving notice, no
membership record, no lobby intents), keeps its state, and rejoins by catching up when it resumes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from intellect.node.app.config import NodeConfig
from intellect.node.app.control import call
from intellect.node.app.daemon import DaemonOptions, NodeDaemon
from intellect.node.app.status import fetch_status, read_port
from intellect.node.run.pause import USER, PauseGate, hold
from intellect.node.run.phase import Phase, PhaseTracker
from nodeproc import kill_session, seeded_bootstrap, spawn, start_node, wait_for, wait_joining

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = REPO / "node" / "runs" / "tiny-run.toml"


# ---- the gate and the machine's hold ------------------------------------------------------------------


class _Leaver:
    def __init__(self) -> None:
        self.notices: list[tuple[int, str]] = []

    async def leaving(self, round_: int, reason: str = "shutdown") -> None:
        self.notices.append((round_, reason))


async def test_hold_enters_paused_gives_one_leaving_notice_and_waits_for_every_source() -> None:
    gate, seen = PauseGate(), []
    gate.on_change = lambda g: seen.append(g.reason)
    phases = PhaseTracker(lambda e: None, Phase.CHECKPOINTING)
    leaver = _Leaver()
    assert not await hold(gate, phases, leaver, 3)  # open: no pause, no notice
    gate.set(USER, "paused by the volunteer")
    gate.set("schedule", "outside the schedule")
    task = asyncio.create_task(hold(gate, phases, leaver, 3))
    await asyncio.sleep(0.05)
    assert phases.phase is Phase.PAUSED and leaver.notices == [(3, "paused")]
    gate.set(USER, None)
    await asyncio.sleep(0.05)
    assert not task.done()  # the schedule still says no
    gate.set("schedule", None)
    assert await asyncio.wait_for(task, 1)
    phases.enter(Phase.SYNCING)  # resuming catches up first
    assert seen == ["paused by the volunteer", "paused by the volunteer; outside the schedule",
                    "outside the schedule", ""]  # fmt: skip


async def test_control_api_pauses_resumes_and_refuses_requests_without_its_header(tmp_path: Path) -> None:
    async def body(daemon: NodeDaemon) -> None:
        daemon.phases.enter(Phase.JOINING)
        await asyncio.Event().wait()

    config = NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",))
    daemon = NodeDaemon(config, DaemonOptions(report_interval_s=0.2), body=body)
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(10):
        await daemon.ready.wait()
    data = config.data_dir
    got = await asyncio.to_thread(call, data, "/pause", True)
    assert got["paused"] and got["reasons"] == {"user": "paused by the volunteer"}
    assert daemon.gate.paused
    status = await asyncio.to_thread(fetch_status, data)
    assert status["paused"] and status["pause_reasons"] == {"user": "paused by the volunteer"}
    # A web page cannot add the header: a bare POST (what a cross-site form sends) is refused.
    port = read_port(data)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/resume", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        await asyncio.to_thread(urllib.request.urlopen, req, None, 5)
    assert e.value.code == 403 and daemon.gate.paused
    got = await asyncio.to_thread(call, data, "/resume", True)
    assert not got["paused"] and not daemon.gate.paused
    assert (await asyncio.to_thread(call, data, "/limits"))["paused"] is False
    daemon.request_stop()
    async with asyncio.timeout(10):
        await task


# ---- a real node --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seeded_bootstrap(
        tmp_path_factory.mktemp("boot"), tmp_path_factory.mktemp("researcher"), TINY_RUN
    ) as boot:
        yield boot


def _cli(*args: str) -> tuple[int, str, str]:
    proc = spawn(list(args))
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc)
    return proc.returncode, out.decode(), err.decode()


def _status(data: Path) -> dict[str, Any]:
    try:
        return fetch_status(data)
    except (OSError, ValueError):
        return {}


def test_a_started_node_pauses_tells_the_run_it_leaves_and_trains_again_when_resumed(
    tmp_path: Path, seeded: str
) -> None:
    data = tmp_path / "node"
    proc = start_node(data, seeded, "--device", "cpu", "--cpu-threads", "1", log=tmp_path / "node")
    try:
        wait_joining(data, proc, 90)
        wait_for(lambda: _status(data).get("phase") == "training", 180, "the node never trained")
        code, out, err = _cli("pause", "--data-dir", str(data))
        assert code == 0, err
        assert "paused by the volunteer" in out
        wait_for(lambda: _status(data).get("phase") == "paused", 60, "the node did not pause")
        before = _status(data)
        assert before["paused"] and before["pause_reasons"] == {"user": "paused by the volunteer"}
        assert before["limits"]["cpu_threads"] == 1
        code, out, _ = _cli("status", "--data-dir", str(data))
        assert re.search(r"phase\s+paused", out) and "paused by the volunteer (user)" in out
        asyncio.run(asyncio.sleep(4))
        after = _status(data)
        assert after["phase"] == "paused"  # no training while paused: no round ended, none started
        for key in ("rounds_ok", "rounds_failed", "tokens_pending", "round"):
            assert after[key] == before[key], key
        log = (tmp_path / "node.err").read_text()
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        messages = [str(r.get("msg", "")) for r in records]
        assert any(m.startswith("paused (paused by the volunteer): leaving the run") for m in messages)
        code, out, err = _cli("resume", "--data-dir", str(data))
        assert code == 0, err
        assert re.search(r"paused\s+no", out)
        wait_for(lambda: _status(data).get("phase") == "training", 120, "the node did not train again")
        code, out, _ = _cli("limits", "--data-dir", str(data), "--json")
        assert code == 0 and json.loads(out)["paused"] is False
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0
    finally:
        kill_session(proc)
