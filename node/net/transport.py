"""How the all-reduce data plane reaches the other members of a group: one connection per ordered pair.

Two transports share one `Conn` interface (exact reads into caller buffers, length-prefixed control frames):

- `Libp2pTransport`, what a node uses: a stream of the protocol `intellect-node/v1/allreduce` over the
  node's one libp2p identity, through its p2p daemon. The connection is the one libp2p already has or
  makes (direct, hole-punched or relayed, so a member behind a NAT is reachable through the connection it
  dialled out), and every byte is authenticated and encrypted by libp2p's Noise or TLS channel. The remote
  peer ID the daemon reports is authenticated by that channel; the data plane checks that the signed hello
  names the same peer.
- `TcpTransport`: plain TCP to a published host and port, for in-process tests of the butterfly and as the
  baseline of `bench/allreduce.py`. It has no channel security of its own (only the signed hello), so the
  daemon never uses it (docs/decisions.md, "All-reduce over libp2p streams").

Both bound the connections that have not finished their handshake yet (`PendingLimits`): per remote (IP
address for TCP, authenticated peer ID for libp2p) and in total. One over a cap is closed at once and counted
in the transport's `refused`. The deadline of a handshake is the data plane's (`DataPlane.handshake_timeout`);
a connection handed over to an attempt no longer counts (the plane keeps at most one per member of each open
group). The TCP accept loop survives accept errors (EMFILE and the like) and is restarted if it ends; the
libp2p listener (hivemind's Unix-socket server for the p2p daemon) is restarted if its task ends
(docs/decisions.md, "Data-plane connection caps").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from hivemind.p2p import PeerID
from intellect.node.net import shaping
from intellect.protocol import averaging_messages as am
from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.groups import GroupMember

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
#: The libp2p protocol of the data plane.
ALLREDUCE_PROTOCOL = "intellect-node/v1/allreduce"


class Conn(Protocol):
    """One direction-agnostic connection between two members."""

    #: The peer at the other end as authenticated by the transport ("" when it authenticates nobody).
    remote: str

    async def send(self, *buffers: bytes | bytearray | memoryview) -> None: ...

    async def recv_into(self, view: memoryview) -> None: ...

    def close(self) -> None: ...


async def recv_exactly(conn: Conn, n: int) -> bytearray:
    buf = bytearray(n)
    await conn.recv_into(memoryview(buf))
    return buf


async def send_frame(conn: Conn, msg: object) -> None:
    data = encode(msg)
    await conn.send(_LEN.pack(len(data)) + data)


async def gather_all(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run concurrently; on the first failure cancel the rest and raise it (not an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def recv_frame(conn: Conn) -> object:
    (n,) = _LEN.unpack(await recv_exactly(conn, _LEN.size))
    if n > am.MAX_CONTROL_FRAME:
        raise ProtocolError(f"control frame of {n} bytes exceeds {am.MAX_CONTROL_FRAME}")
    return decode(bytes(await recv_exactly(conn, n)))


class SocketConn:
    """A non-blocking TCP socket; reads go straight into the caller's buffer (`sock_recv_into`)."""

    remote = ""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.write_lock = asyncio.Lock()

    async def send(self, *buffers: bytes | bytearray | memoryview) -> None:
        async with self.write_lock:
            await shaping.current().send(sum(memoryview(b).nbytes for b in buffers))
            for buf in buffers:
                await self.loop.sock_sendall(self.sock, buf)

    async def recv_into(self, view: memoryview) -> None:
        filled, total = 0, len(view)
        while filled < total:
            got = await self.loop.sock_recv_into(self.sock, view[filled:])
            if got == 0:
                raise ConnectionError("peer closed the connection")
            filled += got
        await shaping.current().recv(total)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class StreamConn:
    """A libp2p stream through the p2p daemon, as the asyncio reader and writer hivemind hands us."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remote: str,
        shaper: shaping.Shaper | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.remote = remote
        #: The volunteer's rate limits and transfer count (None: the process's, `shaping.current()`).
        self.shaper = shaper
        self.write_lock = asyncio.Lock()
        self.closed = asyncio.Event()

    async def send(self, *buffers: bytes | bytearray | memoryview) -> None:
        async with self.write_lock:
            await (self.shaper or shaping.current()).send(sum(memoryview(b).nbytes for b in buffers))
            for buf in buffers:
                self.writer.write(buf)
            await self.writer.drain()

    async def recv_into(self, view: memoryview) -> None:
        try:
            data = await self.reader.readexactly(len(view))
        except asyncio.IncompleteReadError as e:
            raise ConnectionError("peer closed the stream") from e
        view[:] = data
        await (self.shaper or shaping.current()).recv(len(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the daemon may already have torn the stream down
            self.writer.close()
        self.closed.set()


OnConn = Callable[[Conn], Coroutine[Any, Any, None]]

#: Default caps on connections still in their handshake (docs/decisions.md, "Data-plane connection caps").
MAX_PENDING_PER_REMOTE = 8
MAX_PENDING = 128
#: At most one warning line per this many seconds about connections refused over a cap (all are counted).
REFUSAL_LOG_EVERY_S = 30.0
#: The sleep after a failed accept, doubled per consecutive failure up to ACCEPT_BACKOFF_MAX_S.
ACCEPT_BACKOFF_S = 0.1
ACCEPT_BACKOFF_MAX_S = 1.0
#: How often `Libp2pTransport` checks that hivemind's listener for the p2p daemon still runs.
LISTENER_CHECK_S = 5.0


def _backoff(failures: int) -> float:
    """ACCEPT_BACKOFF_S doubled per earlier consecutive failure, at most ACCEPT_BACKOFF_MAX_S."""
    return min(ACCEPT_BACKOFF_MAX_S, ACCEPT_BACKOFF_S * 2 ** min(failures, 8))


class OverCap(enum.StrEnum):
    """Why a transport closed a connection before the data plane saw it: the keys of its `refused`."""

    #: The remote (IP address or peer ID) already has `per_remote` connections in their handshake.
    PER_REMOTE = "pending-per-remote"
    #: `total` connections are in their handshake.
    TOTAL = "pending-total"


class PendingLimits:
    """The connections in their handshake, per remote and in total; admits a new one only under both caps."""

    def __init__(self, per_remote: int = MAX_PENDING_PER_REMOTE, total: int = MAX_PENDING) -> None:
        if per_remote < 1 or total < 1:
            raise ValueError(f"pending caps must be >= 1, got {per_remote} per remote, {total} in total")
        self.per_remote = per_remote
        self.total = total
        #: Connections in their handshake, by remote.
        self.pending: dict[str, int] = {}
        self.pending_total = 0
        #: Connections closed over a cap, by `OverCap` (metrics, like `DataPlane.rejected`).
        self.refused: dict[str, int] = {}
        self._unlogged = 0
        self._logged_at = float("-inf")

    def admit(self, remote: str) -> bool:
        """Count a new connection from `remote` as pending; False (and counted as refused) over a cap."""
        held = self.pending.get(remote, 0)
        if held < self.per_remote and self.pending_total < self.total:
            self.pending[remote] = held + 1
            self.pending_total += 1
            return True
        reason = OverCap.PER_REMOTE if held >= self.per_remote else OverCap.TOTAL
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_EVERY_S:
            logger.warning(
                "allreduce: closed %d connection(s) over the handshake caps (%d per remote, %d in total) "
                "since the last such line; the latest was %s from %s",
                self._unlogged,
                self.per_remote,
                self.total,
                reason.value,
                remote,
            )
            self._unlogged, self._logged_at = 0, now
        return False

    def release(self, remote: str) -> None:
        """The handshake of one admitted connection from `remote` is over (handed over or closed)."""
        held = self.pending.get(remote, 0) - 1
        if held > 0:
            self.pending[remote] = held
        else:
            self.pending.pop(remote, None)
        self.pending_total -= 1


class Transport(Protocol):
    """Accepts connections for the data plane and dials members."""

    #: What we publish in group records for members to dial (TCP only; libp2p dials by peer ID).
    host: str
    port: int
    #: Connections closed before their handshake because of a cap, by `OverCap`.
    refused: dict[str, int]

    async def start(self, on_conn: OnConn) -> None: ...

    async def stop(self) -> None: ...

    async def dial(self, member: GroupMember) -> Conn: ...


class TcpTransport:
    """A TCP listener on (host, port); `port` 0 picks a free one. Dials the host and port members publish.

    At most `max_pending_per_remote` connections per IP address and `max_pending` in total may be in their
    handshake (`on_conn` not yet returned); the accept loop sleeps over failed accepts (EMFILE, ENFILE,
    ENOBUFS, ENOMEM, ...) and is restarted if its task ends while the transport runs.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        backlog: int = 128,
        *,
        max_pending_per_remote: int = MAX_PENDING_PER_REMOTE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.host = host
        self.port = port
        self.backlog = backlog
        self.limits = PendingLimits(max_pending_per_remote, max_pending)
        self.refused = self.limits.refused
        #: Failed accepts the loop slept over.
        self.accept_errors = 0
        #: Times the accept loop ended (crashed or was cancelled by someone else) and was started again.
        self.restarts = 0
        self._sock: socket.socket | None = None
        self._on_conn: OnConn | None = None
        self._accept: asyncio.Task[None] | None = None
        self._accept_started = 0.0
        self._quick_restarts = 0
        self._restart_handle: asyncio.TimerHandle | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_conn: OnConn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(self.backlog)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._on_conn = on_conn
        self._stopping = False
        self._spawn_accept()

    def _spawn_accept(self) -> None:
        self._restart_handle = None
        if self._stopping or self._sock is None or self._on_conn is None:
            return
        self._accept_started = time.monotonic()
        task = asyncio.create_task(self._accept_loop(self._sock, self._on_conn), name="allreduce-accept")
        task.add_done_callback(self._accept_ended)
        self._accept = task

    def _accept_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task is not self._accept:
            return
        err = None if task.cancelled() else task.exception()
        self.restarts += 1
        # Back off only when the loop keeps ending soon after each start (a persistent fault).
        quick = time.monotonic() - self._accept_started < 10.0
        self._quick_restarts = self._quick_restarts + 1 if quick else 0
        delay = _backoff(self._quick_restarts) if quick else 0.0
        logger.error(
            "allreduce accept loop ended (%s); restarting it in %.1fs (restart %d)",
            "cancelled" if err is None else repr(err),
            delay,
            self.restarts,
            exc_info=err,
        )
        self._restart_handle = task.get_loop().call_later(delay, self._spawn_accept)

    async def _accept_loop(self, sock: socket.socket, on_conn: OnConn) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                client, addr = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED...: the listener is fine
                failures += 1
                self.accept_errors += 1
                if failures == 1:
                    logger.warning(
                        "allreduce accept on port %d failed (%s); retrying with backoff", self.port, e
                    )
                await asyncio.sleep(_backoff(failures - 1))
                continue
            if failures:
                logger.info("allreduce accepts again after %d failed accept(s)", failures)
                failures = 0
            self._admit(client, str(addr[0]), on_conn)

    def _admit(self, client: socket.socket, remote: str, on_conn: OnConn) -> None:
        if not self.limits.admit(remote):
            client.close()
            return
        task = asyncio.create_task(on_conn(SocketConn(client)), name="allreduce-handshake")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self.limits.release(remote))

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        tasks = [t for t in (self._accept, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._accept = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def dial(self, member: GroupMember) -> Conn:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (member.host, member.port))
        except BaseException:
            sock.close()
            raise
        return SocketConn(sock)


class Libp2pTransport:
    """Streams of `ALLREDUCE_PROTOCOL` through the node's p2p daemon (`hivemind.p2p.P2P`).

    At most `max_pending_per_remote` streams per (authenticated) peer ID and `max_pending` in total may be
    in their handshake. Every incoming stream reaches us through hivemind's one Unix-socket server for the
    daemon, run by a task of the `P2P`; asyncio's server itself sleeps over EMFILE and the like, and if that
    task ends while the daemon lives, it is started again and our handler registered again.
    """

    host = ""
    port = 0

    def __init__(
        self,
        p2p: Any,
        protocol: str = ALLREDUCE_PROTOCOL,
        connect: Callable[[str], Coroutine[Any, Any, object]] | None = None,
        *,
        max_pending_per_remote: int = MAX_PENDING_PER_REMOTE,
        max_pending: int = MAX_PENDING,
        check_every_s: float = LISTENER_CHECK_S,
    ) -> None:
        self.p2p = p2p
        self.protocol = protocol
        #: Makes sure the daemon is connected to a peer before a stream is opened by its peer ID (through
        #: the addresses the peer announced, e.g. its circuit addresses behind a NAT).
        self.connect = connect
        self.limits = PendingLimits(max_pending_per_remote, max_pending)
        self.refused = self.limits.refused
        #: Times hivemind's listener had ended and was started again.
        self.restarts = 0
        self.check_every_s = check_every_s
        self._on_conn: OnConn | None = None
        self._open: set[StreamConn] = set()
        self._watch: asyncio.Task[None] | None = None

    async def start(self, on_conn: OnConn) -> None:
        self._on_conn = on_conn
        await self.p2p.add_binary_stream_handler(self.protocol, self._handle)
        self._watch = asyncio.create_task(self._watch_listener(), name="allreduce-listener-watch")

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = info.peer_id.to_base58()
        if not self.limits.admit(remote):
            with contextlib.suppress(Exception):
                writer.close()
            return
        conn = StreamConn(reader, writer, remote)
        self._open.add(conn)
        try:
            try:
                assert self._on_conn is not None
                await self._on_conn(conn)
            finally:
                self.limits.release(remote)
            # A stream handed over to an attempt lives on after the handshake: the daemon's stream must
            # stay open until the attempt closes it.
            await conn.closed.wait()
        finally:
            self._open.discard(conn)
            conn.close()

    async def _watch_listener(self) -> None:
        while True:
            await asyncio.sleep(self.check_every_s)
            task = getattr(self.p2p, "_listen_task", None)
            if task is None or not task.done() or not getattr(self.p2p, "is_alive", False):
                continue
            self.restarts += 1
            err = None if task.cancelled() else task.exception()
            logger.error(
                "the p2p daemon's stream listener ended (%s); starting it again (restart %d)",
                "cancelled" if err is None else repr(err),
                self.restarts,
            )
            self.p2p._listen_task = None  # hivemind starts a new one on the next handler registration
            try:
                await self.p2p.add_binary_stream_handler(self.protocol, self._handle)
            except Exception as e:  # the daemon may be going away; try again at the next check
                logger.warning("could not register the allreduce stream handler again: %s", e)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        for conn in list(self._open):
            conn.close()
        with contextlib.suppress(Exception):  # the daemon may be gone already at shutdown
            await self.p2p.remove_binary_stream_handler(self.protocol)

    async def dial(self, member: GroupMember) -> Conn:
        if self.connect is not None:
            await self.connect(member.peer_id)
        try:
            _info, reader, writer = await self.p2p.call_binary_stream_handler(
                PeerID.from_base58(member.peer_id), self.protocol
            )
        except Exception as e:  # hivemind raises P2PDaemonError / ControlFailure for dial failures
            raise ConnectionError(f"libp2p stream to {member.peer_id}: {e}") from e
        return StreamConn(reader, writer, member.peer_id)
