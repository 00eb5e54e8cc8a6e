"""Averaging wire messages (type ids 300–349): group records in the DHT and the all-reduce data plane.

Group formation (`intellect.protocol.matchmaking`): every peer that wants to average round ``r`` keeps a
signed `GroupRecord` heartbeat in its lobby, the DHT key of (run, round, bucket, schema hash), subkey = its
peer ID; a leader stores a signed `GroupDeclaration` there (subkey `decl:<leader>`) with the exact member
list. The `group_id` hashes that list and the attempt number (`groups.attempt_of(leader, seq)`), so
members that joined different declarations refuse each other in the hello.

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


class HandshakeRefusal(enum.StrEnum):
    """Why a receiver refused a data-plane connection: the text of `Reject.reason` (read by people only)."""

    #: The hello names another peer as its receiver.
    WRONG_RECEIVER = "wrong receiver"
    #: The sender's signature over the hello and our nonce does not verify: it is not who it claims.
    BAD_PROOF = "bad proof"
    #: The hello is for an older attempt of the round than the latest one we opened.
    STALE_ATTEMPT = "stale attempt"
    #: The sender is in our group for this attempt but agreed on another member list (group id).
    MEMBER_MISMATCH = "member list mismatch"
    #: The sender is not a member of the group it names.
    NOT_A_MEMBER = "not a member"
    #: The sender already has a connection to us in this group.
    DUPLICATE_CONNECTION = "duplicate connection"


class AbortReason(enum.StrEnum):
    """Why an all-reduce attempt failed: `AllReduceError.reason`, and the `Abort.reason` sent to the others.

    Values are stable strings: logs, metrics and a round's `AverageResult.reason` carry them.
    """

    #: A member refused our connection (`Reject`); the detail says why.
    REJECTED = "rejected"
    #: A member answered the handshake with the wrong message or a malformed challenge.
    PROTOCOL = "protocol"
    #: We could not connect to a member or complete its handshake (it is named the culprit).
    UNREACHABLE = "unreachable"
    #: No progress within the stall timeout (a member that never connected is named the culprit).
    STALLED = "stalled"
    #: A member's connection broke while sending or receiving a part.
    PEER_FAILED = "peer-failed"
    #: A member aborted the attempt; the reason reads "aborted-by-peer:<the reason it sent>".
    ABORTED_BY_PEER = "aborted-by-peer"
    #: A part header that does not match the group, the partition, the codec or its size bound.
    MALFORMED_PART = "malformed-part"
    #: A part payload the codec cannot decode.
    UNDECODABLE_PART = "undecodable-part"
    #: A part with NaN or infinite values.
    NON_FINITE_PART = "non-finite-part"
    #: A contribution whose weight is negative or not finite.
    BAD_WEIGHT = "bad-weight"
    #: The members' weights sum to zero: there is nothing to average.
    ZERO_WEIGHT = "zero-weight"
    #: Our own reduced partition is not finite (the reducer overflowed).
    NON_FINITE_RESULT = "non-finite-result"
    #: Our own tensors are not finite: we do not average them.
    NON_FINITE_LOCAL = "non-finite-local"
    #: A member of our attempt agreed on a different member list.
    MEMBER_MISMATCH = "member-mismatch"
    #: No member of the group can be dialled (all behind NATs): nobody can own a partition.
    NO_OWNER = "no-owner"


class PartKind(enum.IntEnum):
    """Which phase a partition belongs to."""

    #: A member's raw contribution to the receiver's partition (reduce-scatter).
    SCATTER = 0
    #: The owner's reduced partition, quantized once, used bit-for-bit by every member (all-gather).
    GATHER = 1


@message(300, version=3, max_size=2048)
@dataclass(frozen=True)
class GroupRecord:
    """A peer's heartbeat in the lobby of (run, round, bucket, schema), and where its data plane listens.

    `host` "" and `port` 0 say "dial me by peer ID over libp2p" (what the daemon publishes); a host and a
    port name a plain TCP listener (tests and benchmarks)."""

    run_id: str
    round: int
    #: The lobby bucket (`intellect.protocol.matchmaking.bucket_of`); an attempt number before matchmaking
    #: by declaration (same position on the wire).
    bucket: int
    schema_hash: str
    peer_id: str
    host: str
    port: int
    #: Unix time after which the record is void (a heartbeat: re-published before it lapses).
    expires: float
    #: Whether the peer reduces a partition (it can be dialled); False for a peer behind a NAT.
    owner: bool = True
    #: True: ready to average now. False: an intent, the peer is still training this round.
    ready: bool = True
    #: Seconds the record counts from when a reader first sees it (readers judge by their own clock).
    ttl: float = 0.0
    #: For an intent: seconds from now until the peer expects to be ready (its measured throughput).
    eta: float = 0.0
    sig: bytes = b""

    def signing_bytes(self) -> bytes:
        return packb_canonical(
            [
                "group-record-v3",
                self.run_id,
                self.round,
                self.bucket,
                self.schema_hash,
                self.peer_id,
                self.host,
                self.port,
                self.expires,
                self.owner,
                self.ready,
                self.ttl,
                self.eta,
            ]
        )

    def signed(self, identity: Identity) -> GroupRecord:
        if identity.peer_id != self.peer_id:
            raise ValueError("a group record is signed by the peer it names")
        return replace(self, sig=identity.sign(domains.ALLREDUCE, self.signing_bytes()))

    def verify(self) -> bool:
        """True when the record is signed by the peer it names and its address is plausible."""
        by_peer_id = self.host == "" and self.port == 0
        if not by_peer_id and (not 0 < self.port < 65536 or not self.host or len(self.host) > 255):
            return False
        if not (0.0 <= self.ttl <= 3600.0 and 0.0 <= self.eta <= 86400.0):
            return False
        return verify(self.peer_id, domains.ALLREDUCE, self.signing_bytes(), self.sig)


@message(309, version=1, max_size=96 * 1024)
@dataclass(frozen=True)
class GroupDeclaration:
    """A leader's declaration of one group of (run, round, lobby bucket, schema): the exact member list
    every member averages with (`intellect.protocol.matchmaking`). Stored in the lobby under the subkey
    `decl:<leader>`; `seq` numbers the leader's declarations within the round."""

    run_id: str
    round: int
    bucket: int
    schema_hash: str
    leader: str
    seq: int
    #: The members' peer IDs, sorted; with each one's data-plane host and port ("" and 0: dial by peer
    #: ID) and whether it owns a partition (False behind a NAT), position by position.
    members: tuple[str, ...]
    hosts: tuple[str, ...]
    ports: tuple[int, ...]
    owners: tuple[bool, ...]
    expires: float
    sig: bytes = b""

    def signing_bytes(self) -> bytes:
        return packb_canonical(
            [
                "group-declaration-v1",
                self.run_id,
                self.round,
                self.bucket,
                self.schema_hash,
                self.leader,
                self.seq,
                list(self.members),
                list(self.hosts),
                list(self.ports),
                list(self.owners),
                self.expires,
            ]
        )

    def signed(self, identity: Identity) -> GroupDeclaration:
        if identity.peer_id != self.leader:
            raise ValueError("a declaration is signed by its leader")
        return replace(self, sig=identity.sign(domains.ALLREDUCE, self.signing_bytes()))

    def verify(self) -> bool:
        """True when signed by its leader, with at most 4096 well-formed members that include the leader."""
        n = len(self.members)
        if not 0 < n <= 4096 or not 0 <= self.seq < 1 << 24:
            return False
        if not len(self.hosts) == len(self.ports) == len(self.owners) == n:
            return False
        if list(self.members) != sorted(set(self.members)) or self.leader not in self.members:
            return False
        if any(len(h) > 255 or not 0 <= p < 65536 for h, p in zip(self.hosts, self.ports, strict=True)):
            return False
        return verify(self.leader, domains.ALLREDUCE, self.signing_bytes(), self.sig)


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
    """The receiver refused the connection; `reason` is a `HandshakeRefusal` value."""

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
    """The sender gives up this attempt; `culprit` names a member it caught misbehaving, or is empty.

    `reason` is an `AbortReason` value, possibly with a suffix (at most 100 characters); a receiver only
    reports it, never acts on it."""

    reason: str
    culprit: str = ""


@message(308, max_size=64)
@dataclass(frozen=True)
class Done:
    """The sender has read every part it expected on this connection: the other end may now close it.

    Closing a libp2p stream through the p2p daemon resets it, which can drop bytes still in flight; so a
    member closes a connection it sent on only after the receiver said `Done` (or after the stall timeout).
    """

    parts: int = 0


def group_id_of(
    run_id: str,
    round: int,
    attempt: int,
    schema_hash: str,
    members: tuple[tuple[str, str, int] | tuple[str, str, int, str], ...],
) -> bytes:
    """Hash of everything members must agree on: run, round, attempt, schema and the sorted member list."""
    plain = ["group", run_id, round, attempt, schema_hash, [list(m) for m in sorted(members)]]
    return hashlib.sha256(packb_canonical(plain)).digest()
