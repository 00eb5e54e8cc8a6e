"""Atomic, hashed, rotating checkpoints of a node's state (safetensors + a JSON sidecar, never pickle).

A checkpoint of round r is two files in the store's directory:

* ``ckpt-<r:08d>.safetensors``: exactly `statehash.serialize_state(tensors)`, so the file's bytes are the
  bytes a peer serves during state sync and its Merkle root is the gossiped state hash;
* ``ckpt-<r:08d>.json``: the sidecar, written *after* the tensors file, holding the file's sha256 and
  size, the state hash and the caller's metadata (round, data cursor, run id, ...), plus a sha256 of the
  sidecar's own canonical content (``check``), so a flipped byte in the metadata is caught too. A
  checkpoint without a sidecar is incomplete and ignored.

Each file is written to a hidden temp file in the same directory, flushed and fsynced, renamed into place,
and the directory is fsynced, so a crash leaves either the old or the new file, never a torn one.
`load_latest` checks the sidecar, then the tensors file's size and sha256 (streamed, so a state of tens of
GB is never held twice in memory) before parsing it with safetensors; a corrupt or truncated checkpoint is
logged with the reason and the previous one is used.

A checkpoint found corrupt, by `load_latest` or by pruning, is moved to the ``corrupt/`` subdirectory (with
a ``.reason`` file; the last `keep` of them are kept there for a post-mortem) instead of holding one of the
`keep` slots: pruning first verifies every checkpoint it has not verified in its current form (one it
just wrote counts as verified), quarantines the corrupt ones, and only then drops the oldest good ones, so
the newest good checkpoint is never pruned.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from intellect.node.engine.statehash import ChunkHasher, SerializedState, iter_serialized
from intellect.protocol.merkle import merkle_root

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.json$")
_FORMAT = 2
_TMP_PREFIX = ".tmp-ckpt-"
_READ_SIZE = 8 << 20
#: Where corrupt checkpoints are moved, inside the store's directory.
CORRUPT_DIR = "corrupt"


class CheckpointError(Exception):
    """A checkpoint could not be written (disk full, permissions) or its metadata is unusable."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: where it is, its tensors, the caller's metadata and the state hash."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    round: int
    state_hash: str


