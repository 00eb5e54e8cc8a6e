"""Contribution receipts: forgeries are refused, and a real all-reduce yields one complete receipt on every
member whose tally matches the tokens each member passed in.

Forgery tests build a receipt signed by alice, bob and carol and try, as mallory or as a member, to get
credit without the group's signatures. The socket tests run real averagers over TCP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from intellect.crypto import domains
from intellect.crypto.identity import Identity
from intellect.node.app.body import load_run_manifest
from intellect.node.cli.main import cli
from intellect.node.net import receipting
from intellect.node.net.allreduce import DataPlane, butterfly_allreduce, get_payload_codec
from intellect.node.net.receiptstore import store_receipt
from intellect.node.run.service import data_root, keep_manifest
from intellect.protocol.codec import decode, encode
from intellect.protocol.groups import GroupMember, GroupSpec
from intellect.protocol.manifest import SignedManifest
from intellect.protocol.receipts import (
    MAX_RECEIPT_BYTES,
    Receipt,
    ReceiptRefusal,
    ReceiptSig,
    check_receipt,
    result_hash,
    tally,
)

torch.set_num_threads(1)

MAX_TOKENS = 4096.0


def _ids(n: int) -> list[Identity]:
    return sorted((Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)), key=lambda i: i.peer_id)


def _signed(ids: list[Identity], weights: tuple[float, ...], run: str = "run", rnd: int = 3) -> Receipt:
    body = Receipt(
        run, rnd, bytes(32), tuple(i.peer_id for i in ids), weights, result_hash(bytes(32), [b"x" * 16])
    )
    return body.with_sigs({i.peer_id: body.sign(i) for i in ids})


def _resigned(r: Receipt, signers: list[Identity]) -> Receipt:
    """`r`'s body signed by `signers` only (what a forger can get)."""
    return replace(
        r, sigs=tuple(next((r.sign(i) for i in signers if i.peer_id == p), b"") for p in r.members)
    )


@pytest.mark.timeout(30)
def test_a_complete_receipt_credits_every_member_once() -> None:
    ids = _ids(3)
    r = _signed(ids, (100.0, 200.0, 300.0))
    assert r.complete and check_receipt(r, "run", MAX_TOKENS) is None
    assert decode(encode(r), Receipt) == r
    t = tally([r, r], "run", MAX_TOKENS)  # the same receipt twice credits once
    assert {p: (c.tokens, c.rounds) for p, c in t.credits.items()} == {
        ids[0].peer_id: (100.0, 1),
        ids[1].peer_id: (200.0, 1),
        ids[2].peer_id: (300.0, 1),
    }


@pytest.mark.timeout(30)
def test_a_missing_signature_credits_nobody() -> None:
    ids = _ids(3)
    r = _signed(ids, (1.0, 2.0, 3.0))
    withheld = replace(r, sigs=(r.sigs[0], b"", r.sigs[2]))
    assert check_receipt(withheld, "run", MAX_TOKENS) is ReceiptRefusal.INCOMPLETE
    assert tally([withheld], "run", MAX_TOKENS).credits == {}
    short = replace(r, sigs=r.sigs[:2])
    assert check_receipt(short, "run", MAX_TOKENS) is ReceiptRefusal.INCOMPLETE


