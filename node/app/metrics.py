"""The node's Prometheus metrics, produced from its status record at each scrape.

Every node has its own `CollectorRegistry` (never prometheus_client's global one, so two nodes in one test
process do not collide): the status collector below, plus prometheus_client's process collector (CPU, memory,
open files, start time of this process) and platform collector (Python version). The status collector
yields, besides the run's counters and gauges, `intellect_build_info{version,python}`, the current phase as
`intellect_phase{phase=…}` (1 for the current one, 0 for the others), `intellect_uptime_seconds`, and two
histograms kept in the status record (`Durations`): whole rounds (training start to commit or failure) and
all-reduce attempts, by outcome.

`ContributionsCollector` (registered by the run body once a run starts) adds what the verified contribution
receipts this node saw credit each peer with (`intellect.node.net.receiptnet.ReceiptLedger`):
`intellect_peer_contributed_tokens{run,peer}` and `intellect_peer_contributed_rounds{run,peer}` for the
`TOP_PEERS` peers with the most tokens (bounded label cardinality), plus the number of peers credited and of
receipts counted.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from intellect.node.run.phase import Phase
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from intellect.node.app.status import NodeStatus
    from intellect.node.net.receiptnet import ReceiptLedger

#: Upper bounds (seconds) of the round-duration buckets: a tiny CPU run's round takes seconds, a large
#: model's an hour.
ROUND_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Upper bounds (seconds) of the all-reduce-duration buckets.
ALLREDUCE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Peers given their own series in the per-peer contribution metrics (the most tokens first).
TOP_PEERS = 100


def build_version() -> str:
    """The installed distribution's version (as `intellect-node --version` says)."""
    try:
        return version("intellect-node")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Durations:
    """A histogram's state: observations counted per bucket (not cumulative), their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus's buckets: (upper bound, observations up to it), +Inf last."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((floatToGoString(bound), float(running)))
        return out


class StatusCollector(Collector):
    """Turns a NodeStatus into Prometheus metric families at each scrape."""

    def __init__(self, status: NodeStatus) -> None:
        self._s = status
        self._build = (build_version(), platform.python_version())

    def collect(self) -> Iterator[Metric]:
        s = self._s
        run = [s.run_id[:16]]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"intellect_{name}", doc, labels=["run"])
            c.add_metric(run, value)
            return c

        yield from self._node(s)
        yield _gauge("round", "Completed outer steps (the global state's round).", run, s.round)
        yield counter("rounds_ok", "Rounds whose all-reduce completed.", s.rounds_ok)
        yield counter("rounds_failed", "Rounds whose all-reduce did not complete.", s.rounds_failed)
        yield counter("tokens", "Tokens trained on in rounds whose average was applied.", s.tokens)
        yield counter(
            "tokens_failed", "Tokens trained on in rounds whose all-reduce failed.", s.tokens_failed
        )
        yield _gauge(
            "tokens_pending", "Tokens trained on this round, not yet averaged.", run, s.tokens_pending
        )
        yield _gauge("tokens_per_second", "Inner-loop throughput of the last round.", run, s.tokens_per_s)
        if s.loss is not None:
            yield _gauge("loss", "Mean inner-loop loss of the last round.", run, s.loss)
        yield _gauge("peers", "Live members of the run seen by this node.", run, s.peers)
        yield counter("bytes_sent", "Bytes this node sent for averaging and state sync.", s.bytes_sent)
        yield counter(
            "bytes_received", "Bytes this node received for averaging and state sync.", s.bytes_received
        )
        if s.last_allreduce.at:  # no attempt yet: no "last attempt" to describe
            ar = s.last_allreduce
            yield _gauge("allreduce_seconds", "Duration of the last all-reduce attempt.", run, ar.seconds)
            yield _gauge("allreduce_ok", "1 if the last all-reduce completed, else 0.", run, float(ar.ok))
        yield _gauge("loop_lag_seconds", "Last measured event-loop lag.", run, s.loop_lag_s)
        yield counter(
            "checkpoint_errors",
            "Checkpoints that could not be written (disk full or failing).",
            s.checkpoint_errors,
        )
        yield counter(
            "checkpoints_skipped",
            "Checkpoints not written because they would have passed the disk cap (max_disk_gb).",
            s.checkpoints_skipped,
        )
        rej = CounterMetricFamily(
            "intellect_rejected_messages", "Peer messages dropped, by reason.", labels=["run", "reason"]
        )
        for reason, count in sorted(s.all_rejected().items()):
            rej.add_metric([*run, reason], count)
        yield rej
        yield from self._histograms(s, run)

    def _node(self, s: NodeStatus) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "intellect_build_info", "The node's version (value 1).", labels=["version", "python"]
        )
        info.add_metric(list(self._build), 1.0)
        yield info
        yield GaugeMetricFamily(
            "intellect_uptime_seconds", "Seconds since the daemon started.", value=time.time() - s.started_at
        )
        phase = GaugeMetricFamily(
            "intellect_phase", "The node's current phase (1) and the others (0).", labels=["phase"]
        )
        for p in Phase:
            phase.add_metric([p.value], float(p.value == s.phase))
        yield phase

    def _histograms(self, s: NodeStatus, run: list[str]) -> Iterator[Metric]:
        rounds = HistogramMetricFamily(
            "intellect_round_duration_seconds",
            "Rounds from the start of training to the commit or failure of their average.",
            labels=["run"],
        )
        rounds.add_metric(run, s.round_durations.cumulative(), s.round_durations.total)
        yield rounds
        allreduce = HistogramMetricFamily(
            "intellect_allreduce_duration_seconds",
            "All-reduce attempts, by outcome.",
            labels=["run", "outcome"],
        )
        for outcome, d in sorted(s.allreduce_durations.items()):
            allreduce.add_metric([*run, outcome], d.cumulative(), d.total)
        yield allreduce


class ContributionsCollector(Collector):
    """Per-peer credits from the verified receipts a run's `ReceiptLedger` counted, at each scrape."""

    def __init__(self, ledger: ReceiptLedger, top: int = TOP_PEERS) -> None:
        self._ledger = ledger
        self._top = top

    def collect(self) -> Iterator[Metric]:
        ledger = self._ledger
        run = [ledger.run_id[:16]]
        tokens = GaugeMetricFamily(
            "intellect_peer_contributed_tokens",
            f"Tokens verified receipts credit a peer with (the {self._top} peers with the most).",
            labels=["run", "peer"],
        )
        rounds = GaugeMetricFamily(
            "intellect_peer_contributed_rounds",
            f"Rounds verified receipts credit a peer with (the {self._top} peers with the most tokens).",
            labels=["run", "peer"],
        )
        for peer, credit in ledger.top(self._top):
            tokens.add_metric([*run, peer], credit.tokens)
            rounds.add_metric([*run, peer], float(credit.rounds))
        yield tokens
        yield rounds
        yield _gauge("contributing_peers", "Peers credited by the verified receipts seen.", run, ledger.peers)
        receipts = CounterMetricFamily(
            "intellect_receipts_counted", "Verified contribution receipts counted.", labels=["run"]
        )
        receipts.add_metric(run, float(ledger.receipts))
        yield receipts


def _gauge(name: str, doc: str, run: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f"intellect_{name}", doc, labels=["run"])
    g.add_metric(run, value)
    return g


def make_registry(status: NodeStatus) -> CollectorRegistry:
    """A fresh registry holding this node's metrics and this process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
