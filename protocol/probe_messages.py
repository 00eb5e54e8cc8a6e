"""Reachability and throughput probes (type ids 400–409), answered by every node for `intellect-node doctor`.

    DialbackRequest(ports)  -> DialbackReply(observed_ip, open_ports)    protocol intellect-node/v1/dialback
    u64 n, then n raw bytes -> SinkReport(nbytes, seconds)               protocol intellect-node/v1/sink

A dial-back only ever connects to the asker's own address as the answering node sees it (never an address
named in the request: nobody can use it to probe a third party), at most `MAX_DIALBACK_PORTS` ports, with
a plain TCP connect that is closed at once. The sink reads at most `MAX_SINK_BYTES` and discards them.

Nothing here imports torch or hivemind.
"""

from __future__ import annotations

from dataclasses import dataclass

from intellect.protocol.codec import message

MAX_DIALBACK_PORTS = 4
#: Most bytes a throughput probe may send (what a sink reads before it answers).
MAX_SINK_BYTES = 64 << 20


@message(400, max_size=256)
@dataclass(frozen=True)
class DialbackRequest:
    """Please open a TCP connection to these ports of my address as you see it."""

    ports: tuple[int, ...]

    def valid(self) -> bool:
        return 0 < len(self.ports) <= MAX_DIALBACK_PORTS and all(0 < p < 65536 for p in self.ports)


@message(401, max_size=512)
@dataclass(frozen=True)
class DialbackReply:
    """The asker's address as the answering node sees it, and which of the ports accepted a connection."""

    observed_ip: str
    open_ports: tuple[int, ...]


@message(402, max_size=256)
@dataclass(frozen=True)
class SinkReport:
    """How many bytes the sink read, and in how many seconds (first byte to end of stream)."""

    nbytes: int
    seconds: float
