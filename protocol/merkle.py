"""The Merkle root that names a state: what peers announce as its `state_hash` (pure: hashlib only).

The leaves are the sha256 digests of a state's chunks (`node/engine/statehash.py` serialises and cuts it).
The tree is built RFC 6962 style: a leaf node is ``sha256(0x00 || chunk digest)`` and an interior node
``sha256(0x01 || left || right)`` (distinct prefixes, so an interior node can never pass for a leaf).
**Odd-leaf rule:** when a level has an odd number of nodes, the last one is promoted unchanged to the
next level (it is *not* paired with a copy of itself, which would let two different leaf lists share a
root, as in Bitcoin's CVE-2012-2459). The root of zero chunks is ``sha256(b"")``.

It lives in protocol/ because checking a peer's chunk list or evidence against an announced hash is part
of the protocol, and must not need torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """Merkle root of chunk digests (RFC 6962 prefixes; an odd last node is promoted unchanged)."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(_LEAF_PREFIX + h).digest() for h in hashes]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(_NODE_PREFIX + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
