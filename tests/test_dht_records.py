"""The record validator on a real loopback DHT: forged records are refused by every honest node.

mallory talks hivemind's DHT protocol directly (`call_store`/`call_find`), bypassing our signing, so each
honest node's validator is what stands between a forgery and its storage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer
from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.net.dht import DhtService
from intellect.node.net.membership import MembershipService
from intellect.protocol import keys, records
from intellect.protocol.codec import decode, encode
from intellect.protocol.manifest import SignedManifest, SignedManifestMsg, load_manifest_toml, parse_manifest

pytestmark = pytest.mark.swarm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@pytest.fixture(name="swarm")
async def dht_swarm(tmp_path: Path) -> AsyncIterator[list[DhtService]]:
    """alice (entry), bob, carol: honest; mallory: the attacker (also a DhtService, to get a DHT client)."""
    nodes: list[DhtService] = []
    try:
        for i, name in enumerate(("alice", "bob", "carol", "mallory")):
            boot = tuple(nodes[0].visible_maddrs) if i else ()
            svc = DhtService(
                NodeConfig(data_dir=tmp_path / name, listen=LOOPBACK, bootstrap=boot), Identity.generate()
            )
            await asyncio.wait_for(svc.start(), 30)
            nodes.append(svc)
        yield nodes
    finally:
        for svc in reversed(nodes):
            await svc.stop()


async def raw_store(
    attacker: DhtService, target: DhtService, key: str, subkey: str, value: bytes, exp: float
) -> bool:
    """Ask `target` directly to store a value we did not sign through our validator."""
    result = await attacker.node.protocol.call_store(
        target.p2p.peer_id,
        keys=[DHTID.generate(source=key)],
        values=[MSGPackSerializer.dumps(value)],
        expiration_time=[exp],
        subkeys=[subkey],
    )
    assert result is not None, "target did not answer"
    return bool(result[0])


async def test_forged_manifests_are_refused_by_every_honest_node(swarm: list[DhtService]) -> None:
    *honest, mallory = swarm
    researcher = Identity.generate()
    manifest = load_manifest_toml(EXAMPLE)
    good = SignedManifest.sign(manifest, researcher)
    exp = time.time() + 600
    other = parse_manifest({**manifest.to_plain(), "token_budget": 1})
    wire = decode(good.to_bytes(), expected=SignedManifestMsg)
    flipped = bytearray(wire.manifest)
    flipped[len(flipped) // 2] ^= 0x01
    forgeries = {
        "unsigned bytes": (good.run_id, b"just some bytes"),
        "altered manifest, old signature": (
            other.run_id,
            encode(SignedManifestMsg(other.canonical_bytes(), good.researcher, good.sig)),
        ),
        "flipped byte": (good.run_id, encode(SignedManifestMsg(bytes(flipped), good.researcher, good.sig))),
        "altered signature": (
            good.run_id,
            encode(
                SignedManifestMsg(wire.manifest, good.researcher, bytes([good.sig[0] ^ 1]) + good.sig[1:])
            ),
        ),
        "claimed by another researcher": (
            good.run_id,
            encode(SignedManifestMsg(wire.manifest, Identity.generate().peer_id, good.sig)),
        ),
        "filed under another run_id": (other.run_id, good.to_bytes()),
    }
    for node in honest:
        for what, (subkey, value) in forgeries.items():
            assert not await raw_store(mallory, node, keys.RUNS_KEY, subkey, value, exp), (
                f"{what} accepted"
            )
        # far-future expiry: a manifest may not be pinned for longer than the maximum TTL
        far = time.time() + records.MAX_MANIFEST_TTL_S * 2
        assert not await raw_store(mallory, node, keys.RUNS_KEY, good.run_id, good.to_bytes(), far)
        assert node.validator.stats.rejected.get("manifest", 0) >= len(forgeries) + 1
        # control: the genuine record passes the same path
        assert await raw_store(mallory, node, keys.RUNS_KEY, good.run_id, good.to_bytes(), exp)
    runs, invalid = await swarm[1].get_manifests()
    assert [r.run_id for r in runs] == [good.run_id] and invalid == 0


async def test_forged_membership_is_refused_by_every_honest_node(swarm: list[DhtService]) -> None:
    alice, bob, carol, mallory = swarm
    assert bob.identity is not None and carol.identity is not None
    run_id = load_manifest_toml(EXAMPLE).run_id
    key = keys.members_key(run_id)
    now = time.time()
    rec = records.MembershipRecord(
        run_id, bob.peer_id, tuple(bob.visible_maddrs), "", 1, 5.0, "trainer", "", now, now + 60
    )
    good = records.seal_membership(bob.identity, rec)
    body = encode(dataclasses.replace(rec, round=1000))
    sig = decode(good, expected=records.SignedMembership).sig
    stale = dataclasses.replace(rec, issued_at=now - 200, expires_at=now - 140)
    replayed = records.seal_membership(bob.identity, stale)
    for node in (alice, bob, carol):
        node.validator.watch_run(run_id)
        cases = [
            ("unsigned bytes", bob.peer_id, b"junk", now + 60),
            ("tampered round", bob.peer_id, encode(records.SignedMembership(body, sig)), now + 60),
            ("wrong subkey (bob's record filed as carol)", carol.peer_id, good, now + 60),
            ("DHT expiry longer than signed", bob.peer_id, good, now + 300),
            ("replayed after expiry", bob.peer_id, replayed, now + 60),
        ]
        for what, subkey, value, exp in cases:
            assert not await raw_store(mallory, node, key, subkey, value, exp), (
                f"{what} accepted by {node.peer_id}"
            )
        assert await raw_store(mallory, node, key, bob.peer_id, good, rec.expires_at)


async def test_reader_drops_a_forged_record_served_by_a_malicious_node(swarm: list[DhtService]) -> None:
    alice, bob, carol, mallory = swarm
    good = SignedManifest.sign(load_manifest_toml(EXAMPLE), Identity.generate())
    forged = SignedManifest(good.manifest, good.researcher, bytes(64))
    key_id = DHTID.generate(source=keys.RUNS_KEY)
    # mallory's own storage bypasses validation: she serves a forged record to whoever asks.
    mallory.node.protocol.storage.store_subkey(
        key_id, good.run_id, MSGPackSerializer.dumps(forged.to_bytes()), time.time() + 600
    )
    for reader in (alice, bob, carol):
        before = reader.validator.stats.rejected.get("manifest", 0)
        found = await reader.node.protocol.call_find(mallory.p2p.peer_id, [key_id])
        assert found is not None
        value, _nearest = found[key_id]
        assert value is None  # the validator threw the forged dictionary away
        assert reader.validator.stats.rejected.get("manifest", 0) > before


async def test_membership_disappears_after_expiry_once_its_node_stops(swarm: list[DhtService]) -> None:
    alice, bob, carol, _mallory = swarm
    assert bob.identity is not None
    signed = SignedManifest.sign(load_manifest_toml(EXAMPLE), Identity.generate())
    service = MembershipService(bob, bob.identity, signed, ttl=3.0, period=1.0)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.ready.wait(), 15)
        service.update(round=4)
        await service.refresh()
        members = await carol.get_members(signed.run_id)
        assert [(m.peer_id, m.round) for m in members] == [(bob.peer_id, 4)]
        # the manifest was re-stored by the member, so the run is listed without its researcher
        assert [r.run_id for r in (await alice.get_manifests())[0]] == [signed.run_id]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await bob.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not await carol.get_members(signed.run_id) and not await alice.get_members(signed.run_id):
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("bob's membership record outlived its expiry")
