"""The global state a node holds: weights, outer optimizer, error-feedback residual and checkpoints.

`GlobalState` is the one writer of the round and the state hash, and it changes them together, on the
event loop, after the torch work in a worker thread is done. A membership record or announcement built from
`view()` therefore always pairs a round with that round's hash (never the old round with a new hash, which
would make a newcomer distrust every honest peer that vouched for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from intellect.node.engine.diskcap import DiskCap
from intellect.node.engine.initstate import InitStateError, init_state_path, load_init_state
from intellect.node.engine.losscheck import LossCheck
from intellect.node.engine.model import Llama
from intellect.node.engine.outer import STEP_KEY, OuterOptimizer
from intellect.node.engine.statehash import SerializedState, serialize_and_hash, state_hash
from intellect.node.engine.trainer import InnerTrainer
from intellect.node.net.allreduce import PayloadCodec, flatten, unflatten
from intellect.node.net.averaging import contribution_error
from intellect.node.run.checkpointing import Checkpointer, Snapshot
from intellect.node.run.events import EventSink, StateChanged, Synced

logger = logging.getLogger(__name__)

#: Name of the error-feedback residual in the trainer checkpoint (next to the optimizer state).
RESIDUAL_TENSOR = "error_feedback.residual"
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class StateView:
    """A consistent (round, hash) pair of the global state."""

    round: int
    state_hash: str


class GlobalState:
    """θ (in `outer` and copied into `model` for training), the round, the hash and the checkpoints."""

    def __init__(
        self,
        run_id: str,
        model: Llama,
        outer: OuterOptimizer,
        trainer: InnerTrainer,
        root: Path,
        emit: EventSink,
        loss_check: LossCheck | None = None,
        disk: DiskCap | None = None,
    ) -> None:
        self.run_id = run_id
        self.model = model
        self.outer = outer
        self.trainer = trainer
        #: The checkpoint stores, and the write that may run behind the training (`run.checkpointing`).
        self.checkpoints = Checkpointer(run_id, root, emit, disk)
        self.global_store = self.checkpoints.global_store
        self.trainer_store = self.checkpoints.trainer_store
        self._emit = emit
        self._view = StateView(0, "")
        #: Error feedback: what earlier all-reduces lost of our pseudo-gradients to compression (flat fp32,
        #: in `allreduce.flatten` order), added to the next one. Kept in the trainer checkpoint.
        self.residual: torch.Tensor | None = None
        #: Whether `residual` went into the Δ being averaged (a sequential run: its commit replaces it);
        #: else it is still owed (an overlapped run consumes it into a Δ, and a commit landing before the
        #: next Δ is taken adds to it rather than drop it).
        self._residual_sent = False
        #: Overlapped runs: where this round's inner steps started (`rebase`), what Δ is taken against; None:
        #: from the global weights (sequential runs, and after a reset or a sync).
        self.round_start: dict[str, torch.Tensor] | None = None
        #: Why we lack the run's pinned initial state; fatal only if we must train round 0.
        self.init_error: InitStateError | None = None
        self._inflight: asyncio.Task[None] | None = None
        #: Held while the local copy trains (`training.train_round`): a commit changes the copy and takes
        #: the trainer's snapshot only between two chunks of inner steps, and does the rest meanwhile.
        self.model_idle = asyncio.Lock()
        #: The committed state serialised and hashed (`_apply_step`), for the server and the checkpoint.
        self._serialized: SerializedState | None = None
        #: The held-out loss a state from peers must pass before `adopt` takes it (None: not checked).
        self.loss_check = loss_check

    # ---- reading ---------------------------------------------------------------------------------------

    def view(self) -> StateView:
        return self._view

    @property
    def round(self) -> int:
        return self._view.round

    @property
    def state_hash(self) -> str:
        return self._view.state_hash

    def outer_state(self) -> dict[str, torch.Tensor]:
        return self.outer.state_dict()

    def _set(self, round_: int, hash_: str, serialized: SerializedState | None = None) -> None:
        """The only place round and hash change: together, on the event loop."""
        self._view = StateView(round_, hash_)
        self._serialized = serialized
        self._emit(StateChanged(round_, hash_))

    def serialized(self) -> SerializedState | None:
        """The state we hold, serialised and hashed by its commit (None after a sync, a resume or round 0:
        whoever needs the bytes serialises the tensors then)."""
        ser = self._serialized
        return ser if ser is not None and ser.root == self._view.state_hash else None

    # ---- start -----------------------------------------------------------------------------------------

    async def start(self, data_dir: Path, pinned: str) -> None:
        """Resume from our own checkpoint of this run, else set up round 0 (`initial`)."""
        if await self.resume():
            return
        await self.initial(data_dir, pinned)

    async def resume(self) -> bool:
        """Restore the last verified checkpoint of this run from our data dir; True if one was used."""
        got = await asyncio.to_thread(self._load_own)
        if got is None:
            return False
        self._set(*got)
        logger.info("resumed from our checkpoint of round %d (%s)", got[0], got[1][:12])
        self._emit(Synced(got[0], got[1], "own checkpoint", 0.0, from_peers=False))
        return True

    def _load_own(self) -> tuple[int, str] | None:
        ckpt = self.global_store.load_latest()
        if ckpt is None or ckpt.meta.get("run_id") != self.run_id:
            return None
        self.outer.load_state_dict(ckpt.tensors)
        self.outer.copy_to(self.model)
        round_ = int(ckpt.meta["round"])
        tr = self.trainer_store.load_latest()
        if tr is not None and tr.meta.get("round") == round_:
            # Each round builds a fresh data stream (its shards follow the live membership), so the saved
            # cursor belongs to a round that is over: restore the optimizer and step, not the stream.
            self.residual = tr.tensors.get(RESIDUAL_TENSOR)
            try:
                self.trainer.import_state(tr.tensors, tr.meta["trainer"], stream=False)
            except (ValueError, KeyError) as e:
                logger.warning("our trainer checkpoint does not fit (%s); inner optimizer starts afresh", e)
        return round_, ckpt.state_hash

    async def initial(self, data_dir: Path, pinned: str) -> None:
        """Round 0's global state: the seeded init, or the file that the manifest's `init.sha256` pins.

        If the pinned file is missing or bad, the error is kept in `init_error`, not raised: a node that
        finds peers past round 0 syncs their state and never needs the file."""
        self._set(0, await asyncio.to_thread(self._hash_now))
        if not pinned or self.state_hash == pinned:
            return
        try:
            await asyncio.to_thread(load_init_state, init_state_path(data_dir, pinned), pinned, self.outer)
        except (InitStateError, OSError) as e:
            self.init_error = InitStateError(str(e))
            logger.warning("%s; starting only if peers are past round 0 and we sync their state", e)
            return
        await asyncio.to_thread(self.outer.copy_to, self.model)
        self._set(0, await asyncio.to_thread(self._hash_now))
        logger.info("loaded the run's initial state %s", self.state_hash[:12])

    def _hash_now(self) -> str:
        return state_hash(self.outer.state_dict())

    # ---- a round -------------------------------------------------------------------------------------

    async def pseudo_gradient(self, consume: bool = False) -> dict[str, torch.Tensor]:
        """Δ = θ_global (θ_start after a `rebase`) − θ_local, plus what compression lost of earlier rounds'
        Δ (error feedback); `consume`: into this Δ only (overlapped: the next one comes with its commit)."""
        return await asyncio.to_thread(self._pseudo_gradient, consume)

    def _pseudo_gradient(self, consume: bool) -> dict[str, torch.Tensor]:
        delta = self.outer.pseudo_gradient(self.model, base=self.round_start)
        residual = self.residual
        self._residual_sent = not consume
        if consume:
            self.residual = None
        if residual is None:
            return delta
        flat = flatten(delta)
        if flat.numel() != residual.numel():
            logger.warning("dropping an error-feedback residual of the wrong size")
            self.residual = None
            return delta
        flat.add_(residual)
        return unflatten(flat, delta)

    async def rebase(self, delta: Tensors) -> None:
        """Overlapped: the next round starts where an outer step with our own `delta` would take θ_global
        (`OuterOptimizer.preview`); the average of `delta`, when it arrives, is applied to θ_global."""
        await asyncio.to_thread(self._rebase, delta)

    def _rebase(self, delta: Tensors) -> None:
        self.round_start = self.outer.preview(delta)
        self.outer.copy_to(self.model, self.round_start)

    async def discard_local(self, why: str = "") -> None:
        """A failed average (or an abandoned round: `why`, logged): keep θ, reset the local copy to it."""
        if why:
            logger.info("%s; keeping the global weights", why)
        self.round_start = None
        await asyncio.to_thread(self.outer.copy_to, self.model)

    async def commit(
        self,
        round_: int,
        avg: Tensors,
        sent: Tensors,
        group: list[str],
        me: str,
        codec: PayloadCodec,
        part_sizes: tuple[int, ...] = (),
        keep_local: bool = False,
        lost: Lost | None = None,
    ) -> None:
        """Apply a completed average as round `round_`: residual, outer step, hash, checkpoint. `lost`:
        the residual if already worked out (`lost_to_compression`), else the commit works it out.
        `keep_local`: the local copy keeps the progress made since its round started (an overlapped
        average landing mid-round: the inner steps go on from the new global weights plus that progress).
        The outer step and the hash run while inner steps may be computing; moving the local copy, the new
        view and the trainer's snapshot wait for `model_idle` (between two chunks of inner steps).

        It runs to completion even if the caller is cancelled meanwhile (a half-applied step must never be
        announced or checkpointed under the wrong round); `settle` waits for it at shutdown. Its checkpoint
        is written behind the next round's training (`run.checkpointing`)."""
        how = (
            lost
            if lost is not None
            else functools.partial(lost_to_compression, sent, group, me, codec, part_sizes)
        )
        step = functools.partial(self._outer_step, avg, how, keep_local)
        self._inflight = asyncio.ensure_future(self._commit(round_, step))
        try:
            await asyncio.shield(self._inflight)
        finally:
            if self._inflight.done():
                self._inflight = None

    async def _commit(self, round_: int, step: Callable[[], tuple[SerializedState, Tensors | None]]) -> None:
        await self.checkpoints.flushed()  # one write behind at most (a slow disk slows the commits)
        # The outer step and the hash touch the global state only, never the local copy: an overlapped
        # round's inner steps go on meanwhile (measured: the landing's 1.6 s idled the model, #17).
        ser, moved = await asyncio.to_thread(step)
        async with self.model_idle:  # the local copy and the trainer change between two chunks only
            await asyncio.to_thread(move_local, self.outer, self.model, moved)
            self.round_start = None  # an overlapped round rebases after this (`rebase`)
            self._set(round_, ser.root, ser)
            snap = await asyncio.to_thread(self._snapshot, self._view, True)
        self.checkpoints.write_behind(snap)

    def _outer_step(
        self, avg: Tensors, lost: Lost | Callable[[], Lost], keep_local: bool
    ) -> tuple[SerializedState, Tensors | None]:
        start = self.round_start if keep_local else None
        if keep_local and start is None:  # (the round started from the global weights: a sync, a reset)
            start = {n: p.clone() for n, p in self.outer.global_params.items()}
        # What the all-reduce lost of our contribution becomes the next round's residual.
        self.residual = _owed(None if self._residual_sent else self.residual, lost)
        self._residual_sent = False
        return step_and_hash(self.outer, avg, start)

    async def settle(self, timeout: float) -> None:
        """Shutdown: let a commit in flight and its checkpoint finish (bounded), so the state we announce
        is whole and on disk (a write cut short by the bound goes on in its thread, atomic)."""
        deadline = time.monotonic() + timeout
        pending = self._inflight
        if pending is not None and not pending.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(pending), timeout)
        await self.checkpoints.flushed(max(0.0, deadline - time.monotonic()))

    async def flushed(self) -> None:
        """Wait for the checkpoint being written behind the training, if any."""
        await self.checkpoints.flushed()

    # ---- a state from peers ------------------------------------------------------------------------

    @staticmethod
    def step_count(tensors: Tensors) -> int | None:
        """The outer step count a state holds (its round), or None when it has no well-formed one."""
        step = tensors.get(STEP_KEY)
        return None if step is None or step.numel() != 1 else int(step)

    async def adopt(
        self, round_: int, hash_: str, tensors: Tensors, source: str, seconds: float, bytes_received: int
    ) -> None:
        """Load a verified state from peers as our global state, then checkpoint it; `OuterError` (and
        nothing changed) when our model cannot use it, `LossCheckError` (an `OuterError`) when its loss
        on the held-out batches is not finite or too far above ours and round 0's (`engine.losscheck`)."""
        await self.checkpoints.flushed()  # (a snapshot without serialization holds the live tensors)
        await asyncio.to_thread(self._load_synced, tensors)
        self._set(round_, hash_)
        self._emit(Synced(round_, hash_, source, seconds, from_peers=True, bytes_received=bytes_received))
        await self.checkpoint()

    def _load_synced(self, tensors: Tensors) -> None:
        # Names, shapes, dtypes and finiteness, then the held-out loss, are checked before anything
        # changes, so a refused state (OuterError) leaves ours as it was. The loss check borrows the
        # model and writes our weights back; we sync only between rounds, when nothing else uses it.
        params, _ = self.outer.check_state_dict(tensors)
        if self.loss_check is not None:
            own_is_init = self.round == 0  # round 0 is the run's initial state (or the seeded stand-in)
            verdict = self.loss_check.judge(self.trainer, params, self.outer.global_params, own_is_init)
            logger.info(
                "synced state passes the loss check: %s (%.2f s)", verdict.describe(), verdict.seconds
            )
        self.outer.load_state_dict(tensors)
        # A new global state from peers: what compression owed our old trajectory no longer applies.
        self.residual = None
        self.round_start = None
        self.outer.copy_to(self.model)

    # ---- checkpoints ---------------------------------------------------------------------------------

    async def checkpoint(self) -> bool:
        """Write the checkpoint of the current view now; on a full or failing disk log it, emit it and
        train on (False). The state is still in memory (and served to peers), the previous checkpoint on
        disk is intact (writes are atomic), and the next round's checkpoint tries again."""
        return await self.checkpoints.write(await asyncio.to_thread(self._snapshot, self._view, False))

    def _snapshot(self, view: StateView, copy: bool) -> Snapshot:
        """`view`'s checkpoint contents; `copy`: clone the trainer's tensors, which the next inner step
        changes (the global state goes as the commit's immutable serialization when there is one; the
        outer's live tensors otherwise, which change only where `flushed()` is awaited first)."""
        tensors, tmeta = self.trainer.export_state()
        if self.residual is not None:
            tensors = {**tensors, RESIDUAL_TENSOR: self.residual}
        if copy:
            tensors = {k: v.clone() for k, v in tensors.items()}
        ser = self.serialized()
        global_tensors = {} if ser is not None else self.outer.state_dict()
        return Snapshot(view.round, view.state_hash, global_tensors, tensors, tmeta, ser)


