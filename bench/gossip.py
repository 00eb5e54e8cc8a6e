"""Gossip delivery and latency among N real gossip nodes on loopback.

Each node is a `GossipService` with its own gossip child process (`python -m intellect.node.net.gossip_child`,
a py-libp2p host running gossipsub), so N nodes are N separate libp2p processes talking TCP over
127.0.0.1; only their asyncio halves (sealing, the bridge socket, the subscriptions) share this process,
as the harness. Every node dials every other one, as daemons do with the gossip addresses of all members
they find in the DHT (`--dial K`: each node dials K earlier ones instead, a sparser random graph); then
every node publishes signed `Progress` messages at R messages per second for a bounded duration, for each
rate R.

A message counts as delivered when it reaches the application of another node (verified by that node's
topic validator) before the grace period after the last publication ends; every publication the
application asked for counts, including any that failed to go out. The latency is the receiving daemon's
clock minus the envelope timestamp set when the sender sealed it (one machine, one clock), so it covers
the whole path: parent -> child -> network -> child -> parent, first delivery per receiver only.
Each rate also reports the CPU seconds the gossip child processes used during it and the load average
before and after, because on a small shared machine the load decides the latency.

    python bench/gossip.py --peers 8 --json
    python bench/gossip.py --peers 8 --rate-limit 10      # py-libp2p's default per-neighbour limit

The last line is one JSON object:
`{"peers": N, "rates": [{"msgs_per_s_per_peer": R, "delivery": d, "p50_s": t, "p99_s": t, ...}, ...]}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from intellect.crypto.identity import Identity
from intellect.node.net.gossip import GossipConfig, GossipError, GossipService, Subscription
from intellect.protocol.gossip_messages import Progress
from intellect.protocol.keys import TopicKind

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


async def _collect(
    sub: Subscription, tag: int, sink: dict[tuple[str, int], float], dup: Counter[str]
) -> None:
    """Record the first latency of every Progress of this rate's round tag, keyed by (sender, step)."""
    while True:
        m = await sub.get()
        if m.message.round != tag:
            continue
        key = (m.sender, m.message.inner_step)
        if key in sink:
            dup["n"] += 1
        else:
            sink[key] = m.received_at - m.ts


async def _publish(
    node: GossipService, rate: float, duration: float, tag: int, sent: list[int], errors: list[str]
) -> None:
    interval = 1.0 / rate
    start = time.monotonic() + random.random() * interval  # spread the nodes' phases
    step = 0
    while (t := start + step * interval) < start + duration:
        await asyncio.sleep(max(0.0, t - time.monotonic()))
        try:
            await node.publish(TopicKind.PROGRESS, Progress(tag, step, 0, 0.0, 0.0))
        except GossipError as exc:  # counted as sent and never delivered
            errors.append(str(exc))
        step += 1
    sent.append(step)


