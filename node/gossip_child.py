"""The gossip child process: a py-libp2p host running gossipsub for one run, bridged to the daemon.

Why a separate process: hivemind 1.1.12 and py-libp2p 0.8.1 both register the protobuf symbol
`crypto.pb.KeyType`, so they cannot be imported into one interpreter. The daemon (asyncio, hivemind)
starts this module with `python -m intellect.node.gossip_child` and talks to it over one end of a Unix
socket pair (`--bridge-fd`), in length-prefixed frames of our codec (`protocol/gossip_messages.py`).
This module imports py-libp2p, trio, `intellect.crypto` and `intellect.protocol`, never hivemind or torch.

What happens here:
- The host uses the node's own Ed25519 key file, so the gossip peer ID equals the DHT peer ID.
- Gossipsub runs with strict signing (libp2p's own per-message signature by the origin) and one async
  topic validator per run topic. The validator opens our signed envelope (signature, run, admission,
  timestamp skew, replay guard) and checks that the envelope's author is the gossip message's origin and
  that the payload type fits the topic. A message the validator refuses is neither delivered nor
  forwarded by this peer; the refusal is reported to the parent, which counts it and lowers a score.
- Admission is the parent's policy: the child asks (`BridgeAdmitQuery`) and caches the answer briefly.
- The child exits when the parent says `BridgeStop` or when the bridge socket closes (parent gone), so
  it can never outlive the daemon for long.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiaddr
import trio
from intellect.crypto.identity import Identity
from intellect.protocol.codec import decode, encode, unpackb_limited
from intellect.protocol.envelope import EnvelopeVerifier, RejectReason, ReplayGuard
from intellect.protocol.errors import ProtocolError, Rejected
from intellect.protocol.gossip_messages import (
    FRAME_HEADER,
    MAX_FRAME,
    MAX_GOSSIP_DATA,
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
    TopicKind,
    frame,
    topic_name,
)
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service.context import background_trio_service

log = logging.getLogger("intellect.gossip.child")

#: Gossipsub mesh degree (D, D_lo, D_hi): go-libp2p's defaults.
DEGREE, DEGREE_LOW, DEGREE_HIGH = 6, 4, 12
#: Heartbeat period in seconds. py-libp2p's default is 120 s, which leaves a new peer outside the mesh
#: for minutes; go-libp2p uses 1 s, and so do we.
HEARTBEAT_S = 1
#: How long an admission answer from the parent is trusted before asking again.
ADMIT_TTL_S = 30.0
#: How long the validator waits for the parent's admission answer before refusing the message.
ADMIT_TIMEOUT_S = 2.0
#: How often known peers that are not connected are dialled again.
REDIAL_S = 5.0
#: Messages whose envelope was opened by the validator, waiting for their subscription delivery.
PENDING_OPENED = 8192


def libp2p_key_pair(identity: Identity) -> KeyPair:
    """The py-libp2p key pair of our identity (same seed, hence the same peer ID)."""
    seed = identity.to_protobuf()[4:36]
    private = Libp2pEd25519PrivateKey.from_bytes(seed)
    return KeyPair(private, private.get_public_key())


def _peek_sender(data: bytes) -> str | None:
    """The `sender` an envelope claims, without verifying anything; None when it cannot be read (the
    verifier then says precisely why)."""
    try:
        env = unpackb_limited(data, MAX_GOSSIP_DATA)
    except ProtocolError:
        return None
    sender = env.get("sender") if isinstance(env, dict) else None
    return sender if isinstance(sender, str) else None


class RejectedHere(Exception):
    """A gossip-level check of this module failed (before or after the envelope's own checks)."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class GossipChild:
    """One py-libp2p host + gossipsub router for one run, driven by frames from the bridge socket."""

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        listen: str,
        bridge: trio.SocketStream,
        *,
        rate_limit: float,
        skew_s: float,
    ) -> None:
        self.identity = identity
        self.run_id = run_id
        self.listen = multiaddr.Multiaddr(listen)
        self.bridge = bridge
        self.topics = {topic_name(run_id, kind): kind for kind in TopicKind}
        self.host = new_host(key_pair=libp2p_key_pair(identity), listen_addrs=[self.listen])
        self.router = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=DEGREE,
            degree_low=DEGREE_LOW,
            degree_high=DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_S,
            # py-libp2p drops everything a neighbour forwards on a topic beyond this many messages per
            # second (`_check_spam_protection`, keyed by the forwarder, not the author). A neighbour
            # forwards the whole run's traffic, so the default of 10 caps a run at 10 msg/s in total.
            max_messages_per_topic_per_second=rate_limit,
        )
        self.pubsub = Pubsub(self.host, self.router, strict_signing=True, cache_size=4096)
        self.my_id = self.host.get_id()
        self.verifier = EnvelopeVerifier(run_id, self._admitted_cached, ReplayGuard(skew_s=skew_s))
        self._admit: dict[str, tuple[bool, float]] = {}
        self._admit_waiters: dict[str, trio.Event] = {}
        self._opened: OrderedDict[bytes, tuple[Any, str]] = OrderedDict()
        self._known: dict[str, str] = {}  # peer ID -> multiaddr to keep dialled
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](4096)
        self._publish_send, self._publish_recv = trio.open_memory_channel[BridgePublish](4096)

    # -- bridge --------------------------------------------------------------------------------------

    async def _send(self, msg: Any) -> None:
        await self._out_send.send(frame(encode(msg)))

    async def _writer(self) -> None:
        async for data in self._out_recv:
            await self.bridge.send_all(data)

    async def _read_exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.bridge.receive_some(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    async def _reader(self, cancel: trio.CancelScope) -> None:
        """Read frames from the parent until it says stop or the socket closes."""
        while True:
            header = await self._read_exactly(FRAME_HEADER.size)
            if header is None:
                log.info("bridge closed by the parent; exiting")
                break
            (length,) = FRAME_HEADER.unpack(header)
            if length > MAX_FRAME:
                log.error("bridge frame of %s bytes exceeds %s; exiting", length, MAX_FRAME)
                break
            body = await self._read_exactly(length)
            if body is None:
                break
            msg = decode(body)
            if isinstance(msg, BridgeStop):
                log.info("stop requested by the parent (%s)", msg.reason)
                break
            self._dispatch(msg)
        cancel.cancel()

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, BridgePublish):
            try:
                self._publish_send.send_nowait(msg)
            except trio.WouldBlock:
                log.warning("publish queue full; dropping a message on %s", msg.topic)
        elif isinstance(msg, BridgeAdmitReply):
            self._admit[msg.peer_id] = (msg.admitted, time.monotonic() + ADMIT_TTL_S)
            waiter = self._admit_waiters.pop(msg.peer_id, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(msg, BridgeAddPeers):
            for maddr in msg.maddrs:
                try:
                    info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
                except (ValueError, TypeError) as exc:
                    log.warning("ignoring gossip address %r: %s", maddr, exc)
                    continue
                if info.peer_id != self.my_id:
                    self._known[info.peer_id.to_base58()] = maddr
            self._redial_now.set()
        elif isinstance(msg, BridgeBlacklist):
            log.info("blacklisting %s at the parent's request", msg.peer_id)
            self.pubsub.add_to_blacklist(ID.from_base58(msg.peer_id))
        else:
            log.warning("unexpected bridge message %s", type(msg).__name__)

    async def _publisher(self) -> None:
        async for msg in self._publish_recv:
            if msg.topic not in self.topics:
                log.warning("refusing to publish on foreign topic %s", msg.topic)
                continue
            await self.pubsub.publish(msg.topic, msg.data)

    # -- admission -----------------------------------------------------------------------------------

    def _admitted_cached(self, peer_id: str) -> bool:
        entry = self._admit.get(peer_id)
        return entry is not None and entry[0]

    async def _ensure_admission_known(self, peer_id: str) -> None:
        entry = self._admit.get(peer_id)
        if entry is not None and entry[1] > time.monotonic():
            return
        waiter = self._admit_waiters.get(peer_id)
        if waiter is None:
            waiter = self._admit_waiters[peer_id] = trio.Event()
            await self._send(BridgeAdmitQuery(peer_id))
        with trio.move_on_after(ADMIT_TIMEOUT_S):
            await waiter.wait()

    # -- validation ----------------------------------------------------------------------------------

    async def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """The topic validator: True lets gossipsub deliver and forward the message, False drops it."""
        origin = ID(msg.from_id)
        if origin == self.my_id:
            return True  # our own publish: the parent sealed it with our key
        topic = msg.topicIDs[0] if len(msg.topicIDs) == 1 else ""
        claimed: str | None = ""
        try:
            if topic not in self.topics:
                raise RejectedHere(RejectReason.MALFORMED, f"topics {list(msg.topicIDs)}")
            if len(msg.data) > MAX_GOSSIP_DATA:
                raise RejectedHere(RejectReason.OVERSIZED, f"{len(msg.data)} bytes")
            origin_b58 = origin.to_base58()
            claimed = _peek_sender(msg.data)
            if claimed is not None and claimed != origin_b58:
                # Someone re-published another peer's envelope under its own gossip identity. Checked
                # before the envelope is opened: opening records (sender, seq) in the replay guard, so a
                # front-runner could otherwise burn the author's sequence number and censor the original.
                raise RejectedHere(RejectReason.REPLAYED, "envelope author is not the gossip origin")
            await self._ensure_admission_known(origin_b58)
            opened = self.verifier.open(msg.data)
            expected = TOPIC_MESSAGE[self.topics[topic]]
            if not isinstance(opened.message, expected):
                raise RejectedHere(RejectReason.MALFORMED, f"{type(opened.message).__name__} on {topic}")
        except (Rejected, RejectedHere) as exc:
            await self._report_reject(topic, forwarder, claimed or "", exc.reason, str(exc))
            return False
        self._opened[self.pubsub.get_message_id(msg)] = (opened, forwarder.to_base58())
        while len(self._opened) > PENDING_OPENED:
            self._opened.popitem(last=False)
        return True

    async def _report_reject(
        self, topic: str, forwarder: ID, claimed: str, reason: RejectReason, detail: str
    ) -> None:
        log.debug("rejected a message on %s from %s: %s (%s)", topic, forwarder, reason.name, detail)
        await self._send(BridgeReject(topic, forwarder.to_base58(), claimed, reason.value))

    # -- delivery, status, dialling ------------------------------------------------------------------

    async def _deliver(self, topic: str, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            if ID(msg.from_id) == self.my_id:
                continue  # our own publish, echoed by the local subscription
            entry = self._opened.pop(self.pubsub.get_message_id(msg), None)
            if entry is None:
                log.warning("delivered message on %s was never validated here; dropping it", topic)
                continue
            opened, forwarder = entry
            await self._send(
                BridgeDeliver(topic, opened.sender, opened.seq, opened.ts, forwarder, encode(opened.message))
            )

    async def _status(self) -> None:
        while True:
            peers = tuple(p.to_base58() for p in self.host.get_connected_peers())
            mesh = tuple(len(self.router.mesh.get(t, ())) for t in self.topics)
            await self._send(BridgeStatus(peers, mesh))
            await trio.sleep(1.0)

    async def _dial(self, peer_id: str, maddr: str) -> None:
        try:
            with trio.fail_after(10):
                await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(maddr)))
            log.debug("connected to %s", peer_id)
        except Exception as exc:  # py-libp2p raises many unrelated types for an unreachable peer; logged
            log.info("could not dial %s at %s: %s", peer_id, maddr, exc)

    async def _redialer(self, nursery: trio.Nursery) -> None:
        """Keep every known peer connected: dial new ones at once, lost ones again every few seconds."""
        while True:
            connected = {p.to_base58() for p in self.host.get_connected_peers()}
            for peer_id, maddr in list(self._known.items()):
                if peer_id not in connected and peer_id not in self._dialling:
                    self._dialling.add(peer_id)
                    nursery.start_soon(self._dial_tracked, peer_id, maddr)
            self._redial_now = trio.Event()
            with trio.move_on_after(REDIAL_S):
                await self._redial_now.wait()

    async def _dial_tracked(self, peer_id: str, maddr: str) -> None:
        try:
            await self._dial(peer_id, maddr)
        finally:
            self._dialling.discard(peer_id)

    # -- main ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._redial_now = trio.Event()
        self._dialling: set[str] = set()
        async with (
            self.host.run(listen_addrs=[self.listen]),
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._writer)
            await self.pubsub.wait_until_ready()
            subscriptions = {}
            for topic in self.topics:
                self.pubsub.set_topic_validator(topic, self._validate, True)
                subscriptions[topic] = await self.pubsub.subscribe(topic)
            addrs = tuple(str(a) for a in self.host.get_addrs())
            await self._send(BridgeHello(self.my_id.to_base58(), addrs, os.getpid()))
            log.info("gossip host %s listening on %s", self.my_id, ", ".join(addrs))
            for topic, sub in subscriptions.items():
                nursery.start_soon(self._deliver, topic, sub)
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._status)
            nursery.start_soon(self._redialer, nursery)
            await self._reader(nursery.cancel_scope)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="intellect.node.gossip_child", description=__doc__)
    p.add_argument("--key", type=Path, required=True, help="the node's identity key file")
    p.add_argument("--run", required=True, help="run ID whose topics to join")
    p.add_argument("--listen", required=True, help="multiaddr to listen on, e.g. /ip4/127.0.0.1/tcp/0")
    p.add_argument("--bridge-fd", type=int, required=True, help="inherited socket to the parent")
    p.add_argument("--rate-limit", type=float, default=1000.0, help="per-neighbour msgs/s per topic")
    p.add_argument("--skew", type=float, default=30.0, help="allowed envelope timestamp skew (s)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, run: Callable[..., Any] = trio.run) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s gossip-child[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    # py-libp2p logs every rate-limited or invalid message at WARNING; our own counters report those.
    logging.getLogger("libp2p").setLevel(max(logging.ERROR, logging.getLogger().level))
    identity = Identity.load(args.key)
    sock = socket.socket(fileno=args.bridge_fd)

    async def _amain() -> None:
        bridge = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        child = GossipChild(
            identity, args.run, args.listen, bridge, rate_limit=args.rate_limit, skew_s=args.skew
        )
        await child.run()

    run(_amain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
