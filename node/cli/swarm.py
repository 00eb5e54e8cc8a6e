"""A local swarm of real daemons on loopback: the demo (`intellect-node swarm`) and the CI workhorse.

`Swarm` hosts a bootstrap DHT node in this process, seeds a run through it (signed by a throw-away
researcher key), and launches `intellect-node start` as separate processes, each with its own data
directory under the swarm's work directory and its own process group, so that everything a peer started
(its p2p daemon, its local-rank workers) can be found and reaped even after the peer itself was SIGKILLed.

Each daemon appends one JSON line per completed round to `<data dir>/rounds.jsonl`; the swarm reads those
to show progress and to build the summary:

    {"run_id": str, "rounds": [{"round": int, "peers": {PEER_ID: {"loss": float, "state_hash": str,
     "bytes_sent": int}}}], "peers": {PEER_ID: {"exit_code": int}}, "ok": bool, "problems": [str]}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.app.roundlog import ROUNDS_LOG

logger = logging.getLogger("intellect.node.cli.swarm")

#: Environment variables every swarm peer gets: loopback only, one torch thread (2-core CI machines).
_PEER_ENV = {
    "INTELLECT_NODE_LISTEN": "/ip4/127.0.0.1/tcp/0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Peer:
    """One launched `intellect-node start` process."""

    name: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    peer_id: str = ""
    #: Process group id (= the peer's PID: it is started in a new session).
    pgid: int = 0
    killed: bool = False
    #: "trainer" (a member: reports rounds) or "rollout" (an RL run's worker: no rounds of its own).
    role: str = "trainer"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rounds(self) -> list[dict[str, Any]]:
        """The rounds this peer has logged so far (complete lines only)."""
        path = self.data_dir / ROUNDS_LOG
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def last_round(self) -> int:
        rounds = self.rounds()
        return max((r["round"] for r in rounds), default=0)


def group_pids(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in the process group `pgid`, or in the session it leads: a peer
    is started in a session of its own, and its children (the p2p daemon) run in process groups of their
    own inside it (from /proc; Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
            continue
        # Fields after the command: state, ppid, pgrp, session, …
        if rest[0] != "Z" and pgid in (int(rest[2]), int(rest[3])):
            out.append(int(entry))
    return out


def _start_command() -> list[str]:
    return [sys.executable, "-c", "from intellect.node.cli.main import main; main()", "start"]


@dataclass
class Swarm:
    """Bootstrap node + seeded run + peer processes. Use `async with Swarm(...) as swarm:`."""

    workdir: Path
    manifest_path: Path | None = None
    log_format: str = "json"
    peers: list[Peer] = field(default_factory=list)
    run_id: str = ""
    bootstrap_maddrs: list[str] = field(default_factory=list)
    _dht: Any = None

    async def __aenter__(self) -> Swarm:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.bootstrap_maddrs:  # else an external bootstrap node (e.g. in a network namespace)
            await self._start_bootstrap()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()
        if self._dht is not None:
            await self._dht.stop()
            self._dht = None

    async def _start_bootstrap(self) -> None:
        from intellect.node.net.dht import DhtService

        cfg = NodeConfig(data_dir=self.workdir / "bootstrap", listen=("/ip4/127.0.0.1/tcp/0",))
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._dht = DhtService(cfg, Identity.load_or_create(cfg.identity_path))
        await self._dht.start()
        pid = self._dht.peer_id
        self.bootstrap_maddrs = [
            m if "/p2p/" in m else f"{m}/p2p/{pid}" for m in self._dht.visible_maddrs if "/127.0.0.1/" in m
        ]
        logger.info("bootstrap node %s at %s", pid, " ".join(self.bootstrap_maddrs))

    async def seed(self, manifest: Any = None) -> str:
        """Sign the run's manifest (`manifest`, else the one at `manifest_path`, else the built-in tiny
        run) with a fresh researcher key and publish it; return the run id."""
        from intellect.node.app.body import load_run_manifest
        from intellect.protocol.manifest import SignedManifest

        researcher = Identity.generate()
        if manifest is None:
            manifest = load_run_manifest(self.manifest_path)
        signed = SignedManifest.sign(manifest, researcher)
        if not await self._dht.publish_manifest(signed):
            raise RuntimeError("the bootstrap node did not store the manifest")
        self.run_id = signed.run_id
        logger.info("seeded run %s (%s)", manifest.name, self.run_id)
        return self.run_id

    def launch(
        self,
        name: str,
        *,
        until_round: int | None = None,
        min_peers: int = 1,
        extra_args: Sequence[str] = (),
        netns: str | None = None,
        role: str = "trainer",
        command: Sequence[str] | None = None,
    ) -> Peer:
        """Start one `intellect-node start` process in its own session, logs to `<workdir>/<name>.log`;
        inside the network namespace `netns` when given (`ip netns exec` keeps the PID and session).
        `command` replaces the `intellect-node start` prefix (a fault-injection wrapper in the tests)."""
        data_dir = self.workdir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        ident = Identity.load_or_create(data_dir / "identity.key")
        args = [
            *(["ip", "netns", "exec", netns] if netns else []),
            *(command or _start_command()),
            "--data-dir",
            str(data_dir),
            "--run",
            self.run_id,
            "--log-format",
            self.log_format,
            "--min-peers",
            str(min_peers),
            "--device",
            "cpu",
        ]
        for m in self.bootstrap_maddrs:
            args += ["--bootstrap", m]
        if until_round is not None:
            args += ["--until-round", str(until_round)]
        if role != "trainer":
            args += ["--role", role]
        args += list(extra_args)
        # A stray INTELLECT_NODE_* of the caller must not reach the peers (only the log level may).
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("INTELLECT_NODE_") or k == "INTELLECT_NODE_LOG_LEVEL"
        }
        env.update(_PEER_ENV)
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        peer = Peer(name, data_dir, proc, log_path, peer_id=ident.peer_id, pgid=proc.pid, role=role)
        self.peers.append(peer)
        logger.info("launched %s (pid %d, peer %s)", name, proc.pid, ident.peer_id)
        return peer

    def kill(self, peer: Peer) -> None:
        """SIGKILL a peer (fault injection); its children are reaped later by `reap`."""
        with contextlib.suppress(ProcessLookupError):
            peer.proc.send_signal(signal.SIGKILL)
        peer.killed = True

    async def wait(self, peer: Peer, timeout_s: float) -> int | None:
        """Wait for a peer to exit; its exit code, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = peer.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.2)
        return None

    async def stop(self, peer: Peer, timeout_s: float = 30.0) -> int:
        """SIGINT, wait up to `timeout_s`, then SIGKILL; then reap the peer's process group."""
        if peer.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                peer.proc.send_signal(signal.SIGINT)
            if await self.wait(peer, timeout_s) is None:
                logger.warning("%s ignored SIGINT for %.0f s; killing it", peer.name, timeout_s)
                self.kill(peer)
                await self.wait(peer, 5.0)
        self.reap(peer)
        code = peer.proc.poll()
        return -9 if code is None else code

    def reap(self, peer: Peer) -> list[int]:
        """SIGKILL whatever is left in the peer's process group (children of a killed peer); their PIDs."""
        left = group_pids(peer.pgid)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return left

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in self.peers))

    def summary(self, rounds: int) -> dict[str, Any]:
        """The summary JSON: per round each peer's loss, hash and bytes sent; per peer its exit code."""
        per_round: dict[int, dict[str, Any]] = {}
        for p in self.peers:
            for entry in p.rounds():
                per_round.setdefault(entry["round"], {})[p.peer_id] = {
                    "loss": entry.get("loss"),
                    "state_hash": entry.get("state_hash"),
                    "bytes_sent": entry.get("bytes_sent", 0),
                    "bytes_received": entry.get("bytes_received", 0),
                    "group_size": entry.get("group_size", 0),
                    "synced": entry.get("synced", False),
                    "gossip_authors": entry.get("gossip_authors", 0),
                }
        problems = []
        for r in range(1, rounds + 1):
            entries = per_round.get(r, {})
            hashes = {e["state_hash"] for e in entries.values()}
            if len(hashes) > 1:
                problems.append(f"round {r}: {len(hashes)} different state hashes")
            for p in self.peers:
                if p.role == "trainer" and not p.killed and p.peer_id not in entries:
                    problems.append(f"round {r}: {p.name} ({p.peer_id}) did not report")
        peers = {}
        for p in self.peers:
            code = p.proc.poll()
            peers[p.peer_id] = {"name": p.name, "exit_code": -9 if code is None else code, "killed": p.killed}
            if not p.killed and code != 0:
                problems.append(f"{p.name} exited with {code}")
        return {
            "run_id": self.run_id,
            "rounds": [{"round": r, "peers": per_round[r]} for r in sorted(per_round)],
            "peers": peers,
            "ok": not problems,
            "problems": problems,
        }


