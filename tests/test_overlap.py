"""Overlapped outer updates with real daemons on loopback (#17, `@pytest.mark.swarm`).

Three `intellect-node start` processes train the tiny run with `diloco.outer_update = "overlapped"`: each
round's average is in flight while the next round trains. After round 2 one is SIGKILLed (its average of
round 3 is in flight then: it committed round 2 at the end of training round 3 and started that average
at once); a newcomer started then syncs the state and, in phase with the others, trains, averages and
commits. Every round's state hash agrees across every peer that reports it: the survivors never applied
a partial step, and the newcomer's commits are the others'. (Whether an average lands while the next round's
inner steps go on, `overlap.start_landing`, or at its end depends on timing here: the hashes
must agree either way. The landing itself is tested in test_round_machine.py.)
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from intellect.node.app.body import load_run_manifest
from intellect.node.cli.swarm import Swarm, group_pids
from test_swarm import fast_manifest, wait_until

pytestmark = pytest.mark.swarm


def overlapped_manifest(tmp_path: Path) -> Path:
    path = fast_manifest(tmp_path)
    text = re.sub(r"(?m)^(inner_steps = \d+)$", r'\1\nouter_update = "overlapped"', path.read_text(), count=1)
    path.write_text(text)
    assert load_run_manifest(path).diloco.outer_update == "overlapped"
    return path


@pytest.mark.timeout(600)
async def test_overlapped_swarm_agrees_survives_a_kill_in_flight_and_admits_a_newcomer(
    tmp_path: Path,
) -> None:
    rounds = 14  # rounds take about 4 s here; a newcomer needs a few of them to start up
    manifest = overlapped_manifest(tmp_path)
    async with asyncio.timeout(540), Swarm(tmp_path / "swarm", manifest_path=manifest) as swarm:
        await swarm.seed()
        peers = [swarm.launch(f"peer{i}", until_round=rounds, min_peers=3) for i in range(3)]
        await wait_until(lambda: all(p.last_round() >= 2 for p in peers), 300, "round 2 on all peers", peers)

        victim = peers[2]
        swarm.kill(victim)  # its average of round 3 is in flight
        survivors = peers[:2]
        newcomer = swarm.launch("newcomer", until_round=rounds)
        everyone = [*peers, newcomer]
        for p in [*survivors, newcomer]:
            code = await swarm.wait(p, 360)
            assert code == 0, f"{p.name} exited with {code}: {p.log_path.read_text()[-3000:]}"
            assert group_pids(p.pgid) == [], f"{p.name} left a child process behind"
        swarm.reap(victim)

        summary = swarm.summary(rounds)
        by_round = {e["round"]: e["peers"] for e in summary["rounds"]}
        for r in range(1, rounds + 1):
            entries = by_round[r]
            hashes = {e["state_hash"] for e in entries.values()}
            assert len(hashes) == 1, f"round {r}: hashes differ: {entries}"
        # A survivor may miss a round (late to its lobby) and sync past it, as in a sequential run; it still
        # commits most rounds itself, and never a state the others did not hold.
        for p in survivors:
            own = [e for e in p.rounds() if 1 <= e["round"] <= rounds and not e["synced"]]
            assert len(own) >= rounds - 4, f"{p.name} committed only {[e['round'] for e in own]}"
        # The newcomer synced, then averaged and committed rounds of its own with the others.
        mine = [e for e in newcomer.rounds() if 1 <= e["round"] <= rounds]
        assert any(e["synced"] for e in mine), mine
        trained = [e for e in mine if not e["synced"]]
        assert trained and all(e["group_size"] >= 2 for e in trained), mine
        assert all(group_pids(p.pgid) == [] for p in everyone)
