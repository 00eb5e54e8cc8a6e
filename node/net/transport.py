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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from hivemind.p2p import PeerID
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
            for buf in buffers:
                await self.loop.sock_sendall(self.sock, buf)

    async def recv_into(self, view: memoryview) -> None:
        filled, total = 0, len(view)
        while filled < total:
            got = await self.loop.sock_recv_into(self.sock, view[filled:])
            if got == 0:
                raise ConnectionError("peer closed the connection")
            filled += got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class StreamConn:
    """A libp2p stream through the p2p daemon, as the asyncio reader and writer hivemind hands us."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: str) -> None:
        self.reader = reader
        self.writer = writer
        self.remote = remote
        self.write_lock = asyncio.Lock()
        self.closed = asyncio.Event()

    async def send(self, *buffers: bytes | bytearray | memoryview) -> None:
        async with self.write_lock:
            for buf in buffers:
                self.writer.write(buf)
            await self.writer.drain()

    async def recv_into(self, view: memoryview) -> None:
        try:
            data = await self.reader.readexactly(len(view))
        except asyncio.IncompleteReadError as e:
            raise ConnectionError("peer closed the stream") from e
        view[:] = data

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the daemon may already have torn the stream down
            self.writer.close()
        self.closed.set()


OnConn = Callable[[Conn], Coroutine[Any, Any, None]]


class Transport(Protocol):
    """Accepts connections for the data plane and dials members."""

    #: What we publish in group records for members to dial (TCP only; libp2p dials by peer ID).
    host: str
    port: int

    async def start(self, on_conn: OnConn) -> None: ...

    async def stop(self) -> None: ...

    async def dial(self, member: GroupMember) -> Conn: ...


class TcpTransport:
    """A TCP listener on (host, port); `port` 0 picks a free one. Dials the host and port members publish."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> None:
        self.host = host
        self.port = port
        self.backlog = backlog
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_conn: OnConn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(self.backlog)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop(on_conn), name="allreduce-accept")

    async def _accept_loop(self, on_conn: OnConn) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            client, _addr = await loop.sock_accept(self._sock)
            task = asyncio.create_task(on_conn(SocketConn(client)), name="allreduce-handshake")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
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
    """Streams of `ALLREDUCE_PROTOCOL` through the node's p2p daemon (`hivemind.p2p.P2P`)."""

    host = ""
    port = 0

    def __init__(
        self,
        p2p: Any,
        protocol: str = ALLREDUCE_PROTOCOL,
        connect: Callable[[str], Coroutine[Any, Any, object]] | None = None,
    ) -> None:
        self.p2p = p2p
        self.protocol = protocol
        #: Makes sure the daemon is connected to a peer before a stream is opened by its peer ID (through
        #: the addresses the peer announced, e.g. its circuit addresses behind a NAT).
        self.connect = connect
        self._on_conn: OnConn | None = None
        self._open: set[StreamConn] = set()

    async def start(self, on_conn: OnConn) -> None:
        self._on_conn = on_conn
        await self.p2p.add_binary_stream_handler(self.protocol, self._handle)

    async def _handle(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = StreamConn(reader, writer, info.peer_id.to_base58())
        self._open.add(conn)
        try:
            assert self._on_conn is not None
            await self._on_conn(conn)
            # A stream handed over to an attempt lives on after the handshake: the daemon's stream must
            # stay open until the attempt closes it.
            await conn.closed.wait()
        finally:
            self._open.discard(conn)
            conn.close()

    async def stop(self) -> None:
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
