"""Can others reach me, and how fast? The probes every node answers, and the client side `doctor` uses.

Every `DhtService` serves two libp2p protocols (docs/protocol.md, "probe_messages"):
- `intellect-node/v1/dialback`: the asker lists its listening TCP ports; we open a plain TCP connection to
  each, at the address the asker's connection comes from (never one it names), and say which accepted.
  A port that accepts from outside means the asker is publicly reachable there.
- `intellect-node/v1/sink`: we read what the asker sends (capped) and say how much and how fast.

`probe(...)` runs both against one peer and returns a `ProbeReport`; `Reachability.summary` words it for
people (the doctor's output and the line `start` logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import PeerID
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.probe_messages import (
    MAX_DIALBACK_PORTS,
    MAX_SINK_BYTES,
    DialbackReply,
    DialbackRequest,
    SinkReport,
)

logger = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "intellect-node/v1/dialback"
SINK_PROTOCOL = "intellect-node/v1/sink"
#: How long a dial-back connect may take per port.
DIALBACK_TIMEOUT_S = 3.0
_LEN_BYTES = 4


async def _send_msg(writer: asyncio.StreamWriter, msg: object) -> None:
    data = encode(msg)
    writer.write(len(data).to_bytes(_LEN_BYTES, "big") + data)
    await writer.drain()


async def _recv_msg(reader: asyncio.StreamReader, expected: type, limit: int = 4096) -> Any:
    n = int.from_bytes(await reader.readexactly(_LEN_BYTES), "big")
    if n > limit:
        raise ProtocolError(f"probe message of {n} bytes exceeds {limit}")
    return decode(await reader.readexactly(n), expected=expected)


def _ip_of(maddr: str) -> str | None:
    parts = str(maddr).split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


class ProbeServer:
    """Answers dial-back and sink requests on a node's p2p daemon (one sink at a time)."""

    def __init__(self, p2p: Any) -> None:
        self.p2p = p2p
        self._sink_busy = asyncio.Lock()
        self._dialback_busy = asyncio.Lock()
        self.answered = 0
        #: Probe requests dropped (malformed, timed out, or while one was already being answered).
        self.dropped = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(DIALBACK_PROTOCOL, self._dialback)
        await self.p2p.add_binary_stream_handler(SINK_PROTOCOL, self._sink)

    async def _dialback(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await asyncio.wait_for(_recv_msg(reader, DialbackRequest, 256), 10)
            ip = _ip_of(info.addr)
            if self._dialback_busy.locked():
                # One dial-back at a time: a flood of requests costs us at most four connects at once.
                self.dropped += 1
                await _send_msg(writer, DialbackReply(ip or "", ()))
                return
            async with self._dialback_busy:
                await self._answer_dialback(req, info, ip, writer)
        except (ProtocolError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.dropped += 1
            logger.debug("dial-back request from %s dropped: %s", info.peer_id, e)
        finally:
            writer.close()

    async def _answer_dialback(
        self, req: DialbackRequest, info: Any, ip: str | None, writer: asyncio.StreamWriter
    ) -> None:
        if not req.valid() or ip is None or "p2p-circuit" in str(info.addr):
            # A relayed asker has no address of its own that we could dial.
            await _send_msg(writer, DialbackReply(ip or "", ()))
            return
        ports = req.ports[:MAX_DIALBACK_PORTS]
        results = await asyncio.gather(*(_tcp_open(ip, port) for port in ports))
        self.answered += 1
        opened = tuple(p for p, ok in zip(ports, results, strict=True) if ok)
        await _send_msg(writer, DialbackReply(ip, opened))

    async def _sink(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._sink_busy.locked():
                self.dropped += 1
                return  # one measurement at a time: a flood of probes costs us one stream's worth
            async with self._sink_busy:
                # The asker says how much it will send (a half-closed stream would close our answer too).
                want = min(
                    int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 10), "big"), MAX_SINK_BYTES
                )
                n, t0 = 0, time.monotonic()
                while n < want:
                    chunk = await asyncio.wait_for(reader.read(min(1 << 16, want - n)), 30)
                    if not chunk:
                        break
                    n += len(chunk)
                await _send_msg(writer, SinkReport(n, time.monotonic() - t0))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            logger.debug("sink from %s ended: %s", info.peer_id, e)
        finally:
            writer.close()


async def _tcp_open(ip: str, port: int) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), DIALBACK_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True


@dataclass
class ProbeReport:
    """What one peer saw of us."""

    peer: str
    observed_ip: str = ""
    ports: tuple[int, ...] = ()
    open_ports: tuple[int, ...] = ()
    throughput_mb_s: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        return bool(self.open_ports)


