"""Benchmark one all-reduce of M fp32 values among N local peers: ours against hivemind's and gloo's.

Every peer is its own process (multiprocessing `fork`: hivemind's averager cannot start in a `spawn`ed
one), all on 127.0.0.1, all with the same inputs (peer i holds N(0, 1) values from seed i), in one run:

- `ours`: `intellect.node.net.allreduce.butterfly_allreduce` over a known group (the data plane alone, as
  tests/test_allreduce.py runs it: TCP connect + signed handshake, reduce-scatter, reduce, all-gather),
  fp32 payloads ("none"), like for like with gloo. `ours_int8`: the same with the node's default payload
  compression (AveragerConfig.compression, int8 blockwise). `ours_libp2p`, `ours_libp2p_int8`: the same
  over the transport the daemon uses, libp2p streams through each peer's own p2p daemon (keyed with the
  peer's identity; Noise/TLS on every byte). `ours_int8_with_matchmaking`: a whole
  `Averager.average` with the default config (signed group records in a real hivemind DHTNode per peer,
  polled every 0.25 s, flatten, all-reduce, unflatten), so the matchmaking cost shows by difference.
- `hivemind`: `hivemind.averaging.DecentralizedAverager` (fp32, `NoCompression`, default part size), one
  `hivemind.DHT` per peer, target and minimum group size N. Each step runs with `require_trigger=True`:
  matchmaking first (timed apart as `matchmaking_seconds`), then all peers pass a barrier and trigger the
  all-reduce; `seconds` is from the trigger to `step` returning (the all-reduce, the in-place update of
  the averaged tensors and hivemind's process plumbing).
- `gloo`: `torch.distributed.all_reduce` (SUM, then divide by N) with the gloo backend on loopback.

Timing: the N peer processes host all implementations at once (set up once, hivemind first since it forks)
and run them interleaved, one round of each in turn, the order rotated every round, so that a machine
whose load drifts (a shared one) treats them alike. Before each repeat the peers meet at a barrier (through
the parent); a repeat takes from the first peer leaving the barrier to the last peer holding its result
(one monotonic clock shared by all processes). Warm-up rounds come first and are not counted; the median of
the rest is reported. Every result of every peer is compared with the exact mean (computed in float64): a
repeat whose error is too large (fp32: relative L2 above 1e-5; int8: above 5e-2) or that raised does not
count (it is listed under `failures`), and the implementation is reported with `ok: false`.
`cpu_seconds_per_peer` is the median CPU time (user + system) of one peer's whole process tree (threads,
hivemind's averager and DHT processes, the p2pds) during a repeat: on a shared machine it shows the work
done, which wall time under load does not (it includes the idle background of the implementations not
running, a few ms).

Bandwidth: `gbps_per_peer` = 2·(N−1)/N · 4·M bytes / seconds, the fp32 data each peer has to send (and
receive) in a bandwidth-optimal all-reduce, so it is comparable across compressions. `loopback_gbps` is
one TCP stream over 127.0.0.1 between two processes (median of 6 × 1 GiB, 3 before and 3 after the rounds);
`optimal_seconds` = 2·(N−1)/N · 4·M / loopback. On one machine all N peers share the CPUs that move every
loopback byte, so `optimal_seconds_shared` = 2·(N−1) · 4·M / loopback (all peers' traffic through one
stream's throughput) is the tighter bound for N > 2 here; ratios are given against both.

    python bench/allreduce.py --peers N --numel M [--repeat R] [--warmup W] [--threads T] [--json]
                              [--shaped-mbit MBIT]

With `--shaped-mbit` (root, iproute2) every peer runs in its own network namespace on a bridge, its link
shaped by tbf to MBIT Mbit/s in each direction (both veth ends), and the optimal time is computed from that
rate instead of loopback (`hivemind` is best left out with `--skip hivemind`: it binds loopback only).

The last line printed is one JSON object with `ours`, `ours_int8`, `hivemind`, `gloo` (each: seconds,
gbps_per_peer, ratio_to_gloo, ratio_to_optimal, max_abs_err, rel_l2_err, ok, ...), `loopback_gbps`,
`optimal_seconds` and the settings. hivemind is imported only in the peer processes of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import psutil
import torch

log = logging.getLogger("bench.allreduce")

#: Largest relative L2 error of a result that counts as averaged, per payload compression.
_TOLERANCE = {"none": 1e-5, "int8": 5e-2}
_LOOPBACK_BYTES = 1 << 30
_LOOPBACK_CHUNK = 4 << 20


# --------------------------------------------------------------------------------------------------------
# Inputs, checks, process-tree CPU time


@dataclass(frozen=True)
class Inputs:
    """What every peer process inherits through fork: all peers' inputs and their exact mean."""

    xs: list[torch.Tensor]
    exact: torch.Tensor
    repeat: int
    warmup: int
    threads: int

    @property
    def rounds(self) -> int:
        return self.warmup + self.repeat


