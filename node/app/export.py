"""What `intellect-node export` and `eval` read: a run's latest verified checkpoint, a state file, or an
exported HF directory; the manifest that describes its model; and the held-out data to evaluate on.

A run's checkpoints live in ``<data dir>/runs/<run_id[:16]>/global`` (`run.service.data_root`). They are
read, never changed: the daemon may be training the run at the same time, so a corrupt checkpoint is
skipped (and reported) here, not quarantined as `CheckpointStore.load_latest` would do.

A state's tensors do not fix everything a model is: the head count, the RoPE base, the sequence length and
the tokenizer are not in the shapes. So the manifest comes from ``--manifest``, else from the signed copy a
node keeps beside the run's checkpoints (``runs/<id>/manifest.signed``, `run.service.keep_manifest`; its
signature and run ID are checked), else it is the built-in tiny run's. It is matched against the state:
its model must fit the tensors, and when it names its researcher (as the manifest a run was seeded with
does once signed) its run ID must be the checkpoint's.

How a state file is verified: a checkpoint by its sidecar (sha256 and size), an initial state named
``<hash>.safetensors`` by its state hash; any other file only by safetensors' parser and the weights'
checks, and its state hash is reported so that it can be compared with the one the run announced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from intellect.node.app.body import load_run_manifest
from intellect.node.engine.checkpoint import CheckpointError, CheckpointStore
from intellect.node.engine.data import BUILTIN_SCHEME, ShardResolver, builtin_heldout
from intellect.node.engine.export import ExportError, RunTokenizer, model_from_weights, weights_from_state
from intellect.node.engine.losscheck import check_batches, check_source
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.statehash import blob_state_hash, deserialize_state
from intellect.node.engine.tokenizer import load_tokenizer
from intellect.node.run.service import MANIFEST_FILE, data_root
from intellect.protocol.errors import ProtocolError
from intellect.protocol.manifest import Manifest, ShardSpec, SignedManifest

_CKPT = re.compile(r"^ckpt-(\d{8})\.safetensors$")
_HASH_NAME = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StateSource:
    """A global state read from disk, and what is known about it."""

    tensors: Mapping[str, torch.Tensor]
    #: The file the tensors came from.
    path: Path
    state_hash: str
    #: How its integrity was checked (for the report).
    verified: str
    round: int | None = None
    run_id: str | None = None
    #: Newer checkpoints that failed verification, each with why.
    skipped: tuple[str, ...] = ()


def local_runs(data_dir: Path) -> list[str]:
    """The runs with checkpoints in this data directory, by their directory names (16 hex characters)."""
    root = data_dir / "runs"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "global").is_dir())


def _run_dir(data_dir: Path, prefix: str) -> Path:
    """The global checkpoint directory of the one local run whose ID starts with `prefix`."""
    held = local_runs(data_dir)
    found = [name for name in held if name.startswith(prefix[:16])]
    if not found:
        listed = ", ".join(held) if held else "none"
        raise ExportError(f"no checkpoints of run {prefix} in {data_dir / 'runs'} (runs held here: {listed})")
    if len(found) > 1:
        raise ExportError(f"run ID prefix {prefix} matches {', '.join(found)}: give more characters")
    return data_root(data_dir, found[0]) / "global"


def latest_checkpoint(data_dir: Path, prefix: str) -> StateSource:
    """The newest checkpoint of the run `prefix` names that verifies (newer corrupt ones are skipped and
    listed in `skipped`); ExportError when none does."""
    store = CheckpointStore(_run_dir(data_dir, prefix))
    skipped: list[str] = []
    for round_ in reversed(store.rounds()):
        try:
            ckpt = store.load(round_)
        except CheckpointError as e:
            skipped.append(f"round {round_}: {e}")
            continue
        run_id = str(ckpt.meta.get("run_id", ""))
        if not run_id.startswith(prefix):
            raise ExportError(f"{ckpt.path} is a checkpoint of run {run_id or '?'}, not {prefix}")
        how = "verified by its sidecar"
        return StateSource(ckpt.tensors, ckpt.path, ckpt.state_hash, how, round_, run_id, tuple(skipped))
    if skipped:
        raise ExportError(f"no checkpoint of run {prefix} verifies: {'; '.join(skipped)}")
    raise ExportError(f"run {prefix} has no checkpoint in {store.directory}")


def state_file(path: Path) -> StateSource:
    """A state file: a checkpoint (with its sidecar), an initial state named by its hash, or any
    serialised global state (see the module docstring for what each is checked by)."""
    m = _CKPT.match(path.name)
    if m:
        if not path.with_suffix(".json").is_file():
            raise ExportError(
                f"{path} has no sidecar {path.with_suffix('.json').name}: an incomplete checkpoint"
            )
        try:
            ckpt = CheckpointStore(path.parent).load(int(m.group(1)))
        except CheckpointError as e:
            raise ExportError(f"checkpoint {path} does not verify: {e}") from None
        run_id = ckpt.meta.get("run_id")
        return StateSource(
            ckpt.tensors, path, ckpt.state_hash, "verified by its sidecar", ckpt.round, run_id and str(run_id)
        )
    blob = path.read_bytes()
    got = blob_state_hash(blob)
    named = path.name.removesuffix(".safetensors")
    if _HASH_NAME.match(named) and got != named:
        raise ExportError(f"{path} hashes to {got}, not the state hash its name says (corrupted?)")
    try:
        tensors = deserialize_state(blob)
    except Exception as e:  # safetensors raises its own error types for a malformed header or data
        raise ExportError(f"{path} is not a valid safetensors state: {e}") from None
    how = (
        "verified: its name is its hash"
        if got == named
        else "not verified: no sidecar, not named by its hash"
    )
    return StateSource(tensors, path, got, how)


def read_state(data_dir: Path, run: str | None, state: Path | None) -> StateSource:
    """The state a command names: `state` (checked to be of run `run` when both are given), else the
    latest verified checkpoint of `run`."""
    if state is None:
        if run is None:
            raise ExportError("name a run, or a state file with --state")
        return latest_checkpoint(data_dir, run)
    source = state_file(state)
    if run is not None and not (source.run_id or "").startswith(run):
        raise ExportError(f"{state} is not a checkpoint of run {run} (its run: {source.run_id or 'unknown'})")
    return source


def kept_manifest(data_dir: Path, run_id: str) -> Manifest | None:
    """The signed manifest the node kept for run `run_id` (None when it kept none); ExportError when the
    file is malformed, its signature fails or it is another run's."""
    path = data_root(data_dir, run_id) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        signed = SignedManifest.from_bytes(path.read_bytes())
    except (ProtocolError, ValueError, OSError) as e:
        raise ExportError(f"{path} is not a readable signed manifest: {e}") from None
    if not signed.verify():
        raise ExportError(f"{path}: the researcher's signature does not cover this manifest")
    if signed.run_id != run_id:
        raise ExportError(f"{path} is the manifest of run {signed.run_id[:16]}, not {run_id[:16]}")
    return signed.manifest


