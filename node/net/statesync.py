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

Fetching (`fetch_state`): `pick_target` (`intellect.protocol.vouching`, with the other pure rules of
sync) chooses the (round, hash) that the most distinct peers vouch for (ties: higher round). The chunk
list is fetched from one of those peers and accepted only if its Merkle root is the announced hash. Chunks
are then downloaded from every vouching peer in parallel; each is checked against its digest and the
server's signature. A peer that serves a wrong chunk is dropped and recorded in the `SyncReport` (with a
`BadChunkEvidence` when its signature makes it transferable proof) and the chunk goes back in the queue
for another peer; how a request failed (`ServerFault`) decides whether a server is dropped as bad, as
unavailable, or asked again. The assembled blob is verified as a whole before it is parsed (safetensors,
no pickle) and handed back. If no honest peer can supply the state, `StateSyncError` is raised and
nothing is returned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
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
from intellect.node.net import shaping
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.merkle import merkle_root
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
    chunk_signed_bytes,
    expected_chunks,
    sign_announcement,
    sign_chunk,
)
from intellect.protocol.vouching import SyncTarget, Vouch, pick_target

log = logging.getLogger(__name__)

#: libp2p protocol name of the state-sync handler (one per node; the run is named in every request).
HANDLER_NAME = "intellect-node/v1/state-sync"
#: Longest request frame a server reads (requests are a run id, a hash and an index).
MAX_REQUEST_BYTES = 1024
#: Seconds a chunk-list request may go unanswered before the next holder is asked as well.
HEDGE_S = 1.0
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
    #: The same state already serialised and hashed (a commit's), used instead of serialising it again.
    serialized: statehash.SerializedState | None = None


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
    await shaping.current().send(_HEADER_LEN + len(payload))  # the volunteer's upload limit
    writer.write(len(payload).to_bytes(_HEADER_LEN, "big"))
    writer.write(payload)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """One length-prefixed frame; the length is checked before a byte of the body is read."""
    length = int.from_bytes(await reader.readexactly(_HEADER_LEN), "big")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    body = await reader.readexactly(length)
    await shaping.current().recv(_HEADER_LEN + length)  # the volunteer's download limit
    return body


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
    done = snapshot.serialized
    if done is None or done.chunk_size != chunk_size:
        done = statehash.serialize_and_hash(snapshot.tensors, chunk_size)
    if done.root != snapshot.state_hash:
        claimed = snapshot.state_hash
        raise ValueError(f"snapshot of round {snapshot.round} claims hash {claimed}, is {done.root}")
    return _Prepared(snapshot.round, done.root, done.blob, chunk_size, done.hashes)


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
            self.identity,
            self.run_id,
            prepared.round,
            prepared.state_hash,
            self.chunk_size,
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
                # Read the request first: bytes arriving after we closed make the p2p daemon reset the
                # stream, which can lose our answer, and the requester would take BUSY for a dead peer.
                async with asyncio.timeout(self._request_timeout):
                    await _read_frame(reader, MAX_REQUEST_BYTES)
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
                    prepared.state_hash,
                    prepared.round,
                    prepared.chunk_size,
                    len(prepared.blob),
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


class ServerFault(enum.StrEnum):
    """How one request to a state server failed; it decides what becomes of that server in the sync."""

    #: No reply within the request timeout (transient: the server is retried, up to a limit).
    TIMEOUT = "timeout"
    #: The stream failed: refused, reset, or hivemind's p2p daemon could not reach the peer (transient).
    TRANSPORT = "transport"
    #: The server is at its concurrency limit (back off and retry; never counted against it).
    BUSY = "busy"
    #: The server refused: it no longer holds the state, does not admit us, or sent an unknown code.
    REFUSED = "refused"
    #: The reply does not decode as one of our messages (misbehaviour).
    MALFORMED_REPLY = "malformed-reply"
    #: A well-formed reply of the wrong type, or for another state or chunk (misbehaviour).
    UNEXPECTED_REPLY = "unexpected-reply"
    #: A chunk list that does not hash to the announced state, or exceeds its limits (misbehaviour).
    BAD_CHUNK_LIST = "bad-chunk-list"
    #: A chunk whose digest is not the chunk list's (misbehaviour; evidence when its signature holds).
    BAD_CHUNK = "bad-chunk"
    #: A chunk whose signature does not verify (misbehaviour).
    BAD_SIGNATURE = "bad-signature"
    #: A chunk list whose chunk size or length is not the state's, found once all its chunks matched.
    MISSTATED_CHUNKING = "misstated-chunking"

    @property
    def misbehaviour(self) -> bool:
        """The server lied or broke the protocol (rather than being unavailable)."""
        transient = (ServerFault.TIMEOUT, ServerFault.TRANSPORT, ServerFault.BUSY, ServerFault.REFUSED)
        return self not in transient