def make_inputs(n: int, numel: int, repeat: int, warmup: int, threads: int) -> Inputs:
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    acc = torch.zeros(numel, dtype=torch.float64)
    for x in xs:
        acc.add_(x.double())
    return Inputs(xs, acc.div_(n).float(), repeat, warmup, threads)


def check(sample: Sample, out: torch.Tensor, exact: torch.Tensor) -> None:
    """Record in `sample` how far `out` is from the exact mean (inf when shapes differ or values are not
    finite), and the fraction of values off by more than 0.05 (far above int8's rounding: not averaged)."""
    out = out.reshape(-1).float()
    if out.shape != exact.shape or not bool(torch.isfinite(out).all()):
        return
    diff = (out - exact).abs_()
    sample.max_abs_err = float(diff.max())
    sample.rel_l2_err = float(diff.norm() / exact.norm())
    sample.wrong_fraction = float((diff > 0.05).float().mean())


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and all its live descendants."""
    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Sample:
    """One peer's view of one repeat."""

    t0: float
    t1: float
    cpu: float
    max_abs_err: float = math.inf
    rel_l2_err: float = math.inf
    wrong_fraction: float = 1.0
    error: str = ""
    extra: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Peer processes and the parent's coordination (barriers and all-gathers over pipes)


class Link:
    """A peer's pipe to the parent: `allgather(obj)` returns every peer's obj (and is a barrier)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def allgather(self, obj: Any = None) -> list[Any]:
        self.conn.send(("sync", obj))
        kind, value = self.conn.recv()
        if kind != "sync":
            raise SystemExit(f"parent said {kind}")
        return list(value)

    def barrier(self) -> None:
        self.allgather(None)


Worker = Callable[[int, int, Link, Inputs], dict[str, list[Sample]]]


def _peer_main(worker: Worker, rank: int, n: int, conn: Connection, inputs: Inputs) -> None:
    _RANK[0] = rank
    if _NETNS:
        _enter_netns(_NETNS[rank])
    torch.set_num_threads(inputs.threads)
    logging.basicConfig(level=logging.WARNING, format=f"peer{rank} %(levelname)s %(name)s: %(message)s")
    try:
        conn.send(("done", worker(rank, n, Link(conn), inputs)))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _reap(procs: list[Any]) -> None:
    """Stop the peer processes we started and everything they started, by PID."""
    for p in procs:
        p.join(timeout=15)
    for p in procs:
        if p.is_alive():
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(p.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            p.kill()
            p.join(timeout=5)


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    """Kill, by PID, those of `procs` still running once their parents are gone (psutil checks reuse)."""
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            log.warning("killing leftover process %d (%s)", proc.pid, proc.name())
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def run_peers(name: str, n: int, worker: Worker, inputs: Inputs, timeout: float) -> dict[str, list[Sample]]:
    """Fork `n` peers running `worker`, serve their all-gathers, return {phase: samples of all peers}.

    Samples of one phase are ordered repeat-major: samples[r * n + rank].
    """
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [
        ctx.Process(target=_peer_main, args=(worker, rank, n, pipes[rank][1], inputs), name=f"{name}-{rank}")
        for rank in range(n)
    ]
    for p in procs:
        p.start()
    conns = [parent for parent, _ in pipes]
    for _, child in pipes:
        child.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            msgs = []
            for rank, conn in enumerate(conns):
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{name}: peer {rank} silent; gave up after {timeout:.0f}s")
                try:
                    msgs.append(conn.recv())
                except EOFError:
                    code = procs[rank].exitcode
                    raise RuntimeError(f"{name}: peer {rank} died (exit code {code})") from None
            kinds = {kind for kind, _ in msgs}
            for kind, value in msgs:
                if kind == "error":
                    raise RuntimeError(f"{name}: a peer failed:\n{value}")
            if kinds == {"done"}:
                break
            if kinds != {"sync"}:
                raise RuntimeError(f"{name}: peers out of step ({kinds})")
            values = [value for _, value in msgs]
            for conn in conns:
                conn.send(("sync", values))
        per_peer = [value for _, value in msgs]
        return {phase: _repeat_major([peer[phase] for peer in per_peer]) for phase in per_peer[0]}
    finally:
        family = psutil.Process().children(recursive=True)  # before reaping: orphans leave the tree
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("abort", None))
            conn.close()
        _reap(procs)
        _kill_leftovers(family)


def _repeat_major(by_peer: list[list[Sample]]) -> list[Sample]:
    return [by_peer[rank][r] for r in range(len(by_peer[0])) for rank in range(len(by_peer))]


# --------------------------------------------------------------------------------------------------------
# Loopback TCP throughput: one stream between two processes


def _loopback_sender(port: int, total: int) -> None:
    buf = memoryview(bytearray(_LOOPBACK_CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        while sent < total:
            chunk = buf[: min(len(buf), total - sent)]
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver's close


def loopback_gbps(trials: int = 5, total: int = _LOOPBACK_BYTES) -> list[float]:
    """GB/s of one TCP stream over 127.0.0.1 from a forked sender to this process, per trial."""
    ctx = mp.get_context("fork")
    buf = memoryview(bytearray(_LOOPBACK_CHUNK))
    out = []
    for _ in range(trials):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            sender = ctx.Process(target=_loopback_sender, args=(server.getsockname()[1], total))
            sender.start()
            try:
                server.settimeout(30)
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(60)
                    first = got = conn.recv_into(buf)
                    start = time.perf_counter()  # from the first byte: connection setup is not throughput
                    while True:
                        n = conn.recv_into(buf)
                        if n == 0:
                            break
                        got += n
                    seconds = time.perf_counter() - start
                if got != total:
                    raise RuntimeError(f"loopback: received {got} of {total} bytes")
                out.append((got - first) / seconds / 1e9)
            finally:
                _reap([sender])
    return out


# --------------------------------------------------------------------------------------------------------
# One peer process hosting every implementation; the rounds of all implementations are interleaved


#: Result names, in the order of the first round (later rounds rotate it).
NAMES = (
    "gloo",
    "ours",
    "ours_int8",
    "ours_libp2p",
    "ours_libp2p_int8",
    "ours_int8_with_matchmaking",
    "hivemind",
)
#: Payload compression of each result.
COMPRESSION = {"ours_int8": "int8", "ours_libp2p_int8": "int8", "ours_int8_with_matchmaking": "int8"}
#: With --shaped-mbit: each peer's network namespace and address (set before the peers fork).
_NETNS: list[str] = []
_IPS: list[str] = []
_RANK = [0]


def _ip(rank: int | None = None) -> str:
    """A peer's address: its namespace address when shaped, else loopback."""
    r = _RANK[0] if rank is None else rank
    return _IPS[r] if _IPS else "127.0.0.1"


