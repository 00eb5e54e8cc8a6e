"""Signed membership records, admission tickets and the hivemind value wrapping (pure, no network)."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from intellect.crypto.identity import Identity
from intellect.protocol import records
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError

RUN = "ab" * 32


def member(ident: Identity, now: float, ttl: float = 60.0, **kw: object) -> records.MembershipRecord:
    base = records.MembershipRecord(
        RUN,
        ident.peer_id,
        ("/ip4/127.0.0.1/tcp/1/p2p/" + ident.peer_id,),
        "",
        1,
        10.0,
        "trainer",
        "",
        now,
        now + ttl,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_membership_roundtrip() -> None:
    ident = Identity.generate()
    now = time.time()
    rec = member(ident, now, state_hash="cd" * 32, round=7)
    data = records.seal_membership(ident, rec)
    assert records.sniff(data) == "membership"
    assert records.open_membership(data, now=now) == rec


def test_membership_forgeries_are_refused() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    now = time.time()
    with pytest.raises(ValueError):
        records.seal_membership(alice, member(bob, now))  # cannot sign for someone else
    good = decode(records.seal_membership(alice, member(alice, now)), expected=records.SignedMembership)
    # bob's record with alice's signature
    bob_body = encode(member(bob, now))
    with pytest.raises(ProtocolError, match="signature"):
        records.open_membership(encode(records.SignedMembership(bob_body, good.sig)), now=now)
    # tampered body (round changed after signing)
    tampered = encode(dataclasses.replace(member(alice, now), round=99))
    with pytest.raises(ProtocolError, match="signature"):
        records.open_membership(encode(records.SignedMembership(tampered, good.sig)), now=now)
    # unsigned
    with pytest.raises(ProtocolError):
        records.open_membership(encode(records.SignedMembership(encode(member(alice, now)), b"")), now=now)
    with pytest.raises(ProtocolError):
        records.open_membership(b"not msgpack at all", now=now)


def test_expired_and_future_records_are_refused() -> None:
    ident = Identity.generate()
    now = time.time()
    old = records.seal_membership(ident, member(ident, now - 100, ttl=60))
    with pytest.raises(ProtocolError, match="expired"):
        records.open_membership(old, now=now)  # a replay after expiry
    future = records.seal_membership(ident, member(ident, now + 3600, ttl=60))
    with pytest.raises(ProtocolError, match="future"):
        records.open_membership(future, now=now)
    with pytest.raises(ValueError, match="within"):
        member(ident, now, ttl=records.MAX_MEMBER_TTL_S + 1)


def test_record_fields_are_bounded() -> None:
    ident = Identity.generate()
    now = time.time()
    for bad in (
        {"run_id": "x"},
        {"peer_id": "not-a-peer"},
        {"role": "king"},
        {"maddrs": ("/ip4/1.2.3.4/tcp/1",) * 17},
        {"state_hash": "zz"},
        {"round": -1},
    ):
        with pytest.raises(ValueError):
            member(ident, now, **bad)


def test_tickets() -> None:
    researcher, peer, other = Identity.generate(), Identity.generate(), Identity.generate()
    now = time.time()
    t = records.issue_ticket(researcher, RUN, peer.peer_id, now + 60)
    assert records.ticket_valid(t, researcher.peer_id, RUN, peer.peer_id, now=now)
    assert not records.ticket_valid(t, researcher.peer_id, RUN, other.peer_id, now=now)  # someone else's
    assert not records.ticket_valid(t, other.peer_id, RUN, peer.peer_id, now=now)  # not the researcher's
    assert not records.ticket_valid(t, researcher.peer_id, "cd" * 32, peer.peer_id, now=now)  # other run
    assert not records.ticket_valid(t, researcher.peer_id, RUN, peer.peer_id, now=now + 61)  # expired
    assert not records.ticket_valid(b"\x93\x67junk", researcher.peer_id, RUN, peer.peer_id, now=now)


def test_hivemind_wrapping() -> None:
    # hivemind msgpack-wraps stored values and subkeys; we undo it with our limited decoder.
    assert records.unwrap_dht_bytes(msgpack.packb(b"abc", use_bin_type=True)) == b"abc"
    assert records.unwrap_dht_bytes(msgpack.packb("abc")) is None
    assert records.unwrap_dht_str(msgpack.packb("12D3KooW")) == "12D3KooW"
    with pytest.raises(ProtocolError):
        records.unwrap_dht_str(msgpack.packb(5))
    with pytest.raises(ProtocolError):
        records.unwrap_dht_bytes(b"\xc6\xff\xff\xff\xff")  # a bin header claiming 4 GiB
    assert records.sniff(b"\x93\x64") == "manifest"
    assert records.sniff(b"hello") is None
