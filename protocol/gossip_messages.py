"""Gossip messages (type ids 200–299): what peers announce to each other, and the frame that carries them.

- **Gossip payloads** (200–219): the bodies of signed envelopes published on a run's topics
  (`intellect.protocol.keys.topic_name`): progress, checkpoint/state announcements, leaving notices and
  misbehaviour evidence; contribution receipts (type 313, `intellect.protocol.receipts`) travel on the
  receipt topic as they are. Each topic accepts exactly one payload type (`TOPIC_MESSAGE`).
- **The link frame** (220): `GossipFrame`, what two neighbours send each other on a gossip stream
  (`intellect.node.net.gossip`), length-prefixed with `FRAME_HEADER`.

Nothing here imports hivemind or torch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from intellect.protocol.codec import message

# Topics are named in `intellect.protocol.keys`.
from intellect.protocol.keys import TopicKind
from intellect.protocol.receipts import Receipt

# --------------------------------------------------------------------------------------------------------
# Gossip payloads (the body of a signed envelope)


@message(200, version=1, max_size=1024)
@dataclass(frozen=True)
class Progress:
    """A peer's training progress after a round (or periodically within one)."""

    round: int
    inner_step: int
    tokens: int
    loss: float
    tokens_per_s: float
    #: Hex state hash of the global weights the peer holds (empty when unknown).
    state_hash: str = ""


@message(201, version=1, max_size=1024)
@dataclass(frozen=True)
class CheckpointAnnounce:
    """A peer holds the global state of `round` with Merkle root `state_hash` and can serve it."""

    round: int
    state_hash: str
    num_bytes: int
    chunk_size: int


@message(202, version=1, max_size=512)
@dataclass(frozen=True)
class Leaving:
    """A peer is leaving the run (graceful shutdown); others can drop it from groups at once."""

    round: int
    reason: str = ""


@message(203, version=1, max_size=64 * 1024)
@dataclass(frozen=True)
class Misbehaviour:
    """Evidence that `accused` misbehaved, checkable from the accused's own signature.

    The one `kind` a node sends today is ``"bad-chunk"``: `evidence` is an encoded `BadChunkEvidence`
    (the accused's signature over a wrong chunk digest), which any holder of that state can check
    (`intellect.protocol.vouching.judge_report`)."""

    accused: str
    round: int
    kind: str
    evidence: bytes = b""


#: Which payload type each topic carries; anything else on a topic is rejected as malformed.
TOPIC_MESSAGE: dict[TopicKind, type] = {
    TopicKind.PROGRESS: Progress,
    TopicKind.CHECKPOINT: CheckpointAnnounce,
    TopicKind.LEAVING: Leaving,
    TopicKind.MISBEHAVIOUR: Misbehaviour,
    TopicKind.RECEIPT: Receipt,
}

#: Largest signed envelope we publish or accept on gossip (payload maximum plus envelope overhead).
MAX_GOSSIP_DATA = 80 * 1024
#: Largest group whose receipt is gossiped (at most 144 bytes a member: about 38 KB, inside
#: MAX_GOSSIP_DATA); the receipt of a larger group is stored in the DHT only.
MAX_GOSSIP_RECEIPT_MEMBERS = 256


# --------------------------------------------------------------------------------------------------------
# The wire frame of a gossip link (protocol `intellect-node/v1/gossip/<run id>`)


@message(220, version=1, max_size=MAX_GOSSIP_DATA + 256)
@dataclass(frozen=True)
class GossipFrame:
    """One message on a gossip link: the topic kind (a `TopicKind` value) and the signed envelope.

    The envelope carries everything that is checked (author, run, sequence number, timestamp,
    signature); the frame only says which topic it was published on, and the topic must match the
    payload type (`TOPIC_MESSAGE`). Type id 220 was `BridgeHello` of the gossip child process, which is
    gone; the two never meet on one wire (the bridge was a private socket pair)."""

    topic: str
    data: bytes


# Framing of a gossip link: 4-byte big-endian length, then one codec-encoded `GossipFrame`.

FRAME_HEADER = struct.Struct(">I")
#: Largest frame on a gossip link; a bigger length prefix is a broken or hostile peer, and the link closes.
MAX_FRAME = MAX_GOSSIP_DATA + 1024


def frame(data: bytes) -> bytes:
    """Length-prefix one encoded message for a gossip link."""
    if len(data) > MAX_FRAME:
        raise ValueError(f"gossip frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return FRAME_HEADER.pack(len(data)) + data