def _host() -> list[str]:
    return [f"/ip4/{_ip()}/tcp/0"]


def _enter_netns(name: str) -> None:
    """Move this (forked) process into the named network namespace (Python 3.11 has no os.setns)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def make_shaped_net(n: int, mbit: int) -> list[str]:
    """N namespaces on one bridge, each peer's link shaped with tbf to `mbit` in both directions."""
    tag = f"ib{os.getpid() % 100000}"
    names = [f"{tag}-{i}" for i in range(n)]
    bridge = f"{tag}-br"
    _sh("ip", "netns", "add", bridge)
    _sh("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", bridge, "link", "set", "br0", "up")
    for i, ns in enumerate(names):
        _sh("ip", "netns", "add", ns)
        inside, outside = f"{tag}p{i}", f"{tag}b{i}"
        _sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        _sh("ip", "link", "set", inside, "netns", ns)
        _sh("ip", "link", "set", outside, "netns", bridge)
        _sh("ip", "-n", bridge, "link", "set", outside, "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"10.91.0.{i + 1}/24", "dev", inside)
        _sh("ip", "-n", ns, "link", "set", inside, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for where, dev in ((ns, inside), (bridge, outside)):  # egress of both ends: up and down
            _sh(
                "ip",
                "netns",
                "exec",
                where,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{mbit}mbit",
                "burst",
                "256kb",
                "latency",
                "100ms",
            )
        _IPS.append(f"10.91.0.{i + 1}")
    _NETNS.extend(names)
    return [*names, bridge]


def remove_net(names: list[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _identity(rank: int) -> Any:
    from intellect.crypto.identity import Identity

    return Identity.from_seed(bytes([rank + 1]) * 32)


class Peer:
    """One peer: gloo, hivemind and our asyncio services (in a loop thread) side by side, set up once.

    Every method that talks to the other peers goes through the same number of barriers whatever fails
    locally, so one broken implementation cannot desynchronise the others.
    """

    def __init__(self, rank: int, n: int, link: Link, inputs: Inputs, gloo_port: int) -> None:
        self.rank, self.n, self.link, self.inputs = rank, n, link, inputs
        self.gloo_port = gloo_port
        self.x = inputs.xs[rank]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.dht: Any = None
        self.averager: Any = None
        self.plane: Any = None
        self.members: tuple[Any, ...] = ()
        self.p2p: Any = None
        self.p2p_plane: Any = None
        self.p2p_members: tuple[Any, ...] = ()
        self._keydir: Any = None
        self.dht_node: Any = None
        self.our_averager: Any = None
        self.gloo = False

    # -- setup -----------------------------------------------------------------------------------------

    def _agree(self, error: str) -> bool:
        """Everyone's verdict on one setup step: True only if no peer failed."""
        errs = [e for e in self.link.allgather(error) if e]
        if errs:
            log.warning("peer %d: setup step failed somewhere: %s", self.rank, errs[0].splitlines()[-1])
        return not errs

    def setup(self, wanted: set[str]) -> list[str]:
        """Start what `wanted` needs (hivemind first: it forks, and must do so before any thread exists)."""
        available: list[str] = []
        if "hivemind" in wanted and self._setup_hivemind():
            available.append("hivemind")
        if "gloo" in wanted and self._setup_gloo():
            available.append("gloo")
        if wanted & {"ours", "ours_int8", "ours_int8_with_matchmaking"}:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="peer-loop", daemon=True)
            self.thread.start()
            if self._setup_ours():
                available += [name for name in ("ours", "ours_int8") if name in wanted]
                if wanted & {"ours_libp2p", "ours_libp2p_int8"} and self._setup_libp2p():
                    available += [name for name in ("ours_libp2p", "ours_libp2p_int8") if name in wanted]
                if "ours_int8_with_matchmaking" in wanted and self._setup_matchmaking():
                    available.append("ours_int8_with_matchmaking")
        return [name for name in NAMES if name in available]

    def _run(self, coro: Any, timeout: float = 120.0) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _setup_hivemind(self) -> bool:
        os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
        error, maddrs = "", []
        try:
            import hivemind

            if self.rank == 0:
                self.dht = hivemind.DHT(start=True, host_maddrs=_host())
                maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        except Exception:
            error = traceback.format_exc()
        found = self.link.allgather((error, maddrs))
        error = error or next((e for e, _ in found if e), "")
        try:
            if not error:
                from hivemind.averaging import DecentralizedAverager

                if self.dht is None:
                    self.dht = hivemind.DHT(start=True, host_maddrs=_host(), initial_peers=found[0][1])
                self.averager = DecentralizedAverager(
                    [self.x.clone()],
                    self.dht,
                    start=True,
                    prefix="bench",
                    target_group_size=self.n,
                    min_group_size=self.n,
                    allreduce_timeout=30.0,
                )
        except Exception:
            error = traceback.format_exc()
        return self._agree(error)

    def _setup_gloo(self) -> bool:
        error = ""
        try:
            import torch.distributed as dist

            # Loopback only, or the peer's own link in its namespace when shaped.
            os.environ["GLOO_SOCKET_IFNAME"] = (
                f"{_NETNS[self.rank].split('-')[0]}p{self.rank}" if _NETNS else "lo"
            )
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{_ip(0)}:{self.gloo_port}",
                rank=self.rank,
                world_size=self.n,
                timeout=timedelta(seconds=60),
            )
            self.gloo = True
        except Exception:
            error = traceback.format_exc()
        return self._agree(error)

    def _setup_ours(self) -> bool:
        from intellect.node.net.allreduce import DataPlane
        from intellect.protocol.groups import GroupMember

        error, addr = "", ("", "", 0)
        try:
            ident = _identity(self.rank)
            self.plane = DataPlane(ident, _ip())
            self._run(self.plane.__aenter__())
            addr = (ident.peer_id, _ip(), self.plane.port)
        except Exception:
            error = traceback.format_exc()
        found = self.link.allgather((error, addr))
        if not error and not any(e for e, _ in found):
            members = (GroupMember(pid, ip, port) for _, (pid, ip, port) in found)
            self.members = tuple(sorted(members, key=lambda m: m.peer_id))
        return self._agree(error or next((e for e, _ in found if e), ""))

    def _setup_libp2p(self) -> bool:
        """The data plane as the daemon runs it: libp2p streams through a p2p daemon whose key is ours."""
        import tempfile

        from hivemind.p2p import P2P
        from intellect.node.net.allreduce import DataPlane
        from intellect.node.net.transport import Libp2pTransport
        from intellect.protocol.groups import GroupMember

        ident = _identity(self.rank)
        error, maddrs = "", []
        try:
            self._keydir = tempfile.TemporaryDirectory(prefix="bench-p2p-")
            key = f"{self._keydir.name}/id.key"
            ident.save(key)
            if self.rank == 0:
                self.p2p = self._run(
                    P2P.create(host_maddrs=_host(), identity_path=key, check_if_identity_free=False)
                )
                maddrs = [str(m) for m in self._run(self.p2p.get_visible_maddrs())]
        except Exception:
            error = traceback.format_exc()
        found = self.link.allgather((error, maddrs))
        error = error or next((e for e, _ in found if e), "")
        try:
            if not error:
                if self.p2p is None:
                    self.p2p = self._run(
                        P2P.create(
                            initial_peers=found[0][1],
                            host_maddrs=_host(),
                            identity_path=f"{self._keydir.name}/id.key",
                            check_if_identity_free=False,
                        )
                    )
                self.p2p_plane = DataPlane(ident, transport=Libp2pTransport(self.p2p))
                self._run(self.p2p_plane.__aenter__())
        except Exception:
            error = traceback.format_exc()
        ids = self.link.allgather(ident.peer_id)
        self.p2p_members = tuple(GroupMember(pid, "", 0) for pid in sorted(ids))
        return self._agree(error)

    def _setup_matchmaking(self) -> bool:
        from hivemind.dht.node import DHTNode
        from intellect.node.net.averaging import Averager, AveragerConfig

        error, maddrs = "", []
        try:
            if self.rank == 0:
                self.dht_node = self._run(DHTNode.create(host_maddrs=_host()))
                maddrs = [str(m) for m in self._run(self.dht_node.protocol.p2p.get_visible_maddrs())]
        except Exception:
            error = traceback.format_exc()
        found = self.link.allgather((error, maddrs))
        error = error or next((e for e, _ in found if e), "")
        try:
            if not error:
                if self.dht_node is None:
                    self.dht_node = self._run(DHTNode.create(initial_peers=found[0][1], host_maddrs=_host()))
                # The node's default config (int8, poll every 0.25 s) but a group of exactly N.
                n = self.n
                config = AveragerConfig(target_group_size=n, min_group_size=n, matchmaking_time=30.0)
                assert config.compression == "int8", "the node's default compression changed: rename it here"
                self.our_averager = Averager(self.dht_node, _identity(self.rank), "bench", config)
                self._run(self.our_averager.__aenter__())
        except Exception:
            error = traceback.format_exc()
        return self._agree(error)

    # -- one round of one implementation ------------------------------------------------------------------

    def round(self, name: str, r: int) -> Sample:
        if name == "gloo":
            return self._gloo_round()
        if name == "hivemind":
            return self._hivemind_round()
        if name == "ours_int8_with_matchmaking":
            return self._run(self._matchmaking_round(r))
        return self._run(self._ours_round(name, r))

    def _gloo_round(self) -> Sample:
        import torch.distributed as dist

        buf = self.x.clone()
        cpu = tree_cpu()
        self.link.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf.div_(self.n)
        t1 = time.perf_counter()
        sample = Sample(t0, t1, tree_cpu() - cpu)
        check(sample, buf, self.inputs.exact)
        return sample

    async def _ours_round(self, name: str, r: int) -> Sample:
        from intellect.node.net.allreduce import butterfly_allreduce, get_payload_codec
        from intellect.protocol.groups import GroupSpec

        codec = get_payload_codec(COMPRESSION.get(name, "none"))
        libp2p = name.startswith("ours_libp2p")
        plane = self.p2p_plane if libp2p else self.plane
        spec = GroupSpec("bench", r, NAMES.index(name), "bench", self.p2p_members if libp2p else self.members)
        cpu = tree_cpu()
        # The barrier in a thread: this loop keeps accepting peers that left the barrier before us.
        await asyncio.to_thread(self.link.barrier)
        t0 = time.perf_counter()
        try:
            outcome = await butterfly_allreduce(plane, spec, self.x, 1.0, codec, stall_timeout=60.0)
        except Exception as e:
            return Sample(t0, time.perf_counter(), tree_cpu() - cpu, error=repr(e))
        t1 = time.perf_counter()
        sample = Sample(t0, t1, tree_cpu() - cpu, extra=dict(outcome.timings))
        sample.extra["wire_bytes_sent"] = float(outcome.bytes_sent)
        check(sample, outcome.flat, self.inputs.exact)
        return sample

    async def _matchmaking_round(self, r: int) -> Sample:
        cpu = tree_cpu()
        await asyncio.to_thread(self.link.barrier)
        t0 = time.perf_counter()
        res = await self.our_averager.average(r, {"x": self.x}, 1.0, time.time() + 60)
        t1 = time.perf_counter()
        sample = Sample(t0, t1, tree_cpu() - cpu)
        if not res.ok or res.tensors is None or len(res.group) != self.n:
            sample.error = f"ok={res.ok} reason={res.reason} group of {len(res.group)}"
        else:
            check(sample, res.tensors["x"], self.inputs.exact)
        return sample

    def _hivemind_round(self) -> Sample:
        from hivemind.averaging.control import AveragingStage

        with self.averager.get_tensors() as tensors:
            tensors[0].copy_(self.x)
        self.link.barrier()
        m0 = time.perf_counter()
        error = ""
        control = self.averager.step(wait=False, require_trigger=True, timeout=60.0)
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            if time.perf_counter() - m0 > 60:
                error = "no group within 60 s"
                break
            time.sleep(0.002)
        matchmaking = time.perf_counter() - m0
        cpu = tree_cpu()
        self.link.barrier()
        t0 = time.perf_counter()
        control.allow_allreduce()
        try:
            gathered = control.result(timeout=60)
        except Exception as e:
            return Sample(t0, time.perf_counter(), tree_cpu() - cpu, error=error or repr(e))
        t1 = time.perf_counter()
        sample = Sample(t0, t1, tree_cpu() - cpu, extra={"matchmaking_seconds": matchmaking})
        if gathered is None or len(gathered) != self.n:
            sample.error = f"group of {None if gathered is None else len(gathered)} peers, not {self.n}"
        else:
            with self.averager.get_tensors() as tensors:
                check(sample, tensors[0], self.inputs.exact)
        return sample

    # -- teardown ------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.loop is not None:

            async def stop() -> None:
                if self.our_averager is not None:
                    await self.our_averager.__aexit__(None, None, None)
                if self.dht_node is not None:
                    await self.dht_node.shutdown()
                if self.plane is not None:
                    await self.plane.close()
                if self.p2p_plane is not None:
                    await self.p2p_plane.close()
                if self.p2p is not None:
                    await self.p2p.shutdown()

            with contextlib.suppress(Exception):
                self._run(stop(), timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.thread is not None:
                self.thread.join(timeout=10)
        if self.gloo:
            import torch.distributed as dist

            dist.destroy_process_group()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            self.dht.shutdown()


def peer_worker(wanted: set[str], gloo_port: int) -> Worker:
    def work(rank: int, n: int, link: Link, inputs: Inputs) -> dict[str, list[Sample]]:
        peer = Peer(rank, n, link, inputs, gloo_port)
        try:
            names = peer.setup(wanted)
            samples: dict[str, list[Sample]] = {name: [] for name in names}
            for r in range(inputs.rounds):
                k = r % max(1, len(names))
                for name in names[k:] + names[:k]:  # rotate: no implementation always runs first
                    samples[name].append(peer.round(name, r))
            return samples
        finally:
            peer.close()

    return work


# --------------------------------------------------------------------------------------------------------
# Summaries


def summarize(samples: list[Sample], n: int, inputs: Inputs, compression: str) -> dict[str, Any]:
    """Median over the counted repeats of (last peer done − first peer started), and the worst errors."""
    tol = _TOLERANCE[compression]
    rounds = [samples[r * n : (r + 1) * n] for r in range(len(samples) // n)][inputs.warmup :]
    good: list[list[Sample]] = []
    failures: list[str] = []
    for r, peers in enumerate(rounds):
        bad = [
            f"repeat {r} peer {rank}: "
            + (
                s.error
                or f"reported success, but rel L2 error {s.rel_l2_err:.3g}, max abs error "
                f"{s.max_abs_err:.3g}, {s.wrong_fraction:.2%} of values off by > 0.05"
            )
            for rank, s in enumerate(peers)
            if s.error or s.rel_l2_err > tol
        ]
        if bad:
            failures.extend(bad)
        else:
            good.append(peers)
    counted = good if good else rounds
    seconds = [max(s.t1 for s in p) - min(s.t0 for s in p) for p in good]
    numel = inputs.exact.numel()
    out: dict[str, Any] = {
        "compression": compression,
        "ok": not failures,
        "seconds": statistics.median(seconds) if seconds else None,
        "seconds_all": [round(s, 4) for s in seconds],
        "gbps_per_peer": None,
        "cpu_seconds_per_peer": statistics.median(statistics.fmean(s.cpu for s in p) for p in counted),
        "max_abs_err": max(s.max_abs_err for p in counted for s in p),
        "rel_l2_err": max(s.rel_l2_err for p in counted for s in p),
        "failed_repeats": len(rounds) - len(good),
    }
    if failures:
        out["failures"] = [f[-300:] for f in failures[:8]]
    if seconds:
        out["gbps_per_peer"] = 2 * (n - 1) / n * 4 * numel / out["seconds"] / 1e9
    keys = sorted({k for p in counted for s in p for k in s.extra})
    for key in keys:
        values = [statistics.fmean(s.extra.get(key, 0.0) for s in p) for p in counted]
        out[key] = statistics.median(values)
    return out


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round_floats(v) for v in obj]
    return obj


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=2, help="group size N (one process per peer)")
    parser.add_argument("--numel", type=int, default=10_000_000, help="fp32 values per peer M")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per peer")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("gloo", "ours", "matchmaking", "hivemind"),
        help="implementations to leave out (ours: all three of ours; matchmaking: only the Averager round)",
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds for all rounds together")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    parser.add_argument(
        "--shaped-mbit",
        type=int,
        default=0,
        help="put each peer in its own network namespace with its link shaped by tbf to this many Mbit/s "
        "each way (root, iproute2); the optimal time then comes from that rate",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.peers < 2:
        parser.error("--peers: at least 2")
    from intellect.node.net.averaging import AveragerConfig

    torch.set_num_threads(args.threads)
    n, numel = args.peers, args.numel
    load_start = os.getloadavg()
    started = time.perf_counter()
    inputs = make_inputs(n, numel, args.repeat, args.warmup, args.threads)
    nbytes = 4 * numel
    print(
        f"{n} peers x {numel} fp32 values ({nbytes / 1e6:.0f} MB), {args.threads} thread(s) per peer, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.2f}; median of {args.repeat} after "
        f"{args.warmup} warm-up",
        flush=True,
    )

    shaped = args.shaped_mbit
    netns = make_shaped_net(n, shaped) if shaped else []
    trials = [] if shaped else loopback_gbps(3)

    wanted = {name for name in NAMES if not any(name.startswith(skip) for skip in args.skip)}
    if "matchmaking" in args.skip:
        wanted.discard("ours_int8_with_matchmaking")
    results: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    try:
        by_name = run_peers("peers", n, peer_worker(wanted, _free_port()), inputs, args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"  FAILED: {e}", file=sys.stderr, flush=True)
        by_name = {}
        results = {name: {"ok": False, "seconds": None, "failure": str(e)[-500:]} for name in sorted(wanted)}
    finally:
        remove_net(netns)
    for name in NAMES:
        if name in by_name:
            results[name] = summarize(by_name[name], n, inputs, COMPRESSION.get(name, "none"))
        elif name in wanted and name not in results:
            results[name] = {"ok": False, "seconds": None, "failure": "could not be set up (see the log)"}
    print(f"  (all rounds took {time.perf_counter() - t:.0f} s)", flush=True)
    if shaped:
        # Each peer has its own link of `shaped` Mbit/s each way: nothing is shared, the rate is the bound.
        loop_gbps = shaped / 8 / 1000
        optimal = optimal_shared = 2 * (n - 1) / n * nbytes / (loop_gbps * 1e9)
        print(f"  links shaped to {shaped} Mbit/s each way: optimal {optimal:.3f} s", flush=True)
    else:
        trials += loopback_gbps(3)
        loop_gbps = statistics.median(trials)
        optimal = 2 * (n - 1) / n * nbytes / (loop_gbps * 1e9)
        optimal_shared = 2 * (n - 1) * nbytes / (loop_gbps * 1e9)
        print(
            f"  loopback TCP, one stream: {loop_gbps:.2f} GB/s (median of {len(trials)}, before and after; "
            f"best {max(trials):.2f}); optimal {optimal:.4f} s, all peers through one stream "
            f"{optimal_shared:.4f} s",
            flush=True,
        )

    gloo_s = results.get("gloo", {}).get("seconds")
    for name, res in results.items():
        s = res.get("seconds")
        if s is None:
            continue
        res["ratio_to_gloo"] = s / gloo_s if gloo_s else None
        res["ratio_to_optimal"] = s / optimal
        res["ratio_to_optimal_shared"] = s / optimal_shared
        extra = ""
        if "matchmaking_seconds" in res:
            extra = f"  (+ matchmaking {res['matchmaking_seconds']:.3f} s)"
        # Every counted repeat, not only the median: rounds over libp2p on a shaped link are bimodal.
        extra += "  repeats " + " ".join(f"{x / optimal:.2f}x" for x in res.get("seconds_all", []))
        print(
            f"  {name:32s} {s:8.4f} s  {res['gbps_per_peer']:6.3f} GB/s/peer  "
            f"{res['ratio_to_gloo'] or math.nan:5.2f}x gloo  {res['ratio_to_optimal']:5.2f}x optimal  "
            f"cpu/peer {res['cpu_seconds_per_peer']:.3f} s  max err {res['max_abs_err']:.2e}  "
            f"ok={res['ok']}{extra}",
            flush=True,
        )
        for failure in res.get("failures", []):
            print(f"    not counted: {failure}", flush=True)
    summary = {
        "peers": n,
        "numel": numel,
        "bytes": nbytes,
        "repeats": args.repeat,
        "warmup": args.warmup,
        "threads_per_peer": args.threads,
        "cpus": os.cpu_count(),
        "load_avg_start": [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()],
        "default_compression": AveragerConfig().compression,
        "shaped_mbit": shaped or None,
        "loopback_gbps": None if shaped else loop_gbps,
        "loopback_gbps_trials": trials,
        "optimal_seconds": optimal,
        "optimal_seconds_shared": optimal_shared,
        "wall_seconds": time.perf_counter() - started,
        **results,
    }
    leftovers = psutil.Process().children(recursive=True)
    if leftovers:
        print(f"warning: {len(leftovers)} child process(es) left; killing them", file=sys.stderr)
        _kill_leftovers(leftovers)
    if args.json:
        print(json.dumps(_round_floats(summary)))


if __name__ == "__main__":
    main()
