"""Real `intellect-node` processes for tests: a bootstrap node, `start`, and their cleanup.

Every process is started in a session of its own, so that a test can signal it as a terminal would
(`os.killpg`) and find, then kill, everything it left behind by that session (`session_pids`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from intellect.node.app.status import fetch_status
from intellect.node.cli.swarm import group_pids

CLI = [sys.executable, "-c", "from intellect.node.cli.main import main; main()"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's INTELLECT_NODE_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    """Live processes in the session (and process group) `sid`: a process started by `spawn` and all
    its children."""
    return group_pids(sid)


def kill_session(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL `proc` and everything left in its session, then reap it."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    for pid in session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def spawn(
    args: Sequence[str], *, stdout: int | IO[Any] = subprocess.PIPE, stderr: int | IO[Any] = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """`intellect-node ARGS` in a session of its own, on loopback, with a clean environment."""
    env = clean_env(INTELLECT_NODE_LISTEN="/ip4/127.0.0.1/tcp/0", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [*CLI, *args], env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
    )


@contextlib.contextmanager
def bootstrap_node(data_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """A running `intellect-node bootstrap` on loopback; yields its first multiaddr."""
    proc = spawn(["bootstrap", "--data-dir", str(data_dir)], stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while not line.startswith(b"/"):
            assert proc.poll() is None, "the bootstrap node exited"
            assert time.monotonic() < deadline, "the bootstrap node printed no address"
            line = proc.stdout.readline()
        yield line.decode().strip()
    finally:
        kill_session(proc)


def start_node(data_dir: Path, bootstrap: str, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    """`intellect-node start` on loopback with JSON logs; stdout goes to `log`.out, stderr to `log`.err
    (files, not pipes: a pipe nobody reads while the node runs would fill up and stop it)."""
    args = ["start", "--data-dir", str(data_dir), "--bootstrap", bootstrap, "--log-format", "json", *extra]
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        return spawn(args, stdout=out, stderr=err)


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.2)


def wait_joining(data_dir: Path, proc: subprocess.Popen[Any], timeout_s: float = 60.0) -> None:
    """Until the node serves its control API, has its p2p daemon, and is in the DHT looking for a run."""
    wait_for(
        lambda: (data_dir / "http.port").exists() or proc.poll() is not None, timeout_s, "no control API"
    )
    assert proc.poll() is None, "the node exited while starting"

    def joined() -> bool:
        with contextlib.suppress(OSError, ValueError):
            # Joining, or already past it (a run found at once moves on before we look).
            phase = fetch_status(data_dir)["phase"]
            return phase not in ("starting", "stopping", "stopped") and len(session_pids(proc.pid)) >= 2
        return False

    wait_for(joined, timeout_s, "the node never reached the DHT")


@contextlib.contextmanager
def seeded_bootstrap(boot_dir: Path, researcher_dir: Path, manifest: Path) -> Iterator[str]:
    """A bootstrap node with `manifest` seeded into its DHT by a fresh researcher; yields its address."""
    with bootstrap_node(boot_dir) as boot:
        spawn(["init", "--data-dir", str(researcher_dir)]).communicate(timeout=60)
        proc = spawn(["seed", str(manifest), "--bootstrap", boot, "--data-dir", str(researcher_dir)])
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            kill_session(proc)
        assert proc.returncode == 0, err.decode()[-2000:]
        yield boot
