"""The agreement phase of an all-reduce attempt: nobody commits an average the group does not agree on.

After the all-gather every member holds the averaged vector, but it took each reduced partition on its
owner's word, and the bytes it received may not be the bytes the others received. Before anyone uses the
result, every member signs a `Digest` of what it holds and what it knows first-hand, and sends it to
everyone it talks to; owners relay the full set to members behind a NAT (`DigestBundle`). A member
returns the average only when it holds a valid digest of every member and every check below passes; any
failure raises `AllReduceError`, so a member either commits the average everyone agreed on or nothing.

What is checked, by every member, from the same signed digests (so honest members reach the same verdict):

1. **One result.** Every digest quotes the same digest, total weight and owner signature of every
   reduced partition. Two members that received different bytes of partition j both quote a signature of
   its owner: together an `Equivocation` proof anyone can check (`INCONSISTENT_RESULT`, the owner is the
   culprit). A quoted signature that does not verify convicts the digest's author (`BAD_DIGEST`).
2. **Honest inputs.** Each owner reports one `InputLine` per member about its partition (the payload
   digest and weight the sender signed, k random projections and the distance to the result); each member
   reports the same line about its own contribution, and the owner's own contribution is reported by its
   *witness* (the next member, which received a signed copy of it during the reduce-scatter), so no line
   is only the owner's word. A line whose digest or weight differ is settled by the signature it quotes
   (whoever contradicts a signature of its own is the culprit); lines that agree on the bytes but not on
   the numbers computed from them make both authors suspects (`MISREPORTED_INPUT`, no proof either way).
3. **The reduction.** With those lines, the owner's result must satisfy its reducer's equation in every
   projection, within the tolerance of `intellect.node.engine.verify` (`BIASED_RESULT`).

The projections' seed hashes every reduced partition, so no owner knew them when it sent its result.
Cost: one extra message per connection (about 100 bytes per member and partition) plus the owners'
relays, and a few passes over the vector for hashing and projecting; see docs/decisions.md.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from intellect.crypto import domains
from intellect.crypto.identity import Identity, verify
from intellect.node.engine import verify as check
from intellect.node.net.transport import Conn, gather_all, recv_exactly
from intellect.protocol import averaging_messages as am
from intellect.protocol.averaging_messages import AbortReason
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.groups import GroupSpec

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
T = TypeVar("T")


@dataclass(frozen=True)
class Seal:
    """A part as its sender signed it: payload digest, weight and signature (`am.part_statement`)."""

    digest: bytes
    weight: float
    sig: bytes


@dataclass
class Ledger:
    """What one attempt sent and received that the agreement phase reports and checks."""

    #: Owner index -> its reduced partition as we received it (ours as we sent it).
    gathered: dict[int, Seal] = field(default_factory=dict)
    #: Partition index -> our contribution to it, and its decoded values (what its owner reduced).
    sent: dict[int, tuple[Seal, torch.Tensor]] = field(default_factory=dict)
    #: Owner index -> that owner's own contribution to its partition, as it sent it to us, its witness.
    witnessed: dict[int, tuple[Seal, torch.Tensor]] = field(default_factory=dict)
    #: Owners only: member index -> its contribution to our partition (ours included).
    received: dict[int, tuple[Seal, torch.Tensor]] = field(default_factory=dict)


def witness_of(spec: GroupSpec, owner: int) -> int:
    """The member that attests an owner's own contribution: the next one in group order."""
    return (owner + 1) % len(spec.members)


class AgreementError(Exception):
    """Internal: a failed check, turned into `AllReduceError` by the caller's module."""

    def __init__(
        self, reason: AbortReason, culprit: str = "", detail: str = "", suspects: tuple[str, ...] = ()
    ) -> None:
        super().__init__(detail)
        self.reason, self.culprit, self.detail, self.suspects = reason, culprit, detail, suspects
        #: Signed proof against the culprit that any peer can check, when there is one.
        self.evidence: am.Equivocation | None = None
        #: An Abort that member `via` sent us instead of its digest (judged by `allreduce.abort_error`).
        self.abort: am.Abort | None = None
        self.via = ""


