"""The only msgpack user of intellect-node: message registry, message codec and canonical plain data.

A message is a frozen dataclass registered with `@message(type_id, version, max_size)`. Its wire form is
the msgpack array

    [type_id: int, version: int, [field_1, field_2, ...]]    (fields in declaration order)

Field annotations allowed: `int` (−2**63 .. 2**64−1), `float` (finite, always float64), `bool`, `str`
(UTF-8), `bytes` (msgpack bin), `tuple[T, ...]` and fixed `tuple[A, B]` (msgpack arrays), `T | None`
(nil), and nested frozen dataclasses obeying the same rules (an array of their fields). Decoding checks the
length against the limit before parsing, passes msgpack explicit limits derived from the input length,
refuses ext types, trailing bytes, maps with non-string keys and nesting deeper than `MAX_DEPTH`, then
checks every field against its annotation: an int where bytes are declared is a `MalformedMessage`.

`packb_canonical` / `unpackb_limited` handle plain data (None, bool, int, float, str, bytes, lists and
maps with str keys): canonical means map keys sorted by their UTF-8 bytes, shortest integer forms, floats
as float64, str as msgpack str and bytes as bin, so equal values always give equal bytes (what signatures
cover). See docs/protocol.md for the byte-level rules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from intellect.protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnexpectedMessageType,
    UnknownMessageType,
    UnsupportedVersion,
)

logger = logging.getLogger(__name__)

#: Deepest nesting of arrays/maps accepted anywhere (msgpack's own C stack allows 1024).
MAX_DEPTH = 32
#: Default `max_size` of a message type, and the largest input `unpackb_limited` accepts by default.
DEFAULT_MAX_SIZE = 64 * 1024
#: No message type may declare a larger `max_size` (tensors travel outside the codec, in hivemind streams).
ABSOLUTE_MAX_SIZE = 64 * 1024 * 1024
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# plain data: limited unpacking, validation walk, canonical packing


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def unpackb_limited(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode one msgpack object of at most `max_size` bytes into plain data, or raise ProtocolError.

    Every msgpack length limit is set to the input's length (an array of n elements needs at least n
    bytes), so a forged header such as `0xdd ffffffff` cannot make msgpack allocate beyond the input.
    Returns None/bool/int/float/str/bytes/list/dict[str, ...] only; floats are finite.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    n = len(data)
    if n > max_size:
        raise MessageTooLarge(f"{n} bytes exceeds the limit of {max_size}")
    if n == 0:
        raise MalformedMessage("empty input")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    # ExtraData (trailing bytes), StackError (nesting), FormatError, OutOfData and limit violations are all
    # ValueError subclasses; UnicodeDecodeError (invalid UTF-8 in a str) is one too.
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
        raise MalformedMessage(f"invalid msgpack: {type(e).__name__}: {e}") from None
    _check_plain(obj)
    return obj


def _check_scalar(item: Any) -> None:
    kind = type(item)
    if kind is float:
        if not math.isfinite(item):
            raise MalformedMessage("non-finite float")
    elif not (item is None or kind is bool or kind is int or kind is str or kind is bytes):
        # e.g. msgpack.Timestamp: ext types are refused while parsing, this is belt and braces.
        raise MalformedMessage(f"value of type {kind.__name__} is not allowed")


def _check_plain(obj: Any) -> None:
    """Walk decoded data iteratively: depth bounded, str map keys only, finite floats, no ext objects.

    Only containers are pushed on the walk's stack, so checking adds little to what msgpack allocated.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is list:
            values = item
        elif kind is dict:
            for key in item:
                if type(key) is not str:
                    raise MalformedMessage(f"map key of type {type(key).__name__}; only str keys allowed")
            values = item.values()
        else:
            _check_scalar(item)
            continue
        if depth > MAX_DEPTH:
            raise MalformedMessage(f"nesting deeper than {MAX_DEPTH}")
        for value in values:
            vkind = type(value)
            if vkind is list or vkind is dict:
                if value:  # an empty container needs no check: do not spend a stack entry on it
                    stack.append((value, depth + 1))
                elif depth + 1 > MAX_DEPTH:
                    raise MalformedMessage(f"nesting deeper than {MAX_DEPTH}")
            else:
                _check_scalar(value)


