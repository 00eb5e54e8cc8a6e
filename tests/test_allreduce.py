"""Butterfly all-reduce between in-process members (alice, bob, carol) over real TCP sockets on 127.0.0.1.

Every average is compared with the exact weighted mean, and every member's result with every other's,
bit for bit: an all-reduce that reports success must really have averaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from typing import Any

import pytest
import torch
from intellect.crypto.identity import Identity
from intellect.node.net.allreduce import (
    AllReduceError,
    DataPlane,
    butterfly_allreduce,
    flatten,
    get_payload_codec,
    schema_hash,
    unflatten,
)
from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import decode, encode
from intellect.protocol.groups import GroupMember, GroupSpec, partition_sizes

torch.set_num_threads(1)


def _identities(n: int) -> list[Identity]:
    # Deterministic seeds: alice, bob, carol... sorted by peer ID as groups require.
    ids = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]
    return sorted(ids, key=lambda i: i.peer_id)


class _Planes:
    def __init__(self, n: int, **kwargs: Any) -> None:
        self.planes = [DataPlane(ident, **kwargs) for ident in _identities(n)]

    async def __aenter__(self) -> list[DataPlane]:
        for p in self.planes:
            await p.__aenter__()
        return self.planes

    async def __aexit__(self, *exc: object) -> None:
        for p in self.planes:
            await p.close()


def _spec(planes: list[DataPlane], attempt: int = 0, schema: str = "s") -> GroupSpec:
    members = tuple(GroupMember(p.identity.peer_id, "127.0.0.1", p.port) for p in planes)
    return GroupSpec("run", 7, attempt, schema, tuple(sorted(members, key=lambda m: m.peer_id)))


def _exact(xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    total = sum(ws)
    return sum(
        (x.double() * (w / total) for x, w in zip(xs, ws, strict=True)), torch.zeros_like(xs[0]).double()
    )


def test_partition_sizes_cover_everything() -> None:
    for numel in (0, 1, 5, 1000, 1001):
        for n in (1, 2, 3, 8):
            sizes = partition_sizes(numel, n)
            assert sum(sizes) == numel and len(sizes) == n and max(sizes) - min(sizes) <= 1


def test_schema_hash_depends_on_names_shapes_dtypes() -> None:
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert schema_hash(base) == schema_hash({"b": torch.ones(4), "a": torch.ones(2, 3)})
    assert schema_hash(base) != schema_hash({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    assert schema_hash(base) != schema_hash({"a": torch.zeros(2, 3), "c": torch.zeros(4)})
    assert schema_hash(base) != schema_hash(
        {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(4)}
    )


def test_flatten_unflatten_round_trip() -> None:
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(5), "h": torch.randn(2).half()}
    back = unflatten(flatten(tensors), tensors)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k], t)


@pytest.mark.parametrize("n", [2, 3, 4])
async def test_fp32_average_is_exact_and_identical(n: int) -> None:
    async with _Planes(n) as planes:
        spec = _spec(planes)
        xs = [torch.randn(10_001) for _ in range(n)]
        ws = [float(100 * (i + 1)) for i in range(n)]
        codec = get_payload_codec("none")
        outs = await asyncio.wait_for(
            asyncio.gather(
                *(butterfly_allreduce(p, spec, x, w, codec) for p, x, w in zip(planes, xs, ws, strict=True))
            ),
            30,
        )
    exact = _exact(xs, ws)
    for out in outs:
        assert torch.equal(out.flat, outs[0].flat)
        assert out.total_weight == sum(ws)
    assert torch.allclose(outs[0].flat.double(), exact, atol=1e-6, rtol=0)


async def test_int8_average_within_quantization_and_bit_identical() -> None:
    async with _Planes(3) as planes:
        spec = _spec(planes)
        xs = [torch.randn(50_000) * (i + 1) for i in range(3)]
        ws = [1.0, 1.0, 2.0]
        codec = get_payload_codec("int8")
        outs = await asyncio.wait_for(
            asyncio.gather(
                *(butterfly_allreduce(p, spec, x, w, codec) for p, x, w in zip(planes, xs, ws, strict=True))
            ),
            30,
        )
    exact = _exact(xs, ws)
    # Two roundings: each contribution (half a step of its block) and the reduced part (half a step).
    bound = max(float(x.abs().max()) for x in xs) / 127.0
    err = float((outs[0].flat.double() - exact).abs().max())
    assert 0 < err <= bound
    assert all(torch.equal(o.flat, outs[0].flat) for o in outs)
    # It did average: far from any single input.
    assert all(float((outs[0].flat - x).abs().max()) > 10 * bound for x in xs)


async def test_weights_are_capped() -> None:
    async with _Planes(2) as planes:
        spec = _spec(planes)
        xs = [torch.zeros(100), torch.ones(100)]
        codec = get_payload_codec("none")
        outs = await asyncio.gather(
            *(
                butterfly_allreduce(p, spec, x, w, codec, max_weight=10.0)
                for p, x, w in zip(planes, xs, [10, 1e9], strict=True)
            )
        )
    # The greedy peer counts as 10 tokens, not a billion: the mean is 0.5, not ~1.
    assert torch.allclose(outs[0].flat, torch.full((100,), 0.5))
    assert outs[0].total_weight == 20.0


async def test_non_finite_part_is_refused_and_sender_named() -> None:
    async with _Planes(3) as planes:
        spec = _spec(planes)
        bad = planes[1].identity.peer_id
        xs = [torch.randn(999) for _ in range(3)]
        xs[1][::7] = float("nan")
        codec = get_payload_codec("none")
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    butterfly_allreduce(p, spec, x, 1.0, codec, stall_timeout=10, validate_local=(i != 1))
                    for i, (p, x) in enumerate(zip(planes, xs, strict=True))
                ),
                return_exceptions=True,
            ),
            30,
        )
    assert all(isinstance(r, AllReduceError) for r in results), results
    honest = [r for i, r in enumerate(results) if i != 1]
    assert all(r.culprit == bad for r in honest if isinstance(r, AllReduceError))


async def test_own_non_finite_refused_before_sending() -> None:
    async with _Planes(2) as planes:
        spec = _spec(planes)
        x = torch.randn(10)
        x[3] = float("inf")
        with pytest.raises(AllReduceError) as e:
            await butterfly_allreduce(planes[0], spec, x, 1.0, get_payload_codec("int8"), stall_timeout=2)
        assert e.value.reason == "non-finite-local"


async def test_member_list_mismatch_fails_both_fast() -> None:
    async with _Planes(3) as planes:
        a, b, c = planes
        full = _spec(planes)
        pair = _spec([a, b])  # a and b think the group is {a, b}; c thinks it is {a, b, c}
        x = torch.randn(100)
        codec = get_payload_codec("none")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(
            butterfly_allreduce(a, pair, x, 1.0, codec, stall_timeout=20),
            butterfly_allreduce(b, pair, x * 3, 1.0, codec, stall_timeout=20),
            butterfly_allreduce(c, full, x, 1.0, codec, stall_timeout=20),
            return_exceptions=True,
        )
        elapsed = loop.time() - t0
    # a and b agree with each other and complete; c, which saw a different member list, fails; and it
    # fails on the refused hello, long before its 20 s stall timeout.
    assert isinstance(results[2], AllReduceError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[1], BaseException)
    assert torch.equal(results[0].flat, results[1].flat)
    assert torch.allclose(results[0].flat, x * 2)
    assert elapsed < 10


async def test_stalled_member_times_out() -> None:
    async with _Planes(3) as planes:
        spec = _spec(planes)
        codec = get_payload_codec("none")
        stop = asyncio.Event()

        async def freeze(step: str) -> None:
            await stop.wait()  # carol connects, then never sends a partition

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        carol = asyncio.ensure_future(
            butterfly_allreduce(planes[2], spec, torch.ones(100), 1.0, codec, stall_timeout=60, fault=freeze)
        )
        results = await asyncio.gather(
            *(
                butterfly_allreduce(p, spec, torch.ones(100), 1.0, codec, stall_timeout=1.5)
                for p in planes[:2]
            ),
            return_exceptions=True,
        )
        elapsed = loop.time() - t0
        carol.cancel()
        await asyncio.gather(carol, return_exceptions=True)
    assert all(isinstance(r, AllReduceError) and r.reason == "stalled" for r in results), results
    assert elapsed < 10


async def test_impostor_cannot_join_as_a_member() -> None:
    async with _Planes(2) as planes:
        a, b = planes
        spec = _spec(planes)
        mallory = Identity.generate()
        # b waits for a's connection; mallory dials b claiming to be a, signing with its own key.
        task = asyncio.ensure_future(
            butterfly_allreduce(b, spec, torch.ones(10), 1.0, get_payload_codec("none"), stall_timeout=3)
        )
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        try:
            hello = am.Hello("run", 7, 0, spec.group_id, a.identity.peer_id, b.identity.peer_id)
            data = encode(hello)
            writer.write(struct.pack(">I", len(data)) + data)
            (n,) = struct.unpack(">I", await reader.readexactly(4))
            challenge = decode(await reader.readexactly(n), expected=am.Challenge)
            from intellect.crypto import domains

            sig = mallory.sign(domains.ALLREDUCE, hello.proof_bytes(challenge.nonce))
            data = encode(am.Proof(sig))
            writer.write(struct.pack(">I", len(data)) + data)
            (n,) = struct.unpack(">I", await reader.readexactly(4))
            answer = decode(await reader.readexactly(n))
        finally:
            writer.close()
        assert isinstance(answer, am.Reject) and answer.reason == "bad proof"
        assert b.rejected.get("bad-proof") == 1
        with pytest.raises(AllReduceError):
            await task  # a never connected: b's attempt stalls instead of accepting mallory


async def test_garbage_on_the_data_plane_is_dropped() -> None:
    async with _Planes(1) as (plane,):
        for junk in (b"\xff" * 8, struct.pack(">I", 1 << 30), os.urandom(64)):
            reader, writer = await asyncio.open_connection("127.0.0.1", plane.port)
            try:
                writer.write(junk)
                writer.write_eof()
                # The server drops the connection (EOF or reset) and keeps serving the next one.
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(100), 5) == b""
            finally:
                writer.close()
        await asyncio.sleep(0.1)
        assert sum(plane.rejected.values()) == 3


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([], True),
        ([1.0, -2.0, 3.5], True),
        ([3.0e38, 3.0e38, -1.0], True),  # the sum overflows; every value is still finite
        ([1.0, float("nan"), 2.0], False),
        ([1.0, float("inf")], False),
        ([float("-inf"), 5.0], False),
        ([float("inf"), float("-inf")], False),  # the sum is NaN
        ([3.0e38, 3.0e38, float("nan")], False),
    ],
)
def test_all_finite_agrees_with_isfinite(values: list[float], finite: bool) -> None:
    from intellect.node.net.allreduce import all_finite

    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite(t) is finite
    assert bool(torch.isfinite(t).all()) is finite


@pytest.mark.parametrize("owners", [(True, False, False), (False, True, True, False)])
async def test_members_behind_nat_own_nothing_and_still_get_the_exact_average(
    owners: tuple[bool, ...],
) -> None:
    """A member that cannot be dialled (owner=False) sends its parts to the owners and receives the average
    from them on connections it opened; two such members never exchange anything."""
    n = len(owners)
    async with _Planes(n) as planes:
        members = tuple(
            sorted(
                (
                    GroupMember(p.identity.peer_id, "127.0.0.1", p.port, own)
                    for p, own in zip(planes, owners, strict=True)
                ),
                key=lambda m: m.peer_id,
            )
        )
        spec = GroupSpec("run", 7, 0, "s", members)
        assert spec.group_id != _spec(planes).group_id  # who owns a part is part of what members agree on
        xs = [torch.randn(10_001) for _ in range(n)]
        ws = [float(i + 1) for i in range(n)]
        codec = get_payload_codec("none")
        outs = await asyncio.wait_for(
            asyncio.gather(
                *(butterfly_allreduce(p, spec, x, w, codec) for p, x, w in zip(planes, xs, ws, strict=True))
            ),
            30,
        )
        exact = _exact(xs, ws)
        for out in outs:
            assert torch.equal(out.flat, outs[0].flat)
            assert float((out.flat.double() - exact).abs().max()) < 1e-6
            assert out.total_weight == sum(ws)
            assert out.part_sizes == tuple(spec.part_sizes(10_001))
        for plane, own in zip(planes, owners, strict=True):
            assert plane.rejected == {}, plane.rejected
            if not own:  # nobody ever dialled a member behind a NAT: it opened every connection it used
                assert plane.accepted == 0, plane.accepted
        non_owner = sum(1 for o in owners if not o)
        assert sum(spec.part_sizes(10_001)) == 10_001 and spec.part_sizes(10_001).count(0) == non_owner


async def test_a_group_with_no_owner_fails_at_once() -> None:
    async with _Planes(2) as planes:
        members = tuple(
            sorted(
                (GroupMember(p.identity.peer_id, "127.0.0.1", p.port, False) for p in planes),
                key=lambda m: m.peer_id,
            )
        )
        spec = GroupSpec("run", 7, 0, "s", members)
        with pytest.raises(AllReduceError, match="no-owner"):
            await butterfly_allreduce(planes[0], spec, torch.zeros(10), 1.0, get_payload_codec("none"))
