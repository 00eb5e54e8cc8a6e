"""The codec: registry rules, field type checks, canonical plain data, and a decoder fuzzer.

Test-only messages live in a private `MessageRegistry`, so they never collide with the protocol's.
"""

from __future__ import annotations

import contextlib
import math
import struct
import tracemalloc
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from intellect.protocol import codec
from intellect.protocol.codec import (
    MAX_DEPTH,
    MessageRegistry,
    decode,
    encode,
    message,
    packb_canonical,
    unpackb_limited,
)
from intellect.protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnexpectedMessageType,
    UnknownMessageType,
    UnsupportedVersion,
)

REG = MessageRegistry()


@dataclass(frozen=True)
class Shard:
    uri: str
    tokens: int


@message(type_id=10, version=2, max_size=2048, registry=REG)
@dataclass(frozen=True)
class Everything:
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    ints: tuple[int, ...]
    pair: tuple[str, bytes]
    maybe: int | None
    nested: tuple[tuple[str, ...], ...]
    shards: tuple[Shard, ...] = ()


@message(type_id=11, max_size=64, registry=REG)
@dataclass(frozen=True)
class Small:
    text: str


@message(type_id=12, max_size=256, registry=REG)
@dataclass(frozen=True)
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


def sample() -> Everything:
    return Everything(
        i=-5,
        f=0.25,
        b=True,
        s="héllo",
        raw=b"\x00\xff",
        ints=(1, 2, 3),
        pair=("a", b"b"),
        maybe=None,
        nested=(("x",), ()),
        shards=(Shard("file:///a", 10),),
    )


def wire(type_id: int, version: int, fields: list) -> bytes:
    return msgpack.packb([type_id, version, fields], use_bin_type=True)


# --------------------------------------------------------------------------------------------------
# registry


def test_round_trip_and_wire_form() -> None:
    msg = sample()
    data = encode(msg, registry=REG)
    assert decode(data, registry=REG) == msg
    assert decode(data, expected=Everything, registry=REG) == msg
    plain = msgpack.unpackb(data, raw=False)
    assert plain[:2] == [10, 2] and plain[2][0] == -5 and plain[2][9] == [["file:///a", 10]]


def test_registry_refuses_duplicate_type_id_and_class() -> None:
    reg = MessageRegistry()

    @message(type_id=5, registry=reg)
    @dataclass(frozen=True)
    class A:
        x: int

    with pytest.raises(ValueError, match="already taken"):

        @message(type_id=5, registry=reg)
        @dataclass(frozen=True)
        class B:
            x: int

    with pytest.raises(ValueError, match="already registered"):
        reg.register(A, 6, 1, 100)
    assert len(reg) == 1


def test_registry_refuses_bad_declarations() -> None:
    reg = MessageRegistry()

    @dataclass
    class NotFrozen:
        x: int

    with pytest.raises(TypeError, match="frozen"):
        reg.register(NotFrozen, 1, 1, 100)

    @dataclass(frozen=True)
    class Listy:
        x: list[int]

    with pytest.raises(TypeError, match="not allowed on the wire"):
        reg.register(Listy, 2, 1, 100)

    @dataclass(frozen=True)
    class Fine:
        x: int

    for bad in ({"type_id": 0}, {"version": 0}, {"max_size": 1 << 40}):
        kwargs = {"type_id": 3, "version": 1, "max_size": 100} | bad
        with pytest.raises(ValueError):
            reg.register(Fine, **kwargs)


def test_protocol_registry_core_messages() -> None:
    hello = codec.Hello(
        agent="intellect-node/0.1.0", protocol_version=1, run="", listen_addrs=("/ip4/1.2.3.4",)
    )
    assert decode(encode(hello)) == hello
    assert decode(encode(codec.Ping(nonce=7, sent_at=1.5)), expected=codec.Ping) == codec.Ping(7, 1.5)
    assert codec.message_type_id(encode(codec.Pong(1, 2.0))) == 3


def test_unknown_type_version_and_unexpected_type() -> None:
    with pytest.raises(UnknownMessageType):
        decode(wire(99, 1, []), registry=REG)
    with pytest.raises(UnsupportedVersion):
        decode(wire(11, 2, ["x"]), registry=REG)
    with pytest.raises(UnexpectedMessageType):
        decode(encode(Small("x"), registry=REG), expected=Everything, registry=REG)


