"""Pure parts of state sync: target choice from announcements, announcement signatures, evidence checks."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.crypto.identity import Identity
from intellect.node.engine import statehash
from intellect.protocol.codec import decode, encode
from intellect.protocol.merkle import merkle_root
from intellect.protocol.sync_messages import (
    BadChunkEvidence,
    ChunkList,
    StateAnnounce,
    check_evidence,
    sign_announcement,
    sign_chunk,
)
from intellect.protocol.vouching import Vouch, checkpoint_announce, pick_target

RUN = "ab" * 32
IDS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 8)]
H1, H2, H3 = ("1" * 64), ("2" * 64), ("3" * 64)


def ann(
    i: int, round_: int, h: str, run: str = RUN, chunk: int = 1 << 20, total: int = 5000
) -> StateAnnounce:
    return sign_announcement(IDS[i], run, round_, h, chunk, total)


def test_most_distinct_peers_win_over_higher_round() -> None:
    anns = [ann(0, 5, H1), ann(1, 5, H1), ann(2, 6, H2)]
    target = pick_target(anns, RUN)
    assert target is not None
    assert (target.round, target.state_hash) == (5, H1)
    assert target.peers == tuple(sorted([IDS[0].peer_id, IDS[1].peer_id]))


def test_tie_goes_to_the_higher_round() -> None:
    anns = [ann(0, 5, H1), ann(1, 6, H2)]
    target = pick_target(anns, RUN)
    assert target is not None and (target.round, target.state_hash) == (6, H2)
    # Same inputs in any order: same choice (every node must agree).
    assert pick_target(list(reversed(anns)), RUN) == target


def test_a_peer_votes_once_for_its_latest_round() -> None:
    # Peer 0 repeats itself and also moved on to round 6: it counts once, for round 6.
    anns = [ann(0, 5, H1), ann(0, 5, H1), ann(0, 6, H3), ann(1, 5, H1), ann(2, 6, H3)]
    target = pick_target(anns, RUN)
    assert target is not None and (target.round, target.state_hash) == (6, H3)
    assert len(target.peers) == 2


def test_forged_other_run_and_malformed_announcements_do_not_count() -> None:
    good = ann(0, 5, H1)
    forged = [
        dataclasses.replace(ann(1, 9, H2), peer_id=IDS[3].peer_id),  # signed by 1, claims to be 3
        dataclasses.replace(ann(2, 9, H2), round=10),  # field changed after signing
        dataclasses.replace(ann(4, 9, H2), sig=b""),
        ann(5, 9, H2, run="cd" * 32),  # another run
    ]
    target = pick_target([good, *forged], RUN)
    assert target is not None and (target.state_hash, target.peers) == (H1, (IDS[0].peer_id,))
    assert pick_target(forged, RUN) is None
    assert pick_target([], RUN) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("state_hash", "xyz"), ("chunk_size", 0), ("chunk_size", 1 << 30), ("total_bytes", 0), ("round", -1)],
)
def test_out_of_range_announcements_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        sign_announcement(IDS[0], RUN, **{"round": 1, "state_hash": H1, "chunk_size": 1024, "total_bytes": 9,
                                          field: value})


@settings(max_examples=50, deadline=None)
@given(
    votes=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 3), st.sampled_from([H1, H2, H3])),
        min_size=1,
        max_size=20,
    )
)
def test_pick_target_is_the_plurality_of_latest_votes(votes: list[tuple[int, int, str]]) -> None:
    anns = [ann(i, r, h) for i, r, h in votes]
    latest: dict[int, tuple[int, str]] = {}
    for i, r, h in votes:
        if i not in latest or r > latest[i][0]:
            latest[i] = (r, h)
    counts: dict[tuple[int, str], int] = {}
    for key in latest.values():
        counts[key] = counts.get(key, 0) + 1
    best = max(counts, key=lambda k: (counts[k], k[0], k[1]))
    target = pick_target(anns, RUN)
    assert target is not None
    assert (target.round, target.state_hash) == best
    assert len(target.peers) == counts[best]


def test_messages_round_trip_and_signature_survives() -> None:
    a = ann(0, 3, H1)
    back = decode(encode(a), StateAnnounce)
    assert back == a and back.verify()
    lst = ChunkList(H1, 3, 1024, 2048, (b"\x01" * 32, b"\x02" * 32))
    assert decode(encode(lst), ChunkList) == lst


def test_evidence_checks_only_a_signed_wrong_digest() -> None:
    blob = bytes(range(256)) * 40
    hashes = tuple(statehash.chunk_hashes(blob, 1024))
    root = merkle_root(hashes)
    bad_data = b"\x00" * 1024
    response = sign_chunk(IDS[0], RUN, root.hex(), 2, bad_data)
    evidence = BadChunkEvidence(
        RUN, IDS[0].peer_id, root.hex(), 2, hashlib.sha256(bad_data).digest(), response.sig
    )
    assert check_evidence(evidence, hashes, root)
    assert decode(encode(evidence), BadChunkEvidence) == evidence
    # Framing someone else: the signature is not theirs.
    assert not check_evidence(dataclasses.replace(evidence, server=IDS[1].peer_id), hashes, root)
    # A digest that is in fact correct is no evidence, nor is a list that is not the state's.
    good = sign_chunk(IDS[0], RUN, root.hex(), 2, blob[2048:3072])
    honest = dataclasses.replace(evidence, digest=hashes[2], sig=good.sig)
    assert not check_evidence(honest, hashes, root)
    assert not check_evidence(evidence, hashes[:-1], merkle_root(hashes[:-1]))


def test_vouches_from_gossip_and_membership_count_with_announcements() -> None:
    import time

    from intellect.protocol.records import MembershipRecord

    signed = ann(0, 7, H1, chunk=4096, total=9000)
    gossip = Vouch.from_checkpoint(IDS[1].peer_id, checkpoint_announce(signed))
    now = time.time()
    rec = MembershipRecord(RUN, IDS[2].peer_id, (), "", 7, 1.0, "trainer", H1, now, now + 60)
    member = Vouch.from_membership(rec)
    assert gossip is not None and member is not None
    assert (member.chunk_size, member.total_bytes) == (0, 0)  # the DHT record gives no sizes
    target = pick_target([signed, gossip, member, ann(3, 8, H2), ann(4, 8, H2)], RUN)
    assert target is not None
    assert (target.round, target.state_hash, target.chunk_size, target.total_bytes) == (7, H1, 4096, 9000)
    assert len(target.peers) == 3
    # A record without a state hash, or a gossip payload with a malformed one, vouches for nothing.
    assert Vouch.from_membership(dataclasses.replace(rec, state_hash="")) is None
    bad = dataclasses.replace(checkpoint_announce(signed), state_hash="zz")
    assert Vouch.from_checkpoint(IDS[1].peer_id, bad) is None


def test_disagreeing_size_hints_are_dropped_not_voted() -> None:
    """Two vouchers back the same state; one lies about the chunk size. Neither hint wins (a majority rule
    would let a lone liar outvote a lone honest peer on a tie); the chunk list is then checked against the
    state hash alone."""
    honest = Vouch(IDS[1].peer_id, 7, H1, 4096, 9000)
    liar = Vouch(IDS[2].peer_id, 7, H1, 1 << 20, 9000)
    target = pick_target([honest, liar], RUN)
    assert target is not None and (target.round, target.state_hash) == (7, H1)
    assert (target.chunk_size, target.total_bytes) == (0, 0)
    agreed = pick_target([honest, Vouch(IDS[3].peer_id, 7, H1, 4096, 9000)], RUN)
    assert agreed is not None and (agreed.chunk_size, agreed.total_bytes) == (4096, 9000)
