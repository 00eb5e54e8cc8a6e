"""Signed gossip for a run over the node's one libp2p identity: validated flooding on a sparse overlay.

Every node of a run keeps long-lived, two-way streams of the protocol `intellect-node/v1/gossip/<run>`
("links") to a few other members, through the same p2p daemon that carries the DHT, state sync and the
all-reduce. A link is a libp2p stream, so it is authenticated and encrypted by the connection's Noise or
TLS channel, and it runs over whatever connection libp2p has: direct, hole-punched or relayed. A node
behind a NAT dials out to public members and they use the link it opened; nobody dials it.

What a node does with a frame it reads (`GossipService._on_frame`), in this order:

1. Size and shape: a length prefix above `MAX_FRAME` closes the link; an unreadable frame is rejected.
2. Duplicates: the message ID (BLAKE2b of the envelope bytes) was seen before -> counted, dropped. This
   comes before any signature check, so the copies that flooding produces cost a hash, not a verify.
3. Validation before anything else happens (`EnvelopeVerifier`): signature of the author, run,
   admission, timestamp skew, replay window, the payload type must be the topic's, and the payload must
   pass the topic's content check when the node gave one (`checks`: a receipt's signatures). A message that
   fails is neither delivered nor forwarded; the rejection is counted by reason and lowers the score of
   the neighbour that handed it over (the only identity the link authenticates, so a forged author cannot
   frame an honest peer). A neighbour whose score falls below `blacklist_score` is disconnected and
   refused for `blacklist_s`.
4. Rate: each verified author may publish `author_rate` messages per second (burst `author_burst`);
   above that, its messages are dropped and counted here and not forwarded, so a flood from one admitted
   identity stops at its first honest hop.
5. Delivery to local subscribers, then forwarding to every other link.

The overlay: every node dials `degree` members it can reach (those announcing a direct address; members
behind a NAT announce only circuit addresses), chosen by a hash of both peer IDs so that choices differ
between nodes and stay stable across refreshes, and accepts up to `max_links` links in all. A node that
knows no directly reachable member falls back to dialling through relays. Why not gossipsub: the p2p
daemon's built-in gossipsub forwards before our code can validate, and py-libp2p's needs a second libp2p
stack on a second port (docs/decisions.md, "Gossip over the p2p daemon's streams").

No task or stream outlives `stop()` (or the `async with` block).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import PeerID
from intellect.crypto.identity import Identity
from intellect.protocol.codec import decode, encode
from intellect.protocol.envelope import EnvelopeVerifier, RejectReason, ReplayGuard, SequenceCounter, seal
from intellect.protocol.errors import ProtocolError, Rejected
from intellect.protocol.gossip_messages import (
    FRAME_HEADER,
    MAX_FRAME,
    MAX_GOSSIP_DATA,
    TOPIC_MESSAGE,
    GossipFrame,
    frame,
)
from intellect.protocol.keys import TopicKind, parse_topic

log = logging.getLogger("intellect.gossip")

#: The libp2p protocol of gossip links; the run ID is appended, so a node answers only for its own run.
GOSSIP_PROTOCOL = "intellect-node/v1/gossip"

#: How much one rejection lowers the forwarder's score, by reason (others: DEFAULT_PENALTY). A bad
#: signature can only come from a peer that forwards without validating, or forges. A replayed, stale or
#: future message can reach an honest forwarder first (an author that signs two messages with one sequence
#: number, a slow path, a skewed clock), so it costs the forwarder little or nothing.
PENALTIES: dict[str, float] = {
    RejectReason.FORGED_SIGNATURE.value: 10.0,
    RejectReason.NOT_ADMITTED.value: 5.0,
    RejectReason.WRONG_RUN.value: 5.0,
    RejectReason.REPLAYED.value: 0.0,
    RejectReason.STALE.value: 0.5,
    RejectReason.FUTURE.value: 0.5,
    "rate_limited": 1.0,  # FLOOD_PENALTY: only charged when the neighbour is the author
    # A payload that fails its topic's content check (a forged receipt): every honest forwarder runs the
    # same check before forwarding, so only a forger or a peer that forwards unchecked hands one over.
    "invalid_payload": 10.0,
}
DEFAULT_PENALTY = 2.0
#: A valid first delivery raises the forwarder's score by this much, up to SCORE_CAP.
DELIVERY_REWARD, SCORE_CAP = 0.1, 10.0
#: Rejection reasons of this module (beyond RejectReason): the topic does not carry that payload type; the
#: author published above its rate.
WRONG_TOPIC, RATE_LIMITED = "wrong_topic", "rate_limited"
#: Rejection reason of a payload its topic's content check refused (`GossipService` `checks`).
INVALID_PAYLOAD = "invalid_payload"
#: What a message above its author's rate costs the neighbour that sent it, when that neighbour *is* the
#: author: an author flooding its own messages at 300/s falls below the blacklist threshold within a
#: fraction of a second. A neighbour that forwards someone else's flood pays nothing: an honest forwarder
#: applies the same limit, and passes slightly more than ours only through timing jitter.
FLOOD_PENALTY = 1.0
#: Links one neighbour may hold with us (two: both of us dialled at once); more are refused, so that one
#: admitted peer cannot take every one of `max_links` slots and starve the honest ones.
MAX_LINKS_PER_PEER = 2
#: Authors whose rate buckets are kept; beyond it the oldest half is forgotten (bounded memory in a run
#: that admits anyone).
MAX_AUTHORS = 65536


class GossipError(RuntimeError):
    """The gossip service is not running when a message must be published."""


@dataclass(frozen=True)
class GossipConfig:
    """Settings of the gossip service; each field is documented where it is declared."""

    #: Links this node dials (members it can reach directly); it also accepts links dialled to it.
    degree: int = 6
    #: Most links (dialled and accepted together); further inbound links are refused.
    max_links: int = 64
    #: Seconds between two passes of the overlay upkeep (dial missing neighbours, drop dead links).
    upkeep_s: float = 1.0
    #: First delay before redialling a member whose dial failed; doubles up to redial_max_s.
    redial_s: float = 2.0
    redial_max_s: float = 60.0
    #: Seconds a dial (connect and open the stream) may take.
    dial_timeout_s: float = 10.0
    #: Allowed clock skew of an envelope's timestamp, in seconds.
    skew_s: float = 30.0
    #: A neighbour whose score falls below this is disconnected and refused for blacklist_s.
    blacklist_score: float = -50.0
    blacklist_s: float = 600.0
    #: Messages per second one author may publish (sustained), and its burst.
    author_rate: float = 20.0
    author_burst: float = 100.0
    #: Per-subscription queue length; when a consumer lags the oldest messages are dropped (and counted).
    queue_size: int = 1024
    #: Frames waiting to be written to one link; when a neighbour reads too slowly the oldest are dropped.
    link_queue: int = 1024
    #: Message IDs remembered for duplicate suppression.
    seen_ids: int = 65536

    def __post_init__(self) -> None:
        positive = ("upkeep_s", "redial_s", "dial_timeout_s", "skew_s", "author_rate", "author_burst")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("degree", "max_links", "queue_size", "link_queue", "seen_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.redial_max_s < self.redial_s:
            raise ValueError("redial_max_s: must be at least redial_s")


@dataclass(frozen=True)
class GossipMessage:
    """A verified message as delivered: author, its sequence number and timestamp, and the payload."""

    topic: TopicKind
    sender: str
    seq: int
    ts: float
    forwarder: str
    message: Any
    #: Local wall-clock time at which this node received it (for latency measurements).
    received_at: float


class Subscription:
    """Verified messages of one topic, from the moment `subscribe()` returned; iterate with `async for`.

    `async for sender, message in sub` yields pairs; `await sub.get()` returns a full `GossipMessage`.
    """

    def __init__(self, service: GossipService, kind: TopicKind, maxsize: int) -> None:
        self._service = service
        self.kind = kind
        self._queue: asyncio.Queue[GossipMessage] = asyncio.Queue(maxsize)
        #: Messages dropped because this consumer lagged more than `queue_size` behind.
        self.dropped = 0

    def _put(self, item: GossipMessage) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    async def get(self) -> GossipMessage:
        return await self._queue.get()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        item = await self._queue.get()
        return item.sender, item.message

    def close(self) -> None:
        """Stop receiving; messages already queued are discarded."""
        self._service._subscriptions[self.kind].discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bucket:
    """A token bucket: `rate` tokens per second up to `burst`."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float) -> None:
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, rate: float, burst: float) -> bool:
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(eq=False)
class _Link:
    """One two-way gossip stream to a neighbour."""

    peer: str
    outbound: bool
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    queue: asyncio.Queue[bytes]
    #: Frames dropped because the neighbour read too slowly.
    dropped: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, data: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the daemon may already have torn the stream down
            self.writer.close()
        self.closed.set()

    async def write_loop(self) -> None:
        try:
            while True:
                data = await self.queue.get()
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError) as e:
            log.debug("gossip write to %s failed: %s", self.peer, e)
            self.close()