@pytest.mark.timeout(30)
def test_a_signature_of_another_body_is_refused() -> None:
    ids = _ids(3)
    r = _signed(ids, (1.0, 2.0, 3.0))
    other = _signed(ids, (1.0, 2.0, 3.5))
    mixed = replace(r, sigs=(r.sigs[0], other.sigs[1], r.sigs[2]))
    assert check_receipt(mixed, "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    # Another purpose's signature over the same bytes does not count either (domain separation).
    wrong_domain = ids[1].sign(domains.ALLREDUCE, r.body())
    assert check_receipt(replace(r, sigs=(r.sigs[0], wrong_domain, r.sigs[2])), "run", MAX_TOKENS) is (
        ReceiptRefusal.BAD_SIGNATURE
    )
    assert r.with_sigs({ids[1].peer_id: wrong_domain}).sigs == (b"", b"", b"")


@pytest.mark.timeout(30)
def test_mallory_cannot_add_herself_to_a_group() -> None:
    ids = _ids(4)
    group, mallory = ids[:3], ids[3]
    r = _signed(group, (1.0, 2.0, 3.0))
    members = tuple(sorted((*r.members, mallory.peer_id)))
    k = members.index(mallory.peer_id)
    weights = (*r.weights[:k], MAX_TOKENS, *r.weights[k:])
    sigs = (*r.sigs[:k], b"", *r.sigs[k:])
    added = replace(r, members=members, weights=weights, sigs=sigs)
    added = replace(
        added,
        sigs=tuple(
            added.sign(mallory) if p == mallory.peer_id else s for p, s in zip(members, sigs, strict=True)
        ),
    )
    assert check_receipt(added, "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    assert mallory.peer_id not in tally([added], "run", MAX_TOKENS).credits


@pytest.mark.timeout(30)
def test_a_member_cannot_drop_another_or_sign_alone() -> None:
    ids = _ids(3)
    r = _signed(ids, (1.0, 2.0, 3.0))
    dropped = replace(r, members=r.members[:2], weights=r.weights[:2], sigs=r.sigs[:2])
    assert check_receipt(dropped, "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    # Two members re-sign a body without the third: valid only if both signed it, and it credits them only.
    pair = _signed(ids[:2], (1.0, 2.0))
    alone = _resigned(pair, ids[:1])
    assert check_receipt(alone, "run", MAX_TOKENS) is ReceiptRefusal.INCOMPLETE
    solo = _signed(ids[:1], (1.0,))
    assert check_receipt(solo, "run", MAX_TOKENS) is ReceiptRefusal.MALFORMED  # a group of one credits nobody


@pytest.mark.timeout(30)
def test_an_inflated_weight_is_refused() -> None:
    ids = _ids(3)
    r = _signed(ids, (1.0, 2.0, 3.0))
    inflated = replace(r, weights=(1.0, 2000.0, 3.0))
    assert check_receipt(inflated, "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    # Even every member signing a weight over the run's maximum credits nobody.
    over = _signed(ids, (1.0, MAX_TOKENS + 1, 3.0))
    assert check_receipt(over, "run", MAX_TOKENS) is ReceiptRefusal.INFLATED_WEIGHT
    for bad in (-1.0, math.inf, math.nan):
        assert (
            check_receipt(replace(r, weights=(1.0, bad, 3.0)), "run", MAX_TOKENS) is ReceiptRefusal.BAD_WEIGHT
        )


@pytest.mark.timeout(30)
def test_a_receipt_replayed_under_another_round_or_run_is_refused() -> None:
    ids = _ids(3)
    r = _signed(ids, (1.0, 2.0, 3.0))
    assert check_receipt(replace(r, round=4), "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    assert check_receipt(replace(r, run_id="other"), "other", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    assert check_receipt(r, "other", MAX_TOKENS) is ReceiptRefusal.WRONG_RUN
    assert check_receipt(replace(r, group_id=b"\x01" * 32), "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    assert (
        check_receipt(replace(r, result_hash=b"\x01" * 32), "run", MAX_TOKENS) is ReceiptRefusal.BAD_SIGNATURE
    )


@pytest.mark.timeout(30)
def test_two_receipts_of_one_round_credit_a_peer_once() -> None:
    ids = _ids(3)
    a = _signed(ids, (1.0, 2.0, 3.0))
    b = _signed(ids[:2], (5.0, 1.0))
    credits = tally([a, b], "run", MAX_TOKENS).credits
    assert (credits[ids[0].peer_id].tokens, credits[ids[0].peer_id].rounds) == (5.0, 1)
    later = _signed(ids, (1.0, 2.0, 3.0), rnd=4)
    assert tally([a, later], "run", MAX_TOKENS).credits[ids[2].peer_id].rounds == 2


@pytest.mark.timeout(30)
def test_receipt_sizes_fit_their_limits() -> None:
    ids = _ids(2)
    r = _signed(ids, (1.0, 2.0))
    per_member = len(encode(_signed(_ids(3), (1.0, 2.0, 3.0)))) - len(encode(r))
    assert per_member <= 144
    assert len(encode(ReceiptSig(bytes(32), ids[0].peer_id, r.sigs[0]))) <= 512
    assert 1024 * per_member + len(encode(r)) <= MAX_RECEIPT_BYTES


# -- real sockets ------------------------------------------------------------------------------------------


async def _run(
    owners: tuple[bool, ...], ws: list[float], run_id: str = "run", rnd: int = 7, cap: float = MAX_TOKENS
) -> tuple[GroupSpec, list[Any]]:
    planes = [DataPlane(i) for i in _ids(len(owners))]
    for p in planes:
        await p.__aenter__()
    try:
        members = tuple(
            GroupMember(p.identity.peer_id, "127.0.0.1", p.port, own)
            for p, own in zip(planes, owners, strict=True)
        )
        spec = GroupSpec(run_id, rnd, 0, "s", members)
        codec = get_payload_codec("none")
        xs = [torch.randn(5_001) for _ in owners]
        outs = await asyncio.wait_for(
            asyncio.gather(
                *(
                    butterfly_allreduce(p, spec, x, w, codec, max_weight=cap)
                    for p, x, w in zip(planes, xs, ws, strict=True)
                )
            ),
            30,
        )
        return spec, outs
    finally:
        for p in planes:
            await p.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owners", [(True, True, True), (True, False, True, False)])
async def test_a_completed_allreduce_yields_one_complete_receipt_on_every_member(
    owners: tuple[bool, ...],
) -> None:
    ws = [100.0 * (i + 1) for i in range(len(owners))]
    spec, outs = await _run(owners, ws)
    receipts = [o.receipt for o in outs]
    assert all(r is not None and r.complete for r in receipts)
    assert all(r == receipts[0] for r in receipts)
    r = receipts[0]
    assert (r.run_id, r.round, r.group_id, r.members) == ("run", 7, spec.group_id, spec.peer_ids)
    assert check_receipt(r, "run", MAX_TOKENS) is None
    credits = tally(receipts, "run", MAX_TOKENS).credits
    assert {p: c.tokens for p, c in credits.items()} == {p: w for p, w in zip(spec.peer_ids, ws, strict=True)}
    assert all(c.rounds == 1 for c in credits.values())


@pytest.mark.timeout(60)
async def test_a_member_that_refuses_to_sign_leaves_the_receipt_incomplete_not_the_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = _ids(3)[1].peer_id
    real_send = receipting._Exchange.send

    async def withholding(self: receipting._Exchange, peer: str, msg: object) -> None:
        if self.ag.me == bad:
            return  # sends no signature at all
        await real_send(self, peer, msg)

    monkeypatch.setattr(receipting._Exchange, "send", withholding)
    monkeypatch.setattr(receipting, "RECEIPT_TIMEOUT_S", 1.0)
    _, outs = await _run((True, True, True), [1.0, 2.0, 3.0])
    assert all(torch.equal(o.flat, outs[0].flat) for o in outs)  # the round completed
    honest = [outs[0], outs[2]]  # outs[1] is the withholder: members are in `_ids` order
    for o in honest:
        assert o.receipt is not None and not o.receipt.complete
        assert check_receipt(o.receipt, "run", MAX_TOKENS) is ReceiptRefusal.INCOMPLETE
    assert tally([o.receipt for o in honest], "run", MAX_TOKENS).credits == {}
    # The withholder received everyone's signatures: its receipt is complete, and credits all alike.
    assert outs[1].receipt is not None and check_receipt(outs[1].receipt, "run", MAX_TOKENS) is None


@pytest.mark.timeout(120)
async def test_contributions_sums_the_receipts_a_node_kept(tmp_path: Path) -> None:
    """Receipts of two real all-reduces kept by a member, plus a forged one: `contributions` credits each
    member the tokens it passed in, over two rounds, and counts the forgery as refused."""
    signed = SignedManifest.sign(load_run_manifest(), Identity.generate())
    keep_manifest(tmp_path, signed)
    cap = float(signed.manifest.max_tokens_per_round())
    ws = [cap / 4, cap / 2, cap]
    kept = data_root(tmp_path, signed.run_id) / "receipts"
    for rnd in (7, 8):
        _, outs = await _run((True, False, True), ws, run_id=signed.run_id, rnd=rnd, cap=cap)
        assert outs[0].receipt is not None
        store_receipt(kept, outs[0].receipt)
    forged = replace(outs[0].receipt, round=9, weights=(cap, cap, cap))
    store_receipt(kept, forged)
    args = ["contributions", signed.run_id[:12], "--data-dir", str(tmp_path)]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    peers = outs[0].receipt.members
    assert report["peers"] == {p: {"tokens": 2 * w, "rounds": 2} for p, w in zip(peers, ws, strict=True)}
    assert report["receipts"] == 3 and report["refused"] == {"bad-signature": 1}
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and peers[0] in table.output
