"""State-sync wire messages (type ids 350–399): announcements of the global state and chunked transfer.

After each outer step a peer announces ``(round, state_hash, chunk_size, total_bytes)`` where
``state_hash`` is the hex Merkle root over the sha256 digests of the ``chunk_size`` slices of the
deterministic safetensors serialisation of the global state (weights and outer optimizer state; see
``node/engine/statehash.py``). A `StateAnnounce` carries its own Ed25519 signature so it stays checkable
after it left the envelope it travelled in (gossip) or when it is read back from the DHT.

Transfer is request/response over one libp2p stream per request:

    ChunkListRequest  -> ChunkList        (the chunk digests; their Merkle root must equal the hash)
    ChunkRequest      -> ChunkResponse    (one chunk, signed by the server: transferable evidence)
    any request       -> SyncError        (the server does not have that state, or refused)

A `ChunkResponse` signs ``(run_id, state_hash, index, sha256(data))`` under `CHUNK_DOMAIN`, so a chunk whose
digest differs from the chunk list under a root the server itself announced is a self-contained proof of
misbehaviour (`BadChunkEvidence`) that any peer can check without trusting the reporter.

Nothing here imports torch or hivemind.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from intellect.crypto import domains
from intellect.crypto.identity import Identity, verify
from intellect.protocol.codec import message, packb_canonical

#: Signature domain of a served chunk (kept here, next to the only message that uses it; it differs from
#: every tag in `intellect.crypto.domains`, so a chunk signature can never pass for anything else).
CHUNK_DOMAIN = b"intellect-node/v1/state-chunk"

#: Largest chunk a peer may announce or serve (16 MiB): bounds every allocation a request can cause.
MAX_CHUNK_SIZE = 16 << 20
#: Largest state we agree to download (1 TiB, i.e. 10B parameters with fp32 weights and momentum fits).
MAX_TOTAL_BYTES = 1 << 40
#: Longest chunk list a `ChunkList` may carry (with 1 MiB chunks: 256 GiB of state, 8 MiB of digests).
MAX_CHUNKS = 1 << 18
_HEX_HASH_LEN = 64


class SyncErrorCode(enum.IntEnum):
    """Why a server did not answer a request with data."""

    #: The server does not hold (or no longer holds) the requested state hash.
    UNKNOWN_STATE = 1
    #: The request was malformed or out of range (index beyond the chunk list, other run).
    BAD_REQUEST = 2
    #: The server is at its concurrency limit; try another peer.
    BUSY = 3
    #: The requester is not admitted to the run.
    NOT_ADMITTED = 4


def _check_hash(state_hash: str) -> None:
    if len(state_hash) != _HEX_HASH_LEN or any(c not in "0123456789abcdef" for c in state_hash):
        raise ValueError("state_hash must be 64 lowercase hex characters")


def expected_chunks(total_bytes: int, chunk_size: int) -> int:
    """Number of chunks a state of ``total_bytes`` has when cut into ``chunk_size`` slices."""
    return -(-total_bytes // chunk_size)


@message(350, version=1, max_size=1024)
@dataclass(frozen=True)
class StateAnnounce:
    """Peer `peer_id` holds the global state of `run_id` after outer step `round`, hashing to `state_hash`."""

    run_id: str
    peer_id: str
    round: int
    state_hash: str
    chunk_size: int
    total_bytes: int
    sig: bytes = b""

    def signed_bytes(self) -> bytes:
        """Canonical bytes covered by the signature (every field but `sig`)."""
        return packb_canonical(
            {
                "run_id": self.run_id,
                "peer_id": self.peer_id,
                "round": self.round,
                "state_hash": self.state_hash,
                "chunk_size": self.chunk_size,
                "total_bytes": self.total_bytes,
            }
        )

    def validate(self) -> None:
        """Raise ValueError when a field is out of range (sizes, hash shape); says nothing of the sig."""
        _check_hash(self.state_hash)
        if self.round < 0:
            raise ValueError("round must be >= 0")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        if not 0 < self.total_bytes <= MAX_TOTAL_BYTES:
            raise ValueError(f"total_bytes must be in 1..{MAX_TOTAL_BYTES}")
        if expected_chunks(self.total_bytes, self.chunk_size) > MAX_CHUNKS:
            raise ValueError("too many chunks for one state")

    def verify(self) -> bool:
        """True when the fields are in range and `sig` is `peer_id`'s signature of them."""
        try:
            self.validate()
        except ValueError:
            return False
        return verify(self.peer_id, domains.STATE_ANNOUNCE, self.signed_bytes(), self.sig)


