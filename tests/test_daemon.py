"""The root service: readiness, control API while running, ordered stop, exit codes, and `kill -INT` on a
real `intellect-node start` process (exit 0 within 30 s, no process left behind)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from intellect.node.app.config import NodeConfig
from intellect.node.app.daemon import EXIT_ERROR, EXIT_OK, DaemonOptions, NodeDaemon
from intellect.node.app.status import fetch_status
from intellect.node.cli.swarm import group_pids
from intellect.node.run.phase import Phase
from intellect.protocol.admission import is_admitted
from nodeproc import bootstrap_node


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",))


async def test_tree_serves_status_and_stops_in_order(tmp_path: Path) -> None:
    events: list[str] = []

    async def body(daemon: NodeDaemon) -> None:
        daemon.phases.enter(Phase.JOINING)
        events.append("body started")
        try:
            await asyncio.Event().wait()
        finally:
            # The body is cancelled first and unwinds while the control API is still up.
            events.append(
                f"body unwinding, http up: {daemon.http.port_file and daemon.http.port_file.exists()}"
            )

    daemon = NodeDaemon(_config(tmp_path), DaemonOptions(report_interval_s=0.2), body=body)
    task = asyncio.create_task(daemon.run())
    async with asyncio.timeout(10):
        await daemon.ready.wait()
    got = await asyncio.to_thread(fetch_status, daemon.config.data_dir)
    assert got["phase"] == "joining"
    assert (daemon.config.data_dir / "daemon.pid").read_text().strip() == str(os.getpid())
    daemon.request_stop()
    async with asyncio.timeout(10):
        code = await task
    assert code == EXIT_OK
    assert events == ["body started", "body unwinding, http up: True"]
    assert not (daemon.config.data_dir / "http.port").exists()
    assert not (daemon.config.data_dir / "daemon.pid").exists()
    assert daemon.status.phase == "stopped"


async def test_body_failure_is_exit_code_1_and_finished_body_is_0(tmp_path: Path) -> None:
    async def failing(daemon: NodeDaemon) -> None:
        raise RuntimeError("manifest does not verify")

    async def finishing(daemon: NodeDaemon) -> None:
        await asyncio.sleep(0.05)

    code = await asyncio.wait_for(NodeDaemon(_config(tmp_path), body=failing).run(), 10)
    assert code == EXIT_ERROR
    code = await asyncio.wait_for(NodeDaemon(_config(tmp_path), body=finishing).run(), 10)
    assert code == EXIT_OK


def test_admission_policies() -> None:
    from intellect.crypto.identity import Identity
    from intellect.node.app.body import load_run_manifest
    from intellect.protocol.records import issue_ticket

    researcher, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
    m = load_run_manifest()
    assert is_admitted(m, researcher.peer_id, alice.peer_id)
    allow = m.__class__(**{**m.__dict__, "admission": m.admission.__class__("allowlist", (alice.peer_id,))})
    assert is_admitted(allow, researcher.peer_id, alice.peer_id)
    assert not is_admitted(allow, researcher.peer_id, bob.peer_id)
    assert is_admitted(allow, researcher.peer_id, researcher.peer_id)
    tick = m.__class__(**{**m.__dict__, "admission": m.admission.__class__("tickets", ())})
    ticket = issue_ticket(researcher, tick.run_id, bob.peer_id, time.time() + 60)
    assert is_admitted(tick, researcher.peer_id, bob.peer_id, ticket)
    assert not is_admitted(tick, researcher.peer_id, alice.peer_id, ticket)  # someone else's ticket
    assert not is_admitted(tick, researcher.peer_id, alice.peer_id)


def test_ticket_command_issues_what_the_node_loads_and_admits(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from intellect.crypto.identity import Identity
    from intellect.node.app.body import load_run_manifest, ticket_loader
    from intellect.node.cli.main import cli

    researcher_dir, volunteer_dir = tmp_path / "researcher", tmp_path / "volunteer"
    runner = CliRunner()
    assert runner.invoke(cli, ["init", "--data-dir", str(researcher_dir)]).exit_code == 0
    researcher = Identity.load(researcher_dir / "identity.key")
    volunteer = Identity.generate()
    m = load_run_manifest()
    tick = m.__class__(**{**m.__dict__, "admission": m.admission.__class__("tickets", ())})
    out = volunteer_dir / "tickets" / tick.run_id
    out.parent.mkdir(parents=True)
    args = ["ticket", tick.run_id, volunteer.peer_id, "--data-dir", str(researcher_dir), "--out", str(out)]
    done = runner.invoke(cli, [*args, "--days", "2"])
    assert done.exit_code == 0, done.output
    loaded = ticket_loader(NodeConfig(data_dir=volunteer_dir))(tick.run_id)
    assert is_admitted(tick, researcher.peer_id, volunteer.peer_id, loaded)
    assert not is_admitted(tick, Identity.generate().peer_id, volunteer.peer_id, loaded)  # other researcher
    bad = runner.invoke(
        cli,
        [
            "ticket",
            "nothex",
            volunteer.peer_id,
            "--data-dir",
            str(researcher_dir),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code != 0 and "run_id" in bad.output and not (tmp_path / "x").exists()


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bootstrap node (with no runs) for the real `start` processes of this module."""
    with bootstrap_node(tmp_path_factory.mktemp("boot")) as maddr:
        yield maddr


