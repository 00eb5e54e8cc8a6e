"""DhtService on loopback: real go-libp2p daemons and hivemind DHTNodes in this test's event loop.

alice is the entry node; bob and carol join through alice's address only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.net.dht import DhtService, process_alive
from intellect.protocol import records
from intellect.protocol.manifest import SignedManifest, load_manifest_toml

pytestmark = pytest.mark.swarm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def node_config(tmp: Path, name: str, bootstrap: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(data_dir=tmp / name, listen=LOOPBACK, bootstrap=bootstrap)


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[tuple[DhtService, DhtService, DhtService]]:
    started: list[DhtService] = []
    try:
        alice = DhtService(node_config(tmp_path, "alice"), Identity.generate())
        await asyncio.wait_for(alice.start(), 30)
        started.append(alice)
        for name in ("bob", "carol"):
            svc = DhtService(node_config(tmp_path, name, tuple(alice.visible_maddrs)), Identity.generate())
            await asyncio.wait_for(svc.start(), 30)
            started.append(svc)
        yield started[0], started[1], started[2]
    finally:
        for svc in reversed(started):
            await svc.stop()


async def test_peer_id_is_the_identity_and_shutdown_leaves_no_daemon(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, "solo")
    ident = Identity.load_or_create(cfg.identity_path)
    async with DhtService(cfg) as dht:
        assert dht.peer_id == ident.peer_id
        assert dht.p2p.peer_id.to_base58() == ident.peer_id
        assert dht.visible_maddrs
        assert all(
            a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith(f"/p2p/{ident.peer_id}")
            for a in dht.visible_maddrs
        )
        assert dht.ready.is_set()
        pid = dht.daemon_pid
        assert pid is not None and process_alive(pid)
    assert not process_alive(pid)


async def test_run_form_stops_on_cancel(tmp_path: Path) -> None:
    dht = DhtService(node_config(tmp_path, "svc"), Identity.generate())
    task = asyncio.create_task(dht.run())
    try:
        await asyncio.wait_for(dht.ready.wait(), 30)
        pid = dht.daemon_pid
        assert pid is not None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not process_alive(pid)


async def test_manifest_seeded_via_one_node_is_listed_via_another(trio: tuple[DhtService, ...]) -> None:
    alice, bob, carol = trio
    signed = SignedManifest.sign(load_manifest_toml(EXAMPLE), Identity.generate())
    assert await bob.publish_manifest(signed)
    runs, invalid = await asyncio.wait_for(carol.get_manifests(latest=True), 15)
    assert invalid == 0
    assert [r.run_id for r in runs] == [signed.run_id]
    assert runs[0].verify() and runs[0].researcher == signed.researcher
    assert await asyncio.wait_for(alice.get_manifest(signed.run_id), 15) == signed


async def test_membership_found_through_bootstrap_only(trio: tuple[DhtService, ...], tmp_path: Path) -> None:
    alice, bob, carol = trio
    run_id = load_manifest_toml(EXAMPLE).run_id
    now = time.time()
    for svc in (bob, carol):
        assert svc.identity is not None
        rec = records.MembershipRecord(
            run_id, svc.peer_id, tuple(svc.visible_maddrs), "", 3, 100.0, "trainer", "", now, now + 60
        )
        assert await svc.store_membership(records.seal_membership(svc.identity, rec))
    # dave knows nothing but alice's address and still finds every member.
    dave = DhtService(node_config(tmp_path, "dave", tuple(alice.visible_maddrs)), Identity.generate())
    await asyncio.wait_for(dave.start(), 30)
    try:
        members = await asyncio.wait_for(dave.get_members(run_id), 15)
        assert {m.peer_id for m in members} == {bob.peer_id, carol.peer_id}
        assert all(m.round == 3 and m.maddrs for m in members)
    finally:
        await dave.stop()


async def test_members_keep_a_published_manifest_alive(trio: tuple[DhtService, ...]) -> None:
    _alice, bob, carol = trio
    assert bob.identity is not None
    signed = SignedManifest.sign(load_manifest_toml(EXAMPLE), Identity.generate())
    assert await bob.publish_manifest(signed, ttl=3.0)
    await asyncio.sleep(1.2)  # past a third of the manifest's TTL
    now = time.time()
    rec = records.MembershipRecord(signed.run_id, bob.peer_id, (), "", 0, 0.0, "trainer", "", now, now + 60)
    assert await bob.store_membership(records.seal_membership(bob.identity, rec))
    await asyncio.sleep(2.5)  # the first publication has expired by now
    runs, _ = await carol.get_manifests()
    assert [r.run_id for r in runs] == [signed.run_id]