class _PeerFailed(Exception):
    """A request to one peer failed: `fault` says how, `reason` says it for logs and the `SyncReport`."""

    def __init__(self, fault: ServerFault, reason: str, evidence: BadChunkEvidence | None = None) -> None:
        super().__init__(reason)
        self.fault = fault
        self.reason = reason
        self.evidence = evidence
        #: The peer misbehaved rather than being unavailable: it goes in `SyncReport.bad_peers`.
        self.bad = fault.misbehaviour
        #: Asking this peer again is pointless (it no longer holds the state, refuses us, or lied).
        self.fatal = self.bad or fault is ServerFault.REFUSED
        #: The peer is at its concurrency limit: back off and retry.
        self.busy = fault is ServerFault.BUSY


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
        raise _PeerFailed(ServerFault.TIMEOUT, f"no reply within {timeout:.1f}s") from None
    except ProtocolError as e:
        raise _PeerFailed(ServerFault.MALFORMED_REPLY, f"malformed reply: {e}") from None
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise _PeerFailed(ServerFault.TRANSPORT, f"transport: {type(e).__name__}: {e}") from None
    except Exception as e:  # hivemind's p2pd client raises its own error types for unreachable peers
        if type(e).__module__.startswith("hivemind"):
            raise _PeerFailed(ServerFault.TRANSPORT, f"p2p: {type(e).__name__}: {e}") from None
        raise


def _refusal(reply: object) -> _PeerFailed | None:
    if isinstance(reply, SyncError):
        try:
            code = SyncErrorCode(reply.code)
        except ValueError:
            return _PeerFailed(ServerFault.REFUSED, f"refused with unknown code {reply.code}")
        fault = ServerFault.BUSY if code is SyncErrorCode.BUSY else ServerFault.REFUSED
        return _PeerFailed(fault, f"refused: {code.name} {reply.detail[:80]!r}")
    return None


async def _fetch_chunk_list(
    p2p: P2P, target: SyncTarget, run_id: str, peer: str, timeout: float, max_bytes: int
) -> ChunkList:
    reply = await _request(p2p, peer, ChunkListRequest(run_id, target.state_hash), timeout)
    refusal = _refusal(reply)
    if refusal is not None:
        raise refusal
    if not isinstance(reply, ChunkList):
        reason = f"answered a chunk-list request with {type(reply).__name__}"
        raise _PeerFailed(ServerFault.UNEXPECTED_REPLY, reason)
    hinted = target.chunk_size > 0
    if (
        reply.state_hash != target.state_hash
        or not 0 < reply.chunk_size <= MAX_CHUNK_SIZE
        or not 0 < reply.total_bytes <= max_bytes
        or (hinted and (reply.chunk_size, reply.total_bytes) != (target.chunk_size, target.total_bytes))
        or len(reply.hashes) != expected_chunks(reply.total_bytes, reply.chunk_size)
        or merkle_root(reply.hashes).hex() != target.state_hash
    ):
        reason = "chunk list does not hash to the announced state (or exceeds its limits)"
        raise _PeerFailed(ServerFault.BAD_CHUNK_LIST, reason)
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
        raise _PeerFailed(ServerFault.UNEXPECTED_REPLY, "answered a chunk request with something else")
    digest = hashlib.sha256(reply.data).digest()
    signed = chunk_signed_bytes(run_id, target.state_hash, index, digest)
    signed_ok = verify(peer, CHUNK_DOMAIN, signed, reply.sig)
    if digest != hashes[index]:
        evidence = None
        if signed_ok:
            evidence = BadChunkEvidence(run_id, peer, target.state_hash, index, digest, reply.sig)
        raise _PeerFailed(ServerFault.BAD_CHUNK, f"chunk {index} fails its hash", evidence=evidence)
    if not signed_ok:
        raise _PeerFailed(ServerFault.BAD_SIGNATURE, f"chunk {index} carries a bad signature")
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
    fetch = _StateFetch(
        p2p,
        target,
        run_id,
        peers,
        report,
        max_bytes,
        streams_per_peer,
        request_timeout,
        max_transient_failures,
    )
    try:
        async with asyncio.timeout(timeout):
            blob = await fetch.verified_blob()
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
        target.round,
        report.seconds,
        len(report.bytes_from),
        len(report.bad_peers),
        report.refetched,
    )
    return StateSnapshot(target.round, target.state_hash, tensors)


