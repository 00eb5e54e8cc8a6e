"""Signed DHT records of runs and their members, and admission tickets (pure: no hivemind, no torch).

Layout in the DHT (the key names are built in `intellect.protocol.keys`):

    keys.RUNS_KEY                  subkey run_id   → SignedManifestMsg  (type 100, researcher-signed)
    keys.members_key(run_id)       subkey peer id  → SignedMembership   (type 102, node-signed)

A `MembershipRecord` (type 101) says who a node is in a run (addresses, gossip address, round, throughput,
role, state hash) and until when; it is valid only inside a `SignedMembership` whose signature under
`domains.MEMBERSHIP` verifies against the record's own `peer_id`. The DHT entry must sit under that peer
ID's subkey and expire exactly at the signed `expires_at`, so nobody can file it under another peer, keep
it alive longer than its signer wanted, or replay it after it expired (`open_membership` refuses expired
records). hivemind wraps every value and subkey in its own msgpack; `unwrap_dht_bytes`/`unwrap_dht_str`
undo that with our size-limited decoder.

An `AdmissionTicket` (type 103) is the researcher's signature, under `domains.ADMISSION_TICKET`, that one
peer may join one run until a time; peers present theirs inside their membership record.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from intellect.crypto import domains
from intellect.crypto.errors import InvalidPeerId
from intellect.crypto.identity import Identity, public_key_from_peer_id, verify
from intellect.protocol.codec import decode, encode, message, unpackb_limited
from intellect.protocol.errors import MalformedMessage, ProtocolError

#: Type ids of the records (used to recognise our values cheaply under keys we do not know).
SIGNED_MANIFEST_TYPE = 100
MEMBERSHIP_TYPE = 101
SIGNED_MEMBERSHIP_TYPE = 102
TICKET_TYPE = 103
#: Type ids of the other records a DHT validator recognises (`protocol.control`, `protocol.receipts`);
#: a receipt's type id (313) is a msgpack uint16.
RUN_CONTROL_TYPE = 110
_RECEIPT_HEADER = b"\xcd\x01\x39"

#: A node refreshes its membership well before this; longer TTLs are refused (a dead node must vanish).
MAX_MEMBER_TTL_S = 600.0
#: Default membership TTL and refresh period (refresh at a third of the TTL survives two lost refreshes).
DEFAULT_MEMBER_TTL_S = 60.0
#: Manifests are self-authenticating; any node training a run re-stores it before this runs out.
DEFAULT_MANIFEST_TTL_S = 3600.0
MAX_MANIFEST_TTL_S = 86_400.0
#: Tolerated clock difference between peers when checking issue and expiry times.
CLOCK_SKEW_S = 30.0
#: An expired record is refused once it is this far past its expiry (covers a lookup in flight).
EXPIRY_GRACE_S = 2.0
#: Largest DHT value we unwrap (a signed manifest is the biggest of ours).
MAX_DHT_VALUE = 300 * 1024

ROLES = ("trainer", "bootstrap", "observer", "seed")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_ADDR = 256
_MAX_ADDRS = 16
MAX_TICKET_BYTES = 512


def _check_run_id(run_id: str) -> None:
    if not _HEX64.match(run_id):
        raise ValueError("run_id must be 64 lowercase hex characters")


def _check_peer(peer_id: str) -> None:
    try:
        public_key_from_peer_id(peer_id)
    except InvalidPeerId as e:
        raise ValueError(f"peer_id: {e}") from None


@message(MEMBERSHIP_TYPE, max_size=8 * 1024)
@dataclass(frozen=True)
class MembershipRecord:
    """One node's presence in a run, valid until `expires_at` (unix seconds)."""

    run_id: str
    peer_id: str
    #: Full multiaddrs of the node's p2p daemon (ending in /p2p/<peer_id>).
    maddrs: tuple[str, ...]
    #: Unused, always "": gossip runs over the p2p daemon's streams (`maddrs`). Kept in the record so that
    #: its encoding stays the same; once the separate gossip host's multiaddr.
    gossip_addr: str
    #: Last completed outer round.
    round: int
    #: Measured training throughput, tokens per second.
    throughput: float
    #: One of ROLES.
    role: str
    #: Hex state hash after `round` ("" when unknown).
    state_hash: str
    issued_at: float
    expires_at: float
    #: The researcher's `SignedTicket` bytes when the run admits by ticket, else b"".
    ticket: bytes = b""

    def __post_init__(self) -> None:
        _check_run_id(self.run_id)
        _check_peer(self.peer_id)
        if len(self.maddrs) > _MAX_ADDRS or any(len(a) > _MAX_ADDR for a in (*self.maddrs, self.gossip_addr)):
            raise ValueError(f"at most {_MAX_ADDRS} addresses of at most {_MAX_ADDR} characters")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if self.state_hash and not _HEX64.match(self.state_hash):
            raise ValueError("state_hash must be empty or 64 lowercase hex characters")
        if not 0 <= self.round < 1 << 62:
            raise ValueError("round out of range")
        if not 0.0 <= self.throughput < 1e15:
            raise ValueError("throughput out of range")
        if not 0.0 < self.expires_at - self.issued_at <= MAX_MEMBER_TTL_S:
            raise ValueError(f"expires_at must be within {MAX_MEMBER_TTL_S:.0f}s after issued_at")
        if len(self.ticket) > MAX_TICKET_BYTES:
            raise ValueError("ticket too large")


