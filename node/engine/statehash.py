"""Deterministic serialisation and Merkle hashing of a model state (global weights + outer optimizer state).

The state hash is what peers gossip ("I am at round r with state H") and what a newcomer checks after a
chunked download, so two peers holding bit-identical tensors must compute the same hash whatever their
library versions are. We therefore write the safetensors layout ourselves instead of calling
`safetensors.torch.save`, whose tensor order and header layout are an implementation detail of the
installed version (0.8 orders by dtype alignment, then name): the bytes produced here are

    u64 little-endian header length N | N bytes of JSON header, padded with spaces to a multiple of 8 |
    tensor data, tensors in sorted-name order, each C-contiguous little-endian

with the JSON header written with sorted keys and no whitespace. Any safetensors reader opens the result.

Hashing: the blob is cut into fixed-size chunks (1 MiB by default) hashed with sha256; the chunk hashes are
the leaves of a binary Merkle tree (`intellect.protocol.merkle.merkle_root`, RFC 6962 style, the odd last
node promoted unchanged), whose root is the state hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from intellect.protocol.merkle import merkle_root

#: Default chunk size for hashing and chunked state transfer.
CHUNK_SIZE = 1 << 20

#: torch dtype -> safetensors dtype name (only dtypes a model state can hold).
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor in C order (a view as uint8 handles bf16, which numpy lacks)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _header(tensors: Mapping[str, torch.Tensor], names: list[str]) -> bytes:
    """The safetensors header of `tensors` in `names` order: its length (8 bytes), then padded JSON."""
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def iter_serialized(tensors: Mapping[str, torch.Tensor]) -> Iterator[bytes]:
    """Yield the deterministic safetensors bytes of ``tensors`` piece by piece (header, then each tensor).

    Streaming lets a checkpoint be written and hashed without holding a second copy of the state.
    """
    names = sorted(tensors)
    yield _header(tensors, names)
    for name in names:
        data = _tensor_bytes(tensors[name])
        if data:
            yield data


def serialized_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """Length of `serialize_state(tensors)` without building it (the header, then the tensors' bytes)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return len(_header(tensors, sorted(tensors))) + data


def serialize_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes of ``tensors`` (same tensors -> same bytes, any key order)."""
    return b"".join(iter_serialized(tensors))


def chunk_hashes(blob: bytes | memoryview, chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    """sha256 digest of each ``chunk_size`` slice of ``blob`` (the last one may be shorter)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(blob)
    return [hashlib.sha256(view[i : i + chunk_size]).digest() for i in range(0, len(view), chunk_size)]


class ChunkHasher:
    """Incremental `chunk_hashes`: feed bytes in arbitrary pieces, get the same list of chunk digests."""

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self.hashes: list[bytes] = []
        self.total = 0
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.total += len(view)
        while len(view):
            take = min(self.chunk_size - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self.hashes.append(self._current.digest())
                self._current = hashlib.sha256()
                self._filled = 0

    def finish(self) -> list[bytes]:
        """The chunk digests, including a final partial chunk; the hasher must not be fed afterwards."""
        if self._filled:
            self.hashes.append(self._current.digest())
            self._current = hashlib.sha256()
            self._filled = 0
        return self.hashes


def state_hash(tensors: Mapping[str, torch.Tensor], chunk_size: int = CHUNK_SIZE) -> str:
    """Hex Merkle root over the 1 MiB chunks of `serialize_state(tensors)`."""
    hasher = ChunkHasher(chunk_size)
    for piece in iter_serialized(tensors):
        hasher.update(piece)
    return merkle_root(hasher.finish()).hex()


@dataclass(frozen=True, eq=False)
class SerializedState:
    """A state serialised and hashed once (`serialize_and_hash`): the bytes a peer serves and a checkpoint
    file holds, their chunk digests and the state hash, shared by the commit, the state server and the
    checkpoint writer instead of each serialising and hashing the tensors again (immutable: safe to hand
    to another thread while the tensors change)."""

    blob: bytes
    hashes: tuple[bytes, ...]
    chunk_size: int
    root: str


def serialize_and_hash(tensors: Mapping[str, torch.Tensor], chunk_size: int = CHUNK_SIZE) -> SerializedState:
    """`serialize_state(tensors)` with its chunk digests and Merkle root (`root` == `state_hash(tensors)`)."""
    blob = serialize_state(tensors)
    hashes = tuple(chunk_hashes(blob, chunk_size))
    return SerializedState(blob, hashes, chunk_size, merkle_root(hashes).hex())


def blob_state_hash(blob: bytes | memoryview, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex Merkle root of an already serialised state (what a downloader checks after reassembly)."""
    return merkle_root(chunk_hashes(blob, chunk_size)).hex()


def deserialize_state(blob: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (safetensors' parser: no pickle, bounds-checked header)."""
    from safetensors.torch import load

    return dict(load(bytes(blob)))
