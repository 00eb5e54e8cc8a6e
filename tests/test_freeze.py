"""A member frozen mid-round does not stop the others (`@pytest.mark.swarm`, real daemons on loopback).

Four `intellect-node start` processes train the tiny run (groups of four) while two busy processes
compete for the cores. After round 2, one daemon is frozen with SIGSTOP for 40 s (its p2p daemon keeps
running, as when a laptop's Python process is stopped). The three healthy members must keep completing
rounds during the freeze; after SIGCONT the frozen member must average with the others again; every
round's global-state hash must agree across everyone who logged it. The same in a run with the overlapped
outer update (`diloco.outer_update = "overlapped"`), where the frozen member has an average in flight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from intellect.node.cli.swarm import Swarm
from test_overlap import overlapped_manifest
from test_swarm import fast_manifest, wait_until

pytestmark = pytest.mark.swarm

FREEZE_S = 40.0


@pytest.mark.timeout(720)
@pytest.mark.parametrize(
    "outer_update",
    [
        "sequential",
        # The overlapped mode split a round into two groups (two states) in 3 of 4 runs, and a member then
        # stayed on its own line (the split was only healed with nothing in flight); the sequential mode did
        # it too, once in CI. Since the one-group rules of single-bucket runs and the mid-pipeline heal
        # (protocol.md 10.1, 12), the sequential variant passed 5 of 5 runs; the overlapped one still
        # splits now and then (1 of 3 local runs: two pairs declared at once, each healed within a round)
        # and failed once for other reasons since fixed (a member cut off by the loss check, a sync stuck
        # on the frozen holder). A known bug (issue #17 stays open), left running so that the fix shows.
        pytest.param(
            "overlapped",
            marks=pytest.mark.xfail(reason="overlapped mode: a round split into two groups around a freeze"),
        ),
    ],
)
async def test_a_frozen_member_does_not_stop_the_others_and_rejoins(
    tmp_path: Path, outer_update: str
) -> None:
    manifest = overlapped_manifest(tmp_path) if outer_update == "overlapped" else fast_manifest(tmp_path)
    manifest.write_text(manifest.read_text().replace("group_size = 3", "group_size = 4"))
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(2)
    ]
    try:
        async with asyncio.timeout(660), Swarm(tmp_path / "swarm", manifest_path=manifest) as swarm:
            await swarm.seed()
            peers = [swarm.launch(f"peer{i}", min_peers=4) for i in range(4)]
            await wait_until(lambda: all(p.last_round() >= 2 for p in peers), 300, "round 2 on all", peers)
            frozen, healthy = peers[3], peers[:3]
            before = {p.name: p.last_round() for p in healthy}
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(FREEZE_S)
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            resumed = time.time()
            during = {p.name: p.last_round() - before[p.name] for p in healthy}
            # After it resumes, it catches up and averages with the others again (not only syncs).
            await wait_until(
                lambda: any(
                    not e.get("synced") and e.get("ts", 0) > resumed and e.get("group_size", 0) >= 2
                    for e in frozen.rounds()
                ),
                240,
                "the resumed member to average again",
                peers,
            )
            for p in peers:
                await swarm.stop(p, 30)
            logs = {p.name: p.rounds() for p in peers}
            tails = {p.name: p.log_path.read_text(errors="replace")[-3000:] for p in peers}
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert all(n >= 2 for n in during.values()), (during, tails)
    by_round: dict[int, set[str]] = {}
    for entries in logs.values():
        for e in entries:
            by_round.setdefault(int(e["round"]), set()).add(str(e["state_hash"]))
    split = {r: h for r, h in by_round.items() if len(h) > 1}
    who = {
        name: [(e["round"], str(e["state_hash"])[:8], e.get("synced"), e.get("group_size")) for e in entries]
        for name, entries in logs.items()
    }
    assert not split, (split, who)
