"""The reachability and throughput probes every node answers (`doctor`, and the line `start` logs)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from hivemind.p2p import P2P
from intellect.node.net.probe import DIALBACK_PROTOCOL, ProbeServer, probe, summary, tcp_ports
from intellect.protocol.probe_messages import MAX_DIALBACK_PORTS, DialbackRequest

SERVERS: list[ProbeServer] = []


@pytest.fixture
async def pair() -> AsyncIterator[tuple[P2P, P2P]]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    SERVERS.clear()
    SERVERS.append(ProbeServer(server))
    await SERVERS[0].start()
    client = await P2P.create(
        initial_peers=[str(m) for m in await server.get_visible_maddrs()],
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    try:
        yield server, client
    finally:
        await client.shutdown()
        await server.shutdown()


async def test_a_listening_port_is_reported_open_and_the_upload_measured(pair: tuple[P2P, P2P]) -> None:
    server, client = pair
    ports = tcp_ports([str(m) for m in await client.get_visible_maddrs()])
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection to it is refused
    closed_port = closed.getsockname()[1]
    try:
        report = await probe(client, server.peer_id.to_base58(), (*ports, closed_port), sink_bytes=1 << 20)
    finally:
        closed.close()
    assert report.observed_ip == "127.0.0.1" and report.open_ports == ports and report.reachable
    assert report.throughput_mb_s is not None and report.throughput_mb_s > 0, report.errors
    lines = summary("auto", [report], ["/ip4/127.0.0.1/tcp/1/p2p/x"])
    assert lines[0].startswith("reachable: public") and not any(line.startswith("to do") for line in lines)


async def test_a_malformed_request_is_dropped_and_counted(pair: tuple[P2P, P2P]) -> None:
    server, client = pair
    _, reader, writer = await client.call_binary_stream_handler(server.peer_id, DIALBACK_PROTOCOL)
    writer.write((1 << 20).to_bytes(4, "big") + b"x" * 16)  # announces 1 MiB: over the limit, never read
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without an answer
    writer.close()
    assert SERVERS[0].dropped == 1 and SERVERS[0].answered == 0


async def test_start_probes_reachability_without_uploading(pair: tuple[P2P, P2P]) -> None:
    server, client = pair
    ports = tcp_ports([str(m) for m in await client.get_visible_maddrs()])
    report = await probe(client, server.peer_id.to_base58(), ports, sink_bytes=0)
    assert report.reachable and report.throughput_mb_s is None and not report.errors
    assert not any(line.startswith("upload") for line in summary("auto", [report], []))


def test_requests_are_bounded() -> None:
    assert DialbackRequest((1, 2)).valid()
    assert not DialbackRequest(tuple(range(1, MAX_DIALBACK_PORTS + 2))).valid()
    assert not DialbackRequest((0,)).valid() and not DialbackRequest(()).valid()
    assert not DialbackRequest((70000,)).valid()


def test_the_summary_says_what_to_do() -> None:
    from intellect.node.net.probe import ProbeReport

    nat = ProbeReport("12D3KooWpeer", observed_ip="203.0.113.9", ports=(4002,), throughput_mb_s=1.5)
    lines = summary("auto", [nat], [])
    assert "reachable: NO" in lines[0] and "203.0.113.9" in lines[0]
    assert any("--reachability private" in line for line in lines)
    assert "through relays only" in summary("private", [nat], [])[0]
    assert any("no bootstrap node answered" in line for line in summary("auto", [], []))
