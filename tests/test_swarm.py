"""Real daemons on loopback training together (`@pytest.mark.swarm`).

One scenario, bounded end to end: three `intellect-node start` processes train the tiny run; after two
rounds one is SIGKILLed mid-round and the survivors carry on; a fresh peer started mid-run syncs the state
and then trains and averages with them; once the survivors have finished, the killed peer, restarted on
its data directory, resumes from its own checkpoint and syncs the final state from the newcomer; the
global-state hashes agree after every round, the loss falls, the newcomer stops on SIGINT within 30 s, and
no process of any peer is left behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from intellect.node.app.body import load_run_manifest
from intellect.node.cli.swarm import Peer, Swarm, group_pids, run_swarm

pytestmark = pytest.mark.swarm


def fast_manifest(tmp_path: Path, inner_steps: int = 10) -> Path:
    """The example tiny run with fewer inner steps and a group as large as the swarm (CI speed)."""
    text = (Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml").read_text()
    text = re.sub(r"(?m)^inner_steps = \d+", f"inner_steps = {inner_steps}", text)
    text = re.sub(r"(?m)^group_size = \d+", "group_size = 3", text)
    text = re.sub(r"(?m)^matchmaking_s = [\d.]+", "matchmaking_s = 3.0", text)
    text = re.sub(r"(?m)^round_deadline_s = [\d.]+", "round_deadline_s = 60.0", text)
    path = tmp_path / "fast-run.toml"
    path.write_text(text)
    load_run_manifest(path)  # still a valid manifest
    return path


async def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, peers: list[Peer]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tails = {p.name: p.log_path.read_text()[-2000:] for p in peers}
            raise AssertionError(f"timed out waiting for {what}; logs: {json.dumps(tails, indent=1)}")
        for p in peers:
            if p.proc.poll() is not None and not p.killed and p.last_round() == 0:
                raise AssertionError(f"{p.name} exited early: {p.log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.5)


@pytest.mark.timeout(600)
async def test_swarm_trains_survives_a_kill_and_admits_a_newcomer(tmp_path: Path) -> None:
    rounds = 6
    manifest = fast_manifest(tmp_path)
    async with asyncio.timeout(540), Swarm(tmp_path / "swarm", manifest_path=manifest) as swarm:
        await swarm.seed()
        peers = [swarm.launch(f"peer{i}", until_round=rounds, min_peers=3) for i in range(3)]
        await wait_until(lambda: all(p.last_round() >= 2 for p in peers), 240, "round 2 on all peers", peers)

        # SIGKILL one peer mid-round (it is training round 3 now); nothing of it can clean up.
        victim = peers[2]
        victim_children = [pid for pid in group_pids(victim.pgid) if pid != victim.pid]
        swarm.kill(victim)
        survivors = peers[:2]
        newcomer = swarm.launch("newcomer", until_round=None)
        everyone = [*peers, newcomer]

        for p in survivors:
            code = await swarm.wait(p, 300)
            assert code == 0, f"{p.name} exited with {code}: {p.log_path.read_text()[-3000:]}"
            assert group_pids(p.pgid) == [], f"{p.name} left a child process behind"
        await wait_until(
            lambda: newcomer.last_round() >= rounds, 60, "the newcomer to reach the last round", everyone
        )

        # The killed peer's orphans (its p2p daemon) are reaped by PID. Restarted on the same
        # data directory, it resumes from its own checkpoint (round 2), learns from the DHT and gossip that
        # the run is at round 6, and syncs that state from the newcomer (the only one still online).
        assert set(swarm.reap(victim)) <= set(victim_children)
        await asyncio.sleep(0.5)
        assert group_pids(victim.pgid) == [], "the killed peer's children survived the reaping"
        restarted = swarm.launch(victim.name, until_round=rounds)
        everyone.append(restarted)
        code = await swarm.wait(restarted, 150)
        restart_log = restarted.log_path.read_text()
        assert code == 0, f"the restarted peer exited with {code}: {restart_log[-3000:]}"
        assert "resumed from our checkpoint of round 2" in restart_log, restart_log[-3000:]
        assert restarted.last_round() == rounds and restarted.rounds()[-1]["synced"]

        # The newcomer is now training alone: SIGINT must stop it cleanly within 30 s, leaving nothing.
        t0 = time.monotonic()
        newcomer.proc.send_signal(signal.SIGINT)
        code = await swarm.wait(newcomer, 30)
        assert code == 0, newcomer.log_path.read_text()[-3000:]
        assert time.monotonic() - t0 < 30
        assert group_pids(newcomer.pgid) == [], "the newcomer left a child process behind"

        await asyncio.sleep(0.5)
        assert all(group_pids(p.pgid) == [] for p in everyone)
        assert victim_children, "the victim should have had child processes"

        summary = swarm.summary(rounds)
        by_round = {e["round"]: e["peers"] for e in summary["rounds"]}
        for r in range(1, rounds + 1):
            entries = by_round[r]
            hashes = {e["state_hash"] for e in entries.values()}
            assert len(hashes) == 1, f"round {r}: state hashes differ: {entries}"
            for p in survivors:
                assert p.peer_id in entries, f"round {r}: {p.name} did not report"
        # The newcomer synced, then trained and averaged in at least one round, agreeing with the others.
        newcomer_rounds = [e for e in newcomer.rounds() if 1 <= e["round"] <= rounds]
        assert any(e["synced"] for e in newcomer_rounds)
        trained = [e for e in newcomer_rounds if not e["synced"]]
        assert trained and all(e["group_size"] >= 2 for e in trained)

        def mean_loss(r: int) -> float:
            vals = [e["loss"] for e in by_round[r].values() if e["loss"] is not None]
            return sum(vals) / len(vals)

        assert mean_loss(rounds) < mean_loss(1) - 0.5, [mean_loss(r) for r in range(1, rounds + 1)]


async def test_run_swarm_summary(tmp_path: Path) -> None:
    """What `intellect-node swarm` runs: exit 0 and a summary in the agreed schema, identical hashes."""
    manifest = fast_manifest(tmp_path, inner_steps=5)
    out = tmp_path / "summary.json"
    code, summary = await asyncio.wait_for(
        run_swarm(2, 2, out, tmp_path / "work", manifest, timeout_s=240), 300
    )
    assert code == 0, summary["problems"]
    on_disk = json.loads(out.read_text())
    assert on_disk["run_id"] == summary["run_id"] and len(on_disk["run_id"]) == 64
    assert [e["round"] for e in on_disk["rounds"]] == [1, 2]
    for entry in on_disk["rounds"]:
        assert len(entry["peers"]) == 2
        assert len({p["state_hash"] for p in entry["peers"].values()}) == 1
        for p in entry["peers"].values():
            assert isinstance(p["loss"], float) and p["bytes_sent"] > 0
    assert all(p["exit_code"] == 0 for p in on_disk["peers"].values())


@pytest.mark.timeout(420)
async def test_a_node_with_two_local_ranks_averages_with_a_single_rank_node(tmp_path: Path) -> None:
    """`--local-ranks 2`: the node trains with two torch.distributed ranks (gloo processes) on halves of
    the batch, averages with an ordinary node, and both hold the same state after every round. SIGINT
    while it trains on stops it, its worker rank included, within 30 s."""
    rounds = 3
    manifest = fast_manifest(tmp_path, inner_steps=5)
    async with asyncio.timeout(360), Swarm(tmp_path / "swarm", manifest_path=manifest) as swarm:
        await swarm.seed()
        duo = swarm.launch("duo", min_peers=2, extra_args=["--local-ranks", "2"])
        solo = swarm.launch("solo", until_round=rounds, min_peers=2)
        code = await swarm.wait(solo, 300)
        assert code == 0, f"solo exited with {code}: {solo.log_path.read_text()[-3000:]}"
        await wait_until(lambda: duo.last_round() >= rounds, 60, "duo to finish round 3", [duo, solo])
        assert len(group_pids(duo.pgid)) >= 3  # the daemon, its p2p daemon and worker rank
        t0 = time.monotonic()
        duo.proc.send_signal(signal.SIGINT)  # it trains on alone: the signal lands in or between steps
        code = await swarm.wait(duo, 30)
        assert code == 0 and time.monotonic() - t0 < 30, duo.log_path.read_text()[-3000:]
        await asyncio.sleep(0.5)
        assert group_pids(duo.pgid) == [] and group_pids(solo.pgid) == []
        assert "training with 2 local ranks (gloo)" in duo.log_path.read_text()
        by_round = {e["round"]: e["peers"] for e in swarm.summary(rounds)["rounds"]}
        for r in range(1, rounds + 1):
            entries = by_round[r]
            assert {duo.peer_id, solo.peer_id} <= set(entries), f"round {r}: {entries}"
            assert len({e["state_hash"] for e in entries.values()}) == 1, f"round {r}: {entries}"
        averaged = [e for e in duo.rounds() if 1 <= e["round"] <= rounds and not e["synced"]]
        assert any(e["group_size"] == 2 for e in averaged), duo.rounds()


@pytest.mark.timeout(420)
async def test_a_run_pinned_to_pretrained_weights_starts_from_them(tmp_path: Path) -> None:
    """The researcher's flow for `init.sha256`: `data init-state --weights` packs pretrained weights and
    prints the [init] table, the manifest pins it, and peers given the file start from those weights and
    agree every round. A peer that joins later without the file syncs a later round instead."""
    import shutil

    import torch
    from click.testing import CliRunner
    from intellect.node.cli.main import cli
    from intellect.node.engine.model import Llama, ModelConfig

    rounds = 10  # enough that the late peer joins while the others still train, even on a loaded CI
    manifest = fast_manifest(tmp_path, inner_steps=5)
    cfg = ModelConfig.from_dict(load_run_manifest(manifest).model.to_dict())
    torch.save(Llama(cfg, seed=99).state_dict(), tmp_path / "pretrained.pt")
    packed = tmp_path / "init.safetensors"
    args = [
        "data",
        "init-state",
        str(manifest),
        "--weights",
        str(tmp_path / "pretrained.pt"),
        "--out",
        str(packed),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    found = re.search(r'^sha256 = "([0-9a-f]{64})"$', result.output, re.MULTILINE)
    assert found, result.output
    sha = found.group(1)
    manifest.write_text(manifest.read_text().replace("[init]\n", f'[init]\nsha256 = "{sha}"\n'))
    assert load_run_manifest(manifest).init.sha256 == sha

    async with asyncio.timeout(360), Swarm(tmp_path / "swarm", manifest_path=manifest) as swarm:
        await swarm.seed()
        for name in ("a", "b"):
            dest = swarm.workdir / name / "init" / f"{sha}.safetensors"
            dest.parent.mkdir(parents=True)
            shutil.copy(packed, dest)
        a = swarm.launch("a", until_round=rounds, min_peers=2)
        b = swarm.launch("b", until_round=rounds, min_peers=2)
        await wait_until(lambda: min(a.last_round(), b.last_round()) >= 1, 120, "round 1", [a, b])
        late = swarm.launch("late", until_round=rounds)
        for p in (a, b, late):
            code = await swarm.wait(p, 240)
            assert code == 0, f"{p.name} exited with {code}: {p.log_path.read_text()[-3000:]}"
        for p in (a, b):
            assert f"loaded the run's initial state {sha[:12]}" in p.log_path.read_text()
        late_log = late.log_path.read_text()
        assert "does not exist" in late_log and "synced state of round" in late_log, late_log[-3000:]
        by_round = {e["round"]: e["peers"] for e in swarm.summary(rounds)["rounds"]}
        for r in range(1, rounds + 1):
            assert len({e["state_hash"] for e in by_round[r].values()}) == 1, f"round {r}: {by_round[r]}"