__all__ = ["RESIDUAL_TENSOR", "GlobalState", "Lost", "StateView", "lost_to_compression"]


@dataclass(frozen=True)
class Lost:
    """What a completed all-reduce lost of our contribution to compression: the next round's error-feedback
    residual (None: nothing, uncompressed or not a member)."""

    residual: torch.Tensor | None


def step_and_hash(
    outer: OuterOptimizer, avg: Tensors, start: Tensors | None
) -> tuple[SerializedState, Tensors | None]:
    """The outer step with `avg`, and the new state serialised and hashed; with `start` (the weights a local
    copy started its round from), also how far the step moved them (θ_new − start), for `move_local`."""
    outer.step(avg)
    moved = None
    if start is not None:
        with torch.no_grad():
            moved = {n: p - start[n] for n, p in outer.global_params.items()}
    return serialize_and_hash(outer.state_dict()), moved


def move_local(outer: OuterOptimizer, model: torch.nn.Module, moved: Tensors | None) -> None:
    """The local copy onto the committed weights (`moved` None), or by `moved`, keeping the progress its
    inner steps made since the round started (θ_local = θ_new − (θ_start − θ_local))."""
    if moved is None:
        outer.copy_to(model)
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in moved:
                p.add_(moved[name].to(device=p.device, dtype=p.dtype))


def _owed(held: torch.Tensor | None, lost: Lost | Callable[[], Lost]) -> torch.Tensor | None:
    """The residual after a commit: what it lost (`lost`, worked out now if it is a callable) plus what is
    `held` and still owed (an overlapped commit landing after its round's end, before the next Δ)."""
    new = (lost if isinstance(lost, Lost) else lost()).residual
    if held is None or (new is not None and new.numel() != held.numel()):
        return new
    return held if new is None else held + new


def lost_to_compression(
    sent: Tensors, group: list[str], me: str, codec: PayloadCodec, part_sizes: tuple[int, ...] = ()
) -> Lost:
    """`averaging.contribution_error` of what we `sent` to `group`, as a `Lost` (pure, so an overlapped run
    works it out while the next round trains instead of in the commit: 0.46 s at 26M parameters, int2)."""
    if codec.name == "none" or me not in group:
        return Lost(None)
    err = contribution_error(flatten(sent), len(group), sorted(group).index(me), codec, part_sizes)
    return Lost(err if bool(err.any()) else None)
