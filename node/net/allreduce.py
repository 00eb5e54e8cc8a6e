"""Butterfly all-reduce (reduce-scatter + all-gather) between the members of one group, over direct TCP.

Why our own and not hivemind's `AllReduceRunner`: on loopback hivemind's all-reduce is CPU-bound at about
10× gloo's time (docs/decisions.md, "All-reduce transport"); this one reads straight into preallocated
tensors with `loop.sock_recv_into`, does the reduction with torch, and stays within a small factor of gloo.
Group formation, retries and deadlines live in `intellect.node.net.averaging`, the group itself and its
partitioning in `intellect.protocol.groups`; this module only runs one attempt for a fixed, agreed member
list and either returns the average (`ReducedVector`) or raises `AllReduceError`.

Protocol (see `intellect.protocol.averaging_messages`): every member opens one connection to every other
member and proves its peer ID there (signed hello over the receiver's fresh nonce, domain ALLREDUCE).
The flat fp32 vector is cut into one contiguous partition per member; member i sends partition j of its
tensors to member j (compressed), j checks every contribution (finite, well-sized, weight in range),
computes the weighted mean in fp32, compresses it once and sends those bytes to everyone. Every member,
the owner included, uses the *decoded* bytes, so all members end with bit-identical averages.

Any failure (a member that stalls past the stall timeout, disconnects, sends a malformed or non-finite
part, or saw a different member list) aborts the attempt for everyone: a member either returns the full
average of all members or raises; no member ever returns a partial average. Why an attempt failed is an
`averaging_messages.AbortReason`; why the data plane refused a connection is a `RefusedConnection`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import os
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from intellect.crypto import domains
from intellect.crypto.identity import Identity, verify
from intellect.node.engine.robust import REDUCERS, reduce_partition
from intellect.node.net import receipting
from intellect.node.net.agreement import Agreement, AgreementError, Ledger, Seal, witness_of
from intellect.node.net.transport import (
    Conn,
    TcpTransport,
    Transport,
    gather_all,
    recv_exactly,
    recv_frame,
    send_frame,
)
from intellect.protocol import averaging_messages as am
from intellect.protocol.averaging_messages import AbortReason, HandshakeRefusal
from intellect.protocol.codec import encode, packb_canonical
from intellect.protocol.errors import ProtocolError
from intellect.protocol.groups import SEQ_BITS, GroupMember, GroupSpec
from intellect.protocol.receipts import Receipt

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
T = TypeVar("T")
#: How long an incoming hello waits for us to open the slot of its group (a member a little ahead of us)
#: before it is refused as stale: far longer than any stall timeout of the sender's.
SLOT_WAIT_S = 60.0


class AllReduceError(Exception):
    """One all-reduce attempt failed; nobody may use a result. `culprit` names a misbehaving member."""

    def __init__(
        self,
        failure: AbortReason,
        culprit: str = "",
        detail: str = "",
        *,
        peer_reason: str | None = None,
        sender: str = "",
    ) -> None:
        #: The failure's value; for ABORTED_BY_PEER, "aborted-by-peer:<the reason the peer sent>".
        self.reason: str = failure if peer_reason is None else f"{failure}:{peer_reason}"
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)
        self.failure = failure
        self.culprit = culprit
        self.detail = detail
        #: For ABORTED_BY_PEER: the member that sent the Abort (its `culprit` is only its word).
        self.sender = sender
        #: For ABORTED_BY_PEER: the reason the member sent.
        self.peer_reason = peer_reason or ""
        #: Members under suspicion without proof (both sides of a dispute nobody can settle).
        self.suspects: tuple[str, ...] = ()
        #: Signed proof against `culprit` that any peer can check (`am.Equivocation`), when there is one.
        self.evidence: am.Equivocation | None = None
        #: For ABORTED_BY_PEER: the signed Abort itself, which we pass on unchanged (`abort_error`).
        self.abort: am.Abort | None = None


async def _settle(task: asyncio.Future[Any]) -> None:
    """Cancel `task` if it still runs, and take its outcome either way: one that finished while we woke for
    something else (a slot's failure) must still be retrieved, or asyncio logs "Task exception was never
    retrieved"."""
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    elif not task.cancelled():
        task.exception()


def _false_abort(attempt: _Attempt, framed: str) -> am.Abort:
    """Fault injection (`Tamper.false_abort`): an Abort naming `framed`, signed if the tamper says so."""
    abort = am.Abort(AbortReason.NON_FINITE_PART.value, framed)
    if attempt.tamper.sign_aborts:
        abort = abort.signed(attempt.plane.identity, attempt.spec.group_id)
    return abort


def abort_error(msg: am.Abort, via: str, spec: GroupSpec) -> AllReduceError:
    """What an Abort that member `via` sent us means. Signed by a member of the group for this attempt: that
    member (its *origin*) gave up, whether `via` is the origin or relays its Abort, so the origin is whom
    the failed attempt is blamed on (`sender`), never a relay. Otherwise `via` broke the protocol: an
    unsigned Abort could only be blamed on whoever passed it on, which is how one aborting member made
    honest members blame each other for a whole round (docs/decisions.md, "Byzantine benchmark")."""
    if msg.origin not in spec.peer_ids or not msg.verify(spec.group_id):
        detail = f"{via} sent an Abort that no member of the group signed"
        return AllReduceError(AbortReason.MALFORMED_PART, culprit=via, detail=detail)
    relayed = f", relayed by {via}" if msg.origin != via else ""
    err = AllReduceError(
        AbortReason.ABORTED_BY_PEER,
        culprit=msg.culprit,
        detail=f"{msg.origin} aborted{relayed}",
        peer_reason=msg.reason,
        sender=msg.origin,
    )
    err.abort = msg
    return err


# --------------------------------------------------------------------------------------------------------
# Pure parts: schema, flattening, partitioning, payload codecs


def tensor_schema(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of every tensor, sorted by name: what members must share to average."""
    return tuple((name, tuple(t.shape), str(t.dtype)) for name, t in sorted(tensors.items()))


def schema_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of the schema; part of the DHT group key so only peers with identical tensors meet."""
    plain = [[name, list(shape), dtype] for name, shape, dtype in tensor_schema(tensors)]
    return hashlib.sha256(packb_canonical(plain)).hexdigest()


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One contiguous fp32 CPU vector of all tensors in schema (name) order."""
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for _, t in sorted(tensors.items())]
    if not parts:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(parts)


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut `flat` back into tensors shaped and typed like `like` (on CPU)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in sorted(like.items()):
        n = t.numel()
        out[name] = flat[offset : offset + n].reshape(t.shape).to(dtype=t.dtype).clone()
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, tensors need {offset}")
    return out


class PayloadCodec(Protocol):
    """How a partition travels: `encode` to bytes, `decode` back to fp32 (deterministic on every peer)."""

    name: str

    def encode(self, part: torch.Tensor) -> bytes | memoryview: ...

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor: ...

    def roundtrip(self, part: torch.Tensor) -> tuple[bytes | memoryview, torch.Tensor]:
        """`encode(part)` and what every receiver will decode from it (the owner uses the latter too)."""
        ...

    def max_bytes(self, numel: int) -> int: ...

    def error_bound(self, decoded: torch.Tensor) -> float:
        """An upper bound on ‖x − decoded‖ over every x that encodes to `decoded` (what verifiers allow an
        owner's reduced partition to have moved by the codec; `intellect.node.engine.verify`)."""
        ...


class RawFp32Codec:
    """No compression: little-endian fp32 bytes."""

    name = "none"

    def encode(self, part: torch.Tensor) -> bytes | memoryview:
        # A view of the tensor's own memory: no copy before the socket (the view keeps the tensor alive).
        return part.detach().to(torch.float32).contiguous().numpy().data.cast("B")

    def roundtrip(self, part: torch.Tensor) -> tuple[bytes | memoryview, torch.Tensor]:
        return self.encode(part), part

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
        if len(data) != 4 * numel:
            raise ValueError(f"fp32 payload of {numel} values must have {4 * numel} bytes, got {len(data)}")
        return torch.frombuffer(bytearray(data), dtype=torch.float32) if numel else torch.zeros(0)

    def max_bytes(self, numel: int) -> int:
        return 4 * numel

    def error_bound(self, decoded: torch.Tensor) -> float:
        return 0.0


class CompressorCodec:
    """Adapter from `intellect.node.engine.compression` (C's compressors) to bytes on the wire.

    The compressor is used without error feedback here: a failed attempt is retried with the same inputs,
    and error feedback would count the residual twice. Error feedback on pseudo-gradients belongs to the
    caller, which knows whether the round committed.
    """

    def __init__(self, name: str) -> None:
        from intellect.node.engine import compression

        self.name = name
        kwargs: dict[str, Any] = {} if name == "none" else {"error_feedback": False}
        self._impl: Any = compression.get_compressor(name, **kwargs)
        self._mod: Any = compression

    def encode(self, part: torch.Tensor) -> bytes | memoryview:
        return bytes(self._impl.compress("part", part).to_wire())

    def roundtrip(self, part: torch.Tensor) -> tuple[bytes | memoryview, torch.Tensor]:
        payload = self.encode(part)
        return payload, self.decode(payload, part.numel())

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
        ct = self._mod.CompressedTensor.from_wire(data, max_numel=numel)
        if ct.numel != numel:
            raise ValueError(f"payload holds {ct.numel} values, expected {numel}")
        return self._mod.decompress(ct).reshape(-1).to(torch.float32)

    def max_bytes(self, numel: int) -> int:
        # Header and shape (< 64 bytes), then at most fp32 data (fp16 falls back to fp32 beyond its range)
        # plus one fp32 scale per value in the worst case of a block of 1.
        return 64 + 8 * numel

    def error_bound(self, decoded: torch.Tensor) -> float:
        flat = decoded.reshape(-1).to(torch.float64)
        if self.name == "int8":
            # Round to nearest of x / scale with scale = absmax / 127 per block: every value moved by at
            # most scale / 2, and the absmax value decodes to exactly ±127 · scale.
            block = int(self._impl.block)
            pad = (-flat.numel()) % block
            blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
            scale = blocks.abs().amax(dim=1) / 127.0
            counts = torch.full_like(scale, float(block))
            if pad:
                counts[-1] = block - pad
            return float(torch.sqrt((counts * (scale / 2) ** 2).sum())) * (1 + 1e-3)
        if self.name == "fp16":
            # Half an ulp: 2^-11 relative for normal values, 2^-25 absolute for subnormals.
            return (2.0**-11 * float(torch.linalg.vector_norm(flat)) + 2.0**-25 * flat.numel() ** 0.5) * (
                1 + 1e-3
            )
        if self.name in ("int4", "int2", "int1"):
            block = int(self._impl.block)
            pad = (-flat.numel()) % block
            counts = torch.full(((flat.numel() + pad) // block,), float(block), dtype=torch.float64)
            if pad:
                counts[-1] = block - pad
            # 2^-90 per value: blocks whose scale is subnormal or 0 (all their values below 2^-123), where
            # the relative arguments below do not hold, move by less than that.
            tiny = 2.0**-90 * flat.numel() ** 0.5
            if self.name == "int4":
                # As int8 with levels -7..7: scale = absmax / 7, every value moved by at most scale / 2.
                blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
                scale = blocks.abs().amax(dim=1) / 7.0
                return float(torch.sqrt((counts * (scale / 2) ** 2).sum())) * (1 + 1e-3) + tiny
            if self.name == "int1":
                # ±s with s = the RMS of the block's n values: Σx² = ns², and Σ|x| >= √(Σx²), so
                # ‖x - x̂‖² = Σ(|x| - s)² = 2ns² - 2sΣ|x| <= 2s²(n - √n). s is rounded (a relative error
                # far below 1e-4), which moves the error by at most 4e-4 ns² (the term that matters when
                # n - √n is 0, a block of one value).
                s2 = flat[::block] ** 2  # every decoded value of a block is ±s: its first one says s
                sq = (s2 * (2 * (counts - counts.sqrt()) + 4e-4 * counts)).sum()
                return float(torch.sqrt(sq)) * (1 + 1e-3) + tiny
            # int2: levels ±s, ±3s with s = max(RMS / 2, absmax / 6) over the block's n values, so
            # Σx² <= 4ns² and every |x| <= 6s. A value sent as ±s had |x| < 2s: it moved by at most s. One
            # sent as ±3s had u = x² in [4s², 36s²], and its squared move (√u - 3s)², convex in u, lies
            # under the chord s² + (u - 4s²) / 4 there (and under 9s²): summed over the outer values with
            # Σu <= 4ns², at most s² min(n, 9 n_out). So ‖x - x̂‖² <= s² (n_in + min(n, 9 n_out)) per block.
            # s is the block's smallest |x̂| when a ±s is present; a block of one magnitude v is all ±s
            # (s = v) or all ±3s (s = v / 3), and s = v with n_out = 0 bounds both (n v² >= n v² / 9).
            mags = torch.nn.functional.pad(flat.abs(), (0, pad), value=math.inf).view(-1, block)
            s = mags.amin(dim=1, keepdim=True)
            n_out = ((mags > 2 * s) & (mags < math.inf)).sum(dim=1).to(torch.float64)
            sq = (s.view(-1) ** 2 * (counts - n_out + torch.minimum(counts, 9 * n_out))).sum()
            return float(torch.sqrt(sq)) * (1 + 1e-3) + tiny
        return 0.0


def get_payload_codec(name: str) -> PayloadCodec:
    """`none` (raw fp32) or any compressor name known to `intellect.node.engine.compression` (e.g. `int8`)."""
    if name == "none":
        return RawFp32Codec()
    return CompressorCodec(name)


# --------------------------------------------------------------------------------------------------------
# Connections


class _Slot:
    """Incoming connections of one local group attempt, keyed by the (authenticated) sender."""

    def __init__(self, spec: GroupSpec, me: str) -> None:
        self.spec = spec
        self.me = me
        loop = asyncio.get_running_loop()
        self.incoming: dict[str, asyncio.Future[Conn]] = {
            pid: loop.create_future() for pid in spec.peer_ids if pid != me
        }
        #: Set when a member proved it is in a different group for the same (run, round, attempt).
        self.failure: asyncio.Future[AllReduceError] = loop.create_future()

    def fail(self, err: AllReduceError) -> None:
        if not self.failure.done():
            self.failure.set_result(err)


class RefusedConnection(enum.StrEnum):
    """Why the data plane refused an incoming connection: the keys of `DataPlane.rejected` (metrics).

    A handshake that fails outright (timeout, broken connection, malformed frame) is counted under the
    class name of its exception instead (e.g. "TimeoutError").
    """

    #: The hello names another peer as its receiver.
    WRONG_RECEIVER = "wrong-receiver"
    #: The sender's signature over the hello and our nonce does not verify.
    BAD_PROOF = "bad-proof"
    #: The hello is for an older attempt of the round than the latest one we opened.
    STALE_ATTEMPT = "stale-attempt"
    #: A member of our group for this attempt agreed on another member list (our attempt fails too).
    MEMBER_MISMATCH = "member-mismatch"
    #: The sender is not a member of the group it names, or is already connected in it.
    NOT_MEMBER = "not-member"


class DataPlane:
    """A node's all-reduce data plane: accepts connections through its `Transport` and routes each one to
    the local group attempt whose group id it names, after the sender proved its peer ID.

    Use as an async context manager. The default transport is plain TCP on (host, port) for tests and
    benchmarks; the daemon passes a `Libp2pTransport` (docs/decisions.md, "All-reduce over libp2p streams").
    """

    def __init__(
        self,
        identity: Identity,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        handshake_timeout: float = 10.0,
        transport: Transport | None = None,
    ) -> None:
        self.identity = identity
        self.transport: Transport = transport if transport is not None else TcpTransport(host, port)
        self.handshake_timeout = handshake_timeout
        self._slots: dict[bytes, _Slot] = {}
        self._by_key: dict[tuple[str, int, int], _Slot] = {}
        #: Highest attempt opened per (run, round): hellos for older attempts are refused at once.
        #: The latest declaration number opened per (run, round, leader tag) (`groups.attempt_of`).
        self._latest_attempt: dict[tuple[str, int, int], int] = {}
        self._slot_added = asyncio.Event()
        #: Refused connections by `RefusedConnection` or exception class name (the averager exports them).
        self.rejected: dict[str, int] = {}
        #: Connections handed to an attempt after a complete handshake.
        self.accepted = 0

    @property
    def host(self) -> str:
        return self.transport.host

    @property
    def port(self) -> int:
        return self.transport.port

    async def __aenter__(self) -> DataPlane:
        await self.transport.start(self._serve)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.stop()

    # -- slots -------------------------------------------------------------------------------------------

    def open_slot(self, spec: GroupSpec) -> _Slot:
        slot = _Slot(spec, self.identity.peer_id)
        self._slots[spec.group_id] = slot
        self._by_key[spec.key] = slot
        tagged = (spec.run_id, spec.round, spec.attempt >> SEQ_BITS)
        self._latest_attempt[tagged] = max(spec.attempt, self._latest_attempt.get(tagged, -1))
        if len(self._latest_attempt) > 64:  # keep the last rounds only
            for old in sorted(self._latest_attempt, key=lambda k: k[1])[:-64]:
                del self._latest_attempt[old]
        self._slot_added.set()
        self._slot_added = asyncio.Event()
        return slot

    def close_slot(self, slot: _Slot) -> None:
        self._slots.pop(slot.spec.group_id, None)
        if self._by_key.get(slot.spec.key) is slot:
            del self._by_key[slot.spec.key]
        for fut in slot.incoming.values():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()
            else:
                fut.cancel()

    # -- server side ---------------------------------------------------------------------------------------

    def _count_rejected(self, key: str) -> None:
        self.rejected[key] = self.rejected.get(key, 0) + 1

    async def _refuse(self, conn: Conn, reason: HandshakeRefusal, counted_as: RefusedConnection) -> bool:
        """Tell the sender why we refuse it and count it; False: the connection is not handed over."""
        await send_frame(conn, am.Reject(reason.value))
        self._count_rejected(counted_as)
        return False

    async def _serve(self, conn: Conn) -> None:
        handed_over = False
        try:
            async with asyncio.timeout(self.handshake_timeout):
                handed_over = await self._handshake(conn)
        except (TimeoutError, ConnectionError, OSError, ProtocolError, struct.error) as e:
            logger.debug("allreduce handshake failed: %s", e)
            self._count_rejected(type(e).__name__)
        finally:
            if not handed_over:
                conn.close()

    async def _handshake(self, conn: Conn) -> bool:
        hello = await recv_frame(conn)
        if not isinstance(hello, am.Hello):
            raise ProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.receiver != self.identity.peer_id:
            return await self._refuse(conn, HandshakeRefusal.WRONG_RECEIVER, RefusedConnection.WRONG_RECEIVER)
        nonce = os.urandom(32)
        await send_frame(conn, am.Challenge(nonce))
        proof = await recv_frame(conn)
        if not isinstance(proof, am.Proof):
            raise ProtocolError(f"expected Proof, got {type(proof).__name__}")
        # On an authenticated channel (libp2p) the hello must also name the peer the channel proved.
        impostor = bool(conn.remote) and conn.remote != hello.sender
        if impostor or not verify(hello.sender, domains.ALLREDUCE, hello.proof_bytes(nonce), proof.sig):
            return await self._refuse(conn, HandshakeRefusal.BAD_PROOF, RefusedConnection.BAD_PROOF)
        # The sender is who it says. Find our slot for its group id; a peer may be a little ahead of us.
        key = (hello.run_id, hello.round, hello.attempt)
        while True:
            slot = self._slots.get(hello.group_id)
            if slot is not None:
                break
            other = self._by_key.get(key)
            # An older declaration of the same leader than one we already opened: that attempt is over.
            tagged = (hello.run_id, hello.round, hello.attempt >> SEQ_BITS)
            if hello.attempt < self._latest_attempt.get(tagged, -1):
                return await self._refuse(
                    conn, HandshakeRefusal.STALE_ATTEMPT, RefusedConnection.STALE_ATTEMPT
                )
            if other is not None:
                if hello.sender in other.incoming:
                    # A member of our group agreed on a different member list: our attempt cannot succeed.
                    detail = f"{hello.sender} saw another group"
                    other.fail(AllReduceError(AbortReason.MEMBER_MISMATCH, detail=detail))
                return await self._refuse(
                    conn, HandshakeRefusal.MEMBER_MISMATCH, RefusedConnection.MEMBER_MISMATCH
                )
            try:  # bounded: a hello for a group we never open must not hold its connection forever
                await asyncio.wait_for(self._slot_added.wait(), SLOT_WAIT_S)
            except TimeoutError:
                return await self._refuse(
                    conn, HandshakeRefusal.STALE_ATTEMPT, RefusedConnection.STALE_ATTEMPT
                )
        fut = slot.incoming.get(hello.sender)
        if fut is None or fut.done():
            reason = HandshakeRefusal.NOT_A_MEMBER if fut is None else HandshakeRefusal.DUPLICATE_CONNECTION
            return await self._refuse(conn, reason, RefusedConnection.NOT_MEMBER)
        await send_frame(conn, am.Accept(len(slot.spec.members)))
        fut.set_result(conn)
        self.accepted += 1
        return True

    # -- client side ---------------------------------------------------------------------------------------

    async def connect(self, spec: GroupSpec, member: GroupMember) -> Conn:
        """Open our sending connection to `member` and prove our peer ID; raises AllReduceError."""
        conn: Conn | None = None
        try:
            conn = await self.transport.dial(member)
            hello = am.Hello(
                spec.run_id, spec.round, spec.attempt, spec.group_id, self.identity.peer_id, member.peer_id
            )
            await send_frame(conn, hello)
            challenge = await recv_frame(conn)
            if isinstance(challenge, am.Reject):
                raise AllReduceError(AbortReason.REJECTED, detail=f"{member.peer_id}: {challenge.reason}")
            if not isinstance(challenge, am.Challenge) or len(challenge.nonce) != 32:
                raise AllReduceError(
                    AbortReason.PROTOCOL, culprit=member.peer_id, detail="expected a 32-byte challenge"
                )
            sig = self.identity.sign(domains.ALLREDUCE, hello.proof_bytes(challenge.nonce))
            await send_frame(conn, am.Proof(sig))
            answer = await recv_frame(conn)
            if isinstance(answer, am.Reject):
                raise AllReduceError(AbortReason.REJECTED, detail=f"{member.peer_id}: {answer.reason}")
            if not isinstance(answer, am.Accept):
                raise AllReduceError(AbortReason.PROTOCOL, culprit=member.peer_id, detail="expected Accept")
            return conn
        except (OSError, ConnectionError, ProtocolError, struct.error) as e:
            if conn is not None:
                conn.close()
            # Named as the culprit so that the retry goes on without it: a member nobody can reach (or
            # that never connects, below) would otherwise fail every attempt of the round.
            raise AllReduceError(
                AbortReason.UNREACHABLE, culprit=member.peer_id, detail=f"{member.peer_id}: {e}"
            ) from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise


# --------------------------------------------------------------------------------------------------------
# One attempt


@dataclass
class ReducedVector:
    """A completed all-reduce: the averaged flat vector (bit-identical on all members) and what it cost."""

    flat: torch.Tensor
    total_weight: float
    bytes_sent: int
    bytes_received: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: Values of each member's partition, in member order (0 for members that own none).
    part_sizes: tuple[int, ...] = ()
    #: Of `bytes_sent`, what the checks cost: our own contribution to our witness, digests and relays,
    #: and the receipt phase's signatures.
    check_bytes_sent: int = 0
    #: The attempt's contribution receipt, with every signature we could verify (None for a group of one).
    receipt: Receipt | None = None


def all_finite(t: torch.Tensor) -> bool:
    """True when every value of `t` is finite.

    Fast path: a sum is finite only if every term is (a NaN or an infinity never leaves a running sum), and
    summing is one pass without the bool tensor `isfinite` allocates: 1 ms against 14 ms for 5M fp32 values
    on one core. Only when the sum overflows (finite values near the fp32 maximum) is every value checked.
    """
    if t.numel() == 0:
        return True
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_weight(weight: float, max_weight: float) -> float:
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and non-negative, got {weight}")
    return min(weight, max_weight)


async def _offload(fn: Any, *args: Any, big: bool) -> Any:
    """Run CPU-heavy tensor work in a thread for large parts (torch releases the GIL): the loop stays live."""
    if big:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


class Tamper:
    """Fault injection for tests and bench/byzantine.py only: how a malicious member deviates from the
    protocol. Every method here is honest; an attack overrides one."""

    #: Whether our false Aborts (`false_abort`) carry our signature, as an honest member's do.
    sign_aborts: bool = False

    def reduced(self, part: torch.Tensor) -> None:
        """Change our reduced partition in place before it is encoded (a biased owner)."""

    def gather_payload(self, receiver: str, payload: bytes | memoryview) -> bytes | memoryview:
        """The bytes of our reduced partition sent to `receiver` (an inconsistent owner sends others)."""
        return payload

    def lines(self, lines: list[am.InputLine]) -> list[am.InputLine]:
        """The lines of our digest (a member that lies about what it sent or received)."""
        return lines

    def false_abort(self, receiver: str) -> str | None:
        """A culprit to name in an `Abort` sent to `receiver` instead of its part (a member that tries to
        make the others give up, or to get `receiver` excluded); None sends the part."""
        return None


async def butterfly_allreduce(
    plane: DataPlane,
    spec: GroupSpec,
    flat: torch.Tensor,
    weight: float,
    codec: PayloadCodec,
    *,
    max_weight: float = math.inf,
    stall_timeout: float = 30.0,
    validate_local: bool = True,
    fault: Callable[[str], Awaitable[None]] | None = None,
    reducer: str = "mean",
    tamper: Tamper | None = None,
) -> ReducedVector:
    """Average `flat` (fp32, 1-D) with the members of `spec`, weighted; raise AllReduceError on any failure.

    `stall_timeout` bounds every single network wait (connect, handshake, each partition); the caller
    derives it from measured bandwidth and part size. `validate_local=False` and `fault` exist only for
    fault injection in tests: a peer that sends non-finite values, or one that stops (or dies) at a chosen
    step (`fault` is awaited with "scatter:<receiver peer ID>" before each partition is sent).
    """
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}")
    me = plane.identity.peer_id
    spec.index(me)  # ValueError when we are not a member
    weight = _check_weight(weight, max_weight)
    flat = flat.detach().to(torch.float32).contiguous()
    if validate_local and not all_finite(flat):
        raise AllReduceError(
            AbortReason.NON_FINITE_LOCAL, culprit=me, detail="our own tensors are not finite"
        )
    if len(spec.members) == 1:
        return ReducedVector(flat.clone(), weight, 0, 0, 0.0, {}, (flat.numel(),))
    if not spec.owners:
        raise AllReduceError(AbortReason.NO_OWNER, detail="every member is behind a NAT")
    slot = plane.open_slot(spec)
    try:
        attempt = _Attempt(
            plane, slot, flat, weight, codec, max_weight, stall_timeout, validate_local, fault, reducer
        )
        attempt.tamper = tamper or Tamper()
        return await attempt.run()
    finally:
        plane.close_slot(slot)


async def _receipt(agreement: Agreement, digests: Mapping[str, am.Digest]) -> Receipt | None:
    """The receipt phase (`intellect.node.net.receipting`): never fails the attempt."""
    draft = receipting.draft(agreement, digests)
    if draft is None:
        return None
    receipt, sent, received = await receipting.collect(agreement, draft)
    agreement.sent_bytes += sent
    agreement.received_bytes += received
    return receipt


#: Longest wait for a member's `Done` after our average is complete.
DONE_TIMEOUT_S = 5.0


async def _say_done(
    incoming: Mapping[str, Conn],
    outgoing: Mapping[str, Conn],
    guarded: Callable[[Awaitable[Any]], Awaitable[Any]],
) -> None:
    """Say `Done` on every connection we received on, and wait for it on every one we sent on, so that no
    connection is closed while the other end still reads (a closed p2p-daemon stream is reset)."""
    received = {id(c): c for c in incoming.values()}
    sent = {id(c): (pid, c) for pid, c in outgoing.items()}

    async def await_done(peer: str, conn: Conn) -> None:
        try:
            # Bounded apart from the stall timeout: a member that withholds Done delays only our close.
            async with asyncio.timeout(DONE_TIMEOUT_S):
                msg = await guarded(recv_frame(conn))
        except (ConnectionError, OSError, ProtocolError, struct.error, AllReduceError, TimeoutError) as e:
            # The average is complete on our side; a member that fails now only misses its own result.
            logger.debug("no Done from %s: %s", peer, e)
            return
        if not isinstance(msg, am.Done):
            logger.debug("expected Done from %s, got %s", peer, type(msg).__name__)

    await gather_all(
        [send_frame(c, am.Done(2)) for c in received.values()] + [await_done(p, c) for p, c in sent.values()]
    )


class _PartWire:
    """Sending and receiving one part (header, payload, seal) of an attempt: the wire half of `_Attempt`."""

    spec: GroupSpec
    plane: DataPlane
    codec: PayloadCodec
    sizes: list[int]
    raw: bool
    big: bool
    max_weight: float
    sent: int
    received: int
    outgoing: dict[str, Conn]
    incoming: dict[str, Conn]
    ledger: Ledger
    weight: float
    my_index: int
    witness: GroupMember
    _own_cache: tuple[torch.Tensor, Seal, bytes | memoryview] | None
    check_bytes: int

    def _part(self, i: int, of: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    async def _guarded(self, aw: Awaitable[T]) -> T:
        raise NotImplementedError

    @property
    def _own(self) -> tuple[torch.Tensor, Seal]:
        """Our own contribution to our partition as our witness decodes it, and its seal (made once)."""
        if self._own_cache is None:
            payload, decoded = self.codec.roundtrip(self._part(self.my_index))
            seal = self._seal(am.PartKind.WITNESS, self.my_index, self.weight, payload)
            self._own_cache = (decoded, seal, payload)
        return self._own_cache[0], self._own_cache[1]

    async def _send_witness(self) -> None:
        self._own  # noqa: B018 (makes the payload)
        assert self._own_cache is not None
        _, seal, payload = self._own_cache
        sent = await self._send_part(self.witness, am.PartKind.WITNESS, self.my_index, payload, seal)
        self.check_bytes += sent

    async def _recv_witness(self, m: GroupMember) -> None:
        j = self.spec.index(m.peer_id)
        value, _, seal = await self._recv_part(m, am.PartKind.WITNESS, j)
        self.ledger.witnessed[j] = (seal, value)

    # -- parts ---------------------------------------------------------------------------------------------

    def _seal(self, kind: am.PartKind, part_index: int, w: float, payload: bytes | memoryview) -> Seal:
        """Digest and sign a part: the signed statement binds us to these bytes (`am.part_statement`)."""
        digest, w = am.payload_digest(payload), float(w)
        statement = am.part_statement(self.spec.group_id, int(kind), part_index, w, digest)
        return Seal(digest, w, self.plane.identity.sign(domains.ALLREDUCE, statement))

    async def _send_part(
        self, m: GroupMember, kind: am.PartKind, part_index: int, payload: bytes | memoryview, seal: Seal
    ) -> int:
        """Send one part; returns the bytes it took on the wire."""
        numel = self.sizes[part_index]
        w = seal.weight
        header = encode(
            am.PartHeader(
                int(kind), part_index, w, self.codec.name, numel, len(payload), seal.digest, seal.sig
            )
        )
        try:
            await self._guarded(self.outgoing[m.peer_id].send(_LEN.pack(len(header)) + header, payload))
        except (ConnectionError, OSError) as e:
            raise AllReduceError(AbortReason.PEER_FAILED, detail=str(e)) from e
        self.sent += len(header) + _LEN.size + len(payload)
        return len(header) + _LEN.size + len(payload)

    async def _recv_part(
        self, m: GroupMember, kind: am.PartKind, part_index: int, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float, Seal]:
        """Receive, check and decode one part from `m`; raw fp32 parts are read straight into `out` when
        given. Returns the values, the weight (a sender's weight is capped at `max_weight`) and the part's
        seal as the sender signed it (checked against the bytes that arrived)."""
        conn = self.incoming[m.peer_id]
        header = await self._recv_header(m, conn, kind, part_index)
        value, digest = await self._recv_values(m, conn, header, out)
        statement = header.statement(self.spec.group_id)
        if digest != header.digest or not verify(m.peer_id, domains.ALLREDUCE, statement, header.sig):
            raise AllReduceError(
                AbortReason.MALFORMED_PART,
                culprit=m.peer_id,
                detail=f"{kind.name} part {part_index}: bad seal",
            )
        if not all_finite(value):
            raise AllReduceError(
                AbortReason.NON_FINITE_PART, culprit=m.peer_id, detail=f"{kind.name} part {part_index}"
            )
        w = header.weight
        if kind != am.PartKind.GATHER:
            if not math.isfinite(w) or w < 0:
                raise AllReduceError(AbortReason.BAD_WEIGHT, culprit=m.peer_id, detail=str(w))
            w = min(w, self.max_weight)
        return value, w, Seal(header.digest, header.weight, header.sig)

    async def _recv_header(
        self, m: GroupMember, conn: Conn, kind: am.PartKind, part_index: int
    ) -> am.PartHeader:
        """The next part header from `m`, checked against what we expect before any payload is read."""
        try:
            header = await self._guarded(recv_frame(conn))
        except (ConnectionError, OSError, ProtocolError, struct.error) as e:
            raise AllReduceError(AbortReason.PEER_FAILED, detail=f"{m.peer_id}: {e}") from e
        if isinstance(header, am.Abort):
            raise abort_error(header, m.peer_id, self.spec)
        numel = self.sizes[part_index]
        if (
            not isinstance(header, am.PartHeader)
            or header.kind != kind
            or header.part != part_index
            or header.numel != numel
            or header.codec != self.codec.name
            or not 0 <= header.nbytes <= self.codec.max_bytes(numel)
        ):
            raise AllReduceError(AbortReason.MALFORMED_PART, culprit=m.peer_id, detail=repr(header)[:200])
        if self.raw and header.nbytes != 4 * numel:
            detail = f"{header.nbytes} bytes"
            raise AllReduceError(AbortReason.MALFORMED_PART, culprit=m.peer_id, detail=detail)
        return header

    async def _recv_values(
        self, m: GroupMember, conn: Conn, header: am.PartHeader, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, bytes]:
        """The payload announced by `header`, decoded to fp32 values, and the payload's digest."""
        numel = header.numel
        try:
            if self.raw:
                # Read straight into the tensor that will hold the values: no intermediate buffer.
                value = torch.empty(numel, dtype=torch.float32) if out is None else out
                if numel:
                    await self._guarded(conn.recv_into(value.numpy().data.cast("B")))
            else:
                payload = await self._guarded(recv_exactly(conn, header.nbytes))
        except (ConnectionError, OSError) as e:
            raise AllReduceError(AbortReason.PEER_FAILED, detail=f"{m.peer_id}: {e}") from e
        self.received += header.nbytes + _LEN.size
        if self.raw:
            return value, am.payload_digest(value.numpy().data.cast("B"))
        try:
            decoded: torch.Tensor = await _offload(self.codec.decode, payload, numel, big=self.big)
        except (ValueError, RuntimeError, ProtocolError) as e:
            raise AllReduceError(AbortReason.UNDECODABLE_PART, culprit=m.peer_id, detail=str(e)) from e
        return decoded, am.payload_digest(payload)


class _Attempt(_PartWire):
    """One butterfly all-reduce of `flat` between the members of `slot.spec`, and the state its phases share.

    The phases, each timed: `_connect` (one connection each way to every other member), `_reduce_scatter`
    (send every member its partition of our vector, receive everyone's contribution to ours), `_reduce`
    (reduce our partition and encode it once) and `_all_gather` (send it to everyone, receive theirs).
    Every network wait goes through `_guarded`, which also fails when the slot learns that a member saw
    another group. On any failure the others are told (`Abort`) and every connection is closed.
    """

    def __init__(
        self,
        plane: DataPlane,
        slot: _Slot,
        flat: torch.Tensor,
        weight: float,
        codec: PayloadCodec,
        max_weight: float,
        stall_timeout: float,
        validate_local: bool,
        fault: Callable[[str], Awaitable[None]] | None,
        reducer: str,
    ) -> None:
        self.plane = plane
        self.slot = slot
        self.spec = slot.spec
        self.flat = flat
        self.weight = weight
        self.codec = codec
        self.max_weight = max_weight
        self.stall_timeout = stall_timeout
        self.validate_local = validate_local
        self.fault = fault
        self.reducer = reducer
        self.me = plane.identity.peer_id
        self.my_index = self.spec.index(self.me)
        self.mine = self.spec.members[self.my_index]
        # Only pairs where data flows are connected: a member that owns no partition (behind a NAT) talks
        # to owners only, on connections it opened, and two such members never talk.
        self.others = [
            m for m in self.spec.members if m.peer_id != self.me and self.spec.exchanges(self.mine, m)
        ]
        self.owner_peers = [m for m in self.others if m.owner]
        self.sizes = self.spec.part_sizes(flat.numel())
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        #: Large vectors have their encoding, decoding and reduction run in a worker thread.
        self.big = flat.numel() >= (1 << 20)
        #: Raw fp32 parts are read straight into their destination tensor.
        self.raw = isinstance(codec, RawFp32Codec)
        self.outgoing: dict[str, Conn] = {}
        self.incoming: dict[str, Conn] = {}
        self.sent = self.received = 0
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()
        #: What the agreement phase reports and checks (`intellect.node.net.agreement`).
        self.ledger = Ledger()
        self.tamper = Tamper()
        self._own_cache: tuple[torch.Tensor, Seal, bytes | memoryview] | None = None
        self.check_bytes = 0
        #: Our witness (we send it our own contribution when we own a partition), and whom we witness.
        self.witness = self.spec.members[witness_of(self.spec, self.my_index)]
        self.witnessed = [
            m
            for i, m in enumerate(self.spec.members)
            if m.owner and m.peer_id != self.me and witness_of(self.spec, i) == self.my_index
        ]

    async def run(self) -> ReducedVector:
        try:
            await self._timed("connect", self._connect())
            contributions = await self._timed("scatter", self._reduce_scatter())
            result, total, my_payload = await self._timed("reduce", self._reduce(contributions))
            total = await self._timed("gather", self._all_gather(result, total, my_payload))
            await self._timed("agree", self._agree(result))
            await self._timed("done", _say_done(self.incoming, self.outgoing, self._guarded))
            stats = (self.sent, self.received, time.perf_counter() - self.start, self.timings)
            return ReducedVector(result, total, *stats, tuple(self.sizes), self.check_bytes, self.receipt)
        except AllReduceError as e:
            # Tell whoever still listens, so they fail fast instead of waiting for the stall timeout: the
            # Abort that stopped us, unchanged (blame goes to its signer), else our own, signed.
            own = am.Abort(e.reason[:100], e.culprit)
            abort = e.abort or own.signed(self.plane.identity, self.spec.group_id)
            await asyncio.gather(
                *(asyncio.wait_for(send_frame(c, abort), 1.0) for c in self.outgoing.values()),
                return_exceptions=True,
            )
            raise
        finally:
            for c in (*self.outgoing.values(), *self.incoming.values()):
                c.close()

    async def _timed(self, phase: str, aw: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        result = await aw
        self.timings[phase] = time.perf_counter() - t0
        return result

    def _part(self, i: int, of: torch.Tensor | None = None) -> torch.Tensor:
        """Partition `i` of our vector (or of `of`, a vector of the same length)."""
        vector = self.flat if of is None else of
        return vector[self.offsets[i] : self.offsets[i] + self.sizes[i]]

    async def _guarded(self, aw: Awaitable[T]) -> T:
        """Wait for `aw` unless the slot fails first (a member saw another group) or it stalls."""
        task = asyncio.ensure_future(aw)
        try:
            waiting: set[asyncio.Future[Any]] = {task, self.slot.failure}
            done, _ = await asyncio.wait(
                waiting, timeout=self.stall_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                return task.result()
            if self.slot.failure.done():
                raise self.slot.failure.result()
            raise AllReduceError(AbortReason.STALLED, detail=f"no progress within {self.stall_timeout:.1f}s")
        finally:
            await _settle(task)

    # -- connections ---------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        """One connection each way between owners; a non-owner (behind a NAT) alone dials each owner, and
        that connection carries its parts to the owner and the owner's reduced partition back."""
        others = self.others
        dial = [m for m in others if m.owner]
        accept = [m for m in others if self.mine.owner]
        conns = await gather_all([self._open_out(m) for m in dial] + [self._accept_in(m) for m in accept])
        self.incoming = {m.peer_id: c for m, c in zip(accept, conns[len(dial) :], strict=True)}
        for m in others:
            if not m.owner:
                self.outgoing[m.peer_id] = self.incoming[m.peer_id]
            elif not self.mine.owner:
                self.incoming[m.peer_id] = self.outgoing[m.peer_id]

    async def _open_out(self, m: GroupMember) -> None:
        self.outgoing[m.peer_id] = await self._guarded(self.plane.connect(self.spec, m))

    async def _accept_in(self, m: GroupMember) -> Conn:
        try:
            return await self._guarded(asyncio.shield(self.slot.incoming[m.peer_id]))
        except AllReduceError as e:
            if e.failure is AbortReason.STALLED:
                raise AllReduceError(
                    AbortReason.STALLED, culprit=m.peer_id, detail=f"{m.peer_id} never connected"
                ) from None
            raise

    # -- phases --------------------------------------------------------------------------------------------

    async def _reduce_scatter(self) -> list[tuple[torch.Tensor, float]]:
        """Send every member its partition (and our witness our own), receive ours from everyone (and the
        own contribution of each owner we witness): the contributions to our partition with their
        weights, our own first, then the others in group order."""
        senders = self.others if self.mine.owner else []
        own_task: list[Awaitable[Any]] = []
        if self.mine.owner and self.witness.peer_id not in {m.peer_id for m in self.owner_peers}:
            own_task = [self._send_witness()]  # our witness owns nothing: no scatter to share the send
        results = await gather_all(
            [self._scatter_to(m) for m in self.owner_peers]
            + own_task
            + [self._recv_from(m) for m in senders]
            + [self._recv_witness(m) for m in self.witnessed if m not in senders]
        )
        start = len(self.owner_peers) + len(own_task)
        received = results[start : start + len(senders)]
        if not self.mine.owner:
            return []
        own, own_seal = self._own
        if not self.validate_local and not all_finite(own):
            # Only reachable with fault injection: we are the peer that sent non-finite values.
            raise AllReduceError(
                AbortReason.NON_FINITE_PART, culprit=self.me, detail="our own partition is not finite"
            )
        self.ledger.received[self.my_index] = (own_seal, own)
        for m, (value, _, seal) in zip(senders, received, strict=True):
            self.ledger.received[self.spec.index(m.peer_id)] = (seal, value)
        return [(own, self.weight), *((value, w) for value, w, _ in received)]

    async def _recv_from(self, m: GroupMember) -> tuple[torch.Tensor, float, Seal]:
        got = await self._recv_part(m, am.PartKind.SCATTER, self.my_index)
        if m in self.witnessed:  # its own contribution follows on the same connection
            await self._recv_witness(m)
        return got

    async def _scatter_to(self, m: GroupMember) -> None:
        j = self.spec.index(m.peer_id)
        payload, decoded = await _offload(self.codec.roundtrip, self._part(j), big=self.big)
        seal = self._seal(am.PartKind.SCATTER, j, self.weight, payload)
        self.ledger.sent[j] = (seal, decoded)
        if self.fault is not None:
            await self.fault(f"scatter:{m.peer_id}")
        framed = self.tamper.false_abort(m.peer_id)
        if framed is not None:  # fault injection only
            await send_frame(self.outgoing[m.peer_id], _false_abort(self, framed))
            return
        await self._send_part(m, am.PartKind.SCATTER, j, payload, seal)
        if self.mine.owner and m.peer_id == self.witness.peer_id:
            await self._send_witness()

    async def _reduce(
        self, contributions: list[tuple[torch.Tensor, float]]
    ) -> tuple[torch.Tensor, float, bytes | memoryview]:
        """Reduce our partition into a new result vector and encode it once: (result, total weight, the
        bytes every member decodes our partition from); a non-owner has nothing to reduce."""
        if not self.mine.owner:
            return torch.empty_like(self.flat), 0.0, b""
        total = sum(w for _, w in contributions)
        if total <= 0:
            raise AllReduceError(AbortReason.ZERO_WEIGHT, detail="no member contributed any weight")

        # The averaged vector; our reduced partition is computed straight into its slot.
        result = torch.empty_like(self.flat)
        mine = self._part(self.my_index, of=result)

        def reduce_and_encode() -> tuple[bytes | memoryview, torch.Tensor]:
            # Our own contribution first, then the others in group order: deterministic on the owner,
            # which alone computes this partition (everyone else receives its bytes).
            values, weights = [v for v, _ in contributions], [w for _, w in contributions]
            reduce_partition(self.reducer, values, weights, mine)
            self.tamper.reduced(mine)
            return self.codec.roundtrip(mine)

        my_payload, my_reduced = await _offload(reduce_and_encode, big=self.big)
        if my_reduced.data_ptr() != mine.data_ptr():  # a lossy codec: keep what everyone else decodes
            mine.copy_(my_reduced)
        if not all_finite(mine):
            raise AllReduceError(AbortReason.NON_FINITE_RESULT, detail="our reduced partition is not finite")
        return result, total, my_payload

    async def _all_gather(self, result: torch.Tensor, total: float, my_payload: bytes | memoryview) -> float:
        """Everyone gets the same bytes of every reduced partition; theirs are written into `result`.
        Returns the total weight: an owner's own; a non-owner's as the owners announce it (all alike)."""
        senders = self.others if self.mine.owner else []
        sends = []
        if self.mine.owner:
            seal = self._seal(am.PartKind.GATHER, self.my_index, total, my_payload)
            self.ledger.gathered[self.my_index] = seal
            for m in senders:
                payload = self.tamper.gather_payload(m.peer_id, my_payload)
                if payload is not my_payload:  # fault injection only: an owner that equivocates signs both
                    sealed = self._seal(am.PartKind.GATHER, self.my_index, total, payload)
                else:
                    sealed = seal
                sends.append(self._send_part(m, am.PartKind.GATHER, self.my_index, payload, sealed))
        totals = await gather_all(sends + [self._collect_from(m, result) for m in self.owner_peers])
        if self.mine.owner:
            return total
        announced = {w for w in totals if w is not None}
        if len(announced) != 1:
            raise AllReduceError(
                AbortReason.MALFORMED_PART, detail=f"owners announced total weights {announced}"
            )
        return announced.pop()

    async def _collect_from(self, m: GroupMember, result: torch.Tensor) -> float:
        j = self.spec.index(m.peer_id)
        dest = self._part(j, of=result)
        value, w, seal = await self._recv_part(m, am.PartKind.GATHER, j, out=dest)
        if value.data_ptr() != dest.data_ptr():
            dest.copy_(value)
        self.ledger.gathered[j] = seal
        return w

    async def _agree(self, result: torch.Tensor) -> None:
        """The agreement phase (`intellect.node.net.agreement`): raise unless every member holds the same
        average and every partition passes its owner check."""
        agreement = Agreement(
            self.plane.identity,
            self.spec,
            self.codec,
            self.reducer,
            self.max_weight,
            result,
            self.sizes,
            self.ledger,
            self.outgoing,
            self.incoming,
            [m.peer_id for m in self.others],
            self._guarded,
            self.tamper.lines,
        )
        try:
            mine = await _offload(agreement.digest, big=self.big)
            digests = await agreement.exchange(mine)
            await _offload(agreement.check, digests, big=self.big)
            self.receipt = await _receipt(agreement, digests)
        except AgreementError as e:
            if e.abort is not None:
                raise abort_error(e.abort, e.via, self.spec) from None
            err = AllReduceError(e.reason, culprit=e.culprit, detail=e.detail)
            err.suspects, err.evidence = e.suspects, e.evidence
            raise err from None
        finally:
            self.sent += agreement.sent_bytes
            self.check_bytes += agreement.sent_bytes
            self.received += agreement.received_bytes
