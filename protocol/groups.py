"""An averaging group as plain data: its members, its identity, and how a vector is split among them.

A `GroupSpec` is what every member of one all-reduce attempt must agree on: (run, round, attempt, tensor
schema) and the sorted member list with each member's data-plane address; its `group_id`
(`averaging_messages.group_id_of`) hashes all of it, so members that saw different groups refuse each
other. `partition_sizes` cuts the flat vector into one contiguous partition per member (the butterfly
all-reduce in node/net/allreduce.py gives partition j to member j).

Pure: no torch, no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from intellect.protocol.averaging_messages import group_id_of


@dataclass(frozen=True)
class GroupMember:
    """A member's peer ID and the data-plane address it published (signed) in its group record."""

    peer_id: str
    host: str
    port: int


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
            tuple((m.peer_id, m.host, m.port) for m in self.members),
        )

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
