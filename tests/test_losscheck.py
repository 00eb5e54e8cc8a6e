"""The loss check before adopting a synced state (issue #15): the real engine, global state, peer book and
round machine measure a candidate's held-out loss; only the network is a stand-in that serves one state.

A peer trains two honest rounds of the tiny run (20 inner steps each, to keep the test short); a newcomer
is then offered that peer's states and garbled ones, as if most of its peers vouched for them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from intellect.node.app.body import load_run_manifest
from intellect.node.app.config import NodeConfig
from intellect.node.engine.data import ShardResolver, builtin_heldout
from intellect.node.engine.initstate import init_state_path, write_init_state
from intellect.node.engine.losscheck import (
    LOSS_FACTOR,
    MAX_SOFT_REFUSALS,
    LossCheck,
    LossCheckError,
    check_batches,
    check_source,
    round0_writer,
)
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.outer import GLOBAL_PREFIX, STEP_KEY, OuterOptimizer
from intellect.node.engine.tokenizer import load_tokenizer
from intellect.node.net.statesync import StateSnapshot
from intellect.node.run.events import Recorder, SyncFailed
from intellect.node.run.machine import Limits, Network, RoundMachine
from intellect.node.run.phase import Phase, PhaseTracker
from intellect.protocol.manifest import Manifest
from intellect.protocol.vouching import SyncTarget
from test_round_machine import Alone, Announcer, Averager, Offers

if TYPE_CHECKING:
    from conftest import MakeOfflineRun, OfflineRun

Tensors = dict[str, torch.Tensor]
VOUCHERS = ("12D3KooWVoucher1", "12D3KooWVoucher2", "12D3KooWVoucher3")


def _manifest() -> Manifest:
    m = load_run_manifest()
    return dataclasses.replace(m, diloco=dataclasses.replace(m.diloco, inner_steps=20))


def _node(offline_run: MakeOfflineRun, where: Path, manifest: Manifest) -> OfflineRun:
    return offline_run(NodeConfig(data_dir=where, listen=("/ip4/127.0.0.1/tcp/0",)), manifest)


def _machine(run: OfflineRun, net: Network, events: Recorder, rounds: int = 1) -> RoundMachine:
    parts = (run.book, run.state, run.engine.trainer, Averager(), Announcer())
    phases = PhaseTracker(events, Phase.LOADING)
    limits = Limits(until_round=rounds)
    return RoundMachine(
        run.identity.peer_id, run.run_id, run.signed.manifest, parts, net, phases, events, limits
    )


def _clone(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: v.detach().clone() for k, v in tensors.items()}


_HONEST: list[Tensors] = []


@pytest.fixture
def honest(
    offline_run: MakeOfflineRun, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Manifest, list[Tensors]]:
    """The states of rounds 1 and 2 of a peer that trained alone (its own Δ is the average); trained once
    for the whole module."""
    manifest = _manifest()
    if not _HONEST:
        peer = _node(offline_run, tmp_path_factory.mktemp("peer"), manifest)
        for _ in range(2):
            asyncio.run(_machine(peer, Alone(peer), Recorder()).round())
            _HONEST.append(_clone(peer.state.outer_state()))
    return manifest, list(_HONEST)


def _offer(run: OfflineRun, state: Tensors, events: Recorder) -> None:
    round_ = int(state[STEP_KEY])
    snap = StateSnapshot(round_, "cd" * 32, state)
    asyncio.run(_machine(run, Offers(run, snap), events).sync(SyncTarget(round_, "cd" * 32, 0, 0, VOUCHERS)))


def _garbled(state: Tensors, how: str) -> Tensors:
    out = _clone(state)
    if how == "scaled x1000":
        for k in out:
            if k.startswith(GLOBAL_PREFIX):
                out[k] = out[k] * 1000
    else:  # "noise": a freshly drawn init (another seed), finite and of the right scale, at round 2
        noise = Llama(ModelConfig.from_dict(_manifest().model.to_dict()), seed=999)
        for n, p in noise.named_parameters():
            out[GLOBAL_PREFIX + n] = p.detach().clone()
    return out


def test_an_honest_trained_state_is_adopted_and_the_next_one_too(
    honest: tuple[Manifest, list[Tensors]], offline_run: MakeOfflineRun, tmp_path: Path
) -> None:
    manifest, (round1, round2) = honest
    run = _node(offline_run, tmp_path / "newcomer", manifest)
    events = Recorder()
    _offer(run, round1, events)  # against round 0 (ours = the run's init)
    assert run.state.round == 1 and not events.of(SyncFailed)
    _offer(run, round2, events)  # against our round-1 state: the tighter reference
    assert run.state.round == 2 and not events.of(SyncFailed)
    for name, p in run.engine.model.named_parameters():
        assert torch.equal(p.detach(), round2[GLOBAL_PREFIX + name]), name
    assert not run.book.distrusted


@pytest.mark.parametrize(("how", "at_round"), [("scaled x1000", 0), ("scaled x1000", 1), ("noise", 1)])
def test_a_garbled_state_is_refused_its_vouchers_distrusted_and_the_node_trains_on(
    honest: tuple[Manifest, list[Tensors]],
    offline_run: MakeOfflineRun,
    tmp_path: Path,
    how: str,
    at_round: int,
) -> None:
    """(a) of the issue: finite, well-formed, announced by most peers, but not a trained state of the run.
    A newcomer (round 0) refuses the scaled one against the run's initial state; a node holding round 1
    refuses noise too (its loss is about the init's, far above the trained state the node holds)."""
    manifest, (round1, round2) = honest
    run = _node(offline_run, tmp_path / "node", manifest)
    if at_round:
        _offer(run, round1, Recorder())
        assert run.state.round == 1
    bad = _garbled(round2, how)  # (building it draws from the global RNG: before we look at it)
    before = run.state.view()
    own = _clone(run.state.outer_state())
    trainer = run.engine.trainer.trainer
    rng, cursor, step = torch.get_rng_state(), trainer.stream.cursor, trainer.step

    events = Recorder()
    _offer(run, bad, events)

    (failed,) = events.of(SyncFailed)
    assert failed.round == 2 and "fails the loss check" in failed.reason, failed.reason
    assert set(VOUCHERS) <= run.book.distrusted
    assert run.status.rejected["failed_loss_check"] == 1
    # Nothing changed: state, model, RNG, data position, inner step.
    assert run.state.view() == before
    assert all(torch.equal(own[k], v) for k, v in run.state.outer_state().items())
    for name, p in run.engine.model.named_parameters():
        assert torch.equal(p.detach(), own[GLOBAL_PREFIX + name]), name
    assert torch.equal(torch.get_rng_state(), rng)
    assert (trainer.stream.cursor, trainer.step) == (cursor, step)
    # The node keeps running: nothing else on offer (the vouchers no longer count), it trains a round.
    asyncio.run(_machine(run, Alone(run), events, rounds=before.round + 1).run())
    assert run.state.round == before.round + 1


def test_the_verdict_compares_against_the_lower_of_our_state_and_round_0(
    honest: tuple[Manifest, list[Tensors]], offline_run: MakeOfflineRun, tmp_path: Path
) -> None:
    manifest, (round1, round2) = honest
    run = _node(offline_run, tmp_path / "node", manifest)
    check = run.state.loss_check
    assert isinstance(check, LossCheck) and check.factor == LOSS_FACTOR
    trainer = run.engine.trainer.trainer
    own = run.engine.outer.global_params

    def weights(state: Tensors) -> Tensors:
        return {k[len(GLOBAL_PREFIX) :]: v for k, v in state.items() if k.startswith(GLOBAL_PREFIX)}

    v = check.judge(trainer, weights(round2), own, own_is_init=True)
    assert v.own == v.init == v.reference  # a newcomer: our state is round 0
    assert v.passed and v.candidate < v.init
    # A node past round 0 rebuilds round 0 from the manifest (seeded init) for its first check.
    fresh = LossCheck(check.batches, check.round0)
    w = fresh.judge(trainer, weights(round2), weights(round1), own_is_init=False)
    assert w.init == pytest.approx(v.init, rel=1e-5) and w.reference == w.own < w.init
    assert w.passed and w.candidate < w.own
    for name, p in run.engine.model.named_parameters():  # the model holds `own` again
        assert torch.equal(p.detach(), weights(round1)[name]), name


def test_a_trained_state_only_worse_than_ours_is_refused_a_few_times_then_adopted(
    honest: tuple[Manifest, list[Tensors]], offline_run: MakeOfflineRun, tmp_path: Path
) -> None:
    """What cut a member off from its run in CI: the run's next state was 1.118× our loss (the outer step
    can do that for a round), the check refused it and distrusted the run's honest members for good. A
    trained state worse than ours (closer to our loss than to round 0's) is now refused
    `MAX_SOFT_REFUSALS` times in a row (soft: its vouchers stay trusted), then adopted; garbage is refused
    every time. With margin 1.0, round 1's state offered to a node holding round 2 is such a state."""
    manifest, (round1, round2) = honest
    run = _node(offline_run, tmp_path / "node", manifest)
    base = run.state.loss_check
    assert isinstance(base, LossCheck)
    check = LossCheck(base.batches, base.round0, factor=1.0)
    trainer = run.engine.trainer.trainer

    def weights(state: Tensors) -> Tensors:
        return {k[len(GLOBAL_PREFIX) :]: v for k, v in state.items() if k.startswith(GLOBAL_PREFIX)}

    older, ours = weights(round1), weights(round2)
    for _ in range(MAX_SOFT_REFUSALS):
        with pytest.raises(LossCheckError) as refused:
            check.judge(trainer, older, ours, own_is_init=False)
        v = refused.value.verdict
        assert refused.value.soft and v.trained and not v.passed and v.own < v.candidate < v.init
    adopted = check.judge(trainer, older, ours, own_is_init=False)
    assert adopted.trained and not adopted.passed and check.soft_refusals == 0
    noise = weights(_garbled(round2, "noise"))
    for _ in range(MAX_SOFT_REFUSALS + 2):
        with pytest.raises(LossCheckError) as refused:
            check.judge(trainer, noise, ours, own_is_init=False)
        assert not refused.value.soft and not refused.value.verdict.trained


def test_held_out_batches_are_fixed_evenly_spaced_windows_of_the_heldout_split() -> None:
    m = load_run_manifest()
    tok = load_tokenizer("byte", m.tokenizer.sha256)
    resolver = ShardResolver(tok)
    (source,) = check_source(resolver, m.shards)  # a built-in run: the tail no peer trains on
    assert np.array_equal(source, resolver.load(builtin_heldout(tok)))
    batches = check_batches([source], 8, 128)
    assert [tuple(b.shape) for b in batches] == [(8, 129)] * 4
    again = check_batches([np.array(source)], 8, 128)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    first, last = batches[0][0], batches[-1][-1]
    windows = (len(source) - 1) // 128
    assert torch.equal(first, torch.from_numpy(source[:129].astype(np.int64)))
    at = (windows - 1) * 128
    assert torch.equal(last, torch.from_numpy(source[at : at + 129].astype(np.int64)))
    # A run on its own shards: windows evenly spaced over all of them (9 + 4 windows of 100 tokens here).
    shards = [np.arange(1000), np.arange(5000, 5500)]
    a, b = check_batches(shards, 4, 100, n_batches=2)
    starts = [int(row[0]) for row in torch.cat([a, b])]
    assert starts == [0, 200, 300, 500, 700, 5000, 5100, 5300]
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 101)) for row in torch.cat([a, b]))
    assert len(check_batches(shards, 8, 100)) == 2  # all 13 windows: batches of 8 and 5
    assert check_batches([np.arange(50)], 8, 100) == []


def test_round_0_is_rebuilt_from_the_pinned_file_else_from_the_seed(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict(load_run_manifest().model.to_dict())
    pretrained = Llama(cfg, seed=1234)
    outer = OuterOptimizer.from_model(pretrained)
    sha = write_init_state(outer, init_state_path(tmp_path, "x"))
    init_state_path(tmp_path, "x").rename(init_state_path(tmp_path, sha))
    model, seeded = Llama(cfg, seed=5), Llama(cfg, seed=0)
    rng = torch.get_rng_state()  # (building a Llama draws from it; the writers must not)
    round0_writer(0, tmp_path, sha)(model)
    assert all(torch.equal(p, pretrained.get_parameter(n)) for n, p in model.named_parameters())
    round0_writer(0, tmp_path, "ab" * 32)(model)  # the pinned file is missing: the seeded init stands in
    assert all(torch.equal(p, seeded.get_parameter(n)) for n, p in model.named_parameters())
    round0_writer(0, tmp_path, "")(model)
    assert all(torch.equal(p, seeded.get_parameter(n)) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