def _canonical(obj: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}")
    kind = type(obj)
    if obj is None or kind in (bool, str, bytes):
        return obj
    if kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise ValueError(f"integer {obj} outside msgpack's range")
        return obj
    if kind is float:
        if not math.isfinite(obj):
            raise ValueError("floats must be finite")
        return obj
    if kind in (list, tuple):
        return [_canonical(x, depth + 1) for x in obj]
    if kind is dict:
        for key in obj:
            if type(key) is not str:
                raise ValueError(f"map keys must be str, got {type(key).__name__}")
        # Python orders str by code point, which is the order of their UTF-8 bytes.
        return {k: _canonical(obj[k], depth + 1) for k in sorted(obj)}
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    raise TypeError(f"cannot encode {kind.__name__} canonically")


def packb_canonical(obj: Any) -> bytes:
    """Deterministic msgpack of plain data: sorted str keys, shortest ints, float64, bin for bytes.

    Raises TypeError/ValueError (our own bug, not a peer's) for anything else, non-str keys, non-finite
    floats, out-of-range integers or nesting deeper than MAX_DEPTH.
    """
    return msgpack.packb(_canonical(obj, 1), use_bin_type=True, use_single_float=False, datetime=False)


# --------------------------------------------------------------------------------------------------
# field converters compiled from annotations


@dataclass(frozen=True)
class _Field:
    """How one annotated type is checked and converted, both ways."""

    #: plain-data value -> Python value (decode); raises MalformedMessage naming `path`.
    load: Callable[[Any, str], Any]
    #: Python value -> plain-data value (encode); raises TypeError/ValueError (our own bug).
    dump: Callable[[Any, str], Any]


def _bad(path: str, expected: str, value: Any) -> MalformedMessage:
    return MalformedMessage(f"{path}: expected {expected}, got {type(value).__name__}")


