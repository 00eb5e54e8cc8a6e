"""bench/convergence.py at its smallest setting: every method runs as real processes and the JSON is whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "convergence.py"


def test_convergence_bench_smallest_setting_prints_the_schema() -> None:
    args = ["--json", "--peers", "2", "--steps", "4", "--h", "2", "--batch", "2", "--seq-len", "16"]
    args += ["--eval-batch", "4", "--curve-every", "2", "--warm-start-steps", "3", "--timeout", "240"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=280, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "ddp_loss",
        "single_loss",
        "diloco_h2_loss",
        "ddp_bytes_per_peer",
        "diloco_h2_bytes_per_peer",
        "tokens",
    ):
        assert key in out, key
    tokens = 2 * 4 * 2 * 16  # peers × steps × batch × seq_len, the same for every method
    assert out["tokens"] == out["single_tokens"] == out["diloco_h2_tokens"] == tokens
    # Every method starts from the same 3-step warm-start checkpoint; its tokens are counted apart.
    assert out["warm_start_tokens"] == 3 * 2 * 16
    assert 0 < out["warm_start_loss"] < 6
    assert out["ddp_replicas_identical"] and out["diloco_h2_replicas_identical"]
    assert out["ddp_allreduces"] == 4
    assert out["diloco_h2_rounds"] == 2
    # Per round each peer sends int8 (+ scales, headers): about a quarter of one fp32 gradient all-reduce,
    # plus its own partition once more to its witness (1/n of the vector; n = 2 here: half again) and the
    # agreement phase's digests (docs/protocol.md 10.6).
    per_round, per_step = out["diloco_h2_bytes_per_peer"] / 2, out["ddp_bytes_per_peer"] / 4
    assert 1.5 * per_step / 4.5 < per_round < 1.5 * per_step / 3
    assert all(0 < out[k] < 6 for k in ("ddp_loss", "single_loss", "diloco_h2_loss"))


def test_convergence_bench_lands_the_overlapped_average_as_it_arrives() -> None:
    """`--land-after -1`: each overlapped average lands after the first inner step at which it has
    completed (the daemon's `overlap.start_landing`), never later than the round's last step; the tokens and
    the replicas' agreement are those of any other method."""
    args = ["--json", "--peers", "2", "--steps", "8", "--h", "4", "--batch", "2", "--seq-len", "16"]
    args += ["--eval-batch", "4", "--curve-every", "4", "--warm-start-steps", "0", "--timeout", "240"]
    args += ["--modes", "overlapped", "--compressions", "int2", "--land-after", "-1"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=280, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["overlap_h4_int2_tokens"] == out["single_tokens"] == 2 * 8 * 2 * 16
    assert out["overlap_h4_int2_replicas_identical"]
    landed = out["overlap_h4_int2_landed_after"]  # per peer: one landing in round 2 of 2
    assert len(landed) == 2 and all(len(k) == 1 and 0 <= k[0] <= 3 for k in landed), landed
    assert 0 < out["overlap_2bit_h4_loss"] < 6