async def run_rate(
    nodes: list[GossipService], rate: float, duration: float, tag: int, grace: float
) -> dict[str, Any]:
    sinks: list[dict[tuple[str, int], float]] = [{} for _ in nodes]
    dup: Counter[str] = Counter()
    subs = [n.subscribe(TopicKind.PROGRESS) for n in nodes]
    collectors = [
        asyncio.create_task(_collect(s, tag, sink, dup)) for s, sink in zip(subs, sinks, strict=True)
    ]
    sent: list[int] = []
    errors: list[str] = []
    load_before = _load()
    cpu_before = sum(_cpu_s(n.child_pid) for n in nodes)
    harness_before = time.process_time()
    try:
        await asyncio.gather(*(_publish(n, rate, duration, tag, sent, errors) for n in nodes))
        await asyncio.sleep(grace)  # messages still in flight; later ones count as lost
    finally:
        for task in collectors:
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
        for s in subs:
            s.close()
    cpu = sum(_cpu_s(n.child_pid) for n in nodes) - cpu_before
    harness_cpu = time.process_time() - harness_before
    published = sum(sent)
    expected = published * (len(nodes) - 1)
    latencies = [lat for sink in sinks for lat in sink.values()]
    delivered = len(latencies)
    return {
        "msgs_per_s_per_peer": rate,
        "delivery": delivered / expected if expected else float("nan"),
        "p50_s": _quantile(latencies, 0.50),
        "p99_s": _quantile(latencies, 0.99),
        "max_s": max(latencies, default=float("nan")),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "published": published,
        "publish_errors": len(errors),
        "expected_deliveries": expected,
        "deliveries": delivered,
        "duplicates": dup["n"],
        "consumer_drops": sum(s.dropped for s in subs),
        "duration_s": duration,
        "grace_s": grace,
        "child_cpu_s": cpu,
        "harness_cpu_s": harness_cpu,
        "load_before": load_before,
        "load_after": _load(),
        "cpu_pressure_avg10_after": _cpu_pressure(),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    config = GossipConfig(rate_limit=args.rate_limit, child_log_level=args.child_log_level)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gossip-bench-") as tmp:
        keys = []
        for i in range(args.peers):
            path = Path(tmp) / f"node{i}.key"
            Identity.generate().save(path)
            keys.append(path)
        nodes = [GossipService(k, RUN, lambda _: True, config=config) for k in keys]
        started: list[GossipService] = []
        try:
            t0 = time.monotonic()
            # One at a time: eight interpreters importing py-libp2p at once on a small shared machine can
            # exceed the readiness timeout, and start-up is not what this benchmark measures.
            for node in nodes:
                await node.__aenter__()
                started.append(node)
            pids = {n.child_pid for n in nodes}
            assert len(pids) == len(nodes) and os.getpid() not in pids, "one gossip process per node"
            log.info("%d gossip nodes up in %.1fs (child PIDs %s)", len(nodes), time.monotonic() - t0, pids)
            # Node i dials `dial` earlier nodes (all of them by default: every daemon dials every member it
            # finds in the DHT); with fewer, a connected random graph.
            dial = args.peers if args.dial is None else args.dial
            for i, node in enumerate(nodes[1:], start=1):
                targets = random.sample(range(i), min(i, dial))
                node.add_peers([nodes[j].listen_maddrs[0] for j in targets])
            await asyncio.gather(*(n.wait_peers(1, 60) for n in nodes))
            await asyncio.sleep(args.settle)
            log.info(
                "mesh settled: connected peers per node %s, progress mesh sizes %s",
                [len(n.peers) for n in nodes],
                [n.mesh_sizes.get(TopicKind.PROGRESS) for n in nodes],
            )
            for tag, rate in enumerate(args.rates, start=1):
                res = await run_rate(nodes, rate, args.duration, tag, args.grace)
                cpu_ms = 1000 * res["child_cpu_s"] / max(1, res["deliveries"])
                log.info(
                    "%5.1f msg/s/peer: delivery %.4f (%d/%d), p50 %.3fs, p99 %.3fs, max %.3fs, "
                    "child CPU %.1f ms per delivery, load %.1f -> %.1f, CPU pressure %.0f%%",
                    rate, res["delivery"], res["deliveries"], res["expected_deliveries"],
                    res["p50_s"], res["p99_s"], res["max_s"], cpu_ms,
                    res["load_before"], res["load_after"], res["cpu_pressure_avg10_after"],
                )  # fmt: skip
                results.append(res)
            restarts = sum(n.restarts for n in nodes)
            rejections: Counter[str] = sum((n.rejections for n in nodes), Counter())
        finally:
            await asyncio.gather(*(n.stop() for n in started))
    return {
        "peers": args.peers,
        "rates": results,
        "rate_limit": args.rate_limit,
        "child_restarts": restarts,
        "rejections": dict(rejections),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0])
    p.add_argument("--duration", type=float, default=20.0, help="publishing seconds per rate")
    p.add_argument("--grace", type=float, default=3.0, help="seconds after the last publication")
    p.add_argument("--dial", type=int, default=None, help="how many earlier nodes each node dials (all)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds for the mesh to form")
    p.add_argument("--rate-limit", type=float, default=GossipConfig().rate_limit)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-log-level", default="ERROR")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = p.parse_args(argv)
    if args.peers < 2:
        p.error("--peers must be at least 2")
    if any(r <= 0 for r in args.rates):
        p.error("--rates must be positive")
    if args.dial is not None and args.dial < 1:
        p.error("--dial must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