def _start_node(data: Path, stdout: int, bootstrap: str) -> subprocess.Popen[bytes]:
    """A real `intellect-node start` on loopback, in its own session (its children have process groups
    of their own in that session)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
    env["INTELLECT_NODE_LISTEN"] = "/ip4/127.0.0.1/tcp/0"
    cmd = [sys.executable, "-c", "from intellect.node.cli.main import main; main()", "start"]
    cmd += ["--data-dir", str(data), "--log-format", "json", "--bootstrap", bootstrap]
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)


def test_sigint_on_start_exits_0_quickly_leaving_nothing(tmp_path: Path, boot: str) -> None:
    """A real `start` (its own p2p daemon, waiting for a run in the DHT): SIGINT -> exit 0, no leftovers."""
    data = tmp_path / "node"
    proc = _start_node(data, subprocess.PIPE, boot)
    try:
        _wait_for(data / "http.port", 60)
        deadline = time.monotonic() + 60
        while fetch_status(data)["phase"] != "joining" or len(group_pids(proc.pid)) < 2:
            assert time.monotonic() < deadline, "daemon never reached the DHT"
            time.sleep(0.3)
        children = [p for p in group_pids(proc.pid) if p != proc.pid]
        assert children, "the p2p daemon should be running in the daemon's session"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert code == 0, out[-3000:]
        assert elapsed < 30
        assert group_pids(proc.pid) == [], "a child process outlived the daemon"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert any("SIGINT received" in entry["msg"] for entry in lines)
        assert not (data / "http.port").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in group_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("second", [False, True])
def test_sigint_while_starting_and_second_sigint(tmp_path: Path, second: bool, boot: str) -> None:
    """SIGINT as soon as the p2p daemon exists (it may still be starting): nothing is left behind. With a
    second signal right after, the daemon kills our children by PID and exits at once (code 130) unless
    the orderly shutdown already finished (0)."""
    data = tmp_path / "node"
    proc = _start_node(data, subprocess.DEVNULL, boot)
    try:
        _wait_for(data / "http.port", 60)
        deadline = time.monotonic() + 60
        while len(group_pids(proc.pid)) < 2:
            assert time.monotonic() < deadline, "p2p daemon never started"
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        if second:
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10 if second else 30)
        assert code in ((0, 130) if second else (0,))
        time.sleep(0.5)
        assert group_pids(proc.pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in group_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)