def _scalar(kind: type) -> _Field:
    name = kind.__name__

    def load(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise _bad(path, name, v)
        if kind is int and not _INT_MIN <= typing.cast(int, v) <= _INT_MAX:
            raise MalformedMessage(f"{path}: integer out of range")
        if kind is float and not math.isfinite(typing.cast(float, v)):
            raise MalformedMessage(f"{path}: non-finite float")
        return v

    def dump(v: Any, path: str) -> Any:
        if kind is float and type(v) is int:
            v = float(v)  # lenient on our side: 1 for a float field is sent as 1.0
        if kind is bytes and type(v) in (bytearray, memoryview):
            v = bytes(v)
        if type(v) is not kind:
            raise TypeError(f"{path}: expected {name}, got {type(v).__name__}")
        if kind is int and not _INT_MIN <= typing.cast(int, v) <= _INT_MAX:
            raise ValueError(f"{path}: integer {v} outside msgpack's range")
        if kind is float and not math.isfinite(typing.cast(float, v)):
            raise ValueError(f"{path}: floats on the wire must be finite")
        return v

    return _Field(load, dump)


def _var_tuple(inner: _Field) -> _Field:
    def load(v: Any, path: str) -> Any:
        if type(v) is not list:
            raise _bad(path, "array", v)
        return tuple(inner.load(x, f"{path}[{i}]") for i, x in enumerate(v))

    def dump(v: Any, path: str) -> Any:
        if not isinstance(v, tuple | list):
            raise TypeError(f"{path}: expected a tuple, got {type(v).__name__}")
        return [inner.dump(x, f"{path}[{i}]") for i, x in enumerate(v)]

    return _Field(load, dump)


def _fixed_tuple(items: tuple[_Field, ...]) -> _Field:
    def load(v: Any, path: str) -> Any:
        if type(v) is not list or len(v) != len(items):
            raise MalformedMessage(f"{path}: expected an array of {len(items)}")
        return tuple(f.load(x, f"{path}[{i}]") for i, (f, x) in enumerate(zip(items, v, strict=True)))

    def dump(v: Any, path: str) -> Any:
        if not isinstance(v, tuple | list) or len(v) != len(items):
            raise TypeError(f"{path}: expected a tuple of {len(items)}")
        return [f.dump(x, f"{path}[{i}]") for i, (f, x) in enumerate(zip(items, v, strict=True))]

    return _Field(load, dump)


def _optional(inner: _Field) -> _Field:
    def load(v: Any, path: str) -> Any:
        return None if v is None else inner.load(v, path)

    def dump(v: Any, path: str) -> Any:
        return None if v is None else inner.dump(v, path)

    return _Field(load, dump)


def _struct(cls: type) -> _Field:
    fields = _dataclass_fields(cls)

    def load(v: Any, path: str) -> Any:
        if type(v) is not list or len(v) != len(fields):
            raise MalformedMessage(f"{path}: expected an array of {len(fields)} fields of {cls.__name__}")
        values = [f.load(x, f"{path}.{name}") for (name, f), x in zip(fields, v, strict=True)]
        try:
            return cls(*values)
        except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
            raise MalformedMessage(f"{path}: invalid {cls.__name__}: {e}") from None

    def dump(v: Any, path: str) -> Any:
        if type(v) is not cls:
            raise TypeError(f"{path}: expected {cls.__name__}, got {type(v).__name__}")
        return [f.dump(getattr(v, name), f"{path}.{name}") for name, f in fields]

    return _Field(load, dump)


def _compile(tp: Any, where: str) -> _Field:
    if tp in (int, float, bool, str, bytes):
        return _scalar(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _var_tuple(_compile(args[0], where))
        if args and Ellipsis not in args:
            return _fixed_tuple(tuple(_compile(a, where) for a in args))
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return _optional(_compile(inner, where))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{where}: nested dataclass {tp.__name__} must be frozen")
        return _struct(tp)
    raise TypeError(
        f"{where}: annotation {tp!r} is not allowed on the wire "
        "(int, float, bool, str, bytes, tuple[T, ...], tuple[A, B], T | None, frozen dataclass)"
    )


def _dataclass_fields(cls: type) -> tuple[tuple[str, _Field], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, _compile(hints[f.name], f"{cls.__name__}.{f.name}"))
        for f in dataclasses.fields(cls)
        if f.init
    )


# --------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class MessageSpec:
    """What the registry knows about one message type."""

    cls: type
    type_id: int
    version: int
    max_size: int
    #: (field name, resolved annotation) in wire order, for tools and property tests.
    annotations: tuple[tuple[str, Any], ...]
    _fields: _Field = dataclasses.field(repr=False, compare=False)


class MessageRegistry:
    """Type id -> message class, refusing duplicate ids and duplicate classes.

    One process-wide instance (`REGISTRY`) holds the protocol's messages; tests may make their own.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, MessageSpec] = {}
        self._by_cls: dict[type, MessageSpec] = {}

    def register(self, cls: type, type_id: int, version: int, max_size: int) -> MessageSpec:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{cls!r}: a message must be a dataclass")
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__}: a message dataclass must be frozen")
        if type(type_id) is not int or not 1 <= type_id <= 0xFFFF:
            raise ValueError(f"{cls.__name__}: type_id must be an int in 1..65535, got {type_id!r}")
        if type(version) is not int or not 1 <= version <= 0xFFFF:
            raise ValueError(f"{cls.__name__}: version must be an int in 1..65535, got {version!r}")
        if type(max_size) is not int or not 16 <= max_size <= ABSOLUTE_MAX_SIZE:
            raise ValueError(f"{cls.__name__}: max_size must be in 16..{ABSOLUTE_MAX_SIZE}, got {max_size!r}")
        if cls in self._by_cls:
            raise ValueError(f"{cls.__name__} is already registered as type {self._by_cls[cls].type_id}")
        if type_id in self._by_id:
            other = self._by_id[type_id].cls
            raise ValueError(
                f"type id {type_id} of {cls.__module__}.{cls.__qualname__} is already taken by "
                f"{other.__module__}.{other.__qualname__}"
            )
        hints = typing.get_type_hints(cls)
        spec = MessageSpec(
            cls=cls,
            type_id=type_id,
            version=version,
            max_size=max_size,
            annotations=tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init),
            _fields=_struct(cls),
        )
        self._by_id[type_id] = spec
        self._by_cls[cls] = spec
        return spec

    def spec_for(self, cls_or_msg: Any) -> MessageSpec:
        """The spec of a registered class or of an instance of one (KeyError otherwise)."""
        cls = cls_or_msg if isinstance(cls_or_msg, type) else type(cls_or_msg)
        try:
            return self._by_cls[cls]
        except KeyError:
            raise KeyError(f"{cls.__name__} is not a registered message") from None

    def by_type_id(self, type_id: int) -> MessageSpec | None:
        return self._by_id.get(type_id)

    def __iter__(self) -> Iterator[MessageSpec]:
        return iter(sorted(self._by_id.values(), key=lambda s: s.type_id))

    def __len__(self) -> int:
        return len(self._by_id)

    def max_size(self) -> int:
        """The largest `max_size` of any registered type (the bound for an input of unknown type)."""
        return max((s.max_size for s in self._by_id.values()), default=DEFAULT_MAX_SIZE)


#: The protocol's registry; every `@message` class lands here unless another registry is passed.
REGISTRY = MessageRegistry()


def message(
    type_id: int,
    version: int = 1,
    max_size: int = DEFAULT_MAX_SIZE,
    registry: MessageRegistry | None = None,
) -> Callable[[type[T]], type[T]]:
    """Class decorator registering a frozen dataclass as a wire message.

    `max_size` bounds the encoded message in bytes, for both encoding and decoding.
    """

    def wrap(cls: type[T]) -> type[T]:
        (REGISTRY if registry is None else registry).register(cls, type_id, version, max_size)
        return cls

    return wrap


def registered_messages(registry: MessageRegistry | None = None) -> list[MessageSpec]:
    """Every registered message spec, by type id."""
    return list(REGISTRY if registry is None else registry)


# --------------------------------------------------------------------------------------------------
# message encode / decode


def encode(msg: Any, registry: MessageRegistry | None = None) -> bytes:
    """Wire bytes of a registered message: msgpack `[type_id, version, [fields...]]`.

    Raises TypeError/ValueError when a field does not match its annotation, and MessageTooLarge when the
    result exceeds the type's `max_size`.
    """
    spec = (REGISTRY if registry is None else registry).spec_for(msg)
    fields = spec._fields.dump(msg, spec.cls.__name__)
    data: bytes = msgpack.packb(
        [spec.type_id, spec.version, fields], use_bin_type=True, use_single_float=False, datetime=False
    )
    if len(data) > spec.max_size:
        raise MessageTooLarge(f"{spec.cls.__name__} encodes to {len(data)} bytes > max_size {spec.max_size}")
    return data


def message_type_id(data: bytes) -> int:
    """Peek at the type id of encoded message bytes without decoding the fields (ProtocolError if none)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=16, max_ext_len=0, ext_hook=_refuse_ext)
    unpacker.feed(bytes(data[:16]))
    try:
        if unpacker.read_array_header() != 3:
            raise MalformedMessage("a message is an array of 3: [type_id, version, fields]")
        type_id = unpacker.unpack()
    except ProtocolError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
        raise MalformedMessage(f"invalid message header: {type(e).__name__}") from None
    if type(type_id) is not int:
        raise MalformedMessage("type_id must be an int")
    return type_id


