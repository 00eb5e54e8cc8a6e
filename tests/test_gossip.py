"""Signed gossip end to end: real gossip child processes (py-libp2p gossipsub) on 127.0.0.1.

alice–bob–carol form a chain (carol hears alice only through bob). A hostile raw publisher (a bare
py-libp2p host, `test_gossip_raw_publisher.py`, that skips our signing and validation) connects to bob
only and injects forged, replayed, stale, foreign-run and malformed envelopes: none may reach bob's or
anyone's application, and bob must not forward them (carol and alice see no rejections at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
from intellect.crypto.identity import Identity
from intellect.node.net.gossip import GossipConfig, GossipService, Subscription
from intellect.protocol.codec import packb_canonical, unpackb_limited
from intellect.protocol.envelope import seal
from intellect.protocol.gossip_messages import BridgeDeliver, CheckpointAnnounce, Leaving, Progress
from intellect.protocol.keys import TopicKind, parse_topic, topic_name

RUN = "ab" * 32
OTHER_RUN = "cd" * 32
RAW_PUBLISHER = Path(__file__).with_name("test_gossip_raw_publisher.py")
CONFIG = GossipConfig(restart_backoff_s=0.2, stop_timeout_s=3.0)


def _key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.key"
    Identity.generate().save(path)
    return path


@contextlib.asynccontextmanager
async def _node(key: Path, admitted: Callable[[str], bool] = lambda _: True) -> AsyncIterator[GossipService]:
    async with GossipService(key, RUN, admitted, config=CONFIG) as service:
        yield service


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


def test_topics_and_bridge_frames_round_trip() -> None:
    assert topic_name(RUN, "progress") == f"intellect/{RUN}/progress"
    assert parse_topic(topic_name(RUN, TopicKind.LEAVING)) == (RUN, TopicKind.LEAVING)
    with pytest.raises(ValueError):
        parse_topic("intellect/x/unknown")
    from intellect.protocol.codec import decode, encode

    frame = BridgeDeliver("t", "s", 1, 2.0, "f", encode(CheckpointAnnounce(1, "00" * 32, 10, 4)))
    assert decode(encode(frame)) == frame


@pytest.mark.swarm
@pytest.mark.timeout(90)
async def test_bad_messages_are_neither_delivered_nor_forwarded(tmp_path: Path) -> None:
    keys = {name: _key(tmp_path, name) for name in ("alice", "bob", "carol", "mallory", "outsider")}
    ids = {name: Identity.load(path) for name, path in keys.items()}
    members = {ids[n].peer_id for n in ("alice", "bob", "carol", "mallory")}  # not "outsider"
    admitted = members.__contains__

    async with (
        _node(keys["alice"], admitted) as alice,
        _node(keys["bob"], admitted) as bob,
        _node(keys["carol"], admitted) as carol,
    ):
        bob.add_peers(alice.listen_maddrs)
        carol.add_peers(bob.listen_maddrs)
        subs = {n: g.subscribe(TopicKind.PROGRESS) for n, g in (("a", alice), ("b", bob), ("c", carol))}
        await bob.wait_peers(2, 20)
        await carol.wait_peers(1, 20)

        topic = bob.topic(TopicKind.PROGRESS)
        mallory = ids["mallory"]
        now = time.time()
        good_1 = seal(mallory, RUN, _progress(7), seq=1000)
        tampered = unpackb_limited(seal(mallory, RUN, _progress(66), seq=1001))
        tampered["body"] = unpackb_limited(seal(mallory, RUN, _progress(67), seq=1001))["body"]
        bad = [
            packb_canonical(tampered),  # forged: signature no longer covers the body
            good_1,  # replayed verbatim by its own author (a new gossip message id)
            seal(ids["alice"], RUN, _progress(68), seq=1),  # alice's envelope, published by mallory
            seal(mallory, RUN, _progress(69), seq=1002, ts=now - 3600),  # stale
            seal(mallory, OTHER_RUN, _progress(70), seq=1003),  # foreign run
            seal(mallory, RUN, Leaving(round=71), seq=1004),  # wrong payload type for the topic
            b"\x93\x01\x02garbage",  # not an envelope at all
        ]
        good_2 = seal(mallory, RUN, _progress(8), seq=1005)
        plan = tmp_path / "mallory.msgpack"
        plan.write_bytes(msgpack.packb([[topic, d] for d in [good_1, *bad, good_2]]))
        outsider_plan = tmp_path / "outsider.msgpack"
        outsider_plan.write_bytes(msgpack.packb([[topic, seal(ids["outsider"], RUN, _progress(72), 5)]]))

        raw: list[asyncio.subprocess.Process] = []
        try:
            for name, path in (("mallory", plan), ("outsider", outsider_plan)):
                raw.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        str(RAW_PUBLISHER),
                        str(keys[name]),
                        str(path),
                        bob.listen_maddrs[0],
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                    )
                )
            for proc in raw:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line.strip() == b"published", line
            # The positive control: mallory's two valid messages cross bob to carol.
            assert await _rounds_until(subs["c"], {7, 8}, 15) == {7, 8}
            assert await _rounds_until(subs["a"], {7, 8}, 15) == {7, 8}
            await asyncio.sleep(1.5)  # room for anything bob wrongly forwarded to arrive
        finally:
            for proc in raw:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

        assert _drain(subs["b"]) <= {7, 8} and _drain(subs["c"]) == set() and _drain(subs["a"]) == set()
        assert bob.rejections["forged_signature"] >= 1
        assert bob.rejections["replayed"] >= 2
        assert bob.rejections["stale"] >= 1
        assert bob.rejections["wrong_run"] >= 1
        assert bob.rejections["malformed"] >= 2
        assert bob.rejections["not_admitted"] >= 1
        assert bob.scores[mallory.peer_id] < 0
        assert bob.scores[ids["outsider"].peer_id] < 0
        # Not forwarded: the peers behind bob never even had to reject anything.
        assert sum(carol.rejections.values()) == 0
        assert sum(alice.rejections.values()) == 0
        assert carol.delivered["progress"] == 2


@pytest.mark.swarm
@pytest.mark.timeout(90)
async def test_copies_from_several_honest_neighbours_are_not_penalised(tmp_path: Path) -> None:
    """In a full mesh every message reaches a peer from several neighbours at once. py-libp2p validates
    such copies concurrently; only the first may count, and a later copy must not be mistaken for a replay
    (which would lower, and eventually blacklist, an honest forwarder)."""
    names = ("alice", "bob", "carol", "dave")

    def slow_admission(peer_id: str) -> bool:
        # A slow policy keeps the first copy of each author's first message waiting in the validator while
        # copies from the other neighbours arrive: the overlap that used to be counted as replays.
        time.sleep(0.1)
        return True

    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(_node(_key(tmp_path, n), slow_admission)) for n in names]
        for i, node in enumerate(nodes):
            node.add_peers([a for other in nodes[:i] for a in other.listen_maddrs])
        subs = [node.subscribe(TopicKind.PROGRESS) for node in nodes]
        for node in nodes:
            await node.wait_peers(len(nodes) - 1, 30)
        rounds = range(1, 21)
        for r in rounds:  # a burst from every peer, so copies overlap in every validator
            await asyncio.gather(*(node.publish(TopicKind.PROGRESS, _progress(r)) for node in nodes))
        for sub in subs:
            async with asyncio.timeout(30):
                got: dict[str, set[int]] = {}
                while sum(len(v) for v in got.values()) < len(rounds) * (len(nodes) - 1):
                    m = await sub.get()
                    got.setdefault(m.sender, set()).add(m.message.round)
            assert all(v == set(rounds) for v in got.values()) and len(got) == len(nodes) - 1
        await asyncio.sleep(0.5)
        for node in nodes:
            assert sum(node.rejections.values()) == 0, node.rejections
            assert all(score >= 0 for score in node.scores.values()), node.scores
            assert node.delivered["progress"] == len(rounds) * (len(nodes) - 1)


@pytest.mark.swarm
@pytest.mark.timeout(60)
async def test_late_joiner_receives_later_messages(tmp_path: Path) -> None:
    async with _node(_key(tmp_path, "alice")) as alice, _node(_key(tmp_path, "bob")) as bob:
        bob.add_peers(alice.listen_maddrs)
        bob_sub = bob.subscribe("progress")
        await bob.wait_peers(1, 20)
        await alice.publish(TopicKind.PROGRESS, _progress(1))
        assert await _rounds_until(bob_sub, {1}, 10) == {1}
        async with _node(_key(tmp_path, "carol")) as carol:
            carol_sub = carol.subscribe(TopicKind.PROGRESS)
            carol.add_peers(bob.listen_maddrs)
            await carol.wait_peers(1, 20)
            await alice.publish(TopicKind.PROGRESS, _progress(2))
            assert 2 in await _rounds_until(carol_sub, {2}, 10)
            await _rounds_until(bob_sub, {2}, 10)


@pytest.mark.swarm
@pytest.mark.timeout(60)
async def test_killed_child_is_noticed_and_restarted(tmp_path: Path) -> None:
    async with _node(_key(tmp_path, "alice")) as alice, _node(_key(tmp_path, "bob")) as bob:
        bob.add_peers(alice.listen_maddrs)
        await bob.wait_peers(1, 20)
        old_pid, old_addrs = alice.child_pid, alice.listen_maddrs
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            while alice.restarts < 1:
                await asyncio.sleep(0.05)
        await alice.wait_ready(20)
        assert alice.child_pid != old_pid
        assert not Path(f"/proc/{old_pid}").exists() or _is_zombie_free(old_pid)
        assert alice.listen_maddrs == old_addrs  # same port: peers that know us find us again
        # bob redials alice's known address; the restarted child delivers again.
        alice_sub = alice.subscribe(TopicKind.PROGRESS)
        async with asyncio.timeout(25):
            round_ = 0
            while alice_sub._queue.empty():
                round_ += 1
                await bob.publish(TopicKind.PROGRESS, _progress(round_))
                await asyncio.sleep(0.5)


def _is_zombie_free(pid: int) -> bool:
    """True when `pid` now belongs to another process (PID reuse), i.e. ours was reaped."""
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True


async def _no_leftovers(threads_before: set[threading.Thread], fds_before: set[str]) -> None:
    async with asyncio.timeout(5):  # asyncio's waitpid thread ends right after the exit it reports
        # No thread of ours is left (one left over from an earlier test may end meanwhile: that is fine).
        while {t for t in threading.enumerate() if t.is_alive()} - threads_before:
            await asyncio.sleep(0.05)
    assert set(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.swarm
@pytest.mark.timeout(60)
async def test_stop_leaves_no_thread_socket_or_process(tmp_path: Path) -> None:
    """A node with a live peer and traffic stops gracefully: its child exits by itself (status 0, no
    SIGTERM needed) and nothing of it is left in this process."""
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))
    async with _node(_key(tmp_path, "bob")) as bob:
        bob_sub = bob.subscribe(TopicKind.CHECKPOINT)
        alice = GossipService(_key(tmp_path, "alice"), RUN, lambda _: True, config=CONFIG)
        async with alice:
            pid = alice.child_pid
            assert pid is not None and Path(f"/proc/{pid}").exists()
            assert alice._child is not None
            proc = alice._child.proc
            alice.add_peers(bob.listen_maddrs)
            await alice.wait_peers(1, 20)
            await alice.publish(TopicKind.CHECKPOINT, CheckpointAnnounce(1, "00" * 32, 1024, 256))
            async with asyncio.timeout(10):
                assert (await bob_sub.get()).sender == alice.peer_id
            started = time.monotonic()
        assert time.monotonic() - started < CONFIG.stop_timeout_s  # graceful, not the SIGTERM fallback
        assert proc.returncode == 0
        assert not Path(f"/proc/{pid}").exists()  # exited and reaped, not a zombie
        assert alice.child_pid is None
    await _no_leftovers(threads_before, fds_before)


@pytest.mark.swarm
@pytest.mark.timeout(60)
async def test_stop_kills_a_child_that_does_not_exit(tmp_path: Path) -> None:
    """A frozen child (here: SIGSTOP) ignores BridgeStop and SIGTERM; stop() still kills and reaps it."""
    threads_before = set(threading.enumerate())
    fds_before = set(os.listdir("/proc/self/fd"))
    config = GossipConfig(restart_backoff_s=0.2, stop_timeout_s=1.0)
    async with GossipService(_key(tmp_path, "alice"), RUN, lambda _: True, config=config) as alice:
        assert alice._child is not None
        proc, pid = alice._child.proc, alice.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
    assert proc.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{pid}").exists()
    assert alice.restarts == 0  # stopping is not a crash: nothing was restarted
    await _no_leftovers(threads_before, fds_before)