def _progress_line(swarm: Swarm, rounds: int) -> str:
    parts = []
    for p in swarm.peers:
        if p.role != "trainer":
            continue
        rs = p.rounds()
        last = rs[-1] if rs else None
        loss = f"{last['loss']:.3f}" if last and last.get("loss") is not None else "-"
        parts.append(f"{p.name}: round {last['round'] if last else 0}/{rounds} loss {loss}")
    return " | ".join(parts)


async def run_swarm(
    peers: int,
    rounds: int,
    summary_json: Path | None = None,
    workdir: Path | None = None,
    manifest_path: Path | None = None,
    timeout_s: float = 900.0,
) -> tuple[int, dict[str, Any]]:
    """Run the demo swarm to completion; (exit code, summary). Exit 0 only if every peer finished every
    round with identical hashes."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="intellect-swarm-")
        workdir = Path(tmp.name)
    t0 = time.monotonic()
    try:
        async with Swarm(workdir, manifest_path=manifest_path) as swarm:
            await swarm.seed()
            for i in range(peers):
                swarm.launch(f"peer{i}", until_round=rounds, min_peers=peers)
            deadline = time.monotonic() + timeout_s
            last_line = ""
            while time.monotonic() < deadline and any(p.proc.poll() is None for p in swarm.peers):
                await asyncio.sleep(1.0)
                line = _progress_line(swarm, rounds)
                if line != last_line:
                    logger.info("%s", line)
                    last_line = line
            if any(p.proc.poll() is None for p in swarm.peers):
                logger.error("swarm did not finish within %.0f s; stopping the peers", timeout_s)
            await swarm.stop_all()
            summary = swarm.summary(rounds)
            summary["seconds"] = round(time.monotonic() - t0, 1)
            summary["workdir"] = str(workdir)
    finally:
        if tmp is not None and summary_json is None:
            tmp.cleanup()
    return finish(summary, summary_json)


def finish(summary: dict[str, Any], summary_json: Path | None) -> tuple[int, dict[str, Any]]:
    """Write the summary where asked, log its problems; (exit code, summary)."""
    if summary_json is not None:
        Path(summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    for problem in summary["problems"]:
        logger.error("swarm: %s", problem)
    return (0 if summary["ok"] else 1), summary
