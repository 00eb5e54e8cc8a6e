"""Determinism of state serialisation and the Merkle root used for state announcements and sync."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.node.engine.statehash import (
    ChunkHasher,
    blob_state_hash,
    chunk_hashes,
    serialize_state,
    state_hash,
)
from intellect.protocol.merkle import merkle_root
from safetensors.torch import load as st_load


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.w": torch.randn(33, 17, generator=g),
        "model.embed": torch.randn(100, generator=g).to(torch.bfloat16),
        "outer.step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0),
        "half": torch.randn(5, generator=g).half(),
    }


def test_serialize_is_deterministic_and_order_independent() -> None:
    state = _state()
    blob = serialize_state(state)
    assert serialize_state(dict(reversed(list(state.items())))) == blob
    assert serialize_state({k: v.clone() for k, v in state.items()}) == blob
    # Non-contiguous views serialise like their contiguous copies.
    t = torch.randn(8, 4)
    assert serialize_state({"t": t.t()}) == serialize_state({"t": t.t().contiguous()})


def test_serialize_is_deterministic_across_processes() -> None:
    code = (
        "import torch,hashlib;from intellect.node.engine.statehash import serialize_state;"
        "g=torch.Generator().manual_seed(5);"
        "s={f'k{i}':torch.randn(i+1,generator=g) for i in range(30)};"
        "print(hashlib.sha256(serialize_state(s)).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1


def test_safetensors_reads_our_bytes() -> None:
    state = _state()
    loaded = st_load(serialize_state(state))
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


def test_chunk_hashes_and_incremental_hasher_agree() -> None:
    blob = bytes(range(256)) * 41  # 10496 bytes, not a multiple of the chunk size
    hashes = chunk_hashes(blob, 1000)
    assert len(hashes) == 11
    assert hashes[0] == hashlib.sha256(blob[:1000]).digest()
    assert hashes[-1] == hashlib.sha256(blob[10000:]).digest()
    hasher = ChunkHasher(1000)
    for i in range(0, len(blob), 333):
        hasher.update(blob[i : i + 333])
    assert hasher.finish() == hashes
    assert hasher.total == len(blob)
    with pytest.raises(ValueError):
        chunk_hashes(blob, 0)


def test_merkle_rules() -> None:
    h = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    leaf = [hashlib.sha256(b"\x00" + x).digest() for x in h]

    def node(a: bytes, b: bytes) -> bytes:
        return hashlib.sha256(b"\x01" + a + b).digest()

    assert merkle_root([]) == hashlib.sha256(b"").digest()
    assert merkle_root(h[:1]) == leaf[0]
    assert merkle_root(h[:2]) == node(leaf[0], leaf[1])
    # Odd-leaf rule: the last node is promoted unchanged, not paired with itself.
    assert merkle_root(h[:3]) == node(node(leaf[0], leaf[1]), leaf[2])
    assert merkle_root(h[:5]) == node(node(node(leaf[0], leaf[1]), node(leaf[2], leaf[3])), leaf[4])
    # Duplicating the last leaf (Bitcoin's ambiguity) gives a different root.
    assert merkle_root(h[:3]) != merkle_root([*h[:3], h[2]])


def test_state_hash_matches_blob_and_detects_changes() -> None:
    state = _state()
    blob = serialize_state(state)
    assert state_hash(state) == blob_state_hash(blob)
    assert state_hash(state, chunk_size=64) == blob_state_hash(blob, chunk_size=64)
    changed = dict(state)
    w = state["model.layers.0.w"].clone()
    w[3, 3] = torch.nextafter(w[3, 3], torch.tensor(10.0))
    changed["model.layers.0.w"] = w
    assert state_hash(changed) != state_hash(state)
    renamed = {("x" + k if k == "empty" else k): v for k, v in state.items()}
    assert state_hash(renamed) != state_hash(state)


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.lists(st.floats(width=32), max_size=20), max_size=5)
)
def test_round_trip_property(plain: dict[str, list[float]]) -> None:
    state = {k: torch.tensor(v, dtype=torch.float32) for k, v in plain.items()}
    loaded = st_load(serialize_state(state))
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k].view(torch.int32), v.view(torch.int32))
