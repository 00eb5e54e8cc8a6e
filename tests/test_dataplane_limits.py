"""The all-reduce data plane under connection floods, on real sockets (issue #15, "Resources are bounded").

Connections still in their handshake are capped per remote (IP address for TCP, peer ID for libp2p) and in
total; one over a cap is closed at once and counted in the transport's `refused`. An idle connection is
closed at the plane's handshake deadline. The TCP accept loop sleeps over EMFILE and is restarted if it
dies; the libp2p listener is started again if its task ends. Every test closes every socket it opens.

The flood comes from 127.0.0.2 and up (Linux routes all of 127/8 to the loopback), the members from
127.0.0.1, so that the per-address cap tells them apart as it tells a stranger's host from a member's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity
from intellect.node.net.allreduce import DataPlane, butterfly_allreduce, get_payload_codec
from intellect.node.net.transport import ALLREDUCE_PROTOCOL, Libp2pTransport, OverCap, TcpTransport
from intellect.protocol.groups import GroupMember, GroupSpec
from test_allreduce import _Planes

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform != "linux", reason="binds sources in 127/8 and lowers RLIMIT_NOFILE"),
]

torch.set_num_threads(1)


def _identities(n: int) -> list[Identity]:
    return sorted((Identity.from_seed(bytes([40 + i]) * 32) for i in range(n)), key=lambda i: i.peer_id)


def _tcp_spec(planes: list[DataPlane], attempt: int = 0) -> GroupSpec:
    members = tuple(GroupMember(p.identity.peer_id, "127.0.0.1", p.port) for p in planes)
    return GroupSpec("run", 3, attempt, "s", tuple(sorted(members, key=lambda m: m.peer_id)))


def _p2p_spec(planes: list[DataPlane], attempt: int = 0) -> GroupSpec:
    members = tuple(GroupMember(p.identity.peer_id, "", 0) for p in planes)
    return GroupSpec("run", 3, attempt, "s", tuple(sorted(members, key=lambda m: m.peer_id)))


async def _allreduce(planes: list[DataPlane], spec: GroupSpec, numel: int = 10_001) -> float:
    """Run one all-reduce among `planes`, check it is the exact mean, and return its wall time in seconds."""
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(len(planes))]
    codec = get_payload_codec("none")
    start = time.perf_counter()
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(
                butterfly_allreduce(p, spec, x, 1.0, codec, stall_timeout=20)
                for p, x in zip(planes, xs, strict=True)
            )
        ),
        60,
    )
    took = time.perf_counter() - start
    exact = sum(x.double() for x in xs) / len(xs)
    for out in outs:
        assert torch.equal(out.flat, outs[0].flat)
    assert float((outs[0].flat.double() - exact).abs().max()) < 1e-5
    return took


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def _open_idle(port: int, n: int, source: str, out: list[socket.socket]) -> None:
    """Open `n` TCP connections from `source` to 127.0.0.1:`port` that never say hello (appended to `out`)."""
    loop = asyncio.get_running_loop()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.append(s)
        s.setblocking(False)
        s.bind((source, 0))
        await loop.sock_connect(s, ("127.0.0.1", port))


async def _churn(port: int, source: str, done: asyncio.Event) -> int:
    """Connect from `source` and hang up, over and over until `done`; returns how many connections."""
    loop = asyncio.get_running_loop()
    n = 0
    while not done.is_set():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            s.bind((source, 0))
            await loop.sock_connect(s, ("127.0.0.1", port))
            n += 1
    return n


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()
    socks.clear()


def _tcp(plane: DataPlane) -> TcpTransport:
    assert isinstance(plane.transport, TcpTransport)
    return plane.transport


@pytest.fixture
def nofile() -> Any:
    """Room for the flood's client sockets in this process; the limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_idle_flood_is_capped_and_the_allreduce_still_completes(nofile: int) -> None:
    flood = min(1200, nofile - 400)
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    socks: list[socket.socket] = []
    async with _Planes(3) as planes:
        target = _tcp(planes[0])
        numel = 4_000_001
        without = await _allreduce(planes, _tcp_spec(planes, 0), numel)
        try:
            start = time.perf_counter()
            for src in sources:
                await _open_idle(planes[0].port, flood // len(sources), src, socks)
            await _until(lambda: target.limits.pending_total + sum(target.refused.values()) >= flood)
            absorbed = time.perf_counter() - start
            held = target.limits.per_remote * len(sources)
            assert target.limits.pending_total == held
            assert target.refused.get(OverCap.PER_REMOTE) == flood - held
            assert OverCap.TOTAL not in target.refused
            # The members come from another address: the flood's caps leave their handshakes alone.
            with_flood = await _allreduce(planes, _tcp_spec(planes, 1), numel)
            assert target.limits.pending_total == held  # the flood is still there, still idle
            # And while a fifth address connects and hangs up as fast as it can.
            done = asyncio.Event()
            churn = asyncio.create_task(_churn(planes[0].port, "127.0.0.6", done))
            await asyncio.sleep(0.05)
            try:
                with_churn = await _allreduce(planes, _tcp_spec(planes, 2), numel)
            finally:
                done.set()
                churned = await asyncio.wait_for(churn, 10)
            print(
                f"\n{flood} idle connections absorbed in {absorbed:.3f}s ({held} held, "
                f"{flood - held} refused); all-reduce of {numel} fp32 among 3: {without:.3f}s without, "
                f"{with_flood:.3f}s with the idle flood, {with_churn:.3f}s with it and {churned} more "
                "connect-and-hang-ups"
            )
        finally:
            _close_all(socks)


async def test_the_total_cap_applies_across_addresses() -> None:
    socks: list[socket.socket] = []
    transport = TcpTransport(max_pending_per_remote=4, max_pending=6)
    async with DataPlane(_identities(1)[0], transport=transport) as plane:
        try:
            await _open_idle(plane.port, 5, "127.0.0.2", socks)
            await _until(lambda: transport.limits.pending_total + sum(transport.refused.values()) >= 5)
            await _open_idle(plane.port, 5, "127.0.0.3", socks)
            await _until(lambda: transport.limits.pending_total + sum(transport.refused.values()) >= 10)
            assert transport.limits.pending == {"127.0.0.2": 4, "127.0.0.3": 2}
            assert transport.refused == {OverCap.PER_REMOTE: 1, OverCap.TOTAL: 3}
        finally:
            _close_all(socks)


async def test_an_idle_connection_is_closed_at_the_handshake_deadline() -> None:
    socks: list[socket.socket] = []
    async with DataPlane(_identities(1)[0], handshake_timeout=0.5) as plane:
        transport = _tcp(plane)
        try:
            await _open_idle(plane.port, 3, "127.0.0.2", socks)
            await _until(lambda: plane.rejected.get("TimeoutError", 0) == 3)
            await _until(lambda: transport.limits.pending_total == 0)
            loop = asyncio.get_running_loop()
            for s in socks:  # closed by the plane: end of stream
                assert await asyncio.wait_for(loop.sock_recv(s, 1), 5) == b""
        finally:
            _close_all(socks)


async def test_the_accept_loop_survives_emfile(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="intellect.node.net.transport")
    loop = asyncio.get_running_loop()
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]  # before the limit
    async with _Planes(2) as planes:
        transport = _tcp(planes[0])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        await asyncio.sleep(0.1)  # both accept loops wait for a connection before descriptors run out
        try:
            lowest_free = os.dup(0)
            os.close(lowest_free)
            # No new descriptor can be made: every accept fails with EMFILE.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                for s in socks:
                    s.setblocking(False)
                    await loop.sock_connect(s, ("127.0.0.1", planes[0].port))
                await _until(lambda: transport.accept_errors >= 3, 5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            failed = [r for r in caplog.records if "failed (" in r.getMessage()]
            assert len(failed) == 1 and f"[Errno {errno.EMFILE}]" in failed[0].getMessage()  # not 3 lines
            assert _tcp(planes[1]).accept_errors == 0
            # The loop goes on: the three waiting connections are accepted, and members average.
            await _until(lambda: transport.limits.pending_total == 3, 5)
            await _allreduce(planes, _tcp_spec(planes))
            assert transport.restarts == 0
            assert any("accepts again" in r.getMessage() for r in caplog.records)
        finally:
            _close_all(socks)


async def test_the_accept_loop_is_restarted_when_it_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    async with _Planes(2) as planes:
        transport = _tcp(planes[0])
        try:
            first = transport._accept
            assert first is not None
            first.cancel()  # killed from outside
            await _until(lambda: transport._accept is not first and transport._accept is not None, 5)
            assert transport.restarts == 1
            real = loop.sock_accept
            calls = 0

            async def crash_once(sock: socket.socket) -> tuple[socket.socket, Any]:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("a bug in the accept loop")
                return await real(sock)

            monkeypatch.setattr(loop, "sock_accept", crash_once)
            second = transport._accept
            await _open_idle(planes[0].port, 1, "127.0.0.2", socks)  # accepted; the next accept crashes
            await _until(lambda: transport.restarts == 2 and transport._accept is not second, 5)
            await _allreduce(planes, _tcp_spec(planes))
            assert calls >= 2
        finally:
            _close_all(socks)


# ---- libp2p ------------------------------------------------------------------------------------------


@pytest.fixture
async def p2ps() -> AsyncIterator[list[tuple[Identity, P2P]]]:
    """Three p2p daemons on loopback; the second and third bootstrap from the first."""
    idents = _identities(3)
    out: list[tuple[Identity, P2P]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, ident in enumerate(idents):
                key = Path(tmp) / f"id{i}.key"
                ident.save(key)
                boot = [str(m) for m in await out[0][1].get_visible_maddrs()] if out else None
                p2p = await P2P.create(
                    initial_peers=boot,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    identity_path=str(key),
                    check_if_identity_free=False,
                )
                out.append((ident, p2p))
            yield out
        finally:
            for _, p2p in out:
                await p2p.shutdown()


async def test_libp2p_idle_streams_are_capped_per_peer(p2ps: list[tuple[Identity, P2P]]) -> None:
    """One peer opens 40 idle streams to a member: 8 are held, the rest closed at once; two other members
    still average through that member's plane."""
    (b_id, b_p2p), (_, a_p2p), (c_id, c_p2p) = p2ps
    b_t = Libp2pTransport(b_p2p)
    planes = [DataPlane(b_id, transport=b_t), DataPlane(c_id, transport=Libp2pTransport(c_p2p))]
    writers: list[asyncio.StreamWriter] = []
    for p in planes:
        await p.__aenter__()
    try:
        for _ in range(40):
            _info, _reader, writer = await asyncio.wait_for(
                a_p2p.call_binary_stream_handler(PeerID.from_base58(b_id.peer_id), ALLREDUCE_PROTOCOL), 10
            )
            writers.append(writer)
        await _until(lambda: b_t.limits.pending_total + sum(b_t.refused.values()) >= 40, 20)
        assert b_t.limits.pending == {a_p2p.peer_id.to_base58(): 8}
        assert b_t.refused == {OverCap.PER_REMOTE: 32}
        await _allreduce(planes, _p2p_spec(planes))
        assert b_t.limits.pending_total == 8
    finally:
        for w in writers:
            w.close()
        for p in planes:
            await p.close()


async def test_libp2p_listener_is_started_again_when_it_ends(p2ps: list[tuple[Identity, P2P]]) -> None:
    (b_id, b_p2p), _, (c_id, c_p2p) = p2ps
    b_t = Libp2pTransport(b_p2p, check_every_s=0.1)
    planes = [DataPlane(b_id, transport=b_t), DataPlane(c_id, transport=Libp2pTransport(c_p2p))]
    for p in planes:
        await p.__aenter__()
    try:
        listener = b_p2p._listen_task
        assert listener is not None
        listener.cancel()
        await _until(lambda: b_t.restarts == 1, 10)
        await asyncio.sleep(0.3)  # the new Unix-socket server is up within a few loop turns
        assert b_p2p._listen_task is not listener and not b_p2p._listen_task.done()
        await _allreduce(planes, _p2p_spec(planes))
    finally:
        for p in planes:
            await p.close()
