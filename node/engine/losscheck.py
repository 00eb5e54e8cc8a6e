"""The loss check a node applies to a state from peers before it adopts it.

Hash, step count, names, shapes, dtypes and finiteness say that a synced state is the one its vouchers
announced and that our model can load it; they do not say it is a trained model. A state whose weights are
scaled by 1000, or replaced by noise, passes all of them. So before adopting, the node measures the
candidate's mean next-token loss on a few fixed held-out batches and refuses it when that loss is not
finite or is worse than a reference by more than `LOSS_FACTOR`:

    reference = min(loss of the run's round-0 state, loss of the state we hold now)
    refuse if not finite(candidate) or candidate > LOSS_FACTOR × reference

The round-0 state is every node's common anchor (it rebuilds it from the manifest: `init.seed`, or the
file `init.sha256` pins; without that file, the seeded init, which is still an untrained model of the
run's shape). The state we hold is always of an earlier round than the one we sync (we sync only when
peers are ahead), and a later round of the same run is not worse than an earlier one (measured: on the tiny
run the global state's held-out loss fell in 11 of 12 rounds and rose once by 0.1%), so it is the tighter
reference once we have trained. The minimum, not the maximum: a node whose own state is bad still compares
against round 0, and one whose state is good is not talked into a worse one. The margin, 10%, absorbs the
noise of a few batches and the small bumps of the outer optimizer, and is far below what a garbled state
costs (docs/decisions.md, "Loss check before adopting a synced state", has the figures).

A refusal is held against the vouchers (distrusted for good) only when the candidate is no trained state:
not finite, or closer to round 0's loss than to ours (`Verdict.trained`). A trained state that is only
worse than ours by more than the margin is refused for now, at most `MAX_SOFT_REFUSALS` times in a row,
and then adopted: the outer step can raise the loss by more than 10% for a round (1.118× in one CI run),
and a node that distrusted the run's honest members for that was cut off from the run for good.

The held-out batches (`check_batches`) are the same on every node: `CHECK_BATCHES` batches of the node's
training batch size and the run's sequence length, windows evenly spaced over the source. The source is
`builtin://heldout` (the tail of the built-in corpus that no peer trains on) when the run trains on the
built-in corpus; a run on its own shards declares no held-out split (the manifest has no field for one), so
its windows are evenly spaced over its training shards: every state of the run has seen them about as
often as any other window, which keeps the comparison between states fair.

Evaluation borrows the live model (no second copy of the weights, which for a large model would not fit
next to the training copy): it writes the weights to judge into it, runs `InnerTrainer.evaluate` (eval
mode, no gradients, no RNG, the data stream untouched) and always writes our own weights back. Cost: one
forward pass per batch and state, about one inner step's compute per state judged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from intellect.node.engine.data import BUILTIN_SCHEME, ShardResolver, builtin_heldout
from intellect.node.engine.initstate import InitStateError, init_state_path, load_init_state
from intellect.node.engine.model import Llama
from intellect.node.engine.outer import OuterError, OuterOptimizer
from intellect.node.engine.trainer import InnerTrainer
from intellect.protocol.manifest import ShardSpec

logger = logging.getLogger(__name__)

#: A candidate may be at most this much worse (its loss over the reference) before it is refused.
LOSS_FACTOR = 1.10
#: Batches (of the node's training batch size) the loss is measured on.
CHECK_BATCHES = 4

Weights = Mapping[str, torch.Tensor]


#: A trained state that fails only against our own state (`Verdict.trained`) is refused at most
#: this many times in a row, and never held against its vouchers; the next one is adopted. The outer
#: optimizer can raise the held-out loss by more than the margin for a round (measured in CI: 2.362 at
#: round 8, 2.640 at round 9 of an overlapped four-daemon run, 1.118×), and a node that distrusted the
#: run's honest members for it was cut off from the run for good.
MAX_SOFT_REFUSALS = 2


class LossCheckError(OuterError):
    """A synced state's held-out loss is not finite, or worse than the reference by more than the margin.
    `soft`: a trained state of the run (`Verdict.trained`), only worse than ours."""

    def __init__(self, verdict: Verdict, soft: bool = False) -> None:
        super().__init__(f"state fails the loss check: {verdict.describe()}")
        self.verdict = verdict
        self.soft = soft


@dataclass(frozen=True)
class Verdict:
    """One loss check: the candidate's loss, the references, and whether it passed."""

    candidate: float
    own: float
    init: float
    factor: float
    seconds: float

    @property
    def reference(self) -> float:
        """The lower finite one of the two references (inf, which any finite candidate passes, if neither
        is finite: then we hold nothing we could prefer to the candidate)."""
        return min((x for x in (self.own, self.init) if math.isfinite(x)), default=math.inf)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.candidate) and self.candidate <= self.factor * self.reference

    @property
    def trained(self) -> bool:
        """Closer to our state's loss than to round 0's: it kept at least half of what training has won
        since round 0, so it is a trained state of the run, whatever it is worth against ours. (Within the
        margin of round 0's loss would not do: noise and a reset to round 0 are there too.)"""
        if not (math.isfinite(self.candidate) and math.isfinite(self.own) and math.isfinite(self.init)):
            return self.passed
        if self.own >= self.init:
            return self.passed
        return self.candidate <= (self.own + self.init) / 2

    def describe(self) -> str:
        which = "the run's initial state" if self.reference == self.init else "our state"
        op = "<=" if self.passed else ">"
        return f"{self.candidate:.3f} {op} {self.reference:.3f} ({which}) × {self.factor:.2f}"