def run_manifest(
    path: Path | None, run_id: str | None, data_dir: Path | None = None
) -> tuple[Manifest, str | None]:
    """The manifest at `path`, else the one the node kept for `run_id` under `data_dir`, else the built-in
    tiny run's; and a note when it cannot be matched to `run_id`; ExportError when it names its researcher
    and is another run."""
    if path is None and run_id and data_dir is not None:
        kept = kept_manifest(data_dir, run_id)
        if kept is not None:
            return kept, None
    manifest = load_run_manifest(path)
    where = str(path) if path is not None else "the built-in tiny run's manifest"
    if run_id is None:
        return manifest, None
    if manifest.researcher:
        if manifest.run_id != run_id:
            raise ExportError(f"{where} is run {manifest.run_id[:16]}, not {run_id[:16]}: pass its manifest")
        return manifest, None
    return manifest, (
        f"{where} names no researcher, so it cannot be matched to run {run_id[:16]}: only its model's "
        "shapes are checked against the state"
    )


def run_tokenizer(manifest: Manifest) -> RunTokenizer:
    """The run's tokenizer, checked against the manifest's sha256 (`load_tokenizer`)."""
    spec = "byte" if manifest.tokenizer.kind == "byte" else manifest.tokenizer.uri
    return load_tokenizer(spec, manifest.tokenizer.sha256 or None)


def state_model(source: StateSource, manifest: Manifest) -> Llama:
    """The manifest's model holding the state's global weights."""
    cfg = ModelConfig.from_dict(manifest.model.to_dict())
    try:
        return model_from_weights(cfg, weights_from_state(source.tensors))
    except ExportError as e:
        raise ExportError(f"{source.path} does not fit the manifest's model: {e} (pass --manifest)") from None


def heldout_data(
    tok: RunTokenizer, shards: Sequence[ShardSpec], data_dir: Path, shape: tuple[int, int], n_batches: int
) -> tuple[list[torch.Tensor], str]:
    """Evaluation batches (`shape`: batch, seq_len) and a description of where they come from.

    A run on the built-in corpus, or no run (an HF directory): `builtin://heldout`, which no peer trains
    on. A run on its own shards declares no held-out split, so its windows are spread over its training
    shards, as the node's loss check does (`losscheck.check_source`)."""
    resolver = ShardResolver(tok, base_dir=data_dir / "shards")
    sources = check_source(resolver, shards) if shards else [resolver.load(builtin_heldout(tok))]
    own = bool(shards) and not all(s.uri.startswith(BUILTIN_SCHEME + "corpus/") for s in shards)
    what = "the run's training shards (it has no held-out split)" if own else "builtin://heldout"
    batch, seq_len = shape
    return check_batches(sources, batch, seq_len, n_batches), what


__all__ = [
    "StateSource",
    "heldout_data",
    "latest_checkpoint",
    "local_runs",
    "read_state",
    "run_manifest",
    "run_tokenizer",
    "state_file",
    "state_model",
]
