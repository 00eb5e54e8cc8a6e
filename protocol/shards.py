"""Which peer trains on which data shard in a round: rendezvous hashing over the manifest's shards.

`assign_shards` is a pure function of (run, round, live peers, shards): rendezvous (highest-random-weight)
hashing with sha256, so every shard has exactly one owner and a membership change moves only the shards
of the peer that left (or ~1/(N+1) of them to the peer that joined). Every peer computes the same
assignment from the same member list, without talking to anyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from intellect.protocol.manifest import ShardSpec

#: Hash domain of the assignment scores (no other sha256 in the protocol starts with these bytes).
_ASSIGN_DOMAIN = b"intellect-node/v1/shard-assignment"


def _hrw_score(run_id: str, round_: int, peer: str, shard: ShardSpec) -> bytes:
    h = hashlib.sha256(_ASSIGN_DOMAIN)
    for part in (run_id, str(round_), peer, shard.uri, shard.sha256):
        h.update(b"\x00")
        h.update(part.encode("utf-8"))
    return h.digest()


def assign_shards(
    run_id: str, round: int, peers: Sequence[str], shards: Sequence[ShardSpec]
) -> dict[str, list[ShardSpec]]:
    """Rendezvous hashing: each shard goes to the peer with the highest sha256(run, round, peer, shard).

    Pure and order-independent (peers are de-duplicated; every peer gets a key, possibly an empty list,
    and each list keeps the input order of shards). Including the round rotates data between peers
    from round to round; within a round, removing a peer moves only its own shards.
    """
    unique = sorted(set(peers))
    out: dict[str, list[ShardSpec]] = {p: [] for p in unique}
    if not unique:
        return out
    for shard in shards:
        owner = max(unique, key=lambda p: (_hrw_score(run_id, round, p, shard), p))
        out[owner].append(shard)
    return out