def test_field_types_checked_after_decoding() -> None:
    good = msgpack.unpackb(encode(sample(), registry=REG), raw=False)[2]
    substitutions = {
        0: [b"bytes-for-int", True, 1.0],  # i: int (bool and float are not int)
        1: [1, "x", None],  # f: float (an int is not a float on the wire)
        2: [1, 0, "true"],  # b: bool
        3: [b"bytes", 3],  # s: str
        4: ["str", 4, [1]],  # raw: bytes (an int where bytes are declared)
        5: [[1, "2"], "123", [True]],  # ints
        6: [["a"], ["a", b"b", 1], ["a", "b"]],  # pair: tuple[str, bytes]
        7: ["1", 1.5],  # maybe: int | None
        8: [[["x", 1]], ["x"]],  # nested
        9: [[["uri"]], [["uri", "10"]], [{"uri": "x", "tokens": 1}]],  # shards
    }
    for index, values in substitutions.items():
        for value in values:
            fields = list(good)
            fields[index] = value
            with pytest.raises(MalformedMessage):
                decode(wire(10, 2, fields), registry=REG)
    with pytest.raises(MalformedMessage):  # missing field
        decode(wire(10, 2, good[:-1]), registry=REG)
    with pytest.raises(MalformedMessage):  # extra field
        decode(wire(10, 2, [*good, 1]), registry=REG)


def test_dataclass_validation_errors_become_malformed() -> None:
    assert decode(encode(Positive(3), registry=REG), registry=REG) == Positive(3)
    with pytest.raises(MalformedMessage, match="n must be positive"):
        decode(wire(12, 1, [-1]), registry=REG)


def test_encode_checks_types_and_size() -> None:
    with pytest.raises(TypeError):
        encode(Small(text=b"x"), registry=REG)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode(Everything(**{**sample().__dict__, "f": math.nan}), registry=REG)
    with pytest.raises(MessageTooLarge):
        encode(Small("x" * 100), registry=REG)
    with pytest.raises(KeyError):
        encode(Shard("x", 1), registry=REG)
    # An int given for a float field is sent as a float (and equal after decoding).
    msg = Everything(**{**sample().__dict__, "f": 3})
    assert decode(encode(msg, registry=REG), registry=REG).f == 3.0


def test_size_checked_before_parsing() -> None:
    data = encode(Small("x" * 40), registry=REG)
    assert len(data) <= 64
    too_big = wire(11, 1, ["x" * 100])
    with pytest.raises(MessageTooLarge):
        decode(too_big, expected=Small, registry=REG)
    with pytest.raises(MessageTooLarge):  # type learnt from the header, then its max_size applies
        decode(too_big, registry=REG)
    with pytest.raises(MessageTooLarge):
        unpackb_limited(b"\xc0" * 11, max_size=10)


# --------------------------------------------------------------------------------------------------
# canonical plain data

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
plain_data = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(plain_data)
def test_canonical_round_trip(value: object) -> None:
    data = packb_canonical(value)
    assert unpackb_limited(data, max_size=1 << 20) == value
    assert packb_canonical(unpackb_limited(data, max_size=1 << 20)) == data


@given(st.dictionaries(st.text(max_size=8), plain_scalars, max_size=8), st.randoms())
def test_canonical_is_independent_of_key_order(d: dict, rnd) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    assert packb_canonical(dict(items)) == packb_canonical(d)


def test_canonical_bytes_are_fixed() -> None:
    # Sorted keys, shortest ints, float64, bin for bytes: a known vector other implementations can match.
    data = packb_canonical({"b": 1, "a": [b"\x01", -1, 1.5, "é", None, True], "c": 300})
    assert data.hex() == "83a16196c40101ffcb3ff8000000000000a2c3a9c0c3a162" + "01a163cd012c"


def test_canonical_refuses_what_has_no_canonical_form() -> None:
    for bad in ({1: "int key"}, {b"k": 1}, math.nan, math.inf, 2**64, -(2**63) - 1, {1.5}, object()):
        with pytest.raises((TypeError, ValueError)):
            packb_canonical(bad)
    deep: list = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="nesting"):
        packb_canonical(deep)


# --------------------------------------------------------------------------------------------------
# decoder fuzzing

