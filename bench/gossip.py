"""Gossip delivery and latency among N real nodes, each its own process with its own p2p daemon.

Every node is a worker process (`bench/gossip.py --worker`) running what a daemon runs for gossip: a
hivemind p2p daemon (`p2pd`, go-libp2p, Noise) with the node's own identity and a `GossipService` on it,
listening on 127.0.0.1. The harness (this process) only tells the workers whom to link to, when to publish
and collects their receipts over stdin/stdout, so the nodes' work really runs in 2 N processes, as in a
swarm of daemons on one machine. Every node is told every member, as daemons are through the DHT, and the
overlay picks its neighbours (`GossipConfig.degree`).

`--private K` makes the last K nodes behave as volunteers behind a NAT: they announce only circuit
addresses through node 0, so nobody dials them and they dial only the public nodes (the topology a NAT
imposes, on loopback: the real masquerading NAT is exercised by tests/test_nat.py).

`--hogs H` starts H busy processes (`while True: pass`) for the measured rates; unless `--no-quiet` the
same rates are measured first without them, as the baseline of the same run (`quiet`).

Then every node publishes signed `Progress` messages at R messages per second for a bounded duration, for
each rate R. A message counts as delivered when it reaches the application of another node (verified by
that node) before the grace period after the last publication ends; every publication the harness asked
for counts. The latency is the receiver's clock minus the envelope timestamp set when the sender sealed it
(one machine, one clock), first delivery per receiver only. Each rate also reports the CPU seconds the
nodes (workers and their p2p daemons) used per delivery and the load before and after.

    python bench/gossip.py --peers 8 --hogs 2 --json
    python bench/gossip.py --peers 8 --hogs 2 --private 3 --rates 1

The last line is one JSON object: `{"peers": N, "rates": [{"msgs_per_s_per_peer": R, "delivery": d,
"p50_s": t, "p99_s": t, ...}, ...], "quiet": [...same without hogs...], ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.gossip")
RUN = "be" * 32
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cpu_pressure() -> float:
    """Share of the last 10 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------
# worker: one node


async def _worker(key: Path, port: int, private: bool) -> None:
    from hivemind.p2p import P2P, PeerID
    from intellect.crypto.identity import Identity
    from intellect.node.net.gossip import GossipService
    from intellect.protocol.keys import TopicKind
    from multiaddr import Multiaddr

    ident = Identity.load(key)
    p2p = await P2P.create(
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], identity_path=str(key), check_if_identity_free=False
    )

    async def connect(peer: str, maddrs: Sequence[str]) -> bool:
        await p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(m) for m in maddrs])
        return True

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    daemon_pid = p2p._child.pid if getattr(p2p, "_child", None) is not None else None
    try:
        async with GossipService(p2p, ident, RUN, lambda _: True, connect=connect, private=private) as g:
            say({"ready": ident.peer_id, "daemon_pid": daemon_pid})
            sub = g.subscribe(TopicKind.PROGRESS)
            while line := await reader.readline():
                cmd = json.loads(line)
                if "peers" in cmd:
                    g.add_peers((p, tuple(m)) for p, m in cmd["peers"])
                elif "wait" in cmd:
                    with contextlib.suppress(TimeoutError):
                        await g.wait_peers(cmd["wait"], cmd["timeout"])
                    say({"linked": len(g.peers)})
                elif "rate" in cmd:
                    say(await _measure(g, sub, cmd))
                elif "stop" in cmd:
                    break
    finally:
        await p2p.shutdown()