def _sidecar_check(sidecar: Mapping[str, Any]) -> str:
    """sha256 of the sidecar's canonical JSON without its ``check`` field."""
    body = {k: v for k, v in sidecar.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The last `keep` checkpoints in `directory`; `save` is atomic, `load_latest` verifies."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        #: Round -> the (inode, size, mtime) of its two files when we last verified it (or wrote it).
        self._verified: dict[int, tuple[int, ...]] = {}

    def _paths(self, round_: int) -> tuple[Path, Path]:
        stem = f"ckpt-{round_:08d}"
        return self.directory / f"{stem}.safetensors", self.directory / f"{stem}.json"

    def rounds(self) -> list[int]:
        """Rounds that have a sidecar (complete checkpoints, not yet verified), oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            m = _NAME.match(entry.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _write_atomic(self, final: Path, pieces: Iterable[bytes], hasher: ChunkHasher | None = None) -> str:
        """Write pieces to a temp file, fsync, rename onto `final`; return the file's sha256 hex."""
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}.{os.getpid()}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                    digest.update(piece)
                    if hasher is not None:
                        hasher.update(piece)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            # Whatever went wrong (disk full, a crash simulated in tests, cancellation), the temp file must
            # not linger; the previous checkpoint was never touched.
            tmp.unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write a checkpoint for ``meta["round"]`` atomically, prune old ones; return the tensors file path.

        ``meta`` must be JSON-serialisable and hold an int ``round``. Raises `CheckpointError` when the disk
        is full or the write fails otherwise; the previous checkpoints are left intact.
        """
        return self._save(iter_serialized(tensors), None, meta)

    def save_serialized(self, state: SerializedState, meta: Mapping[str, Any]) -> Path:
        """`save` for a state already serialised and hashed (`statehash.serialize_and_hash`): its bytes are
        written as they are, and its Merkle root, computed when it was made, is the sidecar's state hash."""
        return self._save([state.blob], state, meta)

    def _save(self, pieces: Iterable[bytes], known: SerializedState | None, meta: Mapping[str, Any]) -> Path:
        round_ = meta.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            raise CheckpointError(f"checkpoint meta needs a non-negative int 'round', got {round_!r}")
        try:
            meta_json = json.loads(json.dumps(dict(meta)))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {e}") from e
        data_path, side_path = self._paths(round_)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            # Re-saving a round: drop its sidecar first, so a failure below leaves that round incomplete
            # (ignored) rather than a new tensors file described by the old sidecar.
            side_path.unlink(missing_ok=True)
            hasher = ChunkHasher() if known is None else None
            file_sha = self._write_atomic(data_path, pieces, hasher)
            if hasher is not None:
                size, root = hasher.total, merkle_root(hasher.finish()).hex()
            else:
                assert known is not None
                size, root = len(known.blob), known.root
            sidecar = {
                "format": _FORMAT,
                "file": data_path.name,
                "size": size,
                "sha256": file_sha,
                "state_hash": root,
                "meta": meta_json,
            }
            sidecar["check"] = _sidecar_check(sidecar)
            body = json.dumps(sidecar, sort_keys=True, indent=1).encode()
            self._write_atomic(side_path, [body])
            _fsync_dir(self.directory)
            self._verified[round_] = self._fingerprint(round_)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise CheckpointError(f"no space left on device writing checkpoint {data_path}") from e
            raise CheckpointError(f"cannot write checkpoint {data_path}: {e}") from e
        log.info("checkpoint round %d saved to %s (%d bytes)", round_, data_path, size)
        self._prune(self.keep)
        return data_path

    def _remove_stale_temps(self) -> None:
        """Temp files left by a crashed save (one node per data directory, so none is in use)."""
        for entry in self.directory.glob(f"{_TMP_PREFIX}*"):
            log.info("removing leftover temp file %s", entry)
            entry.unlink(missing_ok=True)

    def _fingerprint(self, round_: int) -> tuple[int, ...]:
        """What changes when either file of a checkpoint is rewritten, replaced or truncated."""
        out: list[int] = []
        for path in self._paths(round_):
            try:
                st = path.stat()
            except OSError:
                return ()
            out += [st.st_ino, st.st_size, st.st_mtime_ns]
        return tuple(out)

    def quarantine(self, round_: int, why: str) -> None:
        """Move a corrupt checkpoint out of the rotation into ``corrupt/`` (never fatal)."""
        self._verified.pop(round_, None)
        target = self.directory / CORRUPT_DIR
        try:
            target.mkdir(exist_ok=True)
            for path in self._paths(round_)[::-1]:  # sidecar first, as when pruning
                if path.exists():
                    os.replace(path, target / path.name)
            (target / f"ckpt-{round_:08d}.reason").write_text(why + "\n")
            log.warning("checkpoint of round %d is corrupt (%s); moved to %s", round_, why, target)
            self._prune_quarantine(target)
        except OSError as e:
            log.warning("checkpoint of round %d is corrupt (%s) and could not be moved: %s", round_, why, e)

    def _prune_quarantine(self, target: Path) -> None:
        stems = sorted({p.name.split(".", 1)[0] for p in target.glob("ckpt-*")})
        for stem in stems[: max(0, len(stems) - self.keep)]:
            for path in target.glob(f"{stem}.*"):
                path.unlink(missing_ok=True)

    def clear_quarantine(self) -> None:
        """Delete the quarantined corrupt checkpoints (kept for a post-mortem only): the disk cap's first
        resort."""
        target = self.directory / CORRUPT_DIR
        if target.is_dir():
            for path in target.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
                    log.info("disk cap: removed quarantined %s", path.name)

    def prune(self, keep: int | None = None) -> None:
        """Verify the unverified checkpoints (quarantining the corrupt ones), then delete the oldest good
        ones beyond the newest `keep` (default: the store's own); at least the newest good one stays."""
        self._prune(max(1, self.keep if keep is None else keep))

    def _prune(self, keep: int) -> None:
        # Corrupt checkpoints first: they must not hold a slot while a good older one is deleted.
        for round_ in self.rounds():
            fingerprint = self._fingerprint(round_)
            if fingerprint and self._verified.get(round_) == fingerprint:
                continue
            try:
                self.verify(round_)
            except CheckpointError as e:
                self.quarantine(round_, str(e))
                continue
            self._verified[round_] = fingerprint
        rounds = self.rounds()
        for old in rounds[: max(0, len(rounds) - keep)]:
            self._verified.pop(old, None)
            data_path, side_path = self._paths(old)
            # Sidecar first: a half-pruned checkpoint then looks incomplete rather than corrupt.
            side_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            log.debug("pruned checkpoint round %d", old)
        # Tensor files whose sidecar never landed (a crash between the two renames).
        kept = set(self.rounds())
        for entry in self.directory.glob("ckpt-*.safetensors"):
            m = re.match(r"^ckpt-(\d{8})\.safetensors$", entry.name)
            if m and int(m.group(1)) not in kept:
                log.info("removing incomplete checkpoint %s", entry)
                entry.unlink(missing_ok=True)

    def _sidecar(self, round_: int) -> dict[str, Any]:
        """The round's sidecar, checked (format, own checksum, round); raises `CheckpointError`."""
        side_path = self._paths(round_)[1]
        try:
            sidecar = json.loads(side_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable sidecar {side_path.name}: {e}") from e
        if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT:
            raise CheckpointError(f"sidecar {side_path.name} has an unknown format")
        if sidecar.get("check") != _sidecar_check(sidecar):
            raise CheckpointError(f"sidecar {side_path.name} fails its own checksum (corrupted)")
        meta = sidecar.get("meta")
        if not isinstance(meta, dict) or meta.get("round") != round_:
            raise CheckpointError(f"sidecar {side_path.name} does not describe round {round_}")
        return sidecar

    def _check_file(self, data_path: Path, sidecar: Mapping[str, Any]) -> os.stat_result:
        """The tensors file's size and sha256 against its sidecar; its stat before reading."""
        before = data_path.stat()
        if before.st_size != sidecar.get("size"):
            raise CheckpointError(
                f"{data_path.name} is {before.st_size} bytes, expected {sidecar.get('size')} (truncated?)"
            )
        if _file_sha256(data_path) != sidecar.get("sha256"):
            raise CheckpointError(f"{data_path.name} fails its sha256 check (corrupted)")
        return before

    def verify(self, round_: int) -> None:
        """Check one checkpoint's sidecar and its tensors file's size and sha256 without loading it."""
        sidecar = self._sidecar(round_)
        data_path = self._paths(round_)[0]
        try:
            self._check_file(data_path, sidecar)
        except OSError as e:
            raise CheckpointError(f"unreadable checkpoint {data_path.name}: {e}") from e

    def load(self, round_: int) -> Checkpoint:
        """Load and verify one checkpoint; raises `CheckpointError` saying what is wrong."""
        from safetensors.torch import load_file

        data_path = self._paths(round_)[0]
        sidecar = self._sidecar(round_)
        meta = sidecar["meta"]
        try:
            before = self._check_file(data_path, sidecar)
            # safetensors' own parser (bounds-checked header, no pickle), memory-mapped: one copy in memory.
            tensors = load_file(str(data_path))
            after = data_path.stat()
        except OSError as e:
            raise CheckpointError(f"unreadable checkpoint {data_path.name}: {e}") from e
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError, not exported as a stable type
            raise CheckpointError(f"{data_path.name} is not valid safetensors: {e}") from e
        if (after.st_ino, after.st_size, after.st_mtime_ns) != (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        ):
            raise CheckpointError(f"{data_path.name} changed while it was being loaded")
        return Checkpoint(
            path=data_path,
            tensors=tensors,
            meta=meta,
            round=round_,
            state_hash=str(sidecar.get("state_hash")),
        )

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None; each bad one is logged with why, moved to
        ``corrupt/`` and skipped."""
        for round_ in reversed(self.rounds()):
            try:
                ckpt = self.load(round_)
            except CheckpointError as e:
                log.warning("skipping checkpoint of round %d: %s", round_, e)
                self.quarantine(round_, str(e))
                continue
            self._verified[round_] = self._fingerprint(round_)
            log.info("loaded checkpoint of round %d from %s", round_, ckpt.path)
            return ckpt
        return None