def decode(data: bytes, expected: type[T] | None = None, registry: MessageRegistry | None = None) -> T:
    """Decode wire bytes into a registered message, or raise ProtocolError.

    With `expected`, the input is bounded by that type's `max_size` before parsing and any other type is
    an UnexpectedMessageType; without it, by the largest registered `max_size`, then by the decoded type's.
    """
    reg = REGISTRY if registry is None else registry
    if expected is not None:
        exp_spec = reg.spec_for(expected)
        if len(data) > exp_spec.max_size:
            raise MessageTooLarge(
                f"{len(data)} bytes exceeds max_size {exp_spec.max_size} of {exp_spec.cls.__name__}"
            )
    plain = unpackb_limited(data, reg.max_size())
    if type(plain) is not list or len(plain) != 3:
        raise MalformedMessage("a message is an array of 3: [type_id, version, fields]")
    type_id, version, fields = plain
    if type(type_id) is not int or type(version) is not int:
        raise MalformedMessage("type_id and version must be ints")
    spec = reg.by_type_id(type_id)
    if spec is None:
        raise UnknownMessageType(f"unknown message type id {type_id}")
    if version != spec.version:
        raise UnsupportedVersion(f"{spec.cls.__name__} version {version}; this node speaks {spec.version}")
    if len(data) > spec.max_size:
        raise MessageTooLarge(f"{len(data)} bytes exceeds max_size {spec.max_size} of {spec.cls.__name__}")
    if expected is not None and spec.cls is not expected:
        raise UnexpectedMessageType(f"expected {expected.__name__}, got {spec.cls.__name__}")
    msg: T = spec._fields.load(fields, spec.cls.__name__)
    return msg


# --------------------------------------------------------------------------------------------------
# core messages (type ids 1..99)


@message(type_id=1, version=1, max_size=4096)
@dataclass(frozen=True)
class Hello:
    """First message a peer sends on a new session: who it is and what it speaks."""

    #: Software name and version, e.g. "intellect-node/0.1.0".
    agent: str
    #: Highest envelope version the sender speaks.
    protocol_version: int
    #: Run the sender is working on ("" when none yet).
    run: str
    #: Multiaddrs where the sender can be reached.
    listen_addrs: tuple[str, ...] = ()


@message(type_id=2, version=1, max_size=256)
@dataclass(frozen=True)
class Ping:
    """Liveness probe; the answer is a Pong with the same nonce."""

    nonce: int
    #: Sender's wall clock (unix seconds) when sent, for rough RTT and clock-skew estimates.
    sent_at: float


@message(type_id=3, version=1, max_size=256)
@dataclass(frozen=True)
class Pong:
    """Answer to a Ping."""

    nonce: int
    #: Responder's wall clock (unix seconds) when it answered.
    sent_at: float