def check_source(resolver: ShardResolver, shards: Sequence[ShardSpec]) -> list[np.ndarray]:
    """The token arrays the check's windows come from (see the module docstring)."""
    if shards and all(s.uri.startswith(BUILTIN_SCHEME + "corpus/") for s in shards):
        return [resolver.load(builtin_heldout(resolver.tokenizer))]
    return [resolver.load(s) for s in shards]


def check_batches(
    sources: Sequence[np.ndarray], batch: int, seq_len: int, n_batches: int = CHECK_BATCHES
) -> list[torch.Tensor]:
    """`n_batches` batches [batch, seq_len + 1] of windows evenly spaced over `sources` (windows as in
    `TokenStream`: window k of a source starts at k·seq_len). Fewer when the sources hold fewer windows;
    the last batch may be smaller."""
    counts = [max(0, (len(s) - 1) // seq_len) for s in sources]
    total = sum(counts)
    want = min(total, batch * n_batches)
    if want == 0:
        return []
    starts = np.concatenate([[0], np.cumsum(counts)])
    picks = np.unique(np.linspace(0, total - 1, want).round().astype(np.int64))
    rows = []
    for index in picks:
        src = int(np.searchsorted(starts, index, side="right")) - 1
        at = (int(index) - int(starts[src])) * seq_len
        rows.append(np.asarray(sources[src][at : at + seq_len + 1], dtype=np.int64))
    return [torch.from_numpy(np.stack(rows[i : i + batch])) for i in range(0, len(rows), batch)]


def round0_writer(seed: int, data_dir: Path, pinned: str) -> Callable[[Llama], None]:
    """Writes the run's round-0 weights into a model: the pinned state file when there is one and it
    verifies, else `Llama.init_weights(seed)` (its own generator: the global RNG is not touched)."""

    def write(model: Llama) -> None:
        if pinned:
            outer = OuterOptimizer.from_model(model)
            try:
                load_init_state(init_state_path(data_dir, pinned), pinned, outer)
            except (InitStateError, OSError) as e:
                logger.info("loss check: %s; the seeded init stands in for round 0", e)
            else:
                outer.copy_to(model)
                return
        model.init_weights(seed)

    return write


class LossCheck:
    """Judges candidate states against round 0 and our own state on fixed held-out batches."""

    def __init__(
        self, batches: Sequence[torch.Tensor], round0: Callable[[Llama], None], factor: float = LOSS_FACTOR
    ) -> None:
        self.batches = list(batches)
        self.round0 = round0
        self.factor = factor
        #: Held-out loss of the run's round-0 state (computed once, on the first check).
        self.init_loss: float | None = None
        #: Candidates refused in a row for being worse than our own state only (`MAX_SOFT_REFUSALS`).
        self.soft_refusals = 0

    def judge(self, trainer: InnerTrainer, candidate: Weights, own: Weights, own_is_init: bool) -> Verdict:
        """Measure `candidate` (weights by parameter name) against the references; the model holds `own`
        again afterwards, whatever happens. Raises `LossCheckError` when it fails."""
        if not self.batches:
            raise RuntimeError("loss check: no held-out batches")  # build_loss_check returns None then
        t0 = time.perf_counter()
        model = trainer.model
        try:
            own_loss = self._loss(trainer, own)
            if own_is_init and self.init_loss is None:
                self.init_loss = own_loss
            if self.init_loss is None:
                self.round0(model)
                self.init_loss = trainer.evaluate(self.batches)
            cand = self._loss(trainer, candidate)
        finally:
            _write(model, own)
        verdict = Verdict(cand, own_loss, self.init_loss, self.factor, time.perf_counter() - t0)
        if verdict.passed:
            self.soft_refusals = 0
            return verdict
        if not verdict.trained:
            raise LossCheckError(verdict)
        if self.soft_refusals < MAX_SOFT_REFUSALS:
            self.soft_refusals += 1
            raise LossCheckError(verdict, soft=True)
        logger.warning(
            "loss check: %s, after %d such states refused in a row; adopting it (it beats the run's "
            "initial state)",
            verdict.describe(),
            self.soft_refusals,
        )
        self.soft_refusals = 0
        return verdict

    def _loss(self, trainer: InnerTrainer, weights: Weights) -> float:
        _write(trainer.model, weights)
        return trainer.evaluate(self.batches)


def _write(model: Llama, weights: Weights) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def build_loss_check(
    resolver: ShardResolver,
    shards: Sequence[ShardSpec],
    shape: tuple[int, int],
    round0: Callable[[Llama], None],
) -> LossCheck | None:
    """The run's loss check (`shape`: batch, seq_len), or None (logged) when its source holds no window."""
    batch, seq_len = shape
    batches = check_batches(check_source(resolver, shards), batch, seq_len)
    if not batches:
        logger.warning(
            "no window of %d tokens to check synced states on: adopted without a loss check", seq_len
        )
        return None
    return LossCheck(batches, round0)


__all__ = [
    "CHECK_BATCHES",
    "LOSS_FACTOR",
    "MAX_SOFT_REFUSALS",
    "LossCheck",
    "LossCheckError",
    "Verdict",
    "build_loss_check",
    "check_batches",
    "check_source",
    "round0_writer",
]
