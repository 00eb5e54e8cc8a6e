"""The gossip child process: a py-libp2p host running gossipsub for one run, bridged to the daemon.

Why a separate process: hivemind 1.1.12 and py-libp2p 0.8.1 both register the protobuf symbol
`crypto.pb.KeyType`, so they cannot be imported into one interpreter. The daemon (asyncio, hivemind)
starts this module with `python -m intellect.node.net.gossip_child` and talks to it over one end of a Unix
socket pair (`--bridge-fd`), in length-prefixed frames of our codec (`protocol/gossip_messages.py`).
This module imports py-libp2p, trio, `intellect.crypto` and `intellect.protocol`, never hivemind or torch.

What happens here:
- The host uses the node's own Ed25519 key file, so the gossip peer ID equals the DHT peer ID.
- Gossipsub runs with strict signing (libp2p's own per-message signature by the origin) and one async
  topic validator per run topic. The validator opens our signed envelope (signature, run, admission,
  timestamp skew, replay guard) and checks that the envelope's author is the gossip message's origin and
  that the payload type fits the topic. A message the validator refuses is neither delivered nor
  forwarded by this peer; the refusal is reported to the parent, which counts it and lowers a score. A
  message it accepts is handed to the parent by the validator itself, once per gossip message ID.
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
from intellect.protocol.envelope import EnvelopeVerifier, Opened, RejectReason, ReplayGuard
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
    frame,
)
from intellect.protocol.keys import TopicKind, topic_name
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service.context import background_trio_service

log = logging.getLogger("intellect.gossip.child")

#: Gossipsub mesh degree (D, D_lo, D_hi). Lower than go-libp2p's 6/5/12 because every copy of a message
#: costs py-libp2p a full RPC (read, decrypt, parse, signed-record check), and a node accepts GRAFTs up to
#: D_hi, so in a run of up to D_hi + 1 peers (where every daemon dials every member) gossip floods: each
#: node receives each message from every other peer. Measured among 8 peers that all dial each other, at 1
#: message per second per peer: 6/4/12 gives meshes of 7 and ~19 ms of child CPU per delivered message,
#: 4/3/6 meshes of 3-6 and ~13 ms, with the same delivery (see docs/decisions.md). IHAVE gossip to peers
#: outside the mesh still repairs what a mesh path loses, and the DHT remains the source of truth.
DEGREE, DEGREE_LOW, DEGREE_HIGH = 4, 3, 6
#: Heartbeat period in seconds. py-libp2p's default is 120 s, which leaves a new peer outside the mesh
#: for minutes; go-libp2p uses 1 s, and so do we.
HEARTBEAT_S = 1
#: How long an admission answer from the parent is trusted before asking again.
ADMIT_TTL_S = 30.0
#: How long the validator waits for the parent's admission answer before refusing the message.
ADMIT_TIMEOUT_S = 2.0
#: How often known peers that are not connected are dialled again.
REDIAL_S = 5.0
#: Gossipsub message IDs whose first copy passed the validator, most recent last.
ACCEPTED_IDS = 16384
#: Gossipsub versions we speak. Not /meshsub/1.2.0: py-libp2p 0.8.1 answers every message it receives on a
#: 1.2 link with one IDONTWANT RPC per mesh peer, whatever its size (go-libp2p does so only above 1 KiB),
#: which roughly doubles the RPCs a small control-plane message costs (measured among 8 peers, together
#: with adaptive gossip off: ~22 -> ~14 ms of child CPU per delivered message; see docs/decisions.md).
#: Our messages are a few hundred bytes.
PROTOCOLS = (PROTOCOL_ID_V11, PROTOCOL_ID)


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
        self.host = new_host(
            key_pair=libp2p_key_pair(identity),
            listen_addrs=[self.listen],
            disable_identify_address_discovery=True,
        )
        self.router = GossipSub(
            protocols=list(PROTOCOLS),
            degree=DEGREE,
            degree_low=DEGREE_LOW,
            degree_high=DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_S,
            # py-libp2p's "adaptive gossip" recomputes a network health score every 30 s and, when it is
            # below 0.7 (as soon as a topic's mesh is smaller than D, e.g. in any run of fewer than seven
            # peers), sets the heartbeat to 30-60 s: mesh repair and IHAVE gossip then stall for a minute.
            adaptive_gossip_enabled=False,
            # py-libp2p refuses to pass on a message when the neighbour that handed it over sent more than
            # this many on the topic in the last second (`_check_spam_protection`, keyed by the forwarder,
            # not the author; checked after local delivery, so the loss falls on the peers behind us). Our
            # own publications count as forwarded by us, so above it they are not sent at all. A neighbour
            # relays the whole run's traffic; the default of 10 lost 36% of the messages of 2 peers
            # publishing 15/s each, and 3.4% among 4 peers in a tree at 5/s each (docs/decisions.md).
            max_messages_per_topic_per_second=rate_limit,
        )
        self.pubsub = Pubsub(self.host, self.router, strict_signing=True, cache_size=4096)
        self.my_id = self.host.get_id()
        self.verifier = EnvelopeVerifier(run_id, self._admitted_cached, ReplayGuard(skew_s=skew_s))
        self._admit: dict[str, tuple[bool, float]] = {}
        self._admit_waiters: dict[str, trio.Event] = {}
        self._accepted: OrderedDict[bytes, None] = OrderedDict()
        self._validating: dict[bytes, trio.Event] = {}
        #: Copies of an accepted message that reached the validator (refused without a report).
        self.duplicates = 0
        self._known: dict[str, str] = {}  # peer ID -> multiaddr to keep dialled
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](4096)
        self._publish_send, self._publish_recv = trio.open_memory_channel[BridgePublish](4096)

    # -- bridge --------------------------------------------------------------------------------------

    async def _send(self, msg: Any) -> None:
        await self._out_send.send(frame(encode(msg)))

    async def _writer(self, cancel: trio.CancelScope) -> None:
        try:
            async for data in self._out_recv:
                await self.bridge.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("bridge closed by the parent; exiting")
            cancel.cancel()

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
            started = time.monotonic()
            await self.pubsub.publish(msg.topic, msg.data)
            if (took := time.monotonic() - started) > 0.25:
                log.warning("publishing on %s took %.2fs", msg.topic, took)

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
        """The topic validator: True lets gossipsub deliver and forward the message, False drops it.

        py-libp2p marks a message as seen only after validating it, so copies of one message from several
        mesh peers reach this validator concurrently. One copy is checked at a time: once a copy passed,
        the others are refused without a report (the accepted copy is the one delivered and forwarded;
        checking them would fail the replay guard and unjustly lower the score of honest forwarders). When
        a copy failed, the next one is checked on its own: the failure may have been local and passing
        (an admission answer that came too late), or that copy's forwarder has earned its own penalty.
        """
        origin = ID(msg.from_id)
        if origin == self.my_id:
            return True  # our own publish: the parent sealed it with our key
        msg_id = self.pubsub.get_message_id(msg)
        while (pending := self._validating.get(msg_id)) is not None:
            await pending.wait()
        if msg_id in self._accepted:
            self.duplicates += 1
            return False
        self._validating[msg_id] = done = trio.Event()
        try:
            opened = await self._check(forwarder, msg)
            if opened is None:
                return False
            # Handed to the parent here rather than from the topic subscription: py-libp2p's subscription
            # channel holds 32 messages and drops the rest of a burst (while still forwarding them).
            topic = msg.topicIDs[0]
            body = encode(opened.message)
            await self._send(
                BridgeDeliver(topic, opened.sender, opened.seq, opened.ts, forwarder.to_base58(), body)
            )
            self._accepted[msg_id] = None
            while len(self._accepted) > ACCEPTED_IDS:
                self._accepted.popitem(last=False)
            return True
        finally:
            del self._validating[msg_id]
            done.set()

    async def _check(self, forwarder: ID, msg: rpc_pb2.Message) -> Opened | None:
        """Every check of one copy of a message: the opened envelope, or None (reported to the parent)."""
        origin = ID(msg.from_id)
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
            return None
        return opened

    async def _report_reject(
        self, topic: str, forwarder: ID, claimed: str, reason: RejectReason, detail: str
    ) -> None:
        log.debug("rejected a message on %s from %s: %s (%s)", topic, forwarder, reason.name, detail)
        await self._send(BridgeReject(topic, forwarder.to_base58(), claimed, reason.value))

    # -- delivery, status, dialling ------------------------------------------------------------------

    async def _drain(self, subscription: Any) -> None:
        """Empty a topic subscription: messages reach the parent from the validator (see `_validate`); the
        subscription only makes this host a member of the topic's mesh."""
        async for _ in subscription:
            pass

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
            nursery.start_soon(self._writer, nursery.cancel_scope)
            await self.pubsub.wait_until_ready()
            subscriptions = {}
            for topic in self.topics:
                self.pubsub.set_topic_validator(topic, self._validate, True)
                subscriptions[topic] = await self.pubsub.subscribe(topic)
            addrs = tuple(str(a) for a in self.host.get_addrs())
            await self._send(BridgeHello(self.my_id.to_base58(), addrs, os.getpid()))
            log.info("gossip host %s listening on %s", self.my_id, ", ".join(addrs))
            for sub in subscriptions.values():
                nursery.start_soon(self._drain, sub)
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._status)
            nursery.start_soon(self._redialer, nursery)
            await self._reader(nursery.cancel_scope)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="intellect.node.net.gossip_child", description=__doc__)
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
    # py-libp2p logs every rate-limited or invalid message at WARNING (and multiaddr every parse at DEBUG);
    # our own counters report what matters.
    for noisy in ("libp2p", "multiaddr"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, logging.getLogger().level))
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
    code = main()
    # The service tree has shut down in order (host, connections and bridge closed). Tearing down an
    # interpreter that imported py-libp2p takes a noticeable amount of CPU (module and heap finalisation:
    # 2-5 s of wall time measured with eight children on a loaded 2-core machine, past the parent's grace
    # period), and nothing is left for it to flush: exit at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
