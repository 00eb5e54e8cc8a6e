"""State sync over real hivemind P2P daemons on loopback: honest sync, corrupted servers, majority, failure.

Named nodes: alice, bob, carol serve; dave is the newcomer. Each node's p2pd runs with the node's own
Ed25519 identity, so the transport peer ID is the one that signs announcements and chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from intellect.crypto.identity import Identity
from intellect.node.engine import statehash
from intellect.node.net.statesync import (
    HANDLER_NAME,
    StateServer,
    StateSnapshot,
    StateSyncError,
    SyncReport,
    _Prepared,
    fetch_state,
)
from intellect.protocol.codec import decode, encode
from intellect.protocol.gossip_messages import Misbehaviour
from intellect.protocol.merkle import merkle_root
from intellect.protocol.sync_messages import (
    ChunkList,
    ChunkListRequest,
    check_evidence,
    sign_chunk,
)
from intellect.protocol.vouching import Vouch, bad_chunk_report, judge_report

RUN = "ab" * 32
CHUNK = 4096
P2P_TIMEOUT = 30


def _state(seed: int, round_: int = 3) -> StateSnapshot:
    """A small outer-optimizer-like state (~60 KB, 15 chunks of 4 KiB)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "outer.global.w": torch.randn(64, 100, generator=g),
        "outer.global.b": torch.randn(100, generator=g),
        "outer.momentum.w": torch.randn(64, 100, generator=g),
        "outer.momentum.b": torch.randn(100, generator=g),
        "outer.step": torch.tensor(round_, dtype=torch.int64),
    }
    return StateSnapshot(round_, statehash.state_hash(tensors, CHUNK), tensors)


class CorruptingServer(StateServer):
    """Serves flipped bytes in every chunk and signs them: a malicious peer leaving signed evidence."""

    def _chunk_bytes(self, prepared: _Prepared, index: int, data: bytes) -> bytes:
        return bytes(b ^ 0xFF for b in data)


class LyingListServer(StateServer):
    """Serves a chunk list whose digests do not hash to the announced root."""

    async def _serve_one(self, peer, reader, writer):  # type: ignore[no-untyped-def]
        from intellect.node.net.statesync import _read_frame, _write_frame

        request = decode(await _read_frame(reader, 1024))
        prepared = next(iter(self._states.values()))
        if isinstance(request, ChunkListRequest):
            fake = tuple(hashlib.sha256(h).digest() for h in prepared.hashes)
            msg = ChunkList(
                prepared.state_hash, prepared.round, prepared.chunk_size, len(prepared.blob), fake
            )
            await _write_frame(writer, encode(msg))
        else:
            junk = sign_chunk(self.identity, RUN, prepared.state_hash, request.index, b"x")
            await _write_frame(writer, encode(junk))