def sign_announcement(
    identity: Identity, run_id: str, round: int, state_hash: str, chunk_size: int, total_bytes: int
) -> StateAnnounce:
    """A `StateAnnounce` for `identity`, signed under `domains.STATE_ANNOUNCE`."""
    unsigned = StateAnnounce(run_id, identity.peer_id, round, state_hash, chunk_size, total_bytes)
    unsigned.validate()
    sig = identity.sign(domains.STATE_ANNOUNCE, unsigned.signed_bytes())
    return StateAnnounce(run_id, identity.peer_id, round, state_hash, chunk_size, total_bytes, sig)


@message(351, version=1, max_size=512)
@dataclass(frozen=True)
class ChunkListRequest:
    """Ask a server for the chunk digests of the state `state_hash` of `run_id`."""

    run_id: str
    state_hash: str


@message(352, version=1, max_size=MAX_CHUNKS * 34 + 1024)
@dataclass(frozen=True)
class ChunkList:
    """The sha256 digest of every chunk of a state, in order; their Merkle root is `state_hash`."""

    state_hash: str
    round: int
    chunk_size: int
    total_bytes: int
    hashes: tuple[bytes, ...]


@message(353, version=1, max_size=512)
@dataclass(frozen=True)
class ChunkRequest:
    """Ask for chunk `index` of the state `state_hash` of `run_id`."""

    run_id: str
    state_hash: str
    index: int


def chunk_signed_bytes(run_id: str, state_hash: str, index: int, digest: bytes) -> bytes:
    """What a server signs for a chunk: it binds the data's sha256 to (run, state, index)."""
    return packb_canonical({"run_id": run_id, "state_hash": state_hash, "index": index, "digest": digest})


@message(354, version=1, max_size=MAX_CHUNK_SIZE + 1024)
@dataclass(frozen=True)
class ChunkResponse:
    """Chunk `index` of `state_hash`, with the server's signature over its sha256 digest."""

    state_hash: str
    index: int
    data: bytes
    sig: bytes


def sign_chunk(identity: Identity, run_id: str, state_hash: str, index: int, data: bytes) -> ChunkResponse:
    """A `ChunkResponse` for `data`, signed by the serving peer."""
    digest = hashlib.sha256(data).digest()
    sig = identity.sign(CHUNK_DOMAIN, chunk_signed_bytes(run_id, state_hash, index, digest))
    return ChunkResponse(state_hash, index, data, sig)


@message(355, version=1, max_size=1024)
@dataclass(frozen=True)
class SyncError:
    """A refusal; `code` is a `SyncErrorCode`, `detail` a short human-readable reason."""

    code: int
    detail: str


@message(356, version=1, max_size=1024)
@dataclass(frozen=True)
class BadChunkEvidence:
    """Proof that `server` signed chunk `index` of `state_hash` with a digest that is not the right one.

    Checkable by anyone holding the state's chunk list (whose Merkle root is `state_hash`, which the
    server itself announced): `check_evidence`.
    """

    run_id: str
    server: str
    state_hash: str
    index: int
    digest: bytes
    sig: bytes


def check_evidence(evidence: BadChunkEvidence, chunk_list: tuple[bytes, ...], root: bytes) -> bool:
    """True when `evidence` proves misbehaviour: valid signature and a digest that differs from the list.

    ``root`` is the Merkle root of ``chunk_list`` as computed by the caller (`merkle.merkle_root`); it must
    equal the evidence's state hash, so the list really is the announced state's.
    """
    if root.hex() != evidence.state_hash or not 0 <= evidence.index < len(chunk_list):
        return False
    if chunk_list[evidence.index] == evidence.digest:
        return False
    signed = chunk_signed_bytes(evidence.run_id, evidence.state_hash, evidence.index, evidence.digest)
    return verify(evidence.server, CHUNK_DOMAIN, signed, evidence.sig)