async def _measure(g: Any, sub: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """Publish at the commanded rate from `start_at` for `duration`; record first-delivery latencies."""
    from intellect.protocol.gossip_messages import Progress
    from intellect.protocol.keys import TopicKind

    tag, rate = cmd["tag"], cmd["rate"]
    got: dict[str, dict[int, float]] = {}
    dup = 0

    async def collect() -> None:
        nonlocal dup
        while True:
            m = await sub.get()
            if m.message.round != tag:
                continue
            seen = got.setdefault(m.sender, {})
            if m.message.inner_step in seen:
                dup += 1
            else:
                seen[m.message.inner_step] = m.received_at - m.ts

    collector = asyncio.create_task(collect())
    interval = 1.0 / rate
    end = cmd["start_at"] + cmd["duration"]
    start = cmd["start_at"] + random.random() * interval  # spread the nodes' phases
    step, errors = 0, 0
    while (t := start + step * interval) < end:
        await asyncio.sleep(max(0.0, t - time.time()))
        try:
            await g.publish(TopicKind.PROGRESS, Progress(tag, step, 0, 0.0, 0.0))
        except Exception:  # counted as sent and never delivered
            errors += 1
        step += 1
    await asyncio.sleep(max(0.0, end + cmd["grace"] - time.time()))
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    return {
        "sent": step, "errors": errors, "dup": dup, "drops": sub.dropped,
        "lat": [x for by in got.values() for x in by.values()],
        "rejections": dict(g.rejections), "link_drops": g.dropped, "links": len(g.peers),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# harness


class _Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.peer_id = ""
        self.daemon_pid: int | None = None

    async def say(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def hear(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.returncode})")
        return dict(json.loads(line))

    def cpu_s(self) -> float:
        return _cpu_s(self.proc.pid) + _cpu_s(self.daemon_pid)


async def _spawn(key: Path, port: int, private: bool, log_level: str) -> _Proc:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", str(key), str(port), str(int(private)), log_level,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, limit=1 << 26,
    )  # fmt: skip
    w = _Proc(proc)
    hello = await w.hear(90)
    w.peer_id, w.daemon_pid = hello["ready"], hello["daemon_pid"]
    return w


async def run_rate(
    nodes: list[_Proc], rate: float, duration: float, tag: int, grace: float
) -> dict[str, Any]:
    load_before = _load()
    cpu_before = sum(n.cpu_s() for n in nodes)
    start_at = time.time() + 1.0
    for n in nodes:
        await n.say({"rate": rate, "duration": duration, "tag": tag, "start_at": start_at, "grace": grace})
    reports = [await n.hear(duration + grace + 60) for n in nodes]
    cpu = sum(n.cpu_s() for n in nodes) - cpu_before
    published = sum(r["sent"] for r in reports)
    expected = published * (len(nodes) - 1)
    latencies = [x for r in reports for x in r["lat"]]
    delivered = len(latencies)
    rejections: dict[str, int] = {}
    for r in reports:
        for k, v in r["rejections"].items():
            rejections[k] = rejections.get(k, 0) + v
    return {
        "msgs_per_s_per_peer": rate,
        "delivery": delivered / expected if expected else float("nan"),
        "p50_s": _quantile(latencies, 0.50),
        "p99_s": _quantile(latencies, 0.99),
        "max_s": max(latencies, default=float("nan")),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "published": published,
        "publish_errors": sum(r["errors"] for r in reports),
        "expected_deliveries": expected,
        "deliveries": delivered,
        "duplicates": sum(r["dup"] for r in reports),
        "consumer_drops": sum(r["drops"] for r in reports),
        "link_drops": sum(r["link_drops"] for r in reports),
        "links_per_node": [r["links"] for r in reports],
        "rejections": rejections,
        "duration_s": duration,
        "grace_s": grace,
        "node_cpu_s": cpu,
        "node_cpu_ms_per_delivery": 1000 * cpu / max(1, delivered),
        "load_before": load_before,
        "load_after": _load(),
        "cpu_pressure_avg10_after": _cpu_pressure(),
    }


def _start_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _summary(label: str, res: dict[str, Any]) -> None:
    log.info(
        "%-6s %5.1f msg/s/peer: delivery %.4f (%d/%d), p50 %.3fs, p99 %.3fs, max %.3fs, "
        "node CPU %.2f ms per delivery, load %.1f -> %.1f, CPU pressure %.0f%%",
        label, res["msgs_per_s_per_peer"], res["delivery"], res["deliveries"], res["expected_deliveries"],
        res["p50_s"], res["p99_s"], res["max_s"], res["node_cpu_ms_per_delivery"],
        res["load_before"], res["load_after"], res["cpu_pressure_avg10_after"],
    )  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from intellect.crypto.identity import Identity

    random.seed(args.seed)
    quiet: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    nodes: list[_Proc] = []
    with tempfile.TemporaryDirectory(prefix="gossip-bench-") as tmp:
        try:
            t0 = time.monotonic()
            ports = [_free_port() for _ in range(args.peers)]
            keys = []
            for i in range(args.peers):
                keys.append(Path(tmp) / f"node{i}.key")
                Identity.generate().save(keys[-1])
            private = [i >= args.peers - args.private for i in range(args.peers)]
            # One at a time: start-up is not what this benchmark measures.
            for key, port, priv in zip(keys, ports, private, strict=True):
                nodes.append(await _spawn(key, port, priv, args.log_level))
            up_s = time.monotonic() - t0
            log.info("%d nodes up in %.1fs (%d behind a NAT)", len(nodes), up_s, args.private)
            relay = f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{nodes[0].peer_id}/p2p-circuit"
            entries = [
                [n.peer_id, [f"{relay if priv else f'/ip4/127.0.0.1/tcp/{port}'}/p2p/{n.peer_id}"]]
                for n, port, priv in zip(nodes, ports, private, strict=True)
            ]
            for n in nodes:
                await n.say({"peers": entries})
            for n in nodes:
                await n.say({"wait": 1, "timeout": 60})
            linked = [(await n.hear(90))["linked"] for n in nodes]
            await asyncio.sleep(args.settle)
            log.info("links per node after %.0fs: %s", args.settle, linked)
            tag = 0
            for rate in args.rates:
                if args.hogs and args.quiet:
                    tag += 1
                    quiet.append(await run_rate(nodes, rate, args.duration, tag, args.grace))
                    _summary("quiet", quiet[-1])
                hogs = _start_hogs(args.hogs)
                try:
                    tag += 1
                    loaded.append(await run_rate(nodes, rate, args.duration, tag, args.grace))
                finally:
                    _stop(hogs)
                _summary(f"{args.hogs} hogs", loaded[-1])
            for n in nodes:
                await n.say({"stop": True})
            for n in nodes:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(n.proc.wait(), 20)
        finally:
            for n in nodes:  # every worker and its p2p daemon (same session), whatever happened
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(n.proc.pid, signal.SIGKILL)
                await n.proc.wait()
    return {
        "peers": args.peers,
        "private": args.private,
        "hogs": args.hogs,
        "rates": loaded,
        "quiet": quiet,
        "transport": "p2pd streams (GossipService)",
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        key, port, private, level = argv[1:5]
        logging.basicConfig(level=level, format="%(asctime)s worker %(name)s: %(message)s", stream=sys.stderr)
        asyncio.run(_worker(Path(key), int(port), private == "1"))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0])
    p.add_argument("--duration", type=float, default=20.0, help="publishing seconds per rate")
    p.add_argument("--grace", type=float, default=3.0, help="seconds after the last publication")
    p.add_argument("--settle", type=float, default=3.0, help="seconds for the overlay to form")
    p.add_argument("--hogs", type=int, default=0, help="busy processes competing during the measured rates")
    p.add_argument("--no-quiet", dest="quiet", action="store_false", help="skip the baseline without hogs")
    p.add_argument("--private", type=int, default=0, help="how many nodes are behind a NAT (topology)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="ERROR", help="log level of the worker processes")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = p.parse_args(argv)
    if args.peers < 2:
        p.error("--peers must be at least 2")
    if not 0 <= args.private < args.peers:
        p.error("--private must leave at least one public node")
    if any(r <= 0 for r in args.rates):
        p.error("--rates must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the workers and their daemons are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