ADVERSARIAL: dict[str, bytes] = {
    "array32 header 2**32-1": b"\xdd\xff\xff\xff\xff",
    "map32 header 2**32-1": b"\xdf\xff\xff\xff\xff",
    "bin32 header 2**32-1": b"\xc6\xff\xff\xff\xff",
    "str32 header 2**32-1": b"\xdb\xff\xff\xff\xff",
    "ext32 header 2**32-1": b"\xc9\xff\xff\xff\xff\x01",
    "array16 claims more than given": b"\xdc\xff\xff" + b"\xc0" * 10,
    "deep nesting 10000": b"\x91" * 10000 + b"\xc0",
    "deep nesting just over our limit": b"\x91" * (MAX_DEPTH + 1) + b"\xc0",
    "deep maps": b"\x81\xa1k" * 100 + b"\xc0",
    "trailing bytes": encode(codec.Ping(1, 1.0)) + b"\x00",
    "two objects": encode(codec.Ping(1, 1.0)) * 2,
    "int map key": b"\x81\x01\x01",
    "bin map key": b"\x81\xc4\x01k\x01",
    "nil map key": b"\x81\xc0\x01",
    "array map key": b"\x81\x90\x01",
    "fixext1": b"\xd4\x01\x00",
    "fixext4 timestamp": b"\xd6\xff\x00\x00\x00\x00",
    "fixext16": b"\xd8\x05" + b"\x00" * 16,
    "ext8": b"\xc7\x03\x07abc",
    "ext16": b"\xc8\x00\x03\x07abc",
    "ext32": b"\xc9\x00\x00\x00\x03\x07abc",
    "ext inside message": wire(2, 1, [msgpack.ExtType(3, b"x"), 1.0]),
    "invalid utf-8 str": b"\xa2\xff\xfe",
    "invalid utf-8 inside message": b"\x93\x01\x01\x94\xa2\xff\xfe\x01\xa0\x90",
    "NaN float64": b"\xcb" + struct.pack(">d", math.nan),
    "inf float32": b"\xca" + struct.pack(">f", math.inf),
    "NaN in Ping": wire(2, 1, [1, math.nan]),
    "reserved byte 0xc1": b"\xc1",
    "truncated float": b"\xcb\x00\x00",
    "empty": b"",
    "not a list": b"\xa3abc",
    "wrong arity": wire(2, 1, [])[:-1] + b"\x90",
    "header only": b"\x93\x02\x01",
    "type id is str": b"\x93\xa1x\x01\x90",
    "negative type id": wire(-1, 1, []),
    "huge type id": wire(2**64 - 1, 1, []),
    "uint64 int where float": wire(2, 1, [1, 2**64 - 1]),
}


def _assert_only_protocol_error(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        return
    raise AssertionError("decoded without error")  # no adversarial input is a valid message


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_raise_protocol_error_with_bounded_memory(name: str) -> None:
    data = ADVERSARIAL[name]
    tracemalloc.start()
    try:
        _assert_only_protocol_error(data)
        for limit in (16, 1024, 1 << 20):
            with contextlib.suppress(ProtocolError):
                unpackb_limited(data, max_size=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Forged headers allocate nothing beyond the input: limits are set from the input's length.
    assert peak < 128 * len(data) + 256 * 1024, f"{name}: peak {peak} bytes for {len(data)} input bytes"


def test_specific_rejections() -> None:
    with pytest.raises(MalformedMessage, match="ExtraData"):
        decode(ADVERSARIAL["trailing bytes"])
    with pytest.raises(MalformedMessage, match="nesting deeper"):
        unpackb_limited(ADVERSARIAL["deep nesting just over our limit"])
    with pytest.raises(MalformedMessage):
        unpackb_limited(ADVERSARIAL["deep nesting 10000"], max_size=1 << 20)
    with pytest.raises(MalformedMessage, match="map key"):
        unpackb_limited(ADVERSARIAL["bin map key"])
    with pytest.raises(MalformedMessage, match="non-finite"):
        unpackb_limited(ADVERSARIAL["NaN float64"])
    # Nesting up to the limit is fine.
    assert unpackb_limited(b"\x91" * (MAX_DEPTH - 1) + b"\xc0") is not None


@pytest.mark.parametrize("item", [b"\xc0", b"\x90", b"\x80"])
def test_large_but_legal_container_memory_is_bounded(item: bytes) -> None:
    # The worst legal case: one Python object per input byte (nil, an empty list, an empty dict). Memory
    # stays linear in the input: at most ~100 bytes of Python objects per input byte (measured 8 to 101).
    data = b"\xdd\x00\x01\x00\x00" + item * 65536
    nested = b"\xdd\x00\x00\x80\x00" + (b"\x91" + item) * 32768
    tracemalloc.start()
    try:
        assert len(unpackb_limited(data, max_size=len(data))) == 65536
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert len(unpackb_limited(nested, max_size=len(data))) == 32768
        _, peak_nested = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 128 * len(data)
    assert peak_nested < 128 * len(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)
    with contextlib.suppress(ProtocolError):
        unpackb_limited(data, max_size=128)


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    valid = encode(sample(), registry=REG)
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut]), bytes(buf) + data.draw(st.binary(max_size=8))):
        with contextlib.suppress(ProtocolError):
            decode(candidate, registry=REG)
