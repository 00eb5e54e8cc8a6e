"""Catch-up decisions of the round machine, as pure functions of what the peer book knows.

Before each round a node asks: is anyone ahead of us, and if so, which state do we fetch and when? Others
start their next round right after announcing, so to join that round in step we sync a state announced
just now, else wait (bounded) for their next announcement. No I/O, no asyncio, no torch: tested directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from intellect.protocol.vouching import SyncTarget


class Action(Enum):
    #: Nobody is ahead (or nothing usable is on offer): train the next round from our state.
    TRAIN = "train"
    #: Fetch `Decision.target` now.
    SYNC = "sync"
    #: Peers are ahead but the state on offer is stale or behind them: wait for a fresh announcement.
    WAIT = "wait"


@dataclass(frozen=True)
class View:
    """What the node knows when it decides (from the peer book, at one instant)."""

    #: Round of the global state we hold.
    our_round: int
    #: The highest round any counted peer claims (gossip or DHT).
    ahead: int
    #: The state most peers vouch for, or None.
    target: SyncTarget | None
    #: When we last heard a gossip announcement of `target` (0.0: only the DHT vouches for it).
    heard_at: float
    #: Now, on the same clock as `heard_at`.
    now: float
    #: The hash of the state we hold, and how many counted peers vouch for that same (round, hash).
    our_hash: str = ""
    our_side: int = 0
    #: Whether the whole run meets in one lobby (one group a round): then two states of one round are a
    #: fork, not two buckets' groups.
    one_lobby: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    target: SyncTarget | None = None
    #: The round peers are at (what a wait waits for).
    ahead: int = 0


def fresh_window_s(matchmaking_s: float) -> float:
    """How recent an announcement must be to join the round that follows it: half the matchmaking window."""
    return max(1.0, matchmaking_s / 2)


def decide(view: View, fresh_s: float, waited: bool = False) -> Decision:
    """Train, sync now or wait. After a wait (`waited`), any target past our round is synced, however
    stale: if none fresher came, the others have probably stopped, and their state still beats ours."""
    ahead = max(view.ahead, view.target.round if view.target is not None else 0)
    if forked(view):
        return Decision(Action.SYNC, view.target, ahead)
    if ahead <= view.our_round:
        return Decision(Action.TRAIN, ahead=ahead)
    target = view.target
    if waited:
        if target is None or target.round <= view.our_round:
            return Decision(Action.TRAIN, ahead=ahead)
        return Decision(Action.SYNC, target, ahead)
    if target is None or target.round < ahead or view.now - view.heard_at > fresh_s:
        return Decision(Action.WAIT, ahead=ahead)
    return Decision(Action.SYNC, target, ahead)


def forked(view: View) -> bool:
    """A one-lobby run split in a round (two groups formed when members blamed different peers), and more
    peers vouch for the other state of our round than for ours, us included: we take theirs. Otherwise the
    split never heals: the next round's single group averages pseudo-gradients taken from two different
    states, and each side applies the average to its own."""
    t = view.target
    return (
        view.one_lobby
        and t is not None
        and bool(view.our_hash)
        and t.round == view.our_round
        and t.state_hash != view.our_hash
        and len(t.peers) > view.our_side + 1
    )


def wait_is_over(target: SyncTarget | None, heard_at: float, ahead: int, now: float) -> bool:
    """During a wait: the announcement just heard is of a state at least as far as the peers were."""
    return target is not None and target.round >= ahead and now - heard_at < 1.0


def catch_up_wait_s(
    round_period: float | None,
    throughputs: Sequence[float],
    max_tokens_per_round: int,
    matchmaking_s: float,
    round_deadline_s: float,
) -> float:
    """How long to wait for a fresh announcement before syncing a stale one: about two of the others'
    rounds when we have seen how long theirs take, else an estimate from the throughput peers put in their
    signed membership records (H × batch × sequence tokens, plus matchmaking), else the round deadline."""
    bound = round_deadline_s + 30.0
    period = round_period
    if period is None:
        rates = sorted(r for r in throughputs if r > 0)
        if not rates:
            return bound
        period = max_tokens_per_round / rates[len(rates) // 2] + matchmaking_s
    return min(bound, 2.0 * period + matchmaking_s)
