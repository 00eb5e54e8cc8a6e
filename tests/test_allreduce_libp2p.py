"""The all-reduce data plane over libp2p streams (what the daemon uses): real p2p daemons whose identity is
the members' own key, so every byte travels on Noise/TLS-protected libp2p connections."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from intellect.crypto.identity import Identity
from intellect.node.net.allreduce import AllReduceError, DataPlane, butterfly_allreduce, get_payload_codec
from intellect.node.net.transport import Libp2pTransport
from intellect.protocol.groups import GroupMember, GroupSpec


async def _p2ps(idents: list[Identity], tmp: Path) -> list[P2P]:
    out: list[P2P] = []
    for i, ident in enumerate(idents):
        key = tmp / f"id{i}.key"
        ident.save(key)
        boot = [str(m) for m in await out[0].get_visible_maddrs()] if out else None
        out.append(
            await P2P.create(
                initial_peers=boot,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                identity_path=str(key),
                check_if_identity_free=False,
            )
        )
    return out


@pytest.fixture
async def planes() -> AsyncIterator[list[DataPlane]]:
    idents = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.peer_id)
    with tempfile.TemporaryDirectory() as tmp:
        p2ps = await _p2ps(idents, Path(tmp))
        planes = [
            DataPlane(ident, transport=Libp2pTransport(p)) for ident, p in zip(idents, p2ps, strict=True)
        ]
        for plane in planes:
            await plane.__aenter__()
        try:
            yield planes
        finally:
            for plane in planes:
                await plane.close()
            for p in p2ps:
                await p.shutdown()


def _spec(planes: list[DataPlane]) -> GroupSpec:
    members = tuple(GroupMember(p.identity.peer_id, "", 0) for p in planes)
    return GroupSpec("run", 1, 0, "s", members)


async def test_three_members_average_over_libp2p_streams(planes: list[DataPlane]) -> None:
    spec = _spec(planes)
    xs = [torch.randn(10_001, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ws = [1.0, 2.0, 3.0]
    codec = get_payload_codec("none")
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(
                butterfly_allreduce(p, spec, x, w, codec, stall_timeout=20)
                for p, x, w in zip(planes, xs, ws, strict=True)
            )
        ),
        60,
    )
    exact = sum(x.double() * (w / 6.0) for x, w in zip(xs, ws, strict=True))
    for out in outs:
        assert torch.equal(out.flat, outs[0].flat)
        assert float((out.flat.double() - exact).abs().max()) < 1e-6


async def test_a_member_whose_channel_is_another_peer_is_refused(planes: list[DataPlane]) -> None:
    """The stream's peer is authenticated by libp2p: a hello signed by a key that is not the channel's is
    refused, even with a valid signature (a node cannot speak for another identity it also holds)."""
    a, b, _ = planes
    ghost = Identity.generate()
    impostor = DataPlane(ghost, transport=a.transport)  # ghost's key, but a's libp2p channel
    spec = GroupSpec(
        "run",
        2,
        0,
        "s",
        tuple(
            sorted(
                [GroupMember(ghost.peer_id, "", 0), GroupMember(b.identity.peer_id, "", 0)],
                key=lambda m: m.peer_id,
            )
        ),
    )
    b.open_slot(spec)
    with pytest.raises(AllReduceError):
        await asyncio.wait_for(impostor.connect(spec, GroupMember(b.identity.peer_id, "", 0)), 20)
    assert b.rejected.get("bad-proof") == 1
