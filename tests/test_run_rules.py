"""The round machine's pure parts: catch-up decisions, wait bounds, the phase table. No asyncio, no torch."""

from __future__ import annotations

import pytest
from intellect.node.run.decide import Action, View, catch_up_wait_s, decide, fresh_window_s, wait_is_over
from intellect.node.run.events import PhaseChanged, Recorder
from intellect.node.run.phase import TRANSITIONS, IllegalTransition, Phase, PhaseTracker
from intellect.protocol.vouching import SyncTarget

H = "ab" * 32


def target(round_: int) -> SyncTarget:
    return SyncTarget(round_, H, 0, 0, ("12D3KooWpeer",))


def test_nobody_ahead_trains_on() -> None:
    assert decide(View(3, 3, target(3), 100.0, 100.0), fresh_s=2.0).action is Action.TRAIN
    assert decide(View(3, 0, None, 0.0, 100.0), fresh_s=2.0).action is Action.TRAIN


def test_a_fresh_announcement_of_the_furthest_round_is_synced_at_once() -> None:
    d = decide(View(1, 4, target(4), 99.5, 100.0), fresh_s=2.0)
    assert d.action is Action.SYNC and d.target == target(4) and d.ahead == 4


@pytest.mark.parametrize(
    "view",
    [
        View(1, 4, target(4), 90.0, 100.0),  # stale: others are already training the round after it
        View(1, 5, target(4), 99.9, 100.0),  # fresh, but someone claims a later round than the target
        View(1, 4, None, 0.0, 100.0),  # peers ahead, no state anyone vouches for
        View(1, 4, target(4), 0.0, 100.0),  # only the DHT vouches (never heard by gossip)
    ],
)
def test_otherwise_wait_for_the_next_announcement(view: View) -> None:
    d = decide(view, fresh_s=2.0)
    assert d.action is Action.WAIT and d.target is None


def test_after_a_wait_a_stale_state_beats_ours_but_nothing_is_nothing() -> None:
    assert decide(View(1, 4, target(4), 10.0, 100.0), 2.0, waited=True).action is Action.SYNC
    assert decide(View(1, 4, None, 0.0, 100.0), 2.0, waited=True).action is Action.TRAIN
    assert decide(View(4, 4, target(4), 10.0, 100.0), 2.0, waited=True).action is Action.TRAIN


def test_a_wait_ends_on_a_just_heard_state_at_least_as_far_as_the_peers() -> None:
    assert wait_is_over(target(4), 99.8, ahead=4, now=100.0)
    assert not wait_is_over(target(3), 99.8, ahead=4, now=100.0)
    assert not wait_is_over(target(4), 90.0, ahead=4, now=100.0)
    assert not wait_is_over(None, 99.8, ahead=4, now=100.0)


def test_wait_bounds() -> None:
    assert fresh_window_s(5.0) == 2.5 and fresh_window_s(0.5) == 1.0
    # Seen their rounds: about two of them plus matchmaking, capped by the deadline + 30 s.
    assert catch_up_wait_s(6.0, [], 4096, 5.0, 120.0) == 17.0
    assert catch_up_wait_s(600.0, [], 4096, 5.0, 120.0) == 150.0
    # Not seen yet: a round estimated from the median throughput in the members' signed records.
    assert catch_up_wait_s(None, [1024.0, 2048.0, 0.0, 4096.0], 4096, 5.0, 120.0) == 2 * (4096 / 2048 + 5) + 5
    assert catch_up_wait_s(None, [], 4096, 5.0, 120.0) == 150.0


def test_every_phase_has_a_row_and_every_run_phase_can_stop() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase in Phase:
        if phase not in (Phase.STOPPING, Phase.STOPPED):
            tracker = PhaseTracker(Recorder(), phase)
            tracker.enter(Phase.STOPPING)
            assert tracker.phase is Phase.STOPPING


def test_a_round_goes_through_its_phases_and_illegal_moves_raise() -> None:
    events = Recorder()
    t = PhaseTracker(events)
    for p in (Phase.JOINING, Phase.LOADING, Phase.TRAINING, Phase.AVERAGING, Phase.CHECKPOINTING):
        t.enter(p)
    t.enter(Phase.TRAINING)  # the next round
    with pytest.raises(IllegalTransition, match="training -> checkpointing"):
        t.enter(Phase.CHECKPOINTING)  # never commit without averaging
    t.enter(Phase.STOPPING)
    t.enter(Phase.STOPPED)
    with pytest.raises(IllegalTransition):
        t.enter(Phase.TRAINING)
    assert [e.phase for e in events.of(PhaseChanged)] == [  # type: ignore[attr-defined]
        "joining",
        "loading",
        "training",
        "averaging",
        "checkpointing",
        "training",
        "stopping",
        "stopped",
    ]


def test_the_rules_load_without_torch_or_asyncio_networking() -> None:
    import subprocess
    import sys

    code = (
        "import sys, intellect.node.run.decide, intellect.node.run.phase;"
        "bad = [m for m in ('torch', 'hivemind', 'libp2p') if m in sys.modules];"
        "print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_split_round_of_a_one_lobby_run_heals_to_the_side_more_peers_hold() -> None:
    other = SyncTarget(5, H, 0, 0, ("a", "b", "c", "d"))  # four peers hold the other state of round 5
    mine = "cd" * 32

    def view(side: int, one_lobby: bool = True, our_hash: str = mine) -> View:
        return View(5, 5, other, 99.9, 100.0, our_hash, side, one_lobby)

    d = decide(view(side=1), fresh_s=2.0)  # we and one peer against four
    assert d.action is Action.SYNC and d.target == other
    assert decide(view(side=3), fresh_s=2.0).action is Action.TRAIN  # four against four: keep ours
    assert decide(view(side=1, our_hash=H), fresh_s=2.0).action is Action.TRAIN  # the same state
    # Several lobbies: each bucket's group commits its own state of the round by design.
    assert decide(view(side=0, one_lobby=False), fresh_s=2.0).action is Action.TRAIN
