"""The user guide's walkthrough, run as written: the commands are read from docs/user-guide.md, not copied.

Every `intellect-node …` line in the guide's bash blocks is collected by subcommand. The test runs them
through bash as a reader would paste them, with `intellect-node` on PATH, `$BOOTSTRAP` and `$RUN_ID` set as
the guide sets them, and only these substitutions, each one what the reader is told to do:

* the guide's example bootstrap address (documentation range, port 4001) becomes the real one;
* the bootstrap node listens on a free loopback port instead of 0.0.0.0:4001;
* `my-run.toml` is the guide's own example manifest (`examples/tiny-run.toml`);
* each participant's data directory comes from `INTELLECT_NODE_DATA_DIR`, which the guide documents, and
  nodes listen on loopback (`INTELLECT_NODE_LISTEN`) with one CPU thread (`INTELLECT_NODE_CPU_THREADS`).

The walk: bootstrap, init ×3, seed, runs, start ×2, peers, status, pause, resume, limits, then Ctrl-C sent
to each node's whole process group as a terminal does, which must leave exit 0, no traceback on stderr and
no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from intellect.node.app.status import fetch_status
from nodeproc import clean_env, kill_session, session_pids, wait_for

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "user-guide.md"
EXAMPLE_BOOTSTRAP = "/ip4/203.0.113.10/tcp/4001/p2p/12D3KooWExampleBootstrapPeerId"
PEER_ID = re.compile(r"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}")


def guide_commands() -> dict[str, list[str]]:
    """The guide's `intellect-node` command lines (from ```bash blocks), by subcommand, in order."""
    found: dict[str, list[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("intellect-node "):
                found.setdefault(line.split()[1], []).append(line)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Reader:
    """Runs guide lines through bash as one participant (its own data directory), in `cwd`."""

    def __init__(self, tmp: Path, name: str, extra: dict[str, str]) -> None:
        self.data = tmp / name
        self.cwd = tmp
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "intellect-node"
        if not shim.exists():
            shim.write_text(
                f"#!/bin/sh\nexec {sys.executable} -c "
                "'from intellect.node.cli.main import main; main()' \"$@\"\n"
            )
            shim.chmod(0o755)
        self.env = clean_env(
            PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            INTELLECT_NODE_DATA_DIR=str(self.data),
            INTELLECT_NODE_LISTEN="/ip4/127.0.0.1/tcp/0",
            INTELLECT_NODE_CPU_THREADS="1",
            PYTHONUNBUFFERED="1",
            **extra,
        )

    def spawn(
        self, line: str, out: Any = subprocess.PIPE, err: Any = subprocess.PIPE
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["bash", "-c", line],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a process group of its own, as a terminal's foreground job
        )

    def run(self, line: str, timeout: float = 120.0) -> str:
        proc = self.spawn(line)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            kill_session(proc)
        assert proc.returncode == 0, f"{line!r} exited {proc.returncode}: {err.decode()[-2000:]}"
        assert b"Traceback" not in err, err.decode()[-2000:]
        return out.decode()


def _status(data: Path) -> dict[str, Any]:
    try:
        return fetch_status(data)
    except (OSError, ValueError):
        return {}


def _start(reader: Reader, line: str, log: Path) -> subprocess.Popen[bytes]:
    """A long-running command with its output in files (a pipe nobody reads would fill and stop it)."""
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        return reader.spawn(line, out, err)


def _ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGINT to the node's whole process group, as a terminal sends it: exit 0, no traceback, nothing
    left running."""
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    stderr = Path(f"{log}.err").read_text(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    wait_for(lambda: not session_pids(proc.pid), 20, "processes of the node outlived it")


@pytest.mark.swarm
@pytest.mark.timeout(600)
def test_the_user_guides_walkthrough_runs_as_written(tmp_path: Path) -> None:
    cmds = guide_commands()
    for sub in ("init", "bootstrap", "seed", "runs", "peers", "start", "status", "pause", "resume", "limits"):
        assert cmds.get(sub), f"the guide shows no `intellect-node {sub}` command"
    shutil.copy(ROOT / "examples" / "tiny-run.toml", tmp_path / "my-run.toml")
    (bootstrap_line,) = cmds["bootstrap"]
    assert "/ip4/0.0.0.0/tcp/4001" in bootstrap_line
    start_line = next(c for c in cmds["start"] if EXAMPLE_BOOTSTRAP in c)

    # An operator starts the bootstrap node and hands out its address.
    operator = Reader(tmp_path, "operator", {})
    boot = operator.spawn(
        bootstrap_line.replace("/ip4/0.0.0.0/tcp/4001", f"/ip4/127.0.0.1/tcp/{_free_port()}")
    )
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        assert boot.stdout is not None
        address = boot.stdout.readline().decode().strip()
        assert address.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in address, address

        # A researcher creates an identity and publishes the run; `seed` prints its run ID alone.
        researcher = Reader(tmp_path, "researcher", {"BOOTSTRAP": address})
        assert PEER_ID.fullmatch(researcher.run(cmds["init"][0]).strip())
        (seed_line,) = cmds["seed"]
        run_id = researcher.run(seed_line).strip()
        assert re.fullmatch(r"[0-9a-f]{64}", run_id), run_id
        listing = researcher.run(cmds["runs"][0])
        assert run_id[:16] in listing and "tiny-builtin" in listing, listing

        # Two volunteers: init, then start with the address they were given.
        volunteers = [
            Reader(tmp_path, f"volunteer{i}", {"BOOTSTRAP": address, "RUN_ID": run_id}) for i in (1, 2)
        ]
        ids = [PEER_ID.fullmatch(v.run(cmds["init"][0]).strip()) for v in volunteers]
        assert all(ids)
        peer_ids = [m.group(0) for m in ids if m]
        for i, v in enumerate(volunteers):
            nodes.append(_start(v, start_line.replace(EXAMPLE_BOOTSTRAP, address), tmp_path / f"n{i}"))
        a = volunteers[0]
        wait_for(
            lambda: all(_status(v.data).get("rounds_ok", 0) >= 1 for v in volunteers),
            300,
            "both volunteers completing a round",
        )

        # Anyone looks around: `peers` lists both members of the run, given the 16 characters `runs` shows.
        researcher.env["RUN_ID"] = run_id[:16]

        def listed() -> bool:
            out = researcher.run(cmds["peers"][0])
            return all(p in out for p in peer_ids)

        wait_for(listed, 60, "`peers` listing both volunteers")

        # A volunteer watches, pauses, and resumes their node.
        status = a.run(cmds["status"][0])
        assert re.search(r"phase\s+\S+", status) and peer_ids[0] in status, status
        assert "paused by the volunteer" in a.run(cmds["pause"][0])
        wait_for(lambda: _status(a.data).get("phase") == "paused", 90, "the node pausing")
        assert re.search(r"phase\s+paused", a.run(cmds["status"][0]))
        a.run(cmds["resume"][0])
        assert "paused by the volunteer" not in a.run(cmds["limits"][0])
        done = _status(a.data).get("rounds_ok", 0)
        wait_for(lambda: _status(a.data).get("rounds_ok", 0) > done, 240, "a round after resuming")

        # Ctrl-C in each volunteer's terminal.
        for i, proc in enumerate(nodes):
            _ctrl_c(proc, tmp_path / f"n{i}")
    finally:
        for proc in nodes:
            kill_session(proc)
        kill_session(boot)