@message(SIGNED_MEMBERSHIP_TYPE, max_size=9 * 1024)
@dataclass(frozen=True)
class SignedMembership:
    """An encoded `MembershipRecord` and its signer's signature under `domains.MEMBERSHIP`."""

    record: bytes
    sig: bytes


def seal_membership(identity: Identity, record: MembershipRecord) -> bytes:
    """Sign a membership record with the node's key (whose peer ID must be the record's)."""
    if record.peer_id != identity.peer_id:
        raise ValueError("a node can only sign its own membership record")
    body = encode(record)
    return encode(SignedMembership(body, identity.sign(domains.MEMBERSHIP, body)))


def open_membership(data: bytes, now: float | None = None) -> MembershipRecord:
    """Decode and verify a signed membership record; raise ProtocolError if forged, malformed or expired."""
    signed = decode(data, expected=SignedMembership)
    rec = decode(signed.record, expected=MembershipRecord)
    if not verify(rec.peer_id, domains.MEMBERSHIP, signed.record, signed.sig):
        raise MalformedMessage("membership signature does not verify against its peer_id")
    now = time.time() if now is None else now
    if rec.expires_at <= now - EXPIRY_GRACE_S:
        raise MalformedMessage(f"membership record expired {now - rec.expires_at:.1f}s ago")
    if rec.issued_at > now + CLOCK_SKEW_S:
        raise MalformedMessage("membership record issued in the future")
    return rec


@message(TICKET_TYPE, max_size=MAX_TICKET_BYTES)
@dataclass(frozen=True)
class SignedTicket:
    """The researcher's permission for `peer_id` to train in `run_id` until `expires_at`."""

    run_id: str
    peer_id: str
    expires_at: float
    sig: bytes

    def body(self) -> bytes:
        return encode(SignedTicket(self.run_id, self.peer_id, self.expires_at, b""))


def issue_ticket(researcher: Identity, run_id: str, peer_id: str, expires_at: float) -> bytes:
    """Researcher side: a ticket admitting `peer_id` to `run_id` until `expires_at`."""
    _check_run_id(run_id)
    _check_peer(peer_id)
    unsigned = SignedTicket(run_id, peer_id, expires_at, b"")
    return encode(
        SignedTicket(run_id, peer_id, expires_at, researcher.sign(domains.ADMISSION_TICKET, unsigned.body()))
    )


def ticket_valid(data: bytes, researcher: str, run_id: str, peer_id: str, now: float | None = None) -> bool:
    """True when `data` is `researcher`'s unexpired ticket for exactly this run and peer."""
    try:
        t = decode(data, expected=SignedTicket)
    except ProtocolError:
        return False
    now = time.time() if now is None else now
    if t.run_id != run_id or t.peer_id != peer_id or t.expires_at <= now:
        return False
    return verify(researcher, domains.ADMISSION_TICKET, t.body(), t.sig)


# ---- hivemind value wrapping -------------------------------------------------------------------------


def unwrap_dht_bytes(raw: bytes) -> bytes | None:
    """The bytes we stored, from hivemind's msgpack-wrapped value; None when the value is not a bin."""
    obj = unpackb_limited(raw, MAX_DHT_VALUE)
    return obj if isinstance(obj, bytes) else None


def unwrap_dht_str(raw: bytes) -> str:
    """A subkey we stored as a string, from hivemind's msgpack-wrapped subkey."""
    obj = unpackb_limited(raw, 1024)
    if not isinstance(obj, str):
        raise MalformedMessage("subkey is not a string")
    return obj


def as_bytes(value: object) -> bytes:
    """A value returned by `DHTNode.get` (already unwrapped by hivemind) that must be our bytes."""
    if not isinstance(value, bytes):
        raise MalformedMessage(f"expected bytes in the DHT value, got {type(value).__name__}")
    return value


def sniff(value: bytes) -> str | None:
    """Which of our signed records `value` claims to be, from its msgpack header, without decoding it.

    Our messages encode as a 3-element array whose first item is the type id (a positive fixint, or a
    uint16 for the receipt's 313): "manifest", "membership", "control", "receipt", or None.
    """
    if len(value) >= 2 and value[0] == 0x93:
        if value[1] == SIGNED_MANIFEST_TYPE:
            return "manifest"
        if value[1] == SIGNED_MEMBERSHIP_TYPE:
            return "membership"
        if value[1] == RUN_CONTROL_TYPE:
            return "control"
        if value[1:4] == _RECEIPT_HEADER:
            return "receipt"
    return None
