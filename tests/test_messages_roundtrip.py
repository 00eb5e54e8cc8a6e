"""Every registered message type survives encode -> decode unchanged (hypothesis, one test per type).

The registry is filled by importing every module of `intellect.protocol` (pkgutil walk), and strategies
are built from each dataclass's field annotations, so a message added by anyone is covered without
touching this file. Message classes that validate their fields in `__post_init__` get realistic values
for well-known field names (peer IDs, run ids, hashes); a type whose values can never be generated makes
its test fail (hypothesis: Unsatisfiable) instead of passing vacuously: add a hint below.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from typing import Any

import intellect.protocol
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from intellect.crypto.identity import Identity
from intellect.protocol import codec
from intellect.protocol.errors import MessageTooLarge

for _mod in pkgutil.iter_modules(intellect.protocol.__path__):
    importlib.import_module(f"intellect.protocol.{_mod.name}")

SPECS = codec.registered_messages()

PEER_IDS = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(1, 5)]
HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

#: Realistic values for field names whose messages validate them (used for str fields only).
STR_HINTS: dict[str, st.SearchStrategy[str]] = {
    "peer_id": st.sampled_from(PEER_IDS),
    "sender": st.sampled_from(PEER_IDS),
    "receiver": st.sampled_from(PEER_IDS),
    "researcher": st.sampled_from(PEER_IDS),
    "accused": st.sampled_from(PEER_IDS),
    "server": st.sampled_from(PEER_IDS),
    "run_id": HEX64,
    "state_hash": HEX64,
    "schema_hash": HEX64,
    "role": st.sampled_from(["trainer", "bootstrap", "observer", "seed"]),
    "action": st.sampled_from(["pause", "resume", "end"]),
}


def _membership_times(cls: type) -> st.SearchStrategy[Any] | None:
    """MembershipRecord-like types: expires_at must follow issued_at within a TTL."""
    names = {f.name for f in dataclasses.fields(cls)}
    if not {"issued_at", "expires_at"} <= names:
        return None
    return st.tuples(st.floats(0, 2e9), st.floats(1.0, 600.0))


def strategy_for(tp: Any, name: str = "") -> st.SearchStrategy[Any]:
    if tp is str:
        return STR_HINTS.get(name, st.text(max_size=24))
    if tp is int:
        return st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.integers(0, 1000)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False) | st.floats(0.0, 1e6)
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return st.binary(max_size=64)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0], name), max_size=4).map(tuple)
        return st.tuples(*(strategy_for(a, name) for a in args))
    if type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return st.none() | strategy_for(inner, name)
    if dataclasses.is_dataclass(tp):
        return instances(tp)
    raise AssertionError(f"no strategy for {tp!r}; the codec should have refused it at registration")


def instances(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    kwargs = {f.name: strategy_for(hints[f.name], f.name) for f in fields}
    times = _membership_times(cls)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        values = {k: draw(s) for k, s in kwargs.items()}
        if times is not None:
            issued, ttl = draw(times)
            values["issued_at"], values["expires_at"] = issued, issued + ttl
        try:
            return cls(**values)
        except (TypeError, ValueError):  # the class's own validation refused these values
            assume(False)

    return build()


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.type_id}-{s.cls.__name__}" for s in SPECS])
def test_round_trip(spec: codec.MessageSpec) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(instances(spec.cls))
    def check(msg: Any) -> None:
        try:
            data = codec.encode(msg)
        except MessageTooLarge:
            assume(False)
            return
        assert len(data) <= spec.max_size
        back = codec.decode(data)
        assert type(back) is spec.cls
        assert back == msg
        assert codec.decode(data, expected=spec.cls) == msg
        assert codec.encode(back) == data  # deterministic: equal messages, equal bytes

    check()


def test_registry_covers_every_protocol_module() -> None:
    modules = {s.cls.__module__ for s in SPECS}
    assert "intellect.protocol.codec" in modules
    ids = [s.type_id for s in SPECS]
    assert len(ids) == len(set(ids))
