"""Signed gossip end to end over real p2p daemons (each node's own identity, Noise-protected streams).

alice–bob–carol form a chain (alice and carol dial bob only; carol hears alice only through bob). A hostile
member, mallory, opens a raw gossip stream to bob, skipping our sealing and validation, and writes forged,
replayed, stale, foreign-run, wrong-topic and malformed frames: none may reach bob's or anyone's
application, and bob must not forward them (carol and alice see no rejections at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity
from intellect.node.net.gossip import (
    GOSSIP_PROTOCOL,
    GossipConfig,
    GossipService,
    Subscription,
    pick_neighbours,
)
from intellect.protocol.codec import decode, encode, packb_canonical, unpackb_limited
from intellect.protocol.envelope import seal
from intellect.protocol.gossip_messages import (
    FRAME_HEADER,
    MAX_FRAME,
    CheckpointAnnounce,
    GossipFrame,
    Leaving,
    Progress,
    frame,
)
from intellect.protocol.keys import TopicKind, parse_topic, topic_name
from multiaddr import Multiaddr

RUN = "ab" * 32
OTHER_RUN = "cd" * 32
CONFIG = GossipConfig(upkeep_s=0.2, redial_s=0.2)


async def _p2p(ident: Identity, tmp: Path) -> P2P:
    key = tmp / f"{ident.peer_id}.key"
    if not key.exists():
        ident.save(key)
    return await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(key), check_if_identity_free=False
    )


async def _maddrs(p2p: P2P) -> tuple[str, ...]:
    return tuple(str(m) for m in await p2p.get_visible_maddrs())


class _Node:
    """A p2p daemon and the gossip service on it."""

    def __init__(self, ident: Identity, p2p: P2P, gossip: GossipService) -> None:
        self.ident, self.p2p, self.gossip = ident, p2p, gossip

    async def entry(self) -> tuple[str, tuple[str, ...]]:
        return self.ident.peer_id, await _maddrs(self.p2p)


@contextlib.asynccontextmanager
async def _node(
    tmp: Path,
    ident: Identity | None = None,
    admitted: Callable[[str], bool] = lambda _: True,
    config: GossipConfig = CONFIG,
    private: bool = False,
) -> AsyncIterator[_Node]:
    ident = ident or Identity.generate()
    p2p = await _p2p(ident, tmp)

    async def connect(peer: str, maddrs: Sequence[str]) -> bool:
        await p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(m) for m in maddrs])
        return True

    try:
        gossip = GossipService(p2p, ident, RUN, admitted, connect=connect, config=config, private=private)
        async with gossip:
            yield _Node(ident, p2p, gossip)
    finally:
        await p2p.shutdown()


def _progress(round_: int) -> Progress:
    return Progress(round=round_, inner_step=100, tokens=4096, loss=3.5, tokens_per_s=1000.0)


async def _rounds_until(sub: Subscription, want: set[int], timeout: float) -> set[int]:
    """Collect Progress rounds from `sub` until `want` is covered (TimeoutError otherwise)."""
    got: set[int] = set()
    async with asyncio.timeout(timeout):
        while not want <= got:
            got.add((await sub.get()).message.round)
    return got


def _drain(sub: Subscription) -> set[int]:
    got = set()
    while not sub._queue.empty():
        got.add(sub._queue.get_nowait().message.round)
    return got


def test_topics_and_frames_round_trip() -> None:
    assert topic_name(RUN, "progress") == f"intellect/{RUN}/progress"
    assert parse_topic(topic_name(RUN, TopicKind.LEAVING)) == (RUN, TopicKind.LEAVING)
    with pytest.raises(ValueError):
        parse_topic("intellect/x/unknown")
    msg = GossipFrame("checkpoint", encode(CheckpointAnnounce(1, "00" * 32, 10, 4)))
    data = frame(encode(msg))
    (n,) = FRAME_HEADER.unpack(data[: FRAME_HEADER.size])
    assert decode(data[FRAME_HEADER.size :][:n], GossipFrame) == msg
    with pytest.raises(ValueError):
        frame(b"x" * (MAX_FRAME + 1))
    with pytest.raises(ValueError):
        GossipConfig(degree=0)


def test_neighbours_are_direct_members_in_an_order_of_each_node() -> None:
    direct = {f"p{i}": (f"/ip4/192.0.2.{i}/tcp/4001/p2p/p{i}",) for i in range(10)}
    natted = {f"n{i}": (f"/ip4/192.0.2.1/tcp/4001/p2p/R/p2p-circuit/p2p/n{i}",) for i in range(3)}
    both = {**direct, **natted}
    mine = pick_neighbours("A", both, private=False)
    assert set(mine) == set(direct)  # a public node never dials a member behind a NAT
    assert pick_neighbours("A", dict(reversed(both.items())), private=False) == mine  # stable
    assert pick_neighbours("B", both, private=False) != mine  # each node its own order
    assert set(pick_neighbours("A", both, private=True)) == set(direct)
    assert set(pick_neighbours("A", natted, private=True)) == set(natted)  # nobody direct: via relays
    assert pick_neighbours("A", natted, private=False) == []


async def _raw_stream(src: _Node, dst: _Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare gossip stream from `src`'s daemon to `dst`, bypassing `src`'s gossip service entirely."""
    peer = PeerID.from_base58(dst.ident.peer_id)
    await src.p2p._client.connect(peer, [Multiaddr(a) for a in (await dst.entry())[1]])
    _info, reader, writer = await src.p2p.call_binary_stream_handler(peer, f"{GOSSIP_PROTOCOL}/{RUN}")
    return reader, writer


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_bad_messages_are_neither_delivered_nor_forwarded(tmp_path: Path) -> None:
    ids = {name: Identity.generate() for name in ("alice", "bob", "carol", "mallory", "outsider")}
    members = {ids[n].peer_id for n in ("alice", "bob", "carol", "mallory")}  # not "outsider"
    admitted = members.__contains__

    async with (
        _node(tmp_path, ids["alice"], admitted) as alice,
        _node(tmp_path, ids["bob"], admitted) as bob,
        _node(tmp_path, ids["carol"], admitted) as carol,
    ):
        alice.gossip.add_peers([await bob.entry()])
        carol.gossip.add_peers([await bob.entry()])
        subs = {
            n: x.gossip.subscribe(TopicKind.PROGRESS) for n, x in (("a", alice), ("b", bob), ("c", carol))
        }
        await bob.gossip.wait_peers(2, 30)
        await carol.gossip.wait_peers(1, 30)

        mallory = ids["mallory"]
        now = time.time()
        good_1 = seal(mallory, RUN, _progress(7), seq=1000)
        tampered = unpackb_limited(seal(mallory, RUN, _progress(66), seq=1001))
        tampered["body"] = unpackb_limited(seal(mallory, RUN, _progress(67), seq=1001))["body"]
        replay = unpackb_limited(good_1)
        replay["ts"] = replay["ts"] + 0.001  # new bytes (a new message ID), same author and seq
        bad = [
            packb_canonical(tampered),  # forged: signature no longer covers the body
            packb_canonical(replay),  # same (sender, seq) as good_1, bytes changed: forged and replayed
            seal(mallory, RUN, _progress(65), seq=1000),  # replayed sequence number, validly signed
            seal(mallory, RUN, _progress(69), seq=1002, ts=now - 3600),  # stale
            seal(mallory, OTHER_RUN, _progress(70), seq=1003),  # foreign run
            b"\x93\x01\x02garbage",  # not an envelope at all
        ]
        good_2 = seal(mallory, RUN, _progress(8), seq=1005)
        frames = [frame(encode(GossipFrame("progress", d))) for d in [good_1, *bad, good_2]]
        # A valid envelope on the wrong topic, a frame that is not a GossipFrame, an unknown topic.
        frames.insert(-1, frame(encode(GossipFrame("progress", seal(mallory, RUN, Leaving(71), seq=1004)))))
        frames.insert(-1, frame(encode(Leaving(72))))
        frames.insert(-1, frame(encode(GossipFrame("nonsense", seal(mallory, RUN, _progress(73), seq=1006)))))

        async with _node(tmp_path, mallory, admitted) as m, _node(tmp_path, ids["outsider"], admitted) as o:
            _r, w = await _raw_stream(m, bob)
            for f in frames:
                w.write(f)
            await w.drain()
            # An outsider (not admitted) is refused at the stream: nothing it writes is even read.
            ro, wo = await _raw_stream(o, bob)
            wo.write(frame(encode(GossipFrame("progress", seal(ids["outsider"], RUN, _progress(74), 5)))))
            with contextlib.suppress(ConnectionError, OSError):
                await wo.drain()
            # The positive control: mallory's two valid messages cross bob to carol and alice.
            assert await _rounds_until(subs["c"], {7, 8}, 20) == {7, 8}
            assert await _rounds_until(subs["a"], {7, 8}, 20) == {7, 8}
            await asyncio.sleep(1.5)  # room for anything bob wrongly forwarded to arrive
            assert await asyncio.wait_for(ro.read(), 10) == b""  # bob closed the outsider's stream
            w.close()

        assert _drain(subs["b"]) <= {7, 8} and _drain(subs["c"]) == set() and _drain(subs["a"]) == set()
        rej = bob.gossip.rejections
        assert rej["forged_signature"] >= 2, rej
        assert rej["replayed"] >= 1, rej
        assert rej["stale"] >= 1 and rej["wrong_run"] >= 1 and rej["wrong_topic"] >= 1, rej
        assert rej["malformed"] >= 3, rej
        assert bob.gossip.scores[mallory.peer_id] < 0
        assert ids["outsider"].peer_id not in bob.gossip.scores  # never got as far as a frame
        # Not forwarded: the peers behind bob never even had to reject anything.
        assert sum(carol.gossip.rejections.values()) == 0
        assert sum(alice.gossip.rejections.values()) == 0
        assert carol.gossip.delivered["progress"] == 2


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_a_forging_neighbour_is_disconnected_and_an_oversized_frame_closes_the_link(
    tmp_path: Path,
) -> None:
    mallory = Identity.generate()
    async with _node(tmp_path) as bob, _node(tmp_path, mallory) as m:
        r, w = await _raw_stream(m, bob)
        good = unpackb_limited(seal(mallory, RUN, _progress(1), seq=1))
        for i in range(8):  # 8 forgeries x 10 points: below the blacklist score of -50
            good["ts"] = good["ts"] + 0.001 * (i + 1)
            w.write(frame(encode(GossipFrame("progress", packb_canonical(good)))))
        await w.drain()
        assert await asyncio.wait_for(r.read(), 20) == b""  # bob hung up
        assert bob.gossip.rejections["forged_signature"] >= 6
        assert bob.gossip._refused(mallory.peer_id)
        # While blacklisted, a new stream is refused at once.
        r2, _w2 = await _raw_stream(m, bob)
        assert await asyncio.wait_for(r2.read(), 10) == b""

    async with _node(tmp_path) as bob, _node(tmp_path, mallory) as m:
        r, w = await _raw_stream(m, bob)
        w.write(FRAME_HEADER.pack(MAX_FRAME + 1))  # announces 80 KiB+: never allocated, link closed
        await w.drain()
        assert await asyncio.wait_for(r.read(), 20) == b""
        assert bob.gossip.rejections["oversized"] == 1


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_a_flooding_author_is_held_at_its_first_honest_hop(tmp_path: Path) -> None:
    """One admitted identity publishes valid, signed messages far above its rate: bob delivers and
    forwards only its burst and rate, counts the rest, disconnects the flooder once its score falls below
    the threshold, and carol sees no more than bob let through."""
    cfg = GossipConfig(upkeep_s=0.2, redial_s=0.2, author_rate=5.0, author_burst=10.0)
    mallory = Identity.generate()
    async with _node(tmp_path, config=cfg) as bob, _node(tmp_path, config=cfg) as carol:
        carol.gossip.add_peers([await bob.entry()])
        await bob.gossip.wait_peers(1, 30)
        sub = carol.gossip.subscribe(TopicKind.PROGRESS)
        async with _node(tmp_path, mallory) as m:
            _r, w = await _raw_stream(m, bob)
            started = time.monotonic()
            for i in range(300):
                w.write(frame(encode(GossipFrame("progress", seal(mallory, RUN, _progress(i), seq=i + 1)))))
            with contextlib.suppress(ConnectionError, OSError):
                await w.drain()
            async with asyncio.timeout(20):
                while not bob.gossip._refused(mallory.peer_id):
                    await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            await asyncio.sleep(1.0)
        allowed = cfg.author_burst + cfg.author_rate * elapsed + 1
        assert bob.gossip.delivered["progress"] <= allowed
        # Every message above the rate cost the flooder a point, until it fell below the threshold.
        assert bob.gossip.rejections["rate_limited"] >= -GossipConfig().blacklist_score
        assert bob.gossip.scores[mallory.peer_id] < GossipConfig().blacklist_score
        # carol heard only what bob passed on (her own limit may hold back one more), and bob is fine
        passed = bob.gossip.delivered["progress"]
        assert len(_drain(sub)) == carol.gossip.delivered["progress"] <= passed
        assert carol.gossip.delivered["progress"] + carol.gossip.rejections["rate_limited"] == passed
        assert carol.gossip.scores.get(bob.ident.peer_id, 0.0) >= 0  # a flood's forwarder pays nothing


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_full_mesh_copies_are_counted_once_and_nobody_is_penalised(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(_node(tmp_path)) for _ in range(4)]
        entries = [await n.entry() for n in nodes]
        for node in nodes:
            node.gossip.add_peers(entries)
        subs = [node.gossip.subscribe(TopicKind.PROGRESS) for node in nodes]
        for node in nodes:
            await node.gossip.wait_peers(len(nodes) - 1, 30)
        rounds = range(1, 21)
        for r in rounds:
            for node in nodes:
                await node.gossip.publish(TopicKind.PROGRESS, _progress(r))
        for sub in subs:
            async with asyncio.timeout(30):
                got: dict[str, set[int]] = {}
                while sum(len(v) for v in got.values()) < len(rounds) * (len(nodes) - 1):
                    m = await sub.get()
                    got.setdefault(m.sender, set()).add(m.message.round)
            assert all(v == set(rounds) for v in got.values()) and len(got) == len(nodes) - 1
        await asyncio.sleep(0.5)
        for node in nodes:
            g = node.gossip
            assert sum(g.rejections.values()) == 0, g.rejections
            assert all(score >= 0 for score in g.scores.values()), g.scores
            assert g.delivered["progress"] == len(rounds) * (len(nodes) - 1)
            assert g.duplicates > 0  # flooding sent copies along several paths; each was delivered once


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_private_nodes_dial_only_public_members_and_hear_each_other_through_them(
    tmp_path: Path,
) -> None:
    """Behind a NAT a node announces only circuit addresses: nobody dials it, and it dials only members
    with a direct address. Two such nodes still hear each other through the public one."""
    async with (
        _node(tmp_path) as hub,
        _node(tmp_path, private=True) as nat1,
        _node(tmp_path, private=True) as nat2,
    ):
        hub_entry = await hub.entry()
        relay = f"{hub_entry[1][0]}/p2p-circuit"
        circuit = {n.ident.peer_id: (f"{relay}/p2p/{n.ident.peer_id}",) for n in (nat1, nat2)}
        everyone = [hub_entry, *circuit.items()]
        for node in (hub, nat1, nat2):
            node.gossip.add_peers(everyone)
        sub = nat2.gossip.subscribe(TopicKind.PROGRESS)
        await nat1.gossip.wait_peers(1, 30)
        await nat2.gossip.wait_peers(1, 30)
        await hub.gossip.wait_peers(2, 30)
        await nat1.gossip.publish(TopicKind.PROGRESS, _progress(5))
        assert await _rounds_until(sub, {5}, 20) == {5}
        assert (await asyncio.wait_for(sub.get(), 0.01) if not sub._queue.empty() else None) is None
        assert nat1.gossip.peers == (hub.ident.peer_id,) and nat2.gossip.peers == (hub.ident.peer_id,)
        assert all(link.outbound is False for links in hub.gossip._links.values() for link in links)


