"""Contribution receipts on the network, and control records in the DHT: forgeries are refused on store
and on gossip, valid receipts travel through a real DHT and real gossip links, `contributions --bootstrap`
sums what the DHT holds, and `/metrics` shows each peer's credit.

alice, bob and carol are honest; mallory talks hivemind's DHT protocol and our gossip streams directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity
from intellect.node.app.metrics import ContributionsCollector
from intellect.node.net.dht import DhtService
from intellect.node.net.gossip import GOSSIP_PROTOCOL, GossipConfig, GossipService
from intellect.node.net.receiptnet import (
    ReceiptBook,
    ReceiptLedger,
    publish_receipt,
    read_receipts,
    receipt_check,
)
from intellect.node.net.receiptstore import load_receipts
from intellect.protocol import keys
from intellect.protocol.codec import encode
from intellect.protocol.control import sign_control
from intellect.protocol.envelope import seal
from intellect.protocol.gossip_messages import GossipFrame, frame
from intellect.protocol.manifest import SignedManifest, load_manifest_toml
from intellect.protocol.receipts import RECEIPT_TTL_S, Receipt, ReceiptRefusal, check_receipt
from multiaddr import Multiaddr
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_dht_records import (
    dht_swarm,  # noqa: F401  (the 4-node DHT fixture `swarm`)
    raw_store,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
MANIFEST = load_manifest_toml(EXAMPLE)
RESEARCHER = Identity.generate()
SIGNED = SignedManifest.sign(MANIFEST, RESEARCHER)
RUN = SIGNED.run_id
MAX_TOKENS = float(MANIFEST.max_tokens_per_round())


def receipt(signers: Sequence[Identity], round_: int, weights: Sequence[float], run: str = RUN) -> Receipt:
    """A complete receipt of a group of `signers` (`weights` in the same order), every member's signature
    in member order."""
    by_id = {i.peer_id: i for i in signers}
    weight = {i.peer_id: float(w) for i, w in zip(signers, weights, strict=True)}
    members = tuple(sorted(by_id))
    ws = tuple(weight[p] for p in members)
    body = Receipt(run, round_, bytes([round_ % 256]) * 32, members, ws, b"\x07" * 32)
    return dataclasses.replace(body, sigs=tuple(body.sign(by_id[p]) for p in members))


# ---- pure parts ------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_gossip_check_refuses_what_credits_nobody() -> None:
    alice, bob, mallory = (Identity.generate() for _ in range(3))
    check = receipt_check(RUN, MAX_TOKENS)
    good = receipt([alice, bob], 3, [100, 200])
    assert check(good) is None
    forged = dataclasses.replace(good, weights=(100.0, MAX_TOKENS))
    assert check(forged) == ReceiptRefusal.BAD_SIGNATURE.value
    assert check(receipt([alice, bob], 3, [100, MAX_TOKENS + 1])) == ReceiptRefusal.INFLATED_WEIGHT.value
    assert check(dataclasses.replace(good, sigs=(good.sigs[0], b""))) == ReceiptRefusal.INCOMPLETE.value
    assert check(receipt([alice, mallory], 3, [1, 1], run="ab" * 32)) == ReceiptRefusal.WRONG_RUN.value
    assert check("not a receipt") == "not a receipt"


@pytest.mark.timeout(30)
def test_metrics_show_each_peers_credit_for_the_top_peers_only() -> None:
    ids = [Identity.generate() for _ in range(6)]
    ledger = ReceiptLedger()
    ledger.run_id = RUN
    r1 = receipt(ids[:2], 1, [100, 300])
    assert ledger.add(r1) and ledger.add(r1)  # the same receipt twice credits once
    ledger.add(receipt(ids[1:3], 2, [50, 70]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ContributionsCollector(ledger, top=2))
    text = generate_latest(registry).decode()
    samples = {
        (x.name, x.labels.get("peer", "")): x.value
        for family in text_string_to_metric_families(text)
        for x in family.samples
        if x.labels.get("run") == RUN[:16]
    }
    assert samples[("intellect_peer_contributed_tokens", ids[1].peer_id)] == 350.0
    assert samples[("intellect_peer_contributed_tokens", ids[0].peer_id)] == 100.0
    assert samples[("intellect_peer_contributed_rounds", ids[1].peer_id)] == 2.0
    assert samples[("intellect_contributing_peers", "")] == 3.0
    assert ids[2].peer_id not in text  # third by tokens: beyond the top 2


class _FakeNode:
    def __init__(self) -> None:
        self.stored: list[tuple[str, bytes, float, str]] = []

    async def store(self, key: str, value: bytes, exp: float, subkey: str) -> bool:
        self.stored.append((key, value, exp, subkey))
        return True


class _FakeGossip:
    def __init__(self) -> None:
        self.published: list[tuple[Any, Any]] = []

    async def publish(self, kind: Any, msg: Any) -> None:
        self.published.append((kind, msg))


@pytest.mark.timeout(30)
async def test_the_book_publishes_ours_and_keeps_what_it_receives(tmp_path: Path) -> None:
    alice, bob, carol = (Identity.generate() for _ in range(3))
    dht, gossip = type("D", (), {"node": _FakeNode()})(), _FakeGossip()
    book = ReceiptBook(dht, gossip, (RUN, MAX_TOKENS), tmp_path, ReceiptLedger())  # type: ignore[arg-type]
    ours, theirs = receipt([alice, bob], 1, [10, 20]), receipt([bob, carol], 2, [5, 6])
    task = asyncio.create_task(book.run())
    try:
        book.ours(ours)
        book.ours(dataclasses.replace(ours, sigs=(ours.sigs[0], b"")))  # incomplete: not published
        book.received(bob.peer_id, theirs)
        book.received(carol.peer_id, theirs)  # another member's copy: kept once
        async with asyncio.timeout(10):
            while len(load_receipts(tmp_path)[0]) < 1 or not gossip.published:
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [(k, s) for k, _, _, s in dht.node.stored] == [(keys.receipts_key(RUN, 1), ours.group_id.hex())]
    assert gossip.published == [(keys.TopicKind.RECEIPT, ours)]
    assert load_receipts(tmp_path)[0] == [theirs]
    assert load_receipts(tmp_path, newest=1)[0] == [theirs] and load_receipts(tmp_path, newest=0)[0] == []
    assert book.ledger.receipts == 2 and dict(book.ledger.top(9))[bob.peer_id].rounds == 2


# ---- a real DHT ------------------------------------------------------------------------------------------


@pytest.mark.swarm
@pytest.mark.timeout(180)
async def test_receipts_in_the_dht_forged_refused_valid_read_back_and_summed(
    swarm: list[DhtService], tmp_path: Path
) -> None:
    alice, bob, carol, mallory = swarm
    assert await alice.publish_manifest(SIGNED)
    for node in (alice, bob, carol):
        assert await node.get_manifest(RUN) is not None  # every honest node learns the run's limits
    p, q, m = (Identity.generate() for _ in range(3))
    good = receipt([p, q], 1, [100, 200])
    exp = time.time() + 600
    inflated = receipt([p, m], 1, [100, MAX_TOKENS + 1])
    key1, sub = keys.receipts_key(RUN, 1), good.group_id.hex()
    forgeries = {
        "unsigned junk that claims to be a receipt": (key1, sub, b"\x93\xcd\x01\x39junk", exp),
        "altered weight": (key1, sub, encode(dataclasses.replace(good, weights=(100.0, 900.0))), exp),
        "a signature missing": (key1, sub, encode(dataclasses.replace(good, sigs=(good.sigs[0], b""))), exp),
        "over the run's tokens per round": (key1, inflated.group_id.hex(), encode(inflated), exp),
        "filed under another group": (key1, "00" * 32, encode(good), exp),
        "filed under another round": (keys.receipts_key(RUN, 2), sub, encode(good), exp),
        "kept past the receipt TTL": (key1, sub, encode(good), time.time() + 2 * RECEIPT_TTL_S),
    }
    for node in (alice, bob, carol):
        for what, (key, subkey, value, e) in forgeries.items():
            assert not await raw_store(mallory, node, key, subkey, value, e), f"{what} accepted"
        assert node.validator.stats.rejected.get("receipt", 0) >= len(forgeries)
        assert await raw_store(mallory, node, key1, sub, encode(good), exp)  # the genuine one passes
    second = receipt([q, m], 2, [300, 50])
    assert await publish_receipt(bob, second)
    assert await read_receipts(carol, RUN, 1) == [good]
    assert await read_receipts(alice, RUN, 2) == [second]

    # `contributions --bootstrap`, from a data dir that holds nothing of the run: all of it from the DHT.
    from intellect.node.cli.contributions import contributions_cmd

    args = [RUN, "--json", "--bootstrap", alice.visible_maddrs[0], "--data-dir", str(tmp_path / "reader")]
    result = await asyncio.to_thread(CliRunner().invoke, contributions_cmd, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["receipts"] == 2 and out["from_dht"] == 2 and out["refused"] == {}
    assert out["peers"] == {
        p.peer_id: {"tokens": 100.0, "rounds": 1},
        q.peer_id: {"tokens": 500.0, "rounds": 2},
        m.peer_id: {"tokens": 50.0, "rounds": 1},
    }


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_forged_control_records_are_refused_on_store(swarm: list[DhtService]) -> None:
    alice, bob, carol, mallory = swarm
    researcher, impostor = RESEARCHER, Identity.generate()
    assert await alice.publish_manifest(SIGNED)
    for node in (alice, bob, carol):
        assert await node.get_manifest(RUN) is not None
    key = keys.control_key(RUN)
    good = sign_control(researcher, RUN, "pause")
    ctl = sign_control(researcher, RUN, "pause", seq=7)
    tampered = ctl.replace(b"pause", b"resum", 1)  # same length, old signature
    exp = time.time() + 600
    by_impostor = sign_control(impostor, RUN, "end", end_round=3)
    other_run = sign_control(researcher, "cd" * 32, "pause")
    forgeries = {
        "signed by someone else than the run's researcher": (impostor.peer_id, by_impostor),
        "tampered after signing": (researcher.peer_id, tampered),
        "filed under another signer": (impostor.peer_id, good),
        "another run's record under this run's key": (researcher.peer_id, other_run),
        "junk under the control key": (researcher.peer_id, b"junk"),
    }
    for node in (alice, bob, carol):
        for what, (subkey, value) in forgeries.items():
            assert not await raw_store(mallory, node, key, subkey, value, exp), f"{what} accepted"
        far = time.time() + 60 * 86_400
        assert not await raw_store(mallory, node, key, researcher.peer_id, good, far)  # past its expiry
        assert node.validator.stats.rejected.get("control", 0) >= len(forgeries) + 1
        assert await raw_store(mallory, node, key, researcher.peer_id, good, exp)


# ---- real gossip links -----------------------------------------------------------------------------------

CONFIG = GossipConfig(upkeep_s=0.2, redial_s=0.2)


@contextlib.asynccontextmanager
async def _gossip(tmp: Path, ident: Identity) -> AsyncIterator[tuple[P2P, GossipService]]:
    key = tmp / f"{ident.peer_id}.key"
    ident.save(key)
    p2p = await P2P.create(host_maddrs=list(LOOPBACK), identity_path=str(key), check_if_identity_free=False)
    checks = {keys.TopicKind.RECEIPT: receipt_check(RUN, MAX_TOKENS)}

    async def connect(peer: str, maddrs: Sequence[str]) -> bool:
        await p2p._client.connect(PeerID.from_base58(peer), [Multiaddr(m) for m in maddrs])
        return True

    try:
        async with GossipService(
            p2p, ident, RUN, lambda _: True, connect=connect, config=CONFIG, checks=checks
        ) as g:
            yield p2p, g
    finally:
        await p2p.shutdown()


async def _entry(p2p: P2P, ident: Identity) -> tuple[str, tuple[str, ...]]:
    return ident.peer_id, tuple(str(m) for m in await p2p.get_visible_maddrs())


@pytest.mark.swarm
@pytest.mark.timeout(120)
async def test_a_forged_receipt_is_dropped_and_penalised_a_valid_one_crosses(tmp_path: Path) -> None:
    alice, bob, carol, mallory = (Identity.generate() for _ in range(4))
    async with (
        _gossip(tmp_path, alice) as (_pa, ga),
        _gossip(tmp_path, bob) as (pb, gb),
        _gossip(tmp_path, carol) as (_pc, gc),
        _gossip(tmp_path, mallory) as (pm, _gm),
    ):
        ga.add_peers([await _entry(pb, bob)])
        gc.add_peers([await _entry(pb, bob)])
        sub_c = gc.subscribe(keys.TopicKind.RECEIPT)
        await gb.wait_peers(2, 30)
        good = receipt([alice, mallory], 4, [10, 20])
        forged = dataclasses.replace(good, weights=(10.0, MAX_TOKENS))
        peer = PeerID.from_base58(bob.peer_id)
        await pm._client.connect(peer, [Multiaddr(a) for a in (await _entry(pb, bob))[1]])
        _info, _r, w = await pm.call_binary_stream_handler(peer, f"{GOSSIP_PROTOCOL}/{RUN}")
        for i, msg in enumerate((forged, good)):
            w.write(frame(encode(GossipFrame("receipt", seal(mallory, RUN, msg, seq=100 + i)))))
        await w.drain()
        got = await asyncio.wait_for(sub_c.get(), 20)
        assert got.message == good and check_receipt(got.message, RUN, MAX_TOKENS) is None
        await asyncio.sleep(1.0)  # room for anything bob wrongly forwarded
        assert sub_c._queue.empty()
        assert gb.rejections["invalid_payload"] == 1
        assert gb.scores[mallory.peer_id] < 0
        assert sum(gc.rejections.values()) == 0 and sum(ga.rejections.values()) == 0
        w.close()
