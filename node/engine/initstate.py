"""A run's initial global state, which the manifest's `init.sha256` pins.

Without `init.sha256`, every peer builds round 0's weights from `init.seed`. With it, round 0's global
state must have that hash before anyone trains. The hash is the usual state hash (docs/protocol.md §11):
the Merkle root over the safetensors bytes of the outer optimizer's state, with zero steps and no momentum.
So a peer announces it at round 0 like any other state. There are two reasons a researcher sets it:

* to start a run from pretrained weights. All the DiLoCo paper's runs start this way.
  `intellect-node data init-state` packs the weights into the state file and prints the hash.
* to pin the seeded init. A torch build that draws different initial numbers then refuses to start with a
  clear error, instead of averaging deltas taken from a different origin.

Volunteers get the file from the researcher, next to the data shards, and put it at
``<data dir>/init/<sha256>.safetensors``. The node reads it only when it starts at round 0: a node that
resumes its own checkpoint, or syncs a later state from peers, never needs it. The file is checked
before anything is loaded: its exact size (known from the model's shapes), its hash, then
safetensors' bounds-checked parser, zero outer steps, no momentum and finite weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from intellect.node.engine.outer import MOMENTUM_PREFIX, STEP_KEY, OuterError, OuterOptimizer
from intellect.node.engine.statehash import (
    blob_state_hash,
    deserialize_state,
    iter_serialized,
    serialize_state,
)

#: File name suffix of an initial state in `<data dir>/init/`.
SUFFIX = ".safetensors"


class InitStateError(ValueError):
    """An initial state is missing, has the wrong hash or shape, or is not a valid round-0 state."""


def init_state_path(data_dir: Path, sha256: str) -> Path:
    """Where a node looks for the initial state with this hash."""
    return data_dir / "init" / f"{sha256}{SUFFIX}"


def expected_size(outer: OuterOptimizer) -> int:
    """Bytes of the serialised round-0 state of `outer`'s tensors (header + fp32 weights + step count).

    The header depends only on the names, dtypes and shapes, so a file of any other size is not ours.
    Computed without serialising the weights.
    """
    state = outer.state_dict()
    header = next(iter_serialized(state))
    return len(header) + sum(t.numel() * t.element_size() for t in state.values())


def _round0(tensors: Mapping[str, torch.Tensor], outer: OuterOptimizer, what: str) -> None:
    """Load `tensors` into `outer` if they are a round-0 state with our names and shapes; on any error
    `outer` is unchanged (everything is checked first, and `load_state_dict` checks before it assigns)."""
    step = tensors.get(STEP_KEY)
    if (
        step is None
        or step.numel() != 1
        or int(step) != 0
        or any(k.startswith(MOMENTUM_PREFIX) for k in tensors)
    ):
        raise InitStateError(f"{what} has outer steps or momentum: it is not a round-0 state")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InitStateError(f"{what}: {name!r} has non-finite values")
    try:
        outer.load_state_dict(tensors)
    except OuterError as e:
        raise InitStateError(f"{what} does not fit this run's model: {e}") from None


def load_init_state(path: Path, sha256: str, outer: OuterOptimizer) -> None:
    """Replace `outer`'s global weights with the verified round-0 state in `path`.

    On any error `outer` is left unchanged, and the message says what was wrong with which file.
    """
    if not path.is_file():
        raise InitStateError(
            f"the run pins its initial state (init.sha256 = {sha256}) and {path} does not exist: get the "
            f"file from the run's researcher (`intellect-node data init-state` makes it)"
        )
    want = expected_size(outer)
    size = path.stat().st_size
    if size != want:
        raise InitStateError(f"{path} has {size} bytes; this run's initial state has {want}")
    blob = path.read_bytes()
    got = blob_state_hash(blob)
    if got != sha256:
        raise InitStateError(f"{path} hashes to {got}, not the run's init.sha256 {sha256}")
    try:
        tensors = deserialize_state(blob)
    except Exception as e:  # safetensors raises its own error types for a malformed header or data
        raise InitStateError(f"{path} is not a valid safetensors state: {e}") from None
    _round0(tensors, outer, str(path))


def pack_weights(weights: Mapping[str, torch.Tensor], outer: OuterOptimizer) -> None:
    """Set `outer`'s global weights to `weights` (a model state dict: every parameter, same shapes).

    Extra entries (buffers such as rotary tables) are ignored; values are cast to fp32.
    """
    missing = sorted(outer.global_params.keys() - weights.keys())
    if missing:
        raise InitStateError(f"the weights lack {len(missing)} model parameters, e.g. {missing[0]!r}")
    fresh = OuterOptimizer({n: weights[n].detach().to("cpu", torch.float32) for n in outer.global_params})
    _round0(fresh.state_dict(), outer, "the weights")


def write_init_state(outer: OuterOptimizer, path: Path) -> str:
    """Write `outer`'s round-0 state to `path` (atomically); its hash, the manifest's `init.sha256`."""
    if outer.steps != 0 or outer.momentum_buffers:
        raise InitStateError("only a state with no outer steps can be a run's initial state")
    blob = serialize_state(outer.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return blob_state_hash(blob)
