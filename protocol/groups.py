"""An averaging group as plain data: its members, its identity, and how a vector is split among them.

A `GroupSpec` is what every member of one all-reduce attempt must agree on: (run, round, attempt, tensor
schema) and the sorted member list with each member's data-plane address; its `group_id`
(`averaging_messages.group_id_of`) hashes all of it, so members that saw different groups refuse each
other. `partition_sizes` cuts the flat vector into one contiguous partition per member (the butterfly
all-reduce in node/net/allreduce.py gives partition j to member j); `GroupSpec.part_sizes` gives partitions
only to members that own one: a member behind a NAT (`owner=False`) contributes and receives the average
but reduces nothing, so every byte it exchanges travels on connections it opened itself, to owners.

Pure: no torch, no sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from intellect.protocol.averaging_messages import group_id_of

#: An attempt number is (leader tag << SEQ_BITS) | the leader's declaration number: unique per declaration
#: of a round, and ordered among one leader's declarations (`attempt_of`).
SEQ_BITS = 24


def leader_tag(leader: str) -> int:
    return int.from_bytes(hashlib.blake2b(leader.encode(), digest_size=4).digest(), "big")


def attempt_of(leader: str, seq: int) -> int:
    """The attempt number of a leader's `seq`-th declaration in a round."""
    return (leader_tag(leader) << SEQ_BITS) | (seq & ((1 << SEQ_BITS) - 1))


@dataclass(frozen=True)
class GroupMember:
    """A member's peer ID and the data-plane address it published (signed) in its group record."""

    peer_id: str
    host: str
    port: int
    #: Whether it reduces a partition (others can open connections to it); False behind a NAT.
    owner: bool = True

    @property
    def wire(self) -> tuple[str, str, int] | tuple[str, str, int, str]:
        """What the group id binds of this member (an owner's entry is unchanged from version 1)."""
        return (
            (self.peer_id, self.host, self.port)
            if self.owner
            else (self.peer_id, self.host, self.port, "client")
        )


@dataclass(frozen=True)
class GroupSpec:
    """An agreed group: one all-reduce attempt of (run, round, attempt) between sorted members."""

    run_id: str
    round: int
    attempt: int
    schema_hash: str
    members: tuple[GroupMember, ...]

    def __post_init__(self) -> None:
        ids = [m.peer_id for m in self.members]
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise ValueError("group members must be sorted by peer ID and distinct")

    @property
    def group_id(self) -> bytes:
        return group_id_of(
            self.run_id,
            self.round,
            self.attempt,
            self.schema_hash,
            tuple(m.wire for m in self.members),
        )

    @property
    def owners(self) -> tuple[GroupMember, ...]:
        return tuple(m for m in self.members if m.owner)

    def part_sizes(self, numel: int) -> list[int]:
        """Partition sizes in member order: owners split `numel` (`partition_sizes`), others get 0."""
        owners = self.owners
        if not owners:
            raise ValueError("a group needs at least one member that owns a partition")
        split = iter(partition_sizes(numel, len(owners)))
        return [next(split) if m.owner else 0 for m in self.members]

    def exchanges(self, a: GroupMember, b: GroupMember) -> bool:
        """Whether data flows between `a` and `b`: only when one of them owns a partition."""
        return a.owner or b.owner

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.run_id, self.round, self.attempt)

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(m.peer_id for m in self.members)

    def index(self, peer_id: str) -> int:
        return self.peer_ids.index(peer_id)


def partition_sizes(numel: int, n: int) -> list[int]:
    """Split `numel` values into `n` contiguous partitions whose sizes differ by at most one."""
    if n < 1:
        raise ValueError("a group has at least one member")
    base, extra = divmod(numel, n)
    return [base + (1 if i < extra else 0) for i in range(n)]
