"""Overlapped outer updates: round r's all-reduce runs while round r + 1's inner steps compute (#17).

A run whose manifest says `diloco.outer_update = "overlapped"` drives each round through
`overlapped_round` instead of train → average → commit. At the end of round r's inner steps (the model
idle, the average of round r − 1 in flight since round r began):

1. Δ_r = θ_start − θ_local, plus the error-feedback residual, which this Δ consumes;
2. the average of round r − 1 is awaited and, if it completed, committed as round r − 1: the outer step on
   the global state, the hash, the checkpoint and the announcement, exactly as a sequential commit;
3. the average of Δ_r starts in the background; without the state of round r − 1 (its average failed here,
   or we have just joined the run), that state is then synced from the peers that announce it, with a
   bounded wait (they commit it at the end of their round r), and the average dropped if it never comes;
4. round r + 1 starts at θ_start = the global weights
   after an outer step with our own Δ_r (`OuterOptimizer.preview`): our own pseudo-gradient stands in for
   the average still in flight (the "eager" update of Kale et al. 2025, one round of delay as in Streaming
   DiLoCo). Δ_{r+1} is then what round r + 1's inner steps did, whatever the average of Δ_r turns out to be.
5. if that average completes while round r + 1 trains, it is committed at once (`start_landing`) as in
   step 2, the local copy keeping its progress since θ_start, so the rest of the round trains from the
   true global weights (at H=50, 2-bit: 1.004× the sequential int8 loss when it lands after one step,
   1.124× at the round's end; docs/decisions.md). Its outer step and hash run beside the inner steps;
   the local copy moves between two chunks of them.

The rules of the sequential path hold: only a completed average is ever applied (step 2 applies it to the
state of round r − 1 and to nothing else), a failed one leaves the global weights as they were, and every
member of a group applies the same bytes to the same state, so the hashes agree after each commit. The
global state never holds the guess of step 4; checkpoints and state sync carry the committed state only,
and the average in flight is not checkpointed (a node that restarts lost that round, as with a crash in a
sequential round).

With nothing in flight (the first round, after a restart, a sync or a pause), a node holding round j trains
round j + 2 when peers hold round j too: they are averaging round j + 1 now, and a Δ for it would come a
whole round late. It then needs round j + 1's state from them at step 3. If nobody announces it (the whole
run restarted together), it trains round j + 1 next time (`lost_phase`), which starts the pipeline afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from intellect.node.run import decide as rules
from intellect.node.run.phase import Phase
from intellect.node.run.state import lost_to_compression
from intellect.node.run.training import RoundAbandoned

if TYPE_CHECKING:  # the machine imports this module; only its type is needed here
    from intellect.node.run.machine import AveragedRound, RoundMachine, TrainedRound

logger = logging.getLogger(__name__)


async def overlapped_round(m: RoundMachine) -> None:
    """One round of an overlapped run (module docstring): train, settle the previous average, start ours."""
    flight = m.inflight
    if flight is not None and m.limits.reached(m.completed + 1, flight[0]):
        # Committing the average in flight ends our run: there is no next round to train.
        m.phases.enter(Phase.AVERAGING)
        await settle(m)
        return
    r = flight[0] + 1 if flight is not None else next_round(m)
    try:
        trained = await m.train(r)
    except RoundAbandoned as e:  # paused: the average in flight is dropped too; we catch up on resume
        await abandon(m)
        return await m.state.discard_local(f"round {r} abandoned: {e}")
    m.phases.enter(Phase.AVERAGING)  # (waiting for the average in flight, if any)
    # Until our heartbeat is in round r's lobby, an intent there says we are about to come: a leader that
    # saw our training intent go overdue while we settled would declare without us (seen in the swarm).
    coming = asyncio.create_task(_coming(m, r), name=f"intent-{r}")
    try:
        await settle(m)
    finally:
        await _stop(coming)
    if m.state.round > r - 1 or m.done():
        return await m.state.discard_local(f"round {r}: holding round {m.state.round}, not averaged")
    # Our Δ goes to round r's lobby now, in time with the others, even when the state it applies to must
    # still come from peers: fetched after the average has started, the sync delays nobody.
    m.inflight = (r, asyncio.create_task(average_ahead(m, trained), name=f"average-{r}"))
    if m.state.round < r - 1:
        await fetch_round(m, r - 1)
        if m.state.round != r - 1:
            # Nobody announcing it when we started in phase means the run is not in flight: restart it.
            m.lost_phase = flight is None and m.state.round < r - 1
            await abandon(m)
            return await m.state.discard_local(f"round {r}: round {r - 1}'s state not found, not averaged")
    m.lost_phase = False
    await m.state.rebase(trained.delta)


async def average_ahead(m: RoundMachine, trained: TrainedRound) -> AveragedRound | None:
    """Round r's average in the background, and what compression lost of our Δ (the next residual) worked
    out as soon as it completes, while round r + 1 trains, rather than in the commit, which idles the model
    (`state.lost_to_compression`: 0.46 s at 26M parameters with int2, about twice that under load)."""
    averaged = await m.average(trained, background=True)
    if averaged is None:
        return None
    res = averaged.result
    group, codec = list(res.group), m.averager.codec
    lost = await asyncio.to_thread(lost_to_compression, trained.delta, group, m.me, codec, res.part_sizes)
    return dataclasses.replace(averaged, lost=lost)


#: How often the intent of a node that finished its inner steps, and is settling, is renewed (with an ETA of
#: now: a leader waits for it as for a peer due, at most `matchmaking_s`).
COMING_S = 0.5


async def _coming(m: RoundMachine, r: int) -> None:
    while True:
        with contextlib.suppress(Exception):  # best effort, as the training intent (`RoundMachine._intend`)
            await m.averager.intend(r, 0.0, m._expected(r), ttl=4 * COMING_S)
        await asyncio.sleep(COMING_S)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def next_round(m: RoundMachine) -> int:
    """The round to train with nothing in flight: held + 2 when peers hold our round (they average held +
    1 now, module docstring), else held + 1."""
    held = m.state.round
    if held == 0 or m.lost_phase:
        return held + 1
    if any(rr >= held for rr in m.book.peer_rounds().values()):
        return held + 2
    return held + 1


async def settle(m: RoundMachine, mid_round: bool = False) -> None:
    """Wait for the average in flight and commit it, if it completed, onto the state it belongs to."""
    flight = m.inflight
    if flight is None:
        return
    r, task = flight
    try:
        averaged = await task
    finally:
        m.inflight = None
    if averaged is None:
        return  # failed: the global weights stay (`RoundMachine.average` logged why)
    if m.state.round != r - 1:
        # We synced past it meanwhile (a pause, a fork healed): the average belongs to another state.
        logger.warning("round %d averaged while we hold round %d: not applied", r, m.state.round)
        return
    await m.commit(averaged, mid_round)


def start_landing(m: RoundMachine) -> asyncio.Task[None] | None:
    """As a round's inner steps start: a task that commits the average in flight (`settle`) as soon as it
    completes, while the inner steps go on, instead of at the round's end, so that the rest of the round
    trains from the true global weights rather than from the eager guess (landing after 1 of 50 inner
    steps took the overlapped loss from 1.106× to 1.007× the sequential one, `bench/convergence.py
    --land-after`, docs/decisions.md). The commit's outer step and hash run beside the inner steps; only
    moving the local copy waits for a pause between two chunks (`GlobalState.model_idle`). A failed
    average is left to the round's end, where a failure is handled. None: nothing in flight."""
    flight = m.inflight
    if flight is None:
        return None
    return asyncio.create_task(_land(m, flight[1]), name=f"landing-{flight[0]}")


