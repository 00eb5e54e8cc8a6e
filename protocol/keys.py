"""Names in shared namespaces: the DHT keys and the gossip topics a node reads and writes.

Every node of every run must build the same names, so they are defined once, here (pure strings; no
hivemind). hivemind hashes each DHT key into a DHTID; a subkey makes a key a dictionary:

    RUNS_KEY = "intellect/runs"                               subkey run_id   → signed manifest
    members_key(run_id)   intellect/run/<run_id>/members      subkey peer id  → signed membership record
    control_key(run_id)   intellect/run/<run_id>/control      subkey signer   → researcher's control record
    receipts_key(run_id, round)  intellect/run/<run_id>/receipts/<round>
                                                              subkey group id (hex) → contribution receipt
    lobby_key(...)        intellect/<run_id>/avg/<round>/b<bucket>/<schema hash>
                                                              subkey peer id  → signed group record

Gossip topics are `intellect/<run_id>/<kind>`, one per `TopicKind`; which payload each topic carries is
`intellect.protocol.gossip_messages.TOPIC_MESSAGE`.
"""

from __future__ import annotations

import enum

#: DHT key of the dictionary of all runs' signed manifests (subkey: run_id).
RUNS_KEY = "intellect/runs"
#: First component of every gossip topic name.
TOPIC_PREFIX = "intellect"


def members_key(run_id: str) -> str:
    """DHT key of a run's membership dictionary (subkey: peer ID)."""
    return f"intellect/run/{run_id}/members"


def control_key(run_id: str) -> str:
    """DHT key of a run's control records (`intellect.protocol.control`; subkey: the signer's peer ID)."""
    return f"intellect/run/{run_id}/control"


def receipts_key(run_id: str, round: int) -> str:
    """DHT key of the contribution receipts of one round of a run (`intellect.protocol.receipts`; subkey:
    the hex group ID of the all-reduce the receipt is of)."""
    return f"intellect/run/{run_id}/receipts/{round}"


def lobby_key(run_id: str, round: int, bucket: int, schema: str) -> str:
    """The DHT key where peers of one (run, round, lobby bucket, tensor schema) meet to form averaging
    groups (heartbeats and leaders' declarations; `intellect.protocol.matchmaking`). No attempt number:
    a peer whose attempt failed comes back to the same lobby."""
    return f"intellect/{run_id}/avg/{round}/b{bucket}/{schema}"


class TopicKind(enum.StrEnum):
    """The gossip topics of a run; the topic name is `intellect/<run_id>/<kind>`."""

    PROGRESS = "progress"
    CHECKPOINT = "checkpoint"
    LEAVING = "leaving"
    MISBEHAVIOUR = "misbehaviour"
    #: Complete contribution receipts of the groups a member averaged in (`protocol.receipts.Receipt`).
    RECEIPT = "receipt"


def topic_name(run_id: str, kind: TopicKind | str) -> str:
    """The gossipsub topic of `kind` in run `run_id`."""
    return f"{TOPIC_PREFIX}/{run_id}/{TopicKind(kind).value}"


def parse_topic(topic: str) -> tuple[str, TopicKind]:
    """Split a topic name into (run_id, kind); ValueError when it is not one of ours."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != TOPIC_PREFIX or not parts[1]:
        raise ValueError(f"not an intellect gossip topic: {topic!r}")
    return parts[1], TopicKind(parts[2])
