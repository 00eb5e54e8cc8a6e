"""Gossip messages (type ids 200–299): what peers announce to each other, and the parent–child bridge.

Two families live here, both plain frozen dataclasses registered with the codec:

- **Gossip payloads** (200–219): the bodies of signed envelopes published on a run's topics
  (`intellect.protocol.keys.topic_name`): progress, checkpoint/state announcements, leaving notices and
  misbehaviour evidence. Each topic accepts exactly one payload type (`TOPIC_MESSAGE`).
- **Bridge frames** (220–239): what the daemon (asyncio, hivemind) and its gossip child process
  (trio, py-libp2p) say to each other over their private socket pair. They never leave the machine.

Nothing here imports hivemind, py-libp2p or torch: both processes import this module.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from intellect.protocol.codec import message

# Topics are named in `intellect.protocol.keys`.
from intellect.protocol.keys import TopicKind

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
}

#: Largest signed envelope we publish or accept on gossip (payload maximum plus envelope overhead).
MAX_GOSSIP_DATA = 80 * 1024


# --------------------------------------------------------------------------------------------------------
# Bridge frames between the daemon (parent) and the gossip child


@message(220, version=1, max_size=64 * 1024)
@dataclass(frozen=True)
class BridgeHello:
    """child -> parent: the host listens and is subscribed to the run's topics (readiness)."""

    peer_id: str
    listen_maddrs: tuple[str, ...]
    pid: int


@message(221, version=1, max_size=MAX_GOSSIP_DATA + 1024)
@dataclass(frozen=True)
class BridgePublish:
    """parent -> child: publish `data` (a signed envelope, sealed by the parent) on `topic`."""

    topic: str
    data: bytes


@message(222, version=1, max_size=MAX_GOSSIP_DATA + 1024)
@dataclass(frozen=True)
class BridgeDeliver:
    """child -> parent: a message that passed every check; `body` is the codec-encoded payload."""

    topic: str
    sender: str
    seq: int
    ts: float
    #: The neighbour that handed the message to us (not necessarily its author).
    forwarder: str
    body: bytes


@message(223, version=1, max_size=4096)
@dataclass(frozen=True)
class BridgeReject:
    """child -> parent: a message failed validation and was neither delivered nor forwarded."""

    topic: str
    #: The neighbour that handed it to us: the only identity the transport authenticates.
    forwarder: str
    #: The author the message claims (may be forged; empty when it could not be read).
    claimed_sender: str
    #: A `RejectReason` value (e.g. "forged_signature").
    reason: str


@message(224, version=1, max_size=256 * 1024)
@dataclass(frozen=True)
class BridgeAddPeers:
    """parent -> child: dial these gossip multiaddrs (`…/p2p/12D3KooW…`), e.g. from DHT membership."""

    maddrs: tuple[str, ...]


@message(225, version=1, max_size=256)
@dataclass(frozen=True)
class BridgeAdmitQuery:
    """child -> parent: is `peer_id` admitted to the run? (the parent owns the admission policy)."""

    peer_id: str


@message(226, version=1, max_size=256)
@dataclass(frozen=True)
class BridgeAdmitReply:
    """parent -> child: the answer to a BridgeAdmitQuery."""

    peer_id: str
    admitted: bool


@message(227, version=1, max_size=64)
@dataclass(frozen=True)
class BridgeStop:
    """parent -> child: shut down gracefully (close the host, exit 0)."""

    reason: str = ""


@message(228, version=1, max_size=256 * 1024)
@dataclass(frozen=True)
class BridgeStatus:
    """child -> parent, every second: connected gossip peers and the mesh size of each topic."""

    peers: tuple[str, ...]
    mesh_sizes: tuple[int, ...]


@message(229, version=1, max_size=256)
@dataclass(frozen=True)
class BridgeBlacklist:
    """parent -> child: stop talking to `peer_id` (its score fell below the threshold)."""

    peer_id: str


# --------------------------------------------------------------------------------------------------------
# Framing of the bridge socket: 4-byte big-endian length, then one codec-encoded message.

FRAME_HEADER = struct.Struct(">I")
#: Largest bridge frame; a bigger length prefix means a broken peer process, and the bridge is closed.
MAX_FRAME = 512 * 1024


def frame(data: bytes) -> bytes:
    """Length-prefix one encoded message for the bridge socket."""
    if len(data) > MAX_FRAME:
        raise ValueError(f"bridge frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return FRAME_HEADER.pack(len(data)) + data