async def _land(m: RoundMachine, task: asyncio.Task[AveragedRound | None]) -> None:
    await asyncio.wait({task})  # (without consuming its result or exception: `settle` does)
    if task.cancelled() or task.exception() is not None or task.result() is None:
        return
    await settle(m, mid_round=True)


async def stop_landing(m: RoundMachine, landing: asyncio.Task[None] | None) -> None:
    """The round's inner steps are over (or given up): a landing still waiting for its average is called
    off (the round's end settles it), one that has begun its commit is waited for, and its error raised."""
    if landing is None:
        return
    flight = m.inflight
    if flight is not None and not flight[1].done():
        landing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await landing


async def heal_fork(m: RoundMachine) -> None:
    """Mid-pipeline, where `RoundMachine.catch_up` does not run: a one-lobby round split into two groups
    and more peers vouch for the other state of the round we hold than for ours (`decide.forked`): we
    take theirs. Left alone, the split never heals in this mode (the freeze test saw one member commit
    nine rounds on its own line, in groups with the others): every later group averages the same bytes,
    and each side applies them to its own state. The average in flight is then applied to their state
    when it completes, exactly as they apply it, which puts us back on their line."""
    view = m._view()
    if view.target is None or not rules.forked(view):
        return
    logger.warning(
        "round %d split: %d peers hold %s, we hold %s; taking theirs",
        view.our_round,
        len(view.target.peers),
        view.target.state_hash[:12],
        view.our_hash[:12],
    )
    await m.sync(view.target)


async def abandon(m: RoundMachine) -> None:
    """Drop the average in flight, if any (shutdown, pause): nothing of it is applied."""
    flight, m.inflight = m.inflight, None
    if flight is None:
        return
    r, task = flight
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # dropped either way, but an averaging bug must not vanish silently
        logger.exception("the average of round %d failed while it was being dropped", r)


def announcement_wait_s(m: RoundMachine) -> float:
    """How long a node waits for peers to announce a state (`decide.catch_up_wait_s`)."""
    a = m.manifest.averaging
    return rules.catch_up_wait_s(
        m.book.round_period,
        m.book.throughputs(),
        m.manifest.max_tokens_per_round(),
        a.matchmaking_s,
        a.round_deadline_s,
    )


async def fetch_round(m: RoundMachine, want: int) -> None:
    """Sync round `want` (or a later one) from the peers that announce it, waiting for an announcement
    about as long as a catch-up does (`decide.catch_up_wait_s`)."""
    wait_s = announcement_wait_s(m)
    deadline = time.monotonic() + wait_s
    logger.info("round %d's state is needed before our average can apply: fetching it", want)
    while True:
        await m.net.refresh_members()
        found = m.book.target()
        if found is not None and found[0].round >= want:
            await m.sync(found[0])
            if m.state.round >= want:
                return
        left = deadline - time.monotonic()
        if not any(rr >= want - 1 for rr in m.book.peer_rounds().values()):
            return  # nobody is in the run at our phase: nobody will announce it
        if left <= 0:
            logger.warning("nobody announced round %d's state within %.0f s", want, wait_s)
            return
        m.phases.enter(Phase.WAITING_FOR_ROUND)
        m.book.new_announcement.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(m.book.new_announcement.wait(), min(left, 1.0))
