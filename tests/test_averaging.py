"""Averaging rounds through a real hivemind DHT (one DHTNode + p2p daemon per peer, in process, loopback).

Named peers alice, bob and carol form groups through the DHT, average, retry without a misbehaving peer,
and refuse to meet peers whose tensors differ. Every result is checked against the exact weighted mean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import torch
from hivemind.dht.node import DHTNode
from intellect.crypto import domains
from intellect.crypto.identity import Identity
from intellect.node.net.averaging import Averager, AveragerConfig, AverageResult, _measured
from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import encode
from intellect.protocol.keys import lobby_key
from intellect.protocol.manifest import COMPRESSIONS

torch.set_num_threads(1)


@pytest.fixture
async def dht() -> AsyncIterator[Callable[[int], Awaitable[list[DHTNode]]]]:
    """Factory: `await dht(n)` gives n connected DHT nodes (real p2p daemons), shut down after the test."""
    nodes: list[DHTNode] = []

    async def make(n: int) -> list[DHTNode]:
        first = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        nodes.append(first)
        maddrs = await first.protocol.p2p.get_visible_maddrs()
        for _ in range(n - 1):
            nodes.append(await DHTNode.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        return list(nodes)

    try:
        yield make
    finally:
        for node in nodes:
            await node.shutdown()


def _tensors(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(scale * 1000))
    return {
        "layers.0.w": torch.randn(64, 48, generator=gen) * scale,
        "layers.0.b": torch.randn(48, generator=gen) * scale,
        "emb": torch.randn(100, 16, generator=gen) * scale,
    }


def _weighted_mean(inputs: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        k: sum((x[k].double() * (w / total) for x, w in zip(inputs, weights, strict=True))) for k in inputs[0]
    }


async def _averagers(nodes: list[DHTNode], config: AveragerConfig) -> list[Averager]:
    ids = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(len(nodes))]
    avs = [Averager(node, ident, "run-test", config) for node, ident in zip(nodes, ids, strict=True)]
    for av in avs:
        await av.__aenter__()
    return avs


async def _close(avs: list[Averager]) -> None:
    for av in avs:
        await av.__aexit__(None, None, None)


async def test_three_peers_average_through_the_dht(dht: Callable[[int], Awaitable[list[DHTNode]]]) -> None:
    dht_nodes = await dht(3)
    config = AveragerConfig(target_group_size=3, matchmaking_time=10, compression="int8", max_weight=1000)
    avs = await _averagers(dht_nodes, config)
    try:
        inputs = [_tensors(1.0), _tensors(2.0), _tensors(3.0)]
        weights = [100.0, 300.0, 5000.0]  # the last one claims more than the cap of 1000
        deadline = time.time() + 30
        results = await asyncio.gather(
            *(av.average(1, x, w, deadline) for av, x, w in zip(avs, inputs, weights, strict=True))
        )
    finally:
        await _close(avs)
    assert all(r.ok for r in results), [r.reason for r in results]
    assert results[0].group == sorted(av.peer_id for av in avs)
    assert all(r.total_weight == 1400.0 for r in results)
    exact = _weighted_mean(inputs, [100.0, 300.0, 1000.0])
    for name, t in exact.items():
        got = results[0].tensors[name]  # type: ignore[index]
        assert got.shape == inputs[0][name].shape and got.dtype == torch.float32
        bound = 3.0 * float(max(x[name].abs().max() for x in inputs)) / 127.0
        assert float((got.double() - t).abs().max()) <= bound
        for r in results[1:]:
            assert torch.equal(r.tensors[name], got)  # type: ignore[index]
    assert avs[0].rounds_ok == 1 and avs[0].status()["last"]["ok"]


async def test_nan_peer_is_excluded_and_the_others_still_average(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    dht_nodes = await dht(3)
    config = AveragerConfig(target_group_size=3, matchmaking_time=2, compression="none", initial_latency=1.25)
    avs = await _averagers(dht_nodes, config)
    try:
        inputs = [_tensors(1.0), _tensors(2.0), _tensors(3.0)]
        inputs[2]["emb"][5, 5] = float("nan")
        avs[2]._validate_local = False  # fault injection: carol sends her NaN instead of refusing
        deadline = time.time() + 40
        results = await asyncio.gather(
            *(av.average(1, x, 1.0, deadline) for av, x in zip(avs, inputs, strict=True))
        )
    finally:
        await _close(avs)
    honest, nan_peer = results[:2], results[2]
    assert not nan_peer.ok and nan_peer.tensors is None
    assert all(r.ok for r in honest), [r.reason for r in honest]
    assert all(r.excluded == (avs[2].peer_id,) for r in honest)
    assert all(r.group == sorted([avs[0].peer_id, avs[1].peer_id]) for r in honest)
    exact = _weighted_mean(inputs[:2], [1.0, 1.0])
    for name, t in exact.items():
        assert torch.allclose(honest[0].tensors[name].double(), t, atol=1e-6)  # type: ignore[index]
        assert torch.equal(honest[0].tensors[name], honest[1].tensors[name])  # type: ignore[index]


async def test_local_nan_is_refused_without_network(dht: Callable[[int], Awaitable[list[DHTNode]]]) -> None:
    dht_nodes = await dht(1)
    avs = await _averagers(dht_nodes, AveragerConfig())
    try:
        x = _tensors(1.0)
        x["emb"][0, 0] = float("inf")
        result = await avs[0].average(1, x, 1.0, time.time() + 5)
    finally:
        await _close(avs)
    assert not result.ok and result.reason == "non-finite-local" and result.tensors is None


async def test_peers_with_different_tensors_never_meet(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    dht_nodes = await dht(2)
    config = AveragerConfig(min_group_size=2, matchmaking_time=1.5, compression="none")
    avs = await _averagers(dht_nodes, config)
    try:
        other = _tensors(2.0)
        other["emb"] = torch.zeros(100, 17)  # one shape differs: a different schema hash, a different key
        deadline = time.time() + 3
        results = await asyncio.gather(
            avs[0].average(1, _tensors(1.0), 1.0, deadline), avs[1].average(1, other, 1.0, deadline)
        )
    finally:
        await _close(avs)
    assert all(not r.ok and r.reason == "too few peers" for r in results)
    assert all(r.group == [av.peer_id] for r, av in zip(results, avs, strict=True))


async def test_forged_group_record_is_ignored(dht: Callable[[int], Awaitable[list[DHTNode]]]) -> None:
    dht_nodes = await dht(1)
    config = AveragerConfig(min_group_size=2, matchmaking_time=1.5, compression="none")
    avs = await _averagers(dht_nodes, config)
    try:
        from intellect.node.net.allreduce import schema_hash

        tensors = _tensors(1.0)
        key = lobby_key("run-test", 1, 0, schema_hash(tensors))
        victim, mallory = Identity.generate(), Identity.generate()
        # A record naming `victim` but signed by mallory, stored under the victim's subkey.
        rec = am.GroupRecord(
            "run-test", 1, 0, schema_hash(tensors), victim.peer_id, "127.0.0.1", 9, time.time() + 60
        )
        forged = am.GroupRecord(
            **{**rec.__dict__, "sig": mallory.sign(domains.ALLREDUCE, rec.signing_bytes())}
        )
        await dht_nodes[0].store(key, encode(forged), time.time() + 60, subkey=victim.peer_id)
        assert victim.peer_id in await avs[0].lobbies.board.read(key)  # the forgery is there to be read...
        result = await avs[0].average(1, tensors, 1.0, time.time() + 3)
    finally:
        await _close(avs)
    assert not result.ok and result.group == [avs[0].peer_id]  # ...and was not taken for a member


async def test_stall_timeout_follows_measured_bandwidth(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    dht_nodes = await dht(1)
    avs = await _averagers(dht_nodes, AveragerConfig(compression="none", initial_bandwidth=1e6))
    try:
        av = avs[0]
        slow = av.stall_timeout(10_000_000, 4)
        assert av.stall_timeout(0, 4) == 4.0 * 2.0  # before any measurement: slack × the latency prior
        # A completed attempt: 1 GB moved in 1 s of scatter and gather, 0.1 s of everything else.
        _measured(av, 1e9, {"connect": 0.02, "scatter": 0.5, "reduce": 0.05, "gather": 0.5, "agree": 0.03})
        fast = av.stall_timeout(10_000_000, 4)
        quiet = av.stall_timeout(0, 4)
    finally:
        await _close(avs)
    # 60 MB per peer at 1 MB/s is a minute-scale budget; at 1 GB/s it is about a second, and the latency
    # (0.1 s measured) counts as one poll interval at least, the skew of members starting an attempt.
    assert slow > 200 and fast < 1.5
    assert quiet == pytest.approx(4.0 * 0.25)
    av.config = dataclasses.replace(av.config, poll_interval=0.05)
    assert av.stall_timeout(0, 4) == pytest.approx(4.0 * 0.1)


async def test_lone_laggard_stops_waiting_once_overtaken(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    """Alone in round 5's matchmaking: it waits for company until peers say they are past round 5, then
    gives up at once (reason "overtaken") instead of holding out to the deadline."""
    (node,) = await dht(1)
    config = AveragerConfig(min_group_size=2, matchmaking_time=0.5, compression="none")
    (av,) = await _averagers([node], config)
    try:
        t0 = time.time()
        passed = asyncio.Event()
        asyncio.get_running_loop().call_later(1.5, passed.set)
        result = await asyncio.wait_for(
            av.average(5, _tensors(1.0), 10.0, deadline=t0 + 30, overtaken=passed.is_set), 20
        )
        took = time.time() - t0
        assert not result.ok and result.tensors is None
        assert result.reason == "overtaken"
        assert 1.4 < took < 15, took  # it waited for company first, then stopped well before the deadline
        # Without the hint, the same lone peer reports "too few peers" at its deadline.
        result = await av.average(6, _tensors(1.0), 10.0, deadline=time.time() + 1.0)
        assert not result.ok and result.reason == "too few peers"
    finally:
        await _close([av])


async def test_two_stragglers_of_a_one_lobby_run_do_not_average_a_round_two_others_hold(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    """The fork the four-daemon freeze test caught: in a run of four that meets in one lobby, two members
    commit round 3 together; the other two arrive late, find each other in the lobby and, until now,
    averaged round 3 as a second group, a second state for the round. Now both see the two holders outside
    their group and give up ("overtaken"), to catch up; with only one holder (one early claim, maybe a
    lie) they still average."""
    nodes = await dht(2)
    config = AveragerConfig(target_group_size=4, min_group_size=2, matchmaking_time=0.5, compression="none")
    avs = await _averagers(nodes, config)
    others = [Identity.from_seed(bytes([90 + i]) * 32).peer_id for i in range(2)]
    expected = [*others, *(av.peer_id for av in avs)]
    try:

        async def both(round_: int, holders: list[str], overtaken: bool) -> list[AverageResult]:
            runs = (
                av.average(
                    round_,
                    _tensors(1.0 + i),
                    10.0,
                    time.time() + 20,
                    expected=expected,
                    holders=lambda: holders,
                    overtaken=(lambda: True) if overtaken else None,
                )
                for i, av in enumerate(avs)
            )
            return list(await asyncio.wait_for(asyncio.gather(*runs), 30))

        ran = await both(3, others, overtaken=True)
        assert [(r.ok, r.reason) for r in ran] == [(False, "overtaken")] * 2
        ran = await both(4, others[:1], overtaken=False)
        assert [r.ok for r in ran] == [True, True], [r.reason for r in ran]
    finally:
        await _close(avs)


async def test_a_member_that_never_connects_is_left_out_of_the_retry(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    """mallory publishes a valid, signed heartbeat for round 1 but nothing listens at her address and she
    never renews it: an attempt that includes her fails naming her, and she is left out of the next
    declaration (her heartbeat never changes again); the honest members average without her."""
    import socket

    from intellect.node.net.allreduce import schema_hash

    dht_nodes = await dht(3)
    config = AveragerConfig(target_group_size=3, matchmaking_time=4, compression="none", max_weight=1000)
    avs = await _averagers(dht_nodes[:2], config)
    try:
        inputs, weights = [_tensors(1.0), _tensors(2.0)], [100.0, 300.0]
        schema = schema_hash(inputs[0])
        mallory = Identity.generate()
        with socket.socket() as s:  # a port that was free a moment ago: connections to it are refused
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        rec = am.GroupRecord(
            "run-test", 1, 0, schema, mallory.peer_id, "127.0.0.1", dead_port, time.time() + 60
        )
        await dht_nodes[2].store(
            lobby_key("run-test", 1, 0, schema),
            encode(rec.signed(mallory)),
            time.time() + 60,
            subkey=mallory.peer_id,
        )
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    av.average(1, x, w, time.time() + 40)
                    for av, x, w in zip(avs, inputs, weights, strict=True)
                )
            ),
            50,
        )
    finally:
        await _close(avs)
    want = _weighted_mean(inputs, weights)
    for r in results:
        assert r.ok and r.tensors is not None, r.reason
        assert mallory.peer_id not in r.group
        for k, v in want.items():
            assert torch.allclose(r.tensors[k].double(), v, atol=1e-5)


async def test_peers_the_run_does_not_admit_are_never_grouped(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    """An allowlist run: alice and bob admit each other only. carol publishes a valid group record and
    tries to join; the honest pair averages without her (her record is ignored, her hello refused)."""
    dht_nodes = await dht(3)
    config = AveragerConfig(target_group_size=3, matchmaking_time=3, compression="none", max_weight=1000)
    ids = [Identity.from_seed(bytes([70 + i]) * 32) for i in range(3)]
    allowed = {ids[0].peer_id, ids[1].peer_id}
    avs = [
        Averager(node, ident, "run-test", config, admitted=(allowed.__contains__ if i < 2 else None))
        for i, (node, ident) in enumerate(zip(dht_nodes, ids, strict=True))
    ]
    for av in avs:
        await av.__aenter__()
    try:
        inputs, weights = [_tensors(1.0), _tensors(2.0), _tensors(50.0)], [100.0, 300.0, 1000.0]
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    av.average(1, x, w, time.time() + (25 if i < 2 else 8))
                    for i, (av, x, w) in enumerate(zip(avs, inputs, weights, strict=True))
                )
            ),
            40,
        )
    finally:
        await _close(avs)
    want = _weighted_mean(inputs[:2], weights[:2])
    for r in results[:2]:
        assert r.ok and r.tensors is not None, r.reason
        assert r.group == sorted(allowed)
        for k, v in want.items():
            assert torch.allclose(r.tensors[k].double(), v, atol=1e-5)
    assert not results[2].ok


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_compression_a_manifest_accepts_is_one_the_averager_runs(compression: str) -> None:
    # The manifest and the averager keep separate lists; a name only the manifest knew got past `seed`
    # and then stopped every node at start (int4 and int2 did, before this test).
    assert AveragerConfig(compression=compression).compression == compression


async def test_an_average_far_beyond_our_own_contribution_is_refused(
    dht: Callable[[int], Awaitable[list[DHTNode]]],
) -> None:
    """A group whose hostile members carry the average (here one of three under `mean`, as two of three
    would under any reducer) gets no honest commit: the honest members refuse the result and retry."""
    dht_nodes = await dht(3)
    config = AveragerConfig(
        target_group_size=3, matchmaking_time=2, compression="none", max_attempts=2, initial_latency=1.0
    )
    avs = await _averagers(dht_nodes, config)
    try:
        inputs = [_tensors(1.0), _tensors(1.5), {k: v * 1e4 for k, v in _tensors(2.0).items()}]
        deadline = time.time() + 25
        results = await asyncio.gather(
            *(av.average(1, x, 1.0, deadline) for av, x in zip(avs, inputs, strict=True))
        )
        # The same group with honest inputs only averages at once: the bound is far above honest spread.
        honest_inputs = [_tensors(1.0), _tensors(1.5), _tensors(2.0)]
        again = await asyncio.gather(
            *(av.average(2, x, 1.0, time.time() + 25) for av, x in zip(avs, honest_inputs, strict=True))
        )
    finally:
        await _close(avs)
    # The honest members refused the result (their retry may then average without the attacker, who
    # took its own average and left): whatever they committed holds none of the inflated input.
    for r in results[:2]:
        assert r.attempts >= 2 or not r.ok, r
        if r.ok:
            assert r.group == sorted(av.peer_id for av in avs[:2])
            exact = _weighted_mean(inputs[:2], [1.0, 1.0])
            assert all(torch.allclose(r.tensors[k].double(), t, atol=1e-6) for k, t in exact.items())  # type: ignore[index]
        else:
            assert r.reason == "implausible average", r.reason
    assert all(r.ok for r in again), [r.reason for r in again]
