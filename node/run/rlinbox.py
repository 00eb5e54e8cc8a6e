"""A trainer's inbox of rollout batches: bytes from workers in, verified batches out, idle time counted.

This is the piece of the `trainer` role (`intellect.node.run.rltrainer`) between the rollout stream
and the GRPO step (`intellect.node.engine.rltrain`). It is written so that the trainer never blocks on
checks it does not need: `offer` decodes and checks one batch (the torch prefill of a sampled check runs
in a worker thread, so the event loop keeps serving other streams), and `take` hands the training loop
what is queued, dropping batches that became stale while they waited, and waits only when too little is
queued; the time it waits is the trainer's idle time (`idle_fraction`).

The queue is bounded in completions: when it is full, `offer` refuses the batch before checking it
(`full`), so a fast worker cannot make a trainer hold more than one step or two of work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from intellect.node.engine.rlverify import PolicyLookup, RolloutVerifier, Verdict
from intellect.protocol.errors import ProtocolError
from intellect.protocol.rollouts import RolloutBatch, RolloutEvidence, decode_batch

log = logging.getLogger(__name__)


class RolloutInbox:
    """Verified batches waiting for GRPO steps (see the module docstring). One per trainer."""

    def __init__(
        self,
        verifier: RolloutVerifier,
        max_completions: int,
        on_evidence: Callable[[RolloutEvidence], None] = lambda ev: None,
    ) -> None:
        if max_completions < 1:
            raise ValueError("max_completions must be at least 1")
        self.verifier = verifier
        self.max_completions = max_completions
        self._on_evidence = on_evidence
        self._queue: deque[RolloutBatch] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self.counts: Counter[str] = Counter()
        self._idle_s = 0.0
        self._started = time.monotonic()
        #: Thread CPU seconds spent decoding and checking batches (the verification cost).
        self.check_cpu_s = 0.0

    @property
    def queued_completions(self) -> int:
        return self._queued

    async def offer(self, data: bytes, current_version: int, policy: PolicyLookup) -> Verdict | None:
        """Check one batch's bytes; queue it when accepted. None when refused before the checks (bytes
        that do not decode, or a full queue); else the verifier's verdict."""
        if self._queued >= self.max_completions:
            self.counts["full"] += 1
            return None
        t0 = time.thread_time()
        try:
            batch = decode_batch(data, self.verifier.run_id)
        except ProtocolError as e:
            self.counts["undecodable"] += 1
            log.debug("rollout bytes refused: %s", e)
            return None
        finally:
            self.check_cpu_s += time.thread_time() - t0
        verdict = await asyncio.to_thread(self._check, batch, current_version, policy)
        if verdict.evidence is not None:
            self._on_evidence(verdict.evidence)
        if verdict.accepted:
            self._queue.append(batch)
            self._queued += len(batch.completions())
            self._arrived.set()
        self.counts[verdict.outcome.value] += 1
        return verdict

    def _check(self, batch: RolloutBatch, current_version: int, policy: PolicyLookup) -> Verdict:
        t0 = time.thread_time()
        try:
            return self.verifier.check(batch, current_version, policy)
        finally:
            self.check_cpu_s += time.thread_time() - t0

    def _drop_stale(self, current_version: int) -> None:
        limit = self.verifier.rl.max_async_level
        kept = [b for b in self._queue if current_version - b.version <= limit]
        self.counts["stale_in_queue"] += len(self._queue) - len(kept)
        self._queue = deque(kept)
        self._queued = sum(len(b.completions()) for b in kept)

    async def take(self, min_completions: int, current_version: int) -> list[RolloutBatch]:
        """Wait until at least `min_completions` completions of batches at most `max_async_level` behind
        `current_version` are queued, and return them all (oldest first)."""
        self._drop_stale(current_version)
        while self._queued < min_completions:
            self._arrived.clear()
            start = time.monotonic()
            try:
                await self._arrived.wait()
            finally:
                self._idle_s += time.monotonic() - start
            self._drop_stale(current_version)
        out = list(self._queue)
        self._queue.clear()
        self._queued = 0
        return out

    def idle_fraction(self) -> float:
        """Share of the inbox's lifetime that `take` spent waiting for batches."""
        total = time.monotonic() - self._started
        return self._idle_s / total if total > 0 else 0.0