@dataclass
class Agreement:
    """The inputs of one agreement phase (see the module docstring)."""

    identity: Identity
    spec: GroupSpec
    codec: Any
    reducer: str
    max_weight: float
    result: torch.Tensor
    sizes: Sequence[int]
    ledger: Ledger
    outgoing: Mapping[str, Conn]
    incoming: Mapping[str, Conn]
    #: Members we exchange data with (every member for an owner, the owners for a member behind a NAT).
    others: Sequence[str]
    guarded: Callable[[Awaitable[Any]], Awaitable[Any]]
    #: Fault injection for tests and bench/byzantine.py: rewrites our digest before it is signed.
    tamper_lines: Callable[[list[am.InputLine]], list[am.InputLine]] | None = None
    sent_bytes: int = 0
    received_bytes: int = 0

    def __post_init__(self) -> None:
        self.me = self.identity.peer_id
        self.ids = [m.peer_id for m in self.spec.members]
        self.my_index = self.ids.index(self.me)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.owners = [i for i, m in enumerate(self.spec.members) if m.owner and self.sizes[i] > 0]

    def _part(self, j: int) -> torch.Tensor:
        return self.result[self.offsets[j] : self.offsets[j] + self.sizes[j]]

    # -- our digest ------------------------------------------------------------------------------------

    def _line(
        self, proj: check.Projector, j: int, member: int, seal: Seal, values: torch.Tensor
    ) -> am.InputLine:
        sketch = proj(values)
        dist = check.distance(values, self._part(j))
        return am.InputLine(j, member, seal.digest, seal.weight, seal.sig, sketch, dist)

    def digest(self) -> am.Digest:
        n, led = len(self.ids), self.ledger
        seals = [led.gathered.get(j) for j in range(n)]
        self.seed = check.seed_of(self.spec.group_id, [s.digest if s else b"" for s in seals])
        self.projectors = {j: check.Projector(self.seed, j, self.sizes[j]) for j in self.owners}
        lines: list[am.InputLine] = []
        for j, (seal, values) in sorted(led.sent.items()):
            lines.append(self._line(self.projectors[j], j, self.my_index, seal, values))
        for j, (seal, values) in sorted(led.witnessed.items()):
            lines.append(self._line(self.projectors[j], j, j, seal, values))
        for i, (seal, values) in sorted(led.received.items()):
            lines.append(self._line(self.projectors[self.my_index], self.my_index, i, seal, values))
        if self.tamper_lines is not None:
            lines = self.tamper_lines(lines)
        return am.Digest(
            self.spec.group_id,
            self.me,
            tuple(s.digest if s else b"" for s in seals),
            tuple(s.weight if s else 0.0 for s in seals),
            tuple(s.sig if s else b"" for s in seals),
            tuple(lines),
        ).signed(self.identity)

    # -- exchange --------------------------------------------------------------------------------------

    async def _send(self, peer: str, msg: object) -> None:
        data = encode(msg)
        try:
            await self.guarded(self.outgoing[peer].send(_LEN.pack(len(data)) + data))
        except (ConnectionError, OSError) as e:
            raise AgreementError(AbortReason.PEER_FAILED, detail=f"{peer}: {e}") from e
        self.sent_bytes += len(data) + _LEN.size

    async def _recv(self, peer: str) -> object:
        conn = self.incoming[peer]
        try:
            (n,) = _LEN.unpack(await self.guarded(recv_exactly(conn, _LEN.size)))
            if n > am.MAX_AGREEMENT_FRAME:
                raise ProtocolError(f"agreement frame of {n} bytes")
            msg = decode(bytes(await self.guarded(recv_exactly(conn, n))))
        except (ConnectionError, OSError, struct.error) as e:
            raise AgreementError(AbortReason.PEER_FAILED, detail=f"{peer}: {e}") from e
        except ProtocolError as e:
            raise AgreementError(AbortReason.BAD_DIGEST, culprit=peer, detail=str(e)) from e
        except Exception as e:
            # A member that withholds its digest (or an owner its relay) is named like one that never
            # connected, so the retry goes on without it instead of stalling attempt after attempt.
            if getattr(e, "failure", None) is AbortReason.STALLED:
                raise AgreementError(
                    AbortReason.STALLED, culprit=peer, detail=f"{peer} sent no digest"
                ) from e
            raise
        self.received_bytes += n + _LEN.size
        if isinstance(msg, am.Abort):
            err = AgreementError(AbortReason.ABORTED_BY_PEER, detail=f"{peer} aborted: {msg.reason}")
            err.abort, err.via = msg, peer
            raise err
        return msg

    def _admit(self, got: dict[str, am.Digest], msg: object, via: str) -> None:
        """Keep a signed digest of this attempt; two different ones by one author convict it."""
        if not isinstance(msg, am.Digest):
            raise AgreementError(AbortReason.BAD_DIGEST, culprit=via, detail=f"expected a digest from {via}")
        if msg.group_id != self.spec.group_id or msg.sender not in self.ids or not msg.verify():
            raise AgreementError(
                AbortReason.BAD_DIGEST, culprit=via, detail=f"invalid digest relayed by {via}"
            )
        old = got.get(msg.sender)
        if old is not None and old != msg:
            raise AgreementError(
                AbortReason.BAD_DIGEST, culprit=msg.sender, detail="two different signed digests"
            )
        got[msg.sender] = msg

    async def exchange(self, mine: am.Digest) -> dict[str, am.Digest]:
        """Send our digest, collect everyone's (owners relay them to members behind a NAT)."""
        got: dict[str, am.Digest] = {self.me: mine}
        i_own = self.spec.members[self.my_index].owner

        async def from_peer(peer: str) -> None:
            self._admit(got, await self._recv(peer), peer)

        await gather_all([self._send(p, mine) for p in self.others] + [from_peer(p) for p in self.others])
        relay_to = [p for p in self.others if not self.spec.members[self.ids.index(p)].owner]
        if i_own:
            bundle = am.DigestBundle(tuple(got[p] for p in self.ids))
            await gather_all([self._send(p, bundle) for p in relay_to])
        else:

            async def bundle_from(peer: str) -> None:
                msg = await self._recv(peer)
                if not isinstance(msg, am.DigestBundle) or len(msg.digests) > len(self.ids):
                    raise AgreementError(AbortReason.BAD_DIGEST, culprit=peer, detail="expected a bundle")
                for d in msg.digests:
                    self._admit(got, d, peer)

            await gather_all([bundle_from(p) for p in self.others])
        missing = [p for p in self.ids if p not in got]
        if missing:
            raise AgreementError(AbortReason.BAD_DIGEST, detail=f"no digest of {missing[0]}")
        return got

    # -- checks ----------------------------------------------------------------------------------------

    def check(self, digests: Mapping[str, am.Digest]) -> None:
        """Raise AgreementError unless every digest agrees on one result, an honest one."""
        mine = digests[self.me]
        for d in (digests[p] for p in self.ids):
            self._same_result(mine, d)
        for j in self.owners:
            self._check_partition(j, digests)

    def _same_result(self, mine: am.Digest, other: am.Digest) -> None:
        n = len(self.ids)
        if not len(other.part_digests) == len(other.part_weights) == len(other.part_sigs) == n:
            raise AgreementError(AbortReason.BAD_DIGEST, culprit=other.sender, detail="wrong length")
        for j in self.owners:
            a = (mine.part_digests[j], mine.part_weights[j], mine.part_sigs[j])
            b = (other.part_digests[j], other.part_weights[j], other.part_sigs[j])
            if a[:2] == b[:2]:
                continue
            owner = self.ids[j]
            kind = int(am.PartKind.GATHER)
            if not verify(
                owner, domains.ALLREDUCE, am.part_statement(self.spec.group_id, kind, j, b[1], b[0]), b[2]
            ):
                raise AgreementError(
                    AbortReason.BAD_DIGEST,
                    culprit=other.sender,
                    detail=f"quotes a false signature of {owner}",
                )
            proof = am.Equivocation(owner, self.spec.group_id, j, a[1], a[0], a[2], b[1], b[0], b[2])
            err = AgreementError(
                AbortReason.INCONSISTENT_RESULT,
                culprit=owner,
                detail=f"{owner} sent {mine.sender} and {other.sender} different partitions {j}",
            )
            err.evidence = proof if proof.verify() else None
            raise err

    def _check_partition(self, j: int, digests: Mapping[str, am.Digest]) -> None:
        owner = self.ids[j]
        report = {x.member: x for x in digests[owner].inputs if x.part == j}
        if sorted(report) != list(range(len(self.ids))):
            raise AgreementError(
                AbortReason.BAD_DIGEST, culprit=owner, detail=f"report of part {j} incomplete"
            )
        for i in range(len(self.ids)):
            author = self.ids[witness_of(self.spec, j)] if i == j else self.ids[i]
            firsthand = [x for x in digests[author].inputs if x.part == j and x.member == i]
            if len(firsthand) != 1:
                raise AgreementError(AbortReason.BAD_DIGEST, culprit=author, detail=f"no line on part {j}")
            self._settle(j, i, report[i], firsthand[0], owner, author)
        lines = [report[i] for i in range(len(self.ids))]
        contributions = [check.Contribution(min(x.weight, self.max_weight), x.sketch, x.dist) for x in lines]
        part = self._part(j)
        bound = self.codec.error_bound(part)
        ok, worst, tol = check.check_partition(self.reducer, contributions, part, self.projectors[j], bound)
        if not ok:
            raise AgreementError(
                AbortReason.BIASED_RESULT,
                culprit=owner,
                detail=f"partition {j} misses its equation by {worst:.3g} (tolerance {tol:.3g})",
            )

    def _settle(
        self, j: int, i: int, said: am.InputLine, firsthand: am.InputLine, owner: str, author: str
    ) -> None:
        """Compare the owner's line about member i's contribution with the first-hand one."""
        if (said.digest, said.weight) != (firsthand.digest, firsthand.weight):
            # Whoever quotes a signature of the contributor that does not verify is lying.
            contributor = self.ids[i]
            kind = int(am.PartKind.WITNESS if i == j else am.PartKind.SCATTER)
            for line, by in ((said, owner), (firsthand, author)):
                statement = am.part_statement(self.spec.group_id, kind, j, line.weight, line.digest)
                if not verify(contributor, domains.ALLREDUCE, statement, line.sig):
                    raise AgreementError(
                        AbortReason.MISREPORTED_INPUT, culprit=by, detail=f"false line on part {j}"
                    )
            # Both signatures verify: the contributor signed two different parts.
            raise AgreementError(
                AbortReason.INCONSISTENT_RESULT, culprit=contributor, detail=f"two signed parts {j}"
            )
        a = check.Contribution(said.weight, said.sketch, said.dist)
        b = check.Contribution(firsthand.weight, firsthand.sketch, firsthand.dist)
        if not check.same_report(a, b):
            raise AgreementError(
                AbortReason.MISREPORTED_INPUT,
                detail=f"{owner} and {author} disagree on the numbers of part {j}",
                suspects=(owner, author),
            )
