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
    #: Members received different bytes of one reduced partition: its owner signed both (`Equivocation`).
    INCONSISTENT_RESULT = "inconsistent-result"
    #: A reduced partition does not satisfy its reducer's equation with its owner's own report.
    BIASED_RESULT = "biased-result"
    #: An owner's report about our contribution differs from what we sent.
    MISREPORTED_INPUT = "misreported-input"
    #: A member's digest is malformed, unsigned or contradicts the signatures it quotes.
    BAD_DIGEST = "bad-digest"


class PartKind(enum.IntEnum):
    """Which phase a partition belongs to."""

    #: A member's raw contribution to the receiver's partition (reduce-scatter).
    SCATTER = 0
    #: The owner's reduced partition, quantized once, used bit-for-bit by every member (all-gather).
    GATHER = 1
    #: An owner's own contribution to its partition, sent to its witness (`net.agreement.witness_of`).
    WITNESS = 2


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


@message(306, version=2, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class PartHeader:
    """Announces one partition payload of `nbytes` raw bytes that follows immediately.

    `digest` is `payload_digest` of that payload and `sig` the sender's signature (domain ALLREDUCE) over
    `statement(group_id)`: an owner that sends different bytes of its reduced partition to different
    members signs two statements that contradict each other (`Equivocation`)."""

    kind: int
    part: int
    #: SCATTER: the sender's weight (tokens processed); GATHER: the total weight of the reduced part.
    weight: float
    codec: str
    numel: int
    nbytes: int
    digest: bytes = b""
    sig: bytes = b""

    def statement(self, group_id: bytes) -> bytes:
        return part_statement(group_id, self.kind, self.part, self.weight, self.digest)


def part_statement(group_id: bytes, kind: int, part: int, weight: float, digest: bytes) -> bytes:
    """What a part's sender signs: this payload (by digest) is partition `part` of this attempt."""
    return packb_canonical(["allreduce-part-v1", group_id, kind, part, weight, digest])


def payload_digest(payload: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte BLAKE2b digest of a part payload (collisions would need 2^64 work)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


#: Largest agreement frame (a `Digest`, or a `DigestBundle` of every member's).
MAX_AGREEMENT_FRAME = 8 * 1024 * 1024


@dataclass(frozen=True)
class InputLine:
    """A line about member `member`'s contribution to partition `part` (`intellect.node.engine.verify`):
    the payload's digest and weight with the contributor's signature over them (`part_statement`), its
    random projections and its distance to the reduced partition. Written by the partition's owner about
    every contribution, and by each contributor (the owner's witness for the owner's own) first-hand."""

    part: int
    member: int
    digest: bytes
    weight: float
    sig: bytes
    sketch: tuple[float, ...]
    dist: float


@message(310, max_size=MAX_AGREEMENT_FRAME)
@dataclass(frozen=True)
class Digest:
    """After the all-gather, every member signs what it received: the digest, total weight and owner's
    signature of every reduced partition, in member order (empty for members that own none); an owner adds
    one `InputLine` per member about its own partition. A member commits the average only when it holds
    every member's digest and they agree (the agreement phase, `intellect.node.net.agreement`)."""

    group_id: bytes
    sender: str
    part_digests: tuple[bytes, ...]
    part_weights: tuple[float, ...]
    part_sigs: tuple[bytes, ...]
    inputs: tuple[InputLine, ...]
    sig: bytes = b""

    def signing_bytes(self) -> bytes:
        return packb_canonical(
            [
                "allreduce-digest-v1",
                self.group_id,
                self.sender,
                list(self.part_digests),
                list(self.part_weights),
                list(self.part_sigs),
                [[x.part, x.member, x.digest, x.weight, x.sig, list(x.sketch), x.dist] for x in self.inputs],
            ]
        )

    def signed(self, identity: Identity) -> Digest:
        return replace(self, sig=identity.sign(domains.ALLREDUCE, self.signing_bytes()))

    def verify(self) -> bool:
        return verify(self.sender, domains.ALLREDUCE, self.signing_bytes(), self.sig)


@message(311, max_size=MAX_AGREEMENT_FRAME)
@dataclass(frozen=True)
class DigestBundle:
    """Every member's signed `Digest`, relayed by an owner to a member behind a NAT (which talks to owners
    only). Relaying cannot alter a digest: each is signed by its author."""

    digests: tuple[Digest, ...]


@message(312, max_size=4096)
@dataclass(frozen=True)
class Equivocation:
    """Proof that `owner` signed two different payloads as partition `part` of one attempt: anyone can
    check it with the owner's peer ID alone."""

    owner: str
    group_id: bytes
    part: int
    weight_a: float
    digest_a: bytes
    sig_a: bytes
    weight_b: float
    digest_b: bytes
    sig_b: bytes

    def verify(self) -> bool:
        if (self.digest_a, self.weight_a) == (self.digest_b, self.weight_b):
            return False
        kind = int(PartKind.GATHER)
        a = part_statement(self.group_id, kind, self.part, self.weight_a, self.digest_a)
        b = part_statement(self.group_id, kind, self.part, self.weight_b, self.digest_b)
        return verify(self.owner, domains.ALLREDUCE, a, self.sig_a) and verify(
            self.owner, domains.ALLREDUCE, b, self.sig_b
        )


@message(307, max_size=MAX_CONTROL_FRAME)
@dataclass(frozen=True)
class Abort:
    """`origin` gives up this attempt; `culprit` names a member it caught misbehaving, or is empty.

    `reason` is an `AbortReason` value, possibly with a suffix (at most 100 characters); a receiver only
    reports it, never acts on it. `sig` is the origin's signature over the attempt's group id, the reason
    and the culprit (`signing_bytes`), so that a member that gives up because of someone else's Abort can
    pass that Abort on unchanged, and the others blame its signer rather than the member that relayed it.
    An Abort without a valid signature of a member of the group is a protocol violation of its sender."""

    reason: str
    culprit: str = ""
    origin: str = ""
    sig: bytes = b""

    def signing_bytes(self, group_id: bytes) -> bytes:
        return packb_canonical(["abort-v1", group_id, self.origin, self.reason, self.culprit])

    def signed(self, identity: Identity, group_id: bytes) -> Abort:
        mine = replace(self, origin=identity.peer_id)
        return replace(mine, sig=identity.sign(domains.ALLREDUCE, mine.signing_bytes(group_id)))

    def verify(self, group_id: bytes) -> bool:
        if not self.origin or not self.sig:
            return False
        return verify(self.origin, domains.ALLREDUCE, self.signing_bytes(group_id), self.sig)


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