class _Seen:
    """The most recent message IDs, for duplicate suppression (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[bytes, None] = OrderedDict()

    def add(self, mid: bytes) -> bool:
        """Record a message ID; False when it was seen before."""
        if mid in self._ids:
            return False
        self._ids[mid] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


def _author_may_publish(authors: dict[str, _Bucket], author: str, config: GossipConfig) -> bool:
    """Take one token from `author`'s bucket (made on first sight; memory bounded by MAX_AUTHORS)."""
    bucket = authors.get(author)
    if bucket is None:
        if len(authors) >= MAX_AUTHORS:  # forget the oldest half (their buckets refill anyway)
            for old in list(authors)[: MAX_AUTHORS // 2]:
                del authors[old]
        bucket = authors[author] = _Bucket(config.author_burst)
    return bucket.take(config.author_rate, config.author_burst)


class _Scores:
    """Each neighbour's score, and the neighbours refused for a while because theirs fell too low."""

    def __init__(self, config: GossipConfig) -> None:
        self.config = config
        self.score: dict[str, float] = {}
        self._until: dict[str, float] = {}  # peer -> monotonic time until which it is refused

    def refused(self, peer: str) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._until[peer]
            self.score[peer] = 0.0
            return False
        return True

    def reward(self, peer: str) -> None:
        self.score[peer] = min(SCORE_CAP, self.score.get(peer, 0.0) + DELIVERY_REWARD)

    def penalise(self, peer: str, reason: str) -> bool:
        """Lower `peer`'s score; True when it has just fallen below the threshold and is now refused."""
        score = self.score.get(peer, 0.0) - PENALTIES.get(reason, DEFAULT_PENALTY)
        self.score[peer] = score
        if score >= self.config.blacklist_score or self.refused(peer):
            return False
        log.warning(
            "disconnecting gossip neighbour %s for %.0fs (score %.1f)", peer, self.config.blacklist_s, score
        )
        self._until[peer] = time.monotonic() + self.config.blacklist_s
        return True


def _direct(maddrs: Sequence[str]) -> bool:
    """Whether a member announces an address that can be dialled without a relay."""
    return any("/p2p-circuit" not in m for m in maddrs)


def pick_neighbours(me: str, candidates: dict[str, tuple[str, ...]], private: bool) -> list[str]:
    """Which of `candidates` (peer ID -> announced multiaddrs) to dial, best first: members with a direct
    address, in an order given by a hash of both peer IDs (so choices differ between nodes and stay stable
    across refreshes). Behind a NAT, members behind a NAT too (through their relays) only when nobody can
    be dialled directly; a public node never dials them, they dial it."""
    direct = [p for p, maddrs in candidates.items() if _direct(maddrs)]
    pool = (direct or list(candidates)) if private else direct
    pool.sort(key=lambda p: hashlib.blake2b(me.encode() + p.encode(), digest_size=8).digest())
    return pool


Connect = Callable[[str, Sequence[str]], Awaitable[bool]]
#: A topic's content check: None when the payload may be delivered and forwarded, else why not.
PayloadCheck = Callable[[Any], str | None]


class GossipService:
    """Signed gossip for one run; use as `async with GossipService(p2p, identity, run, admitted) as g:`.

    - `await gossip.publish(TopicKind.PROGRESS, Progress(...))`
    - `async for sender, msg in gossip.subscribe(TopicKind.PROGRESS): ...`
    - `gossip.add_peers([(peer_id, maddrs), ...])` (from DHT membership records)
    - `gossip.rejections` (Counter by reason), `gossip.scores` (per neighbour), `gossip.peers` (linked),
      `gossip.delivered`, `gossip.duplicates`, `gossip.dropped`.

    `p2p` is the node's `hivemind.p2p.P2P`; `connect(peer, maddrs)` makes sure the p2p daemon has a
    connection to a member before a stream is opened to it (`DhtService.connect`).
    """

    def __init__(
        self,
        p2p: Any,
        identity: Identity,
        run_id: str,
        admitted: Callable[[str], bool],
        *,
        connect: Connect | None = None,
        private: bool = False,
        config: GossipConfig | None = None,
        sequence: SequenceCounter | None = None,
        checks: Mapping[TopicKind, PayloadCheck] | None = None,
    ) -> None:
        self.p2p = p2p
        self.checks = dict(checks or {})
        self.identity = identity
        self.run_id = run_id
        self.admitted = admitted
        self.connect = connect
        #: Behind a NAT: dial only members with a direct address, never expect to be dialled.
        self.private = private
        self.config = cfg = config or GossipConfig()
        self.protocol = f"{GOSSIP_PROTOCOL}/{run_id}"
        self._sequence = sequence or SequenceCounter()
        self._verifier = EnvelopeVerifier(
            run_id, self._is_admitted, ReplayGuard(skew_s=cfg.skew_s), max_size=MAX_GOSSIP_DATA
        )
        self._subscriptions: dict[TopicKind, set[Subscription]] = {k: set() for k in TopicKind}
        self._known: dict[str, tuple[str, ...]] = {}
        self._links: dict[str, set[_Link]] = {}
        self._dialing: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}  # peer -> (not before, current backoff)
        self._scores = _Scores(cfg)
        self._seen = _Seen(cfg.seen_ids)
        self._authors: dict[str, _Bucket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        #: Rejected incoming messages by reason (a RejectReason value, WRONG_TOPIC or RATE_LIMITED).
        self.rejections: Counter[str] = Counter()
        #: Verified messages delivered, by topic kind.
        self.delivered: Counter[str] = Counter()
        #: Copies of messages already seen (flooding sends each message along several paths).
        self.duplicates = 0
        #: Score of each neighbour: rewarded for valid deliveries, penalised for rejected ones.
        self.scores = self._scores.score

    # -- public API ----------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def peers(self) -> tuple[str, ...]:
        """Neighbours with at least one open link."""
        return tuple(p for p, links in self._links.items() if links)

    @property
    def authors(self) -> int:
        """Distinct authors whose messages we verified (at most `MAX_AUTHORS` remembered)."""
        return len(self._authors)

    @property
    def dropped(self) -> int:
        """Frames dropped on open links because the neighbour read too slowly."""
        return sum(link.dropped for links in self._links.values() for link in links)

    async def publish(self, topic: TopicKind | str, message: Any) -> None:
        """Seal `message` with our key and send it to every neighbour; GossipError when not running.

        The message type must be the one the topic carries (`TOPIC_MESSAGE`); others are a TypeError.
        With no neighbour yet the message reaches nobody (gossip is best effort; the DHT is the record).
        """
        kind = _resolve_topic(self.run_id, topic)
        if not isinstance(message, TOPIC_MESSAGE[kind]):
            raise TypeError(f"{kind.value} carries {TOPIC_MESSAGE[kind].__name__}, not {type(message)}")
        if not self._running:
            raise GossipError("the gossip service is not running")
        data = seal(self.identity, self.run_id, message, self._sequence.next())
        self._seen.add(_message_id(data))
        self._send_all(frame(encode(GossipFrame(kind.value, data))), except_peer=None)

    def subscribe(self, topic: TopicKind | str) -> Subscription:
        """Verified messages of `topic` from now on (our own publications are not echoed back)."""
        kind = _resolve_topic(self.run_id, topic)
        sub = Subscription(self, kind, self.config.queue_size)
        self._subscriptions[kind].add(sub)
        return sub

    def add_peers(self, peers: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Members we may link to, as (peer ID, announced multiaddrs); the upkeep dials some of them."""
        for peer, maddrs in peers:
            if peer != self.peer_id:
                self._known[peer] = tuple(maddrs)

    def set_peers(self, peers: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Like `add_peers`, but forget members not listed (their records expired: no more dials to them;
        open links stay until they close)."""
        self._known.clear()
        self.add_peers(peers)

    async def wait_peers(self, n: int, timeout: float) -> None:
        """Wait until at least `n` neighbours are linked (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout):
            while len(self.peers) < n:
                await asyncio.sleep(0.05)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.protocol, self._on_stream)
        self._running = True
        self._spawn(self._upkeep(), "gossip-upkeep")

    async def stop(self) -> None:
        """Close every link and stop every task of the service."""
        self._running = False
        for links in list(self._links.values()):
            for link in list(links):
                link.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._links.clear()
        with contextlib.suppress(Exception):  # the daemon may be gone already at shutdown
            await self.p2p.remove_binary_stream_handler(self.protocol)

    async def __aenter__(self) -> GossipService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the overlay ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refused(self, peer: str) -> bool:
        return self._scores.refused(peer)

    def _wanted(self) -> list[str]:
        """The members we should be linked to by our own dials, best first."""
        ok = [p for p in self._known if not self._refused(p) and self._is_admitted(p)]
        return pick_neighbours(self.peer_id, {p: self._known[p] for p in ok}, self.private)

    async def _upkeep(self) -> None:
        while True:
            now = time.monotonic()
            outbound = sum(1 for links in self._links.values() for link in links if link.outbound)
            budget = self.config.degree - outbound - len(self._dialing)
            for peer in self._wanted():
                if budget <= 0:
                    break
                if self._links.get(peer) or peer in self._dialing:
                    continue
                if self._retry.get(peer, (0.0, 0.0))[0] > now:
                    continue
                budget -= 1
                self._dialing.add(peer)
                self._spawn(self._dial(peer), f"gossip-dial-{peer[-6:]}")
            await asyncio.sleep(self.config.upkeep_s)

    async def _dial(self, peer: str) -> None:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.dial_timeout_s):
                if self.connect is not None:
                    await self.connect(peer, self._known.get(peer, ()))
                _info, reader, writer = await self.p2p.call_binary_stream_handler(
                    PeerID.from_base58(peer), self.protocol
                )
        except Exception as e:  # TimeoutError, P2PDaemonError / ControlFailure for dial failures
            backoff = min(cfg.redial_max_s, self._retry.get(peer, (0.0, cfg.redial_s / 2))[1] * 2)
            self._retry[peer] = (time.monotonic() + backoff, backoff)
            log.debug("gossip dial to %s failed (%s); retry in %.0fs", peer, e, backoff)
            return
        finally:
            self._dialing.discard(peer)
        self._retry.pop(peer, None)
        await self._run_link(_Link(peer, True, reader, writer, asyncio.Queue(cfg.link_queue)))

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        total = sum(len(links) for links in self._links.values())
        if not self._running or self._refused(peer) or not self._is_admitted(peer):
            reason = "refused"
        elif total >= self.config.max_links:
            reason = "too many links"
        elif len(self._links.get(peer, ())) >= MAX_LINKS_PER_PEER:
            reason = "too many links from that peer"  # one peer must not take every slot
        else:
            await self._run_link(_Link(peer, False, reader, writer, asyncio.Queue(self.config.link_queue)))
            return
        log.debug("gossip link from %s not accepted: %s", peer, reason)
        with contextlib.suppress(Exception):
            writer.close()

    async def _run_link(self, link: _Link) -> None:
        self._links.setdefault(link.peer, set()).add(link)
        log.debug("gossip link %s %s", "to" if link.outbound else "from", link.peer)
        writer = asyncio.create_task(link.write_loop(), name=f"gossip-write-{link.peer[-6:]}")
        try:
            await self._read_loop(link)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            log.debug("gossip link with %s closed: %s", link.peer, e)
        finally:
            writer.cancel()
            link.close()
            links = self._links.get(link.peer)
            if links is not None:
                links.discard(link)
                if not links:
                    del self._links[link.peer]
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _read_loop(self, link: _Link) -> None:
        read = link.reader.readexactly
        while not link.closed.is_set():
            (n,) = FRAME_HEADER.unpack(await read(FRAME_HEADER.size))
            if n > MAX_FRAME:
                self._reject(link.peer, RejectReason.OVERSIZED.value, "")
                return
            self._on_frame(link, await read(n))

    # -- messages ------------------------------------------------------------------------------------

    def _on_frame(self, link: _Link, data: bytes) -> None:
        try:
            msg = decode(data, GossipFrame)
            kind = TopicKind(msg.topic)
        except (ProtocolError, ValueError) as e:
            self._reject(link.peer, RejectReason.MALFORMED.value, str(e))
            return
        if not self._seen.add(_message_id(msg.data)):
            self.duplicates += 1
            return
        try:
            opened = self._verifier.open(msg.data)
        except Rejected as e:
            self._reject(link.peer, e.reason.value, str(e))
            return
        problem = _payload_problem(self.checks, kind, opened.message)
        if problem is not None:
            self._reject(link.peer, *problem)
            return
        if not _author_may_publish(self._authors, opened.sender, self.config):
            # The author is authenticated by its signature: a forwarder is not to blame, the author is.
            self.rejections[RATE_LIMITED] += 1
            if opened.sender == link.peer and self._scores.penalise(link.peer, RATE_LIMITED):
                for own in list(self._links.get(link.peer, ())):
                    own.close()
            return
        self.delivered[kind.value] += 1
        self._scores.reward(link.peer)
        item = GossipMessage(
            kind, opened.sender, opened.seq, opened.ts, link.peer, opened.message, time.time()
        )
        for sub in list(self._subscriptions[kind]):
            sub._put(item)
        self._send_all(frame(data), except_peer=link.peer)

    def _send_all(self, data: bytes, except_peer: str | None) -> None:
        for peer, links in self._links.items():
            if peer == except_peer:
                continue
            # Two links to one neighbour (both dialled at once): one copy is enough.
            for link in links:
                link.push(data)
                break

    def _reject(self, forwarder: str, reason: str, detail: str) -> None:
        self.rejections[reason] += 1
        log.debug("gossip rejected %s via %s (%s)", reason, forwarder, detail)
        if self._scores.penalise(forwarder, reason):
            for link in list(self._links.get(forwarder, ())):
                link.close()

    def _is_admitted(self, peer_id: str) -> bool:
        return _admits(self.admitted, peer_id)


def _admits(admitted: Callable[[str], bool], peer_id: str) -> bool:
    try:
        return bool(admitted(peer_id))
    except Exception:  # the policy is someone else's code: refuse, but say why
        log.exception("admission policy raised for %s; treating it as not admitted", peer_id)
        return False


def _payload_problem(
    checks: Mapping[TopicKind, PayloadCheck], kind: TopicKind, msg: Any
) -> tuple[str, str] | None:
    """(reason, detail) when a verified envelope's payload must not be delivered: not the topic's payload
    type, or refused by the topic's content check (`GossipService` `checks`, e.g. a receipt's)."""
    if not isinstance(msg, TOPIC_MESSAGE[kind]):
        return WRONG_TOPIC, f"{type(msg).__name__} on {kind.value}"
    check = checks.get(kind)
    why = check(msg) if check is not None else None
    return None if why is None else (INVALID_PAYLOAD, f"{kind.value}: {why}")


def _message_id(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _resolve_topic(run_id: str, topic: TopicKind | str) -> TopicKind:
    """Accept a TopicKind, its value ("progress") or the full topic name of this run."""
    if isinstance(topic, TopicKind):
        return topic
    if "/" in topic:
        run, kind = parse_topic(topic)
        if run != run_id:
            raise ValueError(f"topic {topic!r} belongs to run {run}, not {run_id}")
        return kind
    return TopicKind(topic)
