"""Verified state sync: serve the global state in chunks, and let a newcomer or laggard download it.

The global state is the flat tensor dict of the DiLoCo outer optimizer (``OuterOptimizer.state_dict()``:
global weights, momentum buffers, step count). Its identity is ``statehash``'s Merkle root over the sha256
digests of the ``chunk_size`` slices of its deterministic safetensors serialisation.

Serving (`StateServer`): after each outer step the owner calls ``await server.publish(snapshot)``; the
state is serialised once (in a worker thread, so later in-place outer steps cannot tear it), its chunk
digests and root are computed, and a signed `StateAnnounce` comes back for gossip / the DHT record. The
last ``keep`` states stay servable so a download in flight survives the server's next round. Requests
arrive on a hivemind P2P binary stream handler, one request per stream, framed as
``u64 big-endian length || codec bytes`` with the length checked against a small bound before reading;
concurrency is bounded (excess requests get ``BUSY`` at once rather than queueing); malformed requests are
logged at debug, counted and dropped.

Fetching (`fetch_state`): `pick_target` chooses the (round, hash) that the most distinct peers vouch for
(ties: higher round). The chunk list is fetched from one of those peers and accepted only if its Merkle root
is the announced hash. Chunks are then downloaded from every vouching peer in parallel; each is checked
against its digest and the server's signature. A peer that serves a wrong chunk is dropped and recorded
in the `SyncReport` (with a `BadChunkEvidence` when its signature makes it transferable proof) and the
chunk goes back in the queue for another peer. The assembled blob is verified as a whole before it is
parsed (safetensors, no pickle) and handed back. If no honest peer can supply the state, `StateSyncError`
is raised and nothing is returned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity, verify
from intellect.node.engine import statehash
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.gossip_messages import CheckpointAnnounce, Misbehaviour
from intellect.protocol.records import MembershipRecord
from intellect.protocol.sync_messages import (
    CHUNK_DOMAIN,
    MAX_CHUNK_SIZE,
    MAX_TOTAL_BYTES,
    BadChunkEvidence,
    ChunkList,
    ChunkListRequest,
    ChunkRequest,
    ChunkResponse,
    StateAnnounce,
    SyncError,
    SyncErrorCode,
    check_evidence,
    chunk_signed_bytes,
    expected_chunks,
    sign_announcement,
    sign_chunk,
)

log = logging.getLogger(__name__)

#: libp2p protocol name of the state-sync handler (one per node; the run is named in every request).
HANDLER_NAME = "intellect-node/v1/state-sync"
#: Longest request frame a server reads (requests are a run id, a hash and an index).
MAX_REQUEST_BYTES = 1024
#: Longest response frame a client reads: a chunk list of `MAX_CHUNKS` digests or one maximal chunk.
MAX_RESPONSE_BYTES = MAX_CHUNK_SIZE + (1 << 20)
_HEADER_LEN = 8


class StateSyncError(RuntimeError):
    """The state could not be obtained from any honest peer; nothing was applied."""


@dataclass(frozen=True)
class StateSnapshot:
    """The global state after outer step `round` (`tensors` as ``OuterOptimizer.state_dict()``)."""

    round: int
    state_hash: str
    tensors: Mapping[str, torch.Tensor]


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


@dataclass
class SyncReport:
    """What happened during one `fetch_state` (for logs, status and peer scoring)."""

    target: SyncTarget | None = None
    #: Bytes of verified chunk data received from each peer.
    bytes_from: dict[str, int] = field(default_factory=dict)
    #: Peers that served a wrong chunk list or chunk, with the reason; they were dropped.
    bad_peers: dict[str, str] = field(default_factory=dict)
    #: Transferable proofs against peers in `bad_peers` (their own signature over a wrong digest).
    evidence: list[BadChunkEvidence] = field(default_factory=list)
    #: Peers dropped for transport failures or refusals (not misbehaviour).
    unavailable: dict[str, str] = field(default_factory=dict)
    #: Chunks fetched again after a failure or a bad chunk.
    refetched: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- framing


async def _write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(_HEADER_LEN, "big"))
    writer.write(payload)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One length-prefixed frame; the length is checked before a byte of the body is read."""
    length = int.from_bytes(await reader.readexactly(_HEADER_LEN), "big")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return await reader.readexactly(length)


# ---------------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _Prepared:
    """A state serialised once: immutable bytes plus their chunk digests and root."""

    round: int
    state_hash: str
    blob: bytes
    chunk_size: int
    hashes: tuple[bytes, ...]


