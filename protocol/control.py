"""The researcher's control record: pause, resume or end a run (pure: no hivemind, no torch).

A `RunControl` (type 110) is signed by the run's researcher (the manifest's `researcher`) under
`domains.RUN_CONTROL` and stored in the DHT under `keys.control_key(run_id)`, subkey the signer's peer ID,
until its signed `expires_at`. Nodes read it while they train (`node/run/lifecycle.py`) and refuse, with a
`ControlReject` reason, any record that is malformed, of another run, signed by anyone else, forged, older
than the newest they applied (`seq`), issued in the future or expired. The newest valid record is the
run's current control state: a node that joins a paused run finds it paused.

`end` names the run's last round (`end_round`): every member stops once it holds that round, so that they
all stop on the same state (the budget's last round, `final_round`, still applies when it comes first).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
from dataclasses import dataclass

from intellect.crypto import domains
from intellect.crypto.errors import InvalidPeerId
from intellect.crypto.identity import Identity, public_key_from_peer_id, verify
from intellect.protocol.codec import decode, encode, message
from intellect.protocol.errors import ProtocolError

CONTROL_TYPE = 110
MAX_CONTROL_BYTES = 1024
#: How long a control record may stay in the DHT; the researcher publishes again to keep one longer.
MAX_CONTROL_TTL_S = 30 * 86_400.0
#: Tolerated clock difference between the researcher and a node.
CLOCK_SKEW_S = 30.0
ACTIONS = ("pause", "resume", "end")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ControlReject(enum.StrEnum):
    """Why a node refused a control record."""

    #: Not a RunControl, or fields out of range.
    MALFORMED = "malformed"
    #: A valid record of another run (filed under ours).
    OTHER_RUN = "other_run"
    #: Signed by someone other than the run's researcher.
    WRONG_SIGNER = "wrong_signer"
    #: Names the researcher, but the signature does not verify.
    BAD_SIGNATURE = "bad_signature"
    #: Its `seq` is not above the newest record we applied (an old record replayed, or out of order).
    STALE = "stale"
    #: Issued further in the future than the clock skew allows.
    FUTURE = "future"
    #: Past its `expires_at`.
    EXPIRED = "expired"


class ControlRejected(ProtocolError):
    """A control record a node must not honour; `reason` says why."""

    def __init__(self, reason: ControlReject, detail: str = "") -> None:
        super().__init__(f"control record refused ({reason.value}){': ' + detail if detail else ''}")
        self.reason = reason


@message(CONTROL_TYPE, max_size=MAX_CONTROL_BYTES)
@dataclass(frozen=True)
class RunControl:
    """The researcher's order to every node of `run_id`: pause, resume or end (at `end_round`)."""

    run_id: str
    #: Peer ID of the signer; a node honours it only when it is the manifest's researcher.
    researcher: str
    #: One of ACTIONS.
    action: str
    #: Strictly increasing per run (the CLI uses milliseconds since the epoch): a node applies a record
    #: only when its seq is above the newest it applied, so an older record replayed changes nothing.
    seq: int
    issued_at: float
    expires_at: float
    #: `end` only: the last round of the run (>= 1); 0 for pause and resume.
    end_round: int
    sig: bytes = b""

    def __post_init__(self) -> None:
        if not _HEX64.match(self.run_id):
            raise ValueError("run_id must be 64 lowercase hex characters")
        try:
            public_key_from_peer_id(self.researcher)
        except InvalidPeerId as e:
            raise ValueError(f"researcher: {e}") from None
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
        if not 0 <= self.seq < 1 << 63:
            raise ValueError("seq out of range")
        if not 0.0 < self.expires_at - self.issued_at <= MAX_CONTROL_TTL_S:
            raise ValueError(f"expires_at must be within {MAX_CONTROL_TTL_S:.0f}s after issued_at")
        if not 0 <= self.end_round < 1 << 62 or (self.action == "end") != (self.end_round > 0):
            raise ValueError("end_round must be >= 1 for end and 0 otherwise")
        if len(self.sig) > 128:
            raise ValueError("signature too long")

    def body(self) -> bytes:
        """The signed bytes: the record with an empty signature."""
        return encode(dataclasses.replace(self, sig=b""))


def sign_control(
    researcher: Identity,
    run_id: str,
    action: str,
    *,
    end_round: int = 0,
    seq: int | None = None,
    ttl_s: float = 7 * 86_400.0,
    now: float | None = None,
) -> bytes:
    """Researcher side: an encoded, signed control record (seq defaults to milliseconds since the epoch)."""
    now = time.time() if now is None else now
    seq = int(now * 1000) if seq is None else seq
    unsigned = RunControl(run_id, researcher.peer_id, action, seq, now, now + ttl_s, end_round)
    return encode(dataclasses.replace(unsigned, sig=researcher.sign(domains.RUN_CONTROL, unsigned.body())))


def open_control(
    data: bytes, run_id: str, researcher: str, last_seq: int = -1, now: float | None = None
) -> RunControl:
    """Decode and check a control record for `run_id` whose manifest names `researcher`; raise
    `ControlRejected` unless it is theirs, intact, current and newer than `last_seq`."""
    try:
        c = decode(data, expected=RunControl)
    except (ProtocolError, ValueError, TypeError) as e:
        raise ControlRejected(ControlReject.MALFORMED, str(e)) from None
    if c.run_id != run_id:
        raise ControlRejected(ControlReject.OTHER_RUN, c.run_id[:12])
    if c.researcher != researcher:
        raise ControlRejected(ControlReject.WRONG_SIGNER, c.researcher)
    if not verify(c.researcher, domains.RUN_CONTROL, c.body(), c.sig):
        raise ControlRejected(ControlReject.BAD_SIGNATURE)
    now = time.time() if now is None else now
    if c.issued_at > now + CLOCK_SKEW_S:
        raise ControlRejected(ControlReject.FUTURE)
    if c.expires_at <= now:
        raise ControlRejected(ControlReject.EXPIRED)
    if c.seq <= last_seq:
        raise ControlRejected(ControlReject.STALE, f"seq {c.seq} <= {last_seq}")
    return c
