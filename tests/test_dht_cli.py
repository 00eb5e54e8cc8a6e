"""`intellect-node bootstrap/seed/runs/peers` against real entry nodes: ours and hivemind's stock one.

Entry nodes run as subprocesses (their own session, stopped with SIGTERM, reaped by PID); the client
commands run in-process through click's runner, each joining the DHT briefly as a client.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from intellect.crypto.identity import Identity
from intellect.node.cli.main import cli

pytestmark = pytest.mark.swarm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
_LOOPBACK = "/ip4/127.0.0.1/tcp/0"
_MAIN = "from intellect.node.cli.main import main; main()"
_MADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/12D3KooW\w+)")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for c in _children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def _read_maddr(proc: subprocess.Popen[str], stream_name: str, timeout: float) -> str:
    """First loopback multiaddr printed by the entry node, read line by line with a deadline."""
    stream = getattr(proc, stream_name)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            line = stream.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if m := _MADDR.search(line):
                return m.group(1)
        elif proc.poll() is not None:
            break
    raise AssertionError(f"entry node printed no multiaddr in {timeout}s: {''.join(seen)[-2000:]}")


def _stop(proc: subprocess.Popen[str], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the entry node and its p2pd
        proc.wait(5)
        raise


def _start_bootstrap(data: Path) -> subprocess.Popen[str]:
    """`intellect-node bootstrap` in its own session (so a stuck one can be killed with its p2pd)."""
    return subprocess.Popen(
        [sys.executable, "-c", _MAIN, "bootstrap", "--data-dir", str(data), "--listen", _LOOPBACK],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def our_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    data = tmp_path_factory.mktemp("bootstrap")
    proc = _start_bootstrap(data)
    try:
        maddr = _read_maddr(proc, "stdout", 120)
        assert maddr.endswith("/p2p/" + Identity.load(data / "identity.key").peer_id)
        yield maddr, proc
    finally:
        _stop(proc)


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def researcher_dir(tmp_path: Path) -> Path:
    code, out, _ = _invoke("init", "--data-dir", str(tmp_path / "res"))
    assert code == 0 and out.strip().startswith("12D3KooW")
    return tmp_path / "res"


def _runs(maddr: str, data: Path) -> list[dict[str, object]]:
    code, out, err = _invoke("runs", "--json", "--bootstrap", maddr, "--data-dir", str(data))
    assert code == 0, err
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def test_malformed_manifest_exits_nonzero_naming_the_field_and_publishes_nothing(
    our_bootstrap: tuple[str, subprocess.Popen[str]], researcher_dir: Path, tmp_path: Path
) -> None:
    maddr, _ = our_bootstrap
    bad = tmp_path / "bad.toml"
    text = EXAMPLE.read_text().replace("inner_steps = 50", 'inner_steps = "fifty"')
    bad.write_text(text.replace('name = "tiny-builtin"', 'name = "never-published"'))
    code, out, err = _invoke("seed", str(bad), "--bootstrap", maddr, "--data-dir", str(researcher_dir))
    assert code != 0
    assert "diloco.inner_steps" in err and "integer" in err
    assert out == ""
    assert all(r["name"] != "never-published" for r in _runs(maddr, researcher_dir))


def test_seed_then_runs_and_peers_through_our_bootstrap(
    our_bootstrap: tuple[str, subprocess.Popen[str]], researcher_dir: Path
) -> None:
    maddr, _ = our_bootstrap
    code, out, err = _invoke("seed", str(EXAMPLE), "--bootstrap", maddr, "--data-dir", str(researcher_dir))
    assert code == 0, err
    run_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", run_id)
    rows = _runs(maddr, researcher_dir)
    row = next(r for r in rows if r["run_id"] == run_id)
    assert row["name"] == "tiny-builtin" and row["model"] == "tiny" and row["peers"] == 0
    code, out, err = _invoke(
        "peers", "--run", run_id, "--json", "--bootstrap", maddr, "--data-dir", str(researcher_dir)
    )
    assert code == 0, err
    assert json.loads(out) == []
    # The 16 characters `runs` prints are enough (a unique prefix); one naming no run says so.
    code, out, err = _invoke(
        "peers", "--run", run_id[:16], "--bootstrap", maddr, "--data-dir", str(researcher_dir)
    )
    assert code == 0 and out.strip() == "no live members", err
    other = "0000" if not any(str(r["run_id"]).startswith("0000") for r in rows) else "ffff"
    code, out, err = _invoke("peers", "--run", other, "--bootstrap", maddr, "--data-dir", str(researcher_dir))
    assert code == 1 and f"no run with ID {other}" in err, err


def test_bootstrap_exits_zero_on_sigterm_leaving_no_daemon(tmp_path: Path) -> None:
    proc = _start_bootstrap(tmp_path / "b")
    try:
        _read_maddr(proc, "stdout", 120)
        daemons = _descendants(proc.pid)
        assert daemons, "the p2p daemon should be a child of the bootstrap process"
    finally:
        rc = _stop(proc)
    assert rc == 0
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in daemons)


def test_stock_hivemind_dht_works_as_bootstrap(researcher_dir: Path, tmp_path: Path) -> None:
    exe = shutil.which("hivemind-dht") or str(Path(sys.executable).parent / "hivemind-dht")
    proc = subprocess.Popen(
        [exe, "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh_period", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        maddr = _read_maddr(proc, "stderr", 120)
        code, out, err = _invoke(
            "seed", str(EXAMPLE), "--bootstrap", maddr, "--data-dir", str(researcher_dir)
        )
        assert code == 0, err
        run_id = out.strip()
        assert any(r["run_id"] == run_id for r in _runs(maddr, researcher_dir))
    finally:
        assert _stop(proc) == 0
