"""Errors of the wire protocol: everything a peer can make us raise while decoding is a `ProtocolError`.

    ProtocolError                 anything wrong with bytes that came from the network
     ├── MessageTooLarge          longer than the limit of the message type or the envelope (checked first)
     ├── MalformedMessage         not valid msgpack, trailing bytes, too deep, wrong shape or field type
     │    └── UnexpectedMessageType   a valid message, but not the type the caller asked for
     ├── UnknownMessageType       a type id that no registered message has
     ├── UnsupportedVersion       a registered type id, but a version this node does not speak
     └── Rejected                 a signed envelope failed verification; `.reason` is a RejectReason

Handlers catch `ProtocolError` at the boundary, drop the input, count it and lower the peer's score; they
never let it crash a service. Programming errors on our side (encoding a value of the wrong type, two
messages claiming one type id) are `TypeError`/`ValueError`, not `ProtocolError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from intellect.protocol.envelope import RejectReason


class ProtocolError(Exception):
    """Base of every error caused by bytes that came from a peer."""


class MessageTooLarge(ProtocolError):
    """The input is longer than the limit that applies to it (checked before any parsing)."""


class MalformedMessage(ProtocolError):
    """Not well-formed: bad msgpack, trailing bytes, nesting too deep, wrong shape, wrong field type."""


class UnexpectedMessageType(MalformedMessage):
    """A well-formed message of a type other than the one the caller expected."""


class UnknownMessageType(ProtocolError):
    """The type id is not in the registry."""


class UnsupportedVersion(ProtocolError):
    """The type id is known but the message or envelope version is not one this node speaks."""


class Rejected(ProtocolError):
    """A signed envelope was refused; `reason` says which check failed, `detail` says how."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
