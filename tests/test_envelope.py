"""The signed envelope: each rejection reason produced on purpose, the replay guard's window and bounds."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.crypto import domains
from intellect.crypto.identity import Identity
from intellect.protocol import codec
from intellect.protocol.codec import Ping, packb_canonical
from intellect.protocol.envelope import (
    ENVELOPE_VERSION,
    EnvelopeVerifier,
    Opened,
    RejectReason,
    ReplayGuard,
    SequenceCounter,
    seal,
    signing_bytes,
)
from intellect.protocol.errors import ProtocolError, Rejected

RUN = "ab" * 32
NOW = 1_700_000_000.0
ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
MALLORY = Identity.from_seed(b"\x03" * 32)


def verifier(**kwargs) -> EnvelopeVerifier:
    admitted = {ALICE.peer_id, BOB.peer_id}
    return EnvelopeVerifier(RUN, admitted=admitted.__contains__, guard=ReplayGuard(skew_s=30.0), **kwargs)


def unsigned(**over) -> dict:
    fields = {
        "v": ENVELOPE_VERSION,
        "type": 2,
        "run": RUN,
        "sender": ALICE.peer_id,
        "seq": 1,
        "ts": NOW,
        "body": codec.encode(Ping(1, 2.0)),
    }
    fields.update(over)
    return fields


def signed(fields: dict, identity: Identity = ALICE, domain: bytes = domains.ENVELOPE) -> bytes:
    env = dict(fields)
    env["sig"] = identity.sign(domain, signing_bytes(fields))
    return packb_canonical(env)


def reason(v: EnvelopeVerifier, data: bytes, now: float = NOW) -> RejectReason:
    with pytest.raises(Rejected) as info:
        v.open(data, now=now)
    assert isinstance(info.value, ProtocolError)
    return info.value.reason


def test_seal_open_round_trip() -> None:
    v = verifier()
    data = seal(ALICE, RUN, Ping(42, 1.5), seq=7, ts=NOW)
    assert v.open(data, now=NOW + 1) == Opened(sender=ALICE.peer_id, seq=7, ts=NOW, message=Ping(42, 1.5))
    assert v.accepted == 1
    env = msgpack.unpackb(data, raw=False)
    assert list(env) == sorted(env)  # canonical: keys sorted
    assert set(env) == {"v", "type", "run", "sender", "seq", "ts", "body", "sig"}


def test_forged_signature() -> None:
    v = verifier()
    fields = unsigned()
    assert reason(v, signed(fields, identity=BOB)) is RejectReason.FORGED_SIGNATURE  # Bob signs as Alice
    good = msgpack.unpackb(signed(fields), raw=False)
    tampered = dict(good, body=codec.encode(Ping(2, 2.0)))  # body changed after signing
    assert reason(v, packb_canonical(tampered)) is RejectReason.FORGED_SIGNATURE
    flipped = dict(good, sig=bytes([good["sig"][0] ^ 1]) + good["sig"][1:])
    assert reason(v, packb_canonical(flipped)) is RejectReason.FORGED_SIGNATURE
    assert v.rejections[RejectReason.FORGED_SIGNATURE] == 3
    # Forgeries must not burn Alice's sequence number: her genuine envelope with seq 1 still opens.
    assert v.open(signed(fields), now=NOW).seq == 1


def test_wrong_domain_tag() -> None:
    v = verifier()
    data = signed(unsigned(), domain=domains.MEMBERSHIP)  # a valid signature, for another purpose
    assert reason(v, data) is RejectReason.FORGED_SIGNATURE


def test_replayed() -> None:
    v = verifier()
    data = seal(ALICE, RUN, Ping(1, 1.0), seq=100, ts=NOW)
    v.open(data, now=NOW)
    assert reason(v, data, now=NOW + 1) is RejectReason.REPLAYED
    # Same seq, different content, properly signed: still a replay of the sequence number.
    assert (
        reason(v, seal(ALICE, RUN, Ping(2, 1.0), seq=100, ts=NOW + 1), now=NOW + 1) is RejectReason.REPLAYED
    )
    # Out-of-order but unseen seqs inside the window are fine, and per sender.
    v.open(seal(ALICE, RUN, Ping(1, 1.0), seq=99, ts=NOW), now=NOW)
    v.open(seal(BOB, RUN, Ping(1, 1.0), seq=100, ts=NOW), now=NOW)


def test_stale_and_future() -> None:
    v = verifier()
    assert reason(v, seal(ALICE, RUN, Ping(1, 1.0), seq=1, ts=NOW - 31)) is RejectReason.STALE
    assert reason(v, seal(ALICE, RUN, Ping(1, 1.0), seq=2, ts=NOW + 31)) is RejectReason.FUTURE
    v.open(seal(ALICE, RUN, Ping(1, 1.0), seq=3, ts=NOW - 29), now=NOW)
    v.open(seal(ALICE, RUN, Ping(1, 1.0), seq=4, ts=NOW + 29), now=NOW)


def test_oversized_checked_before_parsing() -> None:
    v = verifier(max_size=300)
    data = seal(ALICE, RUN, codec.Hello("x" * 200, 1, RUN), seq=1, ts=NOW)
    assert len(data) > 300
    assert reason(v, data) is RejectReason.OVERSIZED
    assert reason(v, b"\xdd\xff\xff\xff\xff" + b"\x00" * 400) is RejectReason.OVERSIZED
    # The default limit follows the registry: the largest message type plus the envelope overhead.
    assert verifier().max_size >= codec.REGISTRY.max_size()


def test_wrong_run_not_admitted_bad_sender() -> None:
    v = verifier()
    assert reason(v, seal(ALICE, "cd" * 32, Ping(1, 1.0), seq=1, ts=NOW)) is RejectReason.WRONG_RUN
    assert reason(v, seal(MALLORY, RUN, Ping(1, 1.0), seq=1, ts=NOW)) is RejectReason.NOT_ADMITTED
    for bad in ("", "not-a-peer-id", "Qm" + "1" * 44, ALICE.peer_id[:-1], "12D3KooW" + "z" * 100):
        assert reason(v, signed(unsigned(sender=bad))) is RejectReason.BAD_SENDER


def test_unsupported_version_and_unknown_type() -> None:
    v = verifier()
    assert reason(v, signed(unsigned(v=2))) is RejectReason.UNSUPPORTED_VERSION
    assert reason(v, signed(unsigned(type=98, body=b"\x93\x62\x01\x90"))) is RejectReason.UNKNOWN_TYPE
    assert reason(v, signed(unsigned(seq=2, body=b"\x93\x02\x09\x92\x01\xcb" + b"\0" * 8))) is (
        RejectReason.UNSUPPORTED_VERSION
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x90",
        packb_canonical({"v": 1}),
        packb_canonical({**unsigned(), "sig": b"x" * 64, "extra": 1}),
        packb_canonical({**unsigned(), "sig": b"short"}),
        packb_canonical({**unsigned(seq="1"), "sig": b"x" * 64}),
        packb_canonical({**unsigned(ts=1), "sig": b"x" * 64}),  # ts must be a float
        packb_canonical({**unsigned(), "sig": b"x" * 64}) + b"\x00",  # trailing bytes
        b"\x88" + b"\xa1k\xc0" * 8,
        b"\x91" * 4000,  # nesting: msgpack's own stack limit
    ],
)
def test_malformed(data: bytes) -> None:
    assert reason(verifier(), data) is RejectReason.MALFORMED


def test_malformed_body_after_valid_signature() -> None:
    v = verifier()
    for i, body in enumerate(
        [b"\x93\x02\x01\x92\x01", b"\x93\x02\x01\x92\xa1x\xcb" + b"\0" * 8, b"\x93\x03"]
    ):
        assert reason(v, signed(unsigned(seq=10 + i, body=body))) is RejectReason.MALFORMED
    # The body's own type id must match the envelope's.
    pong = codec.encode(codec.Pong(1, 1.0))
    assert reason(v, signed(unsigned(seq=20, body=pong))) is RejectReason.MALFORMED


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_fuzz_open_raises_only_rejected(data: bytes) -> None:
    v = verifier()
    try:
        v.open(data, now=NOW)
    except Rejected:
        return


@settings(max_examples=200)
@given(st.integers(0, 400), st.integers(0, 255))
def test_any_byte_flip_of_a_sealed_envelope_is_rejected(pos: int, value: int) -> None:
    data = bytearray(seal(ALICE, RUN, Ping(1, 1.0), seq=5, ts=NOW))
    pos %= len(data)
    if data[pos] == value:
        return
    data[pos] = value
    with pytest.raises(Rejected):
        verifier().open(bytes(data), now=NOW)


# --------------------------------------------------------------------------------------------------
# replay guard


def test_window_slides_and_floor_rises() -> None:
    guard = ReplayGuard(window=8, skew_s=30.0, cache_size=64)
    for seq in range(1, 10):
        guard.check("a", seq, NOW, NOW)
        guard.record("a", seq, NOW, NOW)
    # 9 > window 8: the lowest quarter (2 seqs) was forgotten and the floor rose past it.
    assert len(guard) == 7
    for old in (1, 2):
        with pytest.raises(Rejected) as info:
            guard.check("a", old, NOW, NOW)
        assert info.value.reason is RejectReason.REPLAYED
    for seen in range(3, 10):
        with pytest.raises(Rejected):
            guard.check("a", seen, NOW, NOW)
    guard.check("a", 10, NOW, NOW)


def test_entries_older_than_skew_are_dropped_for_free() -> None:
    guard = ReplayGuard(window=8, skew_s=30.0, cache_size=64)
    for seq in range(8):
        guard.record("a", seq, NOW, NOW)
    guard.record("a", 100, NOW + 40, NOW + 40)  # 9th entry, 40 s later: the 8 old ones expired
    assert len(guard) == 1
    with pytest.raises(Rejected) as info:  # an old seq comes back with its old (signed) ts: stale
        guard.check("a", 3, NOW, NOW + 40)
    assert info.value.reason is RejectReason.STALE


def test_memory_is_bounded_and_eviction_never_reopens_a_replay() -> None:
    guard = ReplayGuard(window=4, skew_s=30.0, cache_size=16)
    for i in range(100):
        sender = f"peer{i}"
        guard.check(sender, 1, NOW + i * 0.01, NOW)
        guard.record(sender, 1, NOW + i * 0.01, NOW)
        assert len(guard) <= 16 and guard.tracked_senders <= 16
    # peer0 was evicted while its envelope was still fresh: replaying it must still fail (as stale).
    with pytest.raises(Rejected) as info:
        guard.check("peer0", 1, NOW, NOW)
    assert info.value.reason is RejectReason.STALE
    # A genuinely new envelope from an evicted sender with a later ts is accepted.
    guard.check("peer0", 2, NOW + 5, NOW + 5)


def test_guard_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(window=2)
    with pytest.raises(ValueError):
        ReplayGuard(window=100, cache_size=10)


def test_sequence_counter_strictly_increasing_across_restarts() -> None:
    clock = iter([1_000, 1_000, 1_000, 5_000, 4_000])
    c = SequenceCounter(clock_us=lambda: next(clock))
    assert [c.next() for _ in range(5)] == [1_000, 1_001, 1_002, 5_000, 5_001]
    first = SequenceCounter()
    last = max(first.next() for _ in range(1000))
    # A restart takes far longer than the lead a burst builds over the clock (1000 messages: ~1 ms).
    time.sleep(0.01)
    restarted = SequenceCounter()  # a new process: no state, the wall clock carries it forward
    assert restarted.next() > last


def test_seal_refuses_bad_seq() -> None:
    for bad in (-1, 2**64, 1.0):
        with pytest.raises(ValueError):
            seal(ALICE, RUN, Ping(1, 1.0), seq=bad, ts=NOW)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# docs/protocol.md test vectors


def _doc_block(doc: str, title: str) -> str:
    start = doc.index(title) + len(title)
    end = min(i for i in (doc.find("\n\n", start), doc.find("```", start)) if i > 0)
    return "".join(doc[start:end].split())


def test_protocol_doc_vectors() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    ident = Identity.from_seed(bytes(range(32)))
    assert ident.peer_id in doc and ident.to_protobuf().hex()[:72] in doc
    ping = Ping(nonce=42, sent_at=1700000000.5)
    assert codec.encode(ping).hex() in doc
    data = seal(ident, "ab" * 32, ping, seq=1_700_000_000_000_000, ts=1700000000.25)
    env = msgpack.unpackb(data, raw=False)
    assert _doc_block(doc, "envelope (257 bytes):") == data.hex() and len(data) == 257
    assert _doc_block(doc, "sig:") == env["sig"].hex()
    signing_title = (
        "signing input (after the 27-byte prefix 696e74656c6c6563742d6e6f64652f76312f656e76656c6f706500):"
    )
    assert _doc_block(doc, signing_title) == signing_bytes(env).hex()
    assert (domains.ENVELOPE + b"\x00").hex() in signing_title
    # And a peer following the document verifies it.
    v = EnvelopeVerifier("ab" * 32)
    assert v.open(data, now=1700000000.25).message == ping
    vector = "83 a161 96 c40101 ff cb3ff8000000000000 a2c3a9 c0 c3 a162 01 a163 cd012c"
    assert vector in doc
    canonical = packb_canonical({"b": 1, "a": [b"\x01", -1, 1.5, "é", None, True], "c": 300})
    assert canonical.hex() == vector.replace(" ", "")
