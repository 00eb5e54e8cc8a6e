"""Signed gossip for a run, as seen from the daemon: an asyncio service over a supervised child process.

The daemon imports hivemind, and hivemind and py-libp2p cannot share a process (duplicate protobuf
symbol), so gossipsub runs in `intellect.node.net.gossip_child`. `GossipService`, through its
`_ChildSupervisor`, starts that child with one end of a Unix socket pair, waits for its readiness
(`BridgeHello`), restarts it with backoff if it dies, and stops it (graceful `BridgeStop`, then SIGTERM,
then SIGKILL, always reaped by PID).

Outgoing messages are sealed here with A's signed envelope (`intellect.protocol.envelope.seal`) and the
child publishes the bytes; the child verifies every incoming envelope in a gossipsub topic validator, so
only verified messages reach `subscribe()`. Rejections come back as `BridgeReject` frames: they are
counted by reason and lower the score of the neighbour that handed the message over (the only identity
the transport authenticates; a forged author must not be able to frame an honest peer). A neighbour whose
score falls below `GossipConfig.blacklist_score` is blacklisted in the child.

No thread, socket or process outlives the `async with` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intellect.crypto.identity import Identity
from intellect.protocol.codec import decode, encode
from intellect.protocol.envelope import RejectReason, SequenceCounter, seal
from intellect.protocol.errors import ProtocolError
from intellect.protocol.gossip_messages import (
    FRAME_HEADER,
    MAX_FRAME,
    TOPIC_MESSAGE,
    BridgeAddPeers,
    BridgeAdmitQuery,
    BridgeAdmitReply,
    BridgeBlacklist,
    BridgeDeliver,
    BridgeHello,
    BridgePublish,
    BridgeReject,
    BridgeStatus,
    BridgeStop,
    frame,
)
from intellect.protocol.keys import TopicKind, parse_topic, topic_name

log = logging.getLogger("intellect.gossip")

#: How much one rejection lowers the forwarder's score, by RejectReason value (others: DEFAULT_PENALTY).
#: A bad signature can only come from a peer that forwards without validating or forges itself.
PENALTIES: dict[str, float] = {
    RejectReason.FORGED_SIGNATURE.value: 10.0,
    RejectReason.NOT_ADMITTED.value: 5.0,
    RejectReason.WRONG_RUN.value: 5.0,
}
DEFAULT_PENALTY = 2.0
#: A valid first delivery raises the forwarder's score by this much, up to SCORE_CAP.
DELIVERY_REWARD, SCORE_CAP = 0.1, 10.0


class GossipError(RuntimeError):
    """The gossip child could not be started, or is not running when a message must be published."""


@dataclass(frozen=True)
class GossipConfig:
    """Settings of the gossip service; each field is documented where it is declared."""

    #: Interface the gossip host listens on ("0.0.0.0" to be reachable from other machines).
    listen_host: str = "127.0.0.1"
    #: TCP port of the gossip host; 0 picks a free one at the first start and keeps it across restarts.
    listen_port: int = 0
    #: Seconds to wait for the child's readiness after spawning it.
    ready_timeout_s: float = 30.0
    #: Seconds to wait for a graceful exit before SIGTERM, and again before SIGKILL.
    stop_timeout_s: float = 5.0
    #: First restart delay after the child dies; doubles on each quick death up to restart_backoff_max_s.
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    #: A child that ran this long before dying is restarted after the initial backoff again.
    healthy_after_s: float = 30.0
    #: py-libp2p's per-neighbour, per-topic message rate limit (msgs/s); see docs/decisions.md.
    rate_limit: float = 1000.0
    #: Allowed clock skew of an envelope's timestamp, in seconds.
    skew_s: float = 30.0
    #: A neighbour whose score falls below this is blacklisted in the child.
    blacklist_score: float = -50.0
    #: Per-subscription queue length; when a consumer lags the oldest messages are dropped (and counted).
    queue_size: int = 1024
    #: Log level of the child process.
    child_log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port: must be 0..65535, got {self.listen_port}")
        for name in ("ready_timeout_s", "stop_timeout_s", "restart_backoff_s", "rate_limit", "skew_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError("restart_backoff_max_s: must be at least restart_backoff_s")
        if self.queue_size < 1:
            raise ValueError(f"queue_size: must be at least 1, got {self.queue_size}")


@dataclass(frozen=True)
class GossipMessage:
    """A verified message as delivered: author, its sequence number and timestamp, and the payload."""

    topic: TopicKind
    sender: str
    seq: int
    ts: float
    forwarder: str
    message: Any
    #: Local wall-clock time at which the daemon received it (for latency measurements).
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


class _Child:
    """One incarnation of the child process and its end of the bridge."""

    def __init__(self, proc: asyncio.subprocess.Process, writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.writer = writer
        self.hello: BridgeHello | None = None
        self.ready = asyncio.Event()
        self.reader_task: asyncio.Task[None] | None = None
        self.started_at = time.monotonic()
        self.write_lock = asyncio.Lock()

    async def send(self, msg: Any) -> None:
        data = frame(encode(msg))
        async with self.write_lock:
            self.writer.write(data)
            await self.writer.drain()


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


def _send_soon(child: _Child, msg: Any) -> None:
    """Queue a frame without awaiting (from sync code); the writer buffers it in order."""
    try:
        child.writer.write(frame(encode(msg)))
    except (ConnectionError, OSError, RuntimeError) as exc:
        log.debug("could not send %s to the gossip child: %s", type(msg).__name__, exc)


class _ChildSupervisor:
    """The gossip child process across its incarnations, on behalf of one `GossipService`.

    Starts a child with one end of a Unix socket pair and waits for its `BridgeHello`, restarts it with
    backoff when it dies, and stops it (graceful `BridgeStop`, then SIGTERM, then SIGKILL, always reaped by
    PID). Every frame but the handshake goes to `on_frame`. Each new child is handed `known_peers` (the
    service's dict, which it keeps adding to).
    """

    def __init__(
        self,
        identity_path: Path,
        peer_id: str,
        run_id: str,
        config: GossipConfig,
        known_peers: dict[str, None],
        on_frame: Callable[[_Child, Any], None],
    ) -> None:
        self.identity_path = identity_path
        self.peer_id = peer_id
        self.run_id = run_id
        self.config = config
        self._port = config.listen_port
        self._known_peers = known_peers
        self._on_frame = on_frame
        #: The current incarnation, if any.
        self.child: _Child | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        #: How many times the child was restarted after dying.
        self.restarts = 0

    async def start(self) -> None:
        """Spawn the first child (GossipError if it does not get ready) and start watching it."""
        self._stopping = False
        self.child = await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="gossip-supervisor")

    async def stop(self) -> None:
        """Stop watching, then stop the child (graceful, then SIGTERM, then SIGKILL)."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self.child is not None:
            await self._terminate(self.child)
            self.child = None

    async def ready_child(self, timeout: float) -> _Child:
        """The current child once it is running and ready; GossipError if stopped or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            child = self.child
            if self._stopping:
                raise GossipError("gossip service is stopped")
            if child is not None and child.ready.is_set() and child.proc.returncode is None:
                return child
            if time.monotonic() >= deadline:
                raise GossipError(f"gossip child not ready within {timeout:.1f}s")
            await asyncio.sleep(0.05)

    def _child_argv(self, fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "intellect.node.net.gossip_child",
            "--key",
            str(self.identity_path),
            "--run",
            self.run_id,
            "--listen",
            f"/ip4/{self.config.listen_host}/tcp/{self._port}",
            "--bridge-fd",
            str(fd),
            "--rate-limit",
            str(self.config.rate_limit),
            "--skew",
            str(self.config.skew_s),
            "--log-level",
            self.config.child_log_level,
        ]

    async def _spawn(self) -> _Child:
        """Start one child, wait for its BridgeHello, and hand it the known peers; GossipError on failure."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._child_argv(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child = _Child(proc, writer)
        child.reader_task = asyncio.create_task(
            self._read_loop(child, reader), name=f"gossip-bridge-{proc.pid}"
        )
        exited = asyncio.create_task(proc.wait())
        ready = asyncio.create_task(child.ready.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, ready}, timeout=self.config.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            await self._terminate(child)
            raise
        finally:
            for task in (exited, ready):
                task.cancel()
            await asyncio.gather(exited, ready, return_exceptions=True)
        if ready not in done:
            await self._terminate(child)
            what = f"exited with {proc.returncode}" if proc.returncode is not None else "did not get ready"
            raise GossipError(f"gossip child {proc.pid} {what} during start")
        assert child.hello is not None
        if self._port == 0:
            # Keep the port the child picked, so peers that know our address reach us after a restart.
            for addr in child.hello.listen_maddrs:
                parts = addr.split("/")
                if "tcp" in parts:
                    self._port = int(parts[parts.index("tcp") + 1])
                    break
        if self._known_peers:
            await child.send(BridgeAddPeers(tuple(self._known_peers)))
        log.info("gossip child %s ready: %s", proc.pid, ", ".join(child.hello.listen_maddrs))
        return child

    async def _supervise(self) -> None:
        """Wait for the child to exit; unless we are stopping, restart it with exponential backoff."""
        backoff = self.config.restart_backoff_s
        while True:
            child = self.child
            if child is not None:
                rc = await child.proc.wait()
                if self._stopping:
                    return
                lived = time.monotonic() - child.started_at
                log.warning(
                    "gossip child %s exited with %s after %.1fs; restarting", child.proc.pid, rc, lived
                )
                await self._terminate(child)
                self.child = None
                if lived >= self.config.healthy_after_s:
                    backoff = self.config.restart_backoff_s
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.restart_backoff_max_s)
            try:
                self.child = await self._spawn()
                self.restarts += 1
            except GossipError as exc:
                log.warning("gossip child restart failed: %s", exc)

    async def _terminate(self, child: _Child) -> None:
        """Stop one child: BridgeStop and close the bridge, then SIGTERM, then SIGKILL; reap it."""
        proc = child.proc
        if proc.returncode is None:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                await asyncio.wait_for(child.send(BridgeStop("daemon stopping")), 1.0)
        child.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await child.writer.wait_closed()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                break
            if sig is not None:
                log.warning("gossip child %s did not exit; sending %s", proc.pid, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), self.config.stop_timeout_s)
        if child.reader_task is not None:
            child.reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await child.reader_task

    async def _read_loop(self, child: _Child, reader: asyncio.StreamReader) -> None:
        """Handle frames from one child until its socket closes."""
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER.size)
                (length,) = FRAME_HEADER.unpack(header)
                if length > MAX_FRAME:
                    log.error(
                        "gossip child %s sent a %s-byte frame; closing the bridge", child.proc.pid, length
                    )
                    return
                msg = decode(await reader.readexactly(length))
                self._dispatch(child, msg)
        except asyncio.IncompleteReadError:
            log.debug("bridge of gossip child %s closed", child.proc.pid)
        except ProtocolError as exc:
            log.error(
                "gossip child %s sent an undecodable frame (%s); closing the bridge", child.proc.pid, exc
            )
        except (ConnectionError, OSError) as exc:
            log.debug("bridge of gossip child %s failed: %s", child.proc.pid, exc)

    def _dispatch(self, child: _Child, msg: Any) -> None:
        if not isinstance(msg, BridgeHello):
            self._on_frame(child, msg)
        elif msg.peer_id != self.peer_id:
            log.error("gossip child reports peer ID %s, expected %s", msg.peer_id, self.peer_id)
        else:
            child.hello = msg
            child.ready.set()


