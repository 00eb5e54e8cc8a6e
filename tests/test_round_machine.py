"""The round machine through its public interfaces: real engine, global state and peer book; the network
parts (averager, announcer, DHT) are stand-ins that record what the machine asks of them.

Also the regression tests of two defects of the old `RunService`: a commit published the new state hash
with the old round, and the membership refresh erased the run's own rejection counters.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from intellect.node.app.config import NodeConfig
from intellect.node.app.status import make_registry
from intellect.node.engine.outer import GLOBAL_PREFIX, OuterOptimizer
from intellect.node.engine.statehash import state_hash
from intellect.node.net.allreduce import get_payload_codec
from intellect.node.net.averaging import AverageResult
from intellect.node.net.statesync import StateSnapshot, SyncReport
from intellect.node.run.events import (
    Averaged,
    Committed,
    GossipCounters,
    PhaseChanged,
    Recorder,
    Rejected,
    RunReject,
    SyncFailed,
    Trained,
)
from intellect.node.run.machine import Limits, RoundMachine
from intellect.node.run.phase import Phase, PhaseTracker
from intellect.node.run.state import Lost, StateView, lost_to_compression
from intellect.node.run.training import Pacer
from intellect.protocol.gossip_messages import CheckpointAnnounce
from intellect.protocol.sync_messages import BadChunkEvidence
from intellect.protocol.vouching import SyncTarget
from prometheus_client import generate_latest

if TYPE_CHECKING:  # the fixture's type; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun, OfflineRun


class Averager:
    """Averages with nobody: returns our own Δ (ok), or fails with a reason."""

    codec = get_payload_codec("none")

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.rounds: list[int] = []

    async def intend(self, round: int, eta: float, expected: Collection[str] | None, ttl: float) -> None:
        pass

    def ban(self, peers: Collection[str]) -> None:
        pass

    async def average(
        self,
        round: int,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        deadline: float,
        overtaken: Callable[[], bool] | None = None,
        expected: Collection[str] | None = None,
        holders: Callable[[], Collection[str]] | None = None,
    ) -> AverageResult:
        self.rounds.append(round)
        if not self.ok:
            return AverageResult(False, None, [], reason="deadline")
        return AverageResult(True, {k: v.clone() for k, v in tensors.items()}, ["solo"])


class Announcer:
    def __init__(self) -> None:
        self.states: list[StateView] = []

    async def state(
        self,
        view: StateView,
        tensors: Mapping[str, torch.Tensor],
        throughput: float,
        serialized: object = None,
    ) -> None:
        self.states.append(view)

    async def progress(
        self, view: StateView, step: int, tokens: int, loss: float, tokens_per_s: float
    ) -> None:
        return None

    async def misbehaviour(self, evidence: Sequence[BadChunkEvidence], round_: int) -> None:
        return None

    async def equivocation(self, evidence: Sequence[object], round_: int) -> None:
        return None


class Alone:
    def __init__(self, run: OfflineRun) -> None:
        self.shards = run.engine.shards

    async def refresh_members(self) -> None:
        return None

    async def state(
        self, target: SyncTarget, distrusted: frozenset[str], report: SyncReport
    ) -> StateSnapshot:
        raise AssertionError("alone: nothing to sync")


def machine(
    run: OfflineRun, averager: Averager, rounds: int, events: Recorder
) -> tuple[RoundMachine, Announcer]:
    announcer = Announcer()
    parts = (run.book, run.state, run.engine.trainer, averager, announcer)

    def emit(e: Any) -> None:
        events(e)

    m = RoundMachine(
        run.identity.peer_id,
        run.run_id,
        run.signed.manifest,
        parts,
        Alone(run),
        PhaseTracker(emit, Phase.LOADING),
        emit,
        Limits(max_rounds=rounds),
    )
    return m, announcer


@pytest.fixture
def run(tmp_path: Path, offline_run: MakeOfflineRun) -> OfflineRun:
    return offline_run(NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",)))


def test_rounds_commit_in_order_and_announce_each_state(run: OfflineRun) -> None:
    events = Recorder()
    m, announcer = machine(run, Averager(), 2, events)
    start = run.state.state_hash
    asyncio.run(m.run())
    assert run.state.round == 2 and run.state.state_hash != start
    assert [s.round for s in announcer.states] == [1, 2]
    assert announcer.states[-1] == run.state.view()
    phases = [e.phase for e in events.of(PhaseChanged)]
    assert phases == ["training", "averaging", "checkpointing"] * 2
    assert [e.round for e in events.of(Committed)] == [1, 2]
    # The checkpoint on disk is the state in memory.
    ckpt = run.state.global_store.load_latest()
    assert ckpt is not None and ckpt.meta["round"] == 2 and ckpt.state_hash == run.state.state_hash


def test_a_node_far_behind_the_run_trains_a_shorter_round(run: OfflineRun) -> None:
    """Committed round 1 long after two others announced it: round 2 is cut by the time we are behind
    (never below a quarter of the inner steps), so we meet the others in round 2's lobby in phase."""
    events = Recorder()
    m, _ = machine(run, Averager(), 1, events)
    full = run.signed.manifest.diloco.inner_steps
    assert m._steps_for(2) == full  # nobody announced round 1: nothing to catch up with
    for peer in ("12D3KooWa", "12D3KooWb"):
        run.book.on_checkpoint(peer, CheckpointAnnounce(1, "ab" * 32, 10, 10))
    m._step_s = 0.5
    reached = run.book.round_reached_at(1)
    assert reached is not None
    m.book._clock = lambda: reached + 10 * full * 0.5
    assert m._steps_for(2) == full  # far behind, but the run meets in one lobby: no catch-up round
    m._expected = lambda r: [f"12D3KooW{i}" for i in range(64)]  # a run of several lobbies
    m.book._clock = lambda: reached
    assert m._steps_for(2) == full  # just announced: we are not behind
    m.book._clock = lambda: reached + 0.5 * full * 0.5  # half a round behind
    assert m._steps_for(2) == full - full // 2
    m.book._clock = lambda: reached + 10 * full * 0.5  # ten rounds behind: the shortest round
    assert m._steps_for(2) == max(1, -(-full // 4))


def test_max_rounds_counts_the_rounds_this_machine_completes(run: OfflineRun) -> None:
    """#16 finding 8: `--max-rounds N` is N rounds completed by this process. A node that resumes at
    round 2 with `--max-rounds 1` trains one more round (it used to compare N with the global round and
    exit at once); `--until-round R` is the global target; a failed round does not count."""
    asyncio.run(machine(run, Averager(), 2, Recorder())[0].run())
    assert run.state.round == 2
    resumed, _ = machine(run, Averager(), 1, Recorder())
    asyncio.run(resumed.run())
    assert run.state.round == 3 and resumed.completed == 1
    for until, rounds_after in ((3, 3), (4, 4)):
        events = Recorder()
        m = RoundMachine(
            run.identity.peer_id, run.run_id, run.signed.manifest,
            (run.book, run.state, run.engine.trainer, Averager(), Announcer()), Alone(run),
            PhaseTracker(events, Phase.LOADING), events, Limits(until_round=until),
        )  # fmt: skip
        asyncio.run(m.run())
        assert run.state.round == rounds_after
    failing, _ = machine(run, Averager(ok=False), 1, Recorder())
    asyncio.run(failing.round())
    assert failing.completed == 0 and not failing.done()
    assert Limits(max_rounds=2).reached(2, 0) and not Limits(max_rounds=2).reached(1, 99)
    assert Limits(until_round=5).reached(0, 5) and not Limits().reached(10**6, 10**6)


def test_a_failed_average_keeps_the_global_weights_and_resets_the_local_copy(run: OfflineRun) -> None:
    events = Recorder()
    m, announcer = machine(run, Averager(ok=False), 1, events)
    before = {k: v.clone() for k, v in run.state.outer_state().items()}
    view = run.state.view()

    async def one_round() -> None:
        await m.round()

    asyncio.run(one_round())
    assert run.state.view() == view and not announcer.states
    after = run.state.outer_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, p in run.engine.model.named_parameters():  # local copy is θ again
        assert torch.equal(p.detach().cpu(), run.engine.outer.global_params[name].cpu()), name
    (averaged,) = events.of(Averaged)
    assert averaged == Averaged(1, False, averaged.seconds, 0, "deadline", 0, 0)
    assert not events.of(Committed)


def test_round_and_hash_change_together_while_a_commit_runs(run: OfflineRun) -> None:
    """Regression: the old `_commit` set the new hash on a worker thread, and the round only later on the
    loop; a membership record signed in between paired the old round with the new hash, and a newcomer
    syncing from it distrusted every honest peer that vouched for it. Here the commit's checkpoint write is
    held open while the loop keeps sampling the view, as the membership refresh would."""
    state = run.state
    old = state.view()
    release = threading.Event()
    writing = threading.Event()
    real_save = state.trainer_store.save

    def slow_save(*args: Any, **kw: Any) -> Any:
        writing.set()
        release.wait(10)
        return real_save(*args, **kw)

    state.trainer_store.save = slow_save  # type: ignore[method-assign]
    seen: set[StateView] = set()

    async def go() -> None:
        delta = {k: torch.full_like(v, 0.01) for k, v in run.engine.outer.global_params.items()}
        me = run.identity.peer_id
        commit = asyncio.create_task(state.commit(1, delta, delta, [me], me, get_payload_codec("none")))
        while not writing.is_set():
            seen.add(state.view())
            await asyncio.sleep(0)
        for _ in range(50):  # the checkpoint is being written: what would a record say now?
            seen.add(state.view())
            await asyncio.sleep(0.001)
        release.set()
        await commit
        await state.flushed()

    asyncio.run(go())
    new = state.view()
    assert new.round == 1 and new.state_hash != old.state_hash
    assert seen <= {old, new}, f"a view paired a round with another round's hash: {seen - {old, new}}"
    assert (run.status.round, run.status.state_hash) == (new.round, new.state_hash)


def test_rejection_counters_never_go_backwards(run: OfflineRun) -> None:
    """Regression: the old membership loop cleared `status.rejected` and copied the gossip service's counters
    over it every refresh, erasing the run's own (bad chunk, round mismatch, …): the Prometheus counter
    `intellect_rejected_messages` went backwards. The status now keeps both and reports their sum."""
    from intellect.node.app.roundlog import EventRecorder

    status = run.status
    sink = EventRecorder(status, run.config.data_dir)
    registry = make_registry(status)

    def scraped() -> dict[str, float]:
        out = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("intellect_rejected_messages_total{"):
                reason = line.split('reason="')[1].split('"')[0]
                out[reason] = float(line.rsplit(" ", 1)[1])
        return out

    run.book.on_checkpoint("12D3KooWbad", CheckpointAnnounce(1, "not-a-hash", 10, 10))  # the book's own
    sink(Rejected(RunReject.STATE_ROUND_MISMATCH))
    sink(GossipCounters({"BAD_SIGNATURE": 2}))
    first = scraped()
    assert first == {"bad_checkpoint_announce": 1.0, "state_round_mismatch": 1.0, "BAD_SIGNATURE": 2.0}
    sink(GossipCounters({"BAD_SIGNATURE": 3, "REPLAY": 1}))  # the next membership refresh
    second = scraped()
    assert all(second[k] >= v for k, v in first.items()), (first, second)
    assert second == {**first, "BAD_SIGNATURE": 3.0, "REPLAY": 1.0}


class Offers:
    """A network that serves one given state (its bytes matched the announced hash, as `fetch_state`
    checks); what the peers hold is up to the test."""

    def __init__(self, run: OfflineRun, snapshot: StateSnapshot) -> None:
        self.shards = run.engine.shards
        self.snapshot = snapshot

    async def refresh_members(self) -> None:
        return None

    async def state(
        self, target: SyncTarget, distrusted: frozenset[str], report: SyncReport
    ) -> StateSnapshot:
        return self.snapshot


@pytest.mark.parametrize("defect", ["renamed tensor", "NaN"])
def test_a_synced_state_the_model_cannot_use_is_refused_and_its_vouchers_distrusted(
    run: OfflineRun, defect: str
) -> None:
    """Regression (#15): a newcomer offered a state with a renamed tensor crashed with an uncaught
    OuterError (and again on restart); one offered an all-NaN state adopted it and trained on NaN."""
    from intellect.node.engine.outer import GLOBAL_PREFIX, STEP_KEY

    tensors = {k: v.clone() for k, v in run.state.outer_state().items()}
    tensors[STEP_KEY] = torch.tensor(5, dtype=torch.int64)
    name = next(k for k in tensors if k.startswith(GLOBAL_PREFIX))
    if defect == "renamed tensor":
        tensors[name + ".renamed"] = tensors.pop(name)
    else:
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    events = Recorder()
    announcer = Announcer()
    parts = (run.book, run.state, run.engine.trainer, Averager(), announcer)
    m = RoundMachine(
        run.identity.peer_id, run.run_id, run.signed.manifest, parts,
        Offers(run, StateSnapshot(5, "ab" * 32, tensors)),
        PhaseTracker(events, Phase.LOADING), events, Limits(max_rounds=1),
    )  # fmt: skip
    before = run.state.view()
    liars = ("12D3KooWLiar1", "12D3KooWLiar2")
    asyncio.run(m.sync(SyncTarget(5, "ab" * 32, 0, 0, liars)))
    assert run.state.view() == before  # nothing adopted
    assert all(torch.isfinite(p).all() for p in run.engine.model.parameters())
    assert set(liars) <= run.book.distrusted
    (failed,) = events.of(SyncFailed)
    assert failed.round == 5 and "unusable state" in failed.reason


# ---- overlapped outer updates (#17) -------------------------------------------------------------------


class Recording(Averager):
    """Averages with nobody (the average is our own Δ), recording each Δ; fails the rounds in `fail` once."""

    def __init__(self, fail: Collection[int] = ()) -> None:
        super().__init__()
        self.fail = set(fail)
        self.sent: list[tuple[int, dict[str, torch.Tensor]]] = []

    async def average(
        self,
        round: int,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        deadline: float,
        overtaken: Callable[[], bool] | None = None,
        expected: Collection[str] | None = None,
        holders: Callable[[], Collection[str]] | None = None,
    ) -> AverageResult:
        await asyncio.sleep(0.05)  # in flight while the next round's first steps run
        self.rounds.append(round)
        if round in self.fail:
            self.fail.discard(round)
            return AverageResult(False, None, [], reason="deadline")
        self.sent.append((round, {k: v.clone() for k, v in tensors.items()}))
        return AverageResult(True, {k: v.clone() for k, v in tensors.items()}, ["solo"])


def overlapped(run: OfflineRun) -> None:
    m = run.signed.manifest
    object.__setattr__(
        run.signed, "manifest", replace(m, diloco=replace(m.diloco, outer_update="overlapped"))
    )


def replay(
    run: OfflineRun, initial: Mapping[str, torch.Tensor], averages: list[dict[str, torch.Tensor]]
) -> str:
    """The global state hash after applying `averages` in order to `initial`, as a sequential node would."""
    d = run.signed.manifest.diloco
    ref = OuterOptimizer({n: initial[GLOBAL_PREFIX + n] for n in run.engine.outer.global_params},
                         lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.nesterov)  # fmt: skip
    for avg in averages:
        ref.step(avg)
    return state_hash(ref.state_dict())


def test_overlapped_rounds_apply_each_completed_average_once_in_order(run: OfflineRun) -> None:
    """Round r's average is in flight while round r + 1 trains; it is committed as round r at the end of
    round r + 1, onto round r − 1's state, and the next round starts from the global weights stepped with
    our own Δ. The committed hashes are those of applying the same averages sequentially; the run stops
    after committing its last round without training another."""
    overlapped(run)
    events = Recorder()
    averager = Recording()
    m, announcer = machine(run, averager, 3, events)
    initial = {k: v.clone() for k, v in run.state.outer_state().items()}
    asyncio.run(m.run())
    assert averager.rounds == [1, 2, 3] and m.inflight is None
    assert [e.round for e in events.of(Trained)] == [1, 2, 3]  # no fourth round trained for nothing
    assert [s.round for s in announcer.states] == [1, 2, 3] and run.state.round == 3
    assert run.state.state_hash == replay(run, initial, [t for _, t in averager.sent])
    commits = events.of(Committed)
    assert [c.round for c in commits] == [1, 2, 3]
    assert commits[0].state_hash == replay(run, initial, [averager.sent[0][1]])
    ckpt = run.state.global_store.load_latest()
    assert ckpt is not None and ckpt.meta["round"] == 3 and ckpt.state_hash == run.state.state_hash


def test_an_overlapped_failed_average_keeps_the_global_weights(run: OfflineRun) -> None:
    """Round 2's average fails while round 3 trains: round 1's state stays (never stepped on round 2's
    failure), round 3's Δ is not averaged onto a state it does not belong to, and the node trains round 2
    again from round 1's weights; the committed states are the sequential replay of what completed."""
    overlapped(run)
    events = Recorder()
    averager = Recording(fail={2})
    m, _ = machine(run, averager, 3, events)
    initial = {k: v.clone() for k, v in run.state.outer_state().items()}
    asyncio.run(m.run())
    assert averager.rounds == [1, 2, 2, 3]  # round 3's first Δ was dropped with the failed round 2
    assert [e.round for e in events.of(Trained)] == [1, 2, 3, 2, 3]
    assert [c.round for c in events.of(Committed)] == [1, 2, 3]
    assert [r for r, _ in averager.sent] == [1, 2, 3]
    assert run.state.state_hash == replay(run, initial, [t for _, t in averager.sent])


def test_overlapped_averages_land_between_chunks_of_the_next_round(run: OfflineRun) -> None:
    """With one inner step per chunk, an average that completes while the next round trains is committed
    there (`overlap.start_landing`, `Committed.mid_round`), not at that round's end; the committed hashes are
    still the sequential replay of the same averages, and the last one (no round after it) at the end."""
    overlapped(run)
    events = Recorder()
    averager = Recording()
    m, _ = machine(run, averager, 3, events)
    m._pacer = Pacer(chunk_s=0.0)  # one step per chunk: a landing point after every step
    initial = {k: v.clone() for k, v in run.state.outer_state().items()}
    asyncio.run(m.run())
    commits = events.of(Committed)
    assert [c.round for c in commits] == [1, 2, 3]
    assert [c.mid_round for c in commits] == [True, True, False], commits
    assert run.state.state_hash == replay(run, initial, [t for _, t in averager.sent])


def test_an_average_landing_mid_round_keeps_the_local_progress(run: OfflineRun) -> None:
    """`overlap.start_landing`: an average committed while the next round's inner steps go on sets
    the global state exactly as a commit at the round's end would (same hash as the sequential replay), and
    the local copy goes on from the new global weights plus the progress made since the round started."""
    state = run.state
    initial = {k: v.clone() for k, v in state.outer_state().items()}
    names = list(state.outer.global_params)
    own = {n: 0.01 * torch.randn_like(state.outer.global_params[n]) for n in names}
    asyncio.run(state.rebase(own))  # the eager start of the next round
    start = {n: p.detach().clone() for n, p in state.model.named_parameters() if n in own}
    with torch.no_grad():  # some inner steps' worth of progress
        for n, p in state.model.named_parameters():
            if n in own:
                p.sub_(0.003 * torch.randn_like(p))
    progress = {n: start[n] - p.detach() for n, p in state.model.named_parameters() if n in own}
    avg = {n: 0.5 * own[n] for n in names}
    none = get_payload_codec("none")
    asyncio.run(state.commit(1, avg, own, ["solo"], run.identity.peer_id, none, (), keep_local=True))
    assert state.round == 1 and state.state_hash == replay(run, initial, [avg])
    for n, p in state.model.named_parameters():
        if n in own:
            expected = state.outer.global_params[n] - progress[n]
            assert torch.allclose(p.detach(), expected.to(p.dtype), atol=1e-6), n
    assert state.round_start is None  # the round's Δ is now taken against the new global weights


def test_the_residual_worked_out_ahead_is_the_one_the_commit_would_work_out(run: OfflineRun) -> None:
    """`overlap.average_ahead` works out what compression lost of our Δ while the next round trains, and
    hands it to the commit (`Lost`): the residual and the committed state are the commit's own, to the bit."""
    state = run.state
    me, other = run.identity.peer_id, "12D3KooWother"
    initial = {k: v.clone() for k, v in state.outer_state().items()}
    names = list(state.outer.global_params)
    sent = {n: 0.01 * torch.randn_like(state.outer.global_params[n]) for n in names}
    avg = {n: 0.5 * sent[n] for n in names}
    int2 = get_payload_codec("int2")
    group = [me, other]

    async def commit(lost: Lost | None) -> None:
        await state.commit(1, avg, sent, group, me, int2, lost=lost)
        await state.flushed()

    asyncio.run(commit(None))
    by_commit, hash_by_commit = state.residual, state.state_hash
    assert by_commit is not None and bool(by_commit.any())  # int2 loses something of every partition

    state.outer.load_state_dict(initial)  # the same commit again, with the residual worked out ahead
    state.residual = None
    lost = lost_to_compression(sent, group, me, int2)
    asyncio.run(commit(lost))
    assert state.residual is not None and torch.equal(state.residual, by_commit)
    assert state.state_hash == hash_by_commit
    assert lost_to_compression(sent, ["a", "b"], me, int2).residual is None  # not a member: nothing owed
    assert lost_to_compression(sent, group, me, get_payload_codec("none")).residual is None


def test_a_landing_steps_the_global_state_while_the_inner_steps_hold_the_model(run: OfflineRun) -> None:
    """A commit that lands mid-round (`keep_local`) while a chunk of inner steps holds `model_idle`: the
    outer step and the hash are done meanwhile, but the local copy, the round and the hash we announce
    change only when the chunk is over, and then as a commit between two chunks would change them."""
    state = run.state
    me = run.identity.peer_id
    initial = {k: v.clone() for k, v in state.outer_state().items()}
    names = list(state.outer.global_params)
    own = {n: 0.01 * torch.randn_like(state.outer.global_params[n]) for n in names}
    avg = {n: 0.5 * own[n] for n in names}
    expected = replay(run, initial, [avg])
    none = get_payload_codec("none")

    async def go() -> None:
        await state.rebase(own)
        local = {n: p.detach().clone() for n, p in state.model.named_parameters() if n in own}
        start = {n: t.clone() for n, t in (state.round_start or {}).items()}
        async with state.model_idle:  # a chunk of inner steps is computing
            commit = asyncio.create_task(state.commit(1, avg, own, [me], me, none, (), keep_local=True))
            for _ in range(1000):  # the outer step goes ahead without the model
                if state_hash(state.outer.state_dict()) == expected:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the outer step waited for the inner steps")
            await asyncio.sleep(0.1)
            assert not commit.done()
            assert state.round == 0 and state.round_start is not None
            for n, p in state.model.named_parameters():
                if n in local:
                    assert torch.equal(p.detach(), local[n]), n
        await asyncio.wait_for(commit, 30)
        assert state.round == 1 and state.state_hash == expected and state.round_start is None
        for n, p in state.model.named_parameters():
            if n in local:
                want = state.outer.global_params[n] - (start[n] - local[n])
                assert torch.allclose(p.detach(), want.to(p.dtype), atol=1e-6), n
        await state.flushed()

    asyncio.run(go())


def test_a_residual_still_owed_is_added_to_not_replaced(run: OfflineRun) -> None:
    """Error feedback across commits. Sequential: the residual went into the Δ being averaged, so its
    commit replaces it with what that average lost. Overlapped: the Δ consumed it, so a commit that lands
    after its round's end owes its loss to the next Δ, and if the next average lands before that Δ is taken,
    both losses are owed: nothing of either is dropped."""
    state = run.state
    me, other = run.identity.peer_id, "12D3KooWother"
    names = list(state.outer.global_params)
    int2, group = get_payload_codec("int2"), [me, other]

    def sent() -> dict[str, torch.Tensor]:
        return {n: 0.01 * torch.randn_like(state.outer.global_params[n]) for n in names}

    def lost(d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        got = lost_to_compression(d, group, me, int2).residual
        assert got is not None
        return got

    async def go() -> None:
        a, b, c = sent(), sent(), sent()
        await state.pseudo_gradient(consume=False)  # sequential: the residual (none yet) goes in the Δ
        await state.commit(1, a, a, group, me, int2)
        assert state.residual is not None and torch.equal(state.residual, lost(a))
        await state.pseudo_gradient(consume=False)  # it went into this Δ: the commit replaces it
        await state.commit(2, b, b, group, me, int2)
        assert state.residual is not None and torch.equal(state.residual, lost(b))

        await state.pseudo_gradient(consume=True)  # overlapped: the Δ takes it with it
        assert state.residual is None
        await state.commit(3, a, a, group, me, int2)  # landed after the round's end
        await state.commit(4, c, c, group, me, int2)  # the next one, before the next Δ is taken
        assert state.residual is not None and torch.equal(state.residual, lost(a) + lost(c))
        await state.flushed()

    asyncio.run(go())
