"""Which state to sync to, and how to judge a misbehaviour report: the pure rules of state sync.

A *vouch* is an authenticated claim "peer P holds the global state H after round r", whatever carried it
(a self-signed `StateAnnounce`, a gossip `CheckpointAnnounce` whose envelope verified, a DHT
`MembershipRecord`). `pick_target` turns the vouches a node has seen into the one `SyncTarget` it downloads
(node/net/statesync.py does the transfer): the (round, hash) the most distinct peers vouch for.

A server caught signing a wrong chunk digest is reported to the run with its own signature as evidence
(`bad_chunk_report`); `judge_report` checks such a report without trusting the reporter.

Pure: no torch, no hivemind, no I/O.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.gossip_messages import CheckpointAnnounce, Misbehaviour
from intellect.protocol.merkle import merkle_root
from intellect.protocol.records import MembershipRecord
from intellect.protocol.sync_messages import (
    MAX_CHUNK_SIZE,
    MAX_TOTAL_BYTES,
    BadChunkEvidence,
    StateAnnounce,
    check_evidence,
)

#: `Misbehaviour.kind` of a gossiped `BadChunkEvidence`.
BAD_CHUNK = "bad-chunk"
#: Misbehaviour kind: an all-reduce owner sent different members different results (`am.Equivocation`).
EQUIVOCATION = "equivocation"


@dataclass(frozen=True)
class Vouch:
    """One authenticated claim "`peer_id` holds state `state_hash` after `round`", whatever its source.

    Sources authenticate differently: a `StateAnnounce` carries its own signature; a gossip
    `CheckpointAnnounce` was authenticated by its envelope; a DHT `MembershipRecord` by its record signature.
    `chunk_size`/`total_bytes` are hints (0 when the source does not say: membership records don't); the
    state hash alone commits to the content and the chunking, and the chunk list is checked against it.
    """

    peer_id: str
    round: int
    state_hash: str
    chunk_size: int = 0
    total_bytes: int = 0

    @classmethod
    def from_announce(cls, ann: StateAnnounce, run_id: str) -> Vouch | None:
        """The vouch of a self-signed announcement; None if it is for another run or does not verify."""
        if ann.run_id != run_id or not ann.verify():
            return None
        return cls(ann.peer_id, ann.round, ann.state_hash, ann.chunk_size, ann.total_bytes)

    @classmethod
    def from_checkpoint(cls, sender: str, msg: CheckpointAnnounce) -> Vouch | None:
        """The vouch of a gossip `CheckpointAnnounce` whose envelope verified as coming from `sender`."""
        if not _valid_hash(msg.state_hash) or msg.round < 0:
            return None
        size_ok = 0 < msg.chunk_size <= MAX_CHUNK_SIZE and 0 < msg.num_bytes <= MAX_TOTAL_BYTES
        if not size_ok:
            return cls(sender, msg.round, msg.state_hash)
        return cls(sender, msg.round, msg.state_hash, msg.chunk_size, msg.num_bytes)

    @classmethod
    def from_membership(cls, rec: MembershipRecord) -> Vouch | None:
        """The vouch of a verified DHT membership record; None when it names no state hash."""
        if not _valid_hash(rec.state_hash):
            return None
        return cls(rec.peer_id, rec.round, rec.state_hash)


def _valid_hash(h: str) -> bool:
    return len(h) == 64 and all(c in "0123456789abcdef" for c in h)


def checkpoint_announce(ann: StateAnnounce) -> CheckpointAnnounce:
    """The gossip payload (topic `checkpoint`) that tells the same thing as `ann`."""
    return CheckpointAnnounce(ann.round, ann.state_hash, ann.total_bytes, ann.chunk_size)


@dataclass(frozen=True)
class SyncTarget:
    """The state a downloader goes for, and the distinct peers that vouched for it.

    `chunk_size`/`total_bytes` are what most of those peers claimed (0 when none said).
    """

    round: int
    state_hash: str
    chunk_size: int
    total_bytes: int
    peers: tuple[str, ...]


def pick_target(vouches: Iterable[Vouch | StateAnnounce], run_id: str) -> SyncTarget | None:
    """The (round, hash) vouched for by the most distinct peers; ties go to the higher round.

    `StateAnnounce`s count only with a valid signature for `run_id`; `Vouch`es are taken as authenticated
    by their source. Each peer counts once, for its highest round (a peer that announced twice has moved
    on). Further ties break on the hash, so every node picks the same target from the same input. None when
    there is nothing valid to pick.
    """
    latest: dict[str, Vouch] = {}
    for item in vouches:
        vouch = Vouch.from_announce(item, run_id) if isinstance(item, StateAnnounce) else item
        if vouch is None or not _valid_hash(vouch.state_hash):
            continue
        prev = latest.get(vouch.peer_id)
        if prev is None or vouch.round > prev.round:
            latest[vouch.peer_id] = vouch
    votes: dict[tuple[int, str], list[Vouch]] = collections.defaultdict(list)
    for vouch in latest.values():
        votes[(vouch.round, vouch.state_hash)].append(vouch)
    if not votes:
        return None
    key = max(votes, key=lambda k: (len(votes[k]), k[0], k[1]))
    # Size hints count only when every hinting voucher agrees: with a majority rule one peer repeating a
    # state with a bogus chunk size could outvote an honest one, whose true chunk list would then fail
    # the hint check and get it marked bad. Unhinted, the chunk list is checked against the hash alone.
    sizes = {(v.chunk_size, v.total_bytes) for v in votes[key] if v.chunk_size}
    chunk_size, total = next(iter(sizes)) if len(sizes) == 1 else (0, 0)
    return SyncTarget(key[0], key[1], chunk_size, total, tuple(sorted(v.peer_id for v in votes[key])))


def bad_chunk_report(evidence: BadChunkEvidence, round_: int) -> Misbehaviour:
    """The gossip message that tells the run about `evidence` (the accused server's own signature)."""
    return Misbehaviour(accused=evidence.server, round=round_, kind=BAD_CHUNK, evidence=encode(evidence))


def equivocation_report(evidence: am.Equivocation, round_: int) -> Misbehaviour:
    """The gossip message that tells the run an owner signed two different results (its own signatures)."""
    return Misbehaviour(accused=evidence.owner, round=round_, kind=EQUIVOCATION, evidence=encode(evidence))


def judge_report(
    report: Misbehaviour, run_id: str, chunk_list: Callable[[str], Iterable[bytes] | None]
) -> bool | None:
    """Whether a gossiped misbehaviour report proves what it says, checked without trusting the reporter.

    True: the accused signed a chunk digest that is not the one in the state's chunk list, or (kind
    "equivocation") two different reduced partitions of one all-reduce attempt.
    False: the report is malformed, about another run or another peer, or its evidence does not hold.
    None: we hold no copy of that state (`chunk_list(state_hash)` is None), so cannot check it.
    """
    if report.kind == EQUIVOCATION:
        # Self-contained: two signatures of the accused over different results of one attempt.
        try:
            proof = decode(report.evidence, am.Equivocation)
        except ProtocolError:
            return False
        return proof.owner == report.accused and proof.verify()
    if report.kind != BAD_CHUNK:
        return False
    try:
        evidence = decode(report.evidence, BadChunkEvidence)
    except ProtocolError:
        return False
    if evidence.run_id != run_id or evidence.server != report.accused:
        return False
    held = chunk_list(evidence.state_hash)
    if held is None:
        return None
    hashes = tuple(held)
    return check_evidence(evidence, hashes, merkle_root(hashes))
