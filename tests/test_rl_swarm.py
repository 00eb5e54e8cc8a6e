"""RL runs with real daemons on loopback (`@pytest.mark.swarm`): trainers and rollout workers as separate
`intellect-node start` processes, from a supervised warm start.

- `intellect-node swarm --rl`'s code path end to end: both workers' batches accepted, one state hash per
  round on both trainers, a reward per policy version, the final state's held-out accuracy measured.
- Three cheating workers (the real daemon with its batch replaced, tests/rl_cheater.py) beside an honest
  one: fabricated rewards, sampling from another model, and old completions re-signed under new seqs are
  each refused with evidence within a few batches, and both trainers exclude all three (one of them on
  the other's gossiped evidence, which it re-checks); the honest worker is never excluded. A fourth
  worker that never follows the policy past its first version has its batches refused as stale once
  the run is more than `max_async_level` versions ahead, without being excluded.
- SIGKILL of a rollout worker and of a trainer in the middle of its GRPO steps: the killed trainer's
  checkpoint verifies and holds a committed state of the run; restarted, it resumes from it and the two
  trainers go on with one hash per round.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from intellect.node.app.export import latest_checkpoint
from intellect.node.cli.rlswarm import RL_MANIFEST, run_rl_swarm, warm_start
from intellect.node.cli.rlswarm import read_jsonl as jsonl
from intellect.node.cli.swarm import Peer, Swarm, group_pids

pytestmark = pytest.mark.swarm

CHEATER = Path(__file__).resolve().parent / "rl_cheater.py"


async def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, peers: list[Peer]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tails = {p.name: p.log_path.read_text()[-1500:] for p in peers}
            raise AssertionError(f"timed out waiting for {what}; logs: {json.dumps(tails, indent=1)}")
        for p in peers:
            if p.proc.poll() is not None and not p.killed and p.role == "rollout":
                raise AssertionError(f"{p.name} exited: {p.log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.5)


def hashes_by_round(trainers: list[Peer]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for p in trainers:
        for entry in p.rounds():
            out.setdefault(entry["round"], set()).add(entry["state_hash"])
    return out


def excluded(p: Peer) -> set[str]:
    steps = jsonl(p.data_dir / "rl.jsonl")
    return set(steps[-1]["excluded"]) if steps else set()


async def start_rl(swarm: Swarm, tmp_path: Path, trainers: int, text: str | None = None) -> list[Peer]:
    """Warm start, seed, and launch the trainers (each given the initial state file)."""
    path = None
    if text is not None:
        path = tmp_path / "rl.toml"
        path.write_text(text)
    manifest, init_file, _ = await asyncio.to_thread(warm_start, tmp_path, 150, 50, path)
    await swarm.seed(manifest)
    out = []
    for i in range(trainers):
        init_dir = swarm.workdir / f"trainer{i}" / "init"
        init_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(init_file, init_dir / init_file.name)
        out.append(swarm.launch(f"trainer{i}", min_peers=trainers))
    return out


@pytest.mark.timeout(420)
async def test_rl_swarm_trains_with_trainers_and_rollout_workers(tmp_path: Path) -> None:
    async with asyncio.timeout(400):
        code, summary = await run_rl_swarm(2, 2, 4, tmp_path / "summary.json", tmp_path / "w", timeout_s=300)
    assert code == 0, summary["problems"]
    rounds = {r["round"]: {p["state_hash"] for p in r["peers"].values()} for r in summary["rounds"]}
    assert set(rounds) >= {1, 2, 3, 4} and all(len(h) == 1 for h in rounds.values())
    rl = summary["rl"]
    for name, w in rl["workers"].items():
        assert w["outcomes"].get("accepted", 0) > 0, name
        assert set(w["outcomes"]) <= {"accepted", "refused", "dropped-stale"}, w
    assert [c["version"] for c in rl["reward_curve"]][:4] == [0, 1, 2, 3]
    assert all(t["excluded"] == [] for t in rl["trainers"].values())
    assert 0.0 <= rl["final"]["accuracy_sampled"] <= 1.0 and rl["final"]["round"] == 4


@pytest.mark.timeout(600)
async def test_cheating_rollout_workers_are_caught_and_excluded_by_every_trainer(tmp_path: Path) -> None:
    # Half the batches get their log-probs recomputed, so the other-model cheat is caught in a few.
    text = re.sub(r"(?m)^verify_rate = .*$", "verify_rate = 0.5", RL_MANIFEST.read_text())
    async with asyncio.timeout(560), Swarm(tmp_path / "swarm") as swarm:
        trainers = await start_rl(swarm, tmp_path, 2, text)
        honest = swarm.launch("honest", role="rollout")
        cheats = {
            c: swarm.launch(c, role="rollout", command=[sys.executable, str(CHEATER), c, "start"])
            for c in ("fabricate", "other-model", "replay")
        }
        stale = swarm.launch(
            "stale", role="rollout", command=[sys.executable, str(CHEATER), "stale", "start"]
        )
        peers = [*trainers, honest, *cheats.values(), stale]
        cheaters = {p.peer_id for p in cheats.values()}
        await wait_until(
            lambda: all(excluded(t) >= cheaters for t in trainers), 420, "every cheater excluded", peers
        )
        # The run must get more than max_async_level (2) versions past the stale worker's.
        await wait_until(lambda: all(t.last_round() >= 4 for t in trainers), 240, "round 4", peers)
        await wait_until(
            lambda: any(b["reason"] == "stale" for b in jsonl(stale.data_dir / "rollouts.jsonl")),
            120,
            "a stale batch refused",
            peers,
        )
        await swarm.stop_all()
    for t in trainers:
        assert honest.peer_id not in excluded(t)
    evidence = {
        "fabricate": "fabricated-reward",
        "other-model": "logprob-mismatch",
        "replay": "wrong-prompts",
    }
    for cheat, p in cheats.items():
        batches = jsonl(p.data_dir / "rollouts.jsonl")
        caught = [i for i, b in enumerate(batches) if b["reason"] == evidence[cheat]]
        assert caught, (cheat, batches[:5])
        assert caught[0] < 10, (cheat, caught[0])  # within a few batches
        later = [b for b in batches[caught[0] + 1 :] if b["outcome"] != "dropped-stale"]
        assert all(b["outcome"] == "refused" for b in later), cheat  # never accepted again
    # Batches of a version more than max_async_level behind are refused (no evidence: the worker may just
    # be slow), the ones before were accepted, and the worker is not excluded.
    stale_batches = jsonl(stale.data_dir / "rollouts.jsonl")
    assert {b["version"] for b in stale_batches} == {stale_batches[0]["version"]}
    assert any(b["outcome"] == "accepted" for b in stale_batches)
    assert {b["reason"] for b in stale_batches} <= {"", "stale"}
    assert all(stale.peer_id not in excluded(t) for t in trainers)
    # The honest worker: accepted, or refused only for reasons that are no evidence (a trainer that has not
    # yet committed or synced the version it sampled with).
    honest_batches = jsonl(honest.data_dir / "rollouts.jsonl")
    assert any(b["outcome"] == "accepted" for b in honest_batches)
    assert {b["reason"] for b in honest_batches} <= {"", "stale", "unknown-policy"}
    for p in swarm.peers:
        assert not group_pids(p.pgid), p.name
    by_round = hashes_by_round(trainers)
    assert all(len(h) == 1 for h in by_round.values()), by_round


@pytest.mark.timeout(600)
async def test_killing_a_worker_and_a_trainer_mid_step_loses_no_committed_state(tmp_path: Path) -> None:
    async with asyncio.timeout(560), Swarm(tmp_path / "swarm") as swarm:
        trainers = await start_rl(swarm, tmp_path, 2)
        workers = [swarm.launch(f"rollout{k}", role="rollout") for k in range(2)]
        peers = [*trainers, *workers]
        await wait_until(lambda: all(t.last_round() >= 2 for t in trainers), 240, "round 2", peers)
        # A worker, at any moment of its loop (it is always generating or sending).
        swarm.kill(workers[1])
        # A trainer in the middle of a round's GRPO steps: after at least one step of the round.
        victim = trainers[1]
        steps_per_round = 4

        def mid_round() -> bool:
            steps = jsonl(victim.data_dir / "rl.jsonl")
            return bool(steps) and steps[-1]["step"] % steps_per_round != 0

        await wait_until(mid_round, 120, "trainer1 in the middle of a round", peers)
        swarm.kill(victim)
        await swarm.wait(victim, 10)
        swarm.reap(workers[1])
        swarm.reap(victim)
        # Its newest checkpoint verifies and is a state the run committed (the survivor holds the same).
        held = latest_checkpoint(victim.data_dir, swarm.run_id)
        assert held.round is not None and held.round >= 2
        survivor = {e["round"]: e["state_hash"] for e in trainers[0].rounds()}
        assert survivor[held.round] == held.state_hash
        # Restarted on its data directory, it resumes from that checkpoint and the run goes on.
        back = swarm.launch("trainer1", min_peers=2)
        target = held.round + 3
        await wait_until(
            lambda: trainers[0].last_round() >= target and back.last_round() >= target,
            300,
            "3 more rounds",
            peers,
        )
        log = back.log_path.read_text()
        assert f"resumed from our checkpoint of round {held.round}" in log
        await swarm.stop_all()
    by_round = hashes_by_round([trainers[0], back])
    assert all(len(h) == 1 for h in by_round.values()), by_round
    survivor_rounds = sorted(e["round"] for e in trainers[0].rounds())
    assert survivor_rounds == list(range(1, survivor_rounds[-1] + 1))  # no committed round lost or redone
    for p in swarm.peers:
        assert not group_pids(p.pgid), p.name