class SilentServer(StateServer):
    """Accepts every request and never answers: a frozen holder (SIGSTOPped Python, its p2p daemon still
    accepting streams)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._request_timeout = 3600.0  # its own handler never gives up on the stream either

    async def _serve_one(self, peer, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(3600)


async def _start_p2p(tmp: Path, name: str, identity: Identity, initial: list | None = None) -> P2P:
    key = tmp / f"{name}.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, identity.to_protobuf())
    os.close(fd)
    return await asyncio.wait_for(
        P2P.create(
            initial_peers=initial or [],
            identity_path=str(key),
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            check_if_identity_free=False,  # hivemind's probe only parses RSA key files
        ),
        P2P_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def swarm(
    tmp_path: Path, server_kinds: list[type[StateServer]], snapshots: list[StateSnapshot]
) -> AsyncIterator[tuple[P2P, list[StateServer], list]]:
    """Start one server per kind (publishing the matching snapshot) and a newcomer connected to all."""
    p2ps: list[P2P] = []
    servers: list[StateServer] = []
    try:
        announcements = []
        for i, (kind, snap) in enumerate(zip(server_kinds, snapshots, strict=True)):
            ident = Identity.generate()
            p2p = await _start_p2p(tmp_path, f"server{i}", ident)
            p2ps.append(p2p)
            server = kind(p2p, ident, RUN, chunk_size=CHUNK)
            await server.start()
            servers.append(server)
            announcements.append(await server.publish(snap))
        maddrs = [a for p in p2ps for a in await p.get_visible_maddrs()]
        newcomer = await _start_p2p(tmp_path, "dave", Identity.generate(), maddrs)
        p2ps.append(newcomer)
        yield newcomer, servers, announcements
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(), 5)
        for p2p in p2ps:
            await asyncio.wait_for(p2p.shutdown(), 10)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


async def test_newcomer_syncs_from_three_servers(tmp_path: Path) -> None:
    snap = _state(1)
    async with swarm(tmp_path, [StateServer] * 3, [snap] * 3) as (dave, servers, anns):
        report = SyncReport()
        got = await fetch_state(dave, anns, RUN, report=report, timeout=60)
        assert got.round == snap.round and got.state_hash == snap.state_hash
        assert statehash.state_hash(got.tensors, CHUNK) == snap.state_hash
        assert _same(dict(got.tensors), dict(snap.tensors))
        # Chunks came from several peers in parallel, and the bytes add up to the state exactly once.
        assert len(report.bytes_from) >= 2
        assert sum(report.bytes_from.values()) == len(statehash.serialize_state(snap.tensors))
        assert not report.bad_peers and not report.evidence
        n_chunks = len(statehash.chunk_hashes(statehash.serialize_state(snap.tensors), CHUNK))
        # Each chunk served once, plus those asked again after a request timed out under load (a server
        # counts a chunk it sent even when the answer came too late).
        assert n_chunks <= sum(s.stats.chunks for s in servers) <= n_chunks + report.refetched


async def test_corrupted_chunks_detected_refetched_and_reported(tmp_path: Path) -> None:
    snap = _state(2)
    kinds: list[type[StateServer]] = [StateServer, CorruptingServer, StateServer]
    async with swarm(tmp_path, kinds, [snap] * 3) as (dave, servers, anns):
        bad_peer = servers[1].identity.peer_id
        report = SyncReport()
        got = await fetch_state(dave, anns, RUN, report=report, timeout=60)
        assert statehash.state_hash(got.tensors, CHUNK) == snap.state_hash
        assert set(report.bad_peers) == {bad_peer}
        assert bad_peer not in report.bytes_from
        assert report.refetched >= 1
        # The evidence is the bad server's own signature over a wrong digest: checkable by anyone.
        assert report.evidence and all(e.server == bad_peer for e in report.evidence)
        hashes = tuple(statehash.chunk_hashes(statehash.serialize_state(snap.tensors), CHUNK))
        root = merkle_root(hashes)
        assert all(check_evidence(e, hashes, root) for e in report.evidence)
        # Evidence against an honest digest does not check.
        honest = dataclasses.replace(report.evidence[0], digest=hashes[report.evidence[0].index])
        assert not check_evidence(honest, hashes, root)
        # Gossiped, the evidence convinces an honest holder of the state, checked against what it serves.
        gossiped = decode(encode(bad_chunk_report(report.evidence[0], 2)), Misbehaviour)
        assert judge_report(gossiped, RUN, servers[0].chunk_list) is True
        framed = dataclasses.replace(gossiped, accused=servers[2].identity.peer_id)
        assert judge_report(framed, RUN, servers[0].chunk_list) is False


async def test_lying_chunk_list_is_dropped(tmp_path: Path) -> None:
    snap = _state(3)
    async with swarm(tmp_path, [LyingListServer, StateServer], [snap] * 2) as (dave, servers, anns):
        liar = servers[0].identity.peer_id
        report = SyncReport()
        got = await fetch_state(dave, anns, RUN, report=report, timeout=60)
        assert statehash.state_hash(got.tensors, CHUNK) == snap.state_hash
        # Whether the liar was asked for the list or for chunks first, it is caught and dropped.
        assert set(report.bad_peers) == {liar}
        assert liar not in report.bytes_from


async def test_majority_wins_over_a_higher_round(tmp_path: Path) -> None:
    honest, other = _state(4, round_=5), _state(5, round_=6)
    async with swarm(tmp_path, [StateServer] * 3, [honest, honest, other]) as (dave, servers, anns):
        report = SyncReport()
        got = await fetch_state(dave, anns, RUN, report=report, timeout=60)
        assert (got.round, got.state_hash) == (honest.round, honest.state_hash)
        assert report.target is not None and len(report.target.peers) == 2
        assert servers[2].identity.peer_id not in report.bytes_from


async def test_no_honest_server_fails_cleanly(tmp_path: Path) -> None:
    snap = _state(6)
    kinds: list[type[StateServer]] = [CorruptingServer, LyingListServer]
    async with swarm(tmp_path, kinds, [snap] * 2) as (dave, servers, anns):
        report = SyncReport()
        with pytest.raises(StateSyncError):
            await fetch_state(dave, anns, RUN, report=report, timeout=60)
        assert set(report.bad_peers) == {s.identity.peer_id for s in servers}
        assert not report.bytes_from


async def test_malformed_requests_dropped_and_server_keeps_serving(tmp_path: Path) -> None:
    snap = _state(7)
    async with swarm(tmp_path, [StateServer], [snap]) as (dave, servers, anns):
        server = servers[0]
        target = server.p2p.peer_id

        async def raw(payload: bytes) -> None:
            _, reader, writer = await dave.call_binary_stream_handler(target, HANDLER_NAME)
            writer.write(payload)
            await writer.drain()
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()

        await raw((1 << 40).to_bytes(8, "big"))  # absurd length: refused before reading a body
        await raw((5).to_bytes(8, "big") + b"\xc1\xc1\xc1\xc1\xc1")  # not msgpack
        await raw((3).to_bytes(8, "big") + encode(ChunkListRequest("cd" * 32, snap.state_hash))[:3])
        for _ in range(50):
            if server.stats.malformed >= 3:
                break
            await asyncio.sleep(0.1)
        assert server.stats.malformed == 3
        got = await fetch_state(dave, anns, RUN, timeout=60)
        assert got.state_hash == snap.state_hash


async def test_sync_from_unhinted_vouches_and_a_server_that_moved_on(tmp_path: Path) -> None:
    snap = _state(8)
    async with swarm(tmp_path, [StateServer] * 2, [snap] * 2) as (dave, servers, anns):
        # Server 0 publishes two newer rounds; with keep=2 it no longer holds `snap`.
        for r in (4, 5):
            await servers[0].publish(_state(100 + r, round_=r))
        # DHT-style vouches: no chunk size or length hints; the chunk list supplies them, checked.
        vouches = [Vouch(a.peer_id, a.round, a.state_hash) for a in anns]
        report = SyncReport()
        got = await fetch_state(dave, vouches, RUN, report=report, timeout=60)
        assert statehash.state_hash(got.tensors, CHUNK) == snap.state_hash
        moved_on = servers[0].identity.peer_id
        assert moved_on not in report.bad_peers  # not misbehaviour, just no longer available
        assert moved_on not in report.bytes_from
        assert servers[0].stats.unknown_state >= 1


async def test_busy_server_is_retried_not_dropped(tmp_path: Path) -> None:
    snap = _state(9)
    async with swarm(tmp_path, [StateServer], [snap]) as (dave, servers, anns):
        servers[0]._slots = 1  # one request at a time; four parallel streams will hit BUSY
        report = SyncReport()
        got = await fetch_state(dave, anns, RUN, report=report, streams_per_peer=4, timeout=60)
        assert got.state_hash == snap.state_hash
        assert not report.bad_peers and not report.unavailable


async def test_a_frozen_holder_costs_the_sync_no_request_timeout(tmp_path: Path) -> None:
    """Two holders, one of them frozen: asked in turn, the frozen one cost a whole request timeout (for the
    chunk list, then again for the chunks it held), by which time, in the four-daemon freeze test, the
    others had dropped the state. Requests to it are now hedged after `HEDGE_S`: whichever order the
    holders are asked in, the sync completes from the live one well within one request timeout, and the
    frozen one is never counted as bad."""
    snap = _state(11)
    timeout = 20.0
    for attempt in range(3):  # the holders are asked in a random order: try both orders
        (tmp_path / str(attempt)).mkdir()
        async with swarm(tmp_path / str(attempt), [SilentServer, StateServer], [snap] * 2) as (
            dave,
            servers,
            anns,
        ):
            report = SyncReport()
            got = await fetch_state(dave, anns, RUN, report=report, request_timeout=timeout, timeout=60)
            assert got.state_hash == snap.state_hash
            assert report.seconds < timeout / 2, report.seconds
            assert set(report.bytes_from) == {servers[1].identity.peer_id}
            assert not report.bad_peers