def _prepare(snapshot: StateSnapshot, chunk_size: int) -> _Prepared:
    blob = statehash.serialize_state(snapshot.tensors)
    hashes = tuple(statehash.chunk_hashes(blob, chunk_size))
    root = statehash.merkle_root(hashes).hex()
    if root != snapshot.state_hash:
        raise ValueError(f"snapshot of round {snapshot.round} claims hash {snapshot.state_hash}, is {root}")
    return _Prepared(snapshot.round, root, blob, chunk_size, hashes)


@dataclass
class ServerStats:
    """Counters of a `StateServer` (exported by the daemon's status)."""

    chunk_lists: int = 0
    chunks: int = 0
    bytes_sent: int = 0
    busy: int = 0
    malformed: int = 0
    unknown_state: int = 0
    not_admitted: int = 0


class StateServer:
    """Serves the last `keep` published global states to peers through hivemind P2P."""

    def __init__(
        self,
        p2p: P2P,
        identity: Identity,
        run_id: str,
        *,
        provider: Callable[[], StateSnapshot | None] | None = None,
        chunk_size: int = statehash.CHUNK_SIZE,
        keep: int = 2,
        max_concurrent: int = 8,
        admitted: Callable[[str], bool] | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        if keep < 1 or max_concurrent < 1:
            raise ValueError("keep and max_concurrent must be >= 1")
        self.p2p = p2p
        self.identity = identity
        self.run_id = run_id
        self.chunk_size = chunk_size
        self.stats = ServerStats()
        self._provider = provider
        self._keep = keep
        self._admitted = admitted
        self._request_timeout = request_timeout
        self._states: collections.OrderedDict[str, _Prepared] = collections.OrderedDict()
        self._slots = max_concurrent
        self._active = 0
        self._started = False

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(HANDLER_NAME, self._handle)
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.p2p.remove_binary_stream_handler(HANDLER_NAME)

    async def __aenter__(self) -> StateServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def publish(self, snapshot: StateSnapshot) -> StateAnnounce:
        """Serialise `snapshot` now, make it servable, and return its signed announcement.

        Await this before the next outer step mutates the tensors in place: the bytes are taken here.
        """
        prepared = self._states.get(snapshot.state_hash)
        if prepared is None:
            prepared = await asyncio.to_thread(_prepare, snapshot, self.chunk_size)
            self._remember(prepared)
        return sign_announcement(
            self.identity, self.run_id, prepared.round, prepared.state_hash, self.chunk_size,
            len(prepared.blob),
        )

    def chunk_list(self, state_hash: str) -> tuple[bytes, ...] | None:
        """The chunk digests of a state we serve (its Merkle root is `state_hash`), or None."""
        prepared = self._states.get(state_hash)
        return None if prepared is None else prepared.hashes

    def _remember(self, prepared: _Prepared) -> None:
        self._states[prepared.state_hash] = prepared
        self._states.move_to_end(prepared.state_hash)
        while len(self._states) > self._keep:
            self._states.popitem(last=False)

    async def _lookup(self, state_hash: str) -> _Prepared | None:
        prepared = self._states.get(state_hash)
        if prepared is None and self._provider is not None:
            snapshot = self._provider()
            if snapshot is not None and snapshot.state_hash == state_hash:
                await self.publish(snapshot)
                prepared = self._states.get(state_hash)
        return prepared

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        try:
            if self._active >= self._slots:
                # Refuse at once: a queue here would let a slow or hostile peer hold every requester up.
                self.stats.busy += 1
                await _write_frame(writer, encode(SyncError(int(SyncErrorCode.BUSY), "busy")))
                return
            self._active += 1
            try:
                async with asyncio.timeout(self._request_timeout):
                    await self._serve_one(peer, reader, writer)
            finally:
                self._active -= 1
        except (ProtocolError, asyncio.IncompleteReadError, ValueError) as e:
            self.stats.malformed += 1
            log.debug("dropped malformed state-sync request from %s: %s", peer, e)
        except (TimeoutError, ConnectionError) as e:
            log.debug("state-sync stream with %s ended early: %s", peer, e)
        finally:
            writer.close()

    async def _serve_one(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = decode(await _read_frame(reader, MAX_REQUEST_BYTES))
        if self._admitted is not None and not self._admitted(peer):
            self.stats.not_admitted += 1
            await _write_frame(writer, encode(SyncError(int(SyncErrorCode.NOT_ADMITTED), "not admitted")))
            return
        if not isinstance(request, ChunkListRequest | ChunkRequest) or request.run_id != self.run_id:
            raise ProtocolError(f"unexpected request {type(request).__name__} for this handler/run")
        prepared = await self._lookup(request.state_hash)
        if prepared is None:
            self.stats.unknown_state += 1
            await _write_frame(writer, encode(SyncError(int(SyncErrorCode.UNKNOWN_STATE), "unknown state")))
            return
        if isinstance(request, ChunkListRequest):
            self.stats.chunk_lists += 1
            reply = encode(
                ChunkList(
                    prepared.state_hash, prepared.round, prepared.chunk_size, len(prepared.blob),
                    prepared.hashes,
                )
            )
            await _write_frame(writer, reply)
            return
        if not 0 <= request.index < len(prepared.hashes):
            raise ProtocolError(f"chunk index {request.index} out of range")
        start = request.index * prepared.chunk_size
        data = self._chunk_bytes(prepared, request.index, prepared.blob[start : start + prepared.chunk_size])
        response = self._sign_chunk(prepared, request.index, data)
        await _write_frame(writer, encode(response))
        self.stats.chunks += 1
        self.stats.bytes_sent += len(data)

    # Two seams for fault-injection tests (a subclass that corrupts what it serves); honest by default.
    def _chunk_bytes(self, prepared: _Prepared, index: int, data: bytes) -> bytes:
        return data

    def _sign_chunk(self, prepared: _Prepared, index: int, data: bytes) -> ChunkResponse:
        return sign_chunk(self.identity, self.run_id, prepared.state_hash, index, data)


# ---------------------------------------------------------------------------------------------- client


class _PeerFailed(Exception):
    """A request to one peer failed; `bad` when the peer misbehaved rather than being unavailable."""

    def __init__(
        self,
        reason: str,
        bad: bool = False,
        evidence: BadChunkEvidence | None = None,
        fatal: bool = False,
        busy: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad = bad
        self.evidence = evidence
        #: Asking this peer again is pointless (it no longer holds the state, or refuses us).
        self.fatal = fatal or bad
        #: The peer is at its concurrency limit: back off and retry.
        self.busy = busy


async def _request(p2p: P2P, peer: str, request: ChunkListRequest | ChunkRequest, timeout: float) -> object:
    """One request on a fresh stream; returns the decoded reply (any registered message)."""
    try:
        async with asyncio.timeout(timeout):
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), HANDLER_NAME)
            try:
                await _write_frame(writer, encode(request))
                return decode(await _read_frame(reader, MAX_RESPONSE_BYTES))
            finally:
                writer.close()
    except TimeoutError:
        raise _PeerFailed(f"no reply within {timeout:.1f}s") from None
    except ProtocolError as e:
        raise _PeerFailed(f"malformed reply: {e}", bad=True) from None
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise _PeerFailed(f"transport: {type(e).__name__}: {e}") from None
    except Exception as e:  # hivemind's p2pd client raises its own error types for unreachable peers
        if type(e).__module__.startswith("hivemind"):
            raise _PeerFailed(f"p2p: {type(e).__name__}: {e}") from None
        raise


def _refusal(reply: object) -> _PeerFailed | None:
    if isinstance(reply, SyncError):
        try:
            code = SyncErrorCode(reply.code)
        except ValueError:
            return _PeerFailed(f"refused with unknown code {reply.code}", fatal=True)
        busy = code is SyncErrorCode.BUSY
        return _PeerFailed(f"refused: {code.name} {reply.detail[:80]!r}", fatal=not busy, busy=busy)
    return None


async def _fetch_chunk_list(
    p2p: P2P, target: SyncTarget, run_id: str, peer: str, timeout: float, max_bytes: int
) -> ChunkList:
    reply = await _request(p2p, peer, ChunkListRequest(run_id, target.state_hash), timeout)
    refusal = _refusal(reply)
    if refusal is not None:
        raise refusal
    if not isinstance(reply, ChunkList):
        raise _PeerFailed(f"answered a chunk-list request with {type(reply).__name__}", bad=True)
    hinted = target.chunk_size > 0
    if (
        reply.state_hash != target.state_hash
        or not 0 < reply.chunk_size <= MAX_CHUNK_SIZE
        or not 0 < reply.total_bytes <= max_bytes
        or (hinted and (reply.chunk_size, reply.total_bytes) != (target.chunk_size, target.total_bytes))
        or len(reply.hashes) != expected_chunks(reply.total_bytes, reply.chunk_size)
        or statehash.merkle_root(reply.hashes).hex() != target.state_hash
    ):
        raise _PeerFailed("chunk list does not hash to the announced state (or exceeds its limits)", bad=True)
    return reply


async def _fetch_chunk(
    p2p: P2P,
    target: SyncTarget,
    run_id: str,
    hashes: tuple[bytes, ...],
    peer: str,
    index: int,
    timeout: float,
) -> bytes:
    reply = await _request(p2p, peer, ChunkRequest(run_id, target.state_hash, index), timeout)
    refusal = _refusal(reply)
    if refusal is not None:
        raise refusal
    if not isinstance(reply, ChunkResponse) or reply.index != index or reply.state_hash != target.state_hash:
        raise _PeerFailed("answered a chunk request with something else", bad=True)
    digest = hashlib.sha256(reply.data).digest()
    signed = chunk_signed_bytes(run_id, target.state_hash, index, digest)
    signed_ok = verify(peer, CHUNK_DOMAIN, signed, reply.sig)
    if digest != hashes[index]:
        evidence = None
        if signed_ok:
            evidence = BadChunkEvidence(run_id, peer, target.state_hash, index, digest, reply.sig)
        raise _PeerFailed(f"chunk {index} fails its hash", bad=True, evidence=evidence)
    if not signed_ok:
        raise _PeerFailed(f"chunk {index} carries a bad signature", bad=True)
    return reply.data


async def fetch_state(
    p2p: P2P,
    vouches: Iterable[Vouch | StateAnnounce],
    run_id: str,
    *,
    target: SyncTarget | None = None,
    exclude: Iterable[str] = (),
    max_bytes: int = MAX_TOTAL_BYTES,
    streams_per_peer: int = 2,
    request_timeout: float = 30.0,
    timeout: float = 600.0,
    max_transient_failures: int = 2,
    report: SyncReport | None = None,
) -> StateSnapshot:
    """Download and verify the state most peers vouch for (or `target`); raise `StateSyncError` if impossible.

    `vouches` are authenticated claims (`Vouch.from_*`) or self-signed `StateAnnounce`s. `exclude` lists
    peers not to ask (ourselves, peers already known to be bad); `max_bytes` bounds the state we agree to
    hold in memory. `report`, when given, is filled with per-peer bytes, dropped peers and evidence, also
    when the sync fails. Nothing unverified is ever returned.
    """
    report = report if report is not None else SyncReport()
    started = time.monotonic()
    if target is None:
        target = pick_target(vouches, run_id)
    if target is None:
        raise StateSyncError("no valid state announcement to sync from")
    report.target = target
    excluded = set(exclude)
    peers = [p for p in target.peers if p not in excluded]
    random.shuffle(peers)  # spread the chunk-list load; the result is verified either way
    log.info(
        "syncing state of round %d (%s…) from %d peers", target.round, target.state_hash[:12], len(peers)
    )

    def drop(peer: str, failure: _PeerFailed) -> None:
        if failure.bad:
            if peer not in report.bad_peers:
                log.warning("dropping state server %s: %s", peer, failure.reason)
            report.bad_peers.setdefault(peer, failure.reason)
            if failure.evidence is not None:
                report.evidence.append(failure.evidence)
        else:
            log.info("state server %s unavailable: %s", peer, failure.reason)
            report.unavailable.setdefault(peer, failure.reason)

    blob: bytes | None = None
    chunk_list: ChunkList | None = None
    try:
        async with asyncio.timeout(timeout):
            for list_peer in peers:
                if list_peer in report.bad_peers or list_peer in report.unavailable:
                    continue
                try:
                    chunk_list = await _fetch_chunk_list(
                        p2p, target, run_id, list_peer, request_timeout, max_bytes
                    )
                except _PeerFailed as failure:
                    if failure.fatal:
                        drop(list_peer, failure)
                    elif not failure.busy:  # gone or not answering: say so, the caller stops counting on it
                        report.unavailable.setdefault(list_peer, failure.reason)
                    continue
                blob = await _download(
                    p2p, target, run_id, chunk_list.hashes, peers, report, drop,
                    streams_per_peer, request_timeout, max_transient_failures,
                )
                # Every chunk matched its digest, so the digests (under the announced root) are right;
                # only the list's claimed chunking can still be wrong. Checking the whole catches it (and
                # any assembly bug): then the list's provider lied, not the chunk servers.
                whole = await asyncio.to_thread(statehash.blob_state_hash, blob, chunk_list.chunk_size)
                if len(blob) == chunk_list.total_bytes and whole == target.state_hash:
                    break
                drop(list_peer, _PeerFailed("chunk list misstates the chunk size or length", bad=True))
                blob = None
    except TimeoutError:
        raise StateSyncError(f"state sync did not finish within {timeout:.0f}s") from None
    finally:
        report.seconds = time.monotonic() - started
    if blob is None:
        raise StateSyncError(
            "no peer supplied a chunk list matching the announced state "
            f"(bad: {sorted(report.bad_peers)}, unavailable: {sorted(report.unavailable)})"
        )
    try:
        tensors = await asyncio.to_thread(statehash.deserialize_state, blob)
    except Exception as e:  # safetensors raises its own error types on a malformed header
        raise StateSyncError(f"verified state does not parse as safetensors: {e}") from e
    report.seconds = time.monotonic() - started
    log.info(
        "state of round %d synced in %.2fs from %d peers (%d bad, %d refetched)",
        target.round, report.seconds, len(report.bytes_from), len(report.bad_peers), report.refetched,
    )
    return StateSnapshot(target.round, target.state_hash, tensors)


async def _download(
    p2p: P2P,
    target: SyncTarget,
    run_id: str,
    hashes: tuple[bytes, ...],
    peers: list[str],
    report: SyncReport,
    drop: Callable[[str, _PeerFailed], None],
    streams_per_peer: int,
    request_timeout: float,
    max_transient_failures: int,
) -> bytes:
    """Fetch every chunk from `peers` in parallel, re-queueing a chunk whenever a peer fails on it."""
    n = len(hashes)
    chunks: list[bytes | None] = [None] * n
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    remaining = n
    done = asyncio.Event()
    if n == 0:
        done.set()
    dead: set[str] = set(report.bad_peers) | set(report.unavailable)
    failures: collections.Counter[str] = collections.Counter()

    async def worker(peer: str) -> None:
        nonlocal remaining
        while peer not in dead and not done.is_set():
            index = await queue.get()
            if chunks[index] is not None:
                continue
            if peer in dead:  # another stream of this peer got it dropped while we waited
                queue.put_nowait(index)
                return
            try:
                data = await _fetch_chunk(p2p, target, run_id, hashes, peer, index, request_timeout)
            except _PeerFailed as failure:
                queue.put_nowait(index)
                report.refetched += 1
                if failure.busy:
                    await asyncio.sleep(random.uniform(0.05, 0.25))
                    continue
                failures[peer] += 1
                if failure.fatal or failures[peer] >= max_transient_failures:
                    dead.add(peer)
                    drop(peer, failure)
                continue
            failures[peer] = 0
            if chunks[index] is None:
                chunks[index] = data
                report.bytes_from[peer] = report.bytes_from.get(peer, 0) + len(data)
                remaining -= 1
                if remaining == 0:
                    done.set()

    workers = [
        asyncio.create_task(worker(peer), name=f"statesync-{peer[-6:]}-{k}")
        for peer in peers
        if peer not in dead
        for k in range(streams_per_peer)
    ]
    waiter = asyncio.create_task(done.wait())
    try:
        pending: set[asyncio.Task[Any]] = {*workers, waiter}
        while not done.is_set():
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if task is not waiter and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if not done.is_set() and pending == {waiter}:
                raise StateSyncError(
                    f"{remaining} of {n} chunks could not be obtained from an honest peer "
                    f"(bad: {sorted(report.bad_peers)}, unavailable: {sorted(report.unavailable)})"
                )
    finally:
        for task in (*workers, waiter):
            task.cancel()
        for task in (*workers, waiter):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return b"".join(c for c in chunks if c is not None)


#: `Misbehaviour.kind` of a gossiped `BadChunkEvidence`.
BAD_CHUNK = "bad-chunk"


def bad_chunk_report(evidence: BadChunkEvidence, round_: int) -> Misbehaviour:
    """The gossip message that tells the run about `evidence` (the accused server's own signature)."""
    return Misbehaviour(accused=evidence.server, round=round_, kind=BAD_CHUNK, evidence=encode(evidence))


def judge_report(
    report: Misbehaviour, run_id: str, chunk_list: Callable[[str], Iterable[bytes] | None]
) -> bool | None:
    """Whether a gossiped misbehaviour report proves what it says, checked without trusting the reporter.

    True: the accused signed a chunk digest that is not the one in the state's chunk list.
    False: the report is malformed, about another run or another peer, or its evidence does not hold.
    None: we hold no copy of that state (`chunk_list(state_hash)` is None), so cannot check it.
    """
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
    return check_evidence(evidence, hashes, statehash.merkle_root(hashes))