class _StateFetch:
    """One `fetch_state` in progress: a chunk list from one peer, then its chunks from all of them.

    Peers that fail are dropped into the report (as bad, or as unavailable) and not asked again.
    """

    def __init__(
        self,
        p2p: P2P,
        target: SyncTarget,
        run_id: str,
        peers: list[str],
        report: SyncReport,
        max_bytes: int,
        streams_per_peer: int,
        request_timeout: float,
        max_transient_failures: int,
    ) -> None:
        self.p2p = p2p
        self.target = target
        self.run_id = run_id
        self.peers = peers
        self.report = report
        self.max_bytes = max_bytes
        self.streams_per_peer = streams_per_peer
        self.request_timeout = request_timeout
        self.max_transient_failures = max_transient_failures

    def drop(self, peer: str, failure: _PeerFailed) -> None:
        """Record that `peer` failed for good: as bad (with its evidence, if any) or as unavailable."""
        report = self.report
        if failure.bad:
            if peer not in report.bad_peers:
                log.warning("dropping state server %s: %s", peer, failure.reason)
            report.bad_peers.setdefault(peer, failure.reason)
            if failure.evidence is not None:
                report.evidence.append(failure.evidence)
        else:
            log.info("state server %s unavailable: %s", peer, failure.reason)
            report.unavailable.setdefault(peer, failure.reason)

    async def verified_blob(self) -> bytes | None:
        """The serialised state: the first blob, downloaded after the chunk list of one peer after another,
        that hashes to the target as a whole; None when no peer's chunk list leads to one."""
        tried: set[str] = set()
        while (first := await self._first_chunk_list(tried)) is not None:
            list_peer, chunk_list = first
            blob = await _ChunkDownload(self, chunk_list.hashes).run()
            # Every chunk matched its digest, so the digests (under the announced root) are right; only
            # the list's claimed chunking can still be wrong. Checking the whole catches it (and any
            # assembly bug): then the list's provider lied, not the chunk servers.
            whole = await asyncio.to_thread(statehash.blob_state_hash, blob, chunk_list.chunk_size)
            if len(blob) == chunk_list.total_bytes and whole == self.target.state_hash:
                return blob
            misstated = "chunk list misstates the chunk size or length"
            self.drop(list_peer, _PeerFailed(ServerFault.MISSTATED_CHUNKING, misstated))
        return None

    async def _first_chunk_list(self, tried: set[str]) -> tuple[str, ChunkList] | None:
        """The first valid chunk list from the peers not tried yet, asked one after another but hedged: a
        peer that has not answered within `HEDGE_S` gets company (the next peer is asked too), and the
        first valid answer wins. Asked strictly in turn, one frozen holder (its p2p daemon still accepts
        streams, its Python does not answer) cost a whole request timeout before the next was asked, and
        the others had dropped the state by then (the four-daemon freeze test: 30 s, then the sync
        failed). A list is a few kilobytes and verified against the announced root, so asking twice is
        cheap and safe."""
        report = self.report
        queue = [p for p in self.peers if p not in tried]
        pending: dict[asyncio.Task[ChunkList], str] = {}
        try:
            while True:
                queue = [p for p in queue if p not in report.bad_peers and p not in report.unavailable]
                if queue:
                    peer = queue.pop(0)
                    tried.add(peer)
                    fetch = _fetch_chunk_list(
                        self.p2p, self.target, self.run_id, peer, self.request_timeout, self.max_bytes
                    )
                    pending[asyncio.create_task(fetch)] = peer
                if not pending:
                    return None
                done, _ = await asyncio.wait(
                    pending, timeout=HEDGE_S if queue else None, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    peer = pending.pop(task)
                    try:
                        return peer, task.result()
                    except _PeerFailed as failure:
                        if failure.fatal:
                            self.drop(peer, failure)
                        elif not failure.busy:  # gone or not answering: the caller stops counting on it
                            report.unavailable.setdefault(peer, failure.reason)
        finally:
            for task, peer in pending.items():
                task.cancel()
                tried.discard(peer)  # overtaken, not failed: it may still serve a later try
            await asyncio.gather(*pending, return_exceptions=True)


class _ChunkDownload:
    """Every chunk of one chunk list, fetched from all of a `_StateFetch`'s peers in parallel
    (`streams_per_peer` streams each); a chunk a peer fails on goes back in the queue for another."""

    def __init__(self, fetch: _StateFetch, hashes: tuple[bytes, ...]) -> None:
        self.fetch = fetch
        self.hashes = hashes
        self.chunks: list[bytes | None] = [None] * len(hashes)
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(hashes)):
            self.queue.put_nowait(i)
        self.remaining = len(hashes)
        self.done = asyncio.Event()
        if not hashes:
            self.done.set()
        report = fetch.report
        #: Peers no stream asks any more (bad or unavailable, before or during this download).
        self.dead: set[str] = set(report.bad_peers) | set(report.unavailable)
        #: Consecutive transient failures per peer.
        self.failures: collections.Counter[str] = collections.Counter()
        #: Chunks being fetched: when the first request went out, and which peers are asked.
        self.inflight: dict[int, tuple[float, set[str]]] = {}

    async def run(self) -> bytes:
        """The chunks joined; `StateSyncError` once no live peer is left to ask for the missing ones."""
        report = self.fetch.report
        workers = [
            asyncio.create_task(self._worker(peer), name=f"statesync-{peer[-6:]}-{k}")
            for peer in self.fetch.peers
            if peer not in self.dead
            for k in range(self.fetch.streams_per_peer)
        ]
        waiter = asyncio.create_task(self.done.wait())
        try:
            pending: set[asyncio.Task[Any]] = {*workers, waiter}
            while not self.done.is_set():
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is not waiter and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                if not self.done.is_set() and pending == {waiter}:
                    raise StateSyncError(
                        f"{self.remaining} of {len(self.hashes)} chunks could not be obtained from an honest "
                        f"peer (bad: {sorted(report.bad_peers)}, unavailable: {sorted(report.unavailable)})"
                    )
        finally:
            for task in (*workers, waiter):
                task.cancel()
            for task in (*workers, waiter):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return b"".join(c for c in self.chunks if c is not None)

    async def _worker(self, peer: str) -> None:
        """One stream to `peer`: take chunk indices off the queue until it is done or the peer is dropped."""
        fetch = self.fetch
        while peer not in self.dead and not self.done.is_set():
            index = await self._next(peer)
            if self.chunks[index] is not None:
                continue
            if peer in self.dead:  # another stream of this peer got it dropped while we waited
                self.queue.put_nowait(index)
                return
            _, asked = self.inflight.setdefault(index, (time.monotonic(), set()))
            asked.add(peer)
            try:
                data = await _fetch_chunk(
                    fetch.p2p, fetch.target, fetch.run_id, self.hashes, peer, index, fetch.request_timeout
                )
            except _PeerFailed as failure:
                # A late failure on a chunk another peer already delivered is no loss, unless it is
                # misbehaviour.
                if self.chunks[index] is None or failure.fatal:
                    await self._failed(peer, index, failure)
                continue
            finally:
                asked.discard(peer)
                if not asked:
                    self.inflight.pop(index, None)
            self.failures[peer] = 0
            self._store(peer, index, data)

    async def _next(self, peer: str) -> int:
        """The next chunk for a stream of `peer`: from the queue, or, once the queue is empty, a chunk
        another peer has held for `HEDGE_S` without answering (asked again here, the first answer wins).
        Without this, a frozen holder (its p2p daemon still accepts streams) kept its chunks until the
        request timeout while every other stream sat idle."""
        while True:
            with contextlib.suppress(asyncio.QueueEmpty):
                return self.queue.get_nowait()
            now = time.monotonic()
            for index, (since, asked) in self.inflight.items():
                if self.chunks[index] is None and peer not in asked and now - since >= HEDGE_S:
                    return index
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.queue.get(), HEDGE_S / 2)

    async def _failed(self, peer: str, index: int, failure: _PeerFailed) -> None:
        """Put the chunk back for another stream; drop the peer when asking it again is pointless."""
        self.queue.put_nowait(index)
        self.fetch.report.refetched += 1
        if failure.busy:
            await asyncio.sleep(random.uniform(0.05, 0.25))
            return
        self.failures[peer] += 1
        if failure.fatal or self.failures[peer] >= self.fetch.max_transient_failures:
            self.dead.add(peer)
            self.fetch.drop(peer, failure)

    def _store(self, peer: str, index: int, data: bytes) -> None:
        if self.chunks[index] is None:
            self.chunks[index] = data
            bytes_from = self.fetch.report.bytes_from
            bytes_from[peer] = bytes_from.get(peer, 0) + len(data)
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()