class GossipService:
    """Signed gossip for one run; use as `async with GossipService(...) as gossip:`.

    - `await gossip.publish(TopicKind.PROGRESS, Progress(...))`
    - `async for sender, msg in gossip.subscribe(TopicKind.PROGRESS): ...`
    - `gossip.add_peers(["/ip4/…/tcp/…/p2p/12D3KooW…"])` (e.g. from DHT membership records)
    - `gossip.rejections` (Counter by RejectReason value), `gossip.scores` (per neighbour),
      `gossip.restarts`, `gossip.child_pid`, `gossip.peer_id`, `gossip.listen_maddrs`, `gossip.peers`.

    The child process itself (start, restarts, stop) is `_ChildSupervisor`'s; this class seals what we
    publish and handles what the child reports.
    """

    def __init__(
        self,
        identity_path: Path,
        run_id: str,
        admitted: Callable[[str], bool],
        *,
        listen_port: int | None = None,
        bootstrap: Iterable[str] = (),
        config: GossipConfig | None = None,
        sequence: SequenceCounter | None = None,
    ) -> None:
        self.identity_path = Path(identity_path)
        self.identity = Identity.load(self.identity_path)
        self.run_id = run_id
        self.admitted = admitted
        cfg = config or GossipConfig()
        if listen_port is not None:
            cfg = GossipConfig(**{**cfg.__dict__, "listen_port": listen_port})
        self.config = cfg
        self._sequence = sequence or SequenceCounter()
        self._known_peers: dict[str, None] = dict.fromkeys(bootstrap)
        self._subscriptions: dict[TopicKind, set[Subscription]] = {k: set() for k in TopicKind}
        self._children = _ChildSupervisor(
            self.identity_path, self.identity.peer_id, run_id, cfg, self._known_peers, self._handle
        )
        self._blacklisted: set[str] = set()
        #: Rejected incoming messages by RejectReason value (e.g. "forged_signature").
        self.rejections: Counter[str] = Counter()
        #: Verified messages delivered, by topic kind.
        self.delivered: Counter[str] = Counter()
        #: Score of each neighbour: rewarded for valid deliveries, penalised for rejected ones.
        self.scores: dict[str, float] = {}
        #: Connected gossip peers and per-topic mesh sizes, as last reported by the child (every second).
        self.peers: tuple[str, ...] = ()
        self.mesh_sizes: dict[TopicKind, int] = {}

    # -- public API ----------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def restarts(self) -> int:
        """How many times the child was restarted after dying."""
        return self._children.restarts

    @property
    def _child(self) -> _Child | None:
        """The current incarnation of the child process, if any."""
        return self._children.child

    @property
    def child_pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    @property
    def listen_maddrs(self) -> tuple[str, ...]:
        """Multiaddrs of the gossip host with our peer ID appended (what membership records carry)."""
        if self._child is None or self._child.hello is None:
            return ()
        suffix = f"/p2p/{self.peer_id}"
        return tuple(a if a.endswith(suffix) else a + suffix for a in self._child.hello.listen_maddrs)

    def topic(self, kind: TopicKind | str) -> str:
        """The full gossipsub topic name of `kind` in this run."""
        return topic_name(self.run_id, _resolve_topic(self.run_id, kind))

    async def publish(self, topic: TopicKind | str, message: Any, *, wait_s: float = 5.0) -> None:
        """Seal `message` with our key and publish it on `topic`; GossipError if the child stays down.

        The message type must be the one the topic carries (`TOPIC_MESSAGE`); others are a TypeError.
        """
        kind = _resolve_topic(self.run_id, topic)
        if not isinstance(message, TOPIC_MESSAGE[kind]):
            raise TypeError(f"{kind.value} carries {TOPIC_MESSAGE[kind].__name__}, not {type(message)}")
        data = seal(self.identity, self.run_id, message, self._sequence.next())
        child = await self._children.ready_child(wait_s)
        try:
            await child.send(BridgePublish(topic_name(self.run_id, kind), data))
        except (ConnectionError, OSError) as exc:
            raise GossipError(f"gossip child went away while publishing: {exc}") from exc

    def subscribe(self, topic: TopicKind | str) -> Subscription:
        """Verified messages of `topic` from now on (our own publications are not echoed back)."""
        kind = _resolve_topic(self.run_id, topic)
        sub = Subscription(self, kind, self.config.queue_size)
        self._subscriptions[kind].add(sub)
        return sub

    def add_peers(self, maddrs: Iterable[str]) -> None:
        """Dial these gossip addresses now and keep redialling them (they survive child restarts)."""
        new = [a for a in maddrs if a not in self._known_peers and not a.endswith(f"/p2p/{self.peer_id}")]
        if not new:
            return
        self._known_peers.update(dict.fromkeys(new))
        child = self._child
        if child is not None and child.ready.is_set():
            _send_soon(child, BridgeAddPeers(tuple(new)))

    async def wait_peers(self, n: int, timeout: float) -> None:
        """Wait until the child reports at least `n` connected peers and a mesh on every topic."""
        async with asyncio.timeout(timeout):
            while len(self.peers) < n or min(self.mesh_sizes.values(), default=0) < min(n, 1):
                await asyncio.sleep(0.1)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until a child is running and ready (e.g. after a restart)."""
        await self._children.ready_child(timeout)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def __aenter__(self) -> GossipService:
        await self._children.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop the child (graceful, then SIGTERM, then SIGKILL) and every task of the service."""
        await self._children.stop()

    # -- frames from the child -----------------------------------------------------------------------

    def _handle(self, child: _Child, msg: Any) -> None:
        if isinstance(msg, BridgeDeliver):
            self._on_deliver(msg)
        elif isinstance(msg, BridgeReject):
            self._on_reject(child, msg)
        elif isinstance(msg, BridgeAdmitQuery):
            _send_soon(child, BridgeAdmitReply(msg.peer_id, self._is_admitted(msg.peer_id)))
        elif isinstance(msg, BridgeStatus):
            self.peers = msg.peers
            self.mesh_sizes = dict(zip(TopicKind, msg.mesh_sizes, strict=False))
        else:
            log.warning("unexpected frame %s from the gossip child", type(msg).__name__)

    def _is_admitted(self, peer_id: str) -> bool:
        try:
            return bool(self.admitted(peer_id))
        except Exception:  # the policy is someone else's code: refuse, but say why
            log.exception("admission policy raised for %s; treating it as not admitted", peer_id)
            return False

    def _on_deliver(self, msg: BridgeDeliver) -> None:
        try:
            _, kind = parse_topic(msg.topic)
            payload = decode(msg.body, TOPIC_MESSAGE[kind])
        except (ValueError, ProtocolError) as exc:
            log.error("gossip child delivered an unreadable message on %s: %s", msg.topic, exc)
            return
        self.delivered[kind.value] += 1
        self.scores[msg.forwarder] = min(SCORE_CAP, self.scores.get(msg.forwarder, 0.0) + DELIVERY_REWARD)
        item = GossipMessage(kind, msg.sender, msg.seq, msg.ts, msg.forwarder, payload, time.time())
        for sub in list(self._subscriptions[kind]):
            sub._put(item)

    def _on_reject(self, child: _Child, msg: BridgeReject) -> None:
        self.rejections[msg.reason] += 1
        score = self.scores.get(msg.forwarder, 0.0) - PENALTIES.get(msg.reason, DEFAULT_PENALTY)
        self.scores[msg.forwarder] = score
        log.debug(
            "gossip rejected %s on %s via %s (claims %s); score %.1f",
            msg.reason,
            msg.topic,
            msg.forwarder,
            msg.claimed_sender or "?",
            score,
        )
        if score < self.config.blacklist_score and msg.forwarder not in self._blacklisted:
            log.warning("blacklisting gossip peer %s (score %.1f)", msg.forwarder, score)
            self._blacklisted.add(msg.forwarder)
            _send_soon(child, BridgeBlacklist(msg.forwarder))
