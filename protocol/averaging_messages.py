"""Averaging wire messages (type ids 300–349): group records in the DHT and the all-reduce data plane.

Group formation: every peer that wants to average round ``r`` stores a signed `GroupRecord` in the DHT
under a key made of (run, round, attempt, schema hash), subkey = its peer ID. The group is the sorted set
of valid records a peer sees; its `group_id` hashes that member list, so two peers that saw different sets
have different group ids and refuse each other in the hello.

Data plane (one TCP connection per ordered pair of members, data flows from the connecting side):

    client -> Hello(run, round, attempt, group_id, sender, receiver)
    server -> Challenge(nonce)            or Reject(reason)
    client -> Proof(sig over hello fields + nonce, domain ALLREDUCE)
    server -> Accept(group_size)          or Reject(reason)
    client -> PartHeader(kind=SCATTER, ...) + raw payload    (the receiver's partition of our tensors)
    client -> PartHeader(kind=GATHER, ...) + raw payload     (our reduced partition, as everyone uses it)
    either of the two may be replaced by Abort(reason, culprit)

Control frames are length-prefixed codec messages; a payload's length is given by its header and checked
against the codec's bound for the partition size before a single byte of it is read.

Nothing here imports torch or hivemind.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace

from intellect.crypto import domains
from intellect.crypto.identity import Identity, verify
from intellect.protocol.codec import message, packb_canonical

#: Largest control frame of the all-reduce data plane (headers, hellos, aborts).
MAX_CONTROL_FRAME = 4096


class PartKind(enum.IntEnum):
    """Which phase a partition belongs to."""

    #: A member's raw contribution to the receiver's partition (reduce-scatter).
    SCATTER = 0
    #: The owner's reduced partition, quantized once, used bit-for-bit by every member (all-gather).
    GATHER = 1


@message(300, max_size=2048)
@dataclass(frozen=True)
class GroupRecord:
    """A peer's offer to average: where its data plane listens, for which (run, round, attempt, schema)."""

    run_id: str
    round: int
    attempt: int
    schema_hash: str
    peer_id: str
    host: str
    port: int
    #: Unix time after which the record is void.
    expires: float
    sig: bytes = b""

    def signing_bytes(self) -> bytes:
        return packb_canonical(
            [
                "group-record",
                self.run_id,
                self.round,
                self.attempt,
                self.schema_hash,
                self.peer_id,
                self.host,
                self.port,
                self.expires,
            ]
        )

    def signed(self, identity: Identity) -> GroupRecord:
        if identity.peer_id != self.peer_id:
            raise ValueError("a group record is signed by the peer it names")
        return replace(self, sig=identity.sign(domains.ALLREDUCE, self.signing_bytes()))

    def verify(self) -> bool:
        """True when the record is signed by the peer it names and its address is plausible."""
        if not 0 < self.port < 65536 or not self.host or len(self.host) > 255:
            return False
        return verify(self.peer_id, domains.ALLREDUCE, self.signing_bytes(), self.sig)


@message(301, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Hello:
    """First frame of a data-plane connection: who we are, whom we want, for which group."""

    run_id: str
    round: int
    attempt: int
    group_id: bytes
    sender: str
    receiver: str

    def proof_bytes(self, nonce: bytes) -> bytes:
        """What the sender signs to prove its peer ID: every hello field plus the receiver's fresh nonce."""
        return packb_canonical(
            [
                "allreduce-hello",
                self.run_id,
                self.round,
                self.attempt,
                self.group_id,
                self.sender,
                self.receiver,
                nonce,
            ]
        )


@message(302, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Challenge:
    """The receiver's fresh random nonce: the sender's proof cannot be replayed on another connection."""

    nonce: bytes


@message(303, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Proof:
    """The sender's Ed25519 signature (domain ALLREDUCE) over `Hello.proof_bytes(nonce)`."""

    sig: bytes


@message(304, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Accept:
    """The receiver accepted the sender as a member of its group."""

    group_size: int


@message(305, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Reject:
    """The receiver refused the connection (unknown group, member list mismatch, bad proof)."""

    reason: str


@message(306, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class PartHeader:
    """Announces one partition payload of `nbytes` raw bytes that follows immediately."""

    kind: int
    part: int
    #: SCATTER: the sender's weight (tokens processed); GATHER: the total weight of the reduced part.
    weight: float
    codec: str
    numel: int
    nbytes: int


@message(307, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Abort:
    """The sender gives up this attempt; `culprit` names a member it caught misbehaving, or is empty."""

    reason: str
    culprit: str = ""


def group_id_of(
    run_id: str, round: int, attempt: int, schema_hash: str, members: tuple[tuple[str, str, int], ...]
) -> bytes:
    """Hash of everything members must agree on: run, round, attempt, schema and the sorted member list."""
    plain = ["group", run_id, round, attempt, schema_hash, [list(m) for m in sorted(members)]]
    return hashlib.sha256(packb_canonical(plain)).digest()
