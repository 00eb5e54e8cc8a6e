"""bench/rl.py at its smallest setting: 2 rollout workers and 2 trainers as real processes, one of the workers
fabricating rewards; the JSON is whole, batches were verified, the cheater excluded, the replicas equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "rl.py"


def run_bench(path: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a benchmark to completion and return its last line's JSON. Its own process group, so that a
    timeout kills the benchmark's children too (they die with a normally exiting parent, not a killed one)."""
    proc = subprocess.Popen(
        [sys.executable, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    out: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.timeout(200)
def test_rl_bench_smallest_setting_verifies_trains_and_excludes_a_cheater() -> None:
    args = ["--json", "--warmup-steps", "20", "--minutes", "1", "--max-versions", "2", "--h", "2"]
    args += ["--prompts-per-step", "4", "--samples-per-prompt", "4", "--eval-prompts", "32"]
    args += ["--cheat", "fabricate"]
    out = run_bench(BENCH, args, 180)
    for key in (
        "accuracy_before",
        "accuracy_after",
        "accuracy_before_greedy",
        "accuracy_after_greedy",
        "minutes",
        "rollouts_per_s",
        "verification_cost_fraction",
        "trainer_idle_fraction",
        "reward_curve",
        "accuracy_by_answer_length",
        "batches_verified",
        "batches_refused",
        "settings",
    ):
        assert key in out, key
    for key in ("accuracy_before", "accuracy_after", "trainer_idle_fraction"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["versions"] == 2 and all(steps == 4 for steps in out["grpo_steps"])
    assert out["replicas_identical"] and len(set(out["digests"])) == 1
    assert out["batches_verified"] > 0 and out["completions_trained"] > 0
    assert out["rollouts_per_s"] > 0 and out["verification_cost_fraction"] > 0
    assert out["reward_curve"] and out["reward_curve"][0]["version"] == 0
    assert out["heldout_prompts_seen_in_training"] + out["unseen_prompts"] == 32
    # The fabricating worker: refused with evidence by both trainers, then excluded; another peer accepts it.
    cheater = out["cheater"]
    assert out["refused_by_reason"]["fabricated-reward"] >= 1
    assert out["excluded"] == [cheater] and out["cheater_excluded_by_all"]
    assert out["evidence_accepted_by_observer"][cheater] == "fabricated-reward: accepted"
    assert out["settings"]["workers"] == out["settings"]["trainers"] == 2
    assert out["minutes"] < 3


SWARM_BENCH = BENCH.with_name("rl_swarm.py")


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_rl_swarm_bench_runs_the_node_roles_and_prints_one_json_line() -> None:
    """bench/rl_swarm.py for half a minute: real daemons, the issue's keys in the last line."""
    args = ["--json", "--minutes", "0.5", "--warmup-steps", "20", "--eval-prompts", "32"]
    out = run_bench(SWARM_BENCH, args, 270)
    for key in ("accuracy_before", "accuracy_after", "minutes", "rollouts_per_s"):
        assert isinstance(out[key], float), key
    assert 0 <= out["verification_cost_fraction"] < 1 and 0 <= out["trainer_idle_fraction"] <= 1
    assert out["versions"] >= 1 and out["replicas_identical"] and out["excluded"] == []
    assert all(o.get("accepted", 0) > 0 for o in out["batches_by_outcome"].values())