@pytest.mark.swarm
@pytest.mark.timeout(90)
async def test_a_neighbour_that_leaves_is_replaced_and_stop_leaves_nothing(tmp_path: Path) -> None:
    async with _node(tmp_path) as a, _node(tmp_path) as b:
        async with _node(tmp_path) as c:
            a.gossip.add_peers([await b.entry(), await c.entry()])
            await a.gossip.wait_peers(2, 30)
        async with asyncio.timeout(20):  # c is gone: its link closes, b's stays
            while c.ident.peer_id in a.gossip.peers:
                await asyncio.sleep(0.05)
        assert a.gossip.peers == (b.ident.peer_id,)
        sub = b.gossip.subscribe(TopicKind.PROGRESS)
        await a.gossip.publish(TopicKind.PROGRESS, _progress(3))
        assert await _rounds_until(sub, {3}, 10) == {3}
        g = a.gossip
    assert not g._tasks and not g._links
    assert not [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("gossip-")]


@pytest.mark.swarm
@pytest.mark.timeout(90)
async def test_one_peer_cannot_take_every_link_slot(tmp_path: Path) -> None:
    async with _node(tmp_path) as bob, _node(tmp_path) as m:
        streams = [await _raw_stream(m, bob) for _ in range(5)]
        # Two are kept (both sides may dial at once); the rest are closed at once. Which two is up to the
        # daemon: it hands bob the incoming streams concurrently, not in the order they were opened.

        async def closed(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(), 10) == b""
            except TimeoutError:
                return False

        verdicts = await asyncio.gather(*(closed(r) for r, _w in streams))
        assert sorted(verdicts) == [False, False, True, True, True], verdicts
        assert len(bob.gossip._links[m.ident.peer_id]) == 2
        for _reader, writer in streams:
            writer.close()