async def probe(p2p: Any, peer: str, ports: tuple[int, ...], sink_bytes: int = 8 << 20) -> ProbeReport:
    """Ask `peer` to dial our `ports` back, then measure our upload to it (not when `sink_bytes` is 0)."""
    report = ProbeReport(peer, ports=ports)
    pid = PeerID.from_base58(peer)
    try:
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(pid, DIALBACK_PROTOCOL), 10)
        try:
            await _send_msg(writer, DialbackRequest(ports[:MAX_DIALBACK_PORTS]))
            reply = await asyncio.wait_for(_recv_msg(reader, DialbackReply, 512), 15)
            report.observed_ip, report.open_ports = reply.observed_ip, reply.open_ports
        finally:
            writer.close()
    except Exception as e:  # a daemon error, a timeout, a malformed reply: reported, not raised
        report.errors.append(f"dial-back: {e}")
    if sink_bytes <= 0:
        return report
    try:
        report.throughput_mb_s = await _upload(p2p, pid, min(sink_bytes, MAX_SINK_BYTES))
    except Exception as e:
        report.errors.append(f"throughput: {e}")
    return report


async def _upload(p2p: Any, pid: PeerID, nbytes: int) -> float:
    _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(pid, SINK_PROTOCOL), 10)
    try:
        block = os.urandom(1 << 16)
        count = max(1, nbytes // len(block))
        t0 = time.monotonic()
        writer.write((count * len(block)).to_bytes(8, "big"))
        for _ in range(count):
            writer.write(block)
            await writer.drain()
        got = await asyncio.wait_for(_recv_msg(reader, SinkReport, 256), 60)
        seconds = max(time.monotonic() - t0, 1e-6)
        return got.nbytes / seconds / 1e6
    finally:
        writer.close()


def tcp_ports(maddrs: list[str]) -> tuple[int, ...]:
    """The TCP ports of our listen addresses."""
    out: list[int] = []
    for m in maddrs:
        parts = str(m).split("/")
        if "tcp" in parts:
            port = int(parts[parts.index("tcp") + 1])
            if port and port not in out:
                out.append(port)
    return tuple(out)


def summary(reachability: str, reports: list[ProbeReport], announced: list[str]) -> list[str]:
    """A few lines for people: how others can reach us, what we announce, how fast, what to do."""
    ok = [r for r in reports if r.reachable]
    lines: list[str] = []
    if ok:
        lines.append(
            f"reachable: public ({ok[0].peer[:16]}… connected to {ok[0].observed_ip} port(s) "
            f"{', '.join(map(str, ok[0].open_ports))})"
        )
    elif reachability == "private":
        lines.append(
            "reachable: through relays only (reachability = private); you take part in averaging as a "
            "member that owns no partition"
        )
    else:
        seen = next((r.observed_ip for r in reports if r.observed_ip), "")
        lines.append(f"reachable: NO: nobody could open a connection to you{f' at {seen}' if seen else ''}")
    lines.append("announced: " + (" ".join(announced) if announced else "(nothing)"))
    for r in reports:
        if r.throughput_mb_s is None and not r.errors:
            continue  # not measured (the line `start` logs)
        speed = "-" if r.throughput_mb_s is None else f"{r.throughput_mb_s:.1f} MB/s"
        lines.append(f"upload to {r.peer[:16]}…: {speed}" + (f" ({'; '.join(r.errors)})" if r.errors else ""))
    if not ok and reachability != "private":
        lines.append(
            "to do: forward the p2p port on your router and set --announce, or run with "
            "--reachability private (no setup needed: you then average through reachable members)"
        )
    if not reports:
        lines.append("to do: no bootstrap node answered: check --bootstrap and your connection")
    return lines


async def relay_check(target: str, circuits: list[str], timeout_s: float = 20.0) -> list[tuple[str, str]]:
    """Whether each relay holds a reservation for `target`: a second, throw-away p2p daemon dials
    `target` through each circuit address (`<relay>/p2p-circuit/p2p/<target>`); a relay without a
    reservation for it refuses the circuit. Returns (relay address, "" or the error) per circuit."""
    from hivemind.p2p import P2P
    from multiaddr import Multiaddr

    tester = await P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"], auto_nat=False, nat_port_map=False)
    out: list[tuple[str, str]] = []
    try:
        peer = PeerID.from_base58(target)
        for circuit in circuits:
            relay = circuit.split("/p2p-circuit")[0]
            try:
                addr = Multiaddr(circuit.removesuffix(f"/p2p/{target}"))
                await asyncio.wait_for(tester._client.connect(peer, [addr]), timeout_s)
                out.append((relay, ""))
            except Exception as e:  # ControlFailure / TimeoutError: no circuit through this relay
                out.append((relay, str(e).splitlines()[0][:200] if str(e) else type(e).__name__))
            with contextlib.suppress(Exception):
                await tester._client.disconnect(peer)
    finally:
        await tester.shutdown()
    return out


def relay_lines(results: list[tuple[str, str]]) -> list[str]:
    """The doctor's lines about relay reservations."""
    lines = []
    for relay, error in results:
        short = relay.rsplit("/p2p/", 1)[-1][:16]
        lines.append(
            f"relay {short}…: reservation holds (reached through it)"
            if not error
            else f"relay {short}…: NO reservation ({error})"
        )
    if results and all(error for _, error in results):
        lines.append(
            "to do: no relay holds a reservation for you: members behind a NAT cannot be reached through "
            "relays (you still train: you dial out to reachable members); check that the bootstrap nodes "
            "run with reachability = public"
        )
    return lines
