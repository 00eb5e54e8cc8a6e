"""The signed envelope every peer-to-peer message travels in, and its verifier with a replay guard.

Wire form: a msgpack map (canonical: keys sorted) with exactly these keys

    v      int    envelope version (1)
    type   int    type id of the message in `body`
    run    str    run id the message belongs to (hex sha256 of the manifest; "" for run-less messages)
    sender str    sender's libp2p peer ID (12D3KooW…), which also carries its Ed25519 public key
    seq    int    sender's sequence number, strictly increasing across restarts (see SequenceCounter)
    ts     float  sender's wall clock when sealed, unix seconds
    body   bytes  `codec.encode(message)`
    sig    bytes  64-byte Ed25519 signature by `sender` over
                  domains.ENVELOPE || 0x00 || packb_canonical({the seven other keys})

`EnvelopeVerifier.open` checks, in this order and stopping at the first failure: size, well-formedness,
version, run, sender is a valid peer ID, sender admitted, signature, timestamp skew, replay, body decodes
to a registered message of the announced type. `(sender, seq)` is recorded as seen only once the signature
has verified, so forged envelopes cannot burn a sender's sequence numbers.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from intellect.crypto import domains
from intellect.crypto.errors import InvalidPeerId
from intellect.crypto.identity import Identity, public_key_from_peer_id, verify
from intellect.protocol import codec
from intellect.protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    Rejected,
    UnknownMessageType,
    UnsupportedVersion,
)

logger = logging.getLogger(__name__)

#: The envelope version this node seals and accepts.
ENVELOPE_VERSION = 1
#: Bytes an envelope adds around its body, at most (keys, run id, peer ID, seq, ts, signature, headers).
ENVELOPE_OVERHEAD = 512
#: Longest run id accepted (a hex sha256 is 64 characters).
MAX_RUN_ID_CHARS = 128
_KEYS = frozenset({"v", "type", "run", "sender", "seq", "ts", "body", "sig"})
_SEQ_MAX = 2**64 - 1


class RejectReason(enum.Enum):
    """Why an envelope was dropped. Values are stable strings used in logs and metrics."""

    #: Longer than the envelope limit (largest message max_size + overhead); checked before parsing.
    OVERSIZED = "oversized"
    #: Not a msgpack map with exactly the envelope keys and types, or a body that does not decode.
    MALFORMED = "malformed"
    #: Envelope version, or the body's message version, is not one this node speaks.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: Signed for another run than the one this verifier guards.
    WRONG_RUN = "wrong_run"
    #: `sender` is not an Ed25519 identity-multihash peer ID.
    BAD_SENDER = "bad_sender"
    #: The sender is not admitted to the run (allowlist, ticket or ban).
    NOT_ADMITTED = "not_admitted"
    #: The signature does not verify for the sender's key under the envelope domain tag (forged,
    #: tampered with, or made for another purpose).
    FORGED_SIGNATURE = "forged_signature"
    #: `ts` is older than now - skew: too old to be checked against the replay cache.
    STALE = "stale"
    #: `ts` is later than now + skew: the sender's clock is off or it is pre-dating messages.
    FUTURE = "future"
    #: `(sender, seq)` was already accepted, or seq is below the sender's sliding window.
    REPLAYED = "replayed"
    #: The body's type id is not a registered message type.
    UNKNOWN_TYPE = "unknown_type"


# --------------------------------------------------------------------------------------------------
# sealing


class SequenceCounter:
    """Sequence numbers for one sender: strictly increasing, also across restarts of the process.

    next() = max(last + 1, wall clock in microseconds): a restarted node starts above anything it sent
    before (as long as its clock did not go back by more than the time it was down), without writing
    state to disk. Thread-safe.
    """

    def __init__(self, clock_us: Callable[[], int] | None = None) -> None:
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, self._clock_us())
            return self._last


def signing_bytes(fields: dict[str, Any]) -> bytes:
    """The message a sender signs: canonical msgpack of the envelope map without `sig`."""
    return codec.packb_canonical({k: fields[k] for k in _KEYS if k != "sig"})


def seal(identity: Identity, run_id: str, msg: Any, seq: int, ts: float | None = None) -> bytes:
    """Encode `msg`, wrap it in an envelope for `run_id` and sign it with `identity`."""
    if type(seq) is not int or not 0 <= seq <= _SEQ_MAX:
        raise ValueError(f"seq must be an int in 0..2**64-1, got {seq!r}")
    body = codec.encode(msg)
    fields: dict[str, Any] = {
        "v": ENVELOPE_VERSION,
        "type": codec.REGISTRY.spec_for(msg).type_id,
        "run": run_id,
        "sender": identity.peer_id,
        "seq": seq,
        "ts": float(time.time() if ts is None else ts),
        "body": body,
    }
    fields["sig"] = identity.sign(domains.ENVELOPE, signing_bytes(fields))
    return codec.packb_canonical(fields)


# --------------------------------------------------------------------------------------------------
# replay guard


@dataclass
class _SenderWindow:
    #: Every seq <= floor is refused (it slid out of the window or was evicted).
    floor: int = -1
    #: seq -> ts of accepted envelopes above the floor.
    seen: dict[int, float] = field(default_factory=dict)
    #: Latest ts accepted from this sender.
    max_ts: float = float("-inf")


class ReplayGuard:
    """Timestamp skew bound plus per-sender anti-replay windows, with bounded memory.

    Like IPsec's anti-replay window, but keyed by sequence number rather than a bitmap because sequence
    numbers are time-based (see SequenceCounter) and so sparse: per sender it remembers the accepted seqs
    above a floor; when more than `window` are remembered the lowest quarter is forgotten and the floor
    rises past them, so older seqs are refused as replays. Envelopes outside `now ± skew_s` are refused
    before the cache is consulted, so remembering only the skew period is enough.

    Memory is bounded by `cache_size` (seqs remembered over all senders, at most `window` each). When it
    is exceeded, the least recently active senders are forgotten; forgetting one whose latest ts is still
    within the skew period raises a global ts floor, under which envelopes from unknown senders are refused
    as stale, so eviction can never re-open a replay. Not thread-safe: use it from one event loop.
    """

    def __init__(self, window: int = 1024, skew_s: float = 60.0, cache_size: int = 65536) -> None:
        if window < 4 or cache_size < window or skew_s <= 0:
            raise ValueError("need window >= 4, cache_size >= window and skew_s > 0")
        self.window = window
        self.skew_s = skew_s
        self.cache_size = cache_size
        self._senders: collections.OrderedDict[str, _SenderWindow] = collections.OrderedDict()
        self._total = 0
        self._ts_floor = float("-inf")

    def __len__(self) -> int:
        """How many (sender, seq) pairs are remembered."""
        return self._total

    @property
    def tracked_senders(self) -> int:
        return len(self._senders)

    def check(self, sender: str, seq: int, ts: float, now: float) -> None:
        """Raise Rejected (STALE, FUTURE or REPLAYED) unless the envelope is fresh; record nothing."""
        if ts < now - self.skew_s:
            raise Rejected(RejectReason.STALE, f"ts {ts:.3f} is {now - ts:.1f} s old (skew {self.skew_s} s)")
        if ts > now + self.skew_s:
            raise Rejected(
                RejectReason.FUTURE, f"ts {ts:.3f} is {ts - now:.1f} s ahead (skew {self.skew_s} s)"
            )
        win = self._senders.get(sender)
        if win is None:
            if ts <= self._ts_floor:
                raise Rejected(RejectReason.STALE, "sender's replay state was evicted after this ts")
            return
        if seq <= win.floor:
            raise Rejected(RejectReason.REPLAYED, f"seq {seq} is below the window (floor {win.floor})")
        if seq in win.seen:
            raise Rejected(RejectReason.REPLAYED, f"seq {seq} already seen")

    def record(self, sender: str, seq: int, ts: float, now: float) -> None:
        """Remember an accepted (sender, seq); call only after `check` passed and the signature verified."""
        win = self._senders.get(sender)
        if win is None:
            win = self._senders[sender] = _SenderWindow()
        else:
            self._senders.move_to_end(sender)
        win.seen[seq] = ts
        win.max_ts = max(win.max_ts, ts)
        self._total += 1
        if len(win.seen) > self.window:
            self._slide(win, now)
        while self._total > self.cache_size and len(self._senders) > 1:
            self._evict_oldest_sender(now)

    def _slide(self, win: _SenderWindow, now: float) -> None:
        # Entries older than the skew period are refused by the ts check anyway: drop them for free.
        expired = [s for s, t in win.seen.items() if t < now - self.skew_s]
        for s in expired:
            del win.seen[s]
        self._total -= len(expired)
        if len(win.seen) > self.window:
            # Forget the lowest quarter at once (amortised O(1) per message) and raise the floor.
            ordered = sorted(win.seen)
            drop = ordered[: max(1, self.window // 4)]
            for s in drop:
                del win.seen[s]
            self._total -= len(drop)
            win.floor = max(win.floor, drop[-1])

    def _evict_oldest_sender(self, now: float) -> None:
        sender, win = self._senders.popitem(last=False)
        self._total -= len(win.seen)
        if win.max_ts >= now - self.skew_s:
            self._ts_floor = max(self._ts_floor, win.max_ts)
            logger.warning(
                "replay cache full (%d entries): evicted active sender %s; unknown senders' envelopes "
                "up to ts %.3f are now refused as stale",
                self.cache_size,
                sender,
                self._ts_floor,
            )


# --------------------------------------------------------------------------------------------------
# verification


@dataclass(frozen=True)
class Opened:
    """A verified envelope: who sent it, its sequence number and timestamp, and the decoded message."""

    sender: str
    seq: int
    ts: float
    message: Any


def _always_admitted(peer_id: str) -> bool:
    return True


class EnvelopeVerifier:
    """Opens envelopes for one run: every check of the module docstring, then the decoded message.

    `admitted(peer_id)` decides membership (allowlist, tickets, bans). Rejections are raised as
    `Rejected`, logged at debug and counted in `rejections`; callers drop the input and lower the
    sender's score.
    """

    def __init__(
        self,
        run_id: str,
        admitted: Callable[[str], bool] = _always_admitted,
        guard: ReplayGuard | None = None,
        max_size: int | None = None,
        registry: codec.MessageRegistry | None = None,
    ) -> None:
        self.run_id = run_id
        self.admitted = admitted
        self.guard = guard if guard is not None else ReplayGuard()
        self._max_size = max_size
        self._registry = codec.REGISTRY if registry is None else registry
        self.rejections: collections.Counter[RejectReason] = collections.Counter()
        self.accepted = 0

    @property
    def max_size(self) -> int:
        """Largest envelope accepted: the largest registered message plus the envelope overhead."""
        return self._max_size if self._max_size is not None else self._registry.max_size() + ENVELOPE_OVERHEAD

    def open(self, data: bytes, now: float | None = None) -> Opened:
        """Verify and decode one envelope; raise Rejected with the first failing check's reason."""
        try:
            opened = self._open(data, time.time() if now is None else now)
        except Rejected as e:
            self.rejections[e.reason] += 1
            logger.debug("envelope rejected: %s", e)
            raise
        self.accepted += 1
        return opened

    def _open(self, data: bytes, now: float) -> Opened:
        limit = self.max_size
        if len(data) > limit:
            raise Rejected(RejectReason.OVERSIZED, f"{len(data)} bytes > {limit}")
        try:
            env = codec.unpackb_limited(data, limit)
        except MessageTooLarge as e:
            raise Rejected(RejectReason.OVERSIZED, str(e)) from None
        except ProtocolError as e:
            raise Rejected(RejectReason.MALFORMED, str(e)) from None
        self._check_shape(env)
        if env["v"] != ENVELOPE_VERSION:
            raise Rejected(RejectReason.UNSUPPORTED_VERSION, f"envelope version {env['v']}")
        if env["run"] != self.run_id:
            raise Rejected(RejectReason.WRONG_RUN, f"run {env['run'][:16]!r}…")
        sender: str = env["sender"]
        try:
            public_key_from_peer_id(sender)
        except InvalidPeerId as e:
            raise Rejected(RejectReason.BAD_SENDER, str(e)) from None
        if not self.admitted(sender):
            raise Rejected(RejectReason.NOT_ADMITTED, sender)
        if not verify(sender, domains.ENVELOPE, signing_bytes(env), env["sig"]):
            raise Rejected(RejectReason.FORGED_SIGNATURE, f"from {sender}")
        seq: int = env["seq"]
        ts: float = env["ts"]
        self.guard.check(sender, seq, ts, now)
        # Signature verified: the sender really used this seq, so it is spent whatever the body holds.
        self.guard.record(sender, seq, ts, now)
        message = self._decode_body(env["type"], env["body"])
        return Opened(sender=sender, seq=seq, ts=ts, message=message)

    @staticmethod
    def _check_shape(env: Any) -> None:
        if type(env) is not dict or env.keys() != _KEYS:
            raise Rejected(RejectReason.MALFORMED, "not a map with exactly the envelope keys")
        kinds = {"v": int, "type": int, "run": str, "sender": str, "seq": int, "ts": float, "body": bytes}
        for key, kind in kinds.items():
            if type(env[key]) is not kind:
                raise Rejected(RejectReason.MALFORMED, f"{key}: expected {kind.__name__}")
        if type(env["sig"]) is not bytes or len(env["sig"]) != 64:
            raise Rejected(RejectReason.MALFORMED, "sig: expected 64 bytes")
        if not 0 <= env["seq"] <= _SEQ_MAX:
            raise Rejected(RejectReason.MALFORMED, "seq out of range")
        if len(env["run"]) > MAX_RUN_ID_CHARS:
            raise Rejected(RejectReason.MALFORMED, "run id too long")

    def _decode_body(self, type_id: int, body: bytes) -> Any:
        spec = self._registry.by_type_id(type_id)
        if spec is None:
            raise Rejected(RejectReason.UNKNOWN_TYPE, f"type id {type_id}")
        try:
            if codec.message_type_id(body) != type_id:
                raise Rejected(RejectReason.MALFORMED, "body type differs from the envelope's type")
            return codec.decode(body, expected=spec.cls, registry=self._registry)
        except UnsupportedVersion as e:
            raise Rejected(RejectReason.UNSUPPORTED_VERSION, str(e)) from None
        except UnknownMessageType as e:
            raise Rejected(RejectReason.UNKNOWN_TYPE, str(e)) from None
        except MessageTooLarge as e:
            raise Rejected(RejectReason.OVERSIZED, str(e)) from None
        except MalformedMessage as e:
            raise Rejected(RejectReason.MALFORMED, str(e)) from None
